"""Sing the soprano line: one syllable per note, in the artist's language and timbre.

Two engines:
- espeak: espeak-ng speaks each syllable with a *flat* pitch (a voice variant with `pitch H H`, `flutter 0`)
  set to the note's frequency, so the formants stay natural; librosa then time-stretches it to the note.
  espeak-ng only reads variants from its data folder, so a build makes a private data folder (the system
  one linked in) and writes its variants there.
- formant: a glottal-like harmonic source at the note's f0 with vibrato, through vowel formant resonators,
  with a little breath noise. Needs nothing outside Python.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
from scipy.signal import lfilter

from v2m.audio import resample

VOICE_SR = 22050  # espeak-ng's native rate; both engines sing at it, the track is resampled once
ESPEAK_LANG = {"en": "en", "fr": "fr", "ar": "ar"}
# (text espeak-ng reads, vowel the formant synth sings): lyric-like syllables per language
SYLLABLES = {
    "en": [("la", "a"), ("loo", "u"), ("lie", "a"), ("day", "e"), ("no", "o"), ("my", "a"),
           ("oh", "o"), ("see", "i"), ("you", "u"), ("love", "a"), ("go", "o"), ("sun", "a")],
    "fr": [("la", "a"), ("lu", "y"), ("doux", "u"), ("beau", "o"), ("si", "i"), ("mer", "e"),
           ("nuit", "i"), ("rêve", "e"), ("toi", "a"), ("vie", "i"), ("mon", "o"), ("ciel", "e")],
    "ar": [("يا", "a"), ("لا", "a"), ("نور", "u"), ("ليل", "i"), ("سما", "a"), ("هوى", "a"),
           ("دار", "a"), ("عين", "i"), ("قلب", "a"), ("روح", "u"), ("بي", "i"), ("هو", "u")],
}
# vowel -> formant frequencies F1, F2, F3 (Hz, adult male averages; artists scale them)
VOWELS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010),
          "o": (570, 840, 2410), "u": (300, 870, 2240), "y": (280, 1650, 2200)}
FORMANT_BW = (80, 100, 140)


@dataclass(frozen=True)
class Artist:
    name: str
    language: str
    gender: str             # "female" sings the soprano as written; "male" an octave lower (pitch class kept)
    octave: int
    espeak_variant: str     # built-in espeak-ng variant whose timbre (formants, breath, echo) is borrowed
    formant_scale: float    # vocal-tract size for the formant synth (female ~1.15, male ~1.0)
    vibrato_rate: float     # Hz
    vibrato_depth: float    # semitones
    breath: float           # share of noise in the formant synth's source


def make_artists(n: int, languages: list[str], seed: int) -> list[Artist]:
    """n singers; languages round-robin (every language gets artists), genders alternate per round."""
    rng = np.random.default_rng([seed, 2])
    artists = []
    for i in range(n):
        female = (i // len(languages)) % 2 == 0
        artists.append(Artist(
            name=f"artist_{i + 1:02d}", language=languages[i % len(languages)],
            gender="female" if female else "male", octave=0 if female else -1,
            espeak_variant=f"f{rng.integers(1, 6)}" if female else f"m{rng.integers(1, 8)}",
            formant_scale=round(float(rng.uniform(1.1, 1.2) if female else rng.uniform(0.95, 1.05)), 3),
            vibrato_rate=round(float(rng.uniform(4.8, 6.4)), 2),
            vibrato_depth=round(float(rng.uniform(0.15, 0.45)), 2),
            breath=round(float(rng.uniform(0.02, 0.06)), 3)))
    return artists


def lyrics(n_notes: int, language: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """One syllable per note."""
    pool = SYLLABLES[language]
    return [pool[i] for i in rng.integers(0, len(pool), n_notes)]


# ---- espeak-ng engine -----------------------------------------------------------------------------
def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def resolve_voice(requested: str) -> str:
    if requested == "formant" or (requested == "auto" and not espeak_available()):
        return "formant"
    if not espeak_available():
        raise RuntimeError("voice 'espeak' requested but espeak-ng is not on PATH "
                           "(apt-get install espeak-ng), or set data.demo.voice to 'auto' or 'formant'")
    return "espeak"


def _system_data_dir() -> Path:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return Path(re.search(r"Data at:\s*(\S+)", out).group(1))


@contextlib.contextmanager
def espeak_workspace():
    """A private espeak-ng data folder (for `--path`): system data linked in, an empty variants folder."""
    with tempfile.TemporaryDirectory(prefix="v2m-espeak-") as tmp:
        system, data = _system_data_dir(), Path(tmp) / "espeak-ng-data"
        (data / "voices" / "!v").mkdir(parents=True)
        for entry in system.iterdir():
            if entry.name != "voices":
                (data / entry.name).symlink_to(entry)
        for entry in (system / "voices").iterdir():
            if entry.name != "!v":
                (data / "voices" / entry.name).symlink_to(entry)
        (Path(tmp) / "system_variants").symlink_to(system / "voices" / "!v")
        yield Path(tmp)


def _variant(root: Path, base: str, hz: float) -> str:
    """Write (once) a variant with the timbre of `base` and a flat pitch at `hz`; return its name."""
    h = int(round(hz + 9))  # espeak-ng sings ~9 Hz under the `pitch` value (measured 141-870 Hz)
    name = f"v2m_{base}_{h}"
    path = root / "espeak-ng-data" / "voices" / "!v" / name
    if not path.exists():
        text = (root / "system_variants" / base).read_text(errors="replace")
        keep = [ln for ln in text.splitlines() if ln.split()[:1] not in (["pitch"], ["flutter"], ["name"])]
        tmp = path.with_suffix(f".{os.getpid()}")
        tmp.write_text("\n".join(keep + [f"name {name}", f"pitch {h} {h}", "flutter 0", ""]))
        tmp.replace(path)  # atomic: parallel workers may write the same variant
    return name


@functools.lru_cache(maxsize=2048)
def _espeak_syllable(root: Path, lang: str, base: str, text: str, hz: float) -> np.ndarray:
    """One syllable at a flat pitch, silence trimmed. Cached: verses repeat (syllable, voice, pitch)."""
    variant = _variant(root, base, hz)
    with tempfile.NamedTemporaryFile(suffix=".wav", dir=root) as wav:
        subprocess.run(["espeak-ng", f"--path={root}", "-v", f"{lang}+{variant}", "-s", "140", "-w", wav.name,
                        text], check=True, capture_output=True)
        y, sr = sf.read(wav.name, dtype="float32")
    assert sr == VOICE_SR, sr
    y, _ = librosa.effects.trim(y, top_db=35)
    return y / (np.abs(y).max() + 1e-9)


def _espeak_note(root, artist: Artist, syllable: tuple[str, str], hz: float, n: int, rng) -> np.ndarray:
    y = _espeak_syllable(root, ESPEAK_LANG[artist.language], artist.espeak_variant, syllable[0], hz)
    y = librosa.effects.time_stretch(y, rate=len(y) / n, n_fft=1024, hop_length=256)
    return librosa.util.fix_length(y, size=n)


# ---- formant engine -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _source_table(n_harm: int, size: int = 4096) -> np.ndarray:
    """One period of a glottal-like source: harmonics falling ~12 dB/octave, band-limited to n_harm."""
    phase = np.arange(size) / size
    table = sum(np.sin(2 * np.pi * k * phase) / k**1.5 for k in range(1, n_harm + 1))
    return (table / np.abs(table).max()).astype(np.float32)


def _formant_note(artist: Artist, syllable: tuple[str, str], hz: float, n: int, rng) -> np.ndarray:
    t = np.arange(n) / VOICE_SR
    vib = artist.vibrato_depth * np.sin(2 * np.pi * artist.vibrato_rate * t) * np.clip(t / 0.3 - 0.5, 0, 1)
    f0 = hz * 2.0 ** (vib / 12)  # vibrato fades in after ~150 ms, as singers do on held notes
    table = _source_table(max(1, min(40, int(0.45 * VOICE_SR / hz))))
    idx = (np.cumsum(f0) / VOICE_SR * len(table)).astype(np.int64) % len(table)
    y = table[idx] + artist.breath * rng.standard_normal(n).astype(np.float32)
    for f, bw in zip(VOWELS[syllable[1]], FORMANT_BW):  # cascade of two-pole resonators
        r, theta = np.exp(-np.pi * bw / VOICE_SR), 2 * np.pi * f * artist.formant_scale / VOICE_SR
        y = lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], y)
    return (y / (np.abs(y).max() + 1e-9)).astype(np.float32)


# ---- both ---------------------------------------------------------------------------------------------
def sing(notes: list[tuple[float, float, float]], words: list[tuple[str, str]], artist: Artist, engine: str,
         sr: int, seed: int, espeak_root: Path | None = None) -> np.ndarray:
    """Vocal for notes (midi pitch, start s, duration s) with one syllable each; rests stay silent."""
    rng = np.random.default_rng(seed)
    end = max((on + d for _, on, d in notes), default=0.0)
    out = np.zeros(int(end * VOICE_SR) + VOICE_SR, np.float32)
    for (pitch, on, dur), syllable in zip(notes, words):
        hz = float(librosa.midi_to_hz(pitch))
        n = int(dur * VOICE_SR) - int(min(0.06, 0.15 * dur) * VOICE_SR)  # a breath between notes
        if n < 256:  # a sliver left by the cut at the end
            continue
        if engine == "espeak":
            y = _espeak_note(espeak_root, artist, syllable, hz, n, rng)
        else:
            y = _formant_note(artist, syllable, hz, n, rng)
        fade_in, fade_out = min(n // 4, int(0.01 * VOICE_SR)), min(n // 3, int(0.04 * VOICE_SR))
        y[:fade_in] *= np.linspace(0, 1, fade_in)
        y[n - fade_out:] *= np.linspace(1, 0, fade_out)
        start = int(on * VOICE_SR)
        out[start:start + n] += 0.8 * y
    return resample(out, VOICE_SR, sr)
