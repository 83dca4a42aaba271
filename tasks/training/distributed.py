"""Data-parallel training on torchrun: one run, N processes (one per GPU, or gloo processes on the CPU).

    v2m train --gpus N   ->  python -m torch.distributed.run --standalone --nproc-per-node N -m v2m.cli train ...
                             every process: the same finetune() and trainer; rank r trains on its slice of
                             each global batch; gradients are averaged once per optimizer step;
                             rank 0 alone writes checkpoints, the MLflow run, the model and the samples.

Why gradients are averaged here instead of wrapping the model in DistributedDataParallel: both backends call
their transformers / diffusers modules from inside train_step (a stable verb of the Backend interface), so
there is no single forward to wrap. One coalesced all-reduce per optimizer step (after grad_accum micro-batches)
computes exactly what DDP with no_sync() computes; what it gives up is DDP's overlap of communication with the
backward pass. Sharding the 1.5B model's optimizer state (FSDP / ZeRO) is not done: in bf16 autocast with fp32
master weights and activation checkpointing it fits an A40 (48 GB) per process, as bench/gpu_acceptance.py
measures.

Outside torchrun every helper here is a no-op for a single process, so the trainer has one code path.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

RESULT_ENV = "V2M_FINETUNE_RESULT"  # where rank 0 of a launched job writes its FinetuneResult (JSON)


def launched() -> bool:
    """True inside a torchrun job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> str:
    """Each process of a CUDA job gets its own GPU (LOCAL_RANK); the CPU is shared."""
    if launched() and device.startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join the torchrun job (NCCL on GPUs, gloo on the CPU) for the duration of the block; no-op alone."""
    if not launched() or dist.is_initialized():
        yield
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    yield  # an exception propagates without a barrier: this process exits and torchrun stops the others
    finish()


def finish() -> None:
    """End the data-parallel part: once every process is here, leave the job. What follows (rank 0 saving
    and logging the model) runs as a single process: library code such as save_pretrained acts differently,
    with collectives of its own, while a process group exists."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others (e.g. creating the MLflow database or an experiment)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the processes: one flat all-reduce."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def mean(value: float, device: torch.device) -> float:
    """The mean of a number over the processes (the loss of the global batch)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size()


def broadcast_parameters(params: Sequence[torch.nn.Parameter]) -> None:
    """Start every process from rank 0's weights."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (on every process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# --- launching ------------------------------------------------------------------------------------------

def write_result(result: dict[str, Any]) -> None:
    """Rank 0 of a launched job hands its result back to the launcher."""
    path = os.environ.get(RESULT_ENV)
    if path and is_main():
        Path(path).write_text(json.dumps(result))


def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run` (torchrun) on this machine, showing rank 0's output only."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--local-ranks-filter=0", "-m", "v2m.cli", *args]


def launch_train(params_dump: dict[str, Any], args: Sequence[str], nproc: int, root: Path) -> dict[str, Any]:
    """Run `v2m train ARGS` on `nproc` processes with exactly these params; return rank 0's result.

    The params travel as a file (what the caller holds may differ from params.yaml: presets or keys changed in
    memory). The job's output goes to stderr, so this process's stdout stays its own."""
    import yaml
    with tempfile.TemporaryDirectory(prefix="v2m-torchrun-") as tmp:
        params_file, result_file = Path(tmp) / "params.yaml", Path(tmp) / "result.json"
        params_file.write_text(yaml.safe_dump(params_dump, sort_keys=False))
        env = {**os.environ, RESULT_ENV: str(result_file), "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[2])] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        cmd = torchrun_command(nproc, [*args, "--params", str(params_file)])
        done = subprocess.run(cmd, cwd=root, env=env, stdout=sys.stderr, stderr=sys.stderr)
        if done.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"training on {nproc} processes failed (exit {done.returncode}): {' '.join(cmd)}")
        return json.loads(result_file.read_text())
