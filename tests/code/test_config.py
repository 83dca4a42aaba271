"""params.yaml is validated at load: unknown keys and bad values name the key path and the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from v2m.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_project_params_load_with_the_mission_defaults() -> None:
    p = load_params(ROOT / "params.yaml")
    assert p.data.segment.musicgen.chunk_s == 30.0 and p.data.segment.audioldm.chunk_s == 20.0
    assert (p.data.normalize.musicgen_sr, p.data.normalize.audioldm_sr, p.data.normalize.clap_sr) == (32000, 16000, 48000)


@pytest.mark.parametrize("mutate, key, reason", [
    (lambda r: r["data"]["split"].update(val_fraction=1.5), "data.split.val_fraction", "less than 1"),
    (lambda r: r["data"]["split"].update(val_fraction=0.5, test_fraction=0.5), "data.split",
     "must leave room for a train split"),
    (lambda r: r["data"].update(splt={}), "data.splt", "unknown key"),
    (lambda r: r["data"]["segment"]["musicgen"].update(chunk_s="long"), "data.segment.musicgen.chunk_s",
     "valid number"),
    (lambda r: r["data"]["demo"].update(renderer="midi"), "data.demo.renderer", "'auto', 'fluidsynth' or 'synth'"),
    (lambda r: r["dvc"]["s3"].update(url="http://bucket"), "dvc.s3", "must start with s3://"),
    (lambda r: r["data"]["validate"].update(silence_dbfs=3), "data.validate.silence_dbfs", "less than 0"),
    (lambda r: r["train"]["musicgen"].update(lr=0), "train.musicgen.lr", "greater than 0"),
    (lambda r: r["train"]["audioldm"].update(schedule="step"), "train.audioldm.schedule", "'cosine', 'linear'"),
    (lambda r: r["train"]["musicgen"].update(warmup_steps=50), "(top level)",
     "train.musicgen over musicgen.presets.tiny.train: profile: warmup_steps (50) exceeds max_steps (12)"),
    (lambda r: r["musicgen"].update(crop_s=5.0), "(top level)", "musicgen.crop_s: the training crop is part of"),
    (lambda r: r["musicgen"]["condition_dropout"].update(recipe="cfg"), "musicgen.condition_dropout.recipe",
     "'joint' or 'independent'"),
    (lambda r: r["data"].update(mixes=["/srv/songs"]), "data", "must be a folder inside the project"),
    (lambda r: r["data"].update(mixes=["data/raw/songs"]), "data", "overlaps raw_dir"),
    (lambda r: r["data"].update(mixes=["data/a", "data/b"]), "data.mixes", "at most 1 item"),
    (lambda r: r["separate"].update(method="spleeter"), "separate.method", "'harmonic' or 'demucs'"),
    (lambda r: r["separate"].update(min_quality=1.5), "separate.min_quality", "less than or equal to 1"),
    (lambda r: r["separate"]["quality"].update(lead_db={"bad": 2, "good": 2}), "separate.quality.lead_db",
     "bad and good must differ"),
    (lambda r: r["separate"]["demucs"].update(overlap=1.0), "separate.demucs.overlap", "less than 1"),
    (lambda r: r["report"].update(min_difference=-0.1), "report.min_difference", "greater than or equal to 0"),
])
def test_bad_values_name_the_key_and_the_reason(tmp_path: Path, mutate, key, reason) -> None:
    path = write(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: invalid configuration")
    line = next(l for l in msg.splitlines() if l.strip().startswith(key + ":"))
    assert reason in line, msg


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(bad)


def test_cli_exit_code_1_names_the_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, lambda r: r.update(workers=-1))
    res = subprocess.run([sys.executable, "-m", "v2m.cli", "config", "--params", str(path)],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert str(path) in res.stderr and "workers" in res.stderr
    usage = subprocess.run([sys.executable, "-m", "v2m.cli", "data", "validate"], capture_output=True, text=True)
    assert usage.returncode == 2  # usage error: missing RAW_DIR


def test_the_preset_chooses_its_training_profile_and_train_overrides_single_keys(tmp_path: Path) -> None:
    p = load_params(ROOT / "params.yaml")
    tiny, real = p.train_config("musicgen"), p.train_config("musicgen", "melody-1.5b")
    assert (tiny.lr, tiny.crop_s, tiny.precision) == (1e-3, 2.0, "auto")  # demo-sized
    assert 1e-5 <= real.lr <= 5e-5 and real.warmup_steps >= 100 and real.crop_s == 30.0  # fine-tuning values
    assert (real.precision, real.gradient_checkpointing, real.grad_accum) == ("bf16", True, 8)
    ldm = p.train_config("audioldm", "audioldm-s")
    assert 1e-5 <= ldm.lr <= 5e-5 and ldm.crop_s == 10.24 and ldm.precision == "bf16"
    switched = p.model_copy(update={"musicgen": p.musicgen.model_copy(update={"preset": "melody-1.5b"})})
    assert switched.train_config("musicgen") == real and switched.backend_config("musicgen").crop_s == 30.0

    path = write(tmp_path, lambda r: r["train"]["musicgen"].update(lr=2.0e-5, max_steps=500))
    over = load_params(path)
    assert over.train_config("musicgen").lr == 2.0e-5 and over.train_config("musicgen").max_steps == 500
    assert over.train_config("musicgen").crop_s == 2.0 and over.train_config("audioldm") == p.train_config("audioldm")
    with pytest.raises(ConfigError, match="presets.melody-1.5b.train: profile: warmup_steps .1000. exceeds max_steps"):
        over.train_config("musicgen", "melody-1.5b")  # checked (with a clear error) when that preset is chosen
