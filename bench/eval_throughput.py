"""Evaluation throughput on the CPU: seconds of generated audio scored per second of wall time.

Renders N chorale pairs (the soprano sung by the formant voice = the vocal; alto + tenor + bass in a
style = the "generated" instrumental, at MusicGen's 32 kHz), then times:
  - compute_sample_metrics per pair (sanity, harmonic fit, chroma cosine, key, tempo), with a breakdown;
  - FAD with the weight-free MelStatsEmbedder between the N instrumentals and N other renders
    (the same chorales in another style), embedding included;
  - optionally CLAP embeddings (--clap DIR: a local ClapModel folder).
Rendering is not timed.

    python bench/eval_throughput.py [--pairs 10] [--seconds 10] [--clap DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.data import render, voice  # noqa: E402
from tasks.data.chorales import loop_and_cut, pick_chorales  # noqa: E402
from tasks.evaluation import metrics as M  # noqa: E402
from tasks.evaluation.harmony import ANALYSIS_SR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SR = 32000
WORDS = [("la", "a"), ("loo", "u"), ("see", "i"), ("oh", "o"), ("day", "e")]


def fit(y: np.ndarray, n: int) -> np.ndarray:
    y = np.pad(np.asarray(y, np.float32)[:n], (0, max(0, n - len(y))))
    return y * (0.7 / (np.abs(y).max() + 1e-9))


def render_pairs(n_pairs: int, seconds: float, seed: int = 5) -> list[dict]:
    renderer = render.resolve_renderer("auto")
    singer = voice.make_artists(1, ["en"], seed)[0]
    styles = ["classical", "pop", "rock", "disco"]
    pairs = []
    for k, ch in enumerate(pick_chorales(n_pairs, seed, ROOT / ".v2m" / "cache" / "chorales")):
        style, other = styles[k % 4], styles[(k + 1) % 4]
        bpm = float(np.mean(render.STYLES[style].bpm))
        c, _ = loop_and_cut(ch, seconds * bpm / 60, seconds * bpm / 60)
        n, sec = int(seconds * SR), 60 / bpm
        notes = [(m, on * sec, d * sec) for m, on, d in c.parts["Soprano"]]
        vocal = voice.sing(notes, WORDS * (len(notes) // len(WORDS) + 1), singer, "formant", SR, k)
        pairs.append({"vocal": fit(vocal, n),
                      "inst": fit(render.render(render.arrange(c, style, bpm), SR, renderer, k), n),
                      "other": fit(render.render(render.arrange(c, other, bpm), SR, renderer, k), n),
                      "meta": {"bpm": bpm, "key": ch.key}})
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clap", type=Path, default=None, help="local ClapModel folder (optional)")
    args = ap.parse_args()

    t = time.perf_counter()
    pairs = render_pairs(args.pairs, args.seconds)
    audio_s = args.pairs * args.seconds
    print(f"rendered {args.pairs} pairs x {args.seconds:g} s ({render.resolve_renderer('auto')}) in "
          f"{time.perf_counter() - t:.1f} s; {os.cpu_count()} CPU cores; instrumentals at {SR} Hz")

    M.compute_sample_metrics(pairs[0]["vocal"], SR, pairs[0]["inst"], SR, pairs[0]["meta"])  # warm-up (numba, caches)
    t = time.perf_counter()
    rows = [M.compute_sample_metrics(p["vocal"], SR, p["inst"], SR, p["meta"]) for p in pairs]
    wall = time.perf_counter() - t
    print(f"compute_sample_metrics: {audio_s / wall:6.1f} s of audio per s ({wall / args.pairs * 1000:.0f} ms per "
          f"{args.seconds:g} s pair)")

    parts = {"sanity": 0.0, "analyse (chroma x2)": 0.0, "harmonic_fit + chroma_cosine": 0.0, "keys": 0.0, "tempo": 0.0}
    for p in pairs:
        t0 = time.perf_counter()
        M.sanity(p["inst"], SR)
        t1 = time.perf_counter()
        v, a = M.analyse(p["vocal"], SR), M.analyse(p["inst"], SR)
        t2 = time.perf_counter()
        M.harmonic_fit(v, a), M.chroma_cosine(v, a)
        t3 = time.perf_counter()
        M.key_of(a), M.key_of(v)
        t4 = time.perf_counter()
        M.tempo_of(p["inst"], SR)
        t5 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[name] += dt
    total = sum(parts.values())
    print("  breakdown: " + ", ".join(f"{k} {v / total:.0%}" for k, v in parts.items()))
    agg = M.aggregate(rows)
    print(f"  means: harmonic_fit {agg['harmonic_fit']:+.3f}, chroma_cosine {agg['chroma_cosine']:.3f}, "
          f"key_agreement {agg['key_agreement']:.2f}, tempo_agreement {agg['tempo_agreement']:.2f}")

    emb = M.MelStatsEmbedder()
    ref = [(p["inst"], SR) for p in pairs]
    gen = [(p["other"], SR) for p in pairs]
    t = time.perf_counter()
    value = M.fad(ref, gen, emb)
    wall = time.perf_counter() - t
    print(f"FAD (melstats, {args.pairs} vs {args.pairs} clips, embedding included): {2 * audio_s / wall:6.1f} s of "
          f"audio per s; FAD = {value:.1f} (same chorales, style changed)")

    if args.clap:
        clap = M.ClapEmbedder(args.clap)
        clap.embed(pairs[0]["inst"], SR)
        t = time.perf_counter()
        value = M.fad(ref, gen, clap)
        wall = time.perf_counter() - t
        print(f"FAD ({clap.name}): {2 * audio_s / wall:6.1f} s of audio per s; FAD = {value:.4f}")
    print(f"(analysis rate {ANALYSIS_SR} Hz; resampling from {SR} Hz is included in every figure)")


if __name__ == "__main__":
    main()
