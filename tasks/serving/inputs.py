"""Request checks: each bad input becomes a RequestError with a 4xx status and a JSON body naming the problem.

A vocal is judged by its header before it is decoded (v2m/upload.py, shared with the MLflow pyfunc's base64
input): a small file can claim an hour of audio or a 1 Hz rate, so its rate, channels and length are checked
first, and only the frames the request uses are decoded.
"""

from __future__ import annotations

import math

from v2m.config_serve import GenerateConfig, ServeConfig
from v2m.upload import RequestError, decode_vocal, max_upload_bytes  # noqa: F401 (the routes' names for them)

MAX_PROMPT_CHARS = 500


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
        if duration < cfg.min_duration_s:
            raise RequestError(422, "too_short", f"duration {duration:g} s is below the {cfg.min_duration_s:g} s "
                                                 f"minimum (params.yaml serve.min_duration_s)")
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
