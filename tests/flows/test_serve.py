"""`v2m serve` end to end: a real uvicorn process on loopback serving the champion of a temp MLflow registry.

One server for the module (loading takes seconds); the tests run in file order and share it:
whole-song length, three sung languages with and without a prompt plus text only, a 4xx for every bad input,
promotion / failed version / rollback while a client keeps sending requests, and a bounded load test.
"""

from __future__ import annotations

import io
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from playwright.sync_api import sync_playwright

from tasks.data.voice import espeak_workspace, lyrics, make_artists, resolve_voice, sing
from tests.flows.serving_support import (register_tiny, set_champion, start_server, stop_server, wait_ready,
                                         write_params)
from v2m.s3server import free_port

MODEL = "voice2music-musicgen"
SR = 32000
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as tests/model/test_report.py, plus a fake microphone (a beep) that the page may use without asking
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    write_params(root, poll_s=0.5, max_upload_mb=1.0, max_duration_s=20.0, max_pending=8, timeout_s=120.0)
    versions = {"v1": register_tiny(root, seed=1), "v2": register_tiny(root, seed=2),
                "broken": register_tiny(root, seed=3, broken=True)}
    set_champion(root, versions["v1"])
    port, log = free_port(), root / "serve.log"
    proc = start_server(root, port, log)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(base, proc, log)
        assert ready["model"] == f"{MODEL}/{versions['v1']}"
        with httpx.Client(base_url=base, timeout=120) as client:
            yield {"client": client, "root": root, "versions": versions, "log": log}
    finally:
        stop_server(proc)


def wav_bytes(audio: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format=fmt)
    return buf.getvalue()


def sung(language: str, seconds: float, seed: int) -> np.ndarray:
    """A sung line (espeak-ng, or the formant synth without it) in `language`, as the demo data's artists sing."""
    artist = next(a for a in make_artists(3, ["en", "fr", "ar"], seed) if a.language == language)
    rng = np.random.default_rng(seed)
    notes = [(float(p), 0.4 * i, 0.38) for i, p in enumerate(rng.choice([60, 62, 64, 65, 67], int(seconds / 0.4)))]
    with espeak_workspace() as ws:
        return sing(notes, lyrics(len(notes), language, rng), artist, resolve_voice("auto"), SR, seed, ws)[: int(seconds * SR)]


def generate(client: httpx.Client, vocal: bytes | None = None, name: str = "take.wav", **form) -> httpx.Response:
    files = {"vocal": (name, vocal, "application/octet-stream")} if vocal is not None else None
    data = {k: str(v) for k, v in form.items()}
    return client.post("/v1/generate", files=files, data=data or None)


def check_wav(r: httpx.Response, seconds: float) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav" and r.headers["X-V2M-Model"].startswith(MODEL + "/")
    assert r.headers["X-V2M-Seed"].isdigit()
    audio, sr = sf.read(io.BytesIO(r.content), dtype="float32")
    assert sr == SR and len(audio) == round(seconds * SR)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0.1  # peak-normalised, not silent
    return audio


def test_a_vocal_longer_than_one_window_gives_the_same_length(server) -> None:
    take = sung("en", 5.0, seed=1)  # windows are 4 s here
    audio = check_wav(generate(server["client"], wav_bytes(take, SR), seed=5), 5.0)
    assert len(audio) == len(take)


@pytest.mark.parametrize("language", ["en", "fr", "ar"])
def test_sung_vocals_in_three_languages_with_and_without_a_prompt(server, language: str) -> None:
    take = wav_bytes(sung(language, 1.5, seed=2), SR, "FLAC")
    check_wav(generate(server["client"], take, name="take.flac", seed=1), 1.5)
    check_wav(generate(server["client"], take, name="take.flac", prompt="Disco music for input vocals",
                       duration=1.0, seed=1), 1.0)


def test_text_only(server) -> None:
    r = generate(server["client"], prompt="Rock music for input vocals", duration=1.2, seed=9)
    check_wav(r, 1.2)
    assert r.headers["X-V2M-Seed"] == "9"


def test_every_bad_input_gets_a_json_4xx(server) -> None:
    client, good = server["client"], wav_bytes(sung("fr", 1.5, seed=3), SR)
    cases = {
        "unreadable": (400, generate(client, b"RIFF" + bytes(200), name="broken.wav")),
        "silent": (422, generate(client, wav_bytes(np.zeros(SR * 2, np.float32), SR))),
        "too_long": (422, generate(client, good, duration=21)),
        "too_large": (413, generate(client, wav_bytes(np.random.default_rng(0).uniform(-.5, .5, SR * 40)
                                                      .astype(np.float32), SR))),
        "unsupported_format": (415, generate(client, good, name="take.ogg")),
        "no_input": (422, generate(client, duration=2)),
        "invalid_duration": (422, generate(client, good, duration="soon")),
        "too_short": (422, generate(client, wav_bytes(sung("en", 0.5, seed=4), SR))),
    }
    for code, (status, r) in cases.items():
        assert r.status_code == status, (code, r.status_code, r.text)
        assert r.json()["error"] == code and r.json()["detail"], r.text


def follow(server, version: str, until: float = 90.0) -> list[httpx.Response]:
    """Move the champion to `version` while a client loop keeps generating; return every response, the loop
    ending a few requests after the new version first answers."""
    responses: list[httpx.Response] = []
    stop = threading.Event()
    label = f"{MODEL}/{version}"

    def loop() -> None:
        with httpx.Client(base_url=str(server["client"].base_url), timeout=120) as c:
            after = 0
            while not stop.is_set() and after < 3:
                r = generate(c, prompt="Pop music for input vocals", duration=0.4, seed=1)
                responses.append(r)
                after += r.headers.get("X-V2M-Model") == label

    t = threading.Thread(target=loop)
    t.start()
    time.sleep(1.0)
    set_champion(server["root"], version)
    t.join(timeout=until)
    stop.set()
    t.join()
    return responses


