"""Separation benchmark: SDR improvement of the weight-free separator on the demo's own stems, what its quality
estimates decide, and the speed of both separators on this CPU.

For each demo track (rendered as a mix by `v2m data demo --mixes`, the true stems in its stems/ folder):
  - SDRi of the separated vocal and instrumental against the true stems (dB; > 0 = closer to the truth than
    the mix itself), and the speed in x real time (one process);
  - the quality verdict on the mix, and on the track's instrumental alone (a song without vocals: should be
    quarantined as no_vocal);
then the means, and the learned separator's speed: HTDemucs at the released size (random weights: the speed does
not depend on their values) and the tiny test model, on 30 s of audio, on this CPU.

    python bench/separation.py [--mixes data/mixes] [--tracks 18] [--no-demucs]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import v2m  # noqa: E402,F401  first: this process's numba cache slot
import numpy as np  # noqa: E402

from tasks.data import harmonic_mask  # noqa: E402
from tasks.data.separation_quality import estimate, sdr_improvement, verdict  # noqa: E402
from v2m.audio import read_audio  # noqa: E402
from v2m.config import load_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def render(n_tracks: int, out: Path) -> Path:
    from tasks.data.demo import build_demo_dataset, write_mixes
    p = load_params(ROOT / "params.yaml")
    build_demo_dataset(out / "stems", p.data.demo.model_copy(update={"n_tracks": n_tracks}), seed=p.seed)
    write_mixes(out / "stems", out)
    return out


def harmonic(mixes: Path, p) -> list[dict]:
    with open(mixes / "ground_truth.csv", newline="") as f:
        truth = {r["track_id"]: r for r in csv.DictReader(f)}
    rows = []
    for tid, t in truth.items():
        mix, sr = read_audio(mixes / f"{tid}.wav")
        vocal, _ = read_audio(mixes / "stems" / tid / "vocals.wav")
        inst, _ = read_audio(mixes / "stems" / tid / "instrumental.wav")
        started = time.perf_counter()
        v, i, _ = harmonic_mask.separate(mix, sr, p.separate.harmonic)
        seconds = time.perf_counter() - started
        q = verdict(estimate(mix, v, i, sr, p.separate.harmonic), p.separate.quality, p.separate.min_quality)
        v0, i0, _ = harmonic_mask.separate(inst, sr, p.separate.harmonic)
        q0 = verdict(estimate(inst, v0, i0, sr, p.separate.harmonic), p.separate.quality, p.separate.min_quality)
        rows.append({"track": tid, "genre": t["genre"], "voice": t["voice"],
                     "sdri_vocal": sdr_improvement(vocal, v, mix), "sdri_inst": sdr_improvement(inst, i, mix),
                     "x_rt": mix.shape[1] / sr / seconds, "mix": q["status"],
                     "inst_only": f"{q0['status']} {q0.get('reason', '')}".strip()})
        r = rows[-1]
        print(f"{tid} {r['genre']:9s} SDRi vocal {r['sdri_vocal']:+6.2f} dB  instrumental {r['sdri_inst']:+6.2f} dB  "
              f"{r['x_rt']:5.1f}x real time  mix: {r['mix']:11s} instrumental alone: {r['inst_only']}", flush=True)
    return rows


def demucs_speed(seconds: float = 30.0) -> None:
    import torch
    from demucs.htdemucs import HTDemucs

    from tasks.data.demucs_separator import Bag, separate_batch
    from v2m.config_separate import DemucsConfig
    torch.manual_seed(0)
    sources = ["drums", "bass", "other", "vocals"]
    sizes = {"htdemucs (released size, random weights)": dict(bottom_channels=512, segment=7.8),
             "tiny (the tests' model)": dict(channels=8, depth=4, t_layers=1, segment=4.0)}
    audio = np.random.default_rng(0).standard_normal((2, int(seconds * 44100))).astype(np.float32) * 0.1
    for name, kw in sizes.items():
        model = HTDemucs(sources=sources, **kw).eval()
        bag = Bag([model], [[1.0] * 4], sources, 44100, 2, float(model.segment), "bench")
        started = time.perf_counter()
        separate_batch(bag, [(audio, 44100)], DemucsConfig(batch_size=4), "cpu")
        took = time.perf_counter() - started
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"demucs {name}: {params:.1f} M parameters, {seconds:.0f} s of stereo 44.1 kHz in {took:.1f} s = "
              f"{seconds / took:.2f}x real time on {torch.get_num_threads()} CPU thread(s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mixes", type=Path, help="a `v2m data demo --mixes` folder (default: render one)")
    ap.add_argument("--tracks", type=int, default=18)
    ap.add_argument("--no-demucs", action="store_true")
    a = ap.parse_args()
    p = load_params(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        mixes = a.mixes or render(a.tracks, Path(tmp) / "mixes")
        rows = harmonic(mixes, p)
    col = {k: np.array([r[k] for r in rows]) for k in ("sdri_vocal", "sdri_inst", "x_rt")}
    print(f"\nweight-free (harmonic) separator on {len(rows)} demo tracks: SDRi vocal {col['sdri_vocal'].mean():+.2f} dB "
          f"(min {col['sdri_vocal'].min():+.2f}), instrumental {col['sdri_inst'].mean():+.2f} dB "
          f"(min {col['sdri_inst'].min():+.2f}); {np.median(col['x_rt']):.1f}x real time (median, one process)")
    print(f"quality verdicts: mixes kept {sum(r['mix'] == 'ok' for r in rows)}/{len(rows)}; instrumentals alone "
          f"quarantined as no_vocal {sum(r['inst_only'].endswith('no_vocal') for r in rows)}/{len(rows)} "
          + str({g: f"{sum(r['inst_only'].endswith('no_vocal') for r in rows if r['genre'] == g)}/"
                    f"{sum(r['genre'] == g for r in rows)}" for g in sorted({r['genre'] for r in rows})}))
    if not a.no_demucs:
        demucs_speed()


if __name__ == "__main__":
    main()
