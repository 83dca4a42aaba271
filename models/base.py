"""The one small interface both backends implement: prepare, train_step, generate, save, load.

Flows, the trainer, evaluation and the registry only ever talk to a `Backend`; they never branch on which
one it is beyond choosing it by name (`models.get_backend`). Presets (tiny random-init architectures, or
real weights from a local folder / s3:// URI) are configuration, not subclasses.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from v2m.errors import UserError

# Conditioning modes a training run can use. MusicGen's two stages are "voice" then "voice_text";
# AudioLDM's variants are "voice", "voice_text" and "refined" (voice_text with MusicGen-style prompts).
CONDITIONINGS = ("voice", "voice_text")


def draw_drops(n: int, first: float, second: float, joint: float, recipe: str,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_first, drop_second) booleans [n] for two conditions (classifier-free guidance dropout).
    "joint" (audiocraft): both together at `joint`, then each at its own rate; "independent": each at its own."""
    drop_first = torch.rand(n, generator=generator) < first
    drop_second = torch.rand(n, generator=generator) < second
    if recipe == "joint":
        both = torch.rand(n, generator=generator) < joint
        drop_first, drop_second = drop_first | both, drop_second | both
    elif recipe != "independent":
        raise ValueError(f"condition dropout recipe must be 'joint' or 'independent', got {recipe!r}")
    return drop_first, drop_second


OUTPUT_PEAK_DBFS = -1.0
SILENCE_FLOOR_DBFS = -90.0  # below this the output is digital silence: left as it is, for sanity checks to see


