"""The comparison report calls a difference a win or a loss only when its interval excludes 0 AND it reaches the
practical threshold stated on the page (params.yaml report:); a tiny, precisely measured difference is not a loss."""

from __future__ import annotations

from tasks.evaluation.paired import Interval
from tasks.registry.report import _cell, practical_threshold, verdict
from v2m.config import ReportConfig

CFG = ReportConfig(min_difference=0.01, min_fad_ratio=0.05)


def test_a_minus_zero_difference_with_a_tight_interval_is_no_practical_difference() -> None:
    tiny = Interval(-0.00003, -0.00006, -0.00001, 40)  # the interval excludes 0: Δ -0.0000 used to read "▼ loses"
    threshold = practical_threshold("eval/harmonic_fit", 0.42, CFG)
    assert threshold == 0.01
    assert verdict("eval/harmonic_fit", tiny) == "worse"  # without a threshold: the old reading
    assert verdict("eval/harmonic_fit", tiny, threshold) == "negligible"
    html = _cell(0.42, tiny, "eval/harmonic_fit", threshold)
    assert "loses" not in html and "no practical difference" in html and 'data-verdict="negligible"' in html


def test_real_differences_still_win_or_lose_and_overlapping_ones_tie() -> None:
    assert verdict("eval/harmonic_fit", Interval(-0.05, -0.07, -0.03, 40), 0.01) == "worse"
    assert verdict("eval/harmonic_fit", Interval(0.05, 0.03, 0.07, 40), 0.01) == "better"
    assert verdict("eval/harmonic_fit", Interval(0.05, -0.01, 0.1, 40), 0.01) == "tie"
    assert "▼ loses" in _cell(0.4, Interval(-0.05, -0.07, -0.03, 40), "eval/harmonic_fit", 0.01)
    # FAD is unbounded: its threshold is a share of the first model's FAD, and lower is better
    assert practical_threshold("eval/fad", 2.0, CFG) == 0.1
    assert verdict("eval/fad", Interval(-0.05, -0.08, -0.02, 40), 0.1) == "negligible"
    assert verdict("eval/fad", Interval(-0.3, -0.4, -0.2, 40), 0.1) == "better"
