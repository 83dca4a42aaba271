"""Splits that stay put: the artist ledger, coverage of the test split, and fractions at scale."""

from __future__ import annotations

import random

import pytest

from tasks.data.split import SplitError, assign_splits, read_ledger, split_dataset
from tasks.data.track_cache import write_jsonl
from v2m.config import SplitConfig

GENRES, LANGS = ["pop", "rock", "disco", "classical"], ["en", "fr", "ar"]


def artist_tracks(name: str, rng: random.Random) -> list[dict]:
    lang = rng.choice(LANGS)
    return [{"track_id": f"{name}-{k}", "artist": name, "language": lang, "genre": rng.choice(GENRES)}
            for k in range(rng.randint(1, 4))]


def test_no_surviving_artist_ever_moves_over_random_additions_and_removals() -> None:
    cfg = SplitConfig()
    for trial in range(20):
        rng = random.Random(trial)
        pool = {f"artist{i}": artist_tracks(f"artist{i}", rng) for i in range(60)}
        present = set(rng.sample(sorted(pool), 8))
        ledger: dict[str, str] = {}
        for _ in range(12):
            if rng.random() < 0.6 or len(present) <= 4:  # add 1-5 artists (some may be returning ones)
                present |= set(rng.sample(sorted(pool), rng.randint(1, 5)))
            else:  # remove 1-3
                present -= set(rng.sample(sorted(present), rng.randint(1, 3)))
            tracks = [t for a in sorted(present) for t in pool[a]]
            rng.shuffle(tracks)  # arrival order must not matter
            now = assign_splits(tracks, cfg, seed=42, previous=ledger)
            assert set(now) == present
            moved = {a: (ledger[a], now[a]) for a in now if a in ledger and ledger[a] != now[a]}
            assert not moved, moved
            ledger = {**ledger, **now}


def test_fractions_stay_near_targets_on_hundreds_of_artists_added_in_batches() -> None:
    cfg = SplitConfig(val_fraction=0.15, test_fraction=0.15)
    rng = random.Random(3)
    pool = [artist_tracks(f"a{i}", rng) for i in range(400)]
    ledger: dict[str, str] = {}
    for start in range(0, 400, 40):  # ten weeks of 40 new artists each
        tracks = [t for group in pool[:start + 40] for t in group]
        ledger = {**ledger, **assign_splits(tracks, cfg, seed=1, previous=ledger)}
    tracks = [t for group in pool for t in group]
    share = {s: sum(ledger[t["artist"]] == s for t in tracks) / len(tracks) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.70) < 0.03 and abs(share["val"] - 0.15) < 0.03 \
        and abs(share["test"] - 0.15) < 0.03, share
    for s in ("val", "test"):  # stratified: every language and genre in every split
        assert {t["language"] for t in tracks if ledger[t["artist"]] == s} == set(LANGS)
        assert {t["genre"] for t in tracks if ledger[t["artist"]] == s} == set(GENRES)


def test_assignment_of_new_artists_ignores_arrival_order() -> None:
    rng = random.Random(5)
    tracks = [t for i in range(30) for t in artist_tracks(f"x{i}", rng)]
    first = assign_splits(tracks, SplitConfig(), seed=9)
    assert assign_splits(list(reversed(tracks)), SplitConfig(), seed=9) == first


def test_small_dataset_test_split_covers_every_language_and_genre() -> None:
    # Like the demo: 9 artists (3 per language), each singing one melody in two styles.
    tracks = [{"track_id": f"s{a}-{k}", "artist": f"singer{a}", "language": LANGS[a % 3],
               "genre": GENRES[(2 * a + k) % 4]} for a in range(9) for k in range(2)]
    got = assign_splits(tracks, SplitConfig(), seed=42)
    test = [t for t in tracks if got[t["artist"]] == "test"]
    assert {t["language"] for t in test} == set(LANGS)
    assert {t["genre"] for t in test} == set(GENRES)
    train = [t for t in tracks if got[t["artist"]] == "train"]
    assert {t["language"] for t in train} == set(LANGS)  # coverage never takes a language from training
    assert {got[a] for a in got} == {"train", "val", "test"}


def test_split_dataset_keeps_its_ledger_and_reports_new_artists(tmp_path) -> None:
    rng = random.Random(11)
    tracks = [t for i in range(12) for t in artist_tracks(f"p{i}", rng)]
    write_jsonl(tmp_path / "labelled" / "tracks.jsonl", tracks)
    first = split_dataset(tmp_path / "labelled", tmp_path / "split", SplitConfig(), seed=42)
    assert len(first["new_artists"]) == 12
    ledger = read_ledger(tmp_path / "split")
    # One artist leaves, two arrive; the one who left keeps its place in the ledger.
    gone = tracks[0]["artist"]
    later = [t for t in tracks if t["artist"] != gone] + [t for i in (12, 13) for t in artist_tracks(f"p{i}", rng)]
    write_jsonl(tmp_path / "labelled" / "tracks.jsonl", later)
    second = split_dataset(tmp_path / "labelled", tmp_path / "split", SplitConfig(), seed=42)
    assert second["new_artists"] == ["p12", "p13"]
    after = read_ledger(tmp_path / "split")
    assert {a: after[a] for a in ledger} == ledger and gone in after


def test_a_damaged_ledger_is_an_error_naming_the_file(tmp_path) -> None:
    (tmp_path / "assignments.json").write_text("{not json")
    with pytest.raises(SplitError, match="assignments.json"):
        read_ledger(tmp_path)


def test_test_fingerprint_covers_the_test_chunks_and_their_sources_only() -> None:
    from tasks.data.segment import test_fingerprint
    rows = [{"chunk_id": f"c{i}", "start_s": 0.0, "end_s": 30.0, "vocals_sha256": f"v{i}", "instrumental_sha256": f"i{i}",
             "split": "test" if i < 3 else "train"} for i in range(6)]
    fp = test_fingerprint(rows)
    assert test_fingerprint(list(reversed(rows))) == fp                       # order does not matter
    assert test_fingerprint(rows + [{**rows[4], "chunk_id": "new"}]) == fp    # new training data does not
    assert test_fingerprint([{**rows[0], "vocals_sha256": "edited"}] + rows[1:]) != fp  # a changed source does
    assert test_fingerprint(rows[1:]) != fp                                    # a dropped test chunk does
