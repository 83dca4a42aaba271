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
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_params(root: Path, name: str = "params.yaml", **serve: object) -> Path:
    """The project's params with short windows and the given serve: overrides, as root/name."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["generate"].update({"max_duration_s": 60.0, "musicgen": {"window_s": 4.0, "stride_s": 3.0},
                            "audioldm": {"window_s": 4.0, "stride_s": 3.0}})
    raw["serve"].update(serve)
    # This project's own store, named explicitly: an MLFLOW_TRACKING_URI left in the environment by an earlier
    # test in the same process (mlflow.set_tracking_uri exports it) must not take the registrations elsewhere.
    raw["tracking"]["uri"] = f"sqlite:///{root.resolve()}/.v2m/mlflow.db"
    (root / name).write_text(yaml.safe_dump(raw))
    return root / name


def register_tiny(root: Path, seed: int, backend: str = "musicgen", broken: bool = False,
                  gain: float | None = None) -> str:
    """Register a tiny `backend` model as a new version (broken=True: its files are missing, so it fails to load;
    gain: its MusicGen decoder's last layer scaled, 0 = a model that outputs silence)."""
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
        model = get_backend(backend).from_preset(getattr(params, backend), "tiny", seed=seed)
        if gain is not None:
            scale_output(model, gain)
        save_model(model, folder)
    with mlflow.start_run(experiment_id=experiment_id(EXPERIMENTS[backend], params, root)) as run:
        mlflow.set_tags({"backend": backend, "preset": "tiny", "stage": "voice", "base_model": "tiny (random init)",
                         "data_version": "serve-test", "git_commit": "test"})
        log_pyfunc(backend, folder)
    return register(run.info.run_id, backend)


def scale_output(musicgen, gain: float) -> None:
    """Scale the EnCodec decoder's output layer (weight-normed: its magnitude g, and its bias): the waveform is
    scaled by `gain` while the codes, and so the conditioning check at load, stay the same."""
    import torch
    conv = musicgen.model.audio_encoder.decoder.layers[-1].conv
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(gain)
        conv.bias.mul_(gain)


def hidden_vocals(n: int, seconds: float, sr: int = 32000, seed: int = 7) -> list[np.ndarray]:
    """`n` sung lines the models never heard: the sopranos of chorales outside the demo dataset's (data.demo with
    the project's seed picks those), sung by the demo's formant voice, the first `seconds` of each."""
    import math

    from tasks.data import voice
    from tasks.data.chorales import corpus_names, load_chorale, loop_and_cut, pick_chorales
    from v2m.config import load_params
    params = load_params(ROOT / "params.yaml")
    cache = ROOT / ".v2m" / "cache" / "chorales"
    demo = params.data.demo
    trained = {c.name for c in pick_chorales(math.ceil(demo.n_tracks / demo.styles_per_chorale), params.seed, cache)}
    names = [m for m in corpus_names() if m not in trained]
    np.random.default_rng(seed).shuffle(names)
    singer = voice.make_artists(1, ["en"], seed)[0]
    words = [("la", "a"), ("loo", "u"), ("see", "i"), ("oh", "o"), ("day", "e")]
    out, bpm = [], 96
    for name in names:
        if len(out) == n:
            break
        ch = load_chorale(name, cache)
        if ch is None:
            continue
        quarters = seconds * bpm / 60
        c, _ = loop_and_cut(ch, quarters, quarters)
        sec = 60 / bpm
        notes = [(m, on * sec, d * sec) for m, on, d in c.parts["Soprano"]]
        y = voice.sing(notes, words * (len(notes) // len(words) + 1), singer, "formant", sr, len(out))
        y = np.pad(y[: int(seconds * sr)], (0, max(0, int(seconds * sr) - len(y))))
        out.append((0.5 * y / (np.abs(y).max() + 1e-9)).astype(np.float32))
    return out


def set_champion(root: Path, version: str, backend: str = "musicgen") -> None:
    """Move the champion alias (what `v2m promote` / `v2m rollback` do once their gates pass)."""
    from tasks.registry.registry import model_name
    mlflow.MlflowClient().set_registered_model_alias(model_name(backend), "champion", version)


def start_server(root: Path, port: int, log: Path, *args: str, env: dict[str, str] | None = None,
                 params: str = "params.yaml") -> subprocess.Popen:
    """`v2m serve --port PORT --params root/<params> *args` in `root`; `env` replaces this process's
    environment (without MLflow's URI and serve's API keys: the project's params say where the registry is)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "V2M_SERVE_API_KEYS")}
    env = {**env, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "v2m.cli", "serve", "--port", str(port), "--params",
                                 str(root / params), *args], cwd=root, env=env, stdout=out,
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
