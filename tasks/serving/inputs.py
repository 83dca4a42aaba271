"""Request checks: each bad input becomes a RequestError with a 4xx status and a JSON body naming the problem."""

from __future__ import annotations

import io
import math
from pathlib import PurePath

import numpy as np
import soundfile as sf

from v2m.audio import AUDIO_SUFFIXES, peak_dbfs, to_mono
from v2m.config_serve import GenerateConfig, ServeConfig

MAX_PROMPT_CHARS = 500


class RequestError(Exception):
    """A request that cannot be served as sent: HTTP `status`, a short `error` code and a sentence of `detail`."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


def max_upload_bytes(cfg: ServeConfig) -> int:
    return int(cfg.max_upload_mb * 1024 * 1024)


def decode_vocal(data: bytes, filename: str, cfg: ServeConfig) -> tuple[np.ndarray, int]:
    """Mono float32 audio and its rate, from an uploaded wav, flac or mp3."""
    if len(data) > max_upload_bytes(cfg):
        raise RequestError(413, "too_large", f"{filename}: the upload is larger than {cfg.max_upload_mb:g} MB "
                                             f"(params.yaml serve.max_upload_mb)")
    suffix = PurePath(filename or "").suffix.lower()
    if suffix not in AUDIO_SUFFIXES:
        raise RequestError(415, "unsupported_format", f"{filename!r}: unsupported format {suffix or '(none)'!r}; "
                                                      f"send wav, flac or mp3")
    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile raises several types, by format
        raise RequestError(400, "unreadable", f"{filename}: cannot decode the audio ({exc})") from exc
    mono = to_mono(audio.T)
    if mono.size == 0 or not np.isfinite(mono).all():
        raise RequestError(400, "unreadable", f"{filename}: the audio is empty or holds NaN/infinite samples")
    if len(mono) < cfg.min_vocal_s * sr:
        raise RequestError(422, "too_short", f"{filename}: {len(mono) / sr:.2f} s is too short; a vocal needs at "
                                             f"least {cfg.min_vocal_s:g} s")
    if peak_dbfs(mono) < cfg.silence_dbfs:
        raise RequestError(422, "silent", f"{filename}: the vocal is silent (peak {peak_dbfs(mono):.1f} dBFS < "
                                          f"{cfg.silence_dbfs:g} dBFS)")
    return mono, int(sr)


def parse_duration(raw: str | None, vocal_s: float | None, cfg: ServeConfig, gen: GenerateConfig) -> float:
    """The requested seconds: the form field, else the vocal's length, else serve.default_duration_s."""
    if raw in (None, ""):
        duration = vocal_s if vocal_s is not None else cfg.default_duration_s
    else:
        try:
            duration = float(raw)
        except ValueError:
            raise RequestError(422, "invalid_duration", f"duration {raw!r} is not a number of seconds") from None
        if not math.isfinite(duration) or duration <= 0:
            raise RequestError(422, "invalid_duration", f"duration must be a positive number of seconds, got {raw}")
    limit = min(cfg.max_duration_s, gen.max_duration_s)
    if duration > limit:
        raise RequestError(422, "too_long", f"{duration:.1f} s is longer than the {limit:g} s limit (params.yaml "
                                            f"serve.max_duration_s / generate.max_duration_s)")
    return duration


def parse_seed(raw: str | None) -> int | None:
    if raw in (None, ""):
        return None
    try:
        seed = int(raw)
    except ValueError:
        raise RequestError(422, "invalid_seed", f"seed {raw!r} is not an integer") from None
    if not 0 <= seed < 2**31:
        raise RequestError(422, "invalid_seed", f"seed must be in [0, 2^31), got {seed}")
    return seed


def parse_prompt(raw: str | None) -> str | None:
    prompt = (raw or "").strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(422, "prompt_too_long", f"the prompt has {len(prompt)} characters; at most "
                                                   f"{MAX_PROMPT_CHARS}")
    return prompt or None
