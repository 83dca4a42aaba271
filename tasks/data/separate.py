"""Stage 0 (when the source is finished songs) — separate: mixes -> the raw layout the rest of the pipeline reads.

Input (`mixes_dir`): `metadata.csv` (the raw layout's columns) and one file per track, `<track_id>.<wav|flac|mp3>`.
Output (`out_dir`, the raw layout): `<track_id>/vocals.wav` + `instrumental.wav` and `metadata.csv` for every
accepted track; `separation.jsonl`, one line per track: status (ok | quarantined), method, model, the quality
estimates (separation_quality.py) and, when quarantined, the reason and message (validate copies these into
its quarantine report). A quarantined track keeps its stems (to listen to why) but has no metadata row, so
nothing downstream trains on it.

Separators (params `separate.method`): `harmonic`, weight-free, per track in the process pool; `demucs`, learned,
in this process on the GPU when there is one, several songs' segments per batch. Either way each track is cached
by its content (track_cache.run_per_track): a changed mix redoes that track only. The quality thresholds are not
part of that key: changing them re-judges the cached estimates without separating anything again.
"""

from __future__ import annotations

import csv
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data import separation_quality as sq
from tasks.data.stem_files import write_stem
from tasks.data.track_cache import (cache_key, code_version, confined, module_closure, run_per_track, write_jsonl,
                                    write_stats)
from tasks.data.validate import METADATA_COLUMNS, METADATA_FILE, TRACK_ID, DataError, read_metadata
from v2m.audio import AUDIO_SUFFIXES, file_sha256, read_audio
from v2m.config_separate import SeparateConfig

REPORT = "separation.jsonl"
INPUT_REASONS = {
    "path_escape": "the track id is not a plain file name",
    "metadata_missing": "no metadata.csv row for this mix",
    "missing_mix": "no <track_id>.wav/.flac/.mp3 for this metadata row",
    "ambiguous_mix": "more than one audio file for this track id",
    "unreadable": "the mix cannot be decoded as audio",
    "silent": "the mix is silent",
}


def mix_files(root: Path) -> dict[str, list[Path]]:
    """Audio files by track id (the file name without its extension)."""
    found: dict[str, list[Path]] = {}
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES and not p.name.startswith("."):
            found.setdefault(p.stem, []).append(p)
    return found


def _rejected(tid: str, file: Path | str, reason: str, message: str) -> dict[str, Any]:
    return {"track_id": tid, "status": "quarantined", "file": str(file), "reason": reason, "message": message}


