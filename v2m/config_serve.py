"""params.yaml `generate:` (whole songs in windows) and `serve:` (the HTTP service) — schema only, no torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from v2m.config_base import Strict


class WindowConfig(Strict):
    """One model call covers `window_s`; the next starts `stride_s` later, so consecutive calls share
    window_s - stride_s seconds (MusicGen: the prompt codes it continues; AudioLDM: the crossfade)."""
    window_s: float = Field(gt=0)
    stride_s: float = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> "WindowConfig":
        if self.stride_s > self.window_s:
            raise ValueError(f"stride_s ({self.stride_s}) must not exceed window_s ({self.window_s}): "
                             f"windows would leave gaps")
        return self


class GenerateConfig(Strict):
    max_duration_s: float = Field(600.0, gt=0)  # the longest song `v2m generate` and `v2m serve` will make
    # audiocraft's extend-stride defaults: 30 s windows advancing by 20 s (MusicGen-Melody's 30 s melody window)
    musicgen: WindowConfig = WindowConfig(window_s=30.0, stride_s=20.0)
    # AudioLDM-S was trained on 10.24 s clips; 10 s windows with a 2.5 s equal-power crossfade
    audioldm: WindowConfig = WindowConfig(window_s=10.0, stride_s=7.5)


class ServeConfig(Strict):
    backend: Literal["musicgen", "audioldm"] = "musicgen"  # serves voice2music-<backend>@champion ...
    model: str = ""                   # ... unless a REF is given here (or with `v2m serve --model`)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    poll_s: float = Field(10.0, ge=0)  # how often the alias is looked up; 0 = never follow promotions
    max_upload_mb: float = Field(25.0, gt=0)
    max_duration_s: float = Field(300.0, gt=0)  # per request (and never more than generate.max_duration_s)
    default_duration_s: float = Field(10.0, gt=0)  # text only, when the request names no duration
    min_vocal_s: float = Field(1.0, gt=0)
    silence_dbfs: float = Field(-60.0, lt=0)
    max_pending: int = Field(16, ge=1)  # queued + running requests; beyond it 503 with Retry-After
    retry_after_s: int = Field(5, ge=1)
    timeout_s: float = Field(300.0, gt=0)  # per request, queueing included; past it 504
    batch_window_ms: float = Field(20.0, ge=0)  # requests arriving this close together run as one batch
    max_batch: int = Field(4, ge=1)  # 1 = no batching (MusicGen seeds then reproduce exactly)
