"""The two generative backends behind one interface (models/base.py). Import is lazy: choosing a backend
by name is the only place the rest of the code knows there are two."""

from __future__ import annotations

import os

import v2m  # noqa: F401  first: this process's numba cache slot (v2m/numba_cache.py)

# cuBLAS reads its workspace setting once, when CUDA starts; deterministic training (tasks/training/trainer.py)
# needs this one. Every entry point imports `models` before it builds a model on a GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

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


MARKER = "v2m_model.json"


def default_device() -> str:
    """V2M_DEVICE (set by the gpu-a40 work pool's job variables), else CUDA when present, else the CPU."""
    import os
    if os.environ.get("V2M_DEVICE"):
        return os.environ["V2M_DEVICE"]
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def configure_torch(threads: int) -> None:
    """Apply params.yaml `torch_threads` (0 = leave torch's default)."""
    if threads:
        import torch
        torch.set_num_threads(threads)


def save_model(backend, directory) -> None:
    """backend.save() plus a marker naming the backend, so a folder alone is enough to load it again."""
    import json
    from pathlib import Path
    backend.save(directory)
    (Path(directory) / MARKER).write_text(json.dumps({"backend": backend.name}))


def load_model(directory, device: str = "cpu"):
    """Load a folder written by save_model (a fine-tuned model or a base model)."""
    import json
    from pathlib import Path
    marker = Path(directory) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{directory}: not a saved voice2music model (no {MARKER})")
    return get_backend(json.loads(marker.read_text())["backend"]).load(Path(directory), device=device)
