"""Stage 5 — segment: aligned vocal/instrumental chunks for each backend, and their manifests.

MusicGen takes 30 s chunks at 32 kHz, AudioLDM 20 s chunks at 16 kHz plus the same span of the vocal at
48 kHz for CLAP (lengths and hops in params). Vocal chunk i and instrumental chunk i are cut from the same
sample range of the same normalised track, so they stay aligned by construction. Chunks whose vocal is
mostly silent (less than `min_vocal_active` of 50 ms frames above `vocal_active_dbfs`) are dropped: they
teach the model nothing about following a voice.

Outputs: `out_dir/<backend>/<track_id>/<i>_{vocals,instrumental}[_48k].wav` and
`out_dir/<backend>.jsonl`, one manifest record per chunk (see shared/notes/conventions.md), and
`out_dir/test_fingerprint.json`, each backend's test-set fingerprint (recorded with the data version).
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from tasks.data.normalize import rate_tag
from tasks.data.track_cache import (cache_key, code_version, module_closure, confined, read_jsonl, run_per_track,
                                    write_jsonl, write_stats)
from v2m.audio import frame_rms_db, write_wav
from v2m.config import ChunkConfig, NormalizeConfig, SegmentConfig

BACKENDS = ("musicgen", "audioldm")
FINGERPRINTS = "test_fingerprint.json"  # {backend: fingerprint of its test chunks}
PROVENANCE_KEYS = ("track_id", "artist", "title", "genre", "language", "mood", "bpm", "key",
                   "bpm_source", "key_source", "vocals_sha256", "instrumental_sha256")


def test_fingerprint(records: list[dict[str, Any]]) -> str:
    """The identity of a backend's test set: its chunk ids and spans with the content hashes of their source
    stems. Two evaluations are comparable only if they ran on the same fingerprint (and settings)."""
    items = sorted((r["chunk_id"], r["start_s"], r["end_s"], r["vocals_sha256"], r["instrumental_sha256"])
                   for r in records if r["split"] == "test")
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def chunk_spans(n_samples: int, sr: int, chunk: ChunkConfig) -> list[tuple[int, int]]:
    """Sample ranges [start, end) of each chunk; a last partial chunk is kept if >= min_chunk_s."""
    size, hop, min_len = (round(x * sr) for x in (chunk.chunk_s, chunk.hop_s, chunk.min_chunk_s))
    spans = []
    start = 0
    while start < n_samples:
        end = min(start + size, n_samples)
        if end - start >= min_len:
            spans.append((start, end))
        if end == n_samples:
            break
        start += hop
    return spans


def read_pcm16(path: str) -> np.ndarray:
    data, _ = sf.read(path, dtype="int16")
    return data if data.ndim == 1 else data[:, 0]


def vocal_activity(vocal: np.ndarray, sr: int, threshold_dbfs: float) -> float:
    levels = frame_rms_db(vocal, sr)
    return float(np.mean(levels > threshold_dbfs)) if levels.size else 0.0


def segment_track(rec: dict[str, Any], cfg: SegmentConfig, norm: NormalizeConfig,
                  out_dir: Path) -> dict[str, Any]:
    rates = {"musicgen": norm.musicgen_sr, "audioldm": norm.audioldm_sr}
    chunks: dict[str, list[dict[str, Any]]] = {}
    outputs: list[str] = []
    dropped = 0
    for backend in BACKENDS:
        sr, tag = rates[backend], rate_tag(rates[backend])
        # Normalised files are mono 16-bit: cut them as int16, so chunks are exact copies (no re-quantising).
        vocal = read_pcm16(rec["normalized"][f"vocals_{tag}"])
        inst = read_pcm16(rec["normalized"][f"instrumental_{tag}"])
        n = min(len(vocal), len(inst))  # validate allowed a small length mismatch
        clap = None
        if backend == "audioldm":
            clap = read_pcm16(rec["normalized"][f"vocals_{rate_tag(norm.clap_sr)}"])
        chunks[backend] = []
        for i, (s, e) in enumerate(chunk_spans(n, sr, getattr(cfg, backend))):
            active = vocal_activity(vocal[s:e] / np.float32(32768), sr, cfg.vocal_active_dbfs)
            if active < cfg.min_vocal_active:
                dropped += 1
                continue
            base = confined(out_dir, backend, rec["track_id"]) / f"{i:03d}"
            item = {"chunk_id": f"{rec['track_id']}-{backend}-{i:03d}", "index": i,
                    "start_s": s / sr, "end_s": e / sr, "sample_rate": sr, "vocal_active": round(active, 3),
                    "vocals_path": f"{base}_vocals.wav", "instrumental_path": f"{base}_instrumental.wav"}
            write_wav(item["vocals_path"], vocal[s:e], sr)
            write_wav(item["instrumental_path"], inst[s:e], sr)
            if clap is not None:
                # The same time span at CLAP's rate, computed from the times so rounding cannot drift.
                cs, ce = round(s / sr * norm.clap_sr), round(e / sr * norm.clap_sr)
                item["vocals_clap_path"] = f"{base}_vocals_{rate_tag(norm.clap_sr)}.wav"
                item["clap_sample_rate"] = norm.clap_sr
                write_wav(item["vocals_clap_path"], clap[cs:ce], norm.clap_sr)
            outputs += [v for k, v in item.items() if k.endswith("_path")]
            chunks[backend].append(item)
    return {"track_id": rec["track_id"], "chunks": chunks, "dropped_silent": dropped, "outputs": outputs}


def segment_dataset(split_dir: str | Path, out_dir: str | Path, cfg: SegmentConfig,
                    norm: NormalizeConfig, workers: int = 0, progress=None) -> dict[str, Any]:
    out_dir = Path(out_dir)
    tracks = read_jsonl(Path(split_dir) / "tracks.jsonl")
    version = code_version(*module_closure(__file__))  # this stage's code and every helper it runs
    # The split is not part of the key: moving a track between splits rewrites the manifest, not audio.
    key_fn = lambda r: cache_key("segment", version, cfg.model_dump(), norm.model_dump(),  # noqa: E731
                                 {k: v for k, v in r.items() if k != "split"})
    results, stats = run_per_track("segment", tracks, key_fn,
                                   partial(segment_track, cfg=cfg, norm=norm, out_dir=out_dir),
                                   out_dir, workers, progress)
    manifests = {}
    for backend in BACKENDS:
        rows = []
        for track, res in zip(tracks, results):
            prov = {k: track.get(k) for k in PROVENANCE_KEYS}
            for c in res["chunks"][backend]:
                rows.append({**prov, **c, "split": track["split"], "backend": backend,
                             "source_vocals_path": track["vocals_path"],
                             "source_instrumental_path": track["instrumental_path"]})
        write_jsonl(out_dir / f"{backend}.jsonl", rows)
        manifests[backend] = rows
    fingerprints = {b: test_fingerprint(rows) for b, rows in manifests.items()}
    (out_dir / FINGERPRINTS).write_text(json.dumps(fingerprints, indent=1, sort_keys=True))
    write_stats(out_dir, stats, chunks={b: len(r) for b, r in manifests.items()},
                dropped_silent=sum(r["dropped_silent"] for r in results))
    return {"manifests": manifests, "stats": stats, "test_fingerprint": fingerprints}
