"""Typed, validated view of params.yaml — the one place for knobs.

Every model forbids unknown keys, so a typo such as `data.splt` fails at load instead of silently
falling back to a default. Errors name the file, the key path and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from v2m.config_audioldm import AudioLDMConfig
from v2m.config_base import Strict
from v2m.config_listening import HumanPreferenceConfig, ListeningConfig
from v2m.errors import UserError
from v2m.config_musicgen import MusicGenConfig
from v2m.config_separate import SeparateConfig
from v2m.config_serve import GenerateConfig, OnlineEvidenceConfig, ServeConfig
from v2m.config_train import TrainConfig, TrainSection, resolve_train

__all__ = ["ConfigError", "Params", "TrainConfig", "load_params"]

PARAMS_FILE = "params.yaml"


class ConfigError(UserError, ValueError):
    """The configuration is wrong; the message names the file, the key and the reason."""


class DemoConfig(Strict):
    n_tracks: int = Field(12, ge=1)
    n_artists: int = Field(6, ge=1)
    styles: list[Literal["pop", "rock", "disco", "classical"]] = ["pop", "rock", "disco", "classical"]
    styles_per_chorale: int = Field(2, ge=1)
    languages: list[Literal["en", "fr", "ar"]] = ["en", "fr", "ar"]
    blank_label_fraction: float = Field(0.5, ge=0, le=1)
    min_duration_s: float = Field(40.0, gt=0)
    max_duration_s: float = Field(70.0, gt=0)
    sample_rate: int = Field(44100, ge=8000)
    renderer: Literal["auto", "fluidsynth", "synth"] = "auto"
    voice: Literal["auto", "espeak", "formant"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "DemoConfig":
        if self.max_duration_s < self.min_duration_s:
            raise ValueError("max_duration_s must be >= min_duration_s")
        if not self.styles or not self.languages:
            raise ValueError("styles and languages must not be empty")
        if self.styles_per_chorale > len(self.styles):
            raise ValueError("styles_per_chorale cannot exceed the number of styles")
        return self


class ValidateConfig(Strict):
    min_duration_s: float = Field(5.0, gt=0)
    max_duration_s: float = Field(1200.0, gt=0)
    max_length_mismatch_s: float = Field(0.5, ge=0)
    silence_dbfs: float = Field(-60.0, lt=0)


class NormalizeConfig(Strict):
    target_lufs: float = Field(-20.0, lt=0)
    peak_dbfs: float = Field(-1.0, le=0)
    musicgen_sr: int = Field(32000, ge=8000)
    audioldm_sr: int = Field(16000, ge=8000)
    clap_sr: int = Field(48000, ge=8000)


class LabelConfig(Strict):
    sr: int = Field(16000, ge=8000)


class SplitConfig(Strict):
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave room for a train split (< 1)")
        return self


class ChunkConfig(Strict):
    chunk_s: float = Field(gt=0)
    hop_s: float = Field(gt=0)
    min_chunk_s: float = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ChunkConfig":
        if self.min_chunk_s > self.chunk_s:
            raise ValueError("min_chunk_s must be <= chunk_s")
        return self


class SegmentConfig(Strict):
    musicgen: ChunkConfig = ChunkConfig(chunk_s=30.0, hop_s=30.0, min_chunk_s=10.0)
    audioldm: ChunkConfig = ChunkConfig(chunk_s=20.0, hop_s=20.0, min_chunk_s=10.0)
    vocal_active_dbfs: float = Field(-45.0, lt=0)
    min_vocal_active: float = Field(0.2, ge=0, le=1)


class DataConfig(Strict):
    raw_dir: str = "data/raw"
    # Finished songs instead of stems: [] = raw_dir holds your stems (the default); [data/mixes] = that folder holds
    # songs (metadata.csv + <track_id>.wav|flac|mp3), which dvc.yaml's `separate` stage splits into raw_dir. A list
    # because DVC has no conditional stages: `separate` is a foreach over it, so an empty list means no stage.
    mixes: list[str] = Field(default_factory=list, max_length=1)
    demo: DemoConfig = DemoConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    normalize: NormalizeConfig = NormalizeConfig()
    label: LabelConfig = LabelConfig()
    split: SplitConfig = SplitConfig()
    segment: SegmentConfig = SegmentConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        for folder in self.mixes:
            parts = Path(folder).parts
            if Path(folder).is_absolute() or ".." in parts or not parts:
                raise ValueError(f"mixes: {folder!r} must be a folder inside the project (a relative path)")
            if Path(folder) == Path(self.raw_dir) or Path(self.raw_dir) in Path(folder).parents \
                    or Path(folder) in Path(self.raw_dir).parents:
                raise ValueError(f"mixes: {folder!r} overlaps raw_dir {self.raw_dir!r}; the separate stage writes "
                                 f"raw_dir from it")
        return self

    @property
    def source(self) -> str:
        """What the user adds to DVC: 'mixes' (songs to separate) or 'stems' (raw_dir as it is)."""
        return "mixes" if self.mixes else "stems"

    @property
    def input_dir(self) -> str:
        """The folder the user's data lives in and `dvc add`s: the mixes folder, or raw_dir."""
        return self.mixes[0] if self.mixes else self.raw_dir


