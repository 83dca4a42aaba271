"""Retention of a run's checkpoints on S3: once the run has finished, keep its final checkpoint and the
`keep_last` newest before it, delete the others, and record in the run's MLflow run what was deleted.

Why after success only: a run that may still resume (killed, host lost) needs its newest checkpoint, and the
trainer writes `<prefix>/latest` last, so pruning while it runs could race it. A finished run needs none of
them to resume (a re-run is a cache hit); the final one stays as the run's last state and the few before it
for a look at the end of training. Settings: params.yaml `train.retention` (prune, keep_last).

A run's prefix is `<train.<backend>.checkpoint_uri>/<run folder name>` (tasks/training/finetune.py); inside
it `ckpt-<step>/` folders (tasks/training/checkpoints.py) and the object `latest` naming the final one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from v2m.config import Params

PREFIX = "ckpt-"


def run_checkpoint_uri(params: Params, backend: str, run_dir: str) -> str:
    """The run's own S3 prefix ("" when checkpoints stay local), as finetune.py derives it."""
    base = params.train_config(backend).checkpoint_uri
    return f"{base.rstrip('/')}/{Path(run_dir).name}" if base else ""


def prune_checkpoints(uri: str, keep_last: int) -> dict[str, Any]:
    """Delete every checkpoint under `uri` but the final one (named by `latest`) and the keep_last newest
    before it. Returns what was kept and deleted (checkpoint names, objects, bytes)."""
    from models.weights import s3_client
    client = s3_client()
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    objects: dict[str, list[dict]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{PREFIX}"):
        for obj in page.get("Contents", []):
            objects.setdefault(obj["Key"][len(prefix) + 1:].split("/")[0], []).append(obj)
    if not objects:
        return {"uri": uri, "final": None, "kept": [], "deleted": [], "deleted_objects": 0, "deleted_bytes": 0}
    try:
        final = client.get_object(Bucket=bucket, Key=f"{prefix}/latest")["Body"].read().decode().strip()
    except client.exceptions.NoSuchKey:  # no pointer (written by hand?): the newest one is the final
        final = max(objects)
    before = sorted(name for name in objects if name < final)  # zero-padded steps: names sort by step
    kept = sorted({final, *before[max(0, len(before) - keep_last):]})
    doomed = [obj for name, objs in objects.items() if name not in kept for obj in objs]
    for obj in doomed:
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    return {"uri": uri, "final": final, "kept": kept, "deleted": sorted(set(objects) - set(kept)),
            "deleted_objects": len(doomed), "deleted_bytes": sum(o["Size"] for o in doomed)}


def apply_retention(params: Params, backend: str, run_id: str, run_dir: str) -> dict[str, Any] | None:
    """After a run finished: prune its S3 checkpoints by `train.retention` and audit it in its MLflow run
    (artifact checkpoints/retention.json, tag checkpoint_retention). None when there is nothing to prune."""
    rule, uri = params.train.retention, run_checkpoint_uri(params, backend, run_dir)
    if not (rule.prune and uri):
        return None
    from mlflow.tracking import MlflowClient
    record = {**prune_checkpoints(uri, rule.keep_last), "keep_last": rule.keep_last}
    client = MlflowClient()
    client.log_text(run_id, json.dumps(record, indent=2), "checkpoints/retention.json")
    client.set_tag(run_id, "checkpoint_retention", f"kept {', '.join(record['kept']) or 'none'}; deleted "
                   f"{len(record['deleted'])} checkpoints ({record['deleted_bytes']} bytes)")
    return record
