"""Several CPU hosts that share nothing but the services (a loopback team stack: SeaweedFS, MLflow and Prefect
with credentials). Each host is a `cpu` worker in its own empty folder; flow runs check the code out of a bare
git repository. State that a step keeps for the next one must live in the services, not in a host's folder:

- data-watch remembers the raw data it saw in a Prefect Variable: run again on another host, it knows it;
- two hosts promoting the same version at once end with one champion, one registered version and one audit
  entry per decision: the registry lease (tasks/registry/lease.py) serialises them, where a file lock in each
  host's checkout could not;
- the votes of a listening test served on one host decide a promotion on another: they live in the stack's
  PostgreSQL (tasks/listening/store.py), not in the listening host's folder.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.code.test_registry import Echo, fake_evaluation, write_test_manifest
from tests.flows.conftest import stack_settings, stop_stack, worker_log
from tests.flows.team_listening import invitations, log_eval_audio, start_listen, vote_by_ear
from tests.flows.team_project import git, publish_project, push_params
from tests.model.conftest import merge
from v2m.config import load_params
from v2m.config_listening import DB_URL_ENV
from v2m.tracking import EXPERIMENTS, experiment_id, setup_mlflow


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
            manifest = (manifest_dir / "data/segments/musicgen.jsonl").read_text()
            files = {f"data/segments/{b}.jsonl": manifest for b in ("musicgen", "audioldm")}
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
        for queue in ("host-c", "host-d", "votes-b"):
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
    params = load_params(owner / "params.yaml")
    setup_mlflow(params, owner)

    first_run, first_eval = finished_run(params, owner, fad_shift=0.3)
    v1 = register(first_run, "musicgen", first_eval)
    assert promote(params, owner, "musicgen", v1).promoted
    run_id, eval_run_id = finished_run(params, owner, fad_shift=0.1, seed=1)  # better: it passes every gate

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


def finished_run(params, owner: Path, backend: str = "musicgen", **evaluation) -> tuple[str, str]:
    """A 'fine-tune' run with a logged model and its evaluation on the committed test manifest."""
    with mlflow.start_run(experiment_id=experiment_id(EXPERIMENTS[backend], params, owner)) as run:
        mlflow.set_tags({"backend": backend, "stage" if backend == "musicgen" else "variant": "voice",
                         "preset": "tiny", "data_version": "dv1"})
        mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
    return run.info.run_id, fake_evaluation(params, owner, backend=backend, **evaluation)


def test_votes_cast_on_one_host_decide_a_promotion_on_another(team, monkeypatch, tmp_path) -> None:
    """The team turns the human_preference gate on (a commit). Host A runs `v2m listen` in its own clone; host B,
    a cpu worker in another empty folder, runs the promotion: it waits while nobody has voted, and once three
    invited listeners have voted through host A's HTTP API for the challenger, the champion moves. AudioLDM's
    registry, so the musicgen race above keeps its own audit trail."""
    st, owner, work = team
    env = st.client_env("cpu")
    assert env[DB_URL_ENV].startswith("postgresql://listening@") and DB_URL_ENV not in st.client_env("gpu")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from prefect.deployments import run_deployment

    from tasks.listening.store import VoteStore
    from tasks.registry.promotion import promote
    from tasks.registry.registry import CHAMPION, alias_version, register
    before = (owner / "params.yaml").read_text()
    gated = merge(yaml.safe_load(before), {"listening": {"max_chunks": 3}, "promotion": {
        "human_preference": {"required": True, "min_votes": 6, "min_listeners": 3}}})
    push_params(owner, work / "voice2music.git", yaml.safe_dump(gated, sort_keys=False), "listeners decide")
    host_a, host_b = work / "listen-host-a", work / "votes-host-b"
    try:
        params = load_params(owner / "params.yaml")
        setup_mlflow(params, owner)
        runs = {hz: finished_run(params, owner, "audioldm", fad_shift=shift, seed=hz)
                for hz, shift in ((220, 0.3), (660, 0.1))}  # the challenger: better by every metric, and higher
        for hz, (_, eval_run_id) in runs.items():
            log_eval_audio(params, owner, "audioldm", eval_run_id, hz, tmp_path)
        v1 = register(runs[220][0], "audioldm", runs[220][1])
        assert promote(params, owner, "audioldm", v1).promoted  # the first champion: nobody to compare with
        v2 = register(runs[660][0], "audioldm", runs[660][1])
        git(work, "clone", "-q", str(work / "voice2music.git"), str(host_a))
        listen = start_listen(st, host_a, "audioldm", ["ann", "bob", "cy"], tmp_path / "listen.log")
        with stack_settings(st):
            worker = st.worker("cpu", host_b, queue="votes-b")

            def promote_on_host_b() -> dict:
                run = run_deployment("promote/promote", timeout=600, work_queue_name="votes-b", parameters={
                    "backend": "audioldm", "run_id": runs[660][0], "eval_run_id": runs[660][1]})
                assert run.state.is_completed(), (run.state, worker_log(st, worker))
                return run.state.result()

            unheard = promote_on_host_b()
            links = invitations(listen, tmp_path / "listen.log")
            ballots = [vote_by_ear(url, token) for url, token in links.values()]
            heard = promote_on_host_b()
            st.stop(worker)
    finally:
        if "listen" in locals():
            listen.terminate()
            listen.wait(30)
        push_params(owner, work / "voice2music.git", before, "human_preference off again")

    def gate(decision: dict) -> dict:
        return next(g for g in decision["gates"] if g["name"] == "human_preference")
    assert not unheard["promoted"] and gate(unheard)["status"] == "waiting", unheard
    assert "0 of 6 votes from 0 of 3 listeners" in gate(unheard)["reason"]
    assert sorted(links) == ["ann", "bob", "cy"] and [len(b) for b in ballots] == [3, 3, 3]
    assert heard["promoted"] and gate(heard)["status"] == "pass" and gate(heard)["n"] == 9, heard
    assert alias_version("audioldm", CHAMPION) == v2
    votes = VoteStore(env[DB_URL_ENV]).votes("audioldm")  # in the stack's database, chosen by ear
    assert {v["listener"] for v in votes} == {"ann", "bob", "cy"}
    assert {v["winner"] for v in votes} == {f"voice2music-audioldm/{v2}"}
    assert [p for host in (host_a, host_b) for p in host.rglob("listening.db")] == []  # on neither host's disk


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