class S3RemoteConfig(Strict):
    url: str = "s3://voice2music/dvc"
    endpoint_url: str = ""
    profile: str = ""

    @model_validator(mode="after")
    def _check(self) -> "S3RemoteConfig":
        if not self.url.startswith("s3://"):
            raise ValueError(f"url must start with s3:// (got {self.url!r})")
        return self


class DvcConfig(Strict):
    remote: Literal["local", "s3"] = "local"
    local_url: str = ".v2m/dvc-remote"
    s3: S3RemoteConfig = S3RemoteConfig()


class TrackingConfig(Strict):
    """MLflow. Empty values = the embedded defaults under .v2m/ (or MLFLOW_TRACKING_URI if set)."""
    uri: str = ""
    artifact_location: str = ""


class EvaluationConfig(Strict):
    """tasks/evaluation/evaluate.py: what is generated and how it is scored."""
    split: Literal["train", "val", "test"] = "test"
    max_samples: int = Field(0, ge=0)  # 0 = every chunk of the split
    duration_s: float = Field(0.0, ge=0)  # seconds generated per chunk; 0 = the whole chunk
    seed: int = 1234  # sample i uses seed + i: the same seeds for every model compared
    audio_samples: int = Field(3, ge=0)  # chunks whose vocal / reference / output are logged as audio
    clap_weights: str = ""  # a local folder or s3:// prefix with a transformers ClapModel; "" = weight-free FAD


class PromotionConfig(Strict):
    """Gates a challenger must pass to become champion (tasks/registry/gates.py). Comparative gates use the
    paired per-chunk differences (challenger - champion) on the same test set, with a bootstrap interval."""
    confidence: float = Field(0.95, gt=0, lt=1)  # level of every interval
    bootstrap_resamples: int = Field(1000, ge=50)
    bootstrap_seed: int = 0  # fixed: a decision can be re-derived exactly
    harmonic_fit_max_drop: float = Field(0.02, ge=0)  # lower bound of (challenger - champion) >= -this
    rhythm_fit_max_drop: float = Field(0.02, ge=0)    # likewise, eval/rhythm_fit
    fad_max_increase: float = Field(0.1, ge=0)  # upper bound of FAD(ch) - FAD(champ) <= this x FAD(champ)
    doubling_max_rise: float = Field(0.1, ge=0)  # upper bound of the chroma_cosine difference <= this
    repetition_max_rise: float = Field(0.1, ge=0)  # upper bound of the repetition difference <= this
    breakdown_max_regression: float = Field(0.05, ge=0)  # per language / genre harmonic fit, lower bound
    breakdown_min_n: int = Field(5, ge=1)  # groups with fewer test chunks are reported, not gated
    min_sanity_pass: float = Field(1.0, ge=0, le=1)  # share of raw outputs that must pass sanity
    required_metrics: list[str] = ["eval/fad", "eval/harmonic_fit", "eval/rhythm_fit", "eval/chroma_cosine",
                                   "eval/sanity_pass"]
    manual_approval: bool = False
    human_preference: HumanPreferenceConfig = HumanPreferenceConfig()  # the blind listening test's gate
    online_evidence: OnlineEvidenceConfig = OnlineEvidenceConfig()  # shadow pairs from `v2m serve`


class ReportConfig(Strict):
    """`v2m compare`'s report: a paired difference is a win or a loss only when its interval excludes 0 AND it is
    at least this large (an interval can exclude 0 around a difference of -0.0000 on many chunks)."""
    min_difference: float = Field(0.01, ge=0)  # metrics on [0, 1] / [-1, 1] scales
    min_fad_ratio: float = Field(0.05, ge=0)   # FAD (unbounded): this share of the first model's FAD


class RetrainConfig(Strict):
    """Defaults of the `retrain` flow's parameters."""
    backends: list[Literal["musicgen", "audioldm"]] = ["musicgen", "audioldm"]
    musicgen_stages: list[Literal["voice", "voice_text"]] = ["voice", "voice_text"]
    audioldm_variants: list[Literal["voice", "voice_text", "refined"]] = ["voice", "voice_text", "refined"]


