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
import yaml

from tasks.data.cache_inputs import cache_dataset
from tasks.data.label import label_dataset
from tasks.data.normalize import normalize_dataset
from tasks.data.segment import segment_dataset
from tasks.data.split import split_dataset
from tasks.data.validate import validate_dataset
from tasks.training.finetune import FinetuneError, finetune
from tests.conftest import ROOT, make_dataset
from v2m.config import load_params

# Small everything: 4 s chunks, 2 s training crops, 6 steps.
OVERRIDES = {
    "data": {"segment": {"musicgen": {"chunk_s": 4.0, "hop_s": 4.0, "min_chunk_s": 2.0},
                         "audioldm": {"chunk_s": 3.0, "hop_s": 3.0, "min_chunk_s": 2.0}}},
    "musicgen": {"crop_s": 2.0},
    "audioldm": {"crop_s": 2.0},
    "train": {b: {"max_steps": 6, "batch_size": 2, "checkpoint_every": 2, "val_every": 3, "samples": 1,
                  "sample_duration_s": 1.0, "lr": 1e-3, "warmup_steps": 1} for b in ("musicgen", "audioldm")},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory) -> Path:
    """A project folder with params, prepared data and the musicgen cache (copied by each test)."""
    root = tmp_path_factory.mktemp("ft-template")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(merge(raw, OVERRIDES)))
    p = load_params(root / "params.yaml")
    make_dataset(root / "data/raw", n_tracks=6, n_artists=3, seconds=12.0)
    d, w = p.data, root / "data"
    validate_dataset(w / "raw", w / "validated", d.validate_, 1)
    normalize_dataset(w / "validated", w / "normalized", d.normalize, 1)
    label_dataset(w / "normalized", w / "labelled", d.label, d.normalize.audioldm_sr, 1)
    split_dataset(w / "labelled", w / "split", d.split, p.seed)
    segment_dataset(w / "split", w / "segments", d.segment, d.normalize, 1)
    cache_dataset(p, "musicgen", w / "segments", w / "cache" / "musicgen")
    (root / ".v2m").mkdir()
    (root / ".v2m" / "data_version.json").write_text(json.dumps({"data_version": "test-data-v1"}))
    return root


@pytest.fixture
def root(prepared_root: Path, tmp_path: Path, monkeypatch) -> Path:
    dest = tmp_path / "proj"
    shutil.copytree(prepared_root, dest, symlinks=True)
    monkeypatch.chdir(dest)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return dest


def test_run_logs_params_metrics_samples_and_a_pyfunc_that_generates(root: Path) -> None:
    p = load_params(root / "params.yaml")
    res = finetune(p, "musicgen", "voice", root)
    assert res.trained and len(res.losses) == 6 and all(np.isfinite(res.losses))

    run = mlflow.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "6" and run.data.params["mode"] == "voice"
    assert run.data.params["musicgen.prompt_template"] == p.musicgen.prompt_template
    tags = run.data.tags
    assert (tags["backend"], tags["stage"], tags["preset"], tags["data_version"]) == \
        ("musicgen", "voice", "tiny", "test-data-v1")
    assert tags["base_model"].startswith("tiny") and tags["git_commit"]
    client = mlflow.tracking.MlflowClient()
    assert len(client.get_metric_history(res.run_id, "train/loss")) == 6
    assert [m.step for m in client.get_metric_history(res.run_id, "val/loss")] == [3, 6]
    for name in ("train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert name in run.data.metrics, name
    samples = {a.path for a in client.list_artifacts(res.run_id, "samples")}
    assert any(s.endswith("_vocal.wav") for s in samples) and any(s.endswith("_generated.wav") for s in samples)

    model = mlflow.pyfunc.load_model(res.model_uri)
    vocal = root / "data/segments/musicgen" / sorted(os.listdir(root / "data/segments/musicgen"))[0]
    vocal = next(vocal.glob("*_vocals.wav"))
    out = model.predict(pd.DataFrame([{"vocal_path": str(vocal), "prompt": "pop music for input vocals",
                                       "duration_s": 1.5, "seed": 0}]))
    audio = out.loc[0, "audio"]
    assert out.loc[0, "sample_rate"] == 32000 and len(audio) == 48000 and np.isfinite(audio).all()

    again = finetune(p, "musicgen", "voice", root)  # same data, same config: nothing to train
    assert not again.trained and again.run_id == res.run_id


def test_stage_two_starts_from_stage_one(root: Path) -> None:
    p = load_params(root / "params.yaml")
    with pytest.raises(FinetuneError, match="stage `voice` run"):
        finetune(p, "musicgen", "voice_text", root)
    first = finetune(p, "musicgen", "voice", root)
    second = finetune(p, "musicgen", "voice_text", root)
    tags = mlflow.get_run(second.run_id).data.tags
    assert tags["stage"] == "voice_text" and tags["init_from"] == first.model_dir
    assert mlflow.get_run(second.run_id).data.params["conditioning"] == "voice_text"


def test_kill_minus_9_then_resume_reproduces_the_uninterrupted_losses(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "uninterrupted"
    shutil.copytree(root, other, symlinks=True)
    full = finetune(load_params(other / "params.yaml"), "musicgen", "voice", other)

    cmd = [sys.executable, "-m", "v2m.cli", "train", "--backend", "musicgen", "--stage", "voice"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(root.glob(".v2m/runs/musicgen-voice-*/checkpoints/ckpt-00000004")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint at step 4 in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["resumed_from"] >= 4
    losses = json.loads(next(root.glob(".v2m/runs/musicgen-voice-*/losses.json")).read_text())["losses"]
    assert losses == full.losses
