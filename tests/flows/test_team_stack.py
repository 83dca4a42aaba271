"""Team mode on loopback: `v2m stack up` with its two workers (each in its own folder), a deployment run
through the real Prefect server, tracked in the real MLflow server (basic auth) whose artifacts land in
SeaweedFS; the step's result comes back through S3; then a clean shutdown."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.steps import finetune_flow
from v2m.s3server import SeaweedS3
from tests.flows.conftest import stop_stack
from v2m.stack import Stack

REPO = Path(__file__).resolve().parents[2]


def listening(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


@pytest.fixture
def stack(tmp_path: Path):
    st = Stack(tmp_path / "stack")
    state = st.up()
    yield st, state
    stop_stack(st)


def test_a_deployment_runs_on_the_gpu_pool_worker_with_runs_in_mlflow_and_artifacts_in_s3(
        stack, root: Path, monkeypatch) -> None:
    st, state = stack
    assert all(st.health().values()) and "postgres" in st.health(), st.health()
    for url in (state["s3_url"], state["mlflow_url"], state["prefect_url"]):
        assert url.startswith("http://127.0.0.1:")
    votes_url = "http://" + state["listening_db_url"].split("@", 1)[1].split("/")[0]  # PostgreSQL's host:port
    assert state["listening_db_url"].startswith("postgresql://listening@127.0.0.1:")
    for k, v in st.client_env().items():
        monkeypatch.setenv(k, v)

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    with temporary_settings(updates={PREFECT_API_URL: state["prefect_url"] + "/api"}):  # settings load at import
        finetune_flow.from_source(source=str(REPO), entrypoint="flows/steps.py:finetune_flow").deploy(
            name="finetune", work_pool_name="gpu-a40", job_variables={"device": "cpu"})
        run = run_deployment("finetune/finetune", timeout=600, parameters={
            "backend": "musicgen", "mode": "voice", "project_dir": str(root), "max_steps": 2})
    log = st.state_dir / "logs" / "worker-gpu-a40-gpu-a40.log"
    assert run.state.is_completed(), (run.state, log.read_text()[-3000:])

    client = MlflowClient(state["mlflow_url"])
    exp = client.get_experiment_by_name("voice2music-musicgen")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'voice'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert any(a.path == "samples" for a in client.list_artifacts(runs[0].info.run_id))
    admin = st.credentials()["s3"]["admin"]
    s3 = SeaweedS3(st.state_dir / "unused", access_key=admin["access_key"], secret_key=admin["secret_key"],
                   s3_port=int(state["s3_url"].rsplit(":", 1)[1]))
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="v2m-mlflow").get("Contents", [])]
    assert any(k.endswith("_generated.wav") for k in keys) and any(k.endswith(".safetensors") for k in keys)
    results = [o["Key"] for o in s3.client().list_objects_v2(Bucket="v2m-results").get("Contents", [])]
    assert results, "the step's result did not go to S3"
    # No credential leaks into what MLflow shows.
    creds = st.credentials()
    secrets = [creds["prefect_auth"], creds["listening_db"], *creds["mlflow"].values(),
               *(k["secret_key"] for k in creds["s3"].values())]
    shown = str(runs[0].data.params) + str(runs[0].data.tags)
    assert not any(secret in shown for secret in secrets)

    stopped = stop_stack(st)
    assert {"seaweedfs", "mlflow", "prefect", "postgres", "worker-cpu-cpu", "worker-gpu-a40-gpu-a40"} <= set(stopped)
    assert not any(listening(u) for u in (state["s3_url"], state["mlflow_url"], state["prefect_url"], votes_url))
