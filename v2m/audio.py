"""Audio I/O shared by every pipeline step: decode, resample, measure, write.

We decode with soundfile (wav, flac, mp3 through libsndfile >= 1.1) and resample with soxr; torchaudio is
deliberately not used (see shared/notes/stack-facts.md: it does not load beside the CPU torch build).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3")


class AudioError(ValueError):
    """A file could not be used as audio; the message names the file and the problem."""


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode a file to float32 of shape [channels, samples] and its sample rate."""
    path = Path(path)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile raises LibsndfileError, RuntimeError or TypeError by format
        raise AudioError(f"{path}: cannot decode audio ({exc})") from exc
    return np.ascontiguousarray(data.T), int(sr)


def read_mono(path: str | Path, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, int]:
    """Decode (a frame range of) a file and average its channels."""
    try:
        data, sr = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(f"{path}: cannot decode audio ({exc})") from exc
    return data.mean(axis=1), int(sr)


def to_mono(audio: np.ndarray) -> np.ndarray:
    return audio.mean(axis=0) if audio.ndim == 2 else audio


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return audio.astype(np.float32, copy=False)
    return soxr.resample(audio, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def write_wav(path: str | Path, audio: np.ndarray, sr: int, subtype: str = "PCM_16") -> None:
    """Write mono or [channels, samples] audio; the parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = audio.T if audio.ndim == 2 else audio
    sf.write(str(path), data, sr, subtype=subtype)


def peak_dbfs(audio: np.ndarray) -> float:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return 20.0 * np.log10(peak) if peak > 0 else -np.inf


def frame_rms_db(audio: np.ndarray, sr: int, frame_s: float = 0.05) -> np.ndarray:
    """RMS level in dBFS of consecutive non-overlapping frames (the tail shorter than a frame is dropped)."""
    n = max(1, int(sr * frame_s))
    frames = audio[: len(audio) // n * n].reshape(-1, n)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    return 20.0 * np.log10(np.maximum(rms, 1e-10))


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
