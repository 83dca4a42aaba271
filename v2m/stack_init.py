"""What the team stack's servers need once before workers use them, shared by `v2m stack up` (loopback) and
`v2m stack init` (infra/docker-compose.yml): MLflow users per host role, work pools, the `gpu` limit, the S3
block for results, and the automation that notices a lost host.

MLflow permissions: the basic-auth app's default permission is READ (the server's config), and the worker
roles cpu and gpu get EDIT on every experiment and registered model ("*" grants), which is what they had when
the default was EDIT. The `serve` role gets no grant: it reads models and their artifacts, and can change no
alias, version or run (MLflow floors every grant at the default, so a READ role needs a READ default).
Two more roles for `v2m serve` with serve.rollout (tasks/serving/access.py says why one process has one role):
`rollout` gets EDIT on the experiment voice2music-online alone (online.* and the shadow pairs), `rollback` that
plus EDIT on the registered models and the experiment voice2music-audit (auto_rollback: `v2m rollback`'s writes).
Both experiments are created here, by the admin, so that the grants have an experiment id to name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from v2m.errors import UserError

BUCKETS = ["v2m-mlflow", "v2m-dvc", "v2m-checkpoints", "v2m-results"]
RESULTS_BLOCK = "remote-file-system/v2m-results"  # Prefect results of every step, on S3
DEFAULT_PERMISSION = "READ"
WRITERS = ("cpu", "gpu")  # roles that log runs and register, tag and promote models
GRANTS = ("experiment", "registered_model")  # EDIT on every one of these, for each writer
ONLINE_EXPERIMENT, AUDIT_EXPERIMENT = "voice2music-online", "voice2music-audit"
REGISTERED_MODELS = ("voice2music-musicgen", "voice2music-audioldm")
# serve.rollout's roles: EDIT on exactly these (experiments by name, registered models by name). A rollback
# holds the registry lease first: its tickets are versions of `<model>.lease` (tasks/registry/lease.py).
ROLLOUT_ROLES = {"rollout": {"experiment": [ONLINE_EXPERIMENT]},
                 "rollback": {"experiment": [ONLINE_EXPERIMENT, AUDIT_EXPERIMENT],
                              "registered_model": [*REGISTERED_MODELS, *(f"{m}.lease" for m in REGISTERED_MODELS)]}}
WARM_COMMAND = "python -m v2m.warm run"  # a flow run's process: a fork of its host's zygote (v2m/warm.py)
QUIET = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}


def init_services(env: dict[str, str], s3_url: str, gpus: int, mlflow_passwords: dict[str, str],
                  lost_after_s: int = 0) -> None:
    """What the servers need once before workers use them (`v2m stack up`, or `v2m stack init` in
    infra/docker-compose.yml): one MLflow user per host role, the work pools with their templates, the `gpu`
    limit (one job per GPU, all GPU hosts together), the S3 block holding every step's result, and the
    automation that marks a lost host's flow runs Crashed. `env` points the Prefect CLI at the server."""
    import requests
    url, admin = env["MLFLOW_TRACKING_URI"], ("admin", mlflow_passwords["admin"])
    rollout_roles = [u for u in ROLLOUT_ROLES if u in mlflow_passwords]  # optional where deployed
    for user in (*WRITERS, "serve", *rollout_roles):
        r = requests.post(f"{url}/api/2.0/mlflow/users/create", timeout=30,
                          json={"username": user, "password": mlflow_passwords[user]}, auth=admin)
        if r.status_code != 200 and "already exists" not in r.text.lower():
            raise RuntimeError(f"creating MLflow user {user} failed: HTTP {r.status_code}")

    def grant(user: str, kind: str, resource: str) -> None:
        r = requests.post(f"{url}/api/3.0/mlflow/users/permissions/grant", timeout=30, auth=admin, json={
            "username": user, "resource_type": kind, "resource_id": resource, "permission": "EDIT"})
        if r.status_code != 200 and "already exists" not in r.text.lower():
            raise RuntimeError(f"granting MLflow user {user} EDIT on {kind} {resource} failed: HTTP {r.status_code}")

    for user in WRITERS:
        for kind in GRANTS:
            grant(user, kind, "*")
    experiments = {name: _experiment_id(url, admin, name) for name in (ONLINE_EXPERIMENT, AUDIT_EXPERIMENT)}
    for user in rollout_roles:
        for kind, names in ROLLOUT_ROLES[user].items():
            for name in names:
                grant(user, kind, experiments[name] if kind == "experiment" else name)
    # Prefect's part in one process of its own: importing Prefect fixes a process's settings, so the caller
    # (which may point its own settings at the stack later) never imports it; one process rather than one
    # CLI call per object saves about 7 s of CPU per stack (7 imports of Prefect).
    template = Path(__file__).resolve().parents[1] / "infra" / "work-pools" / "gpu-a40-process.json"
    args = {"gpu_template": json.loads(template.read_text()), "gpus": gpus, "s3_url": s3_url,
            "lost_after_s": lost_after_s or LOST_AFTER_S}
    res = subprocess.run([sys.executable, "-m", "v2m.stack_init", json.dumps(args)], env={**env, **QUIET},
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"setting up Prefect's work pools, gpu limit, results block and lost-run automation "
                           f"failed: {res.stdout[-500:]}{res.stderr[-1500:]}")


