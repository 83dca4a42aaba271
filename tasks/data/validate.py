"""Stage 1 — validate: decode every raw track and quarantine the bad ones, one clear reason each.

Input: the raw layout `<root>/<track_id>/vocals.<wav|flac|mp3>` + `instrumental.<...>` + `<root>/metadata.csv`.
Output (`out_dir`): `tracks.jsonl` (one record per accepted track), `quarantine.jsonl` (one per rejected
track: track_id, file, reason, message) and `stats.json`. A bad track never stops the others.
"""

from __future__ import annotations

import csv
import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from tasks.data.track_cache import (cache_key, code_version, module_closure, run_per_track, write_jsonl,
                                    write_stats)
from v2m.audio import AUDIO_SUFFIXES, file_sha256, peak_dbfs, read_audio
from v2m.config import ValidateConfig
from v2m.errors import UserError

METADATA_FILE = "metadata.csv"
METADATA_COLUMNS = ("track_id", "artist", "title", "genre", "bpm", "key", "mood", "language")
STEMS = ("vocals", "instrumental")
TRACK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # always used with fullmatch: a plain folder name
KEY = re.compile(r"^([A-G])([#b]?) (major|minor)$")
LANGUAGE = re.compile(r"^[a-z]{2,3}$")

# Reason codes of the quarantine report, with what each means.
REASONS = {
    "missing_stem": "a vocal or instrumental stem is missing",
    "ambiguous_stem": "more than one file for a stem",
    "path_escape": "a path leads outside the data root",
    "unreadable": "the file cannot be decoded as audio",
    "empty": "the file decodes to zero samples",
    "nan_or_inf": "the audio holds NaN or infinite samples",
    "silent": "the stem's peak is below the silence threshold",
    "too_short": "the track is shorter than the minimum duration",
    "too_long": "the track is longer than the maximum duration",
    "length_mismatch": "vocal and instrumental lengths differ beyond the tolerance",
    "metadata_missing": "no metadata.csv row for this track",
    "metadata_invalid": "the metadata row has a missing or invalid value",
}


class DataError(UserError, ValueError):
    """The dataset as a whole cannot be read (not one bad track); the message names the file."""


class Rejected(Exception):
    def __init__(self, reason: str, file: Path | str, message: str):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason, self.file, self.message = reason, str(file), message


# --- metadata ---------------------------------------------------------------------------------------

def read_metadata(root: Path) -> dict[str, dict[str, str]]:
    """Rows of metadata.csv by track_id. Duplicate ids are kept as a list marker for the validator."""
    path = root / METADATA_FILE
    if not path.is_file():
        raise DataError(f"{path}: metadata file not found (columns: {', '.join(METADATA_COLUMNS)})")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in METADATA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        rows: dict[str, dict[str, str]] = {}
        for line_no, row in enumerate(reader, start=2):
            tid = (row.get("track_id") or "").strip()
            clean = {k: (row.get(k) or "").strip() for k in METADATA_COLUMNS}
            clean["_line"] = str(line_no)
            if tid in rows:
                rows[tid]["_duplicate"] = str(line_no)
            else:
                rows[tid] = clean
    return rows


def parse_metadata_row(row: dict[str, str], metadata_path: Path) -> dict[str, Any]:
    """Typed metadata, or Rejected('metadata_invalid') naming the column and the line."""
    where = f"{metadata_path}:{row['_line']}"

    def bad(msg: str) -> Rejected:
        return Rejected("metadata_invalid", metadata_path, f"{where}: {msg}")

    if "_duplicate" in row:
        raise bad(f"track_id {row['track_id']!r} appears again on line {row['_duplicate']}")
    for col in ("artist", "genre", "language"):
        if not row[col]:
            raise bad(f"{col} is empty")
    if not LANGUAGE.match(row["language"]):
        raise bad(f"language {row['language']!r} is not an ISO 639 code such as en, fr, ar")
    bpm: float | None = None
    if row["bpm"]:
        try:
            bpm = float(row["bpm"])
        except ValueError:
            raise bad(f"bpm {row['bpm']!r} is not a number") from None
        if not 20 <= bpm <= 300:
            raise bad(f"bpm {bpm:g} is outside 20-300")
    key = row["key"] or None
    if key and not KEY.match(key):
        raise bad(f"key {key!r} is not like 'G major' or 'F# minor'")
    return {"artist": row["artist"], "title": row["title"], "genre": row["genre"].lower(),
            "mood": row["mood"], "language": row["language"], "bpm": bpm, "key": key}


