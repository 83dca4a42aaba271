"""Checkpoints that belong to their run, on a real S3 server (SeaweedFS on loopback): a run resumes only its
own checkpoints, also from another host; a run with other settings starts from step 0 under its own prefix."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import mlflow
import pytest

from tasks.training.finetune import finetune
from v2m.config import load_params
from v2m.s3server import SeaweedS3, free_port


@pytest.fixture
def s3(tmp_path: Path, monkeypatch):
    server = SeaweedS3(tmp_path / "s3", buckets=["ckpts"], s3_port=free_port())
    server.start()
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
    yield server
    server.stop()


def with_checkpoints(p, **train):
    tcfg = p.train.musicgen.model_copy(update={"checkpoint_uri": "s3://ckpts/runs", **train})
    return p.model_copy(update={"train": p.train.model_copy(update={"musicgen": tcfg})})


def prefixes(server) -> set[str]:
    client = boto3.client("s3", endpoint_url=server.endpoint_url)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="ckpts").get("Contents", [])]
    return {k.split("/")[1] for k in keys}


def test_a_run_resumes_only_its_own_checkpoints_even_on_another_host(root: Path, s3) -> None:
    p = with_checkpoints(load_params(root / "params.yaml"))
    stopped = finetune(p, "musicgen", "voice", root, stop_after=4)  # interrupted after 4 of 6 steps
    assert len(stopped.losses) == 4
    (run_prefix,) = prefixes(s3)
    assert run_prefix == Path(stopped.run_dir).name  # <backend>-<mode>-<key>

    # Another run (other settings, so another key) must not pick those checkpoints up.
    other = finetune(with_checkpoints(p, lr=5e-4), "musicgen", "voice", root)
    assert other.trained and other.resumed_from == 0 and len(other.losses) == 6
    assert prefixes(s3) == {run_prefix, Path(other.run_dir).name}

    # The interrupted run, on a host that has none of its local files, resumes from its S3 checkpoint and
    # continues the same MLflow run.
    shutil.rmtree(stopped.run_dir)
    resumed = finetune(p, "musicgen", "voice", root)
    assert resumed.trained and resumed.resumed_from == 4 and resumed.run_id == stopped.run_id
    assert mlflow.get_run(resumed.run_id).info.status == "FINISHED"
    # ... and once finished, another host gets the finished run without training.
    shutil.rmtree(resumed.run_dir)
    again = finetune(p, "musicgen", "voice", root)
    assert not again.trained and again.run_id == stopped.run_id
