"""params.yaml `generate:` (whole songs in windows) and `serve:` (the HTTP service) — schema only, no torch."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator, model_validator

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
    model: str = ""                   # ... or this REF (or with `v2m serve --model`)
    host: str = "127.0.0.1"  # another address needs API keys (V2M_SERVE_API_KEYS) or an auth proxy on loopback
    port: int = Field(8000, ge=1, le=65535)
    poll_s: float = Field(10.0, ge=0)  # how often the alias is looked up; 0 = never follow promotions
    max_upload_mb: float = Field(25.0, gt=0)  # bytes received, counted as they arrive (chunked or not)
    max_vocal_s: float = Field(300.0, gt=0)  # a vocal whose header says longer is refused before decoding
    min_sample_rate: int = Field(8000, ge=1)  # vocals outside [min, max] Hz are refused before decoding:
    max_sample_rate: int = Field(96000, ge=1)  # a 1 Hz header would ask resampling for gigabytes
    max_duration_s: float = Field(300.0, gt=0)  # per request (and never more than generate.max_duration_s)
    min_duration_s: float = Field(0.25, gt=0)  # shorter requests are refused (a 0-sample WAV helps nobody)
    default_duration_s: float = Field(10.0, gt=0)  # text only, when the request names no duration
    min_vocal_s: float = Field(1.0, gt=0)
    silence_dbfs: float = Field(-60.0, lt=0)
    max_pending: int = Field(16, ge=1)  # queued + running requests; beyond it 503 with Retry-After
    max_per_client: int = Field(4, ge=1)  # queued + running per client (API key, else address); beyond it 429
    retry_after_s: int = Field(5, ge=1)
    timeout_s: float = Field(300.0, gt=0)  # per request, queueing included; past it 504
    header_timeout_s: float = Field(10.0, gt=0)  # a request's headers must arrive within this; past it 408
    body_timeout_s: float = Field(60.0, gt=0)  # its whole body within this (25 MB in 60 s is ~3.5 Mbit/s)
    batch_window_ms: float = Field(20.0, ge=0)  # requests arriving this close together run as one batch
    max_batch: int = Field(4, ge=1)  # 1 = no batching (MusicGen seeds then reproduce exactly)
    # Host header values served (DNS rebinding: a web page whose name resolves to 127.0.0.1 is refused);
    # "*" = any. /healthz, /readyz and /metrics answer whatever the Host (probes use the pod's address).
    allowed_hosts: list[str] = ["127.0.0.1", "localhost", "::1"]
    docs: bool = False  # /docs and /openapi.json

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        if not hosts:
            raise ValueError("name at least one host (or \"*\" for any)")
        return [h.strip().lower().strip("[]") for h in hosts]

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.min_sample_rate > self.max_sample_rate:
            raise ValueError(f"min_sample_rate ({self.min_sample_rate}) is above max_sample_rate "
                             f"({self.max_sample_rate})")
        if self.min_duration_s > self.max_duration_s:
            raise ValueError(f"min_duration_s ({self.min_duration_s}) is above max_duration_s ({self.max_duration_s})")
        return self


def parse_networks(entries: list[str]) -> list[str]:
    """Addresses or CIDR networks (trusted proxies), checked: a typo must not silently trust nobody."""
    for e in entries:
        try:
            ipaddress.ip_network(e.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{e!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)") from None
    return [e.strip() for e in entries]
