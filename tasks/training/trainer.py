"""The shared trainer: one loop, both backends. Read it top to bottom, like nanoGPT's.

    resume (latest checkpoint, local or S3)  ->  for each step:
        grad_accum x [next batch -> autocast -> backend.train_step -> backward]
        clip -> optimizer step -> LR schedule -> log -> [validate] -> [checkpoint]

What makes a killed run resumable to the same numbers (cfg.deterministic):
- data order is a pure function of (seed, epoch): a seeded permutation per epoch, so the data position
  is just (epoch, index) and lives in the checkpoint;
- every random draw the backend makes (crops, condition dropout, noise) comes from one torch.Generator;
  dropout layers draw from torch's global RNGs (the CPU's, and each CUDA device's). All of them, and the
  fp16 GradScaler's state, are checkpointed, per process of a data-parallel job;
- torch must use deterministic kernels while training: an op that has none raises (deterministic()).

Data-parallel (torchrun, tasks/training/distributed.py): every process walks the same seeded order of
*global* batches (batch_size x processes items) and trains on its own slice; DDP (or FSDP) averages the
gradients and the logged loss is averaged, so N processes at batch_size B compute what one process computes
at N x B. Checkpoints are read to the CPU and dropped once restored; S3 uploads run in the background.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.base import Backend
from tasks.training import distributed
from tasks.training.checkpoints import AsyncUpload, download_latest, latest_local, load_checkpoint, save_checkpoint
from v2m.config import TrainConfig

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step, step 1 first
    val_losses: dict[int, float] = field(default_factory=dict)
    resumed_from: int = 0
    checkpoint: Path | None = None
    parallel: str = "single"  # how the processes shared the model: single | ddp | fsdp


class Batches:
    """Endless batches in a seeded order per epoch; the position (epoch, index) is the resume state."""

    def __init__(self, items: Sequence[dict[str, Any]], batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        if not items:
            raise ValueError("no training items: the cache for this split is empty")
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.epoch, self.index = epoch, index

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.items))

    def next(self) -> list[dict[str, Any]]:
        batch, order = [], self._order()
        while len(batch) < self.batch_size:
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            batch.append(self.items[int(order[self.index])])
            self.index += 1
        return batch


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up, then (cosine or linear) decay to 10 % of the peak at the last step, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - 0.9 * progress
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")  # the workspace settings with which cuBLAS is deterministic


@contextlib.contextmanager
def deterministic(on: bool):
    """Within the block, an op that has only a non-deterministic kernel raises instead of running: exact resume
    is a property of the run, not a hope. Restored afterwards (generation and evaluation may use such ops).

    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when CUDA starts; `models` sets it at import, before any model is
    built. A process that started CUDA without it cannot train deterministically: say so rather than drift."""
    if not on:
        yield
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized() \
            and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_CUBLAS:
        raise RuntimeError("deterministic training needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before "
                           "CUDA starts (import models first, or export it); or set train.<backend>.deterministic "
                           "false")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)  # no warn_only: an error, never a silent difference
    torch.backends.cudnn.benchmark = False  # benchmarking may pick another (deterministic) algorithm per run
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the profile's betas; fused (one kernel for all parameters) on CUDA."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def validation_loss(backend: Backend, items: Sequence[dict[str, Any]], cfg: TrainConfig, conditioning: str,
                    seed: int, dtype: torch.dtype | None = None) -> float:
    """Mean loss over the first val_batches batches, no dropout, a fixed generator: comparable across steps.
    Under the training's autocast, so it measures the model as it trains (and fits where training fits)."""
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for b in range(cfg.val_batches):
        batch = list(items[b * cfg.batch_size:(b + 1) * cfg.batch_size])
        if not batch:
            break
        with autocast(backend.device, dtype):
            loss, _ = backend.train_step(batch, conditioning, gen, train=False)
        losses.append(float(loss))
    return float(np.mean(losses)) if losses else float("nan")


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every RNG a training step draws from: the project generator, the CPU's, and this process's CUDA device's
    (only its own: asking for every device's state would start a CUDA context on each GPU from each process)."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if (state.get("cuda") is not None) != (device.type == "cuda"):
        raise ValueError(f"the checkpoint was written on {'CUDA' if state.get('cuda') is not None else 'the CPU'}; "
                         f"this run trains on {device}: resume it on the same kind of device")
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def restore_rng(saved: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    """This process's RNG states from a checkpoint written by a job of the same size."""
    ranks = saved.get("ranks", [saved])  # one entry per data-parallel process
    if len(ranks) != distributed.world_size():
        raise ValueError(f"the checkpoint was written by {len(ranks)} training process(es); resume it with the same "
                         f"number (--gpus {len(ranks)}) so the global batch and the random streams continue")
    set_rng_state(ranks[distributed.rank()], generator, device)


def resume_point(ckpt_dir: Path, uri: str) -> Path | None:
    """The checkpoint every process resumes from. One process per host downloads S3's latest (the others wait
    at the storage barrier); then the newest checkpoint that every process has locally wins (only rank 0's
    host writes checkpoints, so another host may have only what reached S3)."""
    if uri and distributed.is_local_main():
        download_latest(uri, ckpt_dir)
    distributed.io_barrier()
    mine = latest_local(ckpt_dir)
    names = distributed.gather(mine.name if mine else "")
    if not any(names):
        return None
    if not all(names):
        raise RuntimeError(f"processes {[r for r, n in enumerate(names) if not n]} find no checkpoint in {ckpt_dir} "
                           f"while others do ({max(names)}): give every host the run folder or set checkpoint_uri")
    chosen = ckpt_dir / min(names)
    if not chosen.is_dir():
        raise RuntimeError(f"{chosen} is missing on this host (process {distributed.rank()}); other processes resume "
                           f"from it")
    return chosen


@dataclass
class _Run:
    """What one call of train() works with (so the loop's helpers take one argument, not fifteen)."""
    backend: Backend
    dp: distributed.Single
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    batches: Batches
    result: TrainResult
    uploads: AsyncUpload | None
    cfg: TrainConfig
    conditioning: str
    ckpt_dir: Path
    seed: int
    dtype: torch.dtype | None


def train(backend: Backend, train_items: Sequence[dict[str, Any]], val_items: Sequence[dict[str, Any]],
          cfg: TrainConfig, conditioning: str, run_dir: Path, seed: int, log: LogFn | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train `backend` in place; checkpoints go to run_dir/checkpoints (and cfg.checkpoint_uri).

    `stop_after` ends the loop early after that many optimizer steps of this call (tests use it to stand for
    an interruption between checkpoints). With cfg.parallel "fsdp" on several processes the backend's module
    is left sharded: load result.checkpoint into a fresh backend to use the trained model."""
    run_dir, log = Path(run_dir), log or (lambda metrics, step: None)
    rank, world = distributed.rank(), distributed.world_size()
    with deterministic(cfg.deterministic):
        torch.manual_seed(seed + rank)  # rank 0 alone = the single-process run
        device = backend.device
        if cfg.gradient_checkpointing:
            backend.enable_gradient_checkpointing()
        dtype = autocast_dtype(cfg.precision, device)
        if cfg.parallel == "fsdp" and world > 1 and dtype == torch.float16:
            raise ValueError("train parallel fsdp with fp16 is not supported (its gradient scaler cannot unscale "
                             "sharded gradients): use precision bf16")
        dp = distributed.wrap(backend, cfg.parallel)  # before the optimizer: FSDP replaces the parameters
        try:
            params = [p for _, p in backend.trainable_parameters()]
            if not params:
                raise ValueError(f"{backend.name}: nothing to train (no parameter requires grad)")
            optimizer = make_optimizer(params, cfg, device)
            run = _Run(backend, dp, optimizer,
                       torch.optim.lr_scheduler.LambdaLR(
                           optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.schedule)),
                       torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                       torch.Generator().manual_seed(seed + 1_000_003 * rank),
                       Batches(train_items, cfg.batch_size * world, seed),  # global batches; each process its slice
                       TrainResult(steps=0, parallel=dp.name),
                       AsyncUpload(cfg.checkpoint_uri) if cfg.checkpoint_uri else None,
                       cfg, conditioning, run_dir / "checkpoints", seed, dtype)
            latest = resume_point(run.ckpt_dir, cfg.checkpoint_uri)
            if latest is not None:
                resume(run, latest)
            loop(run, val_items or train_items, log, stop_after)
            if run.uploads is not None and distributed.is_main():
                run.uploads.wait()  # the run is complete on S3 before anyone uses it
            distributed.io_barrier()  # rank 0 may go on to save the model only once every process is done
        finally:
            dp.close()
    result = run.result
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)  # a run stopped before its first checkpoint has none yet
        (run_dir / "losses.json").write_text(json.dumps({"losses": result.losses, "resumed_from": result.resumed_from,
                                                        "val_losses": result.val_losses}))
    return result


def resume(run: _Run, path: Path) -> None:
    """Load a checkpoint into the model, optimizer, scheduler, scaler, RNGs and data position. The file's
    tensors (read to the CPU) are dropped on return: only what the live objects copied remains."""
    ckpt = load_checkpoint(path)
    run.result.checkpoint = path
    run.dp.load(ckpt["model"], ckpt["optimizer"]["optimizer"], run.optimizer)
    run.scheduler.load_state_dict(ckpt["optimizer"]["scheduler"])
    if ckpt["optimizer"].get("scaler"):
        run.scaler.load_state_dict(ckpt["optimizer"]["scaler"])
    restore_rng(ckpt["rng"], run.generator, run.backend.device)
    state, result = ckpt["state"], run.result
    run.batches.epoch, run.batches.index = state["epoch"], state["index"]
    result.steps = result.resumed_from = state["step"]
    result.losses = state["losses"]
    result.val_losses = {int(k): v for k, v in state["val_losses"].items()}


def loop(run: _Run, val_items: Sequence[dict[str, Any]], log: LogFn, stop_after: int | None) -> None:
    backend, cfg, result, dtype = run.backend, run.cfg, run.result, run.dtype
    device, rank, world = backend.device, distributed.rank(), distributed.world_size()
    params = [p for _, p in backend.trainable_parameters()]
    backend.set_training(True)
    steps_this_call = 0
    while result.steps < cfg.max_steps and (stop_after is None or steps_this_call < stop_after):
        t0 = time.perf_counter()
        step_loss, tokens = 0.0, 0.0
        for micro in range(cfg.grad_accum):
            batch = run.batches.next()[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            with run.dp.accumulating(last=micro == cfg.grad_accum - 1):  # gradients synchronised on the last only
                with autocast(device, dtype):
                    loss, metrics = backend.train_step(batch, run.conditioning, run.generator, train=True)
                run.scaler.scale(loss / cfg.grad_accum).backward()
            step_loss += loss.detach().item() / cfg.grad_accum
            tokens += metrics.get("tokens", 0.0) * world
        step_loss = distributed.mean(step_loss, device)
        run.scaler.unscale_(run.optimizer)  # the gradients are global means: an inf anywhere skips the step on all
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # fsdp
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        result.steps += 1
        steps_this_call += 1
        result.losses.append(step_loss)

        elapsed = time.perf_counter() - t0
        metrics = {"train/loss": step_loss, "train/lr": run.scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
                   "train/step_time_s": elapsed}
        if tokens:
            metrics["train/tokens_per_s"] = tokens / elapsed
        if device.type == "cuda":
            metrics["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        # Validation on every process (a sharded model needs them all; it draws from no shared RNG); rank 0 logs.
        if result.steps % cfg.val_every == 0 or result.steps == cfg.max_steps:
            backend.set_training(False)
            metrics["val/loss"] = result.val_losses[result.steps] = validation_loss(
                backend, val_items, cfg, run.conditioning, run.seed, dtype)
            backend.set_training(True)
        if distributed.is_main():
            log(metrics, result.steps)
        if result.steps % cfg.checkpoint_every == 0 or result.steps == cfg.max_steps:
            checkpoint(run)


def checkpoint(run: _Run) -> None:
    """Rank 0 writes a checkpoint (once the previous upload is done) and uploads it in the background; then
    every process meets at the storage barrier, so that none waits on S3 or the disk inside a collective."""
    rngs = distributed.gather(rng_state(run.generator, run.backend.device))  # every process's RNG, saved by rank 0
    model_state, optim_state = run.dp.model_state(), run.dp.optimizer_state(run.optimizer)  # collectives (fsdp)
    if distributed.is_main():
        if run.uploads is not None:
            run.uploads.wait()
        result = run.result
        state = {"epoch": run.batches.epoch, "index": run.batches.index, "losses": result.losses,
                 "val_losses": result.val_losses, "conditioning": run.conditioning, "seed": run.seed,
                 "world_size": distributed.world_size()}
        result.checkpoint = save_checkpoint(
            run.ckpt_dir, result.steps, model_state,
            {"optimizer": optim_state, "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict()},
            {"ranks": rngs}, state, run.cfg.keep_checkpoints)
        if run.uploads is not None:
            run.uploads.start(result.checkpoint)
    distributed.io_barrier()
