"""params.yaml `musicgen:` — MusicGen-Melody backend settings (schema only: pure pydantic, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from v2m.config_base import Strict
from v2m.config_train import TrainConfig


class MusicGenArch(Strict):
    """Architecture of a random-init preset (the real preset reads its own from the weights' config.json)."""
    decoder_layers: int = Field(2, ge=1)
    decoder_hidden: int = Field(64, ge=8)
    decoder_heads: int = Field(4, ge=1)
    decoder_ffn: int = Field(128, ge=8)
    num_codebooks: int = Field(4, ge=1)
    codebook_size: int = Field(2048, ge=2)
    text_d_model: int = Field(32, ge=8)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(2, ge=1)
    text_ff: int = Field(64, ge=8)
    text_vocab: int = Field(256, ge=32, le=256)  # the tiny tokenizer is trained on a built-in prompt corpus
    codec_filters: int = Field(4, ge=1)  # EnCodec's first conv width (64 in the real 32 kHz codec)
    codec_dim: int = Field(16, ge=2)  # EnCodec latent / codebook vector size (128 in the real codec)
    dropout: float = Field(0.0, ge=0, lt=1)  # decoder dropout (0.1 in the real model; tests use it for exact resume)


class MusicGenPreset(Strict):
    weights: str = ""  # "" = random init from `arch`; else a local folder or s3://bucket/prefix of real files
    arch: MusicGenArch = MusicGenArch()
    train: TrainConfig = TrainConfig()  # this preset's training profile (params.yaml train.musicgen overrides keys)


# The profiles params.yaml spells out (kept here too, so a params.yaml without `presets` gets the same).
TINY_TRAIN = TrainConfig(max_steps=12, batch_size=2, lr=1e-3, warmup_steps=2, crop_s=2.0, checkpoint_every=6,
                         val_every=6)
# Fine-tuning a pretrained 1.5B decoder: a peak lr 1/10 of audiocraft's pre-training 1e-4, a long warm-up,
# whole 30 s chunks, global batch 16 by accumulation, bf16 autocast and activation checkpointing for one A40.
MELODY_TRAIN = TrainConfig(max_steps=20000, batch_size=2, grad_accum=8, lr=1e-5, warmup_steps=1000, schedule="cosine",
                           betas=(0.9, 0.95),
                           weight_decay=0.1, crop_s=30.0, precision="bf16", gradient_checkpointing=True,
                           checkpoint_every=500, keep_checkpoints=3, val_every=500, val_batches=8, samples=4,
                           sample_duration_s=10.0)


class ConditionDropout(Strict):
    """Training without a condition, for classifier-free guidance.

    recipe "joint" (default, audiocraft's): first both conditions together at rate `joint` (audiocraft's
    classifier_free_guidance.training_dropout, 0.2), then each of the rest at its own rate (audiocraft's
    attribute_dropout). Guidance contrasts the full condition with the *joint* null, so the model must see that
    null often: 0.2 + 0.8 x 0.3 x 0.2 = 25 % of items here. recipe "independent": each condition at its own rate,
    nothing joint (the joint null then appears in only text x chroma = 6 % of items)."""
    recipe: Literal["joint", "independent"] = "joint"
    joint: float = Field(0.2, ge=0, le=1)  # recipe "joint" only
    text: float = Field(0.3, ge=0, le=1)  # dropped text = empty prompt with an all-zero attention mask
    chroma: float = Field(0.2, ge=0, le=1)  # dropped chroma = the model's null melody (one-hot bin 0 everywhere)


class LoraConfig(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "v_proj"]


class MusicGenConfig(Strict):
    preset: str = "tiny"
    presets: dict[str, MusicGenPreset] = {
        "tiny": MusicGenPreset(train=TINY_TRAIN),
        "melody-1.5b": MusicGenPreset(weights=".v2m/weights/musicgen-melody", train=MELODY_TRAIN),
    }
    prompt_template: str = "{genre} music for input vocals"
    cache_batch_size: int = Field(8, ge=1)  # chunks per encoder forward in the cache stage (data/cache)
    condition_dropout: ConditionDropout = ConditionDropout()
    guidance_scale: float = Field(3.0, ge=0)  # <= 1 turns classifier-free guidance off
    top_k: int = Field(250, ge=0)  # sampling: MusicGen's default top-k; 0 = full distribution
    finetune: str = Field("full", pattern="^(full|lora)$")
    lora: LoraConfig = LoraConfig()
    # Training window cut from each cached chunk. Not a params.yaml key here: Params.backend_config fills it
    # from the training profile (train.crop_s); the field remains so a saved model records what it trained on.
    crop_s: float = Field(30.0, gt=0)
