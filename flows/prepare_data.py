"""Flow `prepare-data`: version the raw data, run the DVC pipeline, record the data version.

    dvc add data/raw  ->  dvc repro (validate -> normalize -> label -> split -> segment)
        ->  data version + dataset statistics  ->  [dvc push]

Returns the data version (dvc hashes + git revision + stats); training runs log it as their lineage.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.handoff import publish, pull_raw, workspace_lock
from tasks.orchestration import project_params, team_mode
from tasks.data.versioning import (data_version_task, dataset_stats_task, push_task, record_version,
                                   reproduce_task, track_raw_task)


@flow(name="prepare-data")
def prepare_data(project_dir: str = ".", push: bool = False) -> dict[str, Any]:
    root, params = project_params(project_dir)  # team mode: DVC's stage commands import this checkout's code
    log = get_run_logger()
    team = team_mode(params)
    # Team mode: this host's checkout is shared by the flow runs of this commit (v2m/checkout.py)
    with workspace_lock(root) if team else nullcontext():
        if team:  # another host: the raw data comes from the DVC remote at the revision this checkout names
            started = time.perf_counter()
            files = pull_raw(root, params)
            log.info("data checkout: raw data, %d files pulled from the DVC remote in %.1f s", files,
                     time.perf_counter() - started)
        raw_changed = track_raw_task(root, params.data.raw_dir)
        ran = reproduce_task(root)
        version = data_version_task(root)
        version["stats"] = dataset_stats_task(root)
        version["stages_run"] = ran
        version["raw_changed"] = raw_changed
        if push and not team:
            version["pushed_files"] = push_task(root, params.dvc)
        path = record_version(root, version)
        if team:  # every output to the remote, and the files naming this version, for the steps on other hosts
            version.update(publish(root, params, version["data_version"]))

    log.info("data version %s (git %s); stages run: %s", version["data_version"],
             version["git_revision"], ", ".join(ran) or "none")
    create_markdown_artifact(
        key="data-version",
        markdown=f"# Data version `{version['data_version']}`\n\ngit `{version['git_revision']}`, "
                 f"stages run: {', '.join(ran) or 'none'}\n\n```json\n{version['stats']}\n```\n"
                 f"\nRecorded in `{path}`.",
        description="DVC data version of this prepare-data run")
    return version
