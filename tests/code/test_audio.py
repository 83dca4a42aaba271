"""Audio helpers against reference implementations."""

from __future__ import annotations

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from v2m.audio import integrated_loudness, write_wav


@pytest.mark.parametrize("sr", [16000, 32000, 44100])
def test_integrated_loudness_matches_pyloudnorm(sr: int) -> None:
    rng = np.random.default_rng(sr)
    x = rng.standard_normal(sr * 12) * np.linspace(0.005, 0.4, sr * 12)
    x[: sr * 2] = 0  # silence that the absolute gate must drop
    assert integrated_loudness(x, sr) == pytest.approx(pyloudnorm.Meter(sr).integrated_loudness(x), abs=1e-6)


def test_integrated_loudness_of_silence_and_short_input() -> None:
    assert integrated_loudness(np.zeros(16000 * 2), 16000) == -np.inf
    assert integrated_loudness(np.ones(100), 16000) == -np.inf


def test_write_wav_matches_soundfile_quantisation(tmp_path) -> None:
    x = np.random.default_rng(0).uniform(-1.2, 1.2, 8000).astype(np.float32)
    write_wav(tmp_path / "ours.wav", x, 8000, gain=0.5)
    ours, sr = sf.read(tmp_path / "ours.wav", dtype="int16")
    assert sr == 8000 and sf.info(tmp_path / "ours.wav").subtype == "PCM_16"
    expected = (np.clip(x * 0.5, -1, 1) * 32767).astype(np.int16)
    np.testing.assert_array_equal(ours, expected)
    write_wav(tmp_path / "clipped.wav", x, 8000)  # values beyond full scale clip instead of wrapping
    clipped, _ = sf.read(tmp_path / "clipped.wav", dtype="int16")
    assert clipped.max() == 32767 and clipped.min() == -32767
