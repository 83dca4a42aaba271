"""Render the accompaniment (alto + tenor + bass, plus drums) of a chorale in a musical style.

A style is what a text prompt can mean something about: tempo range, instruments (General MIDI programs),
articulation and a drum groove. The arrangement is a pretty_midi score; it is rendered with FluidSynth and
pretty_midi's bundled TimGM6mb soundfont when available, else with a small numpy synthesiser so that the
project still builds on machines without libfluidsynth.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pretty_midi

from tasks.data.chorales import Chorale

KICK, SNARE, CLAP, HAT, OPEN_HAT = 36, 38, 39, 42, 46  # General MIDI percussion keys (channel 10)
EIGHTHS = tuple(i / 2 for i in range(8))
SF2 = Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"


@dataclass(frozen=True)
class Style:
    bpm: tuple[int, int]                        # tempo range (quarter notes per minute), inclusive
    mood: str
    programs: dict[str, int]                    # accompaniment part -> GM program
    pulse: dict[str, float] = field(default_factory=dict)  # part -> re-strike held notes every N ql
    octave_jump: tuple[str, ...] = ()           # parts whose off-beat pulses go up an octave (disco bass)
    drums: dict[int, tuple[float, ...]] = field(default_factory=dict)  # GM key -> beats within a bar


STYLES: dict[str, Style] = {
    # string ensemble + cello, held notes, no drums: the chorale as Bach might recognise it
    "classical": Style((70, 84), "calm", {"Alto": 48, "Tenor": 48, "Bass": 42}),
    # piano comping on every beat, finger bass, kick 1 & 3, snare 2 & 4, closed hi-hat eighths
    "pop": Style((96, 110), "upbeat", {"Alto": 0, "Tenor": 0, "Bass": 33}, {"Alto": 1.0, "Tenor": 1.0},
                 drums={KICK: (0, 2), SNARE: (1, 3), HAT: EIGHTHS}),
    # overdriven + distorted guitars chugging eighths, picked bass, backbeat with a pushed kick
    "rock": Style((112, 128), "energetic", {"Alto": 29, "Tenor": 30, "Bass": 34}, {"Tenor": 0.5, "Bass": 0.5},
                  drums={KICK: (0, 1.5, 2), SNARE: (1, 3), HAT: EIGHTHS}),
    # strings + synth strings, octave-jumping slap bass, four-on-the-floor with off-beat open hi-hat
    "disco": Style((116, 124), "danceable", {"Alto": 48, "Tenor": 50, "Bass": 36}, {"Bass": 0.5},
                   octave_jump=("Bass",),
                   drums={KICK: (0, 1, 2, 3), CLAP: (1, 3), HAT: (0, 1, 2, 3), OPEN_HAT: (0.5, 1.5, 2.5, 3.5)}),
}
VELOCITY = {"Alto": 72, "Tenor": 72, "Bass": 88, HAT: 62, OPEN_HAT: 70}  # the rest: 100


def _articulate(notes, pulse: float | None, octave_jump: bool):
    """Split held notes into repeated strikes on a grid of `pulse` ql (how pop/rock/disco parts play)."""
    if not pulse:
        return list(notes)
    out = []
    for pitch, on, dur in notes:
        t, end = on, on + dur
        while t < end - 1e-6:
            nxt = min((np.floor(t / pulse + 1e-6) + 1) * pulse, end)
            up = 12 if octave_jump and round(t / pulse) % 2 == 1 else 0
            out.append((pitch + up, t, (nxt - t) * 0.85))  # detached strikes
            t = nxt
    return out


def drum_hits(ch: Chorale, pattern: dict[int, tuple[float, ...]]) -> list[tuple[int, float]]:
    """(GM key, onset ql) of the groove, aligned on each bar's nominal downbeat (so pickups fall right)."""
    hits = []
    for i, (start, down) in enumerate(zip(ch.bars, ch.downbeats)):
        end = ch.bars[i + 1] if i + 1 < len(ch.bars) else ch.length_ql
        for key, beats in pattern.items():
            hits += [(key, down + b) for b in beats if b < ch.bar_ql and start - 1e-6 <= down + b < end - 1e-6]
    return sorted(hits, key=lambda h: (h[1], h[0]))


def arrange(ch: Chorale, style: str, bpm: float) -> pretty_midi.PrettyMIDI:
    """The accompaniment of a (looped, cut) chorale as a GM score at `bpm`."""
    st, sec = STYLES[style], 60.0 / bpm
    pm = pretty_midi.PrettyMIDI(initial_tempo=bpm)
    for part, program in st.programs.items():
        inst = pretty_midi.Instrument(program=program, name=part)
        for pitch, on, dur in _articulate(ch.parts[part], st.pulse.get(part), part in st.octave_jump):
            inst.notes.append(pretty_midi.Note(VELOCITY[part], int(pitch), on * sec, (on + dur) * sec))
        pm.instruments.append(inst)
    if st.drums:
        kit = pretty_midi.Instrument(program=0, is_drum=True, name="Drums")
        for key, on in drum_hits(ch, st.drums):
            kit.notes.append(pretty_midi.Note(VELOCITY.get(key, 100), key, on * sec, on * sec + 0.1))
        pm.instruments.append(kit)
    return pm


