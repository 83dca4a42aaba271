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
- deterministic kernels are requested from torch.

Data-parallel (torchrun, tasks/training/distributed.py): every process walks the same seeded order of
*global* batches (batch_size x processes items) and trains on its own slice; gradients and the logged loss
are averaged over the processes, so N processes at batch_size B compute what one process computes at N x B.
"""

from __future__ import annotations

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
from tasks.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint, upload_checkpoint
from v2m.config import TrainConfig

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step, step 1 first
    val_losses: dict[int, float] = field(default_factory=dict)
    resumed_from: int = 0
    checkpoint: Path | None = None


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


def set_deterministic(seed: int, on: bool) -> None:
    torch.manual_seed(seed)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)


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


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG a training step draws from: the project generator, the CPU's, and each CUDA device's."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(f"the checkpoint holds RNG states of {len(state['cuda'])} CUDA devices, this machine "
                             f"has {torch.cuda.device_count()}: resume with the same visible devices")
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(saved: dict[str, Any], generator: torch.Generator) -> None:
    """This process's RNG states from a checkpoint written by a job of the same size."""
    ranks = saved.get("ranks", [saved])  # one entry per data-parallel process
    if len(ranks) != distributed.world_size():
        raise ValueError(f"the checkpoint was written by {len(ranks)} training process(es); resume it with the same "
                         f"number (--gpus {len(ranks)}) so the global batch and the random streams continue")
    set_rng_state(ranks[distributed.rank()], generator)


def train(backend: Backend, train_items: Sequence[dict[str, Any]], val_items: Sequence[dict[str, Any]],
          cfg: TrainConfig, conditioning: str, run_dir: Path, seed: int, log: LogFn | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train `backend` in place; checkpoints go to run_dir/checkpoints (and cfg.checkpoint_uri).

    `stop_after` ends the loop early after that many optimizer steps of this call (tests use it to stand for
    an interruption between checkpoints)."""
    run_dir, log = Path(run_dir), log or (lambda metrics, step: None)
    rank, world = distributed.rank(), distributed.world_size()
    set_deterministic(seed + rank, cfg.deterministic)  # rank 0 alone = the single-process run
    device = backend.device
    if cfg.gradient_checkpointing:
        backend.enable_gradient_checkpointing()
    params = [p for _, p in backend.trainable_parameters()]
    if not params:
        raise ValueError(f"{backend.name}: nothing to train (no parameter requires grad)")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.schedule))
    dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator = torch.Generator().manual_seed(seed + 1_000_003 * rank)
    batches = Batches(train_items, cfg.batch_size * world, seed)  # global batches; this process takes its slice
    result = TrainResult(steps=0)

    # --- resume -------------------------------------------------------------------------------------
    ckpt_dir = run_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_dir, cfg.checkpoint_uri)
    if latest is not None:
        ckpt = load_checkpoint(latest)
        backend.load_trainable_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"]["optimizer"])
        scheduler.load_state_dict(ckpt["optimizer"]["scheduler"])
        if ckpt["optimizer"].get("scaler"):
            scaler.load_state_dict(ckpt["optimizer"]["scaler"])
        restore_rng(ckpt["rng"], generator)
        state = ckpt["state"]
        batches.epoch, batches.index = state["epoch"], state["index"]
        result.steps = result.resumed_from = state["step"]
        result.losses = state["losses"]
        result.val_losses = {int(k): v for k, v in state["val_losses"].items()}

    distributed.broadcast_parameters(params)  # every process starts from rank 0's weights

    # --- the loop -----------------------------------------------------------------------------------
    backend.set_training(True)
    steps_this_call = 0
    while result.steps < cfg.max_steps and (stop_after is None or steps_this_call < stop_after):
        t0 = time.perf_counter()
        step_loss, tokens = 0.0, 0.0
        for _ in range(cfg.grad_accum):
            batch = batches.next()[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            with autocast(device, dtype):
                loss, metrics = backend.train_step(batch, conditioning, generator, train=True)
            scaler.scale(loss / cfg.grad_accum).backward()
            step_loss += loss.detach().item() / cfg.grad_accum
            tokens += metrics.get("tokens", 0.0) * world
        distributed.average_gradients(params)  # before unscaling: an inf on any process skips the step on all
        step_loss = distributed.mean(step_loss, device)
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        result.steps += 1
        steps_this_call += 1
        result.losses.append(step_loss)

        elapsed = time.perf_counter() - t0
        metrics = {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
                   "train/step_time_s": elapsed}
        if tokens:
            metrics["train/tokens_per_s"] = tokens / elapsed
        if device.type == "cuda":
            metrics["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        # Validation, logging and checkpoints are rank 0's (validation draws from no shared RNG).
        if distributed.is_main() and (result.steps % cfg.val_every == 0 or result.steps == cfg.max_steps):
            backend.set_training(False)
            metrics["val/loss"] = result.val_losses[result.steps] = validation_loss(
                backend, val_items or train_items, cfg, conditioning, seed, dtype)
            backend.set_training(True)
        if distributed.is_main():
            log(metrics, result.steps)

        if result.steps % cfg.checkpoint_every == 0 or result.steps == cfg.max_steps:
            rngs = distributed.gather(rng_state(generator))  # every process's RNG, saved by rank 0
            if distributed.is_main():
                state = {"epoch": batches.epoch, "index": batches.index, "losses": result.losses,
                         "val_losses": result.val_losses, "conditioning": conditioning, "seed": seed,
                         "world_size": world}
                result.checkpoint = save_checkpoint(
                    ckpt_dir, result.steps, backend.trainable_state_dict(),
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict()},
                    {"ranks": rngs}, state, cfg.keep_checkpoints)
                if cfg.checkpoint_uri:
                    upload_checkpoint(result.checkpoint, cfg.checkpoint_uri)

    distributed.barrier()  # rank 0 may go on to save the model only once every process is done
    if not distributed.is_main():
        return result
    (run_dir / "losses.json").write_text(json.dumps({"losses": result.losses, "resumed_from": result.resumed_from,
                                                    "val_losses": result.val_losses}))
    return result
