"""Requests/s and p50/p95 latency of `v2m serve` on a tiny model, with and without micro-batching; then what a
shadow costs the champion's clients.

A real server process per setting (serve.max_batch 1, then 4), a tiny champion in a temp MLflow registry, and
N text-and-vocal requests at concurrency C. The CPU numbers show the mechanism; the gain that matters is on a GPU,
where a batch of 4 costs little more than one request.

Shadow: the champion's p95 latency with serve.rollout.mode shadow at share 0.2 (a second tiny version as the
challenger) against mode off, at concurrency C, each setting run --repeats times, interleaved (the machine is
shared: its load average is printed), the ratio of the median p95s printed; plus what the shadow got done
(pairs during the load, and once idle). Twice: saturated (each client sends its next request at once: the shadow
gives way and runs after the load), and with --think seconds between a client's requests (idle gaps: the
shadow runs, and gives way, during the measurement).

    python bench/serve.py [--backend musicgen|audioldm] [--requests 40] [--concurrency 4] [--duration 1.0]
                          [--shadow-only] [--repeats 2] [--think 1.0]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import synth_stems  # noqa: E402
from tests.flows.serving_support import (register_tiny, set_champion, start_server, stop_server,  # noqa: E402
                                         wait_ready, write_params)
from v2m.s3server import free_port  # noqa: E402


def run(root: Path, backend: str, max_batch: int, n: int, concurrency: int, duration: float,
        rollout: dict | None = None, think: float = 0.0) -> dict[str, float]:
    """n requests at `concurrency`; each client pauses a random `think` s on average (exponential) after each
    answer (0: the next request at once, a saturated server)."""
    write_params(root, backend=backend, poll_s=0.0, max_batch=max_batch, batch_window_ms=30.0,
                 max_pending=max(16, concurrency), **({"rollout": rollout} if rollout else {}))
    port, log = free_port(), root / f"serve-{max_batch}.log"
    proc = start_server(root, port, log)
    buf = io.BytesIO()
    sf.write(buf, synth_stems(1, duration + 0.5, 22050)[0], 22050, format="WAV")
    vocal = buf.getvalue()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, log)
        while rollout and rollout["mode"] != "off" and httpx.get(base + "/readyz").json()["rollout"]["challenger"] \
                is None:  # its load and conditioning check must not overlap the measurement
            time.sleep(0.3)
        with httpx.Client(base_url=base, timeout=600) as client:
            def one(i: int) -> tuple[int, float]:
                start = time.perf_counter()
                r = client.post("/v1/generate", files={"vocal": ("v.wav", vocal)},
                                data={"prompt": "Pop music for input vocals", "duration": str(duration), "seed": str(i)})
                took = time.perf_counter() - start
                if think:
                    time.sleep(random.Random(i).expovariate(1 / think))
                return r.status_code, took
            one(0)  # warm-up
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(one, range(n)))
            wall = time.perf_counter() - start
            shadows = shadow_outcomes(client)
            if rollout:  # what the shadow finishes once the clients are gone (no effect on the latencies above)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and sum(shadow_outcomes(client).get(k, 0) for k in FINISHED) < \
                        shadows.get("queued", 0):
                    time.sleep(1)
            idle = shadow_outcomes(client)
    finally:
        stop_server(proc)
    lat = sorted(t for _, t in results)
    failed = sum(code != 200 for code, _ in results)
    return {"rps": n / wall, "p50": statistics.median(lat), "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "failed": failed, "shadows": shadows, "idle": idle}


FINISHED = ("done", "expired", "failed", "no_challenger")


def shadow_outcomes(client: httpx.Client) -> dict[str, float]:
    """v2m_online_shadow_requests_total by outcome, and the pairs scored ("pairs")."""
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("v2m_online_shadow_requests_total{"):
            out[line.split('outcome="')[1].split('"')[0]] = float(line.split()[-1])
        elif line.startswith("v2m_online_shadow_pairs_total{"):
            out["pairs"] = out.get("pairs", 0) + float(line.split()[-1])
    return out


def shadow_cost(root: Path, backend: str, n: int, concurrency: int, duration: float, repeats: int,
                think: float) -> None:
    """The champion's p95 with a shadow at share 0.2 against none, interleaved runs; prints the ratio."""
    import os
    shadow = {"mode": "shadow", "share": 0.2}
    load = os.getloadavg()
    rows: dict[str, list[dict]] = {"off": [], "shadow 0.2": []}
    for _ in range(repeats):
        rows["off"].append(run(root, backend, 4, n, concurrency, duration, {"mode": "off"}, think))
        rows["shadow 0.2"].append(run(root, backend, 4, n, concurrency, duration, shadow, think))
    print(f"\nshadow cost: {n} requests of {duration:g} s at concurrency {concurrency}, "
          f"{f'{think:g} s think time' if think else 'no think time (saturated)'}, max_batch 4, tiny {backend}, "
          f"{os.cpu_count()} CPUs; load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'rollout':>10} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'failed':>6}  shadow outcomes during load / once idle")
    for name, runs in rows.items():
        for r in runs:
            during = {k: int(v) for k, v in r["shadows"].items()}
            idle = {k: int(v) for k, v in r["idle"].items()}
            print(f"{name:>10} {r['rps']:>7.2f} {r['p50']:>7.2f} {r['p95']:>7.2f} {r['failed']:>6}  "
                  f"{during or '-'} / {idle or '-'}")
    p95 = {name: statistics.median(r["p95"] for r in runs) for name, runs in rows.items()}
    print(f"champion p95 with shadow at 0.2 / without: {p95['shadow 0.2'] / p95['off']:.3f} "
          f"(cost {100 * (p95['shadow 0.2'] / p95['off'] - 1):+.1f} %, target < +15 %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--duration", type=float, default=1.0, help="seconds generated per request")
    ap.add_argument("--backend", choices=["musicgen", "audioldm"], default="musicgen")
    ap.add_argument("--shadow-only", action="store_true", help="only the shadow's cost")
    ap.add_argument("--repeats", type=int, default=2, help="runs per shadow setting, interleaved")
    ap.add_argument("--think", type=float, default=1.0, help="also measure with clients pausing this long on "
                    "average between requests (idle gaps: the shadow runs during the measurement); 0 = skip")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_params(root)
        set_champion(root, register_tiny(root, seed=1, backend=args.backend), backend=args.backend)
        if not args.shadow_only:
            rows = {b: run(root, args.backend, b, args.requests, args.concurrency, args.duration) for b in (1, 4)}
            print(f"{args.requests} requests of {args.duration:g} s at concurrency {args.concurrency} "
                  f"(tiny {args.backend}, CPU)")
            print(f"{'max_batch':>9} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'failed':>6}")
            for b, r in rows.items():
                print(f"{b:>9} {r['rps']:>7.2f} {r['p50']:>7.2f} {r['p95']:>7.2f} {r['failed']:>6}")
            print(f"batching: {rows[4]['rps'] / rows[1]['rps']:.2f}x requests/s, "
                  f"p95 {rows[4]['p95'] / rows[1]['p95']:.2f}x")
        register_tiny(root, seed=2, backend=args.backend)  # the newest version: the challenger alias
        for think in sorted({0.0, args.think}):
            shadow_cost(root, args.backend, args.requests, args.concurrency, args.duration, args.repeats, think)


if __name__ == "__main__":
    main()
