"""Per-sample evaluation metrics and their registry; the set-level FAD lives in tasks/evaluation/fad.py.

`compute_sample_metrics(vocal, vocal_sr, inst, inst_sr, meta)` returns every per-sample metric as
{name: float}; the evaluation flow logs them as `eval/<name>` (averaged with `aggregate`, NaN-aware) and
`eval/fad` from `fad(...)`. METRICS documents each name: what it measures, its range, its direction.

Pure functions over numpy audio (mono float, any sample rate): no files, no global state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.evaluation.fad import (ClapEmbedder, Embedder, MelStatsEmbedder, clap_score, embed_set,  # noqa: F401
                                  fad, fad_from_embeddings, frechet_distance, gaussian_stats)
from tasks.evaluation.harmony import (ANALYSIS_SR, analyse, chroma_cosine, finite, harmonic_fit,  # noqa: F401
                                      key_agreement, key_of, key_relation_score, parse_key, tempo_agreement, tempo_of,
                                      tempo_relation_score)
from tasks.evaluation.rhythm import repetition, rhythm_fit  # noqa: F401
from v2m.audio import frame_rms_db


# ---- sanity ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SanityThresholds:
    """What a usable generation must satisfy (see `sanity`)."""

    clip_level: float = 0.999        # |sample| at or above this counts as clipped (full scale is 1.0)
    max_clipping: float = 0.001      # at most 0.1 % of samples clipped (a few hard-limited peaks pass)
    silence_dbfs: float = -60.0      # a 50 ms frame whose RMS is below this is silent
    max_silence_ratio: float = 0.5   # at most half of the clip silent (an intro/outro or rests pass)


SANITY = SanityThresholds()
PEAK_FLOOR_DBFS = -120.0


def sanity(audio: np.ndarray, sr: int, thresholds: SanityThresholds = SANITY) -> dict[str, float]:
    """Basic health of a generated clip, all as floats (for logging):

    - nonfinite: share of samples that are NaN or +-inf (should be 0);
    - clipping: share of finite samples with |x| >= clip_level (0.999);
    - silence_ratio: share of 50 ms frames with RMS below silence_dbfs (-60 dBFS);
    - peak_dbfs: peak level, floored at PEAK_FLOOR_DBFS (-120) so that digital silence stays a finite
      number in aggregates and MLflow;
    - sanity_pass: 1.0 when the clip is non-empty, has no non-finite sample, clipping <= 0.1 % and
      silence_ratio <= 0.5, else 0.0.
    Non-finite samples are treated as 0 for the other measures.
    """
    x = np.asarray(audio, np.float64).ravel()
    finite = np.isfinite(x)
    nonfinite = float(1.0 - finite.mean()) if x.size else 0.0
    y = np.where(finite, x, 0.0)
    clipping = float(np.mean(np.abs(y) >= thresholds.clip_level)) if y.size else 0.0
    levels = frame_rms_db(y, sr) if y.size else np.array([-np.inf])
    silence = float(np.mean(levels < thresholds.silence_dbfs))
    peak = float(np.abs(y).max()) if y.size else 0.0
    ok = (y.size > 0 and nonfinite == 0.0 and clipping <= thresholds.max_clipping
          and silence <= thresholds.max_silence_ratio)
    return {"nonfinite": nonfinite, "clipping": clipping, "silence_ratio": silence,
            "peak_dbfs": max(20 * np.log10(peak), PEAK_FLOOR_DBFS) if peak > 0 else PEAK_FLOOR_DBFS,
            "sanity_pass": float(ok)}


# ---- registry ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricInfo:
    higher_is_better: bool | None   # None: descriptive, no direction
    range: str
    description: str


METRICS: dict[str, MetricInfo] = {
    "harmonic_fit": MetricInfo(True, "[-1, 1]", "consonance of the instrumental with the sung pitch class "
                               "(the promotion metric; harmony.harmonic_fit)"),
    "chroma_cosine": MetricInfo(None, "[0, 1]", "MusicGen paper's quantised-chroma cosine vs the vocal: "
                                "melody doubling, reported for comparability (harmony.chroma_cosine)"),
    "key_agreement": MetricInfo(True, "[0, 1]", "MIREX key score, instrumental key vs metadata key; NaN without one"),
    "key_agreement_vocal": MetricInfo(True, "[0, 1]", "MIREX key score, instrumental key vs the vocal's key"),
    "tempo_agreement": MetricInfo(True, "{0, 0.5, 1}", "instrumental tempo vs metadata bpm: 1 within 4 %, 0.5 "
                                  "at 2x/0.5x/3x/(1/3)x; NaN without a bpm"),
    "tempo_bpm": MetricInfo(None, "40-240", "estimated tempo of the instrumental"),
    "rhythm_fit": MetricInfo(True, "[-1, 1]", "onset alignment of the instrumental with the vocal "
                             "(rhythm.rhythm_fit)"),
    "repetition": MetricInfo(False, "[-1, 1]", "how exactly the instrumental repeats itself at lags >= 1 s: 1 = one "
                             "bar looped (rhythm.repetition)"),
    "clap_score": MetricInfo(True, "[-1, 1]", "CLAP text-audio cosine with the prompt; only with CLAP weights"),
    # sanity: measured on the raw output, before generate()'s peak normalisation
    "nonfinite": MetricInfo(False, "[0, 1]", "share of NaN/inf samples"),
    "clipping": MetricInfo(False, "[0, 1]", "share of samples at |x| >= 0.999"),
    "silence_ratio": MetricInfo(False, "[0, 1]", "share of 50 ms frames below -60 dBFS"),
    "peak_dbfs": MetricInfo(None, "[-120, 0] typically", "peak level (digital silence: -120)"),
    "sanity_pass": MetricInfo(True, "{0, 1}", "1 when finite, clipping <= 0.1 %, silence <= 50 %"),
    "fad": MetricInfo(False, ">= 0", "Fréchet Audio Distance, set level (fad.fad); not per sample"),
}


def _meta_value(meta: Mapping[str, Any] | None, key: str) -> Any:
    value = (meta or {}).get(key)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return value


def compute_sample_metrics(vocal: np.ndarray, vocal_sr: int, inst: np.ndarray, inst_sr: int,
                           meta: Mapping[str, Any] | None = None, *, prompt: str | None = None,
                           clap: ClapEmbedder | None = None, raw: np.ndarray | None = None) -> dict[str, float]:
    """Every per-sample metric of one generated instrumental for its vocal, keyed by the METRICS names.

    vocal / inst: mono float audio at their own rates (resampled here as needed; they are assumed to
    start together). meta: the source track's metadata; uses "bpm" and "key" when present (missing or
    blank -> the metadata-based agreements are NaN). prompt + clap: adds clap_score.
    raw: the model's output before peak normalisation (same rate as inst); sanity is measured on it, as
    normalisation hides clipping and silence. The chroma of each stem is computed once and shared by the
    harmony, repetition and key metrics.
    """
    out = sanity(inst if raw is None else raw, inst_sr)
    v, a = analyse(vocal, vocal_sr), analyse(inst, inst_sr)
    out["harmonic_fit"] = harmonic_fit(v, a)
    out["chroma_cosine"] = chroma_cosine(v, a)
    out["rhythm_fit"] = rhythm_fit(vocal, inst, vocal_sr, inst_sr)
    out["repetition"] = repetition(a)
    inst_key = key_of(a)
    out["key_agreement"] = key_relation_score(inst_key, _meta_value(meta, "key"))
    out["key_agreement_vocal"] = key_relation_score(inst_key, key_of(v)) if np.any(v.rms > 0) else float("nan")
    bpm = tempo_of(inst, inst_sr)
    out["tempo_bpm"] = bpm
    out["tempo_agreement"] = tempo_relation_score(bpm, _meta_value(meta, "bpm"))
    if clap is not None and prompt:
        out["clap_score"] = clap_score(prompt, finite(inst), inst_sr, clap)
    return {k: float(v_) for k, v_ in out.items()}


def aggregate(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over samples, ignoring NaN (a metric NaN everywhere stays NaN)."""
    rows = list(rows)
    names = sorted({k for r in rows for k in r})
    out = {}
    for name in names:
        vals = np.array([r.get(name, np.nan) for r in rows], np.float64)
        vals = vals[~np.isnan(vals)]
        out[name] = float(vals.mean()) if vals.size else float("nan")
    return out
