"""S3 checkpoints follow train.retention: after a fine-tune finishes, the final checkpoint and the keep_last
newest before it stay on S3 (a real SeaweedFS server), the rest is gone, and the MLflow run says what went."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import mlflow
import pytest
import yaml

from flows.steps import finetune_flow
from tests.flows.conftest import write_small_params
from tests.model.test_run_checkpoints import s3  # noqa: F401  (pytest fixture: SeaweedFS with bucket "ckpts")
from v2m.config import ConfigError, load_params


def test_a_finished_run_keeps_its_final_and_last_k_checkpoints_on_s3(harness, root: Path, s3) -> None:
    write_small_params(root, {"train": {"musicgen": {"max_steps": 5, "checkpoint_every": 1,
                                                     "checkpoint_uri": "s3://ckpts/runs"},
                                        "retention": {"keep_last": 1}}})
    out = finetune_flow(backend="musicgen", mode="voice", project_dir=str(root))
    assert out["trained"] and out["model_uri"]

    prefix = f"runs/{Path(out['run_dir']).name}/"
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3.endpoint_url).list_objects_v2(
        Bucket="ckpts", Prefix=prefix)["Contents"]]
    on_s3 = {k.removeprefix(prefix).split("/")[0] for k in keys}
    assert on_s3 == {"latest", "ckpt-00000004", "ckpt-00000005"}, on_s3  # five were written, one per step
    assert sum(k.endswith("/model.safetensors") for k in keys) == 2

    record = json.loads(mlflow.artifacts.load_text(f"runs:/{out['run_id']}/checkpoints/retention.json"))
    assert record["final"] == "ckpt-00000005" and record["kept"] == ["ckpt-00000004", "ckpt-00000005"]
    assert record["deleted"] == ["ckpt-00000001", "ckpt-00000002", "ckpt-00000003"]
    assert record["deleted_objects"] == 12 and record["deleted_bytes"] > 0
    assert "deleted 3 checkpoints" in mlflow.get_run(out["run_id"]).data.tags["checkpoint_retention"]
    assert out["checkpoint_retention"]["deleted"] == record["deleted"]


def test_a_bad_retention_setting_names_its_key(tmp_path: Path) -> None:
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    params["train"]["retention"]["keep_last"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"train\.retention\.keep_last"):
        load_params(tmp_path / "params.yaml")
