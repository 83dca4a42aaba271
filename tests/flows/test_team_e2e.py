"""Done-when of team mode: two "machines" that share nothing but the services.

A loopback stack (SeaweedFS, MLflow with basic auth, Prefect with an auth string), a `cpu` worker in one empty
folder and a `gpu-a40` worker in another. The code comes from a bare git repository (each host's checkout of the
commit, v2m/checkout.py), the raw data from the DVC S3 remote (data/raw.dvc committed by the data owner),
prepared data from the remote at the version the parent passes, models through MLflow, results through S3.
`retrain` runs in team mode; during a fine-tune the gpu-a40 worker is killed (a lost machine), a new one starts
in a third empty folder, and the fine-tune resumes there from its S3 checkpoint. The run ends with a champion
and a report for both backends, the finished run's S3 checkpoints pruned to the retention rule, and a
timeline of its steps.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from flows.timeline import PHASES, format_timeline, timeline
from tests.flows.team_project import TEAM, publish_project, s3_keys
from v2m.config import load_params


def test_retrain_across_two_hosts_sharing_only_the_services_survives_a_lost_gpu_host(team_servers, tmp_path,
                                                                                   monkeypatch) -> None:
    st = team_servers(gpus=1, lost_after_s=50)  # the lost host's run is Crashed 20-50 s after the kill
    for k, v in st.client_env("cpu").items():
        monkeypatch.setenv(k, v)
    owner, bare = publish_project(st, tmp_path)
    from flows.deploy import deploy_all
    deploy_all(load_params(owner / "params.yaml"), owner, st.client_env("cpu"))
    hosts = {name: tmp_path / name for name in ("cpu-host", "gpu-host-1", "gpu-host-2")}
    st.worker("cpu", hosts["cpu-host"])
    gpu_worker = st.worker("gpu-a40", hosts["gpu-host-1"])
    assert not any(hosts["gpu-host-1"].glob("*.py")) and not (hosts["gpu-host-1"] / "params.yaml").exists()

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import (PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK,
                                  temporary_settings)
    env = st.client_env("cpu")
    settings = {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"],
                PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"]}
    with temporary_settings(updates=settings):
        started = time.monotonic()
        parent = run_deployment("retrain/retrain-manual", timeout=0)

        # Lose the GPU host once MusicGen's fine-tune has put a checkpoint on S3 (and before it ends).
        deadline = time.monotonic() + 900
        while not any(k.endswith("/latest") for k in s3_keys(st, "v2m-checkpoints")):
            assert time.monotonic() < deadline, "no checkpoint reached S3"
            time.sleep(0.5)
        st.stop(gpu_worker, kill=True)
        killed_at = max(int(k.split("ckpt-")[1].split("/")[0]) for k in s3_keys(st, "v2m-checkpoints")
                        if "ckpt-" in k)
        st.worker("gpu-a40", hosts["gpu-host-2"])

        async def final(run_id):
            async with get_client() as client:
                while not (run := await client.read_flow_run(run_id)).state.is_final():
                    await asyncio.sleep(3)
                return run

        done = asyncio.run(asyncio.wait_for(final(parent.id), 1800))
        wall = time.monotonic() - started
        logs = {p.name: p.read_text()[-2500:] for p in (st.state_dir / "logs").glob("worker-*.log")}
        assert done.state.is_completed(), (done.state, logs)
        out = done.state.result()

        async def finetunes():
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
            async with get_client() as client:
                return await client.read_flow_runs(deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=["finetune"])))
        runs = asyncio.run(finetunes())
        resumed = [res for r in runs if r.state.is_completed()
                   if Path((res := r.state.result())["run_dir"]).name.startswith("musicgen-")]
        steps = timeline(parent.id)
        print("\n" + format_timeline(steps))

    for backend in ("musicgen", "audioldm"):
        entry = out["backends"][backend]
        assert entry["champion"], (backend, entry)
        assert entry.get("report"), (backend, entry)
    # The lost host's fine-tune crashed; it ran again on the second GPU host from the S3 checkpoint.
    assert sum(r.state.is_crashed() for r in runs if r.parameters["backend"] == "musicgen") == 1, \
        [(r.parameters, r.state) for r in runs]
    assert len(resumed) == 1 and 0 < resumed[0]["resumed_from"] <= killed_at, resumed
    assert resumed[0]["data_bytes_pulled"] > 0  # its model inputs came from the DVC remote
    assert killed_at < TEAM["train"]["musicgen"]["max_steps"]
    # The finished run's checkpoints follow train.retention (keep_last 2): the final one and the two before it.
    final, every = TEAM["train"]["musicgen"]["max_steps"], TEAM["train"]["musicgen"]["checkpoint_every"]
    kept = {k.split("/")[-2] for k in s3_keys(st, "v2m-checkpoints") if "/ckpt-" in k}
    assert kept == {f"ckpt-{final - i * every:08d}" for i in range(3)}, kept
    # The timeline accounts for every step: each one's phases add up to its time from scheduled to done.
    assert {s["deployment"] for s in steps["steps"]} >= {"prepare-data", "finetune", "evaluate", "promote"}
    for step in steps["steps"]:
        assert abs(sum(step[p] for p in PHASES) - step["total"]) < 1.0, step
        assert step["checkout"] > 0 and step["work"] > 0, step
        assert sum(step["tasks"].values()) <= step["total"] + 1.0, step  # task runs happen inside the step
    # Its work by task: prepare-data's time goes to the DVC pipeline and the push of the version.
    prep = next(s for s in steps["steps"] if s["deployment"] == "prepare-data")
    assert prep["tasks"].get("dvc-repro", 0) > 0 and prep["tasks"].get("publish", 0) > 0, prep["tasks"]
    sizes = {b: sum(s3_keys(st, b).values()) for b in ("v2m-dvc", "v2m-mlflow", "v2m-checkpoints", "v2m-results")}
    print(f"\nteam retrain wall time {wall:.0f} s; bytes on S3 per bucket: {sizes}")
