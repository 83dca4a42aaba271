"""`v2m data import`: public stem datasets (and any folder of stems) into the raw layout.

    musdb     MUSDB18-HQ: <split>/<Artist - Title>/{vocals,drums,bass,other}.wav, or MUSDB18's
              <Artist - Title>.stem.mp4 (streams mixture, drums, bass, other, vocals; read with stempeg, which needs
              ffmpeg). instrumental = drums + bass + other; artist and title from "Artist - Title".
    moisesdb  MoisesDB: <track uuid>/data.json (artist, song, genre, stems[].stemName / tracks[].id, extension) and
              <stemName>/<id>.<extension>. vocals = the `vocals` stem; instrumental = every other stem.
    stems     any folder of track folders: files matching the vocal patterns are the vocal, the rest (minus the
              skip patterns, e.g. the full mix) the instrumental; artist/title/... from the CSV or flags.

Each track becomes `<out>/<track_id>/vocals.wav` + `instrumental.wav` and a metadata.csv row (rows of earlier
imports into the same folder are kept). Values a source lacks (genre, language; MUSDB has neither) come from
`--genre` / `--language` or the `--metadata` CSV, never from a guess: left blank, validate quarantines the track
and says which column is empty. A track without a vocal stem is not imported; `<out>/import.jsonl` records every
track with its source and, when rejected, the reason (validate copies those into its quarantine report).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.stem_files import sum_files, sum_parts, write_stem
from tasks.data.track_cache import write_jsonl
from tasks.data.validate import METADATA_COLUMNS, METADATA_FILE, TRACK_ID, DataError
from v2m.audio import AUDIO_SUFFIXES

REPORT = "import.jsonl"
FORMATS = ("musdb", "moisesdb", "stems")
MUSDB_INSTRUMENTAL = ("drums", "bass", "other")
STEM_MP4_STREAMS = {"drums": 1, "bass": 2, "other": 3, "vocals": 4}  # stream 0 is the mixture
VOCAL_PATTERNS = ("*vocal*", "*vox*", "*voice*", "*sing*")
SKIP_PATTERNS = ("mix*", "*mixture*", "*master*", "*full*")


@dataclass
class Source:
    """One track found in the dataset: where its stems are and what the dataset says about it."""
    name: str                       # the dataset's own name for it (a folder or file name)
    track_id: str
    vocals: list[Path] = field(default_factory=list)
    instrumental: list[Path] = field(default_factory=list)
    stem_mp4: Path | None = None
    meta: dict[str, str] = field(default_factory=dict)


def slug(name: str, prefix: str = "") -> str:
    """A plain track id for a dataset name: ASCII letters, digits, _ . - only (validate's rule), stable."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-").lower()[:100] or "track"
    s = f"{prefix}{s}"
    return s if TRACK_ID.fullmatch(s) else f"{prefix}{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def artist_title(name: str) -> dict[str, str]:
    artist, sep, title = name.partition(" - ")
    return {"artist": artist.strip(), "title": title.strip()} if sep else {"artist": "", "title": name.strip()}


def audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


# --- what each format finds -------------------------------------------------------------------------------

def find_musdb(src: Path, **_: Any) -> list[Source]:
    found = []
    for mp4 in sorted(src.rglob("*.stem.mp4")):
        name = mp4.name.removesuffix(".stem.mp4")
        found.append(Source(name, slug(name, "musdb_"), stem_mp4=mp4, meta=artist_title(name)))
    for vocals in sorted(src.rglob("vocals.wav")):
        folder = vocals.parent
        parts = [folder / f"{s}.wav" for s in MUSDB_INSTRUMENTAL]
        found.append(Source(folder.name, slug(folder.name, "musdb_"), [vocals], [p for p in parts if p.is_file()],
                            meta=artist_title(folder.name)))
    # a MUSDB-HQ folder whose vocals.wav is missing: found by its other stems, so it is reported, not skipped
    for drums in sorted(src.rglob("drums.wav")):
        if not (drums.parent / "vocals.wav").is_file():
            folder = drums.parent
            found.append(Source(folder.name, slug(folder.name, "musdb_"), [],
                                [folder / f"{s}.wav" for s in MUSDB_INSTRUMENTAL if (folder / f"{s}.wav").is_file()],
                                meta=artist_title(folder.name)))
    return found


def find_moisesdb(src: Path, **_: Any) -> list[Source]:
    found = []
    for data in sorted(src.rglob("data.json")):
        folder = data.parent
        try:
            spec = json.loads(data.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{data}: not valid JSON ({exc})") from None
        vocals, inst = [], []
        for stem in spec.get("stems", []):
            name = str(stem.get("stemName", ""))
            files = [folder / name / f"{t['id']}.{t.get('extension', 'wav')}" for t in stem.get("tracks", [])]
            (vocals if name == "vocals" else inst).extend(files)
        meta = {"artist": str(spec.get("artist", "")), "title": str(spec.get("song", ""))}
        if spec.get("genre") and spec["genre"] != "undefined":
            meta["genre"] = str(spec["genre"])
        found.append(Source(folder.name, slug(folder.name, "moisesdb_"), vocals, inst, meta=meta))
    return found


def find_stems(src: Path, vocal_patterns: tuple[str, ...] = VOCAL_PATTERNS,
               skip_patterns: tuple[str, ...] = SKIP_PATTERNS, **_: Any) -> list[Source]:
    def matches(p: Path, patterns: tuple[str, ...]) -> bool:
        return any(fnmatch.fnmatch(p.stem.lower(), pat.lower()) for pat in patterns)

    found = []
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in audio_files(folder) if not matches(f, skip_patterns)]
        vocals = [f for f in files if matches(f, vocal_patterns)]
        found.append(Source(folder.name, slug(folder.name), vocals, [f for f in files if f not in vocals],
                            meta={"title": folder.name}))
    return found


FINDERS: dict[str, Callable[..., list[Source]]] = {"musdb": find_musdb, "moisesdb": find_moisesdb, "stems": find_stems}


# --- reading and writing ----------------------------------------------------------------------------------

def read_stem_mp4(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(vocals, instrumental, sr) of a MUSDB18 .stem.mp4, through stempeg (ffmpeg)."""
    try:
        import stempeg
    except (ImportError, RuntimeError) as exc:  # stempeg raises RuntimeError at import when ffmpeg is missing
        raise DataError(f"{path}: reading .stem.mp4 needs stempeg and ffmpeg (pip install stempeg; apt-get install "
                        f"ffmpeg), or use MUSDB18-HQ's wav folders: {exc}") from None
    streams, sr = stempeg.read_stems(str(path), dtype=np.float32)  # [streams, samples, channels]
    vocals = streams[STEM_MP4_STREAMS["vocals"]].T
    inst = sum_parts([streams[STEM_MP4_STREAMS[s]].T for s in MUSDB_INSTRUMENTAL])
    return vocals, inst, int(sr)


def source_fingerprint(s: Source) -> list:
    files = s.vocals + s.instrumental + ([s.stem_mp4] if s.stem_mp4 else [])
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()]


def import_track(s: Source, out: Path) -> dict[str, Any]:
    """Write one track's two stems; a report line (status ok, or quarantined with the reason)."""
    line: dict[str, Any] = {"track_id": s.track_id, "source": s.name, "status": "ok"}
    if s.stem_mp4:
        vocals, inst, sr = read_stem_mp4(s.stem_mp4)
    else:
        if not s.vocals:
            return {**line, "status": "quarantined", "reason": "missing_stem", "file": s.name,
                    "message": f"{s.name}: no vocal stem (the instrumental parts alone cannot train a model that "
                               f"listens to a voice)"}
        missing = [p for p in s.vocals + s.instrumental if not p.is_file()]
        if missing or not s.instrumental:
            return {**line, "status": "quarantined", "reason": "missing_stem", "file": str(missing[0] if missing else s.name),
                    "message": f"{s.name}: " + (f"{missing[0]} is listed but missing" if missing
                                                else "no instrumental stem")}
        (vocals, sr), (inst, inst_sr) = sum_files(s.vocals), sum_files(s.instrumental)
        if inst_sr != sr:
            from v2m.audio import resample
            inst = np.stack([resample(c, inst_sr, sr) for c in inst])
    folder = out / s.track_id
    write_stem(folder / "vocals.wav", vocals, sr)
    write_stem(folder / "instrumental.wav", inst, sr)
    return {**line, "sample_rate": sr, "vocal_files": len(s.vocals) or 1, "instrumental_files": len(s.instrumental) or 3}


def read_overrides(path: Path | None) -> dict[str, dict[str, str]]:
    """The --metadata CSV: a `track` column (the dataset's name for the track, or its track_id) and any of the
    metadata columns; its non-empty values win over the dataset's."""
    if path is None:
        return {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if "track" not in (reader.fieldnames or []):
            raise DataError(f"{path}: needs a `track` column (the dataset's track name or its track_id), plus any "
                            f"of {', '.join(c for c in METADATA_COLUMNS if c != 'track_id')}")
        return {row["track"].strip(): {k: (v or "").strip() for k, v in row.items()
                                       if k in METADATA_COLUMNS and k != "track_id" and (v or "").strip()}
                for row in reader}


def import_dataset(fmt: str, src: str | Path, out: str | Path, defaults: dict[str, str] | None = None,
                   metadata_csv: Path | None = None, **finder_options: Any) -> dict[str, Any]:
    """Import every track of `src` (format `fmt`) into `out`; returns the report lines and which tracks lack
    values validate requires."""
    src, out = Path(src), Path(out)
    if fmt not in FINDERS:
        raise DataError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not src.is_dir():
        raise DataError(f"{src}: dataset folder not found")
    sources = FINDERS[fmt](src, **finder_options)
    if not sources:
        raise DataError(f"{src}: no {fmt} tracks found (see `v2m data import --help` for the layouts)")
    ids = [s.track_id for s in sources]
    if len(set(ids)) < len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"{src}: several tracks map to the same track_id ({', '.join(dup[:5])}); rename them")
    overrides, defaults = read_overrides(metadata_csv), {k: v for k, v in (defaults or {}).items() if v}
    out.mkdir(parents=True, exist_ok=True)
    rows = _read_rows(out / METADATA_FILE)
    earlier = {line["track_id"]: line for line in _read_report(out / REPORT)}
    report = []
    for s in sources:
        fingerprint = source_fingerprint(s)
        before = earlier.get(s.track_id, {})
        if before.get("status") == "ok" and before.get("fingerprint") == fingerprint and \
                all((out / s.track_id / f"{stem}.wav").is_file() for stem in ("vocals", "instrumental")):
            line = before  # imported before from the same files: nothing to redo
        else:
            line = {**import_track(s, out), "fingerprint": fingerprint}
        report.append(line)
        if line["status"] == "ok":
            found = {k: v for k, v in s.meta.items() if v}  # the dataset's values win over the flags' defaults
            values = {**defaults, **found, **overrides.get(s.name, {}), **overrides.get(s.track_id, {})}
            rows[s.track_id] = {"track_id": s.track_id, **{c: values.get(c, "") for c in METADATA_COLUMNS[1:]}}
        else:
            rows.pop(s.track_id, None)
    _write_rows(out / METADATA_FILE, rows)
    write_jsonl(out / REPORT, [*(l for i, l in earlier.items() if i not in set(ids)), *report])
    lacking = {c: sorted(t for t in (s.track_id for s in sources) if t in rows and not rows[t][c])
               for c in ("artist", "genre", "language")}
    return {"report": report, "lacking": {c: t for c, t in lacking.items() if t}}


def _read_rows(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        return {r["track_id"]: {c: r.get(c, "") or "" for c in METADATA_COLUMNS} for r in csv.DictReader(f)}


def _write_rows(path: Path, rows: dict[str, dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, METADATA_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[k] for k in sorted(rows))


def _read_report(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
