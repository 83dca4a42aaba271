"""Fixtures for model-level tests: a small prepared project (data, segments, model-input caches)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tasks.data.cache_inputs import cache_dataset
from tasks.data.label import label_dataset
from tasks.data.normalize import normalize_dataset
from tasks.data.segment import segment_dataset
from tasks.data.split import split_dataset
from tasks.data.validate import validate_dataset
from tests.conftest import ROOT, make_dataset
from v2m.config import load_params

# Small everything: 4 s chunks, 2 s training crops, 6 steps. The tiny MusicGen decoder has dropout on (as the
# real one, 0.1), so kill-and-resume tests also prove that dropout's RNG is restored.
OVERRIDES = {
    "data": {"segment": {"musicgen": {"chunk_s": 4.0, "hop_s": 4.0, "min_chunk_s": 2.0},
                         "audioldm": {"chunk_s": 3.0, "hop_s": 3.0, "min_chunk_s": 2.0}}},
    "musicgen": {"presets": {"tiny": {"arch": {"dropout": 0.1}}}},
    "train": {b: {"max_steps": 6, "batch_size": 2, "checkpoint_every": 2, "val_every": 3, "samples": 1,
                  "sample_duration_s": 1.0, "lr": 1e-3, "warmup_steps": 1, "crop_s": 2.0}
              for b in ("musicgen", "audioldm")},
    "evaluation": {"duration_s": 1.5, "audio_samples": 1},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory) -> Path:
    """A project folder with params, prepared data and both model-input caches (copied by each test)."""
    root = tmp_path_factory.mktemp("ft-template")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(merge(raw, OVERRIDES)))
    p = load_params(root / "params.yaml")
    make_dataset(root / "data/raw", n_tracks=6, n_artists=3, seconds=12.0)
    d, w = p.data, root / "data"
    validate_dataset(w / "raw", w / "validated", d.validate_, 1)
    normalize_dataset(w / "validated", w / "normalized", d.normalize, 1)
    label_dataset(w / "normalized", w / "labelled", d.label, d.normalize.audioldm_sr, 1)
    split_dataset(w / "labelled", w / "split", d.split, p.seed)
    segment_dataset(w / "split", w / "segments", d.segment, d.normalize, 1)
    for backend in ("musicgen", "audioldm"):
        cache_dataset(p, backend, w / "segments", w / "cache" / backend)
    (root / ".v2m").mkdir()
    (root / ".v2m" / "data_version.json").write_text(json.dumps({"data_version": "test-data-v1"}))
    return root


@pytest.fixture
def root(prepared_root: Path, tmp_path: Path, monkeypatch) -> Path:
    dest = tmp_path / "proj"
    shutil.copytree(prepared_root, dest, symlinks=True)
    monkeypatch.chdir(dest)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return dest


