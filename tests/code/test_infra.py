"""infra/ holds what production runs (no Docker daemon or Kubernetes here). The files are checked against the
formats' own schemas (compose spec, Kubernetes OpenAPI), the topology against what team mode relies on, and
the job templates by rendering them the way the workers do. prefect.yaml must point at flows that exist."""

from __future__ import annotations

import importlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    res = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                          str(ROOT / "infra" / "docker-compose.yml")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_services_ask_for_credentials_from_the_environment_and_workers_share_no_volume() -> None:
    services = compose()["services"]
    assert {"postgres", "s3", "mlflow", "prefect", "init", "worker-cpu", "worker-gpu-a40"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    mlflow = " ".join(" ".join(services["mlflow"]["command"]).split())
    assert "--app-name basic-auth" in mlflow and "--artifacts-destination s3://" in mlflow
    assert services["prefect"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    s3 = " ".join(services["s3"]["command"])
    assert all(f'"name":"{role}"' in s3 for role in ("admin", "mlflow", "cpu", "gpu"))
    for name in ("worker-cpu", "worker-gpu-a40"):
        svc = services[name]
        assert "volumes" not in svc, name  # nothing shared: code by git, data by DVC/S3, models by MLflow
        env = svc["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect:4200/api" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333"  # services by name
        for key in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"):
            assert env[key].startswith("${") and ":?" in env[key], (name, key)  # required, from the environment
    assert services["worker-cpu"]["environment"]["AWS_ACCESS_KEY_ID"] != \
        services["worker-gpu-a40"]["environment"]["AWS_ACCESS_KEY_ID"]  # a key per host role
    gpu = services["worker-gpu-a40"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_worker_image_installs_the_project_at_the_pinned_versions() -> None:
    lines = (ROOT / "infra" / "worker-gpu.Dockerfile").read_text().splitlines()
    assert any('pip install -c infra/constraints.txt ".[ml' in line for line in lines)
    assert not any(line.startswith("VOLUME") for line in lines)
    pins = dict(line.split("==") for line in (ROOT / "infra" / "constraints.txt").read_text().splitlines()
                if "==" in line)
    import mlflow
    import prefect
    assert pins["prefect"] == prefect.__version__ and pins["mlflow"] == mlflow.__version__
    assert pins["torch"] == "2.13.0" and "Flask-WTF" in pins  # the verified torch; basic-auth's dependency


def render_kubernetes_job(tmp_path: Path) -> Path:
    """The job manifest as a Kubernetes worker renders it: variables' defaults, env as a list."""
    from prefect.utilities.templating import apply_values
    tpl = json.loads((ROOT / "infra" / "work-pools" / "gpu-a40-kubernetes.json").read_text())
    values = {k: v.get("default") for k, v in tpl["variables"]["properties"].items()}
    values.update(name="finetune-abc", command="prefect flow-run execute", labels={"app": "voice2music"},
                  env={"V2M_DEVICE": "cuda"})
    manifest = apply_values(tpl["job_configuration"]["job_manifest"], values)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    container["args"] = container["args"].split()
    manifest["metadata"]["name"] = manifest["metadata"]["generateName"] + "x1"  # what the API server assigns
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_kubernetes_job_template_renders_to_a_valid_job_with_credentials_from_a_secret(tmp_path) -> None:
    path = render_kubernetes_job(tmp_path)
    res = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    job = yaml.safe_load(path.read_text())
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # one GPU per job
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-A40"
    assert {"secretRef": {"name": "voice2music-gpu"}} in container["envFrom"]
    assert [v for v in pod["volumes"] if "persistentVolumeClaim" in v] == []  # nothing shared between jobs


def test_process_template_renders_without_pinning_every_job_to_one_gpu() -> None:
    from prefect.workers.process import ProcessJobConfiguration
    tpl = json.loads((ROOT / "infra" / "work-pools" / "gpu-a40-process.json").read_text())
    import asyncio
    cfg = asyncio.run(ProcessJobConfiguration.from_template_and_values(tpl, {"device": "cpu"}))
    assert cfg.env["V2M_DEVICE"] == "cpu" and "CUDA_VISIBLE_DEVICES" not in cfg.env  # set per job by the worker


def test_prefect_yaml_clones_the_code_and_points_at_real_flows_and_pools() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    steps = [next(iter(s)) for s in spec["pull"]]
    assert steps == ["prefect.deployments.steps.run_shell_script", "prefect.deployments.steps.set_working_directory"]
    assert spec["pull"][0]["prefect.deployments.steps.run_shell_script"]["script"].startswith("python -m v2m.checkout ")
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert {"retrain-scheduled", "retrain-manual", "data-watch", "prepare-data", "separate", "finetune", "evaluate",
            "promote"} <= set(deployments)
    assert deployments["retrain-scheduled"]["schedules"][0]["cron"]
    assert "interval" in deployments["data-watch"]["schedules"][0]
    for name in ("separate", "finetune", "evaluate"):
        assert deployments[name]["work_pool"]["name"] == "gpu-a40"
        assert deployments[name]["work_pool"]["job_variables"]["gpu_count"] == 1
    for d in deployments.values():
        assert "project_dir" not in d.get("parameters", {})  # each run works in its own clone
        module, _, attr = d["entrypoint"].partition(":")
        fn = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), attr)
        assert hasattr(fn, "deploy"), d["entrypoint"]  # a Prefect flow
    assert deployments["retrain-manual"]["concurrency_limit"] == 1


def test_deploy_writes_the_configured_repository_and_commit_into_the_pull_steps() -> None:
    import pytest

    from flows.deploy import pull_steps
    from v2m.config import CodeSource
    from v2m.errors import UserError
    by_branch = pull_steps(CodeSource(repository="git@example.com:t/v2m.git", branch="release"))
    step = by_branch[0]["prefect.deployments.steps.run_shell_script"]
    assert shlex.split(step["script"]) == ["python", "-m", "v2m.checkout", "--repository", "git@example.com:t/v2m.git",
                                           "--branch", "release"]
    assert by_branch[1]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ checkout.stdout }}"
    pinned = pull_steps(CodeSource(repository="/srv/v2m.git", commit="0123abcd"))
    script = shlex.split(pinned[0]["prefect.deployments.steps.run_shell_script"]["script"])
    assert script[-2:] == ["--commit", "0123abcd"] and "--branch" not in script
    with pytest.raises(UserError, match="orchestration.code.repository"):
        pull_steps(CodeSource())


