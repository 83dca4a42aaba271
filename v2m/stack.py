"""The team stack without Docker: SeaweedFS (S3), an MLflow server, a Prefect server and one process worker
per work pool, all on loopback, all state under one folder (default .v2m/stack/).

    v2m stack up      start what is not running; print the URLs and the environment to use them
    v2m stack status  which parts answer
    v2m stack down    workers first (they ignore the first signal when idle), then the servers

Credentials for the S3 server are generated at the first `up`, kept in <state>/credentials.json (mode 600)
and handed to the processes through their environment; nothing logs them. infra/ holds the production
equivalents (docker-compose, the GPU worker image, the Kubernetes work-pool template).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from v2m.s3server import SeaweedS3, free_port

POOLS = {"cpu": "process", "gpu-a40": "process"}  # here both pools run as local process workers
BUCKETS = ["v2m-mlflow", "v2m-dvc", "v2m-checkpoints"]


@dataclass
class Stack:
    state_dir: Path
    host: str = "127.0.0.1"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def _save(self, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2, sort_keys=True))

    def credentials(self) -> dict[str, str]:
        path = self.state_dir / "credentials.json"
        if not path.is_file():
            self.state_dir.mkdir(parents=True, exist_ok=True)
            creds = {"access_key": "v2m-" + secrets.token_hex(8), "secret_key": secrets.token_hex(24)}
            path.write_text(json.dumps(creds))
            path.chmod(0o600)
        return json.loads(path.read_text())

    def client_env(self) -> dict[str, str]:
        """The environment a client (CLI, worker, flow run) needs to use the stack."""
        st, creds = self.state(), self.credentials()
        if not st:
            return {}
        return {"MLFLOW_TRACKING_URI": st["mlflow_url"], "PREFECT_API_URL": st["prefect_url"] + "/api",
                "AWS_ACCESS_KEY_ID": creds["access_key"], "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
                "AWS_ENDPOINT_URL": st["s3_url"], "MLFLOW_S3_ENDPOINT_URL": st["s3_url"],
                "AWS_DEFAULT_REGION": "us-east-1", "V2M_STACK": str(self.state_dir)}

    # --- up ---------------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> int:
        log = open(self.state_dir / "logs" / f"{name}.log", "ab")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_URI", "PREFECT_API_URL"))}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**base, **env},
                                start_new_session=True, cwd=self.state_dir)
        return proc.pid

    def up(self, timeout_s: float = 120.0) -> dict[str, Any]:
        st = self.state()
        if st and all(self.health().values()):
            return st
        if st:
            self.down()
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        creds = self.credentials()
        bindir = Path(sys.executable).parent
        quiet = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

        s3 = SeaweedS3(self.state_dir / "seaweedfs", buckets=BUCKETS, access_key=creds["access_key"],
                       secret_key=creds["secret_key"]).start(timeout_s)
        st = {"s3_url": s3.endpoint_url, "pids": {"seaweedfs": s3.proc.pid}}
        s3.proc = None  # detached: `down` stops it by pid
        s3_env = {**quiet, "AWS_ACCESS_KEY_ID": creds["access_key"], "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
                  "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url, "AWS_ENDPOINT_URL": s3.endpoint_url,
                  "AWS_DEFAULT_REGION": "us-east-1"}

        mlflow_port, prefect_port = free_port(), free_port()
        st["pids"]["mlflow"] = self._spawn("mlflow", [
            str(bindir / "mlflow"), "server", "--host", self.host, "--port", str(mlflow_port),
            "--backend-store-uri", f"sqlite:///{self.state_dir / 'mlflow.db'}",
            "--artifacts-destination", "s3://v2m-mlflow/artifacts", "--workers", "1"], s3_env)
        st["mlflow_url"] = f"http://{self.host}:{mlflow_port}"
        prefect_home = self.state_dir / "prefect"
        st["pids"]["prefect"] = self._spawn("prefect", [
            str(bindir / "prefect"), "server", "start", "--host", self.host, "--port", str(prefect_port),
            "--no-ui"], {**quiet, "PREFECT_HOME": str(prefect_home)})
        st["prefect_url"] = f"http://{self.host}:{prefect_port}"
        self._save(st)
        self._wait(lambda: all(v for k, v in self.health().items() if k in ("mlflow", "prefect", "s3")), timeout_s)

        worker_env = {**s3_env, "PREFECT_API_URL": st["prefect_url"] + "/api", "MLFLOW_TRACKING_URI": st["mlflow_url"],
                      "PREFECT_HOME": str(prefect_home), "V2M_STACK": str(self.state_dir),
                      "PREFECT_LOCAL_STORAGE_PATH": str(self.state_dir / "results")}
        self._setup_pools(bindir, worker_env)
        for pool, kind in POOLS.items():
            st["pids"][f"worker-{pool}"] = self._spawn(f"worker-{pool}", [
                str(bindir / "prefect"), "worker", "start", "--pool", pool, "--type", kind,
                "--name", f"v2m-{pool}", "--install-policy", "never"], worker_env)
        self._save(st)
        return st

    def _setup_pools(self, bindir: Path, env: dict[str, str]) -> None:
        """Work pools with their templates, and the `gpu` tag limit: one GPU job at a time (one GPU here)."""
        prefect = str(bindir / "prefect")
        template = Path(__file__).resolve().parents[1] / "infra" / "work-pools" / "gpu-a40-process.json"
        for cmd in ([prefect, "work-pool", "create", "gpu-a40", "--type", "process", "--base-job-template",
                     str(template), "--overwrite"],
                    [prefect, "work-pool", "create", "cpu", "--type", "process", "--overwrite"],
                    [prefect, "concurrency-limit", "create", "gpu", "1"]):
            res = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
            if res.returncode != 0 and "already exists" not in res.stdout + res.stderr:
                raise RuntimeError(f"{' '.join(cmd[1:4])} failed: {res.stdout[-500:]}{res.stderr[-500:]}")

    @staticmethod
    def _wait(ok, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stack did not become healthy within {timeout_s} s; see its logs")
            time.sleep(0.5)

    # --- status / down ------------------------------------------------------------------------------
    def health(self) -> dict[str, bool]:
        st = self.state()
        if not st:
            return {}

        def answers(url: str) -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return r.status < 500
            except Exception as exc:  # HTTPError 403 from S3 still means it answers
                return getattr(exc, "code", 0) in (400, 403)

        out = {"s3": answers(st["s3_url"]), "mlflow": answers(st["mlflow_url"] + "/health"),
               "prefect": answers(st["prefect_url"] + "/api/health")}
        for name, pid in st["pids"].items():
            if name.startswith("worker-"):
                out[name] = _alive(pid)
        return out

    def down(self) -> list[str]:
        st = self.state()
        stopped = []
        order = sorted(st.get("pids", {}), key=lambda n: (not n.startswith("worker-"), n))  # workers first
        for name in order:
            if _stop(st["pids"][name]):
                stopped.append(name)
        if self.state_file.is_file():
            self.state_file.unlink()
        return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (exited, not reaped) is not alive
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return True


def _stop(pid: int, timeout_s: float = 15.0) -> bool:
    """SIGTERM the process group, again after a moment (idle Prefect workers ignore the first), then SIGKILL."""
    if not pid or not _alive(pid):
        return False
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout_s / 3
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.1)
    return not _alive(pid)
