"""Model references, as users type them: a folder, `runs:/RUN_ID`, `NAME@alias` or `NAME/version`.

Everything but a folder goes through MLflow's pyfunc loader, so production use (`--model
voice2music-musicgen@champion`) never names a file.
"""

from __future__ import annotations

from pathlib import Path

from models import load_model
from models.base import Backend
from v2m.errors import UserError


class ModelRefError(UserError, ValueError):
    """A reference that names nothing loadable; the message says which and why."""


def to_model_uri(ref: str) -> str:
    if ref.startswith(("runs:/", "models:/")):
        return ref if ref.startswith("models:/") or ref.rstrip("/").count("/") > 1 else ref.rstrip("/") + "/model"
    if "@" in ref:
        return f"models:/{ref}"
    name, _, version = ref.rpartition("/")
    if name and version.isdigit():
        return f"models:/{name}/{version}"
    raise ModelRefError(f"{ref!r}: not a model folder, runs:/RUN_ID, NAME@alias or NAME/version")


def resolve_model(ref: str, device: str = "cpu") -> Backend:
    """Load the Backend a reference names (MLflow must already point at the right tracking store)."""
    if Path(ref).is_dir():
        return load_model(Path(ref), device=device)
    import mlflow
    from mlflow.exceptions import MlflowException
    uri = to_model_uri(ref)
    try:
        return mlflow.pyfunc.load_model(uri).unwrap_python_model().backend
    except (MlflowException, OSError) as exc:
        raise ModelRefError(f"{ref!r} ({uri}): cannot load: {exc}") from exc
