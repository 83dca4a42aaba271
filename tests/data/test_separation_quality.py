"""The separation quality estimates, on stems whose faults are known: each fault is named by its own reason."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.data.separation_quality import estimate, sdr, sdr_improvement, verdict
from tests.conftest import synth_stems
from v2m.config_separate import HarmonicConfig, QualityConfig

SR = 22050


@pytest.fixture(scope="module")
def stems() -> tuple[np.ndarray, np.ndarray]:
    vocal, inst = synth_stems(seed=3, seconds=8.0, sr=SR)
    return vocal[None], inst[None]


def judge(mix, vocals, inst) -> tuple[dict, dict]:
    e = estimate(mix, vocals, inst, SR, HarmonicConfig())
    return e, verdict(e, QualityConfig(), 0.5)


def test_true_stems_pass_and_each_fault_is_quarantined_with_its_reason(stems) -> None:
    v, i = stems
    mix = v + i
    e, ok = judge(mix, v, i)
    assert ok["status"] == "ok" and ok["quality"] > 0.9, e
    assert e["residual_db"] < -100 and e["vocal_in_instrumental_db"] < -12 and e["lead_db"] > 3

    cases = {"vocal_in_instrumental": (0.1 * v, mix - 0.1 * v),   # most of the voice left in the instrumental
             "accompaniment_in_vocal": (v + 0.9 * i, 0.1 * i),    # most of the accompaniment in the vocal
             "stems_do_not_add_up": (v, 0.5 * i),                 # half the instrumental missing
             "no_vocal": (np.zeros_like(v), mix)}                 # nothing separated
    for reason, (vocals, inst) in cases.items():
        e, bad = judge(mix, vocals, inst)
        assert bad["status"] == "quarantined" and bad["reason"] == reason, (reason, e, bad)
        assert bad["message"] and "separate.min_quality" in bad["message"]


def test_sdr_and_its_improvement() -> None:
    ref = np.sin(np.arange(1000) / 10)
    assert sdr(ref, ref) > 80 and sdr(ref, np.zeros_like(ref)) == pytest.approx(0, abs=1e-6)
    assert sdr(ref, 0.9 * ref) == pytest.approx(20, abs=0.01)  # error 0.1 x the signal: 20 dB
    mix = ref + np.cos(np.arange(1000) / 3)
    assert sdr_improvement(ref, ref, mix) > 0 > sdr_improvement(ref, mix + ref, mix)