def test_importing_v2m_creates_a_missing_prefect_home_so_a_fresh_clone_can_start_prefect(tmp_path) -> None:
    # On a fresh clone `.v2m/` does not exist; Prefect's own mkdir has no parents, and its temporary server then
    # cannot open its database (CI failed this way). The project's entry points all import v2m first.
    home = tmp_path / "clone" / ".v2m" / "prefect"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    res = subprocess.run([sys.executable, "-c", "import v2m, prefect.context"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert home.is_dir() and "Failed to create the Prefect home directory" not in res.stderr


def test_the_cpu_pools_template_starts_flow_runs_through_the_zygote_without_importing_prefect_here() -> None:
    """`v2m stack up` sets Prefect up in a process of its own (init_prefect), before the caller points
    Prefect's settings at the stack: importing Prefect in the caller then would have aimed the caller's Prefect
    client at a temporary server."""
    code = ("import json, sys; import v2m.stack, v2m.stack_init as s; before = 'prefect' in sys.modules; "
            "t = s.cpu_job_template(); "
            "print(json.dumps([t['variables']['properties']['command']['default'], before]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    command, imported = json.loads(res.stdout.strip().splitlines()[-1])
    assert command == "python -m v2m.warm run" and not imported
    tpl = json.loads((ROOT / "infra" / "work-pools" / "gpu-a40-process.json").read_text())
    assert tpl["variables"]["properties"]["command"]["default"] == command  # both pools start warm


def test_compose_cpu_workers_reach_the_listening_votes_with_their_own_role(tmp_path: Path) -> None:
    """worker-cpu gets the votes' URL (no password in it) and the role's password from the environment; the
    init script, run the way the postgres image runs it, makes that role: it logs in, and is no superuser."""
    import psycopg

    from v2m.config_listening import check_vote_db
    from v2m.postgres import PrivatePostgres, bin_dir
    services = compose()["services"]
    env = services["worker-cpu"]["environment"]
    assert check_vote_db(env["V2M_LISTENING_DB"]) == "postgresql://listening@postgres:5432/listening"
    assert env["V2M_LISTENING_DB_PASSWORD"] == "${LISTENING_DB_PASSWORD:?set LISTENING_DB_PASSWORD}"
    assert "V2M_LISTENING_DB" not in services["worker-gpu-a40"]["environment"]
    assert "./postgres-listening.sh:/docker-entrypoint-initdb.d/listening.sh:ro" in services["postgres"]["volumes"]
    with PrivatePostgres(tmp_path / "pg", password="unused", user="someone", durable=False) as pg:
        res = subprocess.run(["sh", str(ROOT / "infra" / "postgres-listening.sh")], capture_output=True, text=True,
                             env={**os.environ, "PATH": f"{bin_dir()}:{os.environ['PATH']}", "POSTGRES_USER": "postgres",
                                  "PGHOST": str(pg.socket_dir), "PGPORT": str(pg.port),
                                  "LISTENING_DB_PASSWORD": "it's-a-secret"})
        assert res.returncode == 0, res.stdout + res.stderr
        with psycopg.connect(host=pg.host, port=pg.port, user="listening", password="it's-a-secret",
                             dbname="listening") as db:
            assert db.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
