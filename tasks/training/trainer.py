"""The shared trainer: one loop, both backends. Read it top to bottom, like nanoGPT's.

    resume (latest checkpoint, local or S3)  ->  for each step:
        grad_accum x [next batch -> autocast -> backend.train_step -> backward]
        clip -> optimizer step -> LR schedule -> log -> [validate] -> [checkpoint]

What makes a killed run resumable to the same numbers (cfg.deterministic):
- data order is a pure function of (seed, epoch): a seeded permutation per epoch, so the data position
  is just (epoch, index) and lives in the checkpoint;
- every random draw the backend makes (crops, condition dropout, noise) comes from one torch.Generator,
  whose state is checkpointed together with torch's global RNG (dropout layers draw from that);
- deterministic kernels are requested from torch.
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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


@torch.no_grad()
def validation_loss(backend: Backend, items: Sequence[dict[str, Any]], cfg: TrainConfig, conditioning: str,
                    seed: int) -> float:
    """Mean loss over the first val_batches batches, no dropout, a fixed generator: comparable across steps."""
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for b in range(cfg.val_batches):
        batch = list(items[b * cfg.batch_size:(b + 1) * cfg.batch_size])
        if not batch:
            break
        loss, _ = backend.train_step(batch, conditioning, gen, train=False)
        losses.append(float(loss))
    return float(np.mean(losses)) if losses else float("nan")


def train(backend: Backend, train_items: Sequence[dict[str, Any]], val_items: Sequence[dict[str, Any]],
          cfg: TrainConfig, conditioning: str, run_dir: Path, seed: int, log: LogFn | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train `backend` in place; checkpoints go to run_dir/checkpoints (and cfg.checkpoint_uri).

    `stop_after` ends the loop early after that many optimizer steps of this call (tests use it to stand for
    an interruption between checkpoints)."""
    run_dir, log = Path(run_dir), log or (lambda metrics, step: None)
    set_deterministic(seed, cfg.deterministic)
    device = backend.device
    if cfg.gradient_checkpointing:
        backend.enable_gradient_checkpointing()
    params = [p for _, p in backend.trainable_parameters()]
    if not params:
        raise ValueError(f"{backend.name}: nothing to train (no parameter requires grad)")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps))
    dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator = torch.Generator().manual_seed(seed)
    batches = Batches(train_items, cfg.batch_size, seed)
    result = TrainResult(steps=0)

    # --- resume -------------------------------------------------------------------------------------
    ckpt_dir = run_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_dir, cfg.checkpoint_uri)
    if latest is not None:
        ckpt = load_checkpoint(latest)
        backend.load_trainable_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"]["optimizer"])
        scheduler.load_state_dict(ckpt["optimizer"]["scheduler"])
        generator.set_state(ckpt["rng"]["generator"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        state = ckpt["state"]
        batches.epoch, batches.index = state["epoch"], state["index"]
        result.steps = result.resumed_from = state["step"]
        result.losses = state["losses"]
        result.val_losses = {int(k): v for k, v in state["val_losses"].items()}

    # --- the loop -----------------------------------------------------------------------------------
    backend.set_training(True)
    steps_this_call = 0
    while result.steps < cfg.max_steps and (stop_after is None or steps_this_call < stop_after):
        t0 = time.perf_counter()
        step_loss, tokens = 0.0, 0.0
        for _ in range(cfg.grad_accum):
            batch = batches.next()
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, metrics = backend.train_step(batch, conditioning, generator, train=True)
            scaler.scale(loss / cfg.grad_accum).backward()
            step_loss += loss.detach().item() / cfg.grad_accum
            tokens += metrics.get("tokens", 0.0)
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
        if result.steps % cfg.val_every == 0 or result.steps == cfg.max_steps:
            backend.set_training(False)
            metrics["val/loss"] = result.val_losses[result.steps] = validation_loss(
                backend, val_items or train_items, cfg, conditioning, seed)
            backend.set_training(True)
        log(metrics, result.steps)

        if result.steps % cfg.checkpoint_every == 0 or result.steps == cfg.max_steps:
            state = {"epoch": batches.epoch, "index": batches.index, "losses": result.losses,
                     "val_losses": result.val_losses, "conditioning": conditioning, "seed": seed}
            result.checkpoint = save_checkpoint(
                ckpt_dir, result.steps, backend.trainable_state_dict(),
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                {"generator": generator.get_state(), "torch": torch.get_rng_state()}, state, cfg.keep_checkpoints)
            if cfg.checkpoint_uri:
                upload_checkpoint(result.checkpoint, cfg.checkpoint_uri)

    backend.set_training(False)
    (run_dir / "losses.json").write_text(json.dumps({"losses": result.losses, "resumed_from": result.resumed_from,
                                                    "val_losses": result.val_losses}))
    return result
