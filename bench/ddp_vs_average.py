"""DistributedDataParallel against hand-rolled gradient averaging, on 2 gloo processes (CPU), one run:

    python bench/ddp_vs_average.py [--layers 6 --hidden 512 --accum 4 --steps 6]

Both train the same MusicGen-Melody decoder (random init, the given size) on the same batches with the same
optimizer, interleaved step by step so that machine load hits both alike:
- average: plain module; after the accumulation's last backward, one flat all-reduce of every gradient (what
  tasks/training/distributed.py did before DDP: torch.cat into one buffer, all_reduce, copy back);
- ddp: the trainer's wrapper (tasks/training/distributed.Replicated): no_sync() on all but the last
  micro-batch, whose backward all-reduces gradient buckets as they fill (gradient_as_bucket_view).
Prints the median optimizer-step time of each and the ratio average / ddp (> 1: DDP is faster), after
checking that both computed the same losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def average_gradients(params) -> None:
    """The baseline: the hand-rolled averaging the trainer used before DDP (one flat all-reduce)."""
    import torch
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def worker(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from models.musicgen import MusicGenBackend
    from tasks.training import distributed
    from v2m.config_musicgen import ConditionDropout, MusicGenArch, MusicGenConfig, MusicGenPreset

    arch = MusicGenArch(decoder_layers=args.layers, decoder_hidden=args.hidden, decoder_heads=max(1, args.hidden // 64),
                        decoder_ffn=4 * args.hidden)
    cfg = MusicGenConfig(preset="b", presets={"b": MusicGenPreset(arch=arch)}, crop_s=args.seconds,
                         condition_dropout=ConditionDropout(joint=0.0, text=0.0, chroma=0.0))
    with distributed.process_group("cpu"):
        rank = dist.get_rank()
        rng = np.random.default_rng(rank)
        frames = int(args.seconds * 50)
        batches = [[{"codes": rng.integers(0, 2048, (4, frames)).astype(np.int16),
                     "chroma": np.eye(12, dtype=np.float32)[rng.integers(0, 12, int(args.seconds * 7.8125) + 1)],
                     "prompt": "disco music for input vocals"}] for _ in range(args.accum)]
        runs = {}
        for name in ("average", "ddp"):
            backend = MusicGenBackend.from_preset(cfg, "b", seed=0)
            dp = distributed.Replicated(backend) if name == "ddp" else distributed.Single(backend)
            params = [p for _, p in backend.trainable_parameters()]
            runs[name] = (backend, dp, params, torch.optim.AdamW(params, lr=1e-4), [], [])
        n_params = sum(p.numel() for p in runs["ddp"][2])
        for step in range(args.steps + 1):  # the first step of each is a warm-up, not timed
            for name, (backend, dp, params, opt, times, losses) in runs.items():
                dist.barrier()
                t0 = time.perf_counter()
                total = 0.0
                for i, batch in enumerate(batches):
                    with dp.accumulating(last=i == len(batches) - 1):
                        loss, _ = backend.train_step(batch, "voice_text", None, train=True)
                        (loss / len(batches)).backward()
                    total += float(loss) / len(batches)
                if name == "average":
                    average_gradients(params)
                opt.step()
                opt.zero_grad(set_to_none=True)
                dist.barrier()
                if step:
                    times.append(time.perf_counter() - t0)
                losses.append(total)
        if rank == 0:
            print(json.dumps({"params": n_params, **{name: {"step_s": float(np.median(r[4])), "losses": r[5]}
                                                     for name, r in runs.items()}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--seconds", type=float, default=2.0, help="audio per micro-batch item")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per method")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--local-ranks-filter=0", __file__, "--worker", *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        sys.exit(f"the 2-process job failed:\n{done.stderr[-3000:]}")
    out = json.loads(lines[-1])
    a, d = out["average"], out["ddp"]
    same = max(abs(x - y) / abs(y) for x, y in zip(a["losses"], d["losses"]))
    print(f"MusicGen-Melody decoder {args.layers} x {args.hidden} ({out['params'] / 1e6:.1f} M trained parameters), "
          f"2 gloo processes, {args.accum} micro-batches of {args.seconds:g} s per step, {args.steps} steps each")
    print(f"  average (one flat all-reduce after backward): {a['step_s']:.3f} s per step")
    print(f"  ddp (no_sync + bucketed all-reduce in backward): {d['step_s']:.3f} s per step")
    print(f"  losses agree to {same:.1e} (relative)")
    print(f"ratio average / ddp = {a['step_s'] / d['step_s']:.3f}  (> 1: DDP faster)")


if __name__ == "__main__":
    main()
