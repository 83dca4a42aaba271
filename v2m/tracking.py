"""MLflow wiring: embedded SQLite + local artifacts by default, a tracking server by configuration.

Order of precedence for the tracking URI: params.yaml `tracking.uri`, then MLFLOW_TRACKING_URI, then the
embedded default `sqlite:///<project>/.v2m/mlflow.db` with artifacts in `<project>/.v2m/mlartifacts/`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from v2m.config import Params

EXPERIMENTS = {"musicgen": "voice2music-musicgen", "audioldm": "voice2music-audioldm",
               "evaluation": "voice2music-evaluation"}
REGISTERED_MODELS = {"musicgen": "voice2music-musicgen", "audioldm": "voice2music-audioldm"}


def tracking_uri(params: Params, root: Path) -> str:
    return params.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{(Path(root) / '.v2m' / 'mlflow.db').resolve()}"


def setup_mlflow(params: Params, root: Path) -> str:
    """Point this process's MLflow client at the configured store; returns the URI."""
    import mlflow
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(params, root)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def experiment_id(name: str, params: Params, root: Path) -> str:
    """Get or create an experiment; embedded stores keep artifacts under .v2m/mlartifacts/<name>."""
    import mlflow
    from mlflow.exceptions import MlflowException
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = params.tracking.artifact_location or None
    if location is None and tracking_uri(params, root).startswith("sqlite:"):
        location = (Path(root) / ".v2m" / "mlartifacts" / name).resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # another job created it meanwhile (two GPUs, one host)
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(name).experiment_id


def git_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b.c": value} for mlflow.log_params (which takes flat, short values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out
