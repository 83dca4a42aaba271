"""params.yaml `separate:` — splitting finished songs into a vocal and an instrumental (tasks/data/separate.py).

Schema only (no torch, no librosa): the CLI validates it at load like every other section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from v2m.config_base import Strict


class HarmonicConfig(Strict):
    """The weight-free separator (tasks/data/harmonic_mask.py): the lead line's pitch is tracked in the mix
    and the harmonics of that pitch are masked out of it as the vocal."""
    fmin_hz: float = Field(100.0, gt=20)    # range searched for the sung pitch (first pass; the second pass
    fmax_hz: float = Field(1000.0, gt=20)   # narrows it to an octave either side of the line's median)
    harmonics: int = Field(30, ge=1)        # harmonics of the sung pitch given to the vocal
    voicing: float = Field(0.35, gt=0, lt=1)  # a frame is sung when its line is louder than this x the 90th pct
    block_s: float = Field(30.0, ge=5)      # songs are masked in blocks of this length (bounded memory)

    @model_validator(mode="after")
    def _check(self) -> "HarmonicConfig":
        if self.fmax_hz <= self.fmin_hz:
            raise ValueError("fmax_hz must be above fmin_hz")
        return self


class DemucsConfig(Strict):
    """The learned separator: HTDemucs (htdemucs / htdemucs_ft) from a weights folder, never downloaded."""
    model: str = "htdemucs"     # the bag name: <weights>/<model>.yaml lists the signatures it averages
    weights: str = ".v2m/weights/demucs"   # local folder or s3:// prefix: <model>.yaml + <sig>.safetensors or .th
    segment_s: float = Field(0.0, ge=0)    # seconds per model call; 0 = the model's own training segment
    overlap: float = Field(0.25, ge=0, lt=1)  # share of each segment overlapping the next (crossfaded)
    batch_size: int = Field(4, ge=1)       # segments per forward pass (the GPU's parallelism)
    device: str = "auto"                   # auto (cuda when present) | cpu | cuda | cuda:N


class QualityRange(Strict):
    """A quality criterion scores 0 at `bad`, 1 at `good`, linearly between (either may be the larger)."""
    bad: float
    good: float

    @model_validator(mode="after")
    def _check(self) -> "QualityRange":
        if self.bad == self.good:
            raise ValueError("bad and good must differ")
        return self


class QualityConfig(Strict):
    """Estimates made without ground truth (tasks/data/separation_quality.py), in dB."""
    vocal_share_db: QualityRange = QualityRange(bad=-35.0, good=-20.0)  # vocal energy / mix energy
    lead_db: QualityRange = QualityRange(bad=1.0, good=3.0)  # the sung line above the loudest other pitch
    vocal_in_instrumental_db: QualityRange = QualityRange(bad=-3.0, good=-12.0)  # on the sung harmonics
    accompaniment_in_vocal_db: QualityRange = QualityRange(bad=0.0, good=-6.0)   # off them, in the vocal
    residual_db: QualityRange = QualityRange(bad=-20.0, good=-40.0)  # mix - (vocal + instrumental)


class SeparateConfig(Strict):
    method: Literal["harmonic", "demucs"] = "harmonic"  # harmonic: weight-free; demucs: learned (weights)
    min_quality: float = Field(0.5, ge=0, le=1)  # tracks whose weakest criterion scores below are quarantined
    quality: QualityConfig = QualityConfig()
    harmonic: HarmonicConfig = HarmonicConfig()
    demucs: DemucsConfig = DemucsConfig()
