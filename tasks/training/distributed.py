"""Data-parallel training on torchrun: one run, N processes (one per GPU, or gloo processes on the CPU).

    v2m train --gpus N   ->  python -m torch.distributed.run --standalone --nproc-per-node N -m v2m.cli train ...
                             every process: the same finetune() and trainer; rank r trains on its slice of
                             each global batch; rank 0 alone writes checkpoints, the MLflow run, the model and
                             the samples.

How the processes stay one model (TrainConfig.parallel):
- "ddp": torch's DistributedDataParallel around the backend's trained module (Backend.trained_module, the one
  module call of train_step). Gradients are all-reduced in buckets *during* the backward pass of the last
  micro-batch (no_sync() before it), so communication overlaps computation, and the buckets are the gradients'
  own storage (gradient_as_bucket_view: no transient copies). A parameter that got no gradient stays without
  one, so AdamW leaves it alone. bench/ddp_vs_average.py measured it against the hand-rolled average that came
  before (one flat all-reduce after the backward pass, transient copies of every gradient) on 2 gloo processes,
  27 M trained parameters, on a shared 2-core machine: 1.22x faster at 1 micro-batch per step, 1.01x and 1.16x
  (two runs) at 4, where there is less to overlap. DDP was kept.
- "fsdp": FSDP2 (fully_shard) on the backend's blocks (Backend.shard_units) and then the whole trained module:
  parameters, gradients and optimizer state are sharded, for a model whose training state does not fit one
  GPU. Checkpoints are gathered into full tensors (rank 0 writes the same files as with ddp).

Waiting on storage (a checkpoint's S3 download or upload) never happens inside a training collective, whose
timeout (collective_timeout_s, NCCL's default is 10 minutes) would kill the job: the processes meet at
io_barrier(), a gloo barrier of its own with io_timeout_s.

Outside torchrun every helper here is a no-op for a single process, so the trainer has one code path.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
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
_io_group: Any = None  # the gloo group for waits on storage (see the module docstring)


def launched() -> bool:
    """True inside a torchrun job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def is_local_main() -> bool:
    """The first process on this host (torchrun's LOCAL_RANK 0): the one that downloads for the host."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def local_device(device: str) -> str:
    """Each process of a CUDA job gets its own GPU (LOCAL_RANK); the CPU is shared."""
    if launched() and device.startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


@contextlib.contextmanager
def process_group(device: str, timeout_s: float = 1800.0, io_timeout_s: float = 7200.0) -> Iterator[None]:
    """Join the torchrun job (NCCL on GPUs, gloo on the CPU) for the duration of the block; no-op alone.
    timeout_s bounds every training collective; io_timeout_s the waits at io_barrier()."""
    global _io_group
    if not launched() or dist.is_initialized():
        yield
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    _io_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=io_timeout_s))
    yield  # an exception propagates without a barrier: this process exits and torchrun stops the others
    finish()


def finish() -> None:
    """End the data-parallel part: once every process is here, leave the job. What follows (rank 0 saving
    and logging the model) runs as a single process: library code such as save_pretrained acts differently,
    with collectives of its own, while a process group exists."""
    global _io_group
    if dist.is_initialized():
        io_barrier()  # rank 0 may still be finishing its last upload
        dist.destroy_process_group()
        _io_group = None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def io_barrier() -> None:
    """Wait for every process, allowing io_timeout_s: for waits on storage, outside any training collective."""
    if dist.is_initialized():
        dist.barrier(group=_io_group)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others (e.g. creating the MLflow database or an experiment)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def mean(value: float, device: torch.device) -> float:
    """The mean of a number over the processes (the loss of the global batch)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size()


def gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (on every process; over gloo, so no device is involved)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_io_group)
    return out


# --- the trained module across processes -------------------------------------------------------------

class Single:
    """One process: the backend's module as it is."""
    name = "single"

    def __init__(self, backend) -> None:
        self.backend = backend

    def accumulating(self, last: bool):
        """Context for one micro-batch's forward + backward; gradients are synchronised only on the last."""
        return contextlib.nullcontext()

    def model_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, full, on the CPU of rank 0 ({} elsewhere; a collective with fsdp: call it on
        every process)."""
        return self.backend.trainable_state_dict() if is_main() else {}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict() if is_main() else {}

    def load(self, model_state: dict[str, torch.Tensor], optimizer_state: dict, optimizer) -> None:
        self.backend.load_trainable_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)

    def close(self) -> None:
        pass


class Replicated(Single):
    """DistributedDataParallel around the trained module; train_step's training forward goes through it."""
    name = "ddp"

    def __init__(self, backend) -> None:
        from torch.nn.parallel import DistributedDataParallel
        super().__init__(backend)
        device = backend.device
        # No buffer syncing in forward: no trained part has running statistics (torch >= 2.12 names the switch
        # forward_sync_buffers). The constructor copies rank 0's weights and buffers to every process.
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel.__init__).parameters else "broadcast_buffers"
        self.ddp = DistributedDataParallel(backend.trained_module(), device_ids=[device] if device.type == "cuda"
                                           else None, gradient_as_bucket_view=True, **{no_sync: False})
        backend.set_train_wrapper(self.ddp)

    def accumulating(self, last: bool):
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def close(self) -> None:
        self.backend.set_train_wrapper(None)


class Sharded(Single):
    """FSDP2: the backend's blocks and then its whole trained module sharded over the processes, in place.
    The module stays sharded: after training, load the final checkpoint into a fresh backend to use it alone."""
    name = "fsdp"

    def __init__(self, backend) -> None:
        from torch.distributed.fsdp import fully_shard
        super().__init__(backend)
        self.core = backend.trained_module()
        for unit in backend.shard_units():
            fully_shard(unit)
        fully_shard(self.core)
        # state-dict keys are relative to the trained module; the backend names its tensors from its own root
        self.prefix = next(n for n, m in backend.module.named_modules() if m is self.core)
        self.prefix += "." if self.prefix else ""

    def accumulating(self, last: bool):
        self.core.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _options(self, **extra):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, **extra)

    def model_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        full = get_model_state_dict(self.core, options=self._options(cpu_offload=True))
        trainable = {n for n, _ in self.backend.trainable_parameters()}
        return {self.prefix + k: v for k, v in full.items() if self.prefix + k in trainable}

    def optimizer_state(self, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(self.core, optimizer, options=self._options(cpu_offload=True))

    def load(self, model_state, optimizer_state, optimizer) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        state = {k.removeprefix(self.prefix): v for k, v in model_state.items()}
        set_model_state_dict(self.core, state, options=self._options(strict=False))
        set_optimizer_state_dict(self.core, optimizer, optimizer_state, options=self._options())


def wrap(backend, parallel: str) -> Single:
    """The trained module across this job's processes: as it is alone, else DDP ("ddp") or FSDP2 ("fsdp")."""
    if world_size() == 1:
        return Single(backend)
    return {"ddp": Replicated, "fsdp": Sharded}[parallel](backend)


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
