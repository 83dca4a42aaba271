"""A vocal upload, decoded within bounds: shared by `v2m serve` (tasks/serving/inputs.py) and the MLflow pyfunc's
base64 input (models/pyfunc.py), which travels inside logged models and so may import only `models` and `v2m`.

A vocal is judged by its header before it is decoded: a small file can claim an hour of audio (FLAC of
silence) or a 1 Hz rate (that resamples to gigabytes), so its rate, channels and length are checked first, and
then only the frames the request uses are decoded, in blocks, mono as they come, with a cap that holds even
when the header lies about the length.
"""

from __future__ import annotations

import io
import math
from pathlib import PurePath

import numpy as np
import soundfile as sf

from v2m.audio import AUDIO_SUFFIXES, peak_dbfs, to_mono
from v2m.config_serve import ServeConfig

MAX_CHANNELS = 8  # a vocal is mono or stereo; 8 leaves room for odd recorders, not for a 65535-channel header
BLOCK_FRAMES = 65536
UNKNOWN_LENGTH = 2**62  # libsndfile reports about SF_COUNT_MAX frames when the header does not say


class RequestError(Exception):
    """A request that cannot be served as sent: HTTP `status`, a short `error` code and a sentence of `detail`."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


def max_upload_bytes(cfg: ServeConfig) -> int:
    return int(cfg.max_upload_mb * 1024 * 1024)


def decode_vocal(data: bytes, filename: str, cfg: ServeConfig, needed_s: float | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 audio and its rate, from an uploaded wav, flac or mp3: the first `needed_s` seconds when the
    request names a duration, else the whole vocal (at most serve.max_vocal_s)."""
    if len(data) > max_upload_bytes(cfg):
        raise RequestError(413, "too_large", f"{filename}: the upload is larger than {cfg.max_upload_mb:g} MB "
                                             f"(params.yaml serve.max_upload_mb)")
    suffix = PurePath(filename or "").suffix.lower()
    if suffix not in AUDIO_SUFFIXES:
        raise RequestError(415, "unsupported_format", f"{filename!r}: unsupported format {suffix or '(none)'!r}; "
                                                      f"send wav, flac or mp3")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr = _check_header(f, filename, cfg)
            needed = cfg.max_vocal_s if needed_s is None else min(cfg.max_vocal_s, max(needed_s, cfg.min_vocal_s))
            mono = _read_mono(f, math.ceil(needed * sr), whole=needed_s is None)
    except RequestError:
        raise
    except Exception as exc:  # libsndfile raises several types, by format
        raise RequestError(400, "unreadable", f"{filename}: cannot decode the audio ({_reason(exc)})") from exc
    if mono is None:  # the header said less (or nothing), the data holds more
        raise RequestError(422, "too_long", f"{filename}: the vocal is longer than {cfg.max_vocal_s:g} s "
                                            f"(params.yaml serve.max_vocal_s)")
    if mono.size == 0 or not np.isfinite(mono).all():
        raise RequestError(400, "unreadable", f"{filename}: the audio is empty or holds NaN/infinite samples")
    if len(mono) < cfg.min_vocal_s * sr:
        raise RequestError(422, "too_short", f"{filename}: {len(mono) / sr:.2f} s is too short; a vocal needs at "
                                             f"least {cfg.min_vocal_s:g} s")
    if peak_dbfs(mono) < cfg.silence_dbfs:
        raise RequestError(422, "silent", f"{filename}: the vocal is silent (peak {peak_dbfs(mono):.1f} dBFS < "
                                          f"{cfg.silence_dbfs:g} dBFS)")
    return mono, sr


def _check_header(f: sf.SoundFile, filename: str, cfg: ServeConfig) -> int:
    """The rate, after refusing what the header alone shows to be out of bounds."""
    sr, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
    if not cfg.min_sample_rate <= sr <= cfg.max_sample_rate:
        raise RequestError(422, "bad_sample_rate", f"{filename}: {sr} Hz is outside {cfg.min_sample_rate}-"
                                                   f"{cfg.max_sample_rate} Hz (params.yaml serve.min_sample_rate / "
                                                   f"max_sample_rate)")
    if not 1 <= channels <= MAX_CHANNELS:
        raise RequestError(422, "bad_channels", f"{filename}: {channels} channels; at most {MAX_CHANNELS}")
    if 0 < frames < UNKNOWN_LENGTH and frames / sr > cfg.max_vocal_s:
        raise RequestError(422, "too_long", f"{filename}: the vocal is {frames / sr:.1f} s long; at most "
                                            f"{cfg.max_vocal_s:g} s (params.yaml serve.max_vocal_s)")
    return sr


def _read_mono(f: sf.SoundFile, limit: int, whole: bool) -> np.ndarray | None:
    """Up to `limit` frames, mixed to mono block by block (memory: the mono result, not frames x channels).
    whole=True: the vocal must end within `limit` (None if it goes on: a header that understated its length)."""
    parts, n, wanted = [], 0, limit + (1 if whole else 0)  # one frame past the limit shows it goes on
    while n < wanted:
        block = f.read(min(BLOCK_FRAMES, wanted - n), dtype="float32", always_2d=True)
        if not len(block):
            break
        parts.append(to_mono(block.T))
        n += len(block)
    if whole and n > limit:
        return None
    return np.concatenate(parts)[:limit] if parts else np.zeros(0, np.float32)


def _reason(exc: Exception) -> str:
    """libsndfile's own words ("Format not recognised"), without the file object it names."""
    text = getattr(exc, "error_string", "") or str(exc)
    return text.split(": ", 1)[-1] if " at 0x" in text else text
