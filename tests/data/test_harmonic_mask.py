"""The separator's own HPSS mask is librosa's, number for number: its median filters are a faster route to the
same medians (the constants of harmonic_mask.py were tuned on librosa's)."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
from scipy.ndimage import median_filter

from tasks.data.harmonic_mask import HPSS_KERNEL, harmonic_share, running_median


@pytest.mark.parametrize("shape", [(513, 400), (40, 1), (1, 40), (31, 31), (7, 100), (100, 7), (3, 2), (2, 3)])
def test_running_median_is_scipys_reflecting_median_filter(shape) -> None:
    S = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
    S[:, ::5] = 0.0  # ties and zeros, as silent bins have
    for axis in (0, 1):
        size = [HPSS_KERNEL if a == axis else 1 for a in range(2)]
        assert np.array_equal(running_median(S, HPSS_KERNEL, axis), median_filter(S, size=size, mode="reflect"))


def test_harmonic_share_is_librosas_hpss_mask_on_a_real_spectrogram() -> None:
    sr, rng = 22050, np.random.default_rng(0)
    t = np.arange(3 * sr) / sr
    y = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)
    y[:: sr // 4] += 1.0  # clicks: the percussive part
    S = np.abs(librosa.stft(y.astype(np.float32), n_fft=2048, hop_length=256))
    expected = librosa.decompose.hpss(S, margin=1.0, mask=True)[0]
    assert np.array_equal(harmonic_share(S), expected)
    assert 0.2 < expected.mean() < 0.9  # neither all harmonic nor all percussive: the comparison means something
