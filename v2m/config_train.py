"""params.yaml training settings (schema only: pure pydantic, no torch).

A *training profile* is one full TrainConfig. Each backend preset carries its own
(`<backend>.presets.<preset>.train`): the tiny presets train demo-sized, the real presets fine-tune with
values that do not wreck pretrained weights. `train.<backend>` then overrides single keys of whichever
profile the chosen preset brings (Params.train_config merges the two and validates the result).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, create_model, model_validator

from v2m.config_base import Strict


class TrainConfig(Strict):
    """The shared trainer (tasks/training/trainer.py): one resolved profile."""
    max_steps: int = Field(20, ge=1)
    batch_size: int = Field(2, ge=1)  # per process; the global batch is batch_size x grad_accum x processes
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)  # peak learning rate, reached after warmup_steps
    warmup_steps: int = Field(2, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warm-up, down to 10 % (or flat)
    weight_decay: float = Field(0.0, ge=0)
    # AdamW's (beta1, beta2). torch's default (0.9, 0.999) for the tiny presets; the real profiles use audiocraft's
    # MusicGen recipe (0.9, 0.95): a shorter second-moment memory, steadier for transformers in bf16.
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    crop_s: float = Field(30.0, gt=0)  # training window cut from each cached chunk (= the chunk for real runs)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_uri: str = ""  # "" = local only; s3://bucket/prefix mirrors every checkpoint there
    val_every: int = Field(10, ge=1)
    val_batches: int = Field(2, ge=1)
    # Same seed -> same losses, and kill + resume reproduces them: torch.use_deterministic_algorithms(True), so
    # an op that has only a non-deterministic kernel is an ERROR while training (never a silent difference).
    deterministic: bool = True
    # Data-parallel (--gpus N): "ddp" replicates the trained module (DistributedDataParallel, gradients
    # all-reduced during the backward pass); "fsdp" shards parameters, gradients and optimizer state over the
    # processes (FSDP2 fully_shard), for a model whose training state does not fit one GPU.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    collective_timeout_s: float = Field(1800.0, gt=0)  # a collective (NCCL / gloo) stuck longer fails the job
    # How long the other processes wait for a checkpoint's S3 download (one per host) or for the previous
    # upload to finish (rank 0): they wait at a barrier of their own, never inside a training collective.
    io_timeout_s: float = Field(7200.0, gt=0)
    samples: int = Field(2, ge=0)  # generated samples logged next to their input vocal
    sample_duration_s: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.checkpoint_uri and not self.checkpoint_uri.startswith("s3://"):
            raise ValueError(f"checkpoint_uri must be empty or start with s3:// (got {self.checkpoint_uri!r})")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        return self


# The same keys, each optional (None = keep the profile's value), with the same per-key constraints.
TrainOverrides = create_model(
    "TrainOverrides", __base__=Strict,
    **{name: (Optional[Annotated[f.annotation, *f.metadata] if f.metadata else f.annotation], None)
       for name, f in TrainConfig.model_fields.items()})
TrainOverrides.__doc__ = "params.yaml `train.<backend>`: keys that override the chosen preset's training profile."


def resolve_train(profile: TrainConfig, overrides) -> TrainConfig:
    """The profile with every override that is set; validated as a whole (e.g. warm-up within max_steps)."""
    return TrainConfig.model_validate({**profile.model_dump(), **overrides.model_dump(exclude_none=True)})


class RetentionConfig(Strict):
    """A finished run's S3 checkpoints (tasks/training/retention.py): its final one and the keep_last newest
    before it stay; the others are deleted, and the run's MLflow run records which."""
    prune: bool = True
    keep_last: int = Field(2, ge=0)


class TrainSection(Strict):
    musicgen: TrainOverrides = TrainOverrides()
    audioldm: TrainOverrides = TrainOverrides()
    retention: RetentionConfig = RetentionConfig()
