"""Data-parallel training on torchrun, on the CPU with gloo: 2 processes train what 1 process trains at the same
global batch, a kill -9 of the whole job resumes, and the job makes exactly one MLflow run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import yaml

from tasks.data.cache_inputs import cache_dataset
from tasks.training.finetune import finetune
from tests.model.conftest import merge
from v2m.config import load_params

STEPS = 40  # tiny steps take tens of ms: enough of them that the kill lands mid-run
# No randomness in what a process computes from its items, so splitting a batch over processes changes nothing
# but the float summation order: the crop is the whole 4 s chunk, no condition or decoder dropout.
EXACT = {"musicgen": {"presets": {"tiny": {"arch": {"dropout": 0.0}}},
                      "condition_dropout": {"joint": 0.0, "text": 0.0, "chroma": 0.0}},
         "train": {"musicgen": {"crop_s": 4.0, "max_steps": STEPS, "checkpoint_every": 2, "val_every": 20}}}


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts its workers in sessions of their own)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            todo += [int(c) for c in (task / "children").read_text().split()] if (task / "children").exists() else []
    return out


def configure(root: Path, batch_size: int) -> None:
    raw = merge(yaml.safe_load((root / "params.yaml").read_text()),
                merge(EXACT, {"train": {"musicgen": {"batch_size": batch_size}}}))
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    p = load_params(root / "params.yaml")
    cache_dataset(p, "musicgen", root / "data/segments", root / "data/cache/musicgen")  # base without dropout


def test_two_processes_match_one_at_the_same_global_batch_and_resume_after_kill(root: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    shutil.copytree(root, single, symlinks=True)
    configure(single, batch_size=4)
    one = finetune(load_params(single / "params.yaml"), "musicgen", "voice", single)

    configure(root, batch_size=2)  # per process: 2 x 2 = the same global batch of 4
    cmd = [sys.executable, "-m", "v2m.cli", "train", "--backend", "musicgen", "--stage", "voice", "--gpus", "2"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the single run set it to its store
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])
    log = (tmp_path / "job.log").open("w")  # a file, not a pipe nobody reads while waiting
    job = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 300
    while not list(root.glob(".v2m/runs/musicgen-voice-*/checkpoints/ckpt-*[0-9]")):  # complete ones, not *.tmp
        assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    for pid in process_tree(job.pid):  # the whole job at once, as when its machine dies
        os.kill(pid, signal.SIGKILL)
    job.wait()
    log.close()

    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert 2 <= out["resumed_from"] < STEPS
    run_dir = next(root.glob(".v2m/runs/musicgen-voice-*"))
    losses = json.loads((run_dir / "losses.json").read_text())["losses"]
    assert len(losses) == len(one.losses) == STEPS
    np.testing.assert_allclose(losses, one.losses, rtol=2e-4)  # equal up to the order of float sums

    mlflow.set_tracking_uri(f"sqlite:///{root / '.v2m' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["voice2music-musicgen"], output_format="list")
    assert len(runs) == 1 and runs[0].info.run_id == out["run_id"] and runs[0].info.status == "FINISHED"
    history = mlflow.tracking.MlflowClient().get_metric_history(out["run_id"], "train/loss")
    steps = [m.step for m in history]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    # Steps up to the checkpoint ran once: one value each, so rank 1 logged nothing.
    assert all(steps.count(s) == 1 for s in range(1, out["resumed_from"] + 1))
