"""Rhythm fit and repetition against known answers on rendered Bach chorales (tests/model/conftest.py)."""

from __future__ import annotations

import numpy as np

from tasks.evaluation.harmony import analyse
from tasks.evaluation.rhythm import repetition, rhythm_fit
from tests.model.conftest import CHORALE_BPM, CHORALE_SR, N_CHORALES, looped_bar, shifted, stretched

SR = CHORALE_SR


def test_rhythm_fit_prefers_the_true_accompaniment_to_a_shifted_or_stretched_one(chorale_renders) -> None:
    rows = []
    for c in chorale_renders[:N_CHORALES]:
        y = c["true"]
        rows.append({k: rhythm_fit(c["vocal"], a, SR) for k, a in (
            ("true", y), ("half_beat", shifted(y, 0.5 * 60 / CHORALE_BPM)), ("stretched", stretched(y, 1.1)))})
    col = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    wins = {k: int(np.sum(col["true"] > col[k])) for k in ("half_beat", "stretched")}
    print(f"\nrhythm_fit on {N_CHORALES} chorales: TRUE {col['true'].mean():+.3f}, half a beat late "
          f"{col['half_beat'].mean():+.3f} (true wins {wins['half_beat']}/{N_CHORALES}), 10 % faster "
          f"{col['stretched'].mean():+.3f} (true wins {wins['stretched']}/{N_CHORALES})")
    assert wins["half_beat"] >= 18 and wins["stretched"] >= 18
    assert np.all(np.abs(col["true"]) <= 1)


def test_rhythm_fit_and_repetition_reference_points(chorale_renders) -> None:
    c = chorale_renders[0]
    silence = np.zeros_like(c["true"])
    assert rhythm_fit(c["vocal"], silence, SR) == 0.0  # no onsets: nothing aligned
    assert np.isnan(rhythm_fit(silence, c["true"], SR))  # nothing sung: nothing to align with
    assert rhythm_fit(c["vocal"], c["vocal"], SR) > rhythm_fit(c["vocal"], c["true"], SR)  # doubling aligns
    loop, true = repetition(analyse(looped_bar(c), SR)), repetition(analyse(c["true"], SR))
    assert loop > 0.95 and true < loop - 0.3
    assert np.isnan(repetition(analyse(silence, SR)))
