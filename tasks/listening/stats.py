"""What the votes say: win rates with Wilson intervals, Bradley-Terry strengths, agreement between listeners.

A vote is a row of store.py: `model_a`, `model_b`, `winner` ("" = no preference), `listener`, `chunk_id`,
`genre`, `language`. "No preference" counts as half a win for each side: it pulls the win rate toward 0.5
instead of being dropped, so a challenger nobody can tell apart from the champion does not look better.

A vote may carry a `weight` (1 when absent): summarize() caps each listener's total at `max_per_listener`
(each of their k votes weighs min(1, cap / k)), so the win rate and its interval rest on people, not on how
many vocals one keen listener answered. Counts (n, wins, ...) stay counts of votes; `weight` is their sum.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from statistics import NormalDist
from typing import Any


def wilson(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (nan, nan) with no trials."""
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def outcome(vote: dict[str, Any], model: str) -> str:
    """'win', 'loss' or 'tie' for `model` in a vote it took part in."""
    if not vote["winner"]:
        return "tie"
    return "win" if vote["winner"] == model else "loss"


def win_rate(votes: list[dict[str, Any]], model: str, confidence: float = 0.95) -> dict[str, Any]:
    """`model`'s record over the votes it took part in: n, wins, losses, ties, their total weight, the
    (weighted) rate and its Wilson interval."""
    counts, weights = Counter(), Counter()
    for v in votes:
        if model in (v["model_a"], v["model_b"]):
            counts[outcome(v, model)] += 1
            weights[outcome(v, model)] += v.get("weight", 1.0)
    n, total = sum(counts.values()), sum(weights.values())
    score = weights["win"] + 0.5 * weights["tie"]
    low, high = wilson(score, total, confidence)
    return {"n": n, "weight": total, "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"],
            "win_rate": score / total if total else math.nan, "ci_low": low, "ci_high": high}


def capped(votes: list[dict[str, Any]], max_per_listener: float) -> list[dict[str, Any]]:
    """The votes with a `weight` each, so that no listener's votes weigh more than `max_per_listener`."""
    per = Counter(v["listener"] for v in votes)
    return [{**v, "weight": min(1.0, max_per_listener / per[v["listener"]])} for v in votes]


def agreement(votes: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """Agreement between listeners on the same test vocal, over vocals heard by two or more listeners.

    `pairwise`: the share of listener pairs who gave the same answer (win / loss / tie for `model`, so the
    A/B order each was shown does not matter). `kappa`: Fleiss' kappa, the same corrected for chance
    (generalised to a varying number of listeners per vocal); nan when every answer falls in one category.
    """
    items: dict[str, Counter] = defaultdict(Counter)
    for v in votes:
        items[v["chunk_id"]][outcome(v, model)] += 1
    rated = [c for c in items.values() if sum(c.values()) >= 2]
    if not rated:
        return {"items": 0, "pairwise": math.nan, "kappa": math.nan}
    per_item = []
    for c in rated:
        n = sum(c.values())
        per_item.append((sum(k * k for k in c.values()) - n) / (n * (n - 1)))
    observed = sum(per_item) / len(per_item)
    totals = Counter()
    for c in rated:
        totals.update(c)
    n_all = sum(totals.values())
    expected = sum((k / n_all) ** 2 for k in totals.values())
    kappa = (observed - expected) / (1 - expected) if expected < 1 else math.nan
    return {"items": len(rated), "pairwise": observed, "kappa": kappa}


def bradley_terry(votes: list[dict[str, Any]], iterations: int = 2000, tol: float = 1e-10) -> dict[str, float]:
    """Bradley-Terry strengths (summing to 1) by Hunter's MM algorithm; a tie is half a win for each side.
    P(i preferred to j) = s_i / (s_i + s_j)."""
    wins: Counter = Counter()
    games: Counter = Counter()
    for v in votes:
        a, b = v["model_a"], v["model_b"]
        games[tuple(sorted((a, b)))] += 1
        if v["winner"]:
            wins[v["winner"]] += 1
        else:
            wins[a] += 0.5
            wins[b] += 0.5
    models = sorted({m for pair in games for m in pair})
    s = {m: 1.0 / len(models) for m in models}
    for _ in range(iterations):
        new = {}
        for m in models:
            denom = sum(n / (s[x] + s[y]) for (x, y), n in games.items() if m in (x, y))
            new[m] = wins[m] / denom if denom else 0.0
        total = sum(new.values()) or 1.0
        new = {m: v / total for m, v in new.items()}
        done = max(abs(new[m] - s[m]) for m in models) < tol
        s = new
        if done:
            break
    return s


def summarize(votes: list[dict[str, Any]], model: str, opponent: str, confidence: float = 0.95,
              max_per_listener: float | None = None) -> dict[str, Any]:
    """Everything the owner, the gate and the model version record: `model`'s results against `opponent`
    overall, per genre and per language (each listener's weight capped at `max_per_listener`, if given),
    listener agreement, and Bradley-Terry over every model voted on."""
    pair = [v for v in votes if {v["model_a"], v["model_b"]} == {model, opponent}]
    if max_per_listener is not None:
        pair = capped(pair, max_per_listener)
    out: dict[str, Any] = {"model": model, "opponent": opponent, "confidence": confidence,
                           "listeners": len({v["listener"] for v in pair}), **win_rate(pair, model, confidence),
                           "agreement": agreement(pair, model)}
    for column, label in (("genre", "genre"), ("language", "language")):
        groups = sorted({v[column] or "unknown" for v in pair})
        out[label] = {g: win_rate([v for v in pair if (v[column] or "unknown") == g], model, confidence)
                      for g in groups}
    if len({m for v in votes for m in (v["model_a"], v["model_b"])}) > 2:
        out["bradley_terry"] = bradley_terry(votes)
    return out