def peak_normalize(audio: np.ndarray, peak_dbfs: float = OUTPUT_PEAK_DBFS,
                   floor_dbfs: float = SILENCE_FLOOR_DBFS) -> np.ndarray:
    """Scale audio so its peak sits at `peak_dbfs`; near-silent audio is returned unchanged."""
    audio = np.asarray(audio, dtype=np.float32)
    finite = audio[np.isfinite(audio)]
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    if peak <= 10 ** (floor_dbfs / 20):
        return audio
    return (audio * np.float32(10 ** (peak_dbfs / 20) / peak)).astype(np.float32)


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Real weights were asked for but are not where the configuration says; the message says what to put where."""


def _freeze_eval(module: nn.Module) -> None:
    """eval() the largest sub-modules that hold parameters, none of them trainable."""
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        else:
            _freeze_eval(child)


class Backend(abc.ABC):
    """A generative model that writes an instrumental for a vocal, optionally steered by a text prompt."""

    name: ClassVar[str]  # "musicgen" | "audioldm"
    mode_tag: ClassVar[str] = "stage"  # what a training mode is called in tags: MusicGen "stage", AudioLDM "variant"
    sample_rate: int  # rate of the audio that generate() returns
    module: nn.Module  # every weight that is trained or saved

    # --- build & persist ----------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_preset(cls, cfg: Any, preset: str, seed: int = 0, init_audio: list[np.ndarray] | None = None,
                    device: str = "cpu") -> "Backend":
        """The base model of a preset: random init from its architecture config (tiny), or real weights from
        `weights` (a local folder or an s3:// URI, downloaded once to .v2m/weights and integrity-checked).
        `init_audio` (instrumental clips at `sample_rate`) seeds what random init cannot (MusicGen's codebooks)."""

    @abc.abstractmethod
    def save(self, directory: str | Path) -> None:
        """Everything needed to load the model again, fine-tuned weights merged in (safetensors + json)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "Backend":
        """Inverse of save(): load(save(m)) gives bit-identical outputs."""

    # --- prepare: cached model inputs ---------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, chunk: dict[str, Any]) -> dict[str, np.ndarray]:
        """Model inputs for one segment-manifest chunk (reads its audio files). The data pipeline caches
        them, so training never re-encodes audio. Arrays only (saved with safetensors)."""

    # --- train --------------------------------------------------------------------------------------
    def setup_finetune(self, method: str = "full", **options: Any) -> None:
        """Choose what trains: "full" (the generator's weights) or "lora" (adapters, peft). Default: full."""
        if method != "full":
            raise NotImplementedError(f"{self.name}: fine-tune method {method!r} is not supported")

    def set_training(self, on: bool = True) -> None:
        """Train mode for what trains; eval mode for every frozen part (a frozen text encoder or codec must
        not run dropout: its outputs would change with the RNG, and a resumed run would not reproduce)."""
        self.module.train(on)
        if on:
            _freeze_eval(self.module)

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.module.named_parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of every trainable tensor (a checkpoint's model file): no second copy on the GPU."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.trainable_parameters()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.trainable_parameters())
        missing = set(params) - set(state)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensor(s), e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    @abc.abstractmethod
    def train_step(self, batch: list[dict[str, Any]], conditioning: str, generator: torch.Generator,
                   train: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on a batch of cached items (each: the arrays from prepare() plus "prompt": str).

        conditioning "voice" never shows the text; "voice_text" shows both. With train=True each condition is
        dropped independently at its configured rate (for classifier-free guidance) and clips are randomly
        cropped, all drawn from `generator`; train=False (validation) does neither. Returns (loss, metrics)."""

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory; backends whose modules support it override this."""

    # --- data-parallel training (tasks/training/distributed.py) ---------------------------------------
    @abc.abstractmethod
    def trained_module(self) -> nn.Module:
        """The one module whose forward train_step calls once per batch (it holds every trainable weight):
        what data-parallel training wraps (DistributedDataParallel) or shards (FSDP)."""

    def shard_units(self) -> list[nn.Module]:
        """Blocks of trained_module() that FSDP shards one by one (each gathered only while it runs)."""
        return []

    _train_wrapper: nn.Module | None = None

    def set_train_wrapper(self, wrapper: nn.Module | None) -> None:
        """Route train_step's training forward through `wrapper` (a DistributedDataParallel around
        trained_module()); None = call the module itself. Validation and generation never use the wrapper."""
        self._train_wrapper = wrapper

    def train_call(self, train: bool) -> nn.Module:
        """What train_step calls: the wrapper when training data-parallel, else trained_module()."""
        return self._train_wrapper if (train and self._train_wrapper is not None) else self.trained_module()

    # --- generate -----------------------------------------------------------------------------------
    def generate(self, vocal: np.ndarray | None, vocal_sr: int, prompt: str | None, duration_s: float,
                 seed: int = 0, guidance_scale: float | None = None, steps: int | None = None,
                 normalize: bool = True) -> np.ndarray:
        """An instrumental (float32 mono at self.sample_rate, duration_s long) for a vocal and/or a prompt:
        voice only (prompt None), voice + text, or text only (vocal None). Deterministic given the seed.
        The backend's raw output is peak-normalised (as audiocraft's audio_write does by default);
        normalize=False returns it as the model made it (evaluation measures clipping, NaN and silence there)."""
        raw = self.synthesize(vocal, vocal_sr, prompt, duration_s, seed, guidance_scale, steps)
        return peak_normalize(raw) if normalize else raw

    def probe(self, vocal: np.ndarray | None, vocal_sr: int, prompt: str | None, duration_s: float, seed: int = 0,
              steps: int | None = None) -> np.ndarray:
        """What the model itself generates, before any decoding a backend can do without it (MusicGen: its
        codes), for comparing outputs (models/conditioning.py)."""
        return self.synthesize(vocal, vocal_sr, prompt, duration_s, seed, steps=steps)

    def conditions_in_use(self) -> tuple[str, ...]:
        """The conditions this model's generation must follow: "melody" (the vocal) and "prompt"."""
        return ("melody", "prompt")

    conditioning: dict | None = None  # the last conditioning check's result (models/conditioning.py), if run

    @abc.abstractmethod
    def synthesize(self, vocal: np.ndarray | None, vocal_sr: int, prompt: str | None, duration_s: float,
                   seed: int = 0, guidance_scale: float | None = None, steps: int | None = None) -> np.ndarray:
        """The backend's own generation (see generate); its level is whatever the model produces."""

    # --- conveniences shared by both ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device: str | torch.device) -> "Backend":
        self.module.to(device)
        return self
