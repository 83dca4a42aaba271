"""Fixtures for model-level tests: a small prepared project (data, segments, model-input caches)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
from pathlib import Path

import librosa
import numpy as np
import pretty_midi
import pytest
import yaml

from tasks.data import chorales, render, voice
from tasks.data.chorales import loop_and_cut, pick_chorales

from tasks.data.cache_inputs import cache_dataset
from tasks.data.label import label_dataset
from tasks.data.normalize import normalize_dataset
from tasks.data.segment import segment_dataset
from tasks.data.split import split_dataset
from tasks.data.validate import validate_dataset
from tasks.evaluation.harmony import parse_key
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




# ---- rendered Bach chorales: the known-answer material of the evaluation metrics and the gates ------------
CHORALE_CACHE = ROOT / ".v2m" / "cache" / "chorales"
CHORALE_SR = 32000
N_CHORALES = 20
CHORALE_BPM, CHORALE_S = 90, 20.0
RENDER_VERSION = 3  # bump when the rendering below changes (invalidates the render cache)


def transposed(ch, semitones: int):
    return dataclasses.replace(ch, parts={k: [(p + semitones, on, d) for p, on, d in v] for k, v in ch.parts.items()})


def fit_length(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y, np.float32)[:n]
    y = np.pad(y, (0, n - y.size))
    return y * (0.7 / (np.abs(y).max() + 1e-9))


def tonic_drone(ch, seconds: float) -> pretty_midi.PrettyMIDI:
    """An organ-like drone: the tonic triad of the chorale's key held for the whole clip, on the strings
    the true accompaniment uses (so only the music differs, not the timbre)."""
    tonic, mode = parse_key(ch.key)
    triad = [48 + tonic, 48 + tonic + (3 if mode == "minor" else 4), 48 + tonic + 7]
    pm = pretty_midi.PrettyMIDI(initial_tempo=CHORALE_BPM)
    strings = pretty_midi.Instrument(program=render.STYLES["classical"].programs["Alto"])
    strings.notes = [pretty_midi.Note(72, p, 0.0, seconds) for p in triad]
    pm.instruments.append(strings)
    return pm


@pytest.fixture(scope="session")
def chorale_renders(request, tmp_path_factory) -> list[dict]:
    """N_CHORALES + 1 chorales, 20 s at 90 bpm: the soprano sung by the formant voice (the demo's
    dependency-free singer), alto + tenor + bass as classical strings (FluidSynth if it loads, else the
    numpy synth), the same accompaniment a tritone up, and a tonic-triad drone; plus where the first full
    bar starts and how long a bar lasts (s). Cached across runs in pytest's cache folder (.pytest_cache,
    cleared by --cache-clear), or per session in a temp folder with -p no:cacheprovider."""
    renderer = render.resolve_renderer("auto")
    name = f"v2m-chorale-renders-v{RENDER_VERSION}-c{chorales.CACHE_VERSION}-{renderer}"
    pytest_cache = getattr(request.config, "cache", None)
    cache = Path(pytest_cache.mkdir(name)) if pytest_cache is not None else tmp_path_factory.mktemp(name)
    singer = voice.make_artists(1, ["en"], seed=0)[0]
    words = [("la", "a"), ("loo", "u"), ("see", "i"), ("oh", "o"), ("day", "e")]
    picked = pick_chorales(N_CHORALES + 1, seed=11, cache_dir=CHORALE_CACHE)
    paths = [cache / f"{ch.name.replace('/', '__')}.npz" for ch in picked]

    def render_one(k: int, ch, path: Path) -> None:
        quarters = CHORALE_S * CHORALE_BPM / 60
        c, _ = loop_and_cut(ch, quarters, quarters)
        n, sec = int(CHORALE_S * CHORALE_SR), 60 / CHORALE_BPM
        notes = [(m, on * sec, d * sec) for m, on, d in c.parts["Soprano"]]
        stems = {
            "vocal": voice.sing(notes, words * (len(notes) // len(words) + 1), singer, "formant", CHORALE_SR, k),
            "true": render.render(render.arrange(c, "classical", CHORALE_BPM), CHORALE_SR, renderer, k),
            "tritone": render.render(render.arrange(transposed(c, 6), "classical", CHORALE_BPM), CHORALE_SR,
                                     renderer, k),
            "drone": render.render(tonic_drone(c, CHORALE_S), CHORALE_SR, renderer, k),
        }
        full = [b for b, nxt in zip(c.bars, c.bars[1:]) if abs(nxt - b - c.bar_ql) < 1e-6]
        tmp = path.with_suffix(f".{os.getpid()}.npz")
        np.savez(tmp, **{stem: np.round(fit_length(y, n) * 32767).astype(np.int16) for stem, y in stems.items()},
                 bar=np.array([full[0] * sec, c.bar_ql * sec]))
        tmp.replace(path)  # atomic: a concurrent session never reads half a file

    # pytest-xdist workers share the cache folder: each renders the chorales no other worker holds the lock of
    # (first pass, never waiting), then waits for the ones still being rendered (second pass): no chorale is
    # rendered twice, and two workers that need them at once share the work.
    for blocking in (False, True):
        for k, (ch, path) in enumerate(zip(picked, paths)):
            if path.is_file():
                continue
            with path.with_suffix(".lock").open("a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                except BlockingIOError:
                    continue
                if not path.is_file():
                    render_one(k, ch, path)
    out = []
    for ch, path in zip(picked, paths):
        with np.load(path) as z:
            stems = {stem: z[stem].astype(np.float32) / 32767 for stem in z.files if stem != "bar"}
            out.append(stems | {"name": ch.name, "key": ch.key, "bar_start_s": float(z["bar"][0]),
                                "bar_s": float(z["bar"][1])})
    return out


def shifted(y: np.ndarray, seconds: float, sr: int = CHORALE_SR) -> np.ndarray:
    n = int(round(seconds * sr))
    return np.concatenate([np.zeros(n, np.float32), y[: y.size - n]])


def stretched(y: np.ndarray, rate: float) -> np.ndarray:
    """The same accompaniment played `rate` times as fast (pitch kept), cut or padded to the same length."""
    z = librosa.effects.time_stretch(y, rate=rate).astype(np.float32)
    return np.pad(z[: y.size], (0, max(0, y.size - z.size)))


def looped_bar(c: dict, sr: int = CHORALE_SR) -> np.ndarray:
    """The first full bar of the true accompaniment, looped for the whole clip."""
    start, n = int(c["bar_start_s"] * sr), int(c["bar_s"] * sr)
    return np.resize(c["true"][start:start + n], c["true"].size).astype(np.float32)


def trivial_outputs(c: dict) -> dict[str, np.ndarray]:
    """What a generator can output without making music for the vocal (the gate tests' challengers)."""
    y = c["true"]
    return {"drone": c["drone"], "doubling": c["vocal"].copy(),
            "noise": (0.1 * np.random.default_rng(0).standard_normal(y.size)).astype(np.float32),
            "silence": np.zeros_like(y), "loop": looped_bar(c)}
