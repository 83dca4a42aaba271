"""What the team stack's servers need once before workers use them, shared by `v2m stack up` (loopback) and
`v2m stack init` (infra/docker-compose.yml): MLflow users per host role, work pools, the `gpu` limit, the S3
block for results, and the automation that notices a lost host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from v2m.errors import UserError

BUCKETS = ["v2m-mlflow", "v2m-dvc", "v2m-checkpoints", "v2m-results"]
RESULTS_BLOCK = "remote-file-system/v2m-results"  # Prefect results of every step, on S3
WARM_COMMAND = "python -m v2m.warm run"  # a flow run's process: a fork of its host's zygote (v2m/warm.py)
QUIET = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}


def init_services(env: dict[str, str], s3_url: str, gpus: int, mlflow_passwords: dict[str, str]) -> None:
    """What the servers need once before workers use them (`v2m stack up`, or `v2m stack init` in
    infra/docker-compose.yml): one MLflow user per host role, the work pools with their templates, the `gpu`
    limit (one job per GPU, all GPU hosts together), the S3 block holding every step's result, and the
    automation that marks a lost host's flow runs Crashed. `env` points the Prefect CLI at the server."""
    import requests
    url = env["MLFLOW_TRACKING_URI"]
    for user in ("cpu", "gpu"):  # the default permission, EDIT, lets each read and write every experiment
        r = requests.post(f"{url}/api/2.0/mlflow/users/create", timeout=30,
                          json={"username": user, "password": mlflow_passwords[user]},
                          auth=("admin", mlflow_passwords["admin"]))
        if r.status_code != 200 and "already exists" not in r.text.lower():
            raise RuntimeError(f"creating MLflow user {user} failed: HTTP {r.status_code}")
    prefect, env = str(Path(sys.executable).parent / "prefect"), {**env, **QUIET}
    template = Path(__file__).resolve().parents[1] / "infra" / "work-pools" / "gpu-a40-process.json"
    cpu_template = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    with cpu_template:
        json.dump(cpu_job_template(prefect, env), cpu_template)
    for cmd in ([prefect, "work-pool", "create", "gpu-a40", "--type", "process", "--base-job-template",
                 str(template), "--overwrite"],
                [prefect, "work-pool", "create", "cpu", "--type", "process", "--base-job-template",
                 cpu_template.name, "--overwrite"],
                [prefect, "concurrency-limit", "delete", "gpu"],
                [prefect, "concurrency-limit", "create", "gpu", str(gpus)],
                [sys.executable, "-c", RESULTS_BLOCK_SCRIPT, s3_url],
                [sys.executable, "-c", LOST_RUNS_SCRIPT, str(LOST_AFTER_S)]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0 and "delete" not in cmd and "already exists" not in res.stdout + res.stderr:
            raise RuntimeError(f"{' '.join(cmd[1:4])} failed: {res.stdout[-500:]}{res.stderr[-500:]}")
    os.unlink(cpu_template.name)


def cpu_job_template(prefect: str, env: dict[str, str]) -> dict:
    """The cpu pool's job template: Prefect's process template, started through v2m.warm like the gpu-a40
    pool's (infra/work-pools/gpu-a40-process.json). Read through the CLI: importing Prefect here would fix this
    process's Prefect settings before the caller points them at the stack."""
    res = subprocess.run([prefect, "work-pool", "get-default-base-job-template", "--type", "process"], env=env,
                         capture_output=True, text=True, check=True)
    template = json.loads(res.stdout)
    template["variables"]["properties"]["command"]["default"] = WARM_COMMAND
    return template


def init_from_environment(gpus: int) -> None:
    """`v2m stack init` on a deployment whose servers run elsewhere (docker-compose): the buckets, then
    init_services, all from the environment (admin S3 keys and MLflow admin password, the roles' passwords)."""
    import boto3
    env = dict(os.environ)
    missing = [k for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_CPU_PASSWORD",
                           "MLFLOW_GPU_PASSWORD", "PREFECT_API_URL", "AWS_ENDPOINT_URL") if not env.get(k)]
    if missing:
        raise UserError(f"v2m stack init: set {', '.join(missing)} in the environment")
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in set(BUCKETS) - have:
        s3.create_bucket(Bucket=bucket)
    init_services(env, env["AWS_ENDPOINT_URL"], gpus, {"admin": env["MLFLOW_TRACKING_PASSWORD"],
                                                       "cpu": env["MLFLOW_CPU_PASSWORD"],
                                                       "gpu": env["MLFLOW_GPU_PASSWORD"]})


# Creates the Prefect block that stores results on S3. The endpoint is not secret; the keys are not in the
# block: every host reads and writes with its own role's keys from its environment.
RESULTS_BLOCK_SCRIPT = """
import sys
from prefect.filesystems import RemoteFileSystem
RemoteFileSystem(basepath="s3://v2m-results/prefect",
                 settings={"client_kwargs": {"endpoint_url": sys.argv[1]}}).save("v2m-results", overwrite=True)
"""

# A flow run whose host is lost stays Running forever unless something notices: its flow runs send a
# heartbeat every HEARTBEAT_S, and this automation marks a run Crashed when they stop for LOST_AFTER_S
# (Prefect's documented zombie-run detection). The parent (flows.steps.run_step) then starts the step again.
HEARTBEAT_S, LOST_AFTER_S = 30, 75
WORKER_POLL_S = 1  # how often a worker asks for scheduled flow runs (a few workers: negligible load)
LOST_RUNS_SCRIPT = """
import sys
from datetime import timedelta
from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
try:
    Automation.read(name="v2m-lost-flow-runs").delete()
except Exception:
    pass
Automation(name="v2m-lost-flow-runs", trigger=EventTrigger(
    after={"prefect.flow-run.heartbeat"},
    expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
            "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
    match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
    for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
    within=timedelta(seconds=int(sys.argv[1]))),
    actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat: its host or worker was lost")],
).create()
"""
