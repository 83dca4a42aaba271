"""Refuse a model whose generation ignores its conditions.

Conditioning can be switched off silently by the library underneath: with transformers 5.17, MusicGen-Melody's
generate() returns the same codes whatever the melody, the text or the guidance scale (fixed in 5.24), and
the audio still looks fine (finite, the right length). So, at the same seed, we generate for

    (melody A, prompt P)   (melody B, prompt P)   (melody A, prompt Q)

and require that another melody and another prompt each change what the model generates (Backend.probe: the
codes for MusicGen, the raw waveform otherwise). A condition the model does not use *by construction* is not
required: a pretrained AudioLDM whose vocal columns are still zero (models/audioldm.py) hears only the text
until fine-tuning teaches it the vocal (Backend.conditions_in_use).

`v2m serve` runs require_conditioning() on every model it loads; bench/gpu_acceptance.py reports the check.
"""

from __future__ import annotations

import numpy as np

from models.base import Backend

SR = 32000
SECONDS = 0.2  # a few decoder steps: the first step's scores already carry every condition
PROMPTS = ("disco music for input vocals", "calm classical piano, slow tempo")


class ConditioningIgnoredError(RuntimeError):
    """The model generated the same output for another melody or another prompt (same seed)."""


def melody(midi_notes: list[int], seconds: float = SECONDS, sr: int = SR) -> np.ndarray:
    """A sung-like line: the notes in equal parts, each a harmonic tone with a little vibrato."""
    t = np.arange(int(seconds * sr)) / sr
    part = len(t) // len(midi_notes) + 1
    f0 = np.repeat([440.0 * 2 ** ((m - 69) / 12) for m in midi_notes], part)[: len(t)]
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.003 * np.sin(2 * np.pi * 5 * t))) / sr
    return (0.3 * sum(np.sin(h * phase) / h for h in (1, 2, 3))).astype(np.float32)


MELODIES = (melody([60, 64, 67, 72]), melody([66, 70, 61, 63]))  # C-E-G-C against F#-A#-C#-D#: no shared class


def conditioning_check(backend: Backend, seed: int = 0, seconds: float = SECONDS, steps: int = 2) -> dict:
    """{"melody": bool | "unused", "prompt": bool | "unused"}: whether each condition changed the output at the
    same seed ("unused": the model does not use it by construction, so it was not required)."""
    def run(vocal: np.ndarray, prompt: str) -> np.ndarray:
        return np.asarray(backend.probe(vocal, SR, prompt, seconds, seed, steps))

    base = run(MELODIES[0], PROMPTS[0])
    changed = {"melody": not np.array_equal(base, run(MELODIES[1], PROMPTS[0])),
               "prompt": not np.array_equal(base, run(MELODIES[0], PROMPTS[1]))}
    used = backend.conditions_in_use()
    return {name: (changed[name] if name in used else "unused") for name in changed}


def require_conditioning(backend: Backend, **options) -> Backend:
    """The backend, after checking that its generation follows its conditions; ConditioningIgnoredError if not."""
    result = conditioning_check(backend, **options)
    ignored = [name for name, ok in result.items() if ok is False]
    if ignored:
        raise ConditioningIgnoredError(
            f"{backend.name}: generation ignores the {' and the '.join(ignored)} (same output for another "
            f"{' / another '.join(ignored)} at the same seed). With MusicGen-Melody this is the transformers < 5.24 "
            f"generate() bug: install transformers>=5.24")
    backend.conditioning = result
    return backend
