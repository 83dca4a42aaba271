"""`v2m generate` from a saved model folder: the three modes, and a clear error for each kind of bad vocal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from models import save_model
from models.musicgen import MusicGenBackend
from v2m.cli import app
from v2m.config import load_params

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    p = load_params(ROOT / "params.yaml")
    d = tmp_path_factory.mktemp("mg") / "model"
    save_model(MusicGenBackend.from_preset(p.musicgen, "tiny", seed=0), d)
    return d


def gen(model_dir: Path, *args: str):
    return runner.invoke(app, ["generate", "--checkpoint", str(model_dir), "--params", str(ROOT / "params.yaml"),
                               *args])


@pytest.mark.parametrize("mode", ["voice", "voice_text", "text"])
def test_three_modes_write_audio_of_the_requested_length(model_dir: Path, tmp_path: Path, mode: str) -> None:
    vocal = tmp_path / "v.wav"
    sf.write(vocal, 0.3 * np.sin(np.arange(44100 * 2) / 44100 * 2 * np.pi * 330), 44100)
    args = {"voice": ["--vocal", str(vocal)], "voice_text": ["--vocal", str(vocal), "--prompt", "disco music"],
            "text": ["--prompt", "disco music"]}[mode]
    res = gen(model_dir, *args, "--duration", "1.5", "-o", str(tmp_path / "out.wav"))
    assert res.exit_code == 0, res.output
    audio, sr = sf.read(tmp_path / "out.wav")
    assert sr == 32000 and len(audio) == 48000 and np.isfinite(audio).all()


def test_without_a_duration_the_instrumental_is_as_long_as_the_vocal(model_dir: Path, tmp_path: Path) -> None:
    sf.write(tmp_path / "v.wav", 0.3 * np.sin(np.arange(int(22050 * 1.3)) / 22050 * 2 * np.pi * 330), 22050)
    res = gen(model_dir, "--vocal", str(tmp_path / "v.wav"), "-o", str(tmp_path / "out.wav"))
    assert res.exit_code == 0, res.output
    audio, sr = sf.read(tmp_path / "out.wav")
    assert sr == 32000 and abs(len(audio) - 1.3 * sr) <= sr * 0.02  # 1.3 s, like the vocal (within a frame)
    # text only: serve.default_duration_s, as `v2m serve` does
    assert load_params(ROOT / "params.yaml").serve.default_duration_s == 10.0
    short = tmp_path / "params.yaml"
    short.write_text((ROOT / "params.yaml").read_text().replace("default_duration_s: 10.0", "default_duration_s: 0.7"))
    res = runner.invoke(app, ["generate", "--checkpoint", str(model_dir), "--params", str(short), "--prompt", "pop",
                              "-o", str(tmp_path / "text.wav")])
    assert res.exit_code == 0, res.output
    assert abs(len(sf.read(tmp_path / "text.wav")[0]) - 0.7 * 32000) <= 32000 * 0.02


def test_bad_vocals_give_a_clear_error_naming_the_file(model_dir: Path, tmp_path: Path) -> None:
    cases = {}
    (tmp_path / "garbage.wav").write_bytes(b"RIFF....WAVEnot audio at all" * 20)
    cases["garbage.wav"] = "cannot decode audio"
    sf.write(tmp_path / "silent.wav", np.zeros(16000 * 2), 16000)
    cases["silent.wav"] = "silent"
    sf.write(tmp_path / "short.wav", 0.3 * np.ones(1600), 16000)
    cases["short.wav"] = "too short"
    (tmp_path / "notes.txt").write_text("la la la")
    cases["notes.txt"] = "unsupported format"
    cases["missing.wav"] = "file not found"
    for name, message in cases.items():
        res = gen(model_dir, "--vocal", str(tmp_path / name), "--duration", "1", "-o", str(tmp_path / "o.wav"))
        assert res.exit_code == 1, (name, res.output)
        assert name in res.output and message in res.output, (name, res.output)
    assert not (tmp_path / "o.wav").exists()


def test_usage_errors_exit_2(model_dir: Path, tmp_path: Path) -> None:
    assert gen(model_dir, "--duration", "1", "-o", str(tmp_path / "o.wav")).exit_code == 2  # no vocal, no prompt
    res = runner.invoke(app, ["generate", "--prompt", "x", "-o", str(tmp_path / "o.wav")])  # no model
    assert res.exit_code == 2
