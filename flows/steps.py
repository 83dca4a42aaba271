"""The retrain flow's steps as flows of their own, so each can be a deployment on its own work pool:

    finetune  (gpu-a40)   one backend, one stage or variant
    evaluate  (gpu-a40)   generation-heavy scoring of one model on the test split
    promote   (cpu)       register the run as a version, then gate and compare-and-set the champion
                          (on evaluations already made by `evaluate`: the challenger's, and the champion's
                          on the same test set, which the retrain flow asks for before promoting)

`run_step` calls a step in-process (embedded mode) or through run_deployment on its pool (team mode):
the same code, chosen by configuration (params.yaml orchestration.mode or V2M_ORCHESTRATION). In team mode
a step shares nothing with its parent but the services: it runs in its own clone of the code, checks out
the data version the parent passes from the DVC S3 remote (tasks/handoff.py), reads models from MLflow by
run id or registry URI, and hands back its result through S3 result storage. A GPU step holds one GPU of
its host (tasks.orchestration.gpu_slot).
"""

from __future__ import annotations

import contextvars
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger

from tasks.evaluation.evaluate import evaluate_task
from tasks.handoff import checkout
from tasks.orchestration import gpu_slot, project_params, team_mode
from tasks.registry.promotion import earlier_decision, promote_task, promotion_lease, register_task
from tasks.training.finetune import finetune_task
from tasks.training.retention import apply_retention
from v2m.config import Params


def pull_inputs(root: Path, params: Params, data_version: str, targets: list[str]) -> int:
    """Team mode: check `targets` of that data version out of the DVC remote ("" = use the data here); returns
    the bytes they hold. The log line's duration is the `data` phase of flows/timeline.py."""
    if not data_version:
        return 0
    started = time.perf_counter()
    size = checkout(root, params, data_version, targets)["bytes"]
    get_run_logger().info("data checkout: %d bytes of %s in %.1f s", size, data_version[:12],
                          time.perf_counter() - started)
    return size


def model_inputs(backend: str) -> list[str]:
    """What a GPU step reads from the DVC remote: its backend's cached model inputs and its backend's chunks
    (the vocals it conditions samples and evaluations on), never the raw audio or the other backend's data.
    DVC pulls these paths inside the stages' directory outputs file by file (granular targets)."""
    return [f"data/cache/{backend}", f"data/segments/{backend}", f"data/segments/{backend}.jsonl"]


@flow(name="finetune", persist_result=True)
def finetune_flow(backend: str, mode: str, project_dir: str = ".", presets: dict[str, str] | None = None,
                  max_steps: int | None = None, data_version: str = "", gpus: int = 1) -> dict[str, Any]:
    """data_version: team mode, check that version out of the DVC remote first ("" = use the data here).
    gpus: train this one run on that many GPUs of the host (torchrun, data parallel)."""
    root, params = project_params(project_dir, presets)
    pulled = pull_inputs(root, params, data_version, model_inputs(backend))
    with gpu_slot(gpus) as gpu:
        state = finetune_task(params, backend, mode, root, max_steps=max_steps, gpus=gpus, return_state=True)
    result = asdict(state.result())
    if state.name == "Cached":  # Prefect's cache: same data version and settings, nothing was trained
        result["trained"] = False
    if result["trained"] and result["model_uri"]:  # finished here: its S3 checkpoints follow the retention rule
        result["checkpoint_retention"] = apply_retention(params, backend, result["run_id"], result["run_dir"])
    return {**result, "gpu": gpu, "data_bytes_pulled": pulled}


@flow(name="evaluate", persist_result=True)
def evaluate_flow(model: str, project_dir: str = ".", presets: dict[str, str] | None = None,
                  data_version: str = "", backend: str = "") -> dict[str, Any]:
    root, params = project_params(project_dir, presets)
    pulled = pull_inputs(root, params, data_version, model_inputs(backend))
    with gpu_slot() as gpu:
        res = evaluate_task(params, root, model)
    return {"run_id": res.run_id, "backend": res.backend, "gpu": gpu, "data_bytes_pulled": pulled,
            "metrics": {k: v for k, v in res.metrics.items() if k.count("/") == 1}}


@flow(name="promote", persist_result=True)
def promote_flow(backend: str, run_id: str, eval_run_id: str, project_dir: str = ".",
                 data_version: str = "") -> dict[str, Any]:
    """data_version: team mode, fetch that version's test manifest first: the gates compare evaluations on
    the current test set, whose fingerprint comes from it ("" = use the data here)."""
    root, params = project_params(project_dir)
    pull_inputs(root, params, data_version, [f"data/segments/{backend}.jsonl"])
    with promotion_lease(params, backend, f"register {run_id}"):  # two hosts registering one run: one version
        version = register_task(run_id, backend, eval_run_id)
    # A version decided before (an unchanged re-run) keeps its decision; see earlier_decision.
    decision = earlier_decision(backend, version) or promote_task(params, root, backend, version)
    return decision.as_dict()


def run_step(params: Params, step: str, fn, **parameters: Any) -> Any:
    """Run a step flow here, or as a deployment on its work pool (its result comes back from S3).

    Team mode: the step runs in its own clone on another host, so the parent's project_dir means nothing
    there and is not passed. A flow run that crashed (its host or worker was lost) is started again, up to
    orchestration.step_attempts times; the new run resumes from what the lost one left in S3 and MLflow."""
    if not team_mode(params):
        # The step's body, inside the parent flow run: its tasks (with their retries, caches and tags) become
        # the parent's, without the cost of a subflow run per step (about 1 s each).
        return fn.fn(**parameters)
    from prefect.deployments import run_deployment
    name = params.orchestration.deployments[step]
    parameters = {k: v for k, v in parameters.items() if k != "project_dir"}
    for attempt in range(1, params.orchestration.step_attempts + 1):
        # poll every second (Prefect's default 5 s added 2.5 s to each of a retrain's ~10 steps)
        flow_run = run_deployment(name, parameters=parameters, timeout=None, poll_interval=1)
        if flow_run.state.is_completed():
            return flow_run.state.result()
        if not flow_run.state.is_crashed() or attempt == params.orchestration.step_attempts:
            break
    raise RuntimeError(f"deployment {name} ended {flow_run.state.name}: {flow_run.state.message}")


def side_by_side(params: Params, work: Callable[[str], Any], items: list[str]) -> dict[str, Any]:
    """work(item) for each item: at once in team mode (each thread only waits on deployments, which the work
    pools and the `gpu` limit schedule), one after the other embedded (the steps run in this process). Results
    in the order of `items`; a failure is raised once every item has finished (the others' work is kept)."""
    if not team_mode(params) or len(items) < 2:
        return {item: work(item) for item in items}
    with ThreadPoolExecutor(len(items), thread_name_prefix="side-by-side") as pool:
        # each thread runs in a copy of this context: Prefect's flow-run context links the steps to the parent
        futures = {item: pool.submit(contextvars.copy_context().run, work, item) for item in items}
        return {item: future.result() for item, future in futures.items()}
