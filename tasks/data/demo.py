"""Build the demo dataset: Bach chorales, the soprano sung by synthetic artists over styled accompaniments.

Each chorale is rendered in `styles_per_chorale` styles and always sung by ONE artist, so an artist-disjoint
split is also melody-disjoint. Everything is derived from `seed` (per-track randomness from (seed, index)),
so two builds with the same seed give identical files, whether the tracks run in parallel or not.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np

from tasks.data import render, voice
from tasks.data.chorales import DEFAULT_CACHE_DIR, Chorale, loop_and_cut, pick_chorales
from tasks.data.track_cache import safe_context
from v2m import numba_cache
from v2m.audio import write_wav
from v2m.config import DemoConfig

METADATA_COLUMNS = ["track_id", "artist", "title", "genre", "bpm", "key", "mood", "language"]
TRUTH_COLUMNS = ["track_id", "chorale", "bpm", "key", "time_signature", "genre", "artist", "language",
                 "renderer", "voice", "duration_s"]
TAIL_S = 0.75               # after the last bar: notes release, then both stems fade to silence
PEAK = 10 ** (-3 / 20)      # each stem peaks at -3 dBFS (the normalize stage sets loudness later)


@dataclass(frozen=True)
class TrackPlan:
    index: int
    track_id: str
    chorale: Chorale
    style: str
    bpm: int
    artist: voice.Artist
    words: tuple[tuple[str, str], ...]  # one syllable per soprano note of one verse
    blank_labels: bool                 # leave bpm/key empty in metadata.csv


def plan_tracks(cfg: DemoConfig, seed: int, chorales: list[Chorale], artists: list[voice.Artist]) -> list[TrackPlan]:
    n_styles, per = len(cfg.styles), cfg.styles_per_chorale
    artist_order = np.random.default_rng([seed, 1]).permutation(len(artists))  # balanced: round-robin
    n_blank = round(cfg.blank_label_fraction * cfg.n_tracks)
    blank = set(np.random.default_rng([seed, 3]).choice(cfg.n_tracks, n_blank, replace=False).tolist())
    plans = []
    for i in range(cfg.n_tracks):
        c, j = divmod(i, per)
        # styles rotate over tracks (balanced genres); the shift per full rotation varies which styles
        # share a chorale, while one chorale never gets the same style twice
        style = cfg.styles[(c * per + j + (c * per) // n_styles) % n_styles]
        lo, hi = render.STYLES[style].bpm
        artist = artists[artist_order[c % len(artists)]]
        words = voice.lyrics(len(chorales[c].parts["Soprano"]), artist.language, np.random.default_rng([seed, 4, c]))
        plans.append(TrackPlan(i, f"demo_{i + 1:04d}", chorales[c], style,
                               int(np.random.default_rng([seed, 0, i]).integers(lo, hi + 1)),
                               artist, tuple(words), i in blank))
    return plans


def _finish(audio: np.ndarray, n: int, sr: int) -> np.ndarray:
    """Same length for both stems, a fade over the tail, peak at PEAK."""
    audio = librosa.util.fix_length(np.nan_to_num(audio.astype(np.float32)), size=n)
    fade = min(n, int(TAIL_S * sr))
    audio[n - fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    peak = float(np.abs(audio).max())
    return audio * (PEAK / peak) if peak > 0 else audio


def looped(p: TrackPlan, cfg: DemoConfig) -> Chorale:
    """The chorale as this track plays it: repeated to min_duration_s, cut to leave room for the tail."""
    sec = 60.0 / p.bpm
    return loop_and_cut(p.chorale, cfg.min_duration_s / sec, (cfg.max_duration_s - TAIL_S) / sec)[0]


def sung_notes(p: TrackPlan, ch: Chorale) -> list[tuple[float, float, float]]:
    """(midi pitch, start s, duration s) the artist sings: the soprano, in the artist's octave."""
    sec = 60.0 / p.bpm
    return [(m + 12 * p.artist.octave, on * sec, d * sec) for m, on, d in ch.parts["Soprano"]]


