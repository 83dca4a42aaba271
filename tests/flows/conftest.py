"""Flow tests reuse the model tests' prepared project (data, segments and model-input caches), and run
flows against Prefect's temporary server."""

import os
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from tests.model.conftest import OVERRIDES, merge, prepared_root, root  # noqa: F401  (pytest fixtures)

SMALL = merge(OVERRIDES, {"train": {b: {"max_steps": 4, "checkpoint_every": 2, "val_every": 2, "samples": 1}
                                    for b in ("musicgen", "audioldm")}})


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("prefect-storage"))
    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_small_params(project: Path, extra: dict | None = None) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(merge(merge(raw, SMALL), extra or {})))


@pytest.fixture
def small_project(project: Path, monkeypatch) -> Path:
    write_small_params(project)
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return project


def stop_stack(st) -> dict:
    """Stop a team stack after sending this process's queued Prefect events and logs while its server is still
    up. Prefect keeps an events worker per API URL for the whole process and prefect_test_harness drains them
    all when it exits: one still aimed at a stopped stack retried for ~70 s (test_week_two's teardown)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    for service in (EventsWorker, APILogWorker):
        service.drain_all(timeout=30)
    return st.down()


def stack_settings(st):
    """Prefect settings of this process pointed at a team stack (Prefect reads its settings at import, so the
    environment alone is not enough): the API, its auth string and the S3 block holding step results."""
    from prefect.settings import (PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK,
                                  temporary_settings)
    env = st.client_env("cpu")
    return temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"],
                                       PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"],
                                       PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"]})


def worker_log(st, name: str, chars: int = 3000) -> str:
    """The end of a stack worker's log (what its flow runs printed), for an assertion's message."""
    path = st.state_dir / "logs" / f"{name}.log"
    return path.read_text(errors="replace")[-chars:] if path.is_file() else f"(no log at {path})"


@pytest.fixture
def team_servers(tmp_path):
    """`team_servers(gpus, **stack)` starts the team stack's servers alone (workers are the test's own); stops
    them. `stack`: fields of v2m.stack.Stack (lost_after_s)."""
    from v2m.stack import Stack
    started = []

    def up(gpus: int, **stack) -> Stack:
        st = Stack(tmp_path / "stack", **stack)
        started.append(st)
        st.up(servers_only=True, gpus=gpus)
        return st
    yield up
    for st in started:
        stop_stack(st)
