"""The shadow never costs a client: it holds no client slot, gives the machine back within a decoding step when a
client's request arrives, and its bounded queue is what gives way under a burst. A real server (uvicorn in a
thread, like test_serve_limits.py) with two tiny MusicGen folders as champion and challenger."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from models import get_backend, save_model
from tests.model.test_serve_limits import running
from v2m.config import load_params
from v2m.config_serve import RolloutConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shadowed(tmp_path_factory):
    p = load_params(ROOT / "params.yaml")
    d = tmp_path_factory.mktemp("rollout-shadow")
    for seed in (1, 2):
        save_model(get_backend("musicgen").from_preset(p.musicgen, "tiny", seed=seed), d / f"m{seed}")
    rollout = RolloutConfig(mode="shadow", challenger=str(d / "m2"), share=1.0, max_shadow_pending=2,
                            score_cpu=2.0, background_nice=0, record_every_s=3600)
    server, thread, base = running(d / "m1", d, max_per_client=1, max_pending=8, max_batch=1, rollout=rollout)
    deadline = time.monotonic() + 120
    while httpx.get(base + "/readyz").json()["rollout"]["challenger"] is None and time.monotonic() < deadline:
        time.sleep(0.2)
    yield base
    server.should_exit = True
    thread.join(timeout=30)


def outcomes(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("v2m_online_shadow_requests_total{"):
            out[line.split('outcome="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def generate(base: str, duration: float, seed: int, addr: str = "127.0.0.1") -> tuple[int, float]:
    start = time.perf_counter()
    with httpx.Client(transport=httpx.HTTPTransport(local_address=addr), timeout=120) as c:
        r = c.post(base + "/v1/generate", data={"prompt": "Pop music", "duration": str(duration), "seed": str(seed)})
    return r.status_code, time.perf_counter() - start


def test_a_clients_next_request_neither_waits_for_the_shadow_nor_is_refused_for_it(shadowed) -> None:
    base = shadowed
    long_status, long_s = generate(base, 4.0, seed=1)  # its shadow: another 4 s of audio to generate ...
    assert long_status == 200
    time.sleep(0.5)  # ... which starts once the server has been idle a moment
    # max_per_client is 1: had the shadow held the client's slot, this would be a 429
    quick = [generate(base, 0.3, seed=2 + k) for k in range(3)]
    assert [s for s, _ in quick] == [200] * 3
    assert max(t for _, t in quick) < long_s  # not queued behind a 4 s shadow
    deadline = time.monotonic() + 180
    while (seen := outcomes(base)).get("done", 0) < seen.get("queued", 1) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert seen.get("done") == seen.get("queued") >= 2  # every queued shadow completed once the clients were gone
    assert seen["queued"] + seen.get("dropped_full", 0) == 4  # (the queue holds 2: the rest was dropped)
    assert seen.get("yielded", 0) >= 1  # the long one after giving way to the quick requests


def test_under_a_burst_the_shadow_queue_gives_way_and_no_client_is_refused(shadowed) -> None:
    base = shadowed
    before = outcomes(base)
    def client(k: int) -> list[int]:  # one client (its own address): two requests, one after the other
        return [generate(base, 0.5, 10 + 2 * k + j, f"127.0.0.{20 + k}")[0] for j in range(2)]

    with ThreadPoolExecutor(6) as pool:
        statuses = [s for answers in pool.map(client, range(6)) for s in answers]
    assert statuses == [200] * 12  # every client answered: the shadow took no slot and no place in the queue
    after = outcomes(base)
    new = {k: after.get(k, 0) - before.get(k, 0) for k in ("queued", "dropped_full", "dropped_load", "done")}
    assert new["queued"] + new["dropped_full"] + new["dropped_load"] == 12  # share 1: each answer was offered
    assert new["dropped_full"] + new["dropped_load"] >= 1 and new["queued"] <= 12 - 1  # the queue (2) gave way
    deadline = time.monotonic() + 120
    while outcomes(base).get("done", 0) - before.get("done", 0) < new["queued"] and time.monotonic() < deadline:
        time.sleep(0.3)
    assert outcomes(base).get("done", 0) - before.get("done", 0) == new["queued"]  # what was queued got done