def render_track(p: TrackPlan, cfg: DemoConfig, seed: int, renderer: str, engine: str, espeak_root: Path | None,
                 out_dir: Path) -> dict:
    """Render and write one track's two stems; return its ground-truth row."""
    sr = cfg.sample_rate
    ch = looped(p, cfg)
    n = int(round((ch.length_ql * 60.0 / p.bpm + TAIL_S) * sr))
    track_seed = int(np.random.SeedSequence([seed, 5, p.index]).generate_state(1)[0])

    instrumental = render.render(render.arrange(ch, p.style, p.bpm), sr, renderer, track_seed)
    notes = sung_notes(p, ch)
    verse = len(p.chorale.parts["Soprano"])  # looping restarts the lyrics with each verse
    words = [p.words[k % verse] for k in range(len(notes))]
    vocals = voice.sing(notes, words, p.artist, engine, sr, track_seed, espeak_root)

    write_wav(out_dir / p.track_id / "vocals.wav", _finish(vocals, n, sr), sr)
    write_wav(out_dir / p.track_id / "instrumental.wav", _finish(instrumental, n, sr), sr)
    return {"track_id": p.track_id, "chorale": p.chorale.name, "bpm": p.bpm, "key": p.chorale.key,
            "time_signature": p.chorale.time_signature, "genre": p.style, "artist": p.artist.name,
            "language": p.artist.language, "renderer": renderer, "voice": engine, "duration_s": round(n / sr, 3)}


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Drop track folders a previous demo build listed in ground_truth.csv but this build does not make."""
    truth = out_dir / "ground_truth.csv"
    if truth.is_file():
        with open(truth, newline="") as f:
            for row in csv.DictReader(f):
                if row["track_id"] not in keep and (out_dir / row["track_id"]).is_dir():
                    shutil.rmtree(out_dir / row["track_id"])


def build_demo_dataset(out_dir: Path, cfg: DemoConfig, seed: int, cache_dir: Path | None = None,
                       progress: Callable[[int, int], None] | None = None, workers: int = 0) -> dict:
    """Render cfg.n_tracks tracks into out_dir (raw layout) with metadata.csv, ground_truth.csv and a card.

    workers: processes for rendering (0 = one per CPU core); the output does not depend on it.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    renderer, engine = render.resolve_renderer(cfg.renderer), voice.resolve_voice(cfg.voice)
    chorales = pick_chorales(math.ceil(cfg.n_tracks / cfg.styles_per_chorale), seed,
                             Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
    artists = voice.make_artists(cfg.n_artists, cfg.languages, seed)
    plans = plan_tracks(cfg, seed, chorales, artists)
    _remove_stale(out_dir, {p.track_id for p in plans})

    workers = min(workers or os.cpu_count() or 1, len(plans))
    rows: dict[int, dict] = {}
    with voice.espeak_workspace() if engine == "espeak" else contextlib.nullcontext() as root:
        job = functools.partial(render_track, cfg=cfg, seed=seed, renderer=renderer, engine=engine,
                                espeak_root=root, out_dir=out_dir)
        if workers <= 1:
            for p in plans:
                rows[p.index] = job(p)
                if progress:
                    progress(len(rows), len(plans))
        else:
            # the context: a plain fork hung in a process with threads (the test suite's; see safe_context)
            with ProcessPoolExecutor(workers, mp_context=safe_context(), initializer=numba_cache.worker_init) as pool:
                futures = {pool.submit(job, p): p.index for p in plans}
                for fut in as_completed(futures):
                    rows[futures[fut]] = fut.result()
                    if progress:
                        progress(len(rows), len(plans))

    truth = [rows[i] for i in range(len(plans))]
    meta = [{**row, "title": f"Chorale {p.chorale.name.split('/')[-1].upper().replace('BWV', 'BWV ')}",
             "mood": render.STYLES[p.style].mood,
             "bpm": "" if p.blank_labels else row["bpm"], "key": "" if p.blank_labels else row["key"]}
            for p, row in zip(plans, truth)]
    _write_csv(out_dir / "metadata.csv", METADATA_COLUMNS, meta)
    _write_csv(out_dir / "ground_truth.csv", TRUTH_COLUMNS, truth)
    summary = {
        "n_tracks": len(truth), "n_chorales": len(chorales), "renderer": renderer, "voice": engine, "seed": seed,
        "total_duration_s": round(sum(r["duration_s"] for r in truth), 3),
        "genres": dict(Counter(r["genre"] for r in truth)),
        "languages": dict(Counter(r["language"] for r in truth)),
        "artists": dict(Counter(r["artist"] for r in truth)),
        "n_blank_labels": sum(p.blank_labels for p in plans),
    }
    (out_dir / "DATASET_CARD.md").write_text(_card(cfg, summary, artists))
    return {**summary, "build_s": round(time.perf_counter() - started, 2)}


def write_mixes(stems_dir: Path, out_dir: Path) -> dict:
    """The demo as finished songs, for `v2m data separate`: `out_dir/<track_id>.wav` = vocal + instrumental of
    `stems_dir` (a demo build), with its metadata.csv. A mix that would clip is scaled down, and so are its stems
    (rewritten in place), so each mix stays exactly the sum of the stems kept as its ground truth."""
    from v2m.audio import read_mono
    out_dir = Path(out_dir)
    with open(stems_dir / "metadata.csv", newline="") as f:
        ids = [row["track_id"] for row in csv.DictReader(f)]
    if (out_dir / "ground_truth.csv").is_file():  # mixes an earlier demo build made (and only those) that are gone
        with open(out_dir / "ground_truth.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["track_id"] not in ids:
                    (out_dir / f"{row['track_id']}.wav").unlink(missing_ok=True)
    scaled = 0
    for tid in ids:
        (vocal, sr), (inst, _) = (read_mono(stems_dir / tid / f"{s}.wav") for s in ("vocals", "instrumental"))
        mix = vocal + inst
        gain = min(1.0, 0.89 / max(float(np.abs(mix).max()), 1e-9))  # peak at most -1 dBFS
        if gain < 1.0:
            scaled += 1
            for stem, y in (("vocals", vocal), ("instrumental", inst)):
                write_wav(stems_dir / tid / f"{stem}.wav", y, sr, gain=gain)
            (vocal, sr), (inst, _) = (read_mono(stems_dir / tid / f"{s}.wav") for s in ("vocals", "instrumental"))
            mix = vocal + inst  # the sum of what was written (16-bit), not of the floats before
        write_wav(out_dir / f"{tid}.wav", mix, sr)
    for name in ("metadata.csv", "ground_truth.csv"):
        shutil.copy(stems_dir / name, out_dir / name)
    return {"n_mixes": len(ids), "scaled_down": scaled, "stems": str(stems_dir)}


def _counts(title: str, counts: dict) -> str:
    return f"| {title} | tracks |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in sorted(counts.items()))


def _card(cfg: DemoConfig, s: dict, artists: list[voice.Artist]) -> str:
    voices = {"espeak": "espeak-ng, one syllable per note with a flat-pitch voice variant set to the note's "
                        "frequency, time-stretched to the note's length with librosa",
              "formant": "a formant synthesiser: harmonic source at the note's f0 with vibrato, vowel formant "
                         "resonators, breath noise"}
    renderers = {"fluidsynth": "FluidSynth with pretty_midi's bundled TimGM6mb General MIDI soundfont",
                 "synth": "a numpy synthesiser (wavetable oscillators with envelopes, noise drums)"}
    styles = ", ".join(f"{k} ({v.bpm[0]}-{v.bpm[1]} bpm, {v.mood})"
                       for k, v in render.STYLES.items() if k in cfg.styles)
    singers = "".join(f"| {a.name} | {a.language} | {a.gender} | {a.espeak_variant} |\n" for a in artists)
    return f"""# Demo dataset: Bach chorales, sung

**What.** {s['n_tracks']} tracks ({s['total_duration_s'] / 60:.1f} min) made from {s['n_chorales']} four-part chorale(s)
by J. S. Bach, taken from the corpus that ships with music21. The soprano line is the vocal
(`vocals.wav`); alto, tenor and bass (plus drums) are the accompaniment (`instrumental.wav`).
Mono, {cfg.sample_rate} Hz, 16-bit PCM. Chorales are repeated like verses to at least {cfg.min_duration_s:g} s
and cut at a bar line before {cfg.max_duration_s:g} s, with a {TAIL_S:g} s fade.

**How the stems were made.**
- Accompaniment: arranged per style (instruments, articulation, drum groove, tempo range), rendered with
  {renderers[s['renderer']]}.
- Vocal: {voices[s['voice']]}. Each artist sings in one language; "male" artists sing an octave below
  the written soprano (pitch class kept). Each chorale is sung by one artist in all of its styles, so
  splitting by artist also separates melodies.
- Styles: {styles}.

**Labels.** `metadata.csv` leaves bpm and key blank for {s['n_blank_labels']} tracks
(blank_label_fraction={cfg.blank_label_fraction:g}) so the label stage has something to estimate.
`ground_truth.csv` has the true values: tempo as rendered, key from music21's `analyze('key')`.

**Reproducibility.** seed={s['seed']}; the same seed and config give identical files.
Renderer: `{s['renderer']}`. Voice engine: `{s['voice']}`.

{_counts('genre', s['genres'])}
{_counts('language', s['languages'])}
{_counts('artist', s['artists'])}
| artist | language | voice | espeak variant |
|---|---|---|---|
{singers}
**Licence.** The compositions (J. S. Bach, 1685-1750) are in the public domain. music21 says of its corpus
that the music is believed to be public domain and the encodings are public domain or used by permission
(music21 itself is BSD-3-Clause). The audio here is synthetic: no recording and no real singer is
involved. If you redistribute FluidSynth renders, check the terms of the TimGM6mb soundfont bundled with
pretty_midi.
"""
