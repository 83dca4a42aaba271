"""DistributedDataParallel and FSDP2 on 2 gloo processes train the tiny MusicGen-Melody exactly as 1 process does
at the same global batch (gradient accumulation with no_sync, weight decay, checkpoints gathered to rank 0);
a 2-process job resumes from S3 (SeaweedFS on loopback) into a fresh empty folder; `v2m train --gpus 2` with FSDP
ends with a plain model that loads and generates alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from models import load_model
from tasks.training.checkpoints import list_checkpoints, load_checkpoint
from tasks.training.finetune import finetune
from tests.model.conftest import merge
from v2m.config import load_params
from v2m.s3server import SeaweedS3, free_port

WORKER = Path(__file__).with_name("dp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run_job(out: Path, nproc: int, batch: int, parallel: str, *extra: str,
            env: dict | None = None) -> tuple[dict, dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), str(out), str(batch), parallel, *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "result.json").read_text()), load_file(str(out / "final.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[dict, dict]:
    return run_job(tmp_path_factory.mktemp("single"), 1, 4, "ddp")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_what_one_trains_at_the_same_global_batch(single, parallel, tmp_path: Path) -> None:
    one, one_weights = single
    two, two_weights = run_job(tmp_path / parallel, 2, 2, parallel)
    assert one["parallel"] == "single" and (two["parallel"], two["world"]) == (parallel, 2)
    assert len(two["losses"]) == len(one["losses"]) == 4
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=2e-4)  # equal up to the order of float sums
    # the full trainable state (decoder + condition projections), also when it was sharded
    assert two_weights.keys() == one_weights.keys() and len(one_weights) > 10
    for name, w in one_weights.items():
        np.testing.assert_allclose(two_weights[name], w, rtol=1e-3, atol=1e-5, err_msg=name)


def test_two_processes_resume_from_s3_into_a_fresh_empty_folder(single, tmp_path: Path) -> None:
    one, _ = single
    with SeaweedS3(tmp_path / "s3", buckets=["ckpts"], s3_port=free_port()) as s3:
        env = {**s3.env(), "AWS_ENDPOINT_URL": s3.endpoint_url}
        uri = "s3://ckpts/runs/dp"
        first, _ = run_job(tmp_path / "host-a", 2, 2, "ddp", "--uri", uri, "--stop-after", "2", env=env)
        assert first["resumed_from"] == 0 and len(first["losses"]) == 2
        # Another machine: nothing local (each process of the job finds the folder empty), the same URI.
        fresh = tmp_path / "host-b"
        resumed, _ = run_job(fresh, 2, 2, "ddp", "--uri", uri, env=env)
    assert resumed["resumed_from"] == 2 and resumed["world"] == 2
    np.testing.assert_allclose(resumed["losses"], one["losses"], rtol=2e-4)
    # the downloaded checkpoint and the new one; no temporary download folder left behind
    assert sorted(p.name for p in (fresh / "run" / "checkpoints").iterdir()) == ["ckpt-00000002", "ckpt-00000004"]


def test_v2m_train_with_fsdp_on_two_processes_saves_a_model_that_loads_alone(root: Path) -> None:
    raw = merge(yaml.safe_load((root / "params.yaml").read_text()),
                {"train": {"musicgen": {"parallel": "fsdp", "max_steps": 4, "val_every": 2, "samples": 1}}})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    res = finetune(load_params(root / "params.yaml"), "musicgen", "voice", root, gpus=2)
    assert res.trained and len(res.losses) == 4 and np.isfinite(res.losses).all()
    # rank 0 rebuilt a plain model from the base and the gathered final checkpoint, saved it and generated from it
    final = load_checkpoint(list_checkpoints(Path(res.run_dir) / "checkpoints")[-1])["model"]
    model = load_model(res.model_dir)
    trained = dict(model.module.named_parameters())
    assert len(final) > 10
    for name, tensor in final.items():
        assert torch.equal(trained[name].detach(), tensor), name
    assert list((Path(res.run_dir) / "samples").glob("*_generated.wav"))
