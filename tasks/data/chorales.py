"""Bach chorales from music21's corpus as plain note lists, cached as JSON.

Parsing MusicXML with music21 costs ~0.1 s per chorale (all 365 take ~100 s), so each parsed chorale
is stored as a small JSON file and parsing happens only for the chorales a build actually needs.
Times are in quarter lengths (ql) here; the renderers turn them into seconds once a tempo is chosen.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

PARTS = ("Soprano", "Alto", "Tenor", "Bass")
DEFAULT_CACHE_DIR = Path(".v2m/cache/chorales")
CACHE_VERSION = 1  # bump when the JSON layout or the extraction rules change

Note = tuple[int, float, float]  # (midi pitch, onset ql, duration ql)


@dataclass(frozen=True)
class Chorale:
    name: str                       # corpus name, e.g. "bach/bwv10.7"
    key: str                        # music21 analyze('key'), e.g. "G minor", "Bb major"
    time_signature: str             # e.g. "4/4"
    length_ql: float
    bars: list[float]               # bar line (measure start) offsets: where a cut may fall
    downbeats: list[float]          # nominal start of each bar (a pickup's lies before it): drums align here
    parts: dict[str, list[Note]]    # "Soprano" ... "Bass" -> notes sorted by onset

    @property
    def bar_ql(self) -> float:
        num, den = self.time_signature.split("/")
        return int(num) * 4.0 / int(den)


def corpus_names() -> list[str]:
    """Sorted corpus names of every Bach MusicXML work (chorales and a few others, filtered at load)."""
    from music21 import corpus

    paths = [Path(str(p)) for p in corpus.getComposer("bach")]
    return sorted({f"bach/{p.stem}" for p in paths if p.suffix in (".mxl", ".xml") and p.stem.startswith("bwv")})


def key_name(k) -> str:
    """music21 Key -> "Bb major" (music21 spells flats with '-')."""
    return f"{k.tonic.name.replace('-', 'b')} {k.mode}"


def _parse(name: str) -> Chorale | None:
    """Parse one corpus work; None unless it has exactly the four parts Soprano, Alto, Tenor, Bass."""
    from music21 import corpus

    score = corpus.parse(name)
    if tuple(p.partName for p in score.parts) != PARTS:
        return None
    key = key_name(score.analyze("key"))
    ts = score.recurse().getElementsByClass("TimeSignature").first()
    time_signature = ts.ratioString if ts is not None else "4/4"
    try:  # verse repeats written as repeat barlines: play them as written
        score = score.expandRepeats()
    except Exception:  # music21 refuses some repeat structures; the looping below covers length anyway
        pass
    num, den = time_signature.split("/")
    bar_ql = int(num) * 4.0 / int(den)

    parts: dict[str, list[Note]] = {}
    for part in score.parts:
        notes: list[Note] = []
        # stripTies merges tied notes so that one sung syllable = one note
        for n in part.stripTies().flatten().notes:
            dur = float(n.quarterLength)
            if dur <= 0:  # grace notes
                continue
            pitches = sorted(p.midi for p in n.pitches)
            if part.partName == "Soprano":
                pitches = pitches[-1:]  # the sung line is monophonic: keep the top note of a rare chord
            notes += [(int(p), float(n.offset), dur) for p in pitches]
        parts[part.partName] = sorted(notes, key=lambda x: (x[1], x[0]))

    measures = list(score.parts[0].getElementsByClass("Measure"))
    bars = [float(m.offset) for m in measures]
    downbeats = list(bars)
    if measures and float(measures[0].duration.quarterLength) < bar_ql:  # anacrusis
        downbeats[0] = float(measures[0].offset + measures[0].duration.quarterLength) - bar_ql
    length = max(float(score.highestTime), max(on + d for notes in parts.values() for _, on, d in notes))
    return Chorale(name, key, time_signature, length, bars, downbeats, parts)


def load_chorale(name: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> Chorale | None:
    """A chorale from the JSON cache, parsing (and caching) it on a miss. None if it is not SATB."""
    path = Path(cache_dir) / f"{name.replace('/', '__')}.v{CACHE_VERSION}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if data is None:
            return None
        data["parts"] = {k: [tuple(n) for n in v] for k, v in data["parts"].items()}
        return Chorale(**data)
    chorale = _parse(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(chorale) if chorale else None))  # also cache "not SATB"
    tmp.replace(path)
    return chorale


def pick_chorales(n: int, seed: int, cache_dir: Path = DEFAULT_CACHE_DIR) -> list[Chorale]:
    """n distinct SATB chorales, in a seeded order over the sorted corpus; parses only what it needs."""
    names = corpus_names()
    random.Random(seed).shuffle(names)
    picked: list[Chorale] = []
    for name in names:
        if len(picked) == n:
            break
        if (chorale := load_chorale(name, cache_dir)) is not None:
            picked.append(chorale)
    if len(picked) < n:
        raise ValueError(f"asked for {n} chorales, the music21 corpus has only {len(picked)} SATB ones")
    return picked


def loop_and_cut(ch: Chorale, min_ql: float, max_ql: float) -> tuple[Chorale, int]:
    """Repeat the whole chorale (like verses) until it lasts >= min_ql, then cut at the last bar line
    <= max_ql. Notes crossing the cut are shortened. Returns the new chorale and the number of loops."""
    loops = max(1, math.ceil(min_ql / ch.length_ql))
    shift = [i * ch.length_ql for i in range(loops)]
    parts = {k: [(p, on + s, d) for s in shift for p, on, d in v] for k, v in ch.parts.items()}
    bars = [b + s for s in shift for b in ch.bars]
    downbeats = [b + s for s in shift for b in ch.downbeats]
    end = loops * ch.length_ql
    if end > max_ql:
        end = max((b for b in bars if 0 < b <= max_ql), default=max_ql)
        parts = {k: [(p, on, min(d, end - on)) for p, on, d in v if on < end] for k, v in parts.items()}
    keep = [i for i, b in enumerate(bars) if b < end]
    return replace(ch, length_ql=end, bars=[bars[i] for i in keep],
                   downbeats=[downbeats[i] for i in keep], parts=parts), loops