# --- stems ------------------------------------------------------------------------------------------

def find_stem(track_dir: Path, stem: str, root: Path) -> Path:
    found = [p for p in sorted(track_dir.glob(f"{stem}.*")) if p.suffix.lower() in AUDIO_SUFFIXES]
    if not found:
        raise Rejected("missing_stem", track_dir / f"{stem}.wav",
                       f"{track_dir}: no {stem}.wav/.flac/.mp3")
    if len(found) > 1:
        raise Rejected("ambiguous_stem", found[0], f"{track_dir}: several {stem} files: "
                       + ", ".join(p.name for p in found))
    path = found[0]
    if not path.resolve().is_relative_to(root.resolve()):
        raise Rejected("path_escape", path, f"{path}: resolves to {path.resolve()}, outside {root}")
    return path


def check_audio(path: Path, cfg: ValidateConfig) -> tuple[float, int, int]:
    """Decode one stem and check it; return (duration_s, sample_rate, channels)."""
    try:
        # 16-bit PCM (most stems) decodes as int16 several times faster, and cannot hold NaN or inf.
        pcm16 = sf.info(str(path)).subtype == "PCM_16"
        audio, sr = read_audio(path, dtype="int16" if pcm16 else "float32")
    except Exception as exc:  # AudioError, or sf.info's LibsndfileError on a file it cannot parse
        raise Rejected("unreadable", path, f"{path}: cannot decode audio ({exc})") from None
    if audio.shape[1] == 0:
        raise Rejected("empty", path, f"{path}: no samples")
    if pcm16:
        peak = 20 * np.log10(max(int(audio.max()), -int(audio.min()), 1) / 32768.0)
    else:
        if not np.isfinite(audio).all():
            bad = int((~np.isfinite(audio)).sum())
            raise Rejected("nan_or_inf", path, f"{path}: {bad} NaN/inf sample(s)")
        peak = peak_dbfs(audio)
    if peak < cfg.silence_dbfs:
        raise Rejected("silent", path, f"{path}: peak {peak:.1f} dBFS is below {cfg.silence_dbfs} dBFS")
    return audio.shape[1] / sr, sr, audio.shape[0]


def validate_track(rec: dict[str, Any], cfg: ValidateConfig) -> dict[str, Any]:
    """Check one track. Returns {"ok": record} or {"rejected": report entry}."""
    root, tid = Path(rec["root"]), rec["track_id"]
    try:
        if not TRACK_ID.fullmatch(tid) or not (root / tid).resolve().is_relative_to(root.resolve()):
            raise Rejected("path_escape", root / METADATA_FILE,
                           f"{root}: track_id {tid[:80]!r} is not a plain folder name "
                           "(ASCII letters, digits, _ . -, at most 128 characters)")
        if rec["row"] is None:
            raise Rejected("metadata_missing", root / METADATA_FILE,
                           f"{root / METADATA_FILE}: no row for track_id {tid!r}")
        meta = parse_metadata_row(rec["row"], root / METADATA_FILE)
        if not (root / tid).is_dir():
            raise Rejected("missing_stem", root / tid, f"{root / tid}: track folder not found")
        stems = {s: find_stem(root / tid, s, root) for s in STEMS}
        info = {s: check_audio(p, cfg) for s, p in stems.items()}
        (dv, sr, ch), (di, _, _) = info["vocals"], info["instrumental"]
        if abs(dv - di) > cfg.max_length_mismatch_s:
            raise Rejected("length_mismatch", stems["instrumental"],
                           f"{root / tid}: vocals {dv:.2f} s vs instrumental {di:.2f} s "
                           f"(tolerance {cfg.max_length_mismatch_s} s)")
        duration = min(dv, di)
        if duration < cfg.min_duration_s:
            raise Rejected("too_short", stems["vocals"],
                           f"{root / tid}: {duration:.2f} s is shorter than {cfg.min_duration_s} s")
        if duration > cfg.max_duration_s:
            raise Rejected("too_long", stems["vocals"],
                           f"{root / tid}: {duration:.1f} s is longer than {cfg.max_duration_s} s")
    except Rejected as r:
        return {"rejected": {"track_id": tid, "file": r.file, "reason": r.reason, "message": r.message}}
    return {"ok": {
        "track_id": tid, **meta, "duration_s": round(duration, 4), "source_sr": sr, "channels": ch,
        "vocals_path": str(stems["vocals"]), "instrumental_path": str(stems["instrumental"]),
        "vocals_sha256": file_sha256(stems["vocals"]), "instrumental_sha256": file_sha256(stems["instrumental"]),
    }}


