"""The team stack without Docker: SeaweedFS (S3), an MLflow server, a Prefect server, PostgreSQL for the
listening votes (where its server programs are installed) and process workers, all on loopback, all state
under one folder (default .v2m/stack/).

    v2m stack up [--servers-only]            the servers (and a cpu + a gpu-a40 worker, unless servers-only)
    v2m stack worker --pool P --dir D [--gpus 0,1]   a worker in an empty folder that acts as another machine
    v2m stack status / down                  which parts answer / workers first, then the servers

Every service asks for credentials: MLflow through its basic-auth app (a user per host role; `serve`, the
model server's, reads everything and changes nothing), Prefect through its API auth string, S3 through keys
per host role (cpu, gpu, mlflow) that reach only that role's buckets, PostgreSQL through the password of its
one role, `listening`, handed to the cpu hosts (promotions and `v2m listen` run there; votes: tasks/listening/).
All of them are generated at the first `up` into <state>/credentials.json (mode 600) and handed to processes
through their environment; nothing logs them. infra/ holds the production equivalents.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from v2m import postgres
from v2m.config_listening import DB_PASSWORD_ENV, DB_URL_ENV
from v2m.s3server import SeaweedS3, free_port
from v2m.stack_init import (BUCKETS, DEFAULT_PERMISSION, HEARTBEAT_S, LOST_AFTER_S, QUIET, RESULTS_BLOCK,
                            WORKER_POLL_S, init_services)

POOLS = {"cpu": "process", "gpu-a40": "process"}  # here both pools run as local process workers
AUTH_CACHE_S = 60  # MLflow basic auth: how long a checked password stays checked (a changed one: at most this)
# S3 keys per host role, each reaching only the buckets that role needs ("r" read, "rw" read and write).
# The MLflow server alone holds the artifact bucket: clients reach artifacts through it (proxied).
S3_ROLES = {"mlflow": {"v2m-mlflow": "rw"},
            "cpu": {"v2m-dvc": "rw", "v2m-results": "rw"},
            "gpu": {"v2m-dvc": "r", "v2m-checkpoints": "rw", "v2m-results": "rw"}}
POOL_ROLE = {"cpu": "cpu", "gpu-a40": "gpu"}
# serve: read-only (MLflow's default permission, READ); rollout / rollback: serve with serve.rollout (stack_init.py)
MLFLOW_USERS = ("admin", "cpu", "gpu", "serve", "rollout", "rollback")
SERVE_ROLES = ("serve", "rollout", "rollback")  # MLflow alone: models and artifacts come through the server
VOTE_ROLES = ("cpu", "admin")  # hosts that read or write the listening votes; GPU steps and `serve` never do
LISTENING_DB = "listening"  # the votes' database on the stack's PostgreSQL
# What a worker must not inherit from the shell that started it: it acts as another machine.
NOT_INHERITED = ("PYTHONPATH", "MLFLOW_", "PREFECT_", "AWS_", "V2M_", "CUDA_VISIBLE_DEVICES")


def _actions(buckets: dict[str, str]) -> list[str]:
    acts = []
    for bucket, mode in buckets.items():
        acts += [f"Read:{bucket}", f"List:{bucket}"] + ([f"Write:{bucket}", f"Tagging:{bucket}"] if "w" in mode else [])
    return acts


def _new_credentials() -> dict[str, Any]:
    def key() -> dict[str, str]:
        return {"access_key": "v2m" + secrets.token_hex(8), "secret_key": secrets.token_hex(24)}
    return {"s3": {role: key() for role in ("admin", *S3_ROLES)},
            "mlflow": {user: secrets.token_urlsafe(18) for user in MLFLOW_USERS},
            "prefect_auth": "v2m:" + secrets.token_urlsafe(24),
            "listening_db": secrets.token_urlsafe(18),  # PostgreSQL role `listening` (SCRAM)
            "mlflow_flask_secret": secrets.token_hex(32)}  # signs the basic-auth app's CSRF tokens


@dataclass
class Stack:
    state_dir: Path
    host: str = "127.0.0.1"
    # How soon a lost host's flow run is marked Crashed (and its step started again): flow runs send a heartbeat
    # every HEARTBEAT_S (30 s, Prefect's minimum); a run silent for lost_after_s is lost. The default leaves two
    # heartbeats' slack for a loaded host; a test that loses a host on purpose waits less.
    lost_after_s: int = LOST_AFTER_S

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def _save(self, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2, sort_keys=True))

    def credentials(self) -> dict[str, Any]:
        """Every secret of the stack, generated at the first `up`, in one file only its owner can read."""
        path = self.state_dir / "credentials.json"
        if not path.is_file() or "prefect_auth" not in json.loads(path.read_text()):  # none, or a pre-auth one
            self.state_dir.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.chmod(0o600)
            path.write_text(json.dumps(_new_credentials()))
            (self.state_dir / "mlflow-auth.db").unlink(missing_ok=True)  # its users had the old passwords
        creds = json.loads(path.read_text())
        if missing := [u for u in MLFLOW_USERS if u not in creds["mlflow"]]:  # a stack from before a role existed
            creds["mlflow"] |= {u: secrets.token_urlsafe(18) for u in missing}
            path.write_text(json.dumps(creds))
        if "listening_db" not in creds:  # a stack from before the votes moved to PostgreSQL
            creds["listening_db"] = secrets.token_urlsafe(18)
            path.write_text(json.dumps(creds))
        return creds

    def client_env(self, role: str = "cpu") -> dict[str, str]:
        """The environment a client of host role `cpu` or `gpu` (CLI, worker, flow run) needs to use the stack:
        the service URLs and that role's credentials (`admin` gets the operator's S3 and MLflow keys). The serve roles
        (SERVE_ROLES) get MLflow alone: they read models through the MLflow server (artifacts are proxied)."""
        st, creds = self.state(), self.credentials()
        if not st:
            return {}
        user = role if role in creds["mlflow"] else "admin"
        mlflow = {"MLFLOW_TRACKING_URI": st["mlflow_url"], "MLFLOW_TRACKING_USERNAME": user,
                  "MLFLOW_TRACKING_PASSWORD": creds["mlflow"][user]}
        if role in SERVE_ROLES:
            return mlflow
        s3 = creds["s3"][role]
        votes = {DB_URL_ENV: st["listening_db_url"], DB_PASSWORD_ENV: creds["listening_db"]} \
            if st.get("listening_db_url") and role in VOTE_ROLES else {}
        return {**mlflow, **votes,
                "PREFECT_API_URL": st["prefect_url"] + "/api", "PREFECT_API_AUTH_STRING": creds["prefect_auth"],
                "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": RESULTS_BLOCK, "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
                "AWS_ACCESS_KEY_ID": s3["access_key"], "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
                "AWS_ENDPOINT_URL": st["s3_url"], "AWS_DEFAULT_REGION": "us-east-1",
                "V2M_ORCHESTRATION": "team", "V2M_STACK": str(self.state_dir)}

    # --- up ---------------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
        log = open(self.state_dir / "logs" / f"{name}.log", "ab")
        base = {k: v for k, v in os.environ.items() if not k.startswith(NOT_INHERITED)}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**base, **QUIET, **env},
                                start_new_session=True, cwd=cwd or self.state_dir)
        return proc.pid

    def up(self, timeout_s: float = 120.0, servers_only: bool = False, gpus: int = 1) -> dict[str, Any]:
        """Start the servers (and, unless servers_only, a cpu and a gpu-a40 worker, each in its own empty
        folder under hosts/). `gpus` is the global `gpu` limit: the GPUs of every GPU host together."""
        st = self.state()
        if st and all(self.health().values()):
            return st
        if st:
            self.down()
        try:
            return self._up(timeout_s, servers_only, gpus)
        except BaseException:
            self.down()  # nothing half-started stays behind
            raise

    def _up(self, timeout_s: float, servers_only: bool, gpus: int) -> dict[str, Any]:
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        creds = self.credentials()
        bindir = Path(sys.executable).parent
        admin = creds["s3"]["admin"]
        identities = [{"name": role, "accessKey": creds["s3"][role]["access_key"],
                       "secretKey": creds["s3"][role]["secret_key"], "actions": _actions(buckets)}
                      for role, buckets in S3_ROLES.items()]
        s3 = SeaweedS3(self.state_dir / "seaweedfs", buckets=BUCKETS, access_key=admin["access_key"],
                       secret_key=admin["secret_key"], identities=identities, host=self.host)
        try:
            s3.start(timeout_s)
        finally:
            if s3.proc:  # detached: `down` stops it by pid
                self._save({"s3_url": s3.endpoint_url, "pids": {"seaweedfs": s3.proc.pid}})
        st = self.state()
        s3.proc = None
        pg = None
        if postgres.available():  # started now, waited for with the others below
            pg = postgres.PrivatePostgres(self.state_dir / "postgres", password=creds["listening_db"], host=self.host,
                                          log_file=self.state_dir / "logs" / "postgres.log")
            pg.launch()
            st["pids"]["postgres"] = pg.proc.pid
            pg.proc = None  # detached: `down` stops it by pid
            self._save(st)
        mlflow_s3 = creds["s3"]["mlflow"]

        mlflow_port, prefect_port = free_port(), free_port()
        auth_ini = self.state_dir / "mlflow-auth.ini"  # no secret in it: the admin password comes by environment
        # auth_cache_ttl_seconds: a verified user/password pair is believed for that long instead of re-hashing
        # the password (scrypt) on every request: ~0.8 s of server CPU per MLflow call on 2 loaded cores.
        auth_ini.write_text(f"[mlflow]\ndefault_permission = {DEFAULT_PERMISSION}\n"
                            f"database_uri = sqlite:///{self.state_dir / 'mlflow-auth.db'}\nadmin_username = admin\n"
                            f"auth_cache_ttl_seconds = {AUTH_CACHE_S}\n")
        st["pids"]["mlflow"] = self._spawn("mlflow", [
            str(bindir / "mlflow"), "server", "--app-name", "basic-auth", "--host", self.host,
            "--port", str(mlflow_port), "--backend-store-uri", f"sqlite:///{self.state_dir / 'mlflow.db'}",
            "--artifacts-destination", "s3://v2m-mlflow/artifacts", "--workers", "1"],
            {"AWS_ACCESS_KEY_ID": mlflow_s3["access_key"], "AWS_SECRET_ACCESS_KEY": mlflow_s3["secret_key"],
             "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1",
             "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini), "MLFLOW_AUTH_ADMIN_PASSWORD": creds["mlflow"]["admin"],
             "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["mlflow_flask_secret"]})
        st["mlflow_url"] = f"http://{self.host}:{mlflow_port}"
        st["pids"]["prefect"] = self._spawn("prefect", [
            str(bindir / "prefect"), "server", "start", "--host", self.host, "--port", str(prefect_port),
            "--no-ui"], {"PREFECT_HOME": str(self.state_dir / "prefect"),
                         "PREFECT_SERVER_API_AUTH_STRING": creds["prefect_auth"]})
        st["prefect_url"] = f"http://{self.host}:{prefect_port}"
        self._save(st)
        self._wait(lambda: all(v for k, v in self.health().items() if k in ("mlflow", "prefect", "s3")), timeout_s,
                   [st["pids"][n] for n in ("mlflow", "prefect")])
        if pg:
            pg.wait_ready(timeout_s)
            st["listening_db_url"] = pg.create_database(LISTENING_DB)
            self._save(st)
        init_services({**os.environ, **self.client_env("cpu")}, st["s3_url"], gpus, creds["mlflow"],
                      lost_after_s=self.lost_after_s)
        if not servers_only:
            for pool in POOLS:
                self.worker(pool, self.state_dir / "hosts" / pool)
        return self.state()

    # --- workers: each one a separate "machine" -----------------------------------------------------------
    def worker(self, pool: str, directory: Path, gpu_ids: list[str] | None = None, name: str = "",
               queue: str = "") -> str:
        """Start a process worker for `pool` in `directory` (created empty if missing) with only the service
        URLs and its role's credentials: no project files, no PYTHONPATH; flow runs check the code out themselves
        (into <directory>/checkouts, one folder per commit, reused).
        A GPU host with gpu_ids runs up to len(gpu_ids) jobs at once, each pinned to one id (tasks.orchestration
        .gpu_slot). `queue`: serve only that work queue of the pool (a flow run can then be sent to this host).
        Returns the worker's name in the state file."""
        if pool not in POOL_ROLE:
            raise ValueError(f"unknown work pool {pool!r}; choose one of {', '.join(POOL_ROLE)}")
        directory = Path(directory).resolve()
        (directory / "tmp").mkdir(parents=True, exist_ok=True)
        name = name or f"worker-{pool}-{directory.name}"
        env = {**self.client_env(POOL_ROLE[pool]), "PREFECT_HOME": str(directory / ".prefect"),
               "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
               # Prefect's default poll is 10 s: every step of a team retrain waited 5 s on average to start.
               "PREFECT_WORKER_QUERY_SECONDS": str(WORKER_POLL_S),
               "TMPDIR": str(directory / "tmp"), "V2M_GPU_LOCK_DIR": str(directory / ".gpu-locks"),
               # the host's checkouts, one per commit, reused by its flow runs (v2m/checkout.py); the pull step
               # runs `python -m v2m.checkout` with this environment's python
               "V2M_CHECKOUT_CACHE": str(directory / "checkouts"),
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")])}
        limit: list[str] = []
        if pool != "cpu":  # the cpu pool has no limit: the parent flow waits there for its cpu steps
            env["V2M_GPU_IDS"] = ",".join(gpu_ids or [])
            limit = ["--limit", str(max(1, len(gpu_ids or [])))]
        bindir = Path(sys.executable).parent
        worker = [str(bindir / "prefect"), "worker", "start", "--pool", pool, "--type", POOLS[pool], "--name", name,
                  "--install-policy", "never", *limit, *(["--work-queue", queue] if queue else [])]
        # the worker, with its zygote as its child: flow runs start as forks of it (v2m/warm.py)
        warm = [sys.executable, "-m", "v2m.warm", "host", str(directory / "warm.sock"), "--"]
        pid = self._spawn(name, [*warm, *worker], env, cwd=directory)
        st = self.state()
        st["pids"][name] = pid
        self._save(st)
        return name

    def stop(self, name: str, kill: bool = False) -> bool:
        """Stop one part by its name in the state file; kill=True is a machine lost: SIGKILL, no cleanup."""
        st = self.state()
        pid = st.get("pids", {}).pop(name, 0)
        self._save(st)
        if kill and pid and _alive(pid):
            for victim in [pid, *_descendants(pid)]:  # flow runs too, even in their own process groups
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return True
        return _stop(pid)

    @staticmethod
    def _wait(ok, timeout_s: float, pids: list[int] = ()) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            if not all(_alive(p) for p in pids):
                raise RuntimeError("a server of the stack exited while starting; see its log under logs/")
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
            except Exception as exc:  # 401/403 (credentials required) still means it answers
                return getattr(exc, "code", 0) in (400, 401, 403)

        out = {"s3": answers(st["s3_url"]), "mlflow": answers(st["mlflow_url"] + "/health"),
               "prefect": answers(st["prefect_url"] + "/api/health")}
        if "postgres" in st["pids"]:
            out["postgres"] = _alive(st["pids"]["postgres"]) and _listens(st.get("listening_db_url", ""))
        for name, pid in st["pids"].items():
            if name.startswith("worker-"):
                out[name] = _alive(pid)
        return out

    def down(self) -> list[str]:
        st = self.state()
        stopped = []
        order = sorted(st.get("pids", {}), key=lambda n: (not n.startswith("worker-"), n))  # workers first
        for name in order:
            # PostgreSQL: SIGINT is its fast shutdown (SIGTERM waits for every client to leave)
            if _stop(st["pids"][name], sig=signal.SIGINT if name == "postgres" else signal.SIGTERM):
                stopped.append(name)
        if self.state_file.is_file():
            self.state_file.unlink()
        return stopped


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        out += children
        frontier = children
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (exited, not reaped) is not alive
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return True


def _listens(url: str) -> bool:
    """A database URL's host and port accept a connection (the server answers; credentials are not checked)."""
    from urllib.parse import urlsplit
    if not url:
        return False
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
        return True
    except OSError:
        return False


def _stop(pid: int, timeout_s: float = 15.0, sig: int = signal.SIGTERM) -> bool:
    """`sig` to the process group, again after a moment (idle Prefect workers ignore the first), then SIGKILL."""
    if not pid or not _alive(pid):
        return False
    for sig in (sig, sig, signal.SIGKILL):
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
