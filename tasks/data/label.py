"""Stage 3 — label: fill blank BPM and key from the audio; keep the values the metadata gives.

Every record gets `bpm_source` and `key_source` ("metadata" or "estimated"), so downstream users can
tell a curated label from a guess. Estimation uses the 16 kHz normalised stems:
- tempo: librosa's tempo estimate (onset autocorrelation) on the instrumental;
- key: Krumhansl-Schmuckler — correlate the mean chroma of vocal + instrumental with the 24 rotated
  major/minor key profiles and take the best.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import librosa
import numpy as np

from tasks.data.track_cache import (cache_key, code_version, read_jsonl, run_per_track,
                                    write_jsonl, write_stats)
from v2m.audio import read_mono, resample
from v2m.config import LabelConfig

PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# Krumhansl & Kessler (1982) probe-tone profiles, tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def estimate_tempo(audio: np.ndarray, sr: int) -> float:
    # librosa.feature.tempo (onset autocorrelation with a log-normal prior around 120 bpm) is the tempo
    # estimate inside beat_track; beat_track itself segfaults in numba 0.68's gufunc on this stack.
    onset = librosa.onset.onset_strength(y=audio, sr=sr)
    return float(librosa.feature.tempo(onset_envelope=onset, sr=sr)[0])


def key_scores(chroma_mean: np.ndarray) -> np.ndarray:
    """Correlation of a 12-bin chroma profile with the 24 keys: rows = (major, minor), columns = tonic."""
    scores = np.zeros((2, 12))
    for mode, profile in enumerate((MAJOR_PROFILE, MINOR_PROFILE)):
        for tonic in range(12):
            scores[mode, tonic] = np.corrcoef(chroma_mean, np.roll(profile, tonic))[0, 1]
    return scores


def estimate_key(audio: np.ndarray, sr: int) -> str:
    chroma = librosa.feature.chroma_cqt(y=audio, sr=sr)
    mode, tonic = np.unravel_index(np.argmax(key_scores(chroma.mean(axis=1))), (2, 12))
    return f"{PITCH_CLASSES[tonic]} {'major' if mode == 0 else 'minor'}"


def label_track(rec: dict[str, Any], cfg: LabelConfig, audioldm_sr: int) -> dict[str, Any]:
    out = dict(rec)
    need_bpm, need_key = rec.get("bpm") is None, rec.get("key") is None
    if need_bpm or need_key:
        tag = f"{audioldm_sr // 1000}k"
        inst, sr = read_mono(rec["normalized"][f"instrumental_{tag}"])
        inst = resample(inst, sr, cfg.sr)
        if need_bpm:
            out["bpm"] = round(estimate_tempo(inst, cfg.sr), 2)
        if need_key:
            voc, _ = read_mono(rec["normalized"][f"vocals_{tag}"])
            n = min(len(voc), len(inst))
            out["key"] = estimate_key(resample(voc, sr, cfg.sr)[:n] + inst[:n], cfg.sr)
    out["bpm_source"] = "estimated" if need_bpm else "metadata"
    out["key_source"] = "estimated" if need_key else "metadata"
    out["outputs"] = []
    return out


def label_dataset(normalized_dir: str | Path, out_dir: str | Path, cfg: LabelConfig,
                  audioldm_sr: int, workers: int = 0, progress=None) -> dict[str, Any]:
    out_dir = Path(out_dir)
    records = read_jsonl(Path(normalized_dir) / "tracks.jsonl")
    version = code_version(__file__)
    key_fn = lambda r: cache_key("label", version, cfg.model_dump(), r)  # noqa: E731
    results, stats = run_per_track("label", records, key_fn,
                                   partial(label_track, cfg=cfg, audioldm_sr=audioldm_sr),
                                   out_dir, workers, progress)
    write_jsonl(out_dir / "tracks.jsonl", results)
    write_stats(out_dir, stats, estimated_bpm=sum(r["bpm_source"] == "estimated" for r in results),
                estimated_key=sum(r["key_source"] == "estimated" for r in results))
    return {"tracks": results, "stats": stats}
