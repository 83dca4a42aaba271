"""The server's limits on a real uvicorn server (in a thread here): a full queue answers 503 with Retry-After,
a request past serve.timeout_s answers 504, the 503s are counted in /metrics; and an AudioLDM model serves too."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import soundfile as sf
import uvicorn

from models import get_backend, save_model
from tasks.serving.app import create_app
from tasks.serving.server import build_service
from v2m.config import load_params
from v2m.s3server import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    p = load_params(ROOT / "params.yaml")
    d = tmp_path_factory.mktemp("serve-limits") / "model"
    save_model(get_backend("musicgen").from_preset(p.musicgen, "tiny", seed=0), d)
    return d


def running(model_dir: Path, tmp_path: Path, **serve):
    """A server for `model_dir` with serve: overrides; yields its base URL."""
    p = load_params(ROOT / "params.yaml")
    p = p.model_copy(update={"serve": p.serve.model_copy(update={"poll_s": 0.0, **serve})})
    server = uvicorn.Server(uvicorn.Config(create_app(build_service(p, tmp_path, str(model_dir))),
                                           host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    base = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return server, thread, base


@pytest.fixture
def serve(model_dir: Path, tmp_path: Path):
    started = []

    def start(model: Path | None = None, **overrides) -> str:
        server, thread, base = running(model or model_dir, tmp_path, **overrides)
        started.append((server, thread))
        return base

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(timeout=30)


def post(base: str, duration: float) -> httpx.Response:
    return httpx.post(base + "/v1/generate", data={"prompt": "Pop music", "duration": str(duration)}, timeout=120)


def test_beyond_the_bounded_queue_is_503_with_retry_after(serve) -> None:
    base = serve(max_pending=2, max_batch=1, retry_after_s=7)
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: post(base, 2.0), range(6)))
    refused = [r for r in responses if r.status_code == 503]
    assert refused and all(r.headers["Retry-After"] == "7" and r.json()["error"] == "overloaded" for r in refused)
    assert all(r.status_code == 200 for r in responses if r not in refused)
    assert f'v2m_requests_total{{status="503"}} {len(refused)}.0' in httpx.get(base + "/metrics").text


def test_a_request_past_the_timeout_is_504(serve) -> None:
    base = serve(timeout_s=0.3)
    r = post(base, 4.0)
    assert r.status_code == 504 and r.json()["error"] == "timeout" and "serve.timeout_s" in r.json()["detail"]


def test_an_audioldm_model_serves_16_khz_audio(tmp_path: Path, serve) -> None:
    p = load_params(ROOT / "params.yaml")
    save_model(get_backend("audioldm").from_preset(p.audioldm, "tiny", seed=0), tmp_path / "audioldm")
    r = post(serve(tmp_path / "audioldm"), 1.5)
    assert r.status_code == 200, r.text
    audio, sr = sf.read(io.BytesIO(r.content))
    assert sr == 16000 and len(audio) == 24000 and abs(audio).max() > 0.1


def test_serve_with_a_ref_that_names_nothing_exits_1() -> None:
    from typer.testing import CliRunner

    from v2m.cli import app
    res = CliRunner().invoke(app, ["serve", "--model", "not-a-ref", "--params", str(ROOT / "params.yaml")])
    assert res.exit_code == 1 and "not a model folder, runs:/RUN_ID, NAME@alias or NAME/version" in res.output
