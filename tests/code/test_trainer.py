"""The shared trainer on a small real torch model: learning, kill + resume (local and S3), checkpoints."""

from __future__ import annotations

import contextlib
import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.base import Backend
from tasks.training import trainer
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


@contextlib.contextmanager
def written_on(device: str):
    """torch.save tags every CPU tensor's storage with `device`: the files are what a run on that device writes."""
    def tag(storage):
        return device if storage.device.type == "cpu" else None
    torch.serialization.register_package(0, tag, lambda storage, location: None)
    try:
        yield
    finally:
        torch.serialization._package_registry[:] = [p for p in torch.serialization._package_registry if p[1] is not tag]


def tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors(v)]
    return []


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects() meets deprecated torch objects
def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu_and_nothing_of_it_stays(tmp_path: Path, monkeypatch) -> None:
    with written_on("cuda:0"):
        train(ToyBackend(), items(), items(4), CFG, "voice", tmp_path, seed=0, stop_after=4)
    latest = list_checkpoints(tmp_path / "checkpoints")[-1]
    with pytest.raises(RuntimeError, match="CUDA"):  # it names cuda:0, as a GPU run's optimizer file does
        torch.load(latest / "optimizer.pt", weights_only=True)

    loaded: dict[str, list] = {}
    real = trainer.load_checkpoint

    def recording(path):
        ckpt = real(path)
        for part in ("model", "optimizer", "rng"):
            loaded[part] = [(weakref.ref(t), t.device.type) for t in tensors(ckpt[part])]
        return ckpt

    monkeypatch.setattr(trainer, "load_checkpoint", recording)
    alive: dict[str, list] = {}
    toy = ToyBackend()

    def during_training(metrics, step) -> None:  # the first step after the resume
        if not alive:
            gc.collect()
            alive.update({part: [r() for r, _ in refs if r() is not None] for part, refs in loaded.items()})
            first = next(toy.module.parameters())
            # type(), not isinstance(): the heap holds weak proxies (pytest-xdist's among them) whose referent
            # is gone, and isinstance() on one raises ReferenceError
            (optimizer,) = [o for o in gc.get_objects() if issubclass(type(o), torch.optim.Optimizer)
                            and o.param_groups[0]["params"][0] is first]
            alive["optimizer state"] = tensors(list(optimizer.state.values()))

    res = train(toy, items(), items(4), CFG, "voice", tmp_path, seed=0, log=during_training)
    assert res.resumed_from == 4 and len(res.losses) == CFG.max_steps
    assert {device for refs in loaded.values() for _, device in refs} == {"cpu"}
    assert len(loaded["model"]) == 4 and len(loaded["optimizer"]) >= 8
    # Restored, then dropped: the model's and the RNG's tensors were copied into the live objects; an optimizer
    # tensor may live on only as the optimizer's own state (AdamW takes a CPU tensor as it is), never beside it.
    assert alive["model"] == [] and alive["rng"] == []
    assert all(any(t is s for s in alive["optimizer state"]) for t in alive["optimizer"])


class ScatteringToy(ToyBackend):
    """Writes its input through Tensor.put_, an op torch has no deterministic kernel for (on any device)."""

    def train_step(self, batch, conditioning, generator, train=True):
        x = torch.tensor(np.stack([b["x"] for b in batch]), dtype=torch.float32)
        x = torch.zeros_like(x).put_(torch.arange(x.numel()), x.flatten())
        loss = nn.functional.mse_loss(self.train_call(train)(x).squeeze(-1), torch.zeros(len(batch)))
        return loss, {"loss": loss.item()}


def test_a_non_deterministic_op_is_an_error_under_the_deterministic_profile(tmp_path: Path) -> None:
    assert CFG.deterministic  # the default profile
    with pytest.raises(RuntimeError, match="deterministic"):
        train(ScatteringToy(), items(), items(4), CFG, "voice", tmp_path / "a", seed=0)
    assert not torch.are_deterministic_algorithms_enabled()  # only while training: generation may use such ops
    res = train(ScatteringToy(), items(), items(4), CFG.model_copy(update={"deterministic": False}), "voice",
                tmp_path / "b", seed=0)
    assert res.steps == CFG.max_steps


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
