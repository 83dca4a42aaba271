"""The learned separator on a tiny randomly initialised HTDemucs saved in the weights layout: it loads offline
and separates (quality is not asserted: the weights are random); missing weights fail saying where they go."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from torch import nn

from models.base import WeightsNotFoundError
from tasks.data.demucs_separator import Bag, load_bag, separate_batch
from tests.conftest import ROOT
from v2m.config_separate import DemucsConfig

SOURCES = ["drums", "bass", "other", "vocals"]
TINY = {"sources": SOURCES, "channels": 8, "depth": 4, "t_layers": 1, "bottom_channels": 0, "segment": Fraction(2)}


def tiny_model(seed: int = 0):
    from demucs.htdemucs import HTDemucs
    torch.manual_seed(seed)
    return HTDemucs(**TINY).eval()


def save_safetensors(model, folder: Path, sig: str) -> None:
    """As demucs' Hugging Face export: the tensors, and the class and init arguments as JSON metadata."""
    from safetensors.torch import save_file
    args, kwargs = model._init_args_kwargs
    kwargs = {k: ({"_type": "fraction", "numerator": v.numerator, "denominator": v.denominator}
                  if isinstance(v, Fraction) else v) for k, v in kwargs.items()}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{sig}.safetensors"),
              metadata={"klass": "demucs.htdemucs.HTDemucs", "args": json.dumps(list(args)),
                        "kwargs": json.dumps(kwargs)})


def save_release_th(model, folder: Path, sig: str) -> Path:
    """As the release files: a torch pickle of klass/args/kwargs/state (half precision), named <sig>-<sha8>.th."""
    args, kwargs = model._init_args_kwargs
    buf = io.BytesIO()
    torch.save({"klass": type(model), "args": args, "kwargs": kwargs, "training_args": {"lr": 3e-4},
                "state": {k: v.half() for k, v in model.state_dict().items()}}, buf)
    path = folder / f"{sig}-{hashlib.sha256(buf.getvalue()).hexdigest()[:8]}.th"
    path.write_bytes(buf.getvalue())
    return path


def write_bag(folder: Path, name: str, sigs: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"models": sigs}))


