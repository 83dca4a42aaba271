"""Several CPU hosts that share nothing but the services (a loopback team stack: SeaweedFS, MLflow and Prefect
with credentials). Each host is a `cpu` worker in its own empty folder; flow runs check the code out of a bare
git repository. State that a step keeps for the next one must live in the services, not in a host's folder:

- data-watch remembers the raw data it saw in a Prefect Variable: run again on another host, it knows it;
- two hosts promoting the same version at once end with one champion, one registered version and one audit
  entry per decision: the registry lease (tasks/registry/lease.py) serialises them, where a file lock in each
  host's checkout could not.
"""

from __future__ import annotations

import asyncio
import time
import mlflow
import pytest

from tests.code.test_registry import Echo, fake_evaluation, write_test_manifest
from tests.flows.conftest import stack_settings, stop_stack, worker_log
from tests.flows.team_project import publish_project
from v2m.config import load_params


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The stack's servers, the team's repository (with a test manifest for the promotion gates committed
    under data/segments) and its deployments; retrain runs go to a pool no worker serves (they are not the
    subject here: data-watch's decision to start one is)."""
    from flows.deploy import deploy_all
    from v2m.stack import Stack
    work = tmp_path_factory.mktemp("hosts")
    manifest_dir = tmp_path_factory.mktemp("manifest")
    write_test_manifest(manifest_dir)
    st = Stack(work / "stack")
    st.up(servers_only=True, gpus=1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in st.client_env("cpu").items():
                mp.setenv(k, v)
            files = {"data/segments/musicgen.jsonl": (manifest_dir / "data/segments/musicgen.jsonl").read_text()}
            owner, _ = publish_project(st, work, files=files)
            deploy_all(load_params(owner / "params.yaml"), owner, st.client_env("cpu"))
            with stack_settings(st):
                asyncio.run(_park_retrains())
            yield st, owner, work
    finally:
        stop_stack(st)


async def _park_retrains() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name="parked", type="process"))
        deployment = await client.read_deployment_by_name("retrain/retrain-manual")
        await client.update_deployment(deployment.id, DeploymentUpdate(work_pool_name="parked"))
        for queue in ("host-c", "host-d"):
            await client.create_work_queue(queue, work_pool_name="cpu")


async def _flow_runs(deployment: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    async with get_client() as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


def test_data_watch_on_another_host_sees_what_the_previous_run_saw(team, monkeypatch) -> None:
    st, owner, work = team
    for k, v in st.client_env("cpu").items():
        monkeypatch.setenv(k, v)
    from prefect.deployments import run_deployment
    from prefect.variables import Variable
    with stack_settings(st):
        host_a = st.worker("cpu", work / "cpu-host-a")
        first = run_deployment("data-watch/data-watch", timeout=900)
        assert first.state.is_completed(), (first.state, worker_log(st, host_a))
        st.stop(host_a)
        host_b = st.worker("cpu", work / "cpu-host-b")  # another machine: an empty folder, a fresh checkout
        second = run_deployment("data-watch/data-watch", timeout=900)
        assert second.state.is_completed(), (second.state, worker_log(st, host_b))
        st.stop(host_b)
        seen, again = first.state.result(), second.state.result()
        retrains = asyncio.run(_flow_runs("retrain-manual"))
        from flows.data_watch import seen_variable
        stored = Variable.get(seen_variable(load_params(owner / "params.yaml")))
    assert seen["changed"] and not again["changed"], (seen, again)
    assert again["fingerprint"] == seen["fingerprint"] == stored["fingerprint"]
    assert [str(r.id) for r in retrains] == [seen["started"]]  # one retrain, started by the first run only


def test_two_cpu_hosts_racing_one_promotion_end_with_one_champion_and_one_audit_entry(team, monkeypatch) -> None:
    st, owner, work = team
    for k, v in st.client_env("cpu").items():
        monkeypatch.setenv(k, v)
    from mlflow.tracking import MlflowClient
    from prefect.deployments import run_deployment

    from tasks.registry.promotion import promote
    from tasks.registry.registry import CHAMPION, alias_version, audit_history, model_name, register
    from v2m.tracking import EXPERIMENTS, experiment_id, setup_mlflow
    params = load_params(owner / "params.yaml")
    setup_mlflow(params, owner)

    def finished_run(**evaluation) -> tuple[str, str]:
        """A 'fine-tune' run with a logged model and its evaluation on the committed test manifest."""
        with mlflow.start_run(experiment_id=experiment_id(EXPERIMENTS["musicgen"], params, owner)) as run:
            mlflow.set_tags({"backend": "musicgen", "stage": "voice", "preset": "tiny", "data_version": "dv1"})
            mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
        return run.info.run_id, fake_evaluation(params, owner, **evaluation)

    first_run, first_eval = finished_run(fad_shift=0.3)
    v1 = register(first_run, "musicgen", first_eval)
    assert promote(params, owner, "musicgen", v1).promoted
    run_id, eval_run_id = finished_run(fad_shift=0.1, seed=1)  # better: it passes every gate

    with stack_settings(st):
        hosts = [st.worker("cpu", work / f"cpu-{q}", queue=q) for q in ("host-c", "host-d")]
        asyncio.run(_wait_online(hosts))
        runs = [run_deployment("promote/promote", timeout=0, work_queue_name=q, parameters={
            "backend": "musicgen", "run_id": run_id, "eval_run_id": eval_run_id}) for q in ("host-c", "host-d")]
        done = asyncio.run(_wait_final([r.id for r in runs], 900))
        assert all(d.state.is_completed() for d in done), ([d.state for d in done], [worker_log(st, h) for h in hosts])
        decisions = [d.state.result() for d in done]
        print("\nthe two hosts' decisions:", [(d["promoted"], d["reason"]) for d in decisions],
              "started", [d.start_time.isoformat() for d in done], "ended", [d.end_time.isoformat() for d in done])
        for host in hosts:
            st.stop(host)

    versions = MlflowClient().search_model_versions(f"name = '{model_name('musicgen')}' and run_id = '{run_id}'")
    assert len(versions) == 1, "both hosts registered the run"  # register is under the lease too
    v2 = str(versions[0].version)
    assert {d["version"] for d in decisions} == {v2}
    assert [d["promoted"] for d in decisions].count(True) == 1, decisions
    loser = next(d for d in decisions if not d["promoted"])
    assert "already champion" in loser["reason"] or "decided before" in loser["reason"], loser
    assert alias_version("musicgen", CHAMPION) == v2
    history = [(e["action"], e["version"], e["champion_before"], e["champion_after"])
               for e in audit_history(params, owner, "musicgen")]
    assert history == [("promote", v1, "None", v1), ("promote", v2, v1, v2)], history


async def _wait_online(workers: list[str], timeout_s: float = 120) -> None:
    """Until every named worker has said it is polling (the race starts on two ready hosts)."""
    from prefect.client.orchestration import get_client
    deadline = time.monotonic() + timeout_s
    async with get_client() as client:
        while {w.name for w in await client.read_workers_for_work_pool("cpu") if w.status == "ONLINE"} < set(workers):
            assert time.monotonic() < deadline, "the workers did not come online"
            await asyncio.sleep(1)


async def _wait_final(ids: list, timeout_s: float) -> list:
    from prefect.client.orchestration import get_client
    deadline = time.monotonic() + timeout_s
    async with get_client() as client:
        while True:
            runs = [await client.read_flow_run(i) for i in ids]
            if all(r.state.is_final() for r in runs):
                return runs
            assert time.monotonic() < deadline, [r.state for r in runs]
            await asyncio.sleep(2)

