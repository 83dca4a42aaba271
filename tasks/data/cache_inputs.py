"""Stage 6 — cache: each backend's model inputs per chunk, so training never re-encodes audio.

    data/segments/<backend>.jsonl  ->  data/cache/<backend>/
        base/                 the base model (random-init presets only: built once, its codebooks seeded
                              from training audio; real presets load their configured weights instead)
        items/<chunk>.safetensors   what backend.prepare() returns (MusicGen: EnCodec codes + vocal chroma;
                              AudioLDM: VAE latents + CLAP vocal embedding)
        index.jsonl           one row per chunk: its metadata, split and cached file

Chunks are cached one by one under the same content-hash cache as the audio stages: re-running after
one track changed re-encodes that track's chunks only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file, save_file

from models import configure_torch, get_backend, save_model
from models.base import Backend
from tasks.data.track_cache import cache_key, code_version, module_closure, read_jsonl, run_per_track, write_jsonl, write_stats
from v2m.audio import read_mono
from v2m.config import Params

CACHE_ROOT = Path("data") / "cache"
N_INIT_CLIPS = 8  # training chunks whose instrumentals seed what random init cannot (codebooks)
META_KEYS = ("chunk_id", "track_id", "split", "artist", "title", "genre", "mood", "bpm", "key", "language",
             "start_s", "end_s", "sample_rate", "vocals_path", "instrumental_path", "vocals_clap_path")


def backend_code_version(name: str) -> str:
    """The code a backend's cached inputs depend on: this module's closure, less the other backends."""
    from models import BACKENDS
    return code_version(*module_closure(__file__, exclude=tuple(f"models/{b}" for b in BACKENDS if b != name)))


def load_base(params: Params, name: str, cache_dir: Path, manifest: list[dict[str, Any]] | None = None,
              device: str = "cpu") -> tuple[Backend, dict[str, str]]:
    """The backend's base model and a description of it (for the `base_model` tag).

    Real presets load their configured weights. Random-init presets are built once from (preset, seed,
    the first training chunks) and saved in `cache_dir/base`, so caching, training and evaluation all see
    the same model; without a manifest (training time) the saved one is loaded."""
    cls, cfg = get_backend(name), getattr(params, name)
    preset = cfg.presets[cfg.preset]
    if preset.weights:
        return cls.from_preset(cfg, cfg.preset, params.seed, device=device), {"base_model": preset.weights}
    base = Path(cache_dir) / "base"
    info = {"base_model": f"{cfg.preset} (random init, seed {params.seed})"}
    if manifest is None:
        if not (base / "base.json").is_file():
            raise FileNotFoundError(f"{base}: no base model; run the cache stage first "
                                    f"(`v2m data cache --backend {name}` or `dvc repro`)")
        return cls.load(base, device=device), info
    init_chunks = [c for c in manifest if c["split"] == "train"][:N_INIT_CLIPS]
    key = cache_key(cfg.preset, preset.model_dump(), params.seed, backend_code_version(name),
                    [(c["chunk_id"], c["instrumental_sha256"]) for c in init_chunks])
    stamp = base / "base.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return cls.load(base, device=device), info
    init_audio = [read_mono(c["instrumental_path"])[0] for c in init_chunks]
    backend = cls.from_preset(cfg, cfg.preset, params.seed, init_audio=init_audio or None, device=device)
    save_model(backend, base)
    stamp.write_text(json.dumps({"key": key, **info, "init_chunks": [c["chunk_id"] for c in init_chunks]}))
    return backend, info


def cache_dataset(params: Params, name: str, segments_dir: str | Path = "data/segments",
                  out_dir: str | Path | None = None, progress=None) -> dict[str, Any]:
    out_dir = Path(out_dir or CACHE_ROOT / name)
    configure_torch(params.torch_threads)
    manifest = read_jsonl(Path(segments_dir) / f"{name}.jsonl")
    backend, info = load_base(params, name, out_dir, manifest)
    stamp = out_dir / "base" / "base.json"  # a rebuilt random-init base invalidates every cached chunk
    base_id = cache_key(info, stamp.read_text() if stamp.is_file() else "")
    version = backend_code_version(name)
    items_dir = out_dir / "items"

    def encode(chunk: dict[str, Any]) -> dict[str, Any]:
        path = items_dir / f"{chunk['track_id']}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(backend.prepare(chunk), str(path))
        return {"path": str(path), "outputs": [str(path)]}

    # run_per_track keys its cache by "track_id": here the unit is a chunk.
    records = [{**c, "track_id": c["chunk_id"]} for c in manifest]
    key_fn = lambda c: cache_key("cache", name, version, base_id,  # noqa: E731
                                 {k: v for k, v in c.items() if k != "split"})
    # workers=1: the model runs in this process (torch uses the cores itself).
    results, stats = run_per_track(f"cache-{name}", records, key_fn, encode, items_dir, workers=1,
                                   progress=progress)
    index = [{**{k: c.get(k) for k in META_KEYS}, "path": r["path"]} for c, r in zip(manifest, results)]
    write_jsonl(out_dir / "index.jsonl", index)
    write_stats(out_dir, stats, chunks=len(index), **info)
    return {"index": index, "stats": stats, **info}


class CachedItems:
    """The cached inputs of one split as a sequence of dicts (arrays + "prompt" + metadata), loaded lazily
    and kept in memory (the tiny presets' caches are small; real runs stream from local disk)."""

    def __init__(self, rows: list[dict[str, Any]], prompt_template: str):
        self.rows, self.template = rows, prompt_template
        self._loaded: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int | slice):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i not in self._loaded:
            row = self.rows[i]
            self._loaded[i] = {**load_file(row["path"]), "prompt": format_prompt(self.template, row), "meta": row}
        return self._loaded[i]


def format_prompt(template: str, row: dict[str, Any]) -> str:
    """Fill a prompt template from chunk metadata ("{genre} music for input vocals")."""
    values = {k: row.get(k) for k in ("genre", "mood", "key", "language", "artist", "title")}
    values["bpm"] = float(row.get("bpm") or 0)
    values = {k: ("" if v is None else v) for k, v in values.items()}
    return template.format(**values).strip()


def load_split(cache_dir: Path, split: str, prompt_template: str) -> CachedItems:
    rows = [r for r in read_jsonl(Path(cache_dir) / "index.jsonl") if r["split"] == split]
    return CachedItems(rows, prompt_template)