def cpu_job_template() -> dict:
    """The cpu pool's job template: Prefect's process template, started through v2m.warm like the gpu-a40
    pool's (infra/work-pools/gpu-a40-process.json). Imports Prefect: called in init_prefect's process."""
    from prefect.workers.process import ProcessWorker
    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = WARM_COMMAND
    return template


def _experiment_id(url: str, admin: tuple[str, str], name: str) -> str:
    """The id of experiment `name`, created (by the admin) when missing."""
    import requests
    r = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name}, auth=admin,
                     timeout=30)
    if r.status_code == 200:
        return r.json()["experiment"]["experiment_id"]
    r = requests.post(f"{url}/api/2.0/mlflow/experiments/create", json={"name": name}, auth=admin, timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"creating MLflow experiment {name} failed: HTTP {r.status_code}")
    return r.json()["experiment_id"]


def init_from_environment(gpus: int) -> None:
    """`v2m stack init` on a deployment whose servers run elsewhere (docker-compose): the buckets, then
    init_services, all from the environment (admin S3 keys and MLflow admin password, the roles' passwords)."""
    import boto3
    env = dict(os.environ)
    missing = [k for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_CPU_PASSWORD",
                           "MLFLOW_GPU_PASSWORD", "MLFLOW_SERVE_PASSWORD", "PREFECT_API_URL", "AWS_ENDPOINT_URL")
               if not env.get(k)]
    if missing:
        raise UserError(f"v2m stack init: set {', '.join(missing)} in the environment")
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in set(BUCKETS) - have:
        s3.create_bucket(Bucket=bucket)
    optional = {role: env[f"MLFLOW_{role.upper()}_PASSWORD"] for role in ROLLOUT_ROLES
                if env.get(f"MLFLOW_{role.upper()}_PASSWORD")}  # serve.rollout's roles, where used
    init_services(env, env["AWS_ENDPOINT_URL"], gpus, {"admin": env["MLFLOW_TRACKING_PASSWORD"],
                                                       "cpu": env["MLFLOW_CPU_PASSWORD"],
                                                       "gpu": env["MLFLOW_GPU_PASSWORD"],
                                                       "serve": env["MLFLOW_SERVE_PASSWORD"], **optional})


# A flow run whose host is lost stays Running forever unless something notices: its flow runs send a heartbeat
# every HEARTBEAT_S, and an automation (init_prefect) marks a run Crashed when they stop for LOST_AFTER_S
# (Prefect's documented zombie-run detection). The parent (flows.steps.run_step) then starts the step again.
HEARTBEAT_S, LOST_AFTER_S = 30, 75
WORKER_POLL_S = 1  # how often a worker asks for scheduled flow runs (a few workers: negligible load)


def init_prefect(args: dict) -> None:
    """Prefect's objects of the stack, in the process `python -m v2m.stack_init ARGS_JSON` (init_services):
    the work pools gpu-a40 and cpu (both start flow runs through v2m.warm), the `gpu` tag limit (one job per
    GPU, all GPU hosts together), the block that stores every step's result on S3 (the endpoint is not secret;
    the keys are not in the block: every host uses its own role's keys), and the automation for lost hosts."""
    import asyncio
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.exceptions import ObjectNotFound
    from prefect.filesystems import RemoteFileSystem

    async def pools_and_limit() -> None:
        async with get_client() as client:
            for name, template in (("gpu-a40", args["gpu_template"]), ("cpu", cpu_job_template())):
                await client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template),
                                              overwrite=True)
            try:
                await client.delete_concurrency_limit_by_tag("gpu")
            except ObjectNotFound:
                pass
            await client.create_concurrency_limit(tag="gpu", concurrency_limit=args["gpus"])
    asyncio.run(pools_and_limit())
    RemoteFileSystem(basepath="s3://v2m-results/prefect",
                     settings={"client_kwargs": {"endpoint_url": args["s3_url"]}}).save("v2m-results", overwrite=True)
    try:
        Automation.read(name="v2m-lost-flow-runs").delete()
    except ValueError:  # none yet
        pass
    Automation(name="v2m-lost-flow-runs", trigger=EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
        within=timedelta(seconds=args["lost_after_s"])),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat: its host or worker was lost")],
    ).create()


if __name__ == "__main__":
    init_prefect(json.loads(sys.argv[1]))
