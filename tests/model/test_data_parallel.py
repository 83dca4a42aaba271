"""DistributedDataParallel and FSDP2 on 2 gloo processes train the tiny MusicGen-Melody exactly as 1 process does
at the same global batch (gradient accumulation with no_sync, weight decay, checkpoints gathered to rank 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

WORKER = Path(__file__).with_name("dp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run_job(out: Path, nproc: int, batch: int, parallel: str) -> tuple[dict, dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), str(out), str(batch), parallel]
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
