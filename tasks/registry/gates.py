"""The promotion gates: small functions over the evidence, each returning a GateResult.

Evidence is the challenger's evaluation and the champion's evaluation *on the same test set with the same
settings* (tasks/registry/promotion.py re-evaluates the champion when needed). Comparative gates read the
paired per-chunk differences (challenger - champion) and their bootstrap interval (tasks/evaluation/paired.py);
a gate passes on its interval, never on a point estimate, so the noise of a small test set cannot decide.

Which gate stops which trivial output (measured on 20 rendered chorales with the true accompaniment as
champion, tests/model/test_gates.py):

    a held tonic triad (drone)  rhythm_fit   (no onsets to align; harmonic_fit drops too)
    the vocal itself (doubling) doubling     (chroma cosine with the vocal jumps to 1)
    white noise                 harmonic_fit (a flat chroma is as dissonant as consonant; rhythm_fit too)
    silence                     sanity       (the raw output is silent)
    one bar looped              repetition   (the clip repeats itself exactly; harmonic_fit drops too)

online_evidence (optional, promotion.online_evidence.required) judges the challenger on shadow pairs from
`v2m serve` instead of the test set: the same paired intervals, over production requests.

To add a gate (e.g. human_preference), write `def my_gate(ev: Evidence) -> GateResult` in its own module
and append it to GATES there (`GATES.append(my_gate)`) before promotion runs. A gate that cannot decide
yet returns status "waiting": the challenger is not promoted, and nothing is recorded as failed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tasks.evaluation.evaluate import EvalResult
from tasks.evaluation.paired import NAN_INTERVAL, Interval, paired_fad_ci, paired_mean_ci
from v2m.config import PromotionConfig
from v2m.config_serve import OnlineEvidenceConfig

PASS, FAIL, WAITING = "pass", "fail", "waiting"


@dataclass
class GateResult:
    name: str
    status: str                  # pass | fail | waiting
    reason: str
    estimate: float | None = None  # comparative gates: challenger - champion (mean over paired chunks)
    low: float | None = None       # ... its bootstrap interval at cfg.confidence
    high: float | None = None
    n: int | None = None           # chunks (or outputs) the decision rests on

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        ci = "" if self.estimate is None else f" {self.estimate:+.4f}"
        ci += "" if self.low is None else f" [{self.low:+.4f}, {self.high:+.4f}]"
        ci += "" if self.n is None else f" n={self.n}"
        return f"{self.status.upper():7s} {self.name}:{ci} {self.reason}"


@dataclass
class Evidence:
    cfg: PromotionConfig
    challenger: EvalResult
    champion: EvalResult | None         # None: no champion yet (the first one passes absolute gates only)
    version_tags: dict[str, str] = field(default_factory=dict)  # the challenger version's tags
    approved: bool = False
    reinstate: bool = False

    def paired(self, metric: str, rows: list[dict] | None = None) -> Interval:
        """Mean of (challenger - champion) of a per-chunk metric over the chunks both scored, with its CI."""
        champ = {r["chunk_id"]: r.get(metric, np.nan) for r in self.champion.rows}
        rows = self.challenger.rows if rows is None else rows
        pairs = [(_num(r.get(metric)), _num(champ[r["chunk_id"]])) for r in rows if r["chunk_id"] in champ]
        a, b = (np.array(x, np.float64) for x in zip(*pairs)) if pairs else (np.array([]), np.array([]))
        return paired_mean_ci(a, b, self.cfg.bootstrap_resamples, self.cfg.bootstrap_seed, self.cfg.confidence)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _finite(x: float | None) -> bool:
    # MLflow stores +-inf as +-1.8e308: treat such magnitudes as infinite too.
    return x is not None and math.isfinite(x) and abs(x) < 1e300


def _interval(name: str, ci: Interval, ok: bool, rule: str) -> GateResult:
    if ci.n == 0 or not _finite(ci.low):
        return GateResult(name, FAIL, "no chunk scored by both models", n=ci.n)
    return GateResult(name, PASS if ok else FAIL, rule, ci.estimate, ci.low, ci.high, ci.n)


# ---- absolute gates (the challenger alone) -------------------------------------------------------------
def complete(ev: Evidence) -> GateResult:
    m = ev.challenger.metrics
    missing = [k for k in ev.cfg.required_metrics if not _finite(m.get(k))]
    nan = sorted(k for k, v in m.items() if k.count("/") == 1 and not _finite(v))
    bad = missing + [k for k in nan if k not in missing]
    return GateResult("complete", FAIL if bad else PASS,
                      f"missing or NaN: {', '.join(bad)}" if bad else "every required metric is finite")


def sanity(ev: Evidence) -> GateResult:
    share = _num(ev.challenger.metrics.get("eval/sanity_pass"))
    n = len(ev.challenger.rows)
    ok = _finite(share) and share >= ev.cfg.min_sanity_pass
    return GateResult("sanity", PASS if ok else FAIL, f"{share:.0%} of raw outputs sane (clipping, NaN, silence "
                      f"before normalisation), needs >= {ev.cfg.min_sanity_pass:.0%}", share, n=n)


def not_rolled_back(ev: Evidence) -> GateResult:
    rolled = ev.version_tags.get("promotion.rolled_back")
    if not rolled:
        return GateResult("not_rolled_back", PASS, "never rolled back")
    if ev.reinstate:
        return GateResult("not_rolled_back", PASS, f"rolled back {rolled}; reinstated explicitly (--reinstate)")
    return GateResult("not_rolled_back", FAIL, f"rolled back {rolled}; only `v2m promote --reinstate` brings it back")


def manual_approval(ev: Evidence) -> GateResult:
    if not ev.cfg.manual_approval:
        return GateResult("manual_approval", PASS, "not required")
    return GateResult("manual_approval", PASS if ev.approved else WAITING,
                      "approved" if ev.approved else "waiting for --approve")


# ---- comparative gates (paired, same test set) -----------------------------------------------------------
def same_test_set(ev: Evidence) -> GateResult:
    a, b = ev.challenger, ev.champion
    same = a.test_fingerprint == b.test_fingerprint and a.settings == b.settings and bool(a.test_fingerprint)
    return GateResult("same_test_set", PASS if same else FAIL,
                      f"test set {a.test_fingerprint} / settings {a.settings} vs champion's {b.test_fingerprint} / "
                      f"{b.settings}", n=len(a.rows))


def harmonic_fit(ev: Evidence) -> GateResult:
    ci, drop = ev.paired("harmonic_fit"), ev.cfg.harmonic_fit_max_drop
    return _interval("harmonic_fit", ci, ci.low >= -drop, f"lower bound >= -{drop}")


def rhythm_fit(ev: Evidence) -> GateResult:
    ci, drop = ev.paired("rhythm_fit"), ev.cfg.rhythm_fit_max_drop
    return _interval("rhythm_fit", ci, ci.low >= -drop, f"lower bound >= -{drop}")


def doubling(ev: Evidence) -> GateResult:
    ci, rise = ev.paired("chroma_cosine"), ev.cfg.doubling_max_rise
    return _interval("doubling", ci, ci.high <= rise, f"chroma cosine upper bound <= +{rise}")


def repetition(ev: Evidence) -> GateResult:
    ci, rise = ev.paired("repetition"), ev.cfg.repetition_max_rise
    return _interval("repetition", ci, ci.high <= rise, f"upper bound <= +{rise}")


def fad(ev: Evidence) -> GateResult:
    a, b = ev.challenger, ev.champion
    if not (a.generated and b.generated) or [r["chunk_id"] for r in a.rows] != [r["chunk_id"] for r in b.rows]:
        return GateResult("fad", FAIL, "no per-chunk embeddings of the same chunks to compare")
    ci = paired_fad_ci(a.generated, b.generated, a.references, ev.cfg.bootstrap_resamples, ev.cfg.bootstrap_seed,
                       ev.cfg.confidence)
    limit = ev.cfg.fad_max_increase * _num(b.metrics.get("eval/fad"))
    return _interval("fad", ci, ci.high <= limit, f"FAD difference upper bound <= {limit:.4g} "
                     f"({ev.cfg.fad_max_increase:g} x the champion's)")


def no_group_regression(ev: Evidence) -> GateResult:
    worst, gated, lines = None, 0, []
    for column in ("language", "genre"):
        for group in sorted({r[column] for r in ev.challenger.rows}):
            rows = [r for r in ev.challenger.rows if r[column] == group]
            if len(rows) < ev.cfg.breakdown_min_n:
                continue
            gated += 1
            ci = ev.paired("harmonic_fit", rows)
            if ci.n and ci.low < -ev.cfg.breakdown_max_regression:
                lines.append(f"{column} {group}: {ci.estimate:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}] n={ci.n}")
            if ci.n and (worst is None or ci.low < worst.low):
                worst = ci
    reason = "; ".join(lines) if lines else (f"no language or genre regressed (groups of >= "
                                             f"{ev.cfg.breakdown_min_n} chunks: {gated})")
    return GateResult("no_group_regression", FAIL if lines else PASS, reason,
                      *((worst.estimate, worst.low, worst.high, worst.n) if worst else ()))


# ---- online evidence (shadow pairs from `v2m serve`; tasks/serving/evidence.py gathers them) -------------
def online_evidence(cfg: OnlineEvidenceConfig, diffs: dict[str, Interval]) -> GateResult:
    """promotion.online_evidence: each gated online metric's paired difference (challenger - champion, on the
    same production requests) needs at least `min_pairs` pairs and a lower bound >= its threshold. With fewer
    pairs the gate waits: the challenger is neither promoted nor refused until the shadow has seen enough."""
    name = "online_evidence"
    gated = {m: diffs.get(m, NAN_INTERVAL) for m in cfg.thresholds}
    short = {m: ci.n for m, ci in gated.items() if ci.n < cfg.min_pairs}
    if short:
        return GateResult(name, WAITING, "waiting for shadow pairs: " + ", ".join(
            f"{m} {n} of {cfg.min_pairs}" for m, n in short.items()) + " (serve.rollout.mode shadow)",
            n=min(short.values()))
    margins = {m: ci.low - cfg.thresholds[m] for m, ci in gated.items()}
    failed = [m for m, margin in margins.items() if not (_finite(gated[m].low) and margin >= 0)]
    worst = gated[min(margins, key=lambda m: margins[m] if _finite(margins[m]) else -math.inf)]
    reason = "; ".join(f"{m} {ci.estimate:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] n={ci.n} lower bound >= "
                       f"{cfg.thresholds[m]:+g}" for m, ci in gated.items())
    return GateResult(name, FAIL if failed else PASS, reason, worst.estimate, worst.low, worst.high, worst.n)


ABSOLUTE: list[Callable[[Evidence], GateResult]] = [complete, sanity, not_rolled_back]
COMPARATIVE: list[Callable[[Evidence], GateResult]] = [same_test_set, harmonic_fit, rhythm_fit, fad, doubling,
                                                       repetition, no_group_regression]
GATES: list[Callable[[Evidence], GateResult]] = [manual_approval]  # more gates (other modules) append here


def run_gates(ev: Evidence) -> list[GateResult]:
    """Every gate, pass or not, with its numbers. Comparative gates need a champion on the same test set:
    when the test sets differ, only `same_test_set` is reported for them (its failure stops promotion)."""
    out = [g(ev) for g in ABSOLUTE]
    if ev.champion is None:
        out.append(GateResult("first_champion", PASS, "no champion yet: absolute gates only"))
    else:
        same = same_test_set(ev)
        out += [same] + ([g(ev) for g in COMPARATIVE[1:]] if same.passed else [])
    return out + [g(ev) for g in GATES]