class CodeSource(Strict):
    """Where a team-mode flow run gets the code: a git repository at a branch or a pinned commit."""
    repository: str = ""  # git URL (or a path to a bare repository); "" = deployments run from their folder
    branch: str = "main"
    commit: str = ""  # "" = the branch's head when the run starts

    @model_validator(mode="after")
    def _check(self) -> "CodeSource":
        if self.commit and not all(c in "0123456789abcdef" for c in self.commit.lower()):
            raise ValueError(f"commit must be a hexadecimal git commit id (got {self.commit!r})")
        return self


class OrchestrationConfig(Strict):
    """embedded: every step runs in this process (Prefect's temporary server). team: the parent flow hands
    fine-tuning and evaluation to deployments on the gpu-a40 pool and data/registry steps to the cpu pool
    (run_deployment), against PREFECT_API_URL. The environment variable V2M_ORCHESTRATION overrides `mode`."""
    mode: Literal["embedded", "team"] = "embedded"
    deployments: dict[str, str] = {"prepare-data": "prepare-data/prepare-data", "separate": "separate/separate",
                                   "finetune": "finetune/finetune", "evaluate": "evaluate/evaluate",
                                   "promote": "promote/promote"}
    gpu_hosts: dict[str, int] = {"local": 1}  # GPU host -> its GPU count; their sum is the `gpu` limit
    code: CodeSource = CodeSource()
    step_attempts: int = Field(2, ge=1)  # a step whose flow run crashed (its host was lost) is started again
    # Promotions and rollbacks hold a lease in the MLflow registry (tasks/registry/lease.py): a holder that
    # stops renewing it (killed, host lost) loses it after registry_lease_s; others wait up to registry_wait_s.
    registry_lease_s: float = Field(30.0, ge=1)
    registry_wait_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "OrchestrationConfig":
        bad = {h: n for h, n in self.gpu_hosts.items() if n < 1}
        if bad or not self.gpu_hosts:
            raise ValueError(f"gpu_hosts must map each GPU host to a GPU count >= 1 (got {self.gpu_hosts})")
        return self

    @property
    def total_gpus(self) -> int:
        return sum(self.gpu_hosts.values())


class Params(Strict):
    seed: int = 42
    workers: int = Field(0, ge=0)
    torch_threads: int = Field(0, ge=0)  # CPU threads per model process; 0 = torch's default (one per core)
    data: DataConfig = DataConfig()
    dvc: DvcConfig = DvcConfig()
    musicgen: MusicGenConfig = MusicGenConfig()
    audioldm: AudioLDMConfig = AudioLDMConfig()
    train: TrainSection = TrainSection()
    tracking: TrackingConfig = TrackingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    retrain: RetrainConfig = RetrainConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    promotion: PromotionConfig = PromotionConfig()
    listening: ListeningConfig = ListeningConfig()
    report: ReportConfig = ReportConfig()
    separate: SeparateConfig = SeparateConfig()
    generate: GenerateConfig = GenerateConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _presets_and_profiles(self) -> "Params":
        for name in ("musicgen", "audioldm"):
            cfg = getattr(self, name)
            if cfg.preset not in cfg.presets:
                raise ValueError(f"{name}.preset {cfg.preset!r} is not one of {', '.join(cfg.presets)}")
            if "crop_s" in cfg.model_fields_set:  # one place for the crop: the training profile
                raise ValueError(f"{name}.crop_s: the training crop is part of the training profile; set "
                                 f"{name}.presets.<preset>.train.crop_s or train.{name}.crop_s instead")
            self.train_config(name)  # the chosen preset's profile with the overrides (another preset: when chosen)
        return self

    def train_config(self, backend: str, preset: str | None = None) -> TrainConfig:
        """The training settings of a backend: its preset's profile with `train.<backend>` overrides on top.
        Raises ConfigError naming both places when the combination is invalid."""
        cfg = getattr(self, backend)
        preset = preset or cfg.preset
        try:
            return resolve_train(cfg.presets[preset].train, getattr(self.train, backend))
        except ValidationError as exc:
            raise ConfigError(f"train.{backend} over {backend}.presets.{preset}.train: " + "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'profile'}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors())) from None

    def backend_config(self, backend: str):
        """The backend's section with the crop of its resolved training profile (what the backend trains on)."""
        return getattr(self, backend).model_copy(update={"crop_s": self.train_config(backend).crop_s})


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        reason = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            reason = "unknown key (check the spelling; see params.yaml for the known keys)"
        lines.append(f"  {key}: {reason}")
    return "\n".join(lines)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ConfigError naming the file and key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(path, exc)) from exc
