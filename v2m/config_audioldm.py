"""params.yaml `audioldm:` — AudioLDM backend settings (schema only: pure pydantic, no torch)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AudioLDMArch(_Strict):
    """Architecture of a random-init preset (the real preset reads its own from the weights' configs)."""
    unet_channels: list[int] = [32, 64]
    latent_channels: int = Field(8, ge=1)
    clap_dim: int = Field(32, ge=8)  # projection dim of the tiny CLAP (512 for the real one)


class AudioLDMPreset(_Strict):
    weights: str = ""  # "" = random init from `arch`; else a local folder or s3://bucket/prefix (diffusers layout)
    arch: AudioLDMArch = AudioLDMArch()


class ConditionDropout(_Strict):
    text: float = Field(0.1, ge=0, le=1)
    vocal: float = Field(0.1, ge=0, le=1)


class AudioLDMConfig(_Strict):
    preset: str = "tiny"
    presets: dict[str, AudioLDMPreset] = {
        "tiny": AudioLDMPreset(),
        "audioldm-s": AudioLDMPreset(weights=".v2m/weights/audioldm-s-full-v2"),
    }
    prompt_template: str = "{genre} music for input vocals"
    refined_prompt_template: str = "{genre} music, {mood} mood, {bpm:.0f} bpm, in {key}"
    condition_dropout: ConditionDropout = ConditionDropout()
    guidance_scale: float = Field(2.5, ge=0)
    inference_steps: int = Field(50, ge=1)
    crop_s: float = Field(20.0, gt=0)
