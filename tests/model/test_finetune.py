"""A fine-tuning run end to end on the tiny presets: cache -> train -> MLflow run -> pyfunc model;
kill -9 mid-run and resume; the second stage starting from the first; an unchanged re-run reuses the result."""

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
import pandas as pd
import pytest

from tasks.training.finetune import FinetuneError, finetune
from v2m.config import load_params

@pytest.mark.parametrize("backend, mode, tag, rate", [("musicgen", "voice", "stage", 32000),
                                                      ("audioldm", "refined", "variant", 16000)])
def test_run_logs_params_metrics_samples_and_a_pyfunc_that_generates(root: Path, backend, mode, tag, rate) -> None:
    p = load_params(root / "params.yaml")
    res = finetune(p, backend, mode, root)
    assert res.trained and len(res.losses) == 6 and all(np.isfinite(res.losses))

    run = mlflow.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "6" and run.data.params["mode"] == mode
    assert run.data.params[f"{backend}.prompt_template"] == getattr(p, backend).prompt_template
    tags = run.data.tags
    assert (tags["backend"], tags[tag], tags["preset"], tags["data_version"]) == \
        (backend, mode, "tiny", "test-data-v1")
    assert tags["base_model"].startswith("tiny") and tags["git_commit"]
    client = mlflow.tracking.MlflowClient()
    assert len(client.get_metric_history(res.run_id, "train/loss")) == 6
    assert [m.step for m in client.get_metric_history(res.run_id, "val/loss")] == [3, 6]
    for name in ("train/lr", "train/grad_norm", "train/step_time_s"):
        assert name in run.data.metrics, name
    if backend == "musicgen":  # tokens are MusicGen's unit of work
        assert run.data.metrics["train/tokens_per_s"] > 0
    samples = {a.path for a in client.list_artifacts(res.run_id, "samples")}
    assert any(s.endswith("_vocal.wav") for s in samples) and any(s.endswith("_generated.wav") for s in samples)

    model = mlflow.pyfunc.load_model(res.model_uri)
    vocal = root / f"data/segments/{backend}" / sorted(os.listdir(root / f"data/segments/{backend}"))[0]
    vocal = next(vocal.glob("*_vocals.wav"))
    out = model.predict(pd.DataFrame([{"vocal_path": str(vocal), "prompt": "pop music for input vocals",
                                       "duration_s": 1.5, "seed": 0}]))
    audio = out.loc[0, "audio"]
    assert out.loc[0, "sample_rate"] == rate and len(audio) == int(1.5 * rate) and np.isfinite(audio).all()

    again = finetune(p, backend, mode, root)  # same data, same config: nothing to train
    assert not again.trained and again.run_id == res.run_id


def test_stage_two_starts_from_stage_one(root: Path) -> None:
    p = load_params(root / "params.yaml")
    with pytest.raises(FinetuneError, match="stage `voice` run"):
        finetune(p, "musicgen", "voice_text", root)
    first = finetune(p, "musicgen", "voice", root)
    # Stage 2 may run on another host: it finds stage 1 through MLflow and loads its logged model, so the
    # stage-1 run folder on this disk is not needed.
    shutil.rmtree(first.run_dir)
    second = finetune(p, "musicgen", "voice_text", root)
    tags = mlflow.get_run(second.run_id).data.tags
    assert tags["stage"] == "voice_text" and tags["init_from_run_id"] == first.run_id
    assert tags["init_from"] == f"runs:/{first.run_id}/model"
    assert mlflow.get_run(second.run_id).data.params["conditioning"] == "voice_text"
    # A stage-1 run with other settings is not a starting point for today's stage 2.
    other = p.model_copy(update={"seed": p.seed + 1})
    with pytest.raises(FinetuneError, match="same settings"):
        finetune(other, "musicgen", "voice_text", root)


def test_kill_minus_9_then_resume_reproduces_the_uninterrupted_losses(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "uninterrupted"
    shutil.copytree(root, other, symlinks=True)
    full = finetune(load_params(other / "params.yaml"), "musicgen", "voice", other)

    cmd = [sys.executable, "-m", "v2m.cli", "train", "--backend", "musicgen", "--stage", "voice"]
    # The commands use root's own embedded store: in the store the run above went to, the same settings
    # and data would be a finished run (a cache hit), whichever folder asks.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(root.glob(".v2m/runs/musicgen-voice-*/checkpoints/ckpt-00000004")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint at step 4 in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["resumed_from"] >= 4
    losses = json.loads(next(root.glob(".v2m/runs/musicgen-voice-*/losses.json")).read_text())["losses"]
    assert losses == full.losses


def test_an_interrupted_audioldm_run_resumes_to_the_same_losses(root: Path, tmp_path: Path, monkeypatch) -> None:
    other = tmp_path / "uninterrupted"
    shutil.copytree(root, other, symlinks=True)
    full = finetune(load_params(other / "params.yaml"), "audioldm", "voice_text", other)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # root's own store (in other's, this run is already finished)
    p = load_params(root / "params.yaml")
    cut = finetune(p, "audioldm", "voice_text", root, stop_after=3)  # checkpoint at step 2, step 3 is lost
    assert cut.model_dir == "" and len(cut.losses) == 3
    resumed = finetune(p, "audioldm", "voice_text", root)
    assert resumed.resumed_from == 2 and resumed.losses == full.losses
