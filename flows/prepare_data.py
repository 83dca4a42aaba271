"""Flow `prepare-data`: version the raw data, run the DVC pipeline, record the data version.

    dvc add data/raw (stems) | data/mixes (songs: params data.mixes)
        ->  [songs: the `separate` stage, on the GPU pool in team mode]
        ->  dvc repro (validate -> normalize -> label -> split -> segment -> caches)
        ->  data version + dataset statistics  ->  [dvc push]

Returns the data version (dvc hashes + git revision + stats); training runs log it as their lineage.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.handoff import publish, pull_raw, workspace_lock
from tasks.orchestration import gpu_slot, project_params, team_mode
from tasks.data.versioning import (adopt_stages, check_source, data_version_task, dataset_stats_task, push_task,
                                   record_version, reproduce, reproduce_task, stage_locks, track_raw_task)
from v2m.config import Params

SEPARATE = "separate"
publish_task = task(publish, name="publish")  # its own task run: its time shows in flows/timeline.py


@task(name="separate")
def separate_task(root: Path) -> list[str]:
    """`dvc repro separate` (a no-op for songs separated before: per-track cache). The learned separator
    holds a GPU of this host while it runs."""
    with gpu_slot():
        return reproduce(root, [SEPARATE])


def separate_step(root: Path, params: Params) -> list[str]:
    """Embedded: here. Team: the `separate` deployment on the GPU pool separates and pushes data/raw; this host
    adopts its dvc.lock entry and pulls the stems, so `dvc repro` then finds the stage done."""
    if not team_mode(params):
        return _separate(root, params)
    from flows.steps import run_step
    from tasks.handoff import _remote  # the team's S3 remote, its endpoint from the environment
    done = run_step(params, SEPARATE, separate_flow, project_dir=str(root))
    adopt_stages(root, _remote(params)[0], done["lock"])
    return done["stages_run"]


@flow(name="separate", persist_result=True)
def separate_flow(project_dir: str = ".") -> dict[str, Any]:
    """The separate stage as a step of its own (a deployment on the gpu-a40 pool). In team mode it pulls the
    songs at its clone's revision (data/mixes.dvc), and pushes the separated data/raw to the DVC remote;
    returns the stage's dvc.lock entries for prepare-data to adopt."""
    from tasks.handoff import _remote  # the team's S3 remote, its endpoint from the environment
    root, params = project_params(project_dir)
    team = team_mode(params)
    # No workspace_lock here: prepare-data holds it while it waits for this step, maybe in this same checkout.
    if team:
        pull_raw(root, params)
    ran = _separate(root, params)
    if team:
        get_run_logger().info("separate: pushed %s file(s)", push_task(root, _remote(params)[0]))
    return {"stages_run": ran, "lock": stage_locks(root, SEPARATE)}


def _separate(root: Path, params: Params) -> list[str]:
    """The learned separator's task carries the `gpu` tag (its concurrency limit is the number of GPUs)."""
    return (separate_task.with_options(tags=["gpu"]) if params.separate.method == "demucs" else separate_task)(root)


@flow(name="prepare-data")
def prepare_data(project_dir: str = ".", push: bool = False) -> dict[str, Any]:
    root, params = project_params(project_dir)  # team mode: DVC's stage commands import this checkout's code
    log = get_run_logger()
    team = team_mode(params)
    check_source(root, params.data)
    # Team mode: this host's checkout is shared by the flow runs of this commit (v2m/checkout.py)
    with workspace_lock(root) if team else nullcontext():
        if team:  # another host: the raw data comes from the DVC remote at the revision this checkout names
            started = time.perf_counter()
            files = pull_raw(root, params)
            log.info("data checkout: %s, %d files pulled from the DVC remote in %.1f s", params.data.input_dir,
                     files, time.perf_counter() - started)
        raw_changed = track_raw_task(root, params.data.input_dir)
        ran = separate_step(root, params) if params.data.mixes else []
        ran += reproduce_task(root)
        version = data_version_task(root)
        version["stats"] = dataset_stats_task(root)
        version["stages_run"] = ran
        version["raw_changed"] = raw_changed
        if push and not team:
            version["pushed_files"] = push_task(root, params.dvc)
        path = record_version(root, version)
        if team:  # every output to the remote, and the files naming this version, for the steps on other hosts
            version.update(publish_task(root, params, version["data_version"]))

    log.info("data version %s (git %s); stages run: %s", version["data_version"],
             version["git_revision"], ", ".join(ran) or "none")
    create_markdown_artifact(
        key="data-version",
        markdown=f"# Data version `{version['data_version']}`\n\ngit `{version['git_revision']}`, "
                 f"stages run: {', '.join(ran) or 'none'}\n\n```json\n{version['stats']}\n```\n"
                 f"\nRecorded in `{path}`.",
        description="DVC data version of this prepare-data run")
    return version
