"""A demo-like registry and a real `v2m serve` process, for the serving test and bench/serve.py.

Versions are tiny random-init models (a different seed each, so their outputs differ) logged with the same
pyfunc a fine-tune logs and registered through the registry task, in an MLflow store under the project folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_params(root: Path, **serve: object) -> Path:
    """The project's params with short windows and the given serve: overrides."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["generate"].update({"max_duration_s": 60.0, "musicgen": {"window_s": 4.0, "stride_s": 3.0},
                            "audioldm": {"window_s": 4.0, "stride_s": 3.0}})
    raw["serve"].update(serve)
    # This project's own store, named explicitly: an MLFLOW_TRACKING_URI left in the environment by an earlier
    # test in the same process (mlflow.set_tracking_uri exports it) must not take the registrations elsewhere.
    raw["tracking"]["uri"] = f"sqlite:///{root.resolve()}/.v2m/mlflow.db"
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root / "params.yaml"


def register_tiny(root: Path, seed: int, backend: str = "musicgen", broken: bool = False) -> str:
    """Register a tiny `backend` model as a new version (broken=True: its files are missing, so it fails to load)."""
    from models import get_backend, save_model
    from models.pyfunc import log_pyfunc
    from tasks.registry.registry import register
    from v2m.config import load_params
    from v2m.tracking import EXPERIMENTS, experiment_id, setup_mlflow
    params = load_params(root / "params.yaml")
    setup_mlflow(params, root)
    folder = root / "models" / f"{backend}-{seed}{'-broken' if broken else ''}"
    if broken:
        folder.mkdir(parents=True)
        (folder / "README").write_text("weights lost")
    else:
        save_model(get_backend(backend).from_preset(getattr(params, backend), "tiny", seed=seed), folder)
    with mlflow.start_run(experiment_id=experiment_id(EXPERIMENTS[backend], params, root)) as run:
        mlflow.set_tags({"backend": backend, "preset": "tiny", "stage": "voice", "base_model": "tiny (random init)",
                         "data_version": "serve-test", "git_commit": "test"})
        log_pyfunc(backend, folder)
    return register(run.info.run_id, backend)


def set_champion(root: Path, version: str, backend: str = "musicgen") -> None:
    """Move the champion alias (what `v2m promote` / `v2m rollback` do once their gates pass)."""
    from tasks.registry.registry import model_name
    mlflow.MlflowClient().set_registered_model_alias(model_name(backend), "champion", version)


def start_server(root: Path, port: int, log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`v2m serve --port PORT --params root/params.yaml *args` in `root`; `env` replaces this process's
    environment (without MLflow's URI and serve's API keys: the project's params say where the registry is)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "V2M_SERVE_API_KEYS")}
    env = {**env, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "v2m.cli", "serve", "--port", str(port), "--params",
                                 str(root / "params.yaml"), *args], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"v2m serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            r = httpx.get(f"{base}/readyz", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"v2m serve not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
