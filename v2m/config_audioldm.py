"""params.yaml `audioldm:` — AudioLDM backend settings (schema only: pure pydantic, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from v2m.config_base import Strict


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


class ConditionDropout(Strict):
    text: float = Field(0.1, ge=0, le=1)
    vocal: float = Field(0.1, ge=0, le=1)


class AudioLDMConfig(Strict):
    preset: str = "tiny"
    presets: dict[str, AudioLDMPreset] = {
        "tiny": AudioLDMPreset(),
        "audioldm-s": AudioLDMPreset(weights=".v2m/weights/audioldm-s-full-v2"),
    }
    prompt_template: str = "{genre} music for input vocals"
    refined_prompt_template: str = "{genre} music, {mood} mood, {bpm:.0f} bpm, in {key}"
    condition_dropout: ConditionDropout = ConditionDropout()
    # The "no text" condition: "empty_prompt" = CLAP embedding of "" (what AudioLDM was trained and guided with,
    # so the base model's guidance is unchanged at step 0); "zero" = a zero vector. "No vocal" is always zero.
    null_text: Literal["empty_prompt", "zero"] = "empty_prompt"
    guidance_scale: float = Field(2.5, ge=0)
    inference_steps: int = Field(50, ge=1)
    crop_s: float = Field(10.24, gt=0)  # AudioLDM's training clip length
