"""Confined paths: nothing that comes from the data (track ids, metadata values, folder names) reaches the
filesystem unchecked. A dataset with hostile ids goes through every data stage; no file may appear outside
the stage outputs."""

from __future__ import annotations

import os
from pathlib import Path

from tasks.data.label import label_dataset
from tasks.data.normalize import normalize_dataset
from tasks.data.segment import segment_dataset
from tasks.data.split import split_dataset
from tasks.data.validate import validate_dataset
from tests.conftest import make_dataset, small_params, write_metadata, write_track


STAGES = ("validated", "normalized", "labelled", "split", "segments")


def snapshot(top: Path, work: Path) -> set[str]:
    """Every file and folder under `top` except the stage output folders `work/<stage>` and their content."""
    outputs = [work / s for s in STAGES]
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        if any(Path(dirpath).is_relative_to(o) for o in outputs):
            continue
        found |= {os.path.join(dirpath, f) for f in filenames + dirnames}
    return found - {str(o) for o in outputs}


def test_hostile_track_ids_are_quarantined_and_write_nothing_outside_the_stage_outputs(tmp_path: Path) -> None:
    world = tmp_path / "world"             # everything the stages could reach by walking up
    raw, work = world / "project" / "data" / "raw", world / "project" / "data" / "work"
    rows = make_dataset(raw, n_tracks=6, n_artists=3, seconds=8.0)
    absolute = str(world / "abs" / "target")
    lookalike = "d\u0435mo_0001"          # Cyrillic "е"
    hostile = ["..", "../../escape", "../" * 12 + "etc", absolute, "a/b", "nul\x00id", "x" * 300, lookalike,
               ".hidden", "ok/../../out"]
    write_track(raw / "a" / "b", ".", seed=1, seconds=8.0)                  # a nested folder for "a/b"
    write_track(raw, lookalike, seed=2, seconds=8.0)                       # a real folder with real stems
    rows += [{"track_id": tid, "artist": f"evil {i}", "title": "t", "genre": "../genre", "language": "en",
              "mood": "/etc/passwd"} for i, tid in enumerate(hostile)]
    write_metadata(raw, rows)
    (world / "abs").mkdir()
    work.mkdir()
    before = snapshot(world, work)

    p = small_params()
    d = p.data
    validated = validate_dataset(raw, work / "validated", d.validate_, workers=1)
    normalize_dataset(work / "validated", work / "normalized", d.normalize, workers=1)
    label_dataset(work / "normalized", work / "labelled", d.label, d.normalize.audioldm_sr, workers=1)
    split_dataset(work / "labelled", work / "split", d.split, p.seed)
    segment_dataset(work / "split", work / "segments", d.segment, d.normalize, workers=1)
    # A second validate run: the cache of quarantined ids is read back and re-used, still confined.
    again = validate_dataset(raw, work / "validated", d.validate_, workers=1)

    assert snapshot(world, work) == before  # not one new file or folder outside the outputs
    quarantined = {q["track_id"]: q["reason"] for q in validated["quarantined"]}
    for tid in hostile:
        assert quarantined.get(tid) in ("path_escape", "missing_stem", "metadata_missing"), (tid, quarantined)
    assert quarantined[lookalike] == "path_escape" and quarantined[absolute] == "path_escape"
    assert {r["track_id"] for r in validated["accepted"]} == {r["track_id"] for r in rows[:6]}
    assert again["stats"].reused == len(validated["accepted"]) + len(validated["quarantined"])
    # Outputs themselves sit only under the stage folders, one cache entry per record, named by hash.
    entries = list((work / "validated" / ".cache").iterdir())
    assert len(entries) == len(quarantined) + 6 and all(len(e.stem) == 32 for e in entries)
