"""params.yaml `audioldm:` — AudioLDM backend settings (schema only: pure pydantic, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from v2m.config_base import Strict
from v2m.config_train import TrainConfig


class AudioLDMArch(Strict):
    """Architecture of a random-init preset (the real preset reads its own from the weights' configs)."""
    unet_channels: list[int] = Field([32, 64], min_length=1)
    latent_channels: int = Field(8, ge=1)
    vae_channels: list[int] = Field([16, 32, 32], min_length=1)  # 3 levels = 4x down, as AudioLDM's VAE
    vocoder_channels: int = Field(32, ge=32)  # HiFi-GAN halves it 5 times
    clap_dim: int = Field(32, ge=8)  # projection dim of the tiny CLAP (512 for the real one)


class AudioLDMPreset(Strict):
    weights: str = ""  # "" = random init from `arch`; else a local folder or s3://bucket/prefix (diffusers layout)
    arch: AudioLDMArch = AudioLDMArch()
    train: TrainConfig = TrainConfig()  # this preset's training profile (params.yaml train.audioldm overrides keys)


TINY_TRAIN = TrainConfig(max_steps=12, batch_size=2, lr=1e-3, warmup_steps=2, crop_s=2.0, checkpoint_every=6,
                         val_every=6)
# Fine-tuning AudioLDM-S's UNet: lr within the 1e-5..5e-5 fine-tuning range (AudioLDM itself trained at 3e-5),
# a 500-step warm-up, its own 10.24 s clips, global batch 16 by accumulation, bf16 and checkpointing on one A40.
AUDIOLDM_S_TRAIN = TrainConfig(max_steps=10000, batch_size=4, grad_accum=4, lr=2e-5, warmup_steps=500,
                               schedule="cosine", weight_decay=0.01, betas=(0.9, 0.95), crop_s=10.24, precision="bf16",
                               gradient_checkpointing=True, checkpoint_every=500, keep_checkpoints=3, val_every=500,
                               val_batches=8, samples=4, sample_duration_s=10.0)


class ConditionDropout(Strict):
    """As musicgen.condition_dropout (see v2m/config_musicgen.py): recipe "joint" (default) first drops both
    conditions together at `joint` (0.1, AudioLDM's own text dropout for guidance), then each at its rate."""
    recipe: Literal["joint", "independent"] = "joint"
    joint: float = Field(0.1, ge=0, le=1)
    text: float = Field(0.1, ge=0, le=1)
    vocal: float = Field(0.1, ge=0, le=1)


class AudioLDMConfig(Strict):
    preset: str = "tiny"
    presets: dict[str, AudioLDMPreset] = {
        "tiny": AudioLDMPreset(train=TINY_TRAIN),
        "audioldm-s": AudioLDMPreset(weights=".v2m/weights/audioldm-s-full-v2", train=AUDIOLDM_S_TRAIN),
    }
    prompt_template: str = "{genre} music for input vocals"
    cache_batch_size: int = Field(8, ge=1)  # chunks per encoder forward in the cache stage (data/cache)
    refined_prompt_template: str = "{genre} music, {mood} mood, {bpm:.0f} bpm, in {key}"
    condition_dropout: ConditionDropout = ConditionDropout()
    # The "no text" condition: "empty_prompt" = CLAP embedding of "" (what AudioLDM was trained and guided with,
    # so the base model's guidance is unchanged at step 0); "zero" = a zero vector. "No vocal" is always zero.
    null_text: Literal["empty_prompt", "zero"] = "empty_prompt"
    guidance_scale: float = Field(2.5, ge=0)
    inference_steps: int = Field(50, ge=1)
    # Training window (AudioLDM trains on 10.24 s). Not a params.yaml key here: Params.backend_config fills it
    # from the training profile (train.crop_s); the field remains so a saved model records what it trained on.
    crop_s: float = Field(10.24, gt=0)
