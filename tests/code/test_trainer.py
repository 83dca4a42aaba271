"""The shared trainer on a small real torch model: learning, kill + resume (local and S3), checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.base import Backend
from tasks.training.checkpoints import list_checkpoints
from tasks.training.trainer import Batches, lr_factor, train
from v2m.config import TrainConfig
from v2m.s3server import SeaweedS3


class ToyBackend(Backend):
    """Regression with dropout and generator-drawn noise: exercises both RNG streams the trainer restores."""

    name = "toy"
    sample_rate = 8000

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.module = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))

    @classmethod
    def from_preset(cls, cfg, preset, seed=0, init_audio=None, device="cpu"):
        return cls(seed)

    def save(self, directory): ...

    @classmethod
    def load(cls, directory, device="cpu"): ...

    def prepare(self, chunk):
        return {}

    def train_step(self, batch, conditioning, generator, train=True):
        x = torch.tensor(np.stack([b["x"] for b in batch]), dtype=torch.float32)
        y = torch.tensor(np.stack([b["y"] for b in batch]), dtype=torch.float32)
        if train:  # a random augmentation drawn from the trainer's generator
            x = x + 0.01 * torch.randn(x.shape, generator=generator)
        loss = nn.functional.mse_loss(self.train_call(train)(x).squeeze(-1), y)
        return loss, {"loss": loss.item(), "tokens": float(len(batch))}

    def trained_module(self):
        return self.module

    def synthesize(self, vocal, vocal_sr, prompt, duration_s, seed=0, guidance_scale=None, steps=None):
        return np.zeros(int(duration_s * self.sample_rate), np.float32)


def items(n: int = 16) -> list[dict]:
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((n, 4)).astype(np.float32)
    return [{"x": x, "y": np.float32(x @ np.array([1.0, -2.0, 0.5, 3.0]))} for x in xs]


CFG = TrainConfig(max_steps=8, batch_size=4, lr=3e-2, warmup_steps=2, checkpoint_every=2, val_every=4,
                  keep_checkpoints=2, samples=0)


def test_training_lowers_the_loss(tmp_path: Path) -> None:
    res = train(ToyBackend(), items(), items(4), CFG.model_copy(update={"max_steps": 30}), "voice", tmp_path, seed=1)
    assert len(res.losses) == 30
    assert np.mean(res.losses[-5:]) < 0.5 * np.mean(res.losses[:5])
    assert set(res.val_losses) == {4, 8, 12, 16, 20, 24, 28, 30}


def test_kill_and_resume_reproduces_the_uninterrupted_losses(tmp_path: Path) -> None:
    full = train(ToyBackend(), items(), items(4), CFG, "voice", tmp_path / "full", seed=3)
    # Interrupted after step 5: the step-4 checkpoint survives, step 5 is lost and must be redone.
    first = train(ToyBackend(), items(), items(4), CFG, "voice", tmp_path / "cut", seed=3, stop_after=5)
    assert first.steps == 5
    resumed = train(ToyBackend(), items(), items(4), CFG, "voice", tmp_path / "cut", seed=3)
    assert resumed.resumed_from == 4
    assert resumed.losses == full.losses  # bit for bit
    assert resumed.val_losses == full.val_losses


def test_checkpoints_are_atomic_and_pruned(tmp_path: Path) -> None:
    train(ToyBackend(), items(), items(4), CFG, "voice", tmp_path, seed=0)
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in ckpts] == ["ckpt-00000006", "ckpt-00000008"]  # keep_checkpoints=2
    # A write that was killed half-way leaves a .tmp folder; resume ignores it.
    (tmp_path / "checkpoints" / "ckpt-00000010.tmp").mkdir()
    res = train(ToyBackend(), items(), items(4), CFG.model_copy(update={"max_steps": 10}), "voice", tmp_path, seed=0)
    assert res.resumed_from == 8 and res.steps == 10


def test_resume_from_s3_after_losing_the_local_disk(tmp_path: Path, monkeypatch) -> None:
    with SeaweedS3(tmp_path / "s3", buckets=["ckpts"]) as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
        cfg = CFG.model_copy(update={"checkpoint_uri": "s3://ckpts/runs/toy"})
        full = train(ToyBackend(), items(), items(4), CFG, "voice", tmp_path / "full", seed=5)
        train(ToyBackend(), items(), items(4), cfg, "voice", tmp_path / "a", seed=5, stop_after=4)
        listed = s3.client().list_objects_v2(Bucket="ckpts", Prefix="runs/toy/")["Contents"]
        assert {o["Key"] for o in listed} >= {"runs/toy/latest", "runs/toy/ckpt-00000004/model.safetensors"}
        # A new machine: empty local folder, same checkpoint URI.
        resumed = train(ToyBackend(), items(), items(4), cfg, "voice", tmp_path / "b", seed=5)
    assert resumed.resumed_from == 4 and resumed.losses == full.losses


def test_batches_cover_each_epoch_once_in_a_seeded_order() -> None:
    b = Batches(list(range(10)), batch_size=5, seed=0)
    epoch0 = b.next() + b.next()
    assert sorted(epoch0) == list(range(10)) and b.epoch == 0
    again = Batches(list(range(10)), batch_size=5, seed=0)
    assert again.next() + again.next() == epoch0
    b.next()
    assert b.epoch == 1


def test_lr_schedule_warms_up_then_decays() -> None:
    f = [lr_factor(s, 4, 20) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[-1] == pytest.approx(0.1, abs=0.01)


def test_nothing_to_train_is_an_error(tmp_path: Path) -> None:
    toy = ToyBackend()
    for p in toy.module.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        train(toy, items(), items(4), CFG, "voice", tmp_path, seed=0)