def _stem_stats(track_dir: Path) -> dict[str, list]:
    """(name, where it resolves to, size, mtime) of whatever stem files are present: a cheap change
    detector for the cache key, as git and DVC do; the content hashes themselves are computed by the
    workers. Links are followed: a stem behind a symlink changes when its target or the target's content does."""
    out: dict[str, list] = {}
    for stem in STEMS:
        out[stem] = [[p.name, str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                     for p in sorted(track_dir.glob(f"{stem}.*")) if p.is_file()]
    return out


UPSTREAM_REPORTS = {"separation.jsonl": "separate", "import.jsonl": "import"}


def upstream_quarantine(root: Path) -> list[dict[str, Any]]:
    """The tracks `v2m data separate` or `v2m data import` already rejected (their reports in the folder), as this
    stage's report records: one quarantine report for the whole pipeline. A separated track keeps its stems, to be
    listened to, but has no metadata row and is not validated again."""
    out = []
    for name, stage in UPSTREAM_REPORTS.items():
        path = root / name
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        out += [{"track_id": q["track_id"], "file": q.get("file", ""), "reason": q["reason"], "message": q["message"],
                 "stage": stage} for q in lines if q.get("status") == "quarantined"]
    return out


def validate_dataset(raw_dir: str | Path, out_dir: str | Path, cfg: ValidateConfig,
                     workers: int = 0, progress=None) -> dict[str, Any]:
    """Validate every track of `raw_dir`; write accepted records and the quarantine report to `out_dir`."""
    root, out_dir = Path(raw_dir), Path(out_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    rows = read_metadata(root)
    separated = upstream_quarantine(root)  # tracks the separate or import step already rejected
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    track_ids = sorted((folders | set(rows)) - {q["track_id"] for q in separated})
    records = [{"root": str(root), "track_id": tid, "row": rows.get(tid),
                "stat": _stem_stats(root / tid) if tid in folders and TRACK_ID.fullmatch(tid) else {}}
               for tid in track_ids]
    version = code_version(*module_closure(__file__))  # this stage's code and every helper it runs
    key_fn = lambda r: cache_key("validate", version, cfg.model_dump(), r)  # noqa: E731
    results, stats = run_per_track("validate", records, key_fn, partial(validate_track, cfg=cfg),
                                   out_dir, workers, progress)
    accepted = [r["ok"] for r in results if "ok" in r]
    rejected = [r["rejected"] for r in results if "rejected" in r] + separated
    write_jsonl(out_dir / "tracks.jsonl", accepted)
    write_jsonl(out_dir / "quarantine.jsonl", rejected)
    write_stats(out_dir, stats, accepted=len(accepted), quarantined=len(rejected))
    return {"accepted": accepted, "quarantined": rejected, "stats": stats}