def mixes_folder(root: Path) -> Path:
    """Two songs: stereo 44.1 kHz and mono 22.05 kHz, of lengths that are no multiple of a segment."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    sf.write(root / "song_a.wav", 0.1 * rng.standard_normal((int(5.3 * 44100), 2)), 44100)
    sf.write(root / "song_b.flac", 0.1 * rng.standard_normal(int(3.7 * 22050)), 22050)
    (root / "metadata.csv").write_text("track_id,artist,title,genre,bpm,key,mood,language\n"
                                       "song_a,A,a,pop,,,,en\nsong_b,B,b,rock,,,,fr\n")
    return root


def separate_cli(tmp_path: Path, weights: Path, model: str) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["separate"].update(method="demucs")
    params["separate"]["demucs"].update(model=model, weights=str(weights), batch_size=3, device="cpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "no-hub-cache")}
    return subprocess.run([sys.executable, "-m", "v2m.cli", "data", "separate", str(tmp_path / "mixes"), "--out",
                           str(tmp_path / "raw"), "--params", str(tmp_path / "params.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_tiny_htdemucs_in_the_weights_layout_loads_offline_and_separates(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    write_bag(weights, "tinydemucs", ["a1b2c3d4"])
    save_safetensors(tiny_model(), weights, "a1b2c3d4")
    mixes_folder(tmp_path / "mixes")

    res = separate_cli(tmp_path, weights, "tinydemucs")
    assert res.returncode == 0, res.stderr
    report = {json.loads(line)["track_id"]: json.loads(line)
              for line in (tmp_path / "raw" / "separation.jsonl").read_text().splitlines()}
    fingerprint = load_bag(DemucsConfig(model="tinydemucs", weights=str(weights))).fingerprint
    for tid, name in (("song_a", "song_a.wav"), ("song_b", "song_b.flac")):
        assert report[tid]["method"] == "demucs" and report[tid]["model"] == f"tinydemucs@{fingerprint}"
        mix, sr = sf.read(tmp_path / "mixes" / name, always_2d=True)
        for stem in ("vocals", "instrumental"):  # the mix's own rate, channels and length, finite
            y, ysr = sf.read(tmp_path / "raw" / tid / f"{stem}.wav", always_2d=True)
            assert ysr == sr and y.shape == mix.shape and np.isfinite(y).all() and np.abs(y).max() > 0
        assert report[tid]["status"] in ("ok", "quarantined") and len(report[tid]["estimates"]) == 5  # judged

    # a second run reuses both tracks: the per-track cache keys the weights by content
    again = separate_cli(tmp_path, weights, "tinydemucs")
    assert again.returncode == 0 and "0 processed, 2 reused" in again.stderr, again.stderr


def test_release_th_files_load_without_running_pickled_code_and_match_safetensors(tmp_path: Path) -> None:
    model = tiny_model(seed=1)
    write_bag(tmp_path / "st", "bag", ["s1"])
    save_safetensors(model, tmp_path / "st", "s1")
    write_bag(tmp_path / "th", "bag", ["s1"])
    th = save_release_th(model, tmp_path / "th", "s1")
    audio = 0.1 * np.random.default_rng(1).standard_normal((2, 3 * 44100)).astype(np.float32)
    cfg = DemucsConfig(model="bag", batch_size=2)
    out = [separate_batch(load_bag(cfg.model_copy(update={"weights": str(tmp_path / d)})), [(audio, 44100)], cfg,
                          "cpu")[0] for d in ("st", "th")]
    # the release files store half precision: the same model up to fp16 rounding of the weights
    assert np.allclose(out[0][0], out[1][0], atol=2e-2) and np.corrcoef(out[0][0].ravel(), out[1][0].ravel())[0, 1] > 0.99

    th.write_bytes(th.read_bytes()[:-10] + b"0123456789")  # corrupt: its name's checksum no longer matches
    with pytest.raises(WeightsNotFoundError, match="corrupt"):
        load_bag(cfg.model_copy(update={"weights": str(tmp_path / "th")}))


def test_without_weights_the_error_names_where_they_go(tmp_path: Path) -> None:
    mixes_folder(tmp_path / "mixes")
    res = separate_cli(tmp_path, tmp_path / "weights-not-here", "htdemucs")
    assert res.returncode == 1
    message = " ".join(res.stderr.split())
    assert f"{tmp_path / 'weights-not-here' / 'htdemucs.yaml'}: not found" in message
    assert "never downloads" in message and "separate.demucs.weights" in message and ".safetensors" in message
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").glob("*/vocals.wav"))


class Passthrough(nn.Module):
    """A 'separator' that calls everything vocals: what comes out must be the song, reassembled."""

    def forward(self, x):
        zeros = torch.zeros_like(x)
        return torch.stack([zeros, zeros, zeros, x], dim=1)


def test_segments_overlap_add_and_batches_reassemble_each_song_exactly() -> None:
    rng = np.random.default_rng(2)
    songs = [(0.2 * rng.standard_normal((2, n)).astype(np.float32), 44100) for n in (44100 * 5 + 123, 30000, 44100)]
    bag = Bag([Passthrough()], [[1.0] * 4], SOURCES, 44100, 2, 2.0, "passthrough")
    for batch_size in (1, 4):
        cfg = DemucsConfig(batch_size=batch_size, overlap=0.25)
        for (mix, _), (vocals, inst) in zip(songs, separate_batch(bag, songs, cfg, "cpu")):
            assert vocals.shape == mix.shape and np.allclose(vocals, mix - mix.mean(axis=0).mean(), atol=1e-5)
            assert np.allclose(vocals + inst, mix, atol=1e-5)  # the stems add back to the song
    tiny = Bag([tiny_model(seed=2)], [[1.0] * 4], SOURCES, 44100, 2, 2.0, "tiny")
    one, four = (separate_batch(tiny, songs, DemucsConfig(batch_size=b), "cpu") for b in (1, 4))
    for (v1, i1), (v4, i4) in zip(one, four):  # batching changes nothing but speed
        assert np.allclose(v1, v4, atol=1e-4) and np.allclose(i1, i4, atol=1e-4)
