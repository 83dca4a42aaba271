"""Writing stems that the pipeline never altered: summed from parts, or cut from a mix, level kept as it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from v2m.audio import read_audio, resample


def write_stem(path: Path, audio: np.ndarray, sr: int) -> None:
    """[channels, samples] as 16-bit wav, or 32-bit float when a sample would clip (a separated or summed stem may
    peak above full scale): never rescaled, so stems keep adding up to their mix."""
    audio = np.atleast_2d(audio)
    subtype = "PCM_16" if float(np.abs(audio).max(initial=0.0)) < 1.0 else "FLOAT"
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio.T, sr, subtype=subtype)


def sum_files(paths: list[Path]) -> tuple[np.ndarray, int]:
    """The sum of several audio files, at the first one's rate; mono when their channel counts differ; the
    shorter ones padded with silence."""
    parts = [read_audio(p) for p in paths]
    sr = parts[0][1]
    audio = [np.stack([resample(c, r, sr) for c in a]) for a, r in parts]
    return sum_parts(audio), sr


def sum_parts(parts: list[np.ndarray]) -> np.ndarray:
    if len({a.shape[0] for a in parts}) > 1:
        parts = [a.mean(axis=0, keepdims=True) for a in parts]
    n = max(a.shape[1] for a in parts)
    return np.sum([np.pad(a, ((0, 0), (0, n - a.shape[1]))) for a in parts], axis=0).astype(np.float32)