@functools.lru_cache(maxsize=1)
def fluidsynth_available() -> bool:
    """pyfluidsynth imports (it needs libfluidsynth) and the bundled soundfont is there."""
    try:
        import fluidsynth

        fluidsynth.Synth().delete()
    except Exception:  # ImportError / OSError when libfluidsynth is missing
        return False
    return SF2.is_file()


def resolve_renderer(requested: str) -> str:
    if requested == "synth" or (requested == "auto" and not fluidsynth_available()):
        return "synth"
    if not fluidsynth_available():
        raise RuntimeError(
            "renderer 'fluidsynth' requested but pyfluidsynth/libfluidsynth cannot be loaded "
            "(install the system package libfluidsynth3 and `pip install pyfluidsynth`), "
            "or set data.demo.renderer to 'auto' or 'synth'")
    return "fluidsynth"


def render(pm: pretty_midi.PrettyMIDI, sr: int, renderer: str, seed: int) -> np.ndarray:
    """Float32 mono audio of the score; `renderer` is 'fluidsynth' or 'synth' (see resolve_renderer)."""
    if renderer == "fluidsynth":
        return pm.fluidsynth(fs=sr, synthesizer=str(SF2)).astype(np.float32)
    return synth(pm, sr, seed)


# ---- numpy fallback synthesiser -------------------------------------------------------------------
# (harmonic amplitude exponent, number of harmonics, attack s, decay time constant s or None, release s)
FAMILIES = {
    "piano": (1.6, 16, 0.005, 0.9, 0.15),
    "organ": (1.0, 6, 0.02, None, 0.05),
    "guitar": (0.9, 24, 0.005, 1.5, 0.05),
    "bass": (2.0, 12, 0.005, 0.8, 0.05),
    "strings": (1.0, 20, 0.08, None, 0.2),
    "synth": (1.0, 16, 0.01, None, 0.1),
}


def _family(program: int) -> str:
    for lo, name in ((0, "piano"), (16, "organ"), (24, "guitar"), (32, "bass"), (40, "strings"), (56, "synth")):
        if lo <= program < lo + (16 if name == "strings" else 8):
            return name
    return "synth"


@functools.lru_cache(maxsize=None)
def _wavetable(family: str, size: int = 4096) -> np.ndarray:
    power, n_harm = FAMILIES[family][:2]
    phase = np.arange(size) / size
    table = sum(np.sin(2 * np.pi * k * phase) / k**power for k in range(1, n_harm + 1))
    if family == "guitar":
        table = np.tanh(3 * table)  # overdrive
    return (table / np.abs(table).max()).astype(np.float32)


def _drum_samples(sr: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    t = np.arange(int(0.6 * sr)) / sr
    noise = rng.standard_normal(len(t)).astype(np.float32)
    hiss = np.diff(noise, prepend=0) / 2  # first difference: a crude high-pass for cymbals
    sweep = np.cumsum(2 * np.pi * (50 + 90 * np.exp(-t / 0.04)) / sr)  # kick: pitch drops 140 -> 50 Hz
    return {
        KICK: np.sin(sweep) * np.exp(-t / 0.15),
        SNARE: 0.5 * noise * np.exp(-t / 0.1) + 0.5 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.08),
        CLAP: 0.6 * noise * np.exp(-t / 0.06),
        HAT: 0.4 * hiss * np.exp(-t / 0.03),
        OPEN_HAT: 0.4 * hiss * np.exp(-t / 0.2),
    }


def synth(pm: pretty_midi.PrettyMIDI, sr: int, seed: int) -> np.ndarray:
    """Wavetable oscillators with attack/decay/release envelopes per instrument family, noise drums."""
    out = np.zeros(int((pm.get_end_time() + 1.0) * sr), np.float32)
    drums = _drum_samples(sr, np.random.default_rng(seed))
    for inst in pm.instruments:
        family = _family(inst.program)
        _, _, attack, decay, release = FAMILIES[family]
        table = _wavetable(family)
        for note in inst.notes:
            start, gain = int(note.start * sr), note.velocity / 127 * 0.3
            if inst.is_drum:
                y = drums.get(note.pitch, drums[HAT])
            else:
                dur = note.end - note.start
                t = np.arange(int((dur + release) * sr)) / sr
                idx = (t * pretty_midi.note_number_to_hz(note.pitch) * len(table)).astype(np.int64)
                env = np.minimum(1.0, t / attack) * np.clip(1 - (t - dur) / release, 0, 1)
                if decay:
                    env *= np.exp(-t / decay)
                y = table[idx % len(table)] * env
            y = y[: len(out) - start]
            out[start:start + len(y)] += gain * y
    return out
