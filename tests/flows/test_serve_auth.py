"""`v2m serve` where it is deployed: against the authenticated team stack (`v2m stack up`, loopback) with the
read-only `serve` role, and as infra/docker-compose.yml and infra/k8s/serve.yaml describe it, rendered for
loopback (no Docker daemon or cluster here: the same command, arguments and environment, with the services'
names pointed at the stack's loopback addresses).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.conftest import ROOT
from tests.flows.conftest import stop_stack
from tests.flows.serving_support import register_tiny, set_champion, start_server, stop_server, wait_ready
from v2m.s3server import free_port
from v2m.stack import Stack

MODEL = "voice2music-musicgen"
KEY = "k" * 8 + "-team-key-0123456789"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The team stack's servers, a champion registered by the cpu role, and a project folder with params.yaml."""
    base = tmp_path_factory.mktemp("serve-auth")
    st = Stack(base / "stack")
    st.up(servers_only=True, gpus=1)
    project = base / "project"
    project.mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())  # tracking.uri "": the environment's
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in st.client_env("cpu").items():
                mp.setenv(k, v)
            version = register_tiny(project, seed=1)
            set_champion(project, version)
        yield st, project, version
    finally:
        stop_stack(st)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any credentials or service URLs, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "PREFECT_API", "V2M_"))}
    return {**env, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", **extra}


def start(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


V2M = [sys.executable, "-m", "v2m.cli"]


def test_the_serve_role_reads_the_registry_and_changes_nothing(stack, monkeypatch) -> None:
    st, project, version = stack
    for k, v in st.client_env("serve").items():
        monkeypatch.setenv(k, v)
    client = MlflowClient(tracking_uri=st.client_env("serve")["MLFLOW_TRACKING_URI"])
    assert client.get_model_version_by_alias(MODEL, "champion").version == version
    for change in (lambda: client.set_registered_model_alias(MODEL, "champion", version),
                   lambda: client.set_model_version_tag(MODEL, version, "touched", "yes"),
                   lambda: client.delete_registered_model_alias(MODEL, "champion")):
        with pytest.raises(MlflowException, match="(?i)permission|403"):
            change()
    for k, v in st.client_env("gpu").items():  # the other writer role still writes where cpu created things
        monkeypatch.setenv(k, v)
    MlflowClient(tracking_uri=st.client_env("gpu")["MLFLOW_TRACKING_URI"]).set_model_version_tag(
        MODEL, version, "checked_by", "gpu")


def test_serve_with_the_serve_role_loads_the_champion(stack, tmp_path: Path) -> None:
    st, project, version = stack
    port, log = free_port(), tmp_path / "serve.log"
    proc = start_server(project, port, log, env=clean_env(**st.client_env("serve")))
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_ready(base, proc, log, timeout_s=180)["model"] == f"{MODEL}/{version}"
        r = httpx.post(base + "/v1/generate", data={"prompt": "Pop music", "duration": "0.5"}, timeout=120)
        assert r.status_code == 200 and r.headers["X-V2M-Model"] == f"{MODEL}/{version}"
    finally:
        stop_server(proc)


@pytest.mark.parametrize("drop,named", [(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
                                         "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
                                        (("MLFLOW_TRACKING_PASSWORD",), "set MLFLOW_TRACKING_PASSWORD"),
                                        ((), "refused user 'serve'")])
def test_without_the_serve_credentials_serve_stops_and_names_what_is_missing(stack, drop, named) -> None:
    st, project, _ = stack
    env = {k: v for k, v in st.client_env("serve").items() if k not in drop}
    if not drop:
        env["MLFLOW_TRACKING_PASSWORD"] = "wrong"
    res = subprocess.run([*V2M, "serve", "--port", str(free_port())], env=clean_env(**env), cwd=project,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 1, res.stdout + res.stderr
    assert named in res.stderr and env["MLFLOW_TRACKING_URI"] in res.stderr, res.stderr


# --- the deployment files, rendered for loopback ----------------------------------------------------------
def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: ${VAR}, ${VAR:-default}, ${VAR:?error}, and $$ for a literal $."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg
    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", one, value).replace("$$", "$")


def on_loopback(args: list[str], env: dict[str, str], stack_env: dict[str, str], port: int) -> tuple[list, dict]:
    """What the deployment runs, on this machine: `v2m` is this interpreter's, 0.0.0.0 becomes 127.0.0.1, port
    8000 a free one, the MLflow service name the stack's address, and the device the CPU (no GPU here)."""
    assert args[:2] == ["v2m", "serve"], args
    args = ["127.0.0.1" if a == "0.0.0.0" else str(port) if a == "8000" else a for a in args[2:]]
    env = {**env, "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"].replace("http://mlflow:5000",
                                                                            stack_env["MLFLOW_TRACKING_URI"]),
           "V2M_DEVICE": "cpu"}
    return [*V2M, "serve", *args], env


def check_keys(proc: subprocess.Popen, port: int, log: Path, host: str, version: str) -> None:
    base = f"http://127.0.0.1:{port}"
    assert wait_ready(base, proc, log, timeout_s=180)["model"] == f"{MODEL}/{version}"  # probes: no key, any Host
    form, headers = {"prompt": "Pop music", "duration": "0.5"}, {"Host": host}
    for auth in ({}, {"Authorization": "Bearer wrong-key-wrong-key"}, {"X-API-Key": KEY[:-1]}):
        r = httpx.post(base + "/v1/generate", data=form, headers={**headers, **auth}, timeout=60)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", (auth, r.text)
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(base + "/", headers=headers).status_code == 401  # the page too
    r = httpx.post(base + "/v1/generate", data=form, headers={**headers, "Authorization": f"Bearer {KEY}"},
                   timeout=120)
    assert r.status_code == 200 and r.headers["X-V2M-Model"] == f"{MODEL}/{version}", r.text


def test_the_compose_serve_service_rendered_for_loopback_answers_401_without_a_key(stack, tmp_path: Path) -> None:
    st, project, version = stack
    service = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())["services"]["serve"]
    dotenv = {"MLFLOW_SERVE_PASSWORD": st.credentials()["mlflow"]["serve"], "V2M_SERVE_API_KEYS": f"team:{KEY}",
              "V2M_SERVE_PUBLIC_HOST": "music.test"}
    env = {k: interpolate(str(v), dotenv) for k, v in service["environment"].items()}
    assert env["MLFLOW_TRACKING_USERNAME"] == "serve"
    port, log = free_port(), tmp_path / "compose-serve.log"
    cmd, env = on_loopback([interpolate(a, dotenv) for a in service["command"]], env, st.client_env("serve"), port)
    proc = start(cmd, clean_env(**env), project, log)
    try:
        check_keys(proc, port, log, "music.test", version)
    finally:
        stop_server(proc)


def test_the_kubernetes_deployment_rendered_for_loopback_answers_401_without_a_key(stack, tmp_path: Path) -> None:
    st, project, version = stack
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "infra" / "k8s" / "serve.yaml").read_text())}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    secret = {("v2m-serve", "api-keys"): f"team:{KEY}",  # what `kubectl create secret` put there
              ("v2m-serve", "mlflow-password"): st.credentials()["mlflow"]["serve"]}
    env = {}
    for var in container["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        env[var["name"]] = secret[(ref["name"], ref["key"])] if ref else var["value"]
    assert env["MLFLOW_TRACKING_USERNAME"] == "serve" and "V2M_SERVE_API_KEYS" in env
    port, log = free_port(), tmp_path / "k8s-serve.log"
    cmd, env = on_loopback(container["args"], env, st.client_env("serve"), port)
    proc = start(cmd, clean_env(**env), project, log)
    try:
        check_keys(proc, port, log, "v2m-serve", version)
    finally:
        stop_server(proc)


def test_serve_refuses_an_open_port_on_the_network(stack) -> None:
    _, project, _ = stack
    res = subprocess.run([*V2M, "serve", "--host", "0.0.0.0", "--port", str(free_port())], env=clean_env(),
                         cwd=project, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "without authentication: set V2M_SERVE_API_KEYS" in res.stderr, res.stderr
