"""Every quarantine reason, each from a real malformed file; the good tracks go on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tasks.data.validate import REASONS, DataError, validate_dataset
from tests.conftest import make_dataset, write_metadata, write_track
from v2m.config import ValidateConfig

CFG = ValidateConfig(min_duration_s=5.0, max_duration_s=60.0, max_length_mismatch_s=0.5, silence_dbfs=-60.0)


def _row(tid: str, **kw) -> dict:
    return {"track_id": tid, "artist": "a", "title": tid, "genre": "pop", "language": "en", "mood": "",
            "bpm": "", "key": "", **kw}


def build_bad_dataset(root: Path, outside: Path) -> dict[str, str]:
    """One good track per format and one broken track per reason; returns track_id -> expected reason."""
    sr = 16000
    rows, expected = [], {}
    for fmt in ("wav", "flac", "mp3"):
        write_track(root, f"good_{fmt}", seed=1, seconds=8, sr=sr, fmt=fmt)
        rows.append(_row(f"good_{fmt}"))

    def track(tid: str, reason: str, vocal=None, inst=None, row: dict | None = None, subtype=None):
        d = root / tid
        d.mkdir(parents=True, exist_ok=True)
        if vocal is not None:
            sf.write(d / "vocals.wav", vocal, sr, subtype=subtype)
        if inst is not None:
            sf.write(d / "instrumental.wav", inst, sr)
        rows.append(row if row is not None else _row(tid))
        expected[tid] = reason

    tone = lambda s: (np.sin(np.arange(int(s * sr)) / sr * 2 * np.pi * 330) * 0.3).astype(np.float32)  # noqa: E731

    track("no_inst", "missing_stem", vocal=tone(8), inst=None)
    track("empty", "empty", vocal=np.zeros(0, np.float32), inst=tone(8))
    track("silent", "silent", vocal=np.zeros(8 * sr, np.float32), inst=tone(8))
    nan = tone(8)
    nan[1000:1010] = np.nan
    track("nan", "nan_or_inf", vocal=nan, inst=tone(8), subtype="FLOAT")
    track("short", "too_short", vocal=tone(2), inst=tone(2))
    track("mismatch", "length_mismatch", vocal=tone(8), inst=tone(10))
    track("bad_bpm", "metadata_invalid", vocal=tone(8), inst=tone(8), row=_row("bad_bpm", bpm="fast"))
    track("bad_key", "metadata_invalid", vocal=tone(8), inst=tone(8), row=_row("bad_key", key="H dorian"))
    track("no_row", "metadata_missing", vocal=tone(8), inst=tone(8), row={})
    rows.pop()  # no metadata row for no_row
    # Unreadable: bytes that are not audio, under an audio name.
    (root / "garbage").mkdir()
    (root / "garbage" / "vocals.wav").write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    sf.write(root / "garbage" / "instrumental.wav", tone(8), sr)
    rows.append(_row("garbage"))
    expected["garbage"] = "unreadable"
    # Two files for one stem.
    write_track(root, "twice", seed=2, seconds=8, sr=sr)
    sf.write(root / "twice" / "vocals.flac", tone(8), sr)
    rows.append(_row("twice"))
    expected["twice"] = "ambiguous_stem"
    # A stem that is a link to a file outside the data root.
    sf.write(outside, tone(8), sr)
    (root / "escape").mkdir()
    os.symlink(outside, root / "escape" / "vocals.wav")
    sf.write(root / "escape" / "instrumental.wav", tone(8), sr)
    rows.append(_row("escape"))
    expected["escape"] = "path_escape"
    # A metadata row whose track_id walks out of the root.
    rows.append(_row("../etc"))
    expected["../etc"] = "path_escape"
    write_metadata(root, rows)
    return expected


def test_every_reason_is_quarantined_and_good_tracks_go_on(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    expected = build_bad_dataset(root, tmp_path / "outside.wav")
    res = validate_dataset(root, tmp_path / "out", CFG, workers=2)

    got = {q["track_id"]: q["reason"] for q in res["quarantined"]}
    assert got == expected
    covered = set(expected.values())
    assert covered == set(REASONS) - {"too_long"}, "each reason needs a malformed file in this test"
    assert sorted(t["track_id"] for t in res["accepted"]) == ["good_flac", "good_mp3", "good_wav"]
    for q in res["quarantined"]:  # every message names the file it is about
        assert q["message"].startswith(str(root)) or str(root) in q["message"], q
    # The report on disk is the same.
    report = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert {r["track_id"]: r["reason"] for r in report} == expected


def test_too_long_is_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    write_track(root, "long", seed=0, seconds=12, sr=8000)
    write_metadata(root, [_row("long")])
    res = validate_dataset(root, tmp_path / "out", CFG.model_copy(update={"max_duration_s": 10.0}), workers=1)
    assert [q["reason"] for q in res["quarantined"]] == ["too_long"]


def test_missing_metadata_file_names_the_file(tmp_path: Path) -> None:
    write_track(tmp_path / "raw", "t", seed=0, seconds=6)
    with pytest.raises(DataError, match=r"raw/metadata.csv: metadata file not found"):
        validate_dataset(tmp_path / "raw", tmp_path / "out", CFG)


def test_metadata_missing_column_names_it(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "metadata.csv").write_text("track_id,artist\nt,a\n")
    with pytest.raises(DataError, match="missing column.*title"):
        validate_dataset(tmp_path / "raw", tmp_path / "out", CFG)


def test_cli_exits_0_and_reports_quarantined_count(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    make_dataset(root, n_tracks=2, n_artists=2, seconds=6)
    (root / "t01" / "instrumental.wav").unlink()
    res = subprocess.run([sys.executable, "-m", "v2m.cli", "data", "validate", str(root), "--out",
                          str(tmp_path / "out"), "--params", str(Path(__file__).parents[2] / "params.yaml")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "1 accepted, 1 quarantined" in res.stderr
    assert "t01: missing_stem" in res.stderr
