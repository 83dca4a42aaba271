"""Paired bootstrap confidence intervals: challenger and champion scored on the same chunks, same seeds.

A gate compares two models through the per-chunk differences (challenger - champion), so the variation
between test vocals (some are simply harder) cancels and what is left is the models' difference. The
interval is the percentile bootstrap over chunks: resample the chunks with replacement `resamples`
times (a fixed seed, so a decision can be re-derived exactly), recompute the statistic, take the
(1 - level) / 2 and (1 + level) / 2 quantiles.

FAD is a set statistic, biased upwards on small sets; here both FADs are recomputed on every resample
from the *same* resampled chunks (pooled window embeddings of the generations and of the references),
so both carry the same size bias and their difference is compared at equal set size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float   # the statistic on all n chunks
    low: float
    high: float
    n: int            # chunks that entered (both values finite)

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n}


NAN_INTERVAL = Interval(float("nan"), float("nan"), float("nan"), 0)


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _bounds(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_mean_ci(challenger: np.ndarray, champion: np.ndarray, resamples: int, seed: int,
                   level: float = 0.95) -> Interval:
    """Mean of (challenger - champion) over the chunks where both are finite, with its bootstrap interval."""
    a, b = np.asarray(challenger, np.float64), np.asarray(champion, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal shapes, got {a.shape} and {b.shape}")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if d.size == 0:
        return NAN_INTERVAL
    means = d[_indices(d.size, resamples, seed)].mean(axis=1)
    return Interval(float(d.mean()), *_bounds(means, level), int(d.size))


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


class _Moments:
    """Per-chunk window counts, sums and sums of outer products: the mean and covariance of any multiset
    of chunks (a bootstrap resample) is then a weighted sum, without stacking the windows again."""

    def __init__(self, chunks: list[np.ndarray]):
        self.n = np.array([len(c) for c in chunks], np.float64)
        self.s = np.stack([c.sum(axis=0) for c in chunks])
        self.ss = np.stack([c.T @ c for c in chunks])

    def stats(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = weights @ self.n
        mu = weights @ self.s / n
        cov = (np.tensordot(weights, self.ss, axes=1) - n * np.outer(mu, mu)) / (n - 1)
        return mu, cov


def _fd(mu1: np.ndarray, s1: np.ndarray, r1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians, given r1 = s1^1/2. Tr (S1 S2)^1/2 is the sum of the square
    roots of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric PSD): exact, also for the singular covariances
    of small sets, and much cheaper than a general matrix square root."""
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    d = mu1 - mu2
    return max(float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr), 0.0)


def paired_fad_ci(challenger: list[np.ndarray], champion: list[np.ndarray], reference: list[np.ndarray],
                  resamples: int, seed: int, level: float = 0.95) -> Interval:
    """FAD(challenger) - FAD(champion) against the same references, each a list of per-chunk window
    embeddings [windows, dim] in the same chunk order; bootstrapped over chunks (see the module doc)."""
    n = len(reference)
    if not (len(challenger) == len(champion) == n) or n == 0:
        raise ValueError(f"need the same chunks for both models and the reference, got "
                         f"{len(challenger)}, {len(champion)}, {n}")
    ref, a, b = _Moments(reference), _Moments(challenger), _Moments(champion)

    def diff(weights: np.ndarray) -> float:
        mu, s = ref.stats(weights)
        r = _sqrt_psd(s)
        return _fd(mu, s, r, *a.stats(weights)) - _fd(mu, s, r, *b.stats(weights))

    boots = np.array([diff(np.bincount(idx, minlength=n).astype(np.float64))
                      for idx in _indices(n, resamples, seed)])
    return Interval(diff(np.ones(n)), *_bounds(boots, level), n)
