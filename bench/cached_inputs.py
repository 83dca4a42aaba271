"""Training step time with cached model inputs against computing them on the fly, from one run.

    python bench/cached_inputs.py --backend musicgen [--steps 5] [--batch 2]

Cached: the trainer's path — items read from data/cache/<backend>/ (EnCodec codes + chroma, or VAE latents
+ CLAP embeddings), then backend.train_step. On the fly: the same chunks, but every step first runs
backend.prepare() on the chunk audio (encode the instrumental, embed the vocal), as a pipeline without the
cache stage would. Needs the demo data and caches: `make demo` (or `dvc repro`) first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.data.cache_inputs import CACHE_ROOT, load_base, load_split  # noqa: E402
from v2m.config import load_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed_steps(backend, batches, conditioning: str, prepare: bool) -> float:
    params = [p for _, p in backend.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for batch in batches:
        t = time.perf_counter()
        if prepare:  # what the cache saves: encoding every chunk again, every step
            batch = [{**backend.prepare(item["meta"]), "prompt": item["prompt"]} for item in batch]
        loss, _ = backend.train_step(batch, conditioning, gen, train=True)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="musicgen", choices=["musicgen", "audioldm"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    p = load_params(ROOT / "params.yaml")
    cache_dir = ROOT / CACHE_ROOT / args.backend
    cfg = getattr(p, args.backend)
    backend, info = load_base(p, args.backend, cache_dir)
    backend.setup_finetune("full")
    items = load_split(cache_dir, "train", cfg.prompt_template)
    batches = [[items[(s * args.batch + i) % len(items)] for i in range(args.batch)] for s in range(args.steps + 1)]
    timed_steps(backend, batches[:1], "voice_text", prepare=False)  # warm-up (allocations, lazy init)
    cached = timed_steps(backend, batches[1:], "voice_text", prepare=False)
    fly = timed_steps(backend, batches[1:], "voice_text", prepare=True)
    chunk_s = items[0]["meta"]["end_s"] - items[0]["meta"]["start_s"]
    print(f"{args.backend} ({info['base_model']}), batch {args.batch} x {chunk_s:.0f} s chunks, "
          f"crop {cfg.crop_s:g} s, {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"step time, cached inputs:     {cached * 1000:8.1f} ms")
    print(f"step time, encoded on the fly: {fly * 1000:8.1f} ms")
    print(f"on-the-fly / cached: {fly / cached:.2f}x")


if __name__ == "__main__":
    main()
