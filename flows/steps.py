"""The retrain flow's steps as flows of their own, so each can be a deployment on its own work pool:

    finetune  (gpu-a40)   one backend, one stage or variant
    evaluate  (gpu-a40)   generation-heavy scoring of one model on the test split
    promote   (cpu)       register the run as a version, then gate and compare-and-set the champion
                          (on evaluations already made by `evaluate`: the challenger's, and the champion's
                          on the same test set, which the retrain flow asks for before promoting)

`run_step` calls a step in-process (embedded mode) or through run_deployment on its pool (team mode):
the same code, chosen by configuration (params.yaml orchestration.mode or V2M_ORCHESTRATION).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow

from tasks.evaluation.evaluate import evaluate_task
from tasks.registry.promotion import promote_task, register_task
from tasks.training.finetune import finetune_task
from v2m.config import Params, load_params
from v2m.tracking import setup_mlflow


def project_params(project_dir: str, presets: dict[str, str] | None = None) -> tuple[Path, Params]:
    root = Path(project_dir).resolve()
    params = load_params(root / "params.yaml")
    for backend, preset in (presets or {}).items():
        params = params.model_copy(update={backend: getattr(params, backend).model_copy(update={"preset": preset})})
    setup_mlflow(params, root)
    return root, params


@flow(name="finetune", persist_result=True)
def finetune_flow(backend: str, mode: str, project_dir: str = ".", presets: dict[str, str] | None = None,
                  max_steps: int | None = None) -> dict[str, Any]:
    root, params = project_params(project_dir, presets)
    state = finetune_task(params, backend, mode, root, max_steps=max_steps, return_state=True)
    result = asdict(state.result())
    if state.name == "Cached":  # Prefect's cache: same data version and settings, nothing was trained
        result["trained"] = False
    return result


@flow(name="evaluate", persist_result=True)
def evaluate_flow(model: str, project_dir: str = ".", presets: dict[str, str] | None = None) -> dict[str, Any]:
    root, params = project_params(project_dir, presets)
    res = evaluate_task(params, root, model)
    return {"run_id": res.run_id, "backend": res.backend,
            "metrics": {k: v for k, v in res.metrics.items() if k.count("/") == 1}}


@flow(name="promote", persist_result=True)
def promote_flow(backend: str, run_id: str, eval_run_id: str, project_dir: str = ".") -> dict[str, Any]:
    root, params = project_params(project_dir)
    version = register_task(run_id, backend, eval_run_id)
    decision = promote_task(params, root, backend, version)
    return decision.as_dict()


def team_mode(params: Params) -> bool:
    return (os.environ.get("V2M_ORCHESTRATION") or params.orchestration.mode) == "team"


def run_step(params: Params, step: str, fn, **parameters: Any) -> Any:
    """Run a step flow here, or as a deployment on its work pool (its result comes back persisted)."""
    if not team_mode(params):
        # The step's body, inside the parent flow run: its tasks (with their retries, caches and tags) become
        # the parent's, without the cost of a subflow run per step (about 1 s each).
        return fn.fn(**parameters)
    from prefect.deployments import run_deployment
    flow_run = run_deployment(params.orchestration.deployments[step], parameters=parameters, timeout=None)
    if not flow_run.state.is_completed():
        raise RuntimeError(f"deployment {params.orchestration.deployments[step]} ended {flow_run.state.name}: "
                           f"{flow_run.state.message}")
    return flow_run.state.result()
