"""Cache keys that cover what the output depends on: shared helper code, and stems behind symlinks."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from tasks.data.validate import validate_dataset
from tests.conftest import make_dataset, run, small_params


def stage(proj: Path, name: str, src: str, out: str) -> dict:
    res = run([sys.executable, "-m", "v2m.cli", "data", name, src, "--out", out], proj)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((proj / out / "stats.json").read_text())


def test_editing_a_shared_helper_redoes_the_stages_that_run_it_and_only_those(project: Path) -> None:
    # `project` is a scratch copy of this repo's code; `python -m v2m.cli` there runs that copy.
    args = {"validate": ("data/raw", "data/validated"), "normalize": ("data/validated", "data/normalized")}
    first = {s: stage(project, s, *a) for s, a in args.items()}
    assert first["normalize"]["processed"] == 12  # 6 tracks x 2 stems

    (project / "tasks/data/label.py").write_text((project / "tasks/data/label.py").read_text() + "\n# edited\n")
    unrelated = {s: stage(project, s, *a) for s, a in args.items()}
    assert unrelated["validate"]["processed"] == 0 and unrelated["normalize"]["processed"] == 0

    audio = project / "v2m/audio.py"  # resampling, loudness and wav writing live here
    audio.write_text(audio.read_text() + "\n# a fix to a shared helper\n")
    redone = {s: stage(project, s, *a) for s, a in args.items()}
    assert redone["validate"]["processed"] == 6 and redone["normalize"]["processed"] == 12


def test_a_stem_behind_a_symlink_is_reread_when_its_target_changes(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_dataset(raw, n_tracks=4, n_artists=2, seconds=8.0)
    takes = raw / ".takes"  # hidden folders are not tracks
    takes.mkdir()
    vocal = raw / "t00" / "vocals.wav"
    shutil.move(vocal, takes / "take1.wav")
    shutil.copy(takes / "take1.wav", takes / "take2.wav")
    os.symlink(takes / "take1.wav", vocal)
    cfg = small_params().data.validate_
    first = validate_dataset(raw, tmp_path / "out", cfg, workers=1)
    sha = {r["track_id"]: r["vocals_sha256"] for r in first["accepted"]}

    data, sr = sf.read(takes / "take1.wav")
    sf.write(takes / "take1.wav", np.roll(data, 1000), sr)  # the target's content changes; the link does not
    second = validate_dataset(raw, tmp_path / "out", cfg, workers=1)
    assert second["stats"].processed == 1 and second["stats"].reused == 3
    assert {r["track_id"]: r["vocals_sha256"] for r in second["accepted"]}["t00"] != sha["t00"]

    vocal.unlink()
    os.symlink(takes / "take2.wav", vocal)  # the link now points elsewhere
    third = validate_dataset(raw, tmp_path / "out", cfg, workers=1)
    assert third["stats"].processed == 1
    assert {r["track_id"]: r["vocals_sha256"] for r in third["accepted"]}["t00"] == sha["t00"]


def test_the_finetune_key_changes_with_the_training_and_model_code_only(project: Path) -> None:
    """After a training or model bug fix, retrain must train again instead of reusing the old models."""
    probe = ("from tasks.training.finetune import training_code_version as v; "
             "print(v('musicgen'), v('audioldm'))")

    def versions() -> list[str]:
        res = run([sys.executable, "-c", probe], project)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout.split()

    before = versions()
    for path, changed in (("tasks/training/trainer.py", {0, 1}), ("models/audioldm.py", {1}),
                          ("tasks/data/label.py", set())):
        f = project / path
        f.write_text(f.read_text() + "\n# a fix\n")
        after = versions()
        assert {i for i in (0, 1) if after[i] != before[i]} == changed, path
        before = after
