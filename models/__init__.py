"""The two generative backends behind one interface (models/base.py). Import is lazy: choosing a backend
by name is the only place the rest of the code knows there are two."""

from __future__ import annotations

BACKENDS = ("musicgen", "audioldm")


def get_backend(name: str):
    """The Backend class for a name in BACKENDS."""
    if name == "musicgen":
        from models.musicgen import MusicGenBackend
        return MusicGenBackend
    if name == "audioldm":
        from models.audioldm import AudioLDMBackend
        return AudioLDMBackend
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
