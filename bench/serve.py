"""Requests/s and p50/p95 latency of `v2m serve` on a tiny model, with and without micro-batching.

A real server process per setting (serve.max_batch 1, then 4), a tiny champion in a temp MLflow registry, and
N text-and-vocal requests at concurrency C. The CPU numbers show the mechanism; the gain that matters is on a GPU,
where a batch of 4 costs little more than one request.

    python bench/serve.py [--backend musicgen|audioldm] [--requests 40] [--concurrency 4] [--duration 1.0]
"""

from __future__ import annotations

import argparse
import io
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


def run(root: Path, backend: str, max_batch: int, n: int, concurrency: int, duration: float) -> dict[str, float]:
    write_params(root, backend=backend, poll_s=0.0, max_batch=max_batch, batch_window_ms=30.0,
                 max_pending=max(16, concurrency))
    port, log = free_port(), root / f"serve-{max_batch}.log"
    proc = start_server(root, port, log)
    buf = io.BytesIO()
    sf.write(buf, synth_stems(1, duration + 0.5, 22050)[0], 22050, format="WAV")
    vocal = buf.getvalue()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, log)
        with httpx.Client(base_url=base, timeout=600) as client:
            def one(i: int) -> tuple[int, float]:
                start = time.perf_counter()
                r = client.post("/v1/generate", files={"vocal": ("v.wav", vocal)},
                                data={"prompt": "Pop music for input vocals", "duration": str(duration), "seed": str(i)})
                return r.status_code, time.perf_counter() - start
            one(0)  # warm-up
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(one, range(n)))
            wall = time.perf_counter() - start
    finally:
        stop_server(proc)
    lat = sorted(t for _, t in results)
    failed = sum(code != 200 for code, _ in results)
    return {"rps": n / wall, "p50": statistics.median(lat), "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "failed": failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--duration", type=float, default=1.0, help="seconds generated per request")
    ap.add_argument("--backend", choices=["musicgen", "audioldm"], default="musicgen")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_params(root)
        set_champion(root, register_tiny(root, seed=1, backend=args.backend), backend=args.backend)
        rows = {b: run(root, args.backend, b, args.requests, args.concurrency, args.duration) for b in (1, 4)}
    print(f"{args.requests} requests of {args.duration:g} s at concurrency {args.concurrency} "
          f"(tiny {args.backend}, CPU)")
    print(f"{'max_batch':>9} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'failed':>6}")
    for b, r in rows.items():
        print(f"{b:>9} {r['rps']:>7.2f} {r['p50']:>7.2f} {r['p95']:>7.2f} {r['failed']:>6}")
    print(f"batching: {rows[4]['rps'] / rows[1]['rps']:.2f}x requests/s, "
          f"p95 {rows[4]['p95'] / rows[1]['p95']:.2f}x")


if __name__ == "__main__":
    main()
