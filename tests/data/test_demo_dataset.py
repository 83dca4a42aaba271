"""Tests for the demo dataset builder (tasks/data): layout, labels, stems, determinism, sung melody."""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf

from tasks.data import demo, render, voice
from tasks.data.chorales import Chorale, loop_and_cut, pick_chorales
from v2m.config import DemoConfig

SEED = 7
# 2 chorales x 2 styles, 3 artists; small durations and rate keep the whole file well under a minute
SMALL = DemoConfig(n_tracks=4, n_artists=3, styles_per_chorale=2, min_duration_s=8, max_duration_s=12,
                   sample_rate=22050, blank_label_fraction=0.5)
# fallbacks; one language and two artists so that both a female and a male (octave down) singer appear
FALLBACK = SMALL.model_copy(update={"n_tracks": 2, "n_artists": 2, "styles_per_chorale": 1,
                                   "languages": ["fr"], "renderer": "synth", "voice": "formant"})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chorale-cache")


@pytest.fixture(scope="module")
def built(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("demo")
    calls = []
    summary = demo.build_demo_dataset(out, SMALL, SEED, cache_dir=cache, progress=lambda d, t: calls.append((d, t)))
    return out, summary, calls


@pytest.fixture(scope="module")
def fallback(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("fallback")
    return out, demo.build_demo_dataset(out, FALLBACK, SEED, cache_dir=cache)


def melody_agreement(out: Path, cfg: DemoConfig, cache: Path, index: int) -> tuple[float, float]:
    """pyin on a track's vocal vs its score: (pitch-class agreement, within-a-semitone agreement) over
    voiced frames inside notes (edges skipped: syllable onsets are consonants)."""
    chorales = pick_chorales(math.ceil(cfg.n_tracks / cfg.styles_per_chorale), SEED, cache)
    plan = demo.plan_tracks(cfg, SEED, chorales, voice.make_artists(cfg.n_artists, cfg.languages, SEED))[index]
    y, sr = librosa.load(out / plan.track_id / "vocals.wav", sr=16000)
    sec, shift = 60 / plan.bpm, -12 if plan.artist.gender == "male" else 0  # male singers: an octave down
    return score_agreement(y, sr, [(m + shift, on * sec, d * sec) for m, on, d in
                                   demo.looped(plan, cfg).parts["Soprano"]])


def score_agreement(y: np.ndarray, sr: int, notes) -> tuple[float, float]:
    f0, voiced, _ = librosa.pyin(y, fmin=80, fmax=1000, sr=sr, frame_length=1024, hop_length=256)
    t = librosa.times_like(f0, sr=sr, hop_length=256)
    pc_hits = exact_hits = total = 0
    for midi, on, dur in notes:
        sel = voiced & (t > on + 0.05) & (t < on + dur - 0.08)
        sung = librosa.hz_to_midi(f0[sel])
        pc_hits += int((np.round(sung) % 12 == round(midi) % 12).sum())
        exact_hits += int((np.abs(sung - midi) < 0.5).sum())
        total += int(sel.sum())
    assert total > 50, "the tracker found almost no voiced frames inside notes"
    return pc_hits / total, exact_hits / total


def test_layout_and_columns(built):
    out, summary, calls = built
    assert read_csv(out / "metadata.csv")[0].keys() == set(demo.METADATA_COLUMNS)
    assert (out / "metadata.csv").read_text().splitlines()[0] == ",".join(demo.METADATA_COLUMNS)
    truth = read_csv(out / "ground_truth.csv")
    assert [r["track_id"] for r in truth] == [f"demo_{i:04d}" for i in range(1, SMALL.n_tracks + 1)]
    for r in truth:
        assert {p.name for p in (out / r["track_id"]).iterdir()} == {"vocals.wav", "instrumental.wav"}
    card = (out / "DATASET_CARD.md").read_text()
    assert f"seed={SEED}" in card and f"`{summary['renderer']}`" in card and f"`{summary['voice']}`" in card
    assert summary["n_tracks"] == SMALL.n_tracks and sum(summary["genres"].values()) == SMALL.n_tracks
    assert calls[-1] == (SMALL.n_tracks, SMALL.n_tracks) and len(calls) == SMALL.n_tracks
    assert math.isclose(summary["total_duration_s"], sum(float(r["duration_s"]) for r in truth), abs_tol=0.01)


@pytest.mark.parametrize("which", ["built", "fallback"])
def test_stems(which, request):
    out, cfg = request.getfixturevalue(which)[0], SMALL if which == "built" else FALLBACK
    for r in read_csv(out / "ground_truth.csv"):
        infos = [sf.info(str(out / r["track_id"] / f"{s}.wav")) for s in ("vocals", "instrumental")]
        assert {(i.samplerate, i.channels, i.subtype, i.frames) for i in infos} == {
            (cfg.sample_rate, 1, "PCM_16", infos[0].frames)}, "stems differ in rate/channels/format/length"
        assert abs(infos[0].frames / cfg.sample_rate - float(r["duration_s"])) < 0.01
        bar_s = 4 * 60 / int(r["bpm"])
        assert cfg.min_duration_s - bar_s <= float(r["duration_s"]) <= cfg.max_duration_s + 1e-3
        for s in ("vocals", "instrumental"):
            audio, _ = sf.read(str(out / r["track_id"] / f"{s}.wav"), dtype="float32")
            assert np.isfinite(audio).all() and np.abs(audio).max() > 0.1, f"{r['track_id']}/{s} is silent"
            assert np.sqrt(np.mean(audio[: cfg.sample_rate * 4] ** 2)) > 0.01, f"{r['track_id']}/{s}: no start"


def test_labels(built):
    out, _, _ = built
    meta, truth = read_csv(out / "metadata.csv"), read_csv(out / "ground_truth.csv")
    blank = [m["bpm"] == "" for m in meta]
    assert sum(blank) == round(SMALL.blank_label_fraction * SMALL.n_tracks)
    for m, t in zip(meta, truth):
        assert (m["bpm"] == "") == (m["key"] == ""), "bpm and key are blanked together"
        assert (m["genre"], m["artist"], m["language"]) == (t["genre"], t["artist"], t["language"])
        assert m["mood"] == render.STYLES[m["genre"]].mood
        lo, hi = render.STYLES[t["genre"]].bpm
        assert lo <= int(t["bpm"]) <= hi
        assert t["key"].split()[1] in ("major", "minor") and "-" not in t["key"]
        if m["bpm"]:
            assert (int(m["bpm"]), m["key"]) == (int(t["bpm"]), t["key"])


def test_artists_chorales_and_genres(built):
    out, _, _ = built
    truth = read_csv(out / "ground_truth.csv")
    by_chorale: dict[str, list[dict]] = {}
    for r in truth:
        by_chorale.setdefault(r["chorale"], []).append(r)
    assert len(by_chorale) == math.ceil(SMALL.n_tracks / SMALL.styles_per_chorale)
    for rows in by_chorale.values():
        assert len({r["artist"] for r in rows}) == 1, "a chorale must be sung by one artist"
        assert len({r["genre"] for r in rows}) == len(rows), "a chorale's renderings must differ in style"
    genres = Counter(r["genre"] for r in truth)
    assert set(genres) == set(SMALL.styles) and max(genres.values()) - min(genres.values()) <= 1
    artists = voice.make_artists(SMALL.n_artists, SMALL.languages, SEED)
    assert {a.language for a in artists} == set(SMALL.languages)
    assert {r["language"] for r in truth} <= set(SMALL.languages)
    assert all(r["language"] == next(a.language for a in artists if a.name == r["artist"]) for r in truth)


def test_deterministic(built, tmp_path, cache):
    out, summary, _ = built
    again = demo.build_demo_dataset(tmp_path, SMALL, SEED, cache_dir=cache, workers=1)  # serial vs parallel
    assert {k: v for k, v in again.items() if k != "build_s"} == {k: v for k, v in summary.items() if k != "build_s"}
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (tmp_path / f).read_bytes(), f"{f} differs between identical builds"


def test_vocal_follows_melody(built, cache):
    out, summary, _ = built
    for i in range(SMALL.n_tracks):
        pc, exact = melody_agreement(out, SMALL, cache, i)
        assert pc >= 0.8 and exact >= 0.7, f"track {i} ({summary['voice']}): pitch class {pc:.2f}, exact {exact:.2f}"


def test_fallbacks(fallback, cache):
    out, summary = fallback
    assert (summary["renderer"], summary["voice"]) == ("synth", "formant")
    truth = read_csv(out / "ground_truth.csv")
    assert {(r["renderer"], r["voice"]) for r in truth} == {("synth", "formant")}
    assert {r["language"] for r in truth} == {"fr"}
    genders = set()
    for i, r in enumerate(truth):
        genders.add(voice.make_artists(2, ["fr"], SEED)[int(r["artist"][-2:]) - 1].gender)
        pc, exact = melody_agreement(out, FALLBACK, cache, i)  # exact: the male octave shift is right
        assert pc >= 0.8 and exact >= 0.7, f"track {i}: pitch class {pc:.2f}, exact {exact:.2f}"
    assert genders == {"female", "male"}


@pytest.mark.parametrize("language", ["en", "fr", "ar"])
def test_espeak_sings_each_language(language):
    assert voice.espeak_available(), "espeak-ng is not installed (`make test` installs it with apt)"
    artist = voice.make_artists(2, [language], SEED)[1]  # the male voice: the lowest notes
    notes = [(m - 12, 0.45 * k, 0.4) for k, m in enumerate([60, 62, 64, 65, 67, 69, 71, 72])]  # C major scale
    words = voice.lyrics(len(notes), language, np.random.default_rng(0))
    with voice.espeak_workspace() as root:
        y = voice.sing(notes, words, artist, "espeak", 16000, 0, root)
    pc, exact = score_agreement(y, 16000, notes)
    assert pc >= 0.8 and exact >= 0.7, f"{language}: pitch class {pc:.2f}, exact {exact:.2f}"


def test_forced_engines_that_are_missing_fail_clearly(monkeypatch):
    monkeypatch.setattr(render, "fluidsynth_available", lambda: False)
    monkeypatch.setattr(voice, "espeak_available", lambda: False)
    assert (render.resolve_renderer("auto"), voice.resolve_voice("auto")) == ("synth", "formant")
    with pytest.raises(RuntimeError, match="fluidsynth"):
        render.resolve_renderer("fluidsynth")
    with pytest.raises(RuntimeError, match="espeak-ng"):
        voice.resolve_voice("espeak")


def test_loop_and_cut():
    # 1-beat pickup, three 4/4 bars, a 3-beat last bar: 16 ql
    ch = Chorale("x", "C major", "4/4", 16.0, [0.0, 1.0, 5.0, 9.0, 13.0], [-3.0, 1.0, 5.0, 9.0, 13.0],
                 {p: [(60, float(q), 1.0) for q in range(16)] for p in ("Soprano", "Alto", "Tenor", "Bass")})
    looped, loops = loop_and_cut(ch, 30.0, 40.0)
    assert loops == 2 and looped.length_ql == 32.0 and len(looped.parts["Soprano"]) == 32
    cut, loops = loop_and_cut(ch, 30.0, 28.0)
    assert loops == 2 and cut.length_ql == 25.0  # the last bar line at or before 28 ql
    assert all(on + d <= 25.0 for notes in cut.parts.values() for _, on, d in notes)
    # drums: the pickup bar's beat is beat 4 of its nominal bar, and the loop seam makes one full bar
    kicks = [t for k, t in render.drum_hits(looped, render.STYLES["disco"].drums) if k == render.KICK]
    assert kicks == [float(b) for b in range(32)]
    snares = [t for k, t in render.drum_hits(looped, render.STYLES["pop"].drums) if k == render.SNARE]
    assert snares == [0.0] + [float(b) for b in range(2, 32, 2)]


def test_demo_as_finished_songs_keeps_the_stems_they_are_the_sum_of(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import yaml
    from tests.conftest import ROOT
    from v2m.audio import read_mono
    from v2m.cli import app
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["demo"].update(SMALL.model_dump(include={"n_artists", "styles_per_chorale", "min_duration_s",
                                                         "max_duration_s", "sample_rate"}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "mixes"
    res = CliRunner().invoke(app, ["data", "demo", "--mixes", "--out", str(out), "--n-tracks", "2",
                                   "--params", str(tmp_path / "params.yaml")])
    assert res.exit_code == 0, res.output
    assert f"2 mixes in {out} (true stems in {out / 'stems'})" in res.output
    ids = [r["track_id"] for r in read_csv(out / "metadata.csv")]
    assert ids == ["demo_0001", "demo_0002"] and (out / "stems" / "DATASET_CARD.md").is_file()
    for tid in ids:
        mix, sr = read_mono(out / f"{tid}.wav")
        (vocal, _), (inst, _) = (read_mono(out / "stems" / tid / f"{s}.wav") for s in ("vocals", "instrumental"))
        assert sr == SMALL.sample_rate and np.abs(mix - vocal - inst).max() < 2e-4  # 16-bit rounding only
        assert np.abs(mix).max() < 0.9  # never clipped: scaled with its stems when the sum would
