"""Stage 4 — split: train / val / test, disjoint by artist, stratified by genre and language.

Whole artists are assigned to splits, so no singer (and, in the demo, no melody) is heard in two splits.
Assignment is greedy and deterministic: artists in a seeded order, largest first, each to the split
that most lacks what the artist brings — tracks overall (to reach its share), and tracks of the artist's
languages and genres (so each split covers every genre and language where the artists allow it).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tasks.data.track_cache import read_jsonl, write_jsonl
from v2m.config import SplitConfig
from v2m.errors import UserError

SPLITS = ("train", "val", "test")


class SplitError(UserError, ValueError):
    """Too few artists for the configured splits."""


def assign_splits(tracks: list[dict[str, Any]], cfg: SplitConfig, seed: int) -> dict[str, str]:
    """Map artist -> split."""
    by_artist: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in tracks:
        by_artist[t["artist"]].append(t)
    fractions = {"train": 1 - cfg.val_fraction - cfg.test_fraction,
                 "val": cfg.val_fraction, "test": cfg.test_fraction}
    wanted = [s for s in SPLITS if fractions[s] > 0]
    if len(by_artist) < len(wanted):
        raise SplitError(f"{len(by_artist)} artist(s) cannot fill {len(wanted)} artist-disjoint splits "
                         f"({', '.join(wanted)}); add artists or set a fraction to 0 in params.yaml data.split")
    totals = Counter({"*": len(tracks)})
    totals.update(("lang", t["language"]) for t in tracks)
    totals.update(("genre", t["genre"]) for t in tracks)
    have = {s: Counter() for s in wanted}  # tracks per split, per language and per genre

    def deficit(s: str, k: Any) -> float:  # tracks a split still lacks to reach its share
        return fractions[s] * totals[k] - have[s][k]

    def score(s: str, mine: list[dict[str, Any]]) -> float:
        size = deficit(s, "*")
        mix = sum(deficit(s, ("lang", t["language"])) + 0.5 * deficit(s, ("genre", t["genre"]))
                  for t in mine) / len(mine)
        return size + mix

    artists = sorted(by_artist)
    random.Random(seed).shuffle(artists)
    artists.sort(key=lambda a: -len(by_artist[a]))  # big artists first; ties keep the seeded order
    assignment: dict[str, str] = {}
    for i, artist in enumerate(artists):
        mine = by_artist[artist]
        empty = [s for s in wanted if have[s]["*"] == 0]
        # Never leave a split without an artist: once the artists left are just enough, fill the gaps.
        candidates = empty if len(empty) >= len(artists) - i else wanted
        best = max(candidates, key=lambda s: (score(s, mine), -SPLITS.index(s)))
        assignment[artist] = best
        have[best]["*"] += len(mine)
        have[best].update(("lang", t["language"]) for t in mine)
        have[best].update(("genre", t["genre"]) for t in mine)
    return assignment


def split_dataset(labelled_dir: str | Path, out_dir: str | Path, cfg: SplitConfig,
                  seed: int) -> dict[str, Any]:
    out_dir = Path(out_dir)
    tracks = read_jsonl(Path(labelled_dir) / "tracks.jsonl")
    if not tracks:
        raise SplitError(f"{labelled_dir}/tracks.jsonl: no tracks to split")
    assignment = assign_splits(tracks, cfg, seed)
    out = [{**t, "split": assignment[t["artist"]]} for t in tracks]
    report = {s: {"tracks": sum(t["split"] == s for t in out),
                  "artists": sorted(a for a, sp in assignment.items() if sp == s),
                  "genres": dict(Counter(t["genre"] for t in out if t["split"] == s)),
                  "languages": dict(Counter(t["language"] for t in out if t["split"] == s))}
              for s in SPLITS}
    write_jsonl(out_dir / "tracks.jsonl", out)
    write_jsonl(out_dir / "report.jsonl", [{"split": s, **r} for s, r in report.items()])
    return {"tracks": out, "report": report}
