"""MLflow Model Registry operations: register a finished fine-tune, read aliases, write the audit trail.

Every finished fine-tune becomes a version of `voice2music-<backend>` carrying the lineage tags of its run
(data version, git commit, stage or variant, preset, base model) and, once evaluated, `eval_run_id`.
The alias `challenger` always points at the newest version; `champion` is production, moved only by
tasks/registry/promotion.py. Every decision (promote, refuse, rollback) is an audit entry: a run in the
`voice2music-audit` experiment whose tags say what happened, to which version, and what was champion.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from v2m.config import Params
from v2m.tracking import REGISTERED_MODELS, experiment_id

CHALLENGER, CHAMPION = "challenger", "champion"
AUDIT_EXPERIMENT = "voice2music-audit"
LINEAGE_TAGS = ("backend", "preset", "stage", "variant", "base_model", "data_version", "git_commit", "init_from")


def model_name(backend: str) -> str:
    return REGISTERED_MODELS[backend]


def register(run_id: str, backend: str, eval_run_id: str | None = None) -> str:
    """Register the run's logged model as a new version; tag it with the run's lineage; make it challenger.
    Idempotent: a run that already has a version gets that version back."""
    client = MlflowClient()
    name = model_name(backend)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"voice2music {backend} instrumental generator")
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:  # registering the same run again (an unchanged re-run of the flow) changes nothing
        version = str(max(int(mv.version) for mv in existing))
        for key, value in _eval_tags(client, eval_run_id).items():
            client.set_model_version_tag(name, version, key, value)
        return version
    run = client.get_run(run_id)
    tags = {k: run.data.tags[k] for k in LINEAGE_TAGS if k in run.data.tags} | _eval_tags(client, eval_run_id)
    source = f"runs:/{run_id}/model"
    mv = mlflow.register_model(source, name, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version)


def _eval_tags(client: MlflowClient, eval_run_id: str | None) -> dict[str, str]:
    """The version's evaluation and the test set it scored (tag test_fingerprint, as on the run)."""
    if not eval_run_id:
        return {}
    fingerprint = client.get_run(eval_run_id).data.tags.get("test_fingerprint")
    return {"eval_run_id": eval_run_id} | ({"test_fingerprint": fingerprint} if fingerprint else {})


def alias_version(backend: str, alias: str) -> str | None:
    """The version an alias points at, as a string (the local store returns ints, REST strings)."""
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name(backend), alias).version)
    except MlflowException:
        return None


def version_tags(backend: str, version: str) -> dict[str, str]:
    return dict(MlflowClient().get_model_version(model_name(backend), version).tags)


def eval_metrics(backend: str, version: str) -> dict[str, float]:
    """The evaluation metrics of a version (from its eval_run_id), or {} if it was never evaluated."""
    eval_run = version_tags(backend, version).get("eval_run_id")
    if not eval_run:
        return {}
    return {k: float(v) for k, v in MlflowClient().get_run(eval_run).data.metrics.items() if k.startswith("eval/")}


def audit(params: Params, root: Path, backend: str, action: str, version: str | None, previous: str | None,
          champion_after: str | None, detail: dict[str, Any]) -> str:
    """Append an audit entry (an MLflow run) and return its id."""
    exp = experiment_id(AUDIT_EXPERIMENT, params, root)
    client = MlflowClient()
    run = client.create_run(exp, run_name=f"{backend}-{action}-v{version}", tags={
        "backend": backend, "action": action, "version": str(version), "champion_before": str(previous),
        "champion_after": str(champion_after), "time_ns": str(time.time_ns())})
    client.log_text(run.info.run_id, json.dumps(detail, indent=2, sort_keys=True, default=str), "decision.json")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def audit_history(params: Params, root: Path, backend: str) -> list[dict[str, str]]:
    """Audit entries for a backend, oldest first: which version was champion when."""
    exp = experiment_id(AUDIT_EXPERIMENT, params, root)
    runs = MlflowClient().search_runs([exp], filter_string=f"tags.backend = '{backend}'", max_results=10000)
    entries = [dict(r.data.tags) | {"run_id": r.info.run_id} for r in runs]
    return sorted(entries, key=lambda e: int(e.get("time_ns", 0)))
