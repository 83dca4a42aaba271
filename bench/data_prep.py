"""Data-prep benchmark: the pipeline against a naive librosa baseline, and the incremental re-run.

Prints, from one run on the same files:
  - seconds of audio processed per second of wall time for validate -> normalize -> segment (the split
    in between is included; label is timed apart, since its tempo/key estimation dominates);
  - the same for a naive single-process baseline: librosa.load(sr=...) once per target rate, then write
    the normalised files and the chunks;
  - their ratio, and the cost of a re-run after one of N tracks changed, as a fraction of the full run.

    python bench/data_prep.py [--tracks 12] [--data DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import v2m  # noqa: E402,F401  first: this process's numba cache slot (v2m/numba_cache.py)
import librosa  # noqa: E402
import soundfile as sf  # noqa: E402

from tasks.data.normalize import normalize_dataset  # noqa: E402
from tasks.data.segment import chunk_spans  # noqa: E402
from tasks.data.segment import segment_dataset  # noqa: E402
from tasks.data.split import split_dataset  # noqa: E402
from tasks.data.track_cache import read_jsonl, resolve_workers  # noqa: E402
from tasks.data.validate import validate_dataset  # noqa: E402
from v2m.config import load_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pipeline(raw: Path, work: Path, p) -> dict[str, float]:
    d, times = p.data, {}
    t = time.perf_counter()
    validate_dataset(raw, work / "validated", d.validate_, p.workers)
    normalize_dataset(work / "validated", work / "normalized", d.normalize, p.workers)
    split_dataset(work / "normalized", work / "split", d.split, p.seed)
    segment_dataset(work / "split", work / "segments", d.segment, d.normalize, p.workers)
    times["pipeline"] = time.perf_counter() - t
    from tasks.data.label import label_dataset  # imported late: librosa brings numba's threads (see track_cache._pool)
    t = time.perf_counter()
    label_dataset(work / "normalized", work / "labelled", d.label, d.normalize.audioldm_sr, p.workers)
    times["label"] = time.perf_counter() - t
    return times


def naive(tracks: list[dict], out: Path, p) -> float:
    """One process, librosa.load per target rate, write the resampled files and the chunks."""
    n = p.data.normalize
    jobs = {"vocals": [n.musicgen_sr, n.audioldm_sr, n.clap_sr], "instrumental": [n.musicgen_sr, n.audioldm_sr]}
    chunking = {n.musicgen_sr: p.data.segment.musicgen, n.audioldm_sr: p.data.segment.audioldm}
    t = time.perf_counter()
    for track in tracks:
        for stem, rates in jobs.items():
            for sr in rates:
                y, _ = librosa.load(track[f"{stem}_path"], sr=sr, mono=True)
                d = out / track["track_id"]
                d.mkdir(parents=True, exist_ok=True)
                sf.write(d / f"{stem}_{sr}.wav", y, sr, subtype="PCM_16")
                for i, (s, e) in enumerate(chunk_spans(len(y), sr, chunking.get(sr, chunking[n.audioldm_sr]))):
                    sf.write(d / f"{stem}_{sr}_{i:03d}.wav", y[s:e], sr, subtype="PCM_16")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracks", type=int, default=12, help="demo tracks to build when --data is not given")
    ap.add_argument("--data", type=Path, help="an existing raw dataset to benchmark on")
    args = ap.parse_args()
    p = load_params(ROOT / "params.yaml")
    tmp = Path(tempfile.mkdtemp(prefix="v2m-bench-"))
    try:
        raw = args.data
        if raw is None:
            from tasks.data.demo import build_demo_dataset
            raw = tmp / "raw"
            t = time.perf_counter()
            build_demo_dataset(raw, p.data.demo.model_copy(update={"n_tracks": args.tracks}), seed=p.seed)
            print(f"built {args.tracks} demo tracks in {time.perf_counter() - t:.1f} s")
        times = pipeline(raw, tmp / "work", p)
        tracks = read_jsonl(tmp / "work" / "validated" / "tracks.jsonl")
        audio_s = sum(t["duration_s"] for t in tracks)
        naive_s = naive(tracks, tmp / "naive", p)

        # Change one track, both stems (a gain change: new bytes, same length), and re-run.
        for stem in ("vocals", "instrumental"):
            victim = Path(tracks[len(tracks) // 2][f"{stem}_path"])
            y, sr = sf.read(victim)
            sf.write(victim, 0.8 * y, sr, subtype=sf.info(victim).subtype)
        rerun = pipeline(raw, tmp / "work", p)

        n = len(tracks)
        print(f"workers: {resolve_workers(p.workers)}; tracks: {n}; audio: {audio_s:.0f} s "
              f"({audio_s / n:.1f} s per track)")
        print(f"pipeline (validate -> normalize -> split -> segment): {times['pipeline']:.2f} s = "
              f"{audio_s / times['pipeline']:.0f}x real time")
        print(f"naive librosa baseline (1 process):                   {naive_s:.2f} s = "
              f"{audio_s / naive_s:.0f}x real time")
        print(f"pipeline / baseline speed ratio: {naive_s / times['pipeline']:.2f}x")
        print(f"label (tempo + key estimation, timed apart): {times['label']:.2f} s = "
              f"{audio_s / times['label']:.0f}x real time")
        print(f"re-run after changing 1 of {n} tracks: {rerun['pipeline']:.2f} s = "
              f"{rerun['pipeline'] / times['pipeline']:.3f} of the full run (target <= 2/N = {2 / n:.3f}); "
              f"label re-run {rerun['label']:.2f} s = {rerun['label'] / times['label']:.3f} of its full run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
