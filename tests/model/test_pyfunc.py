"""The logged pyfunc is self-contained: it loads and generates in a Python that cannot import this project
(outside the project folder, no PYTHONPATH, and without the editable install's path hook), and
`mlflow models serve -m models:/voice2music-musicgen@champion` serves it, to a remote client too (base64 WAV in
and out)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import soundfile as sf
import yaml

from models.pyfunc import REQUIREMENTS
from tests.flows.serving_support import register_tiny, set_champion, write_params
from v2m.config import load_params
from v2m.s3server import free_port
from v2m.tracking import tracking_uri

# `python -S` skips site.py, so no .pth file runs (the editable install of this project is one); the venv's
# site-packages is then added as a plain folder: every dependency, but not the project.
FRESH = textwrap.dedent("""
    import importlib.util, json, sys
    sys.path.append(SITE)
    assert importlib.util.find_spec("models") is None and importlib.util.find_spec("v2m") is None, "project visible"
    import mlflow.pyfunc, pandas as pd
    model = mlflow.pyfunc.load_model("models:/voice2music-musicgen@champion")
    out = model.predict(pd.DataFrame([{"vocal_path": None, "prompt": "Pop music for input vocals",
                                       "duration_s": 0.5, "seed": 1}]))
    audio = out.loc[0, "audio"]
    import models
    print(json.dumps({"samples": len(audio), "rate": int(out.loc[0, "sample_rate"]),
                      "peak": float(abs(audio).max()), "models_from": models.__file__}))
""")


def test_the_registered_pyfunc_loads_and_generates_outside_the_project(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    write_params(root)
    version = register_tiny(root, seed=1)
    set_champion(root, version)
    client = mlflow.MlflowClient()
    source = client.get_model_version("voice2music-musicgen", version).source
    local = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path / "dl")))
    spec = yaml.safe_load((local / "MLmodel").read_text())
    assert spec["flavors"]["python_function"]["code"] == "code"
    assert set(os.listdir(local / "code")) >= {"models", "v2m"}
    reqs = (local / "requirements.txt").read_text().split()
    assert not [r for r in reqs if "voice2music" in r]  # nothing unpublished
    assert {r.split("==")[0] for r in reqs} >= set(REQUIREMENTS) and all("==" in r for r in reqs)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MLFLOW_TRACKING_URI"] = tracking_uri(load_params(root / "params.yaml"), root)
    script = f"SITE = {sysconfig.get_paths()['purelib']!r}\n" + FRESH
    res = subprocess.run([sys.executable, "-S", "-c", script], cwd=outside, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rate"] == 32000 and out["samples"] == 16000 and out["peak"] > 0.1
    assert not out["models_from"].startswith(str(Path(__file__).resolve().parents[2]))  # the model's own copy

    # And MLflow's own server answers with it (this environment's packages; the model's own code).
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                               "models:/voice2music-musicgen@champion", "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port)], cwd=outside, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=120, json={"dataframe_records": [
            {"vocal_path": None, "prompt": "Pop music for input vocals", "duration_s": 0.5, "seed": 1}]})
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"][0]["audio"]) == 16000

        # A remote client: the vocal as a base64 WAV in, a base64 WAV out (MLflow's own server, no shared disk).
        t = np.arange(int(1.5 * 22050)) / 22050
        take = io.BytesIO()
        sf.write(take, (0.4 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 22050, format="WAV")
        row = {"vocal_b64": base64.b64encode(take.getvalue()).decode(), "prompt": "Pop music for input vocals",
               "duration_s": 1.0, "seed": 1}
        b64 = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=120, json={"dataframe_records": [row]})
        assert b64.status_code == 200, b64.text
        pred = b64.json()["predictions"][0]
        audio, sr = sf.read(io.BytesIO(base64.b64decode(pred["audio_b64"])), dtype="float32")
        assert sr == pred["sample_rate"] == 32000 and len(audio) == 32000 and np.abs(audio).max() > 0.1
        floats = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=120, json={"dataframe_records": [
            {**row, "output": "array"}]})
        assert floats.status_code == 200 and len(floats.json()["predictions"][0]["audio"]) == 32000
        assert len(b64.content) * 4 < len(floats.content)  # the point: a WAV, not a column of JSON floats
        for bad, says in ((row | {"vocal_b64": "not base64!"}, "not valid base64"),
                          (row | {"vocal_b64": base64.b64encode(b"RIFF" + bytes(100)).decode()}, "cannot decode"),
                          (row | {"duration_s": 1e6}, "duration_s")):
            r = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=120, json={"dataframe_records": [bad]})
            assert r.status_code == 400 and says in r.text, r.text
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # mlflow starts uvicorn as a child: stop the group we started
        server.wait(timeout=30)