def test_promotion_and_rollback_are_followed_without_a_failed_request(server) -> None:
    v1, v2 = server["versions"]["v1"], server["versions"]["v2"]
    for old, new in ((v1, v2), (v2, v1)):  # promote v2, then roll back to v1
        responses = follow(server, new)
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        models = [r.headers["X-V2M-Model"] for r in responses]
        assert models[0] == f"{MODEL}/{old}" and models[-1] == f"{MODEL}/{new}"
        switch = models.index(f"{MODEL}/{new}")  # one switch, never back: no request on a half-swapped model
        assert set(models[:switch]) == {f"{MODEL}/{old}"} and set(models[switch:]) == {f"{MODEL}/{new}"}


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(server) -> None:
    client, v1, broken = server["client"], server["versions"]["v1"], server["versions"]["broken"]
    set_champion(server["root"], broken)
    deadline = time.monotonic() + 60
    while (ready := client.get("/readyz").json())["load_error"] is None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert ready["ready"] and ready["model"] == f"{MODEL}/{v1}"
    assert f"{MODEL}/{broken}" in ready["load_error"] and "failed to load" in ready["load_error"]
    assert generate(client, prompt="Pop music", duration=0.5).headers["X-V2M-Model"] == f"{MODEL}/{v1}"
    metrics = client.get("/metrics").text
    assert f'v2m_model_load_error{{model="{MODEL}/{broken}"}} 1.0' in metrics
    assert f"{MODEL}/{broken}: failed to load" in server["log"].read_text()
    set_champion(server["root"], v1)  # back to a loadable champion: the error clears
    deadline = time.monotonic() + 30
    while client.get("/readyz").json()["load_error"] is not None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert client.get("/readyz").json()["load_error"] is None


def test_bounded_load_has_no_5xx_and_metrics_count_it(server) -> None:
    client = server["client"]
    take = wav_bytes(sung("ar", 1.2, seed=5), SR)

    def one(i: int) -> int:
        if i % 2:
            return generate(client, prompt="Classical music for input vocals", duration=0.4, seed=i).status_code
        return generate(client, take, duration=0.4, seed=i).status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(one, range(50)))
    assert statuses == [200] * 50
    metrics = client.get("/metrics").text
    assert 'v2m_requests_total{status="200"}' in metrics and "v2m_request_latency_seconds_bucket" in metrics
    assert "v2m_realtime_factor_count" in metrics and "v2m_queue_depth 0.0" in metrics
    assert f'v2m_model_info{{backend="musicgen",model="{MODEL}/{server["versions"]["v1"]}"}} 1.0' in metrics
    batches = [line for line in metrics.splitlines() if line.startswith("v2m_batch_size_count")]
    assert batches and float(batches[0].split()[-1]) < 50 + 20  # some of the 50 shared a batch


def test_health_and_page(server) -> None:
    client = server["client"]
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and 'id="vocal-file"' in page.text and "MediaRecorder" in page.text
    assert client.get("/nope").json()["error"] == "http_error"


AUDIO_DURATION = """sel => { const a = document.querySelector(sel); return a.readyState >= 1 ? a.duration :
    new Promise(r => { a.onloadedmetadata = () => r(a.duration); a.onerror = () => r(-1); a.load(); }); }"""


def test_the_page_uploads_records_generates_plays_and_downloads_in_chromium(server, tmp_path: Path) -> None:
    assert CHROMIUM, "chromium is not installed: `make test` installs it (apt-get install chromium)"
    take = tmp_path / "take.wav"
    sf.write(take, sung("fr", 2.0, seed=6), SR)
    base = str(server["client"].base_url).rstrip("/")
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(accept_downloads=True)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/")
        page.set_input_files("#vocal-file", str(take))
        page.select_option("#prompt-choice", label="Disco music for input vocals")
        page.fill("#seed", "11")
        page.click("#generate")
        page.wait_for_selector("#results:not([hidden])", timeout=60_000)
        assert page.inner_text("#status") == "Done."
        assert page.inner_text("#model-info") == f"Model {MODEL}/{server['versions']['v1']}, seed 11"
        assert abs(page.evaluate(AUDIO_DURATION, "#instrumental") - 2.0) < 0.05  # the vocal's length
        assert abs(page.evaluate(AUDIO_DURATION, "#mixed") - 2.0) < 0.05
        with page.expect_download() as download:
            page.click("#download")
        saved = tmp_path / "download.wav"
        download.value.save_as(saved)
        audio, sr = sf.read(saved)
        assert sr == SR and len(audio) == 2 * SR and np.abs(audio).max() > 0.1

        # Record from the (fake) microphone instead: the page converts the recording to WAV and sends it.
        page.click("#record")
        page.wait_for_function("document.querySelector('#status').textContent === 'Recording…'")
        page.wait_for_timeout(1500)
        page.click("#stop")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('Recorded')")
        page.click("#generate")
        page.wait_for_function("['Done.'].includes(document.querySelector('#status').textContent) || "
                               "document.querySelector('#status').className === 'error'", timeout=60_000)
        assert page.inner_text("#status") == "Done.", page.inner_text("#status")
        assert page.evaluate(AUDIO_DURATION, "#instrumental") > 1.0
        browser.close()
    assert not errors, errors
