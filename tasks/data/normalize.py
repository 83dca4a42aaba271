"""Stage 2 — normalize: mono, each backend's sample rate, loudness-matched.

Per track, `out_dir/<track_id>/` gets (each stem processed, and cached, on its own):
  vocals_32k.wav, instrumental_32k.wav   MusicGen (32 kHz)
  vocals_16k.wav, instrumental_16k.wav   AudioLDM (16 kHz)
  vocals_48k.wav                         CLAP's audio encoder (48 kHz)
(the names carry the configured rates). Each stem is decoded once and resampled from the source with
soxr; its gain is measured once (ITU-R BS.1770 integrated loudness, on the 16 kHz copy) and the same gain
is applied to every rate, so the copies differ only in bandwidth.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.track_cache import (cache_key, code_version, module_closure, confined, read_jsonl, run_per_track,
                                    write_jsonl, write_stats)
from v2m.audio import integrated_loudness, peak_dbfs, read_audio, resample, to_mono, write_wav
from v2m.config import NormalizeConfig


def loudness_gain_db(audio: np.ndarray, sr: int, cfg: NormalizeConfig, peak_db: float | None = None) -> float:
    """Gain that brings `audio` to the target loudness without a peak (`peak_db`, default the peak of
    `audio`) passing cfg.peak_dbfs."""
    lufs = integrated_loudness(audio, sr)
    if not np.isfinite(lufs):  # all blocks gated out (very quiet): fall back to RMS
        rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
        lufs = 20 * np.log10(max(rms, 1e-10))
    gain = cfg.target_lufs - lufs
    headroom = cfg.peak_dbfs - (peak_dbfs(audio) if peak_db is None else peak_db)
    return float(min(gain, headroom))


def rate_tag(sr: int) -> str:
    return f"{sr // 1000}k" if sr % 1000 == 0 else f"{sr}hz"


def stem_rates(cfg: NormalizeConfig) -> dict[str, list[int]]:
    return {"vocals": [cfg.musicgen_sr, cfg.audioldm_sr, cfg.clap_sr],
            "instrumental": [cfg.musicgen_sr, cfg.audioldm_sr]}


def normalize_stem(item: dict[str, Any], cfg: NormalizeConfig, out_dir: Path) -> dict[str, Any]:
    """One stem of one track: decode, resample to each rate, apply one loudness gain, write."""
    stem, rates = item["stem"], stem_rates(cfg)[item["stem"]]
    audio, sr = read_audio(item["path"])
    mono = to_mono(audio)
    resampled: dict[int, np.ndarray] = {}
    for target in sorted(rates, reverse=True):
        # An exact 2:1 step from a copy we already have is cheaper than resampling the source again.
        source_sr = 2 * target if 2 * target in resampled else sr
        resampled[target] = resample(resampled.get(source_sr, mono), source_sr, target)
    # Loudness is measured once, on the lowest rate (cheapest; the K-weighted loudness of voice and
    # music barely depends on content above 8 kHz), and the same gain goes to every copy.
    lowest = min(rates)
    gain = loudness_gain_db(resampled[lowest], lowest, cfg, max(map(peak_dbfs, resampled.values())))
    paths = {}
    for target, out in resampled.items():
        path = confined(out_dir, item["track"], f"{stem}_{rate_tag(target)}.wav")
        write_wav(path, out, target, gain=10 ** (gain / 20))
        paths[f"{stem}_{rate_tag(target)}"] = str(path)
    return {"paths": paths, "gain_db": round(gain, 3), "outputs": list(paths.values())}


def normalize_dataset(validated_dir: str | Path, out_dir: str | Path, cfg: NormalizeConfig,
                      workers: int = 0, progress=None) -> dict[str, Any]:
    """Normalise every stem. The unit of work (and of the cache) is one stem, not one track: a changed
    vocal re-does only the vocal, and a single changed track still keeps two workers busy."""
    out_dir = Path(out_dir)
    records = read_jsonl(Path(validated_dir) / "tracks.jsonl")
    items = [{"track_id": f"{r['track_id']}.{stem}", "track": r["track_id"], "stem": stem,
              "path": r[f"{stem}_path"], "sha256": r[f"{stem}_sha256"]}
             for r in records for stem in stem_rates(cfg)]
    version = code_version(*module_closure(__file__))  # this stage's code and every helper it runs
    key_fn = lambda it: cache_key("normalize", version, cfg.model_dump(), it)  # noqa: E731
    done, stats = run_per_track("normalize", items, key_fn, partial(normalize_stem, cfg=cfg, out_dir=out_dir),
                                out_dir, workers, progress)
    by_stem = {it["track_id"]: res for it, res in zip(items, done)}
    results = []
    for r in records:
        stems = {stem: by_stem[f"{r['track_id']}.{stem}"] for stem in stem_rates(cfg)}
        results.append({**r, "normalized": {k: v for s in stems.values() for k, v in s["paths"].items()},
                        "gain_db": {stem: s["gain_db"] for stem, s in stems.items()}})
    write_jsonl(out_dir / "tracks.jsonl", results)
    write_stats(out_dir, stats, unit="stem")
    return {"tracks": results, "stats": stats}
