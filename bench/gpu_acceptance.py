"""GPU acceptance in one go, random init at real size (nothing is downloaded):

    python bench/gpu_acceptance.py            # on a CUDA machine
    python bench/gpu_acceptance.py --tiny     # anywhere: the same code paths at tiny size on the CPU (a dry run)

1. real-size training steps for both backends through the project's trainer with the real training profile
   (params.yaml melody-1.5b / audioldm-s: bf16, gradient checkpointing, batch, accumulation, crop);
2. exact resume on the device: a run with decoder dropout 0.1, stopped and resumed, must repeat the losses;
3. data-parallel training on every visible GPU (torchrun + NCCL; --tiny: 2 gloo processes on the CPU);
4. the generation real-time factor (seconds of compute per second of audio) for 10 s and 30 s (--tiny: 1 s, 2 s).
Prints one line per figure; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before CUDA starts
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.gpu_smoke import MUSICGEN_1_5B, audioldm_s_unet, peak_gb, sync  # noqa: E402
from v2m.config import load_params  # noqa: E402
from v2m.config_audioldm import AudioLDMArch, AudioLDMConfig, AudioLDMPreset  # noqa: E402
from v2m.config_musicgen import MusicGenArch, MusicGenConfig, MusicGenPreset  # noqa: E402


def musicgen_backend(tiny: bool, device: str, dropout: float = 0.0, crop_s: float = 30.0):
    from models.musicgen import MusicGenBackend
    arch = (MusicGenArch() if tiny else MUSICGEN_1_5B).model_copy(update={"dropout": dropout})
    cfg = MusicGenConfig(preset="x", presets={"x": MusicGenPreset(arch=arch)}, crop_s=crop_s)
    return MusicGenBackend.from_preset(cfg, "x", seed=0, device=device)


def audioldm_backend(tiny: bool, device: str, crop_s: float = 10.24):
    from models.audioldm import AudioLDMBackend
    from models.audioldm_tiny import build_tiny
    arch = AudioLDMArch(clap_dim=32 if tiny else 512)
    parts = build_tiny(arch, seed=0)  # VAE, vocoder and CLAP stay tiny: the UNet is what trains and samples
    if not tiny:
        parts["unet"] = audioldm_s_unet(arch.clap_dim)
    cfg = AudioLDMConfig(preset="x", presets={"x": AudioLDMPreset(arch=arch)}, crop_s=crop_s)
    return AudioLDMBackend(parts, cfg, "x").to(device)


def items(backend, seconds: float, n: int) -> list[dict]:
    """Cached-looking training items (what the cache stage writes) of `seconds` each."""
    rng = np.random.default_rng(0)
    if backend.name == "musicgen":
        frames = int(seconds * 50)
        return [{"codes": rng.integers(0, 2048, (backend.num_codebooks, frames)).astype(np.int16),
                 "chroma": np.eye(12, dtype=np.float16)[rng.integers(0, 12, int(seconds * 32000 / 4096) + 1)],
                 "prompt": "disco music for input vocals"} for _ in range(n)]
    frames = -(-int(seconds * 100) // backend.frame_multiple) * backend.frame_multiple // backend.vae_factor
    return [{"latents": rng.standard_normal((backend.unet.config.in_channels, frames, 16)).astype(np.float16),
             "vocal_embedding": rng.standard_normal(backend.embed_dim).astype(np.float32),
             "prompt": "disco music for input vocals"} for _ in range(n)]


def profile(backend_name: str, tiny: bool, steps: int):
    p = load_params(ROOT / "params.yaml")
    preset = "tiny" if tiny else {"musicgen": "melody-1.5b", "audioldm": "audioldm-s"}[backend_name]
    cfg = p.train_config(backend_name, preset)
    return cfg.model_copy(update={"max_steps": steps, "warmup_steps": 1, "checkpoint_every": 10**6,
                                  "val_every": 10**6, "samples": 0})


def training_steps(args, device: str) -> None:
    from tasks.training.trainer import train
    for name, build in (("musicgen", musicgen_backend), ("audioldm", audioldm_backend)):
        cfg = profile(name, args.tiny, args.steps)
        backend = build(args.tiny, device, crop_s=cfg.crop_s)
        data = items(backend, cfg.crop_s, cfg.batch_size * cfg.grad_accum * args.steps)
        times = []
        with tempfile.TemporaryDirectory() as d:
            res = train(backend, data, data[:cfg.batch_size], cfg, "voice_text", Path(d), seed=0,
                        log=lambda m, step: times.append(m["train/step_time_s"]))
        assert all(np.isfinite(res.losses)), res.losses
        step = float(np.median(times[1:] or times))
        print(f"[train] {name}: profile lr {cfg.lr:g}, {cfg.precision}, checkpointing {cfg.gradient_checkpointing}, "
              f"batch {cfg.batch_size} x accum {cfg.grad_accum} x {cfg.crop_s:g} s: {step:.2f} s per optimizer step "
              f"({step / cfg.grad_accum:.2f} s per micro-batch), peak {peak_gb(torch.device(device)):.1f} GiB")
        del backend, res
        free(device)


def exact_resume(args, device: str) -> bool:
    """Train 6 steps; separately train 3, 'lose' step 3 (checkpoint at 2), resume: the losses must match."""
    from tasks.training.trainer import train
    cfg = profile("musicgen", True, 6).model_copy(update={"checkpoint_every": 2, "precision": "auto"})
    data = items(musicgen_backend(True, device, 0.1, 1.0), 2.0, 8)
    with tempfile.TemporaryDirectory() as d:
        full = train(musicgen_backend(True, device, 0.1, 1.0), data, data[:2], cfg, "voice_text", Path(d) / "a", seed=1)
        train(musicgen_backend(True, device, 0.1, 1.0), data, data[:2], cfg, "voice_text", Path(d) / "b", seed=1,
              stop_after=3)
        resumed = train(musicgen_backend(True, device, 0.1, 1.0), data, data[:2], cfg, "voice_text", Path(d) / "b",
                        seed=1)
    ok = resumed.resumed_from == 2 and resumed.losses == full.losses
    print(f"[resume] {device}, decoder dropout 0.1: resumed from step {resumed.resumed_from}, losses "
          f"{'identical' if ok else 'DIFFER'} ({max(abs(a - b) for a, b in zip(full.losses, resumed.losses)):.2e})")
    return ok


def ddp_worker(args) -> None:
    """One process of the data-parallel check (started by torchrun)."""
    from tasks.training import distributed
    from tasks.training.trainer import train
    device = distributed.local_device("cuda" if torch.cuda.is_available() else "cpu")
    with distributed.process_group(device):
        cfg = profile("musicgen", args.tiny, args.steps)
        backend = musicgen_backend(args.tiny, device, crop_s=cfg.crop_s)
        data = items(backend, cfg.crop_s, cfg.batch_size * cfg.grad_accum * args.steps * distributed.world_size())
        times = []
        with tempfile.TemporaryDirectory() as d:
            res = train(backend, data, data[:cfg.batch_size], cfg, "voice_text", Path(d), seed=0,
                        log=lambda m, step: times.append(m["train/step_time_s"]))
        if distributed.is_main():
            print(json.dumps({"world": distributed.world_size(), "losses": res.losses,
                              "step_s": float(np.median(times[1:] or times))}))


def data_parallel(args) -> bool:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "--local-ranks-filter=0", str(Path(__file__).resolve()), "--ddp-worker", "--steps", str(args.steps)]
    done = subprocess.run(cmd + (["--tiny"] if args.tiny else []), capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"[ddp] FAILED on {n} processes:\n{done.stderr[-3000:]}")
        return False
    out = json.loads(lines[-1])
    print(f"[ddp] musicgen on {out['world']} processes ({'gloo' if not torch.cuda.is_available() else 'nccl'}): "
          f"{out['step_s']:.2f} s per optimizer step, losses {[round(x, 3) for x in out['losses']]}")
    return all(np.isfinite(out["losses"]))


def real_time_factor(args, device: str) -> None:
    durations = (1.0, 2.0) if args.tiny else (10.0, 30.0)
    rng = np.random.default_rng(0)
    for name, build in (("musicgen", musicgen_backend), ("audioldm", audioldm_backend)):
        backend = build(args.tiny, device)
        if name == "audioldm":
            backend.cfg = backend.cfg.model_copy(update={"inference_steps": 50 if not args.tiny else 5})
        dtype = torch.bfloat16 if device.startswith("cuda") else None
        for seconds in durations:
            vocal = (0.1 * rng.standard_normal(int(seconds * 32000))).astype(np.float32)
            sync(torch.device(device))
            t = time.perf_counter()
            with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
                audio = backend.generate(vocal, 32000, "disco music for input vocals", seconds, seed=0)
            sync(torch.device(device))
            took = time.perf_counter() - t
            assert np.isfinite(audio).all() and len(audio) == round(seconds * backend.sample_rate)
            print(f"[generate] {name} {seconds:g} s: {took:.1f} s, real-time factor {took / seconds:.2f} "
                  f"(< 1 = faster than real time), peak {peak_gb(torch.device(device)):.1f} GiB")
        del backend
        free(device)


def free(device: str) -> None:
    gc.collect()  # drop the previous model before the next peak-memory figure
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on any device (a dry run of the same code)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per training check")
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip", nargs="*", default=[], choices=["train", "resume", "ddp", "generate"])
    args = ap.parse_args()
    if args.ddp_worker:
        return ddp_worker(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        sys.exit("no CUDA device: run with --tiny for a CPU dry run")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} x "
          f"{torch.cuda.device_count() if device == 'cuda' else 1}, torch {torch.__version__}")
    ok = True
    if "train" not in args.skip:
        training_steps(args, device)
    if "resume" not in args.skip:
        ok &= exact_resume(args, device)
    if "ddp" not in args.skip:
        ok &= data_parallel(args)
    if "generate" not in args.skip:
        real_time_factor(args, device)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
