"""The data stages as plain functions: normalise, label, split, segment, and incremental re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from tasks.data.label import label_dataset
from tasks.data.normalize import normalize_dataset
from tasks.data.segment import chunk_spans, segment_dataset
from tasks.data.split import SplitError, assign_splits, split_dataset
from tasks.data.validate import validate_dataset
from tests.conftest import make_dataset, small_params, write_track
from v2m.config import ChunkConfig, SplitConfig

P = small_params()


def run_all(raw: Path, work: Path) -> dict:
    d = P.data
    out = {"validate": validate_dataset(raw, work / "validated", d.validate_, P.workers)}
    out["normalize"] = normalize_dataset(work / "validated", work / "normalized", d.normalize, P.workers)
    out["label"] = label_dataset(work / "normalized", work / "labelled", d.label, d.normalize.audioldm_sr, P.workers)
    out["split"] = split_dataset(work / "labelled", work / "split", d.split, P.seed)
    out["segment"] = segment_dataset(work / "split", work / "segments", d.segment, d.normalize, P.workers)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("pipeline")
    make_dataset(base / "raw", n_tracks=6, n_artists=3)
    return base / "raw", base / "work", run_all(base / "raw", base / "work")


def test_normalize_writes_every_rate_mono_and_loudness_matched(prepared) -> None:
    _, _, res = prepared
    n = P.data.normalize
    for track in res["normalize"]["tracks"]:
        files = track["normalized"]
        assert set(files) == {"vocals_32k", "instrumental_32k", "vocals_16k", "instrumental_16k", "vocals_48k"}
        for name, path in files.items():
            info = sf.info(path)
            assert info.channels == 1
            assert info.samplerate == int(name.split("_")[1][:-1]) * 1000
            assert abs(info.duration - track["duration_s"]) < 0.01
        audio, sr = sf.read(files["vocals_32k"])
        lufs = pyloudnorm.Meter(sr).integrated_loudness(audio)
        peak = 20 * np.log10(np.abs(audio).max())
        # Loud enough to reach the target, or held back by the peak ceiling.
        assert abs(lufs - n.target_lufs) < 0.5 or abs(peak - n.peak_dbfs) < 0.2, (lufs, peak)


def test_label_fills_blanks_and_keeps_given_values(prepared) -> None:
    raw, _, res = prepared
    tracks = {t["track_id"]: t for t in res["label"]["tracks"]}
    for tid, t in tracks.items():
        i = int(tid[1:])
        if i % 2 == 0:  # metadata gave bpm and key
            assert (t["bpm"], t["key"]) == (100.0 + 10 * (i % 3), "C major")
            assert t["bpm_source"] == t["key_source"] == "metadata"
        else:
            assert t["bpm_source"] == t["key_source"] == "estimated"
            assert 40 <= t["bpm"] <= 250
            assert t["key"].split()[1] in ("major", "minor")


def test_split_is_artist_disjoint_and_covers_every_split(prepared) -> None:
    _, _, res = prepared
    tracks = res["split"]["tracks"]
    artists_by_split = {s: {t["artist"] for t in tracks if t["split"] == s} for s in ("train", "val", "test")}
    assert all(artists_by_split.values()), artists_by_split
    assert not artists_by_split["train"] & artists_by_split["val"]
    assert not artists_by_split["train"] & artists_by_split["test"]
    assert not artists_by_split["val"] & artists_by_split["test"]


def test_split_is_deterministic_and_stratified() -> None:
    # 12 artists, 2 tracks each; genres and languages spread so that stratification is possible.
    tracks = [{"track_id": f"{a}-{k}", "artist": f"a{a}", "genre": ["pop", "rock", "disco"][(a + k) % 3],
               "language": ["en", "fr", "ar"][a % 3]} for a in range(12) for k in range(2)]
    cfg = SplitConfig(val_fraction=0.25, test_fraction=0.25)
    first, second = assign_splits(tracks, cfg, seed=7), assign_splits(tracks, cfg, seed=7)
    assert first == second
    for split in ("train", "val", "test"):
        mine = [t for t in tracks if first[t["artist"]] == split]
        assert {t["language"] for t in mine} == {"en", "fr", "ar"}, split
        assert {t["genre"] for t in mine} == {"pop", "rock", "disco"}, split
    sizes = {s: sum(first[t["artist"]] == s for t in tracks) for s in ("train", "val", "test")}
    assert sizes == {"train": 12, "val": 6, "test": 6}


def test_split_refuses_too_few_artists() -> None:
    tracks = [{"track_id": "x", "artist": "solo", "genre": "pop", "language": "en"}]
    with pytest.raises(SplitError, match="1 artist"):
        assign_splits(tracks, SplitConfig(), seed=0)


def test_chunk_spans_keep_a_long_enough_tail() -> None:
    cfg = ChunkConfig(chunk_s=4.0, hop_s=3.0, min_chunk_s=2.0)
    assert chunk_spans(10 * 100, 100, cfg) == [(0, 400), (300, 700), (600, 1000)]
    assert chunk_spans(5 * 100, 100, ChunkConfig(chunk_s=4, hop_s=4, min_chunk_s=2)) == [(0, 400)]


def test_segments_are_aligned_with_their_source(prepared) -> None:
    _, _, res = prepared
    norm = {t["track_id"]: t for t in res["normalize"]["tracks"]}
    for backend, manifest in res["segment"]["manifests"].items():
        assert manifest, backend
        for chunk in manifest:
            tag = f"{chunk['sample_rate'] // 1000}k"
            src = norm[chunk["track_id"]]["normalized"]
            start, end = round(chunk["start_s"] * chunk["sample_rate"]), round(chunk["end_s"] * chunk["sample_rate"])
            for stem in ("vocals", "instrumental"):
                piece, sr = sf.read(chunk[f"{stem}_path"], dtype="float32")
                whole, _ = sf.read(src[f"{stem}_{tag}"], dtype="float32")
                assert sr == chunk["sample_rate"]
                np.testing.assert_array_equal(piece, whole[start:end])
            v, _ = sf.read(chunk["vocals_path"])
            i, _ = sf.read(chunk["instrumental_path"])
            assert len(v) == len(i)
            if backend == "audioldm":
                clap, csr = sf.read(chunk["vocals_clap_path"])
                assert csr == 48000 and abs(len(clap) / csr - len(v) / sr) < 1e-3
            for key in ("chunk_id", "track_id", "artist", "genre", "language", "mood", "bpm", "key",
                        "bpm_source", "key_source", "split", "start_s", "end_s", "vocals_sha256",
                        "instrumental_sha256", "sample_rate"):
                assert key in chunk, key


def test_silent_vocal_chunks_are_dropped(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_dataset(raw, n_tracks=3, n_artists=3)
    # Silence the second half of t00's vocal: its later chunks must go.
    vocal, sr = sf.read(raw / "t00" / "vocals.wav")
    vocal[len(vocal) // 2:] = 0
    sf.write(raw / "t00" / "vocals.wav", vocal, sr)
    res = run_all(raw, tmp_path / "work")
    chunks = [c for c in res["segment"]["manifests"]["musicgen"] if c["track_id"] == "t00"]
    # 4 s chunks: [0, 4) sung, [4, 8) half sung (kept), [8, 12) silent (dropped).
    assert [c["start_s"] for c in chunks] == [0.0, 4.0]
    assert json.loads((tmp_path / "work/segments/stats.json").read_text())["dropped_silent"] > 0


def test_rerun_redoes_only_the_changed_track(tmp_path: Path) -> None:
    raw, work = tmp_path / "raw", tmp_path / "work"
    make_dataset(raw, n_tracks=6, n_artists=3)
    first = run_all(raw, work)
    per_track = ("validate", "normalize", "label", "segment")
    # normalize works per stem (2 per track), the other stages per track.
    assert [first[s]["stats"].processed for s in per_track] == [6, 12, 6, 6]

    again = run_all(raw, work)  # nothing changed
    assert [again[s]["stats"].processed for s in per_track] == [0, 0, 0, 0]

    write_track(raw, "t03", seed=99, seconds=12.0)  # new audio for one track
    changed = run_all(raw, work)
    assert [changed[s]["stats"].processed for s in per_track] == [1, 2, 1, 1]
    assert [changed[s]["stats"].reused for s in per_track] == [5, 10, 5, 5]
    # Its chunks now hold the new audio.
    new_norm = {t["track_id"]: t for t in changed["normalize"]["tracks"]}["t03"]["normalized"]["vocals_32k"]
    chunk = next(c for c in changed["segment"]["manifests"]["musicgen"] if c["track_id"] == "t03")
    np.testing.assert_array_equal(sf.read(chunk["vocals_path"])[0],
                                  sf.read(new_norm)[0][: len(sf.read(chunk["vocals_path"])[0])])

    # A new vocal alone re-normalises only that stem.
    vocal, sr = sf.read(raw / "t01" / "vocals.wav")
    sf.write(raw / "t01" / "vocals.wav", 0.5 * vocal, sr)
    vocal_only = run_all(raw, work)
    assert [vocal_only[s]["stats"].processed for s in per_track] == [1, 1, 1, 1]

    # A removed track leaves no outputs behind.
    import shutil
    shutil.rmtree(raw / "t05")
    lines = (raw / "metadata.csv").read_text().splitlines()
    (raw / "metadata.csv").write_text("\n".join(l for l in lines if not l.startswith("t05,")) + "\n")
    removed = run_all(raw, work)
    assert [removed[s]["stats"].removed for s in per_track] == [1, 2, 1, 1]
    assert not list(work.rglob("t05*"))
