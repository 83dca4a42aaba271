"""Rhythm fit and repetition against known answers on rendered Bach chorales (tests/model/conftest.py)."""

from __future__ import annotations

import librosa
import numpy as np

from tests.model.conftest import CHORALE_BPM, CHORALE_SR, N_CHORALES

SR = CHORALE_SR


def shifted(y: np.ndarray, seconds: float) -> np.ndarray:
    n = int(round(seconds * SR))
    return np.concatenate([np.zeros(n, np.float32), y[: y.size - n]])


def stretched(y: np.ndarray, rate: float) -> np.ndarray:
    """The same accompaniment played `rate` times as fast (pitch kept), cut or padded to the same length."""
    z = librosa.effects.time_stretch(y, rate=rate).astype(np.float32)
    return np.pad(z[: y.size], (0, max(0, y.size - z.size)))


def looped_bar(c: dict) -> np.ndarray:
    y = c["true"]
    start, n = int(c["bar_start_s"] * SR), int(c["bar_s"] * SR)
    return np.resize(y[start:start + n], y.size).astype(np.float32)


def variants(c: dict) -> dict[str, np.ndarray]:
    """The true accompaniment, its rhythmic corruptions and the trivial outputs of the gate tests."""
    y, rng = c["true"], np.random.default_rng(0)
    return {"true": y, "half_beat": shifted(y, 0.5 * 60 / CHORALE_BPM), "stretched": stretched(y, 1.1),
            "drone": c["drone"], "doubling": c["vocal"].copy(), "noise": (0.1 * rng.standard_normal(y.size)).astype(np.float32),
            "silence": np.zeros_like(y), "loop": looped_bar(c)}


def test_explore(chorale_renders):
    import sys; sys.path.insert(0, "/tmp")
    import explore11
    explore11.run(chorale_renders)