def _finish(rec: dict[str, Any], mix: np.ndarray, sr: int, vocals: np.ndarray, inst: np.ndarray, cfg: SeparateConfig,
            out_dir: Path, method: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Write the stems, estimate the quality; the verdict comes later (thresholds are not part of the cache)."""
    tid = rec["track_id"]
    paths = {stem: confined(out_dir, tid, f"{stem}.wav") for stem in ("vocals", "instrumental")}
    write_stem(paths["vocals"], vocals, sr)
    write_stem(paths["instrumental"], inst, sr)
    duration = mix.shape[1] / sr
    return {"track_id": tid, "file": rec["path"], "mix_sha256": file_sha256(rec["path"]), **method,
            "duration_s": round(duration, 3), "sample_rate": sr, "channels": mix.shape[0],
            "separate_s": round(seconds, 3), "x_realtime": round(duration / max(seconds, 1e-9), 2),
            "estimates": sq.estimate(mix, vocals, inst, sr, cfg.harmonic),
            "outputs": [str(p) for p in paths.values()]}


def _read_mix(rec: dict[str, Any]) -> tuple[np.ndarray, int] | dict[str, Any]:
    """The decoded mix, or a quarantine record."""
    tid = rec["track_id"]
    if rec.get("reject"):
        return _rejected(tid, rec["path"], *rec["reject"])
    try:
        mix, sr = read_audio(rec["path"])
    except Exception as exc:
        return _rejected(tid, rec["path"], "unreadable", f"{rec['path']}: cannot decode audio ({exc})")
    if not np.isfinite(mix).all() or not np.abs(mix).max(initial=0.0) > 0:
        return _rejected(tid, rec["path"], "silent", f"{rec['path']}: the mix is silent or holds NaN/inf samples")
    return mix, sr


def separate_harmonic(rec: dict[str, Any], cfg: SeparateConfig, out_dir: Path) -> dict[str, Any]:
    """One track with the weight-free separator (a pool worker)."""
    from tasks.data import harmonic_mask
    got = _read_mix(rec)
    if isinstance(got, dict):
        return got
    mix, sr = got
    started = time.perf_counter()
    vocals, inst, info = harmonic_mask.separate(mix, sr, cfg.harmonic)
    return _finish(rec, mix, sr, vocals, inst, cfg, out_dir, {"method": "harmonic", "model": "harmonic-mask", **info},
                   time.perf_counter() - started)


def separate_demucs(recs: list[dict[str, Any]], cfg: SeparateConfig, out_dir: Path, bag, device: str) -> list[dict]:
    """A batch of tracks with the learned separator: their segments share the model's batches."""
    from tasks.data.demucs_separator import separate_batch
    got = [_read_mix(r) for r in recs]
    todo = [(r, g) for r, g in zip(recs, got) if not isinstance(g, dict)]
    started = time.perf_counter()
    stems = separate_batch(bag, [g for _, g in todo], cfg.demucs, device) if todo else []
    seconds = (time.perf_counter() - started) / max(1, len(todo))  # the batch's time, shared
    done = iter(_finish(r, g[0], g[1], v, i, cfg, out_dir, {"method": "demucs", "model": f"{cfg.demucs.model}@"
                        f"{bag.fingerprint}", "device": device}, seconds) for (r, g), (v, i) in zip(todo, stems))
    return [g if isinstance(g, dict) else next(done) for g in got]


def plan(root: Path) -> list[dict[str, Any]]:
    """One record per track id found in metadata.csv or as a file; what to reject is known up front."""
    rows, files = read_metadata(root), mix_files(root)
    records = []
    for tid in sorted(set(rows) | set(files)):
        paths = files.get(tid, [])
        rec: dict[str, Any] = {"track_id": tid, "row": rows.get(tid),
                               "path": str(paths[0]) if paths else str(root / f"{tid}.wav")}
        if not TRACK_ID.fullmatch(tid):
            rec["reject"] = ("path_escape", f"{root / METADATA_FILE}: track_id {tid[:80]!r} is not a plain name "
                                            "(ASCII letters, digits, _ . -, at most 128 characters)")
        elif tid not in rows:
            rec["reject"] = ("metadata_missing", f"{root / METADATA_FILE}: no row for {paths[0].name}")
        elif not paths:
            rec["reject"] = ("missing_mix", f"{root}: no {tid}.wav/.flac/.mp3 for metadata line {rows[tid]['_line']}")
        elif len(paths) > 1:
            rec["reject"] = ("ambiguous_mix", f"{root}: several files for {tid}: {', '.join(p.name for p in paths)}")
        elif not Path(rec["path"]).resolve().is_relative_to(root.resolve()):
            rec["reject"] = ("path_escape", f"{rec['path']}: resolves outside {root}")
        if paths:  # a cheap change detector for the cache key (content hashes are taken by the workers)
            st = paths[0].stat()
            rec["stat"] = [paths[0].name, str(paths[0].resolve()), st.st_size, st.st_mtime_ns]
        records.append(rec)
    return records


def separate_dataset(mixes_dir: str | Path, out_dir: str | Path, cfg: SeparateConfig, workers: int = 0,
                     progress=None) -> dict[str, Any]:
    """Separate every mix of `mixes_dir` into the raw layout at `out_dir`; returns accepted, quarantined, stats."""
    root, out_dir = Path(mixes_dir), Path(out_dir)
    if not root.is_dir():
        raise DataError(f"{root}: folder of mixes not found (metadata.csv + <track_id>.wav|flac|mp3)")
    records = plan(root)
    version = code_version(*module_closure(__file__, exclude=("models/",)))
    settings: dict[str, Any] = {"method": cfg.method, "harmonic": cfg.harmonic.model_dump()}
    batch_fn = fn = None
    if cfg.method == "demucs":
        from tasks.data.demucs_separator import load_bag, resolve_device
        bag = load_bag(cfg.demucs)  # before any work: missing weights fail here, naming where they go
        device = resolve_device(cfg.demucs.device)
        bag.to(device)
        # the weights' content, not their path, and not the device or batch size (same output)
        settings["demucs"] = {"model": cfg.demucs.model, "weights": bag.fingerprint,
                              "segment_s": cfg.demucs.segment_s, "overlap": cfg.demucs.overlap}
        batch_fn = partial(separate_demucs, cfg=cfg, out_dir=out_dir, bag=bag, device=device)
    else:
        fn = partial(separate_harmonic, cfg=cfg, out_dir=out_dir)
    key_fn = lambda r: cache_key("separate", version, settings,  # noqa: E731
                                 {k: r.get(k) for k in ("track_id", "stat", "reject")})
    results, stats = run_per_track("separate", records, key_fn, fn, out_dir, workers, progress,
                                   batch_fn=batch_fn, batch_size=cfg.demucs.batch_size)
    report, accepted = [], []
    for rec, res in zip(records, results):
        line = {k: v for k, v in res.items() if k != "outputs"}
        if res.get("status") != "quarantined":
            line.update(sq.verdict(res["estimates"], cfg.quality, cfg.min_quality))
        if line["status"] == "ok":
            accepted.append(rec["row"])
        report.append(line)
    _write_metadata(out_dir / METADATA_FILE, accepted)
    write_jsonl(out_dir / REPORT, report)
    write_stats(out_dir, stats, accepted=len(accepted), quarantined=len(report) - len(accepted))
    return {"accepted": [r["track_id"] for r in accepted], "report": report, "stats": stats}


def _write_metadata(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, METADATA_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
