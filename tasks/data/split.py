"""Stage 4 — split: train / val / test, disjoint by artist, stratified by genre and language, and stable.

Whole artists are assigned to splits, so no singer (and, in the demo, no melody) is heard in two splits.

Stable over time: the assignment is a ledger (`assignments.json` in the output, a persisted DVC output)
that only ever grows. An artist seen before keeps its split for good, also after it left the data and came
back, so adding or removing tracks or artists never moves anyone: the test set of week one stays the test
set, and no singer leaks from test into a later model's training data. Only new artists are placed:
  1. coverage — while the test split lacks a language or genre of the data, the new artist that brings most
     of what it lacks goes to test (languages first; smaller artists first), as long as every language keeps
     an artist for training. The test split is what models are compared on, so every language and genre
     should be heard there, even on a small dataset;
  2. then each remaining new artist, largest first, goes to the split that most lacks what it brings —
     tracks overall (to reach the split's share) and tracks of its languages and genres.
Ties and the order of equal-sized artists come from a salted hash of the artist's name, so the result does
not depend on the order in which artists arrived.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tasks.data.track_cache import read_jsonl, write_jsonl
from v2m.config import SplitConfig
from v2m.errors import UserError

SPLITS = ("train", "val", "test")
LEDGER = "assignments.json"


class SplitError(UserError, ValueError):
    """Too few artists for the configured splits."""


def _salted(seed: int, artist: str) -> str:
    return hashlib.sha256(f"{seed}:{artist}".encode()).hexdigest()


def assign_splits(tracks: list[dict[str, Any]], cfg: SplitConfig, seed: int,
                  previous: dict[str, str] | None = None) -> dict[str, str]:
    """Map artist -> split for every artist in `tracks`. Artists in `previous` (the ledger) keep their split."""
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
    have = {s: Counter() for s in SPLITS}  # tracks per split, per language and per genre
    assignment: dict[str, str] = {}

    def place(artist: str, split: str) -> None:
        assignment[artist] = split
        mine = by_artist[artist]
        have[split]["*"] += len(mine)
        have[split].update(("lang", t["language"]) for t in mine)
        have[split].update(("genre", t["genre"]) for t in mine)

    for artist, split in (previous or {}).items():
        if artist in by_artist:
            place(artist, split)  # never moved, whatever the fractions say today
    new = sorted((a for a in by_artist if a not in assignment),
                 key=lambda a: (-len(by_artist[a]), _salted(seed, a)))

    # 1. Coverage of the test split.
    def brings(a: str, kind: str) -> set[str]:
        return {t["language" if kind == "lang" else "genre"] for t in by_artist[a]}

    def keeps_training_languages(a: str, rest: list[str]) -> bool:
        others = [b for b in rest if b != a] + [b for b, s in assignment.items() if s == "train"]
        return all(any(lang in brings(b, "lang") for b in others) for lang in brings(a, "lang"))

    if "test" in wanted:
        while new:
            lacking = {kind: {k[1] for k in totals if k[0] == kind} - {k[1] for k in have["test"] if k[0] == kind}
                       for kind in ("lang", "genre")}
            empty_later = sum(have[s]["*"] == 0 for s in wanted if s != "test")
            options = [a for a in new if (brings(a, "lang") & lacking["lang"] or brings(a, "genre") & lacking["genre"])
                       and keeps_training_languages(a, new) and len(new) - 1 >= empty_later]
            if not options:
                break
            best = max(options, key=lambda a: (len(brings(a, "lang") & lacking["lang"]),
                                               len(brings(a, "genre") & lacking["genre"]),
                                               -len(by_artist[a]), _salted(seed, a)))
            place(best, "test")
            new.remove(best)

    # 2. Proportions and the language/genre mix.
    def deficit(s: str, k: Any) -> float:  # tracks a split still lacks to reach its share
        return fractions[s] * totals[k] - have[s][k]

    def score(s: str, mine: list[dict[str, Any]]) -> float:
        size = deficit(s, "*")
        mix = sum(deficit(s, ("lang", t["language"])) + 0.5 * deficit(s, ("genre", t["genre"]))
                  for t in mine) / len(mine)
        return size + mix

    for i, artist in enumerate(new):
        empty = [s for s in wanted if have[s]["*"] == 0]
        # Never leave a split without an artist: once the artists left are just enough, fill the gaps.
        candidates = empty if empty and len(empty) >= len(new) - i else wanted
        place(artist, max(candidates, key=lambda s: (score(s, by_artist[artist]), -SPLITS.index(s))))
    return assignment


def read_ledger(out_dir: str | Path) -> dict[str, str]:
    """The artist -> split ledger a previous run left in `out_dir`, or {} on the first run."""
    path = Path(out_dir) / LEDGER
    if not path.is_file():
        return {}
    try:
        ledger = json.loads(path.read_text())["artists"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SplitError(f"{path}: not a split ledger ({exc}); restore it from the DVC remote "
                         "(`v2m data pull`) rather than deleting it, or every artist may move") from None
    bad = {a: s for a, s in ledger.items() if s not in SPLITS}
    if bad:
        raise SplitError(f"{path}: unknown split(s) {bad}")
    return ledger


def split_dataset(labelled_dir: str | Path, out_dir: str | Path, cfg: SplitConfig,
                  seed: int) -> dict[str, Any]:
    out_dir = Path(out_dir)
    tracks = read_jsonl(Path(labelled_dir) / "tracks.jsonl")
    if not tracks:
        raise SplitError(f"{labelled_dir}/tracks.jsonl: no tracks to split")
    ledger = read_ledger(out_dir)
    assignment = assign_splits(tracks, cfg, seed, ledger)
    out = [{**t, "split": assignment[t["artist"]]} for t in tracks]
    report = {s: {"tracks": sum(t["split"] == s for t in out),
                  "artists": sorted(a for a, sp in assignment.items() if sp == s),
                  "genres": dict(Counter(t["genre"] for t in out if t["split"] == s)),
                  "languages": dict(Counter(t["language"] for t in out if t["split"] == s))}
              for s in SPLITS}
    new_artists = sorted(set(assignment) - set(ledger))
    write_jsonl(out_dir / "tracks.jsonl", out)
    write_jsonl(out_dir / "report.jsonl", [{"split": s, **r} for s, r in report.items()])
    # The ledger keeps artists that left the data, so they return to the same split.
    tmp = out_dir / (LEDGER + ".tmp")
    tmp.write_text(json.dumps({"artists": {**ledger, **assignment}}, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / LEDGER)
    return {"tracks": out, "report": report, "new_artists": new_artists}
