"""Every GPU question in one call, random init at real size (nothing is downloaded):

    bash bench/gpu_acceptance.sh              # on the lent GPU: installs .wheelhouse/ first, then runs this
    python bench/gpu_acceptance.py --tiny     # anywhere: the same code paths at tiny size on the CPU (a dry run)

Real size = MusicGen-Melody 1.5B's architecture (bench/gpu_smoke.MUSICGEN_1_5B: 48 x 1536 decoder, T5-base
encoder, 32 kHz EnCodec) and AudioLDM-S's UNet, VAE and HiFi-GAN (CLAP stays small: it embeds one prompt and one
vocal per generation), both trained with their real training profiles from params.yaml (bf16, activation
checkpointing, batch, accumulation, fused AdamW, deterministic kernels). Per backend, on one model:

1. conditioning: another melody and another prompt must change what generate() computes at the same seed
   (models/conditioning.py; transformers 5.17 fails it for MusicGen);
2. generation real-time factor through the production path (models/longform.py) for 10 s and 30 s
   (--tiny: 1 s, 2 s): seconds of compute per second of audio;
3. training: optimizer-step time, tokens/s, model FLOPs utilisation (FLOPs counted on one micro-batch without
   activation checkpointing, over the GPU's dense bf16 peak), peak memory;
4. exact resume at real size: the run above checkpoints at step 2 and 3; step 3's checkpoint is deleted and the
   run resumed, which must repeat step 3's loss bit for bit (decoder dropout 0.1 included);
then 5. data-parallel training on every visible GPU (torchrun + NCCL; --tiny: 2 gloo processes), or
"skipped (1 GPU)".

Each part is timed and kept within --budget-s (a part that would not fit is skipped and says so); a part that
fails is recorded, not fatal. The LAST line printed is one JSON object with every figure (also written to --out);
the exit status is 1 when a check failed (conditioning, resume, a part's error).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401  first: sets CUBLAS_WORKSPACE_CONFIG before CUDA starts
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.gpu_smoke import MUSICGEN_1_5B, audioldm_s_unet, audioldm_s_vae, audioldm_s_vocoder, sync  # noqa: E402
from v2m.config import load_params  # noqa: E402
from v2m.config_audioldm import AudioLDMArch, AudioLDMConfig, AudioLDMPreset  # noqa: E402
from v2m.config_musicgen import MusicGenArch, MusicGenConfig, MusicGenPreset  # noqa: E402

PROMPT = "disco music for input vocals"
# Dense bf16 tensor-core peaks (vendor datasheets, FLOP/s), the usual denominator of MFU.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "A40": 149.7e12, "L40S": 362.05e12,
             "L4": 121e12, "A10": 125e12}
REQUIRED = ("conditioning_changes_codes", "musicgen_step_s", "musicgen_tokens_per_s", "musicgen_mfu", "peak_gib",
            "audioldm_step_s", "audioldm_tokens_per_s", "audioldm_mfu", "resume_exact", "rtf_10s", "rtf_30s", "ddp")
RESUME_DISK_GIB = {"musicgen": 40, "audioldm": 6}  # free space two real-size checkpoints need (+ margin)


# --- building the models -------------------------------------------------------------------------------

def musicgen_backend(tiny: bool, device: str, dropout: float = 0.1, crop_s: float = 30.0):
    from models.musicgen import MusicGenBackend
    arch = (MusicGenArch() if tiny else MUSICGEN_1_5B).model_copy(update={"dropout": dropout})  # the real one's 0.1
    cfg = MusicGenConfig(preset="x", presets={"x": MusicGenPreset(arch=arch)}, crop_s=crop_s)
    return MusicGenBackend.from_preset(cfg, "x", seed=0, device=device)


def audioldm_backend(tiny: bool, device: str, crop_s: float = 10.24, steps: int = 50):
    from models.audioldm import AudioLDMBackend
    from models.audioldm_tiny import build_tiny
    arch = AudioLDMArch(clap_dim=32 if tiny else 512)
    parts = build_tiny(arch, seed=0)  # CLAP (and the tokenizer) stay small at real size; see the docstring
    if not tiny:
        parts.update(unet=audioldm_s_unet(arch.clap_dim), vae=audioldm_s_vae(), vocoder=audioldm_s_vocoder())
    cfg = AudioLDMConfig(preset="x", presets={"x": AudioLDMPreset(arch=arch)}, crop_s=crop_s, inference_steps=steps)
    return AudioLDMBackend(parts, cfg, "x").to(device)


def items(backend, seconds: float, n: int) -> list[dict]:
    """Cached-looking training items (what the cache stage writes) of `seconds` each."""
    rng = np.random.default_rng(0)
    if backend.name == "musicgen":
        frames = int(seconds * 50)
        return [{"codes": rng.integers(0, 2048, (backend.num_codebooks, frames)).astype(np.int16),
                 "chroma": np.eye(12, dtype=np.float16)[rng.integers(0, 12, int(seconds * 32000 / 4096) + 1)],
                 "prompt": PROMPT} for _ in range(n)]
    frames = -(-int(seconds * 100) // backend.frame_multiple) * backend.frame_multiple // backend.vae_factor
    return [{"latents": rng.standard_normal((backend.unet.config.in_channels, frames, 16)).astype(np.float16),
             "vocal_embedding": rng.standard_normal(backend.embed_dim).astype(np.float32),
             "prompt": PROMPT} for _ in range(n)]


def profile(backend_name: str, tiny: bool, steps: int):
    """The preset's real training profile, shortened: `steps` optimizer steps, checkpoints at 2 and at the end."""
    p = load_params(ROOT / "params.yaml")
    preset = "tiny" if tiny else {"musicgen": "melody-1.5b", "audioldm": "audioldm-s"}[backend_name]
    cfg = p.train_config(backend_name, preset)
    return cfg.model_copy(update={"max_steps": steps, "warmup_steps": 1, "checkpoint_every": 2, "keep_checkpoints": 2,
                                  "val_every": 10**6, "val_batches": 1, "samples": 0, "checkpoint_uri": ""})


# --- the figures -----------------------------------------------------------------------------------------

class Report:
    """The JSON figures, each part's wall time and errors, and the time budget."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.monotonic(), budget_s
        self.data: dict = {"ok": True, "errors": {}, "skipped": {}, "part_s": {}}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    @contextlib.contextmanager
    def part(self, name: str, estimate_s: float):
        """Run a part if its estimate fits in what is left of the budget; record its time or its error."""
        if self.left() < estimate_s:
            self.data["skipped"][name] = f"time budget ({self.left():.0f} s left, ~{estimate_s:.0f} s needed)"
            print(f"[{name}] skipped: {self.data['skipped'][name]}", flush=True)
            yield False
            return
        t = time.monotonic()
        try:
            yield True
        except Exception as exc:  # recorded, and the next part runs: one failure must not hide the other figures
            self.data["errors"][name] = f"{type(exc).__name__}: {str(exc)[:600]}"
            self.data["ok"] = False
            print(f"[{name}] FAILED: {self.data['errors'][name]}", flush=True)
        finally:
            self.data["part_s"][name] = round(time.monotonic() - t, 1)

    def __setitem__(self, key, value) -> None:
        self.data[key] = value

    def dump(self, out: Path | None) -> None:
        line = json.dumps(self.data, default=float)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(line + "\n")
        print(line, flush=True)


def dtype_for(device: str):
    return torch.bfloat16 if device.startswith("cuda") else None


def autocast(device: str):
    dtype = dtype_for(device)
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def free(device: str) -> None:
    gc.collect()  # drop the previous model before the next peak-memory figure
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_flops(device: str) -> tuple[float, str]:
    """(FLOP/s, where it came from): the datasheet's dense bf16 peak for a known GPU, else a measured matmul."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, flops in PEAK_BF16.items():
            if key in name.split():
                return flops, f"{name} datasheet dense bf16"
    n, dtype = (8192, torch.bfloat16) if device.startswith("cuda") else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(torch.device(device))
    t, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ b
    sync(torch.device(device))
    return 2 * n**3 * reps / (time.perf_counter() - t), f"measured {n}^3 {str(dtype).removeprefix('torch.')} matmul"


def micro_batch_flops(backend, batch: list[dict], device: str) -> float:
    """Model FLOPs of one micro-batch's forward + backward (before activation checkpointing is turned on, so the
    recomputation is not counted: that is MFU, not hardware utilisation)."""
    from torch.utils.flop_counter import FlopCounterMode
    backend.set_training(True)
    with FlopCounterMode(display=False) as counter:
        with autocast(device):
            loss, _ = backend.train_step(batch, "voice_text", torch.Generator().manual_seed(0), train=True)
        loss.backward()
    backend.module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def check_conditioning(R: Report, backend, device: str) -> None:
    from models.conditioning import conditioning_check
    with autocast(device):
        result = conditioning_check(backend)
    R.data.setdefault("conditioning", {})[backend.name] = result
    if backend.name == "musicgen":
        R["conditioning_changes_codes"] = result == {"melody": True, "prompt": True}
    if any(v is False for v in result.values()):
        R["ok"] = False
    print(f"[conditioning] {backend.name}: {result}", flush=True)


def real_time_factor(R: Report, backend, device: str, durations: tuple[float, float]) -> None:
    """Seconds of compute per second of audio, through the production path (windows, crossfades, decoding)."""
    from models.longform import Request, generate_long
    gen_cfg = load_params(ROOT / "params.yaml").generate
    rng = np.random.default_rng(0)
    for seconds, key in zip(durations, ("rtf_10s", "rtf_30s")):
        vocal = (0.1 * rng.standard_normal(int(seconds * 32000))).astype(np.float32)
        sync(torch.device(device))
        t = time.perf_counter()
        with autocast(device):
            audio = generate_long(backend, Request(vocal, 32000, PROMPT, seconds), gen_cfg)
        sync(torch.device(device))
        took = time.perf_counter() - t
        if not (np.isfinite(audio).all() and len(audio) == round(seconds * backend.sample_rate)):
            raise AssertionError(f"{backend.name} {seconds:g} s: {len(audio)} samples, "
                                 f"finite {np.isfinite(audio).all()}")
        R.data.setdefault(key, {})[backend.name] = round(took / seconds, 4)
        print(f"[generate] {backend.name} {seconds:g} s: {took:.1f} s, real-time factor {took / seconds:.3f} "
              f"(< 1: faster than real time)", flush=True)


def train_and_resume(R: Report, backend, device: str, args, work: Path, resume: bool = True) -> None:
    """Train the real profile for args.steps steps (checkpoints at 2 and at the end), then delete the last
    checkpoint and resume: the resumed run must repeat the last step's loss exactly. resume=False (no room for
    the checkpoints): the timing alone, stopped before the last step so that no checkpoint is written."""
    from tasks.training.checkpoints import list_checkpoints
    from tasks.training.trainer import train
    name = backend.name
    cfg = profile(name, args.tiny, args.steps if resume else args.steps + 1)
    if not resume:
        cfg = cfg.model_copy(update={"checkpoint_every": 10**6})
    data = items(backend, cfg.crop_s, cfg.batch_size * cfg.grad_accum * args.steps)
    # counted on one item (without activation checkpointing every activation is kept: one item's worth)
    flops = micro_batch_flops(backend, data[:1], device) * cfg.batch_size * cfg.grad_accum
    free(device)
    logged: list[dict] = []
    run = work / name
    first = train(backend, data, data[:cfg.batch_size], cfg, "voice_text", run, seed=0,
                  log=lambda m, step: logged.append(m), stop_after=None if resume else args.steps)
    timed = logged[1:] or logged  # step 1 allocates and warms up kernels
    step_s = float(np.median([m["train/step_time_s"] for m in timed]))
    if name == "musicgen":
        tokens_per_s = float(np.median([m["train/tokens_per_s"] for m in timed]))
    else:  # the UNet's input positions: latent frames x latent mel bins, per item
        latents = np.asarray(data[0]["latents"])
        tokens_per_s = cfg.batch_size * cfg.grad_accum * latents.shape[1] * latents.shape[2] / step_s
    peak, source = peak_flops(device)
    R[f"{name}_step_s"] = round(step_s, 4)
    R[f"{name}_tokens_per_s"] = round(tokens_per_s, 1)
    R[f"{name}_mfu"] = round(flops / step_s / peak, 4)
    R[f"{name}_peak_gib"] = peak_gib(device)
    R.data.setdefault("mfu_peak", {})[name] = f"{peak / 1e12:.4g} TFLOP/s ({source})"
    R.data.setdefault("profile", {})[name] = (f"batch {cfg.batch_size} x accum {cfg.grad_accum} x {cfg.crop_s:g} s, "
                                              f"{cfg.precision}, checkpointing {cfg.gradient_checkpointing}, "
                                              f"betas {list(cfg.betas)}, lr {cfg.lr:g}")
    print(f"[train] {name}: {R.data['profile'][name]}: {step_s:.3f} s per optimizer step, {tokens_per_s:,.0f} "
          f"tokens/s, MFU {R.data[f'{name}_mfu']:.3f}, peak {R.data[f'{name}_peak_gib']} GiB", flush=True)

    if not resume:
        shutil.rmtree(run, ignore_errors=True)
        return
    shutil.rmtree(list_checkpoints(run / "checkpoints")[-1])  # "lose" the last step
    resumed = train(backend, data, data[:cfg.batch_size], cfg, "voice_text", run, seed=0)
    exact = resumed.resumed_from == args.steps - 1 and resumed.losses == first.losses
    R.data.setdefault("resume", {})[name] = {"exact": exact, "resumed_from": resumed.resumed_from,
                                             "losses": first.losses, "resumed_losses": resumed.losses}
    print(f"[resume] {name}: resumed from step {resumed.resumed_from}, losses "
          f"{'identical' if exact else 'DIFFER'}", flush=True)
    shutil.rmtree(run, ignore_errors=True)


def backend_parts(R: Report, name: str, args, device: str, work: Path) -> None:
    tiny = args.tiny
    est = {"build": 90, "conditioning": 20, "generate": 150 if name == "musicgen" else 40,
           "train": 240 if name == "musicgen" else 60} if not tiny else {k: 0 for k in ("build", "conditioning",
                                                                                          "generate", "train")}
    backend = None
    with R.part(f"{name} build", est["build"]) as go:
        if go:
            backend = musicgen_backend(tiny, device) if name == "musicgen" else \
                audioldm_backend(tiny, device, steps=5 if tiny else args.audioldm_steps)
            n = sum(p.numel() for p in backend.module.parameters())
            print(f"[build] {name}: {n / 1e9:.3f} B parameters on {device}", flush=True)
    if backend is None:
        return
    with R.part(f"{name} conditioning", est["conditioning"]) as go:
        if go:
            check_conditioning(R, backend, device)
    with R.part(f"{name} generate", est["generate"]) as go:
        if go:
            real_time_factor(R, backend, device, (1.0, 2.0) if tiny else (10.0, 30.0))
    free(device)
    with R.part(f"{name} train + resume", est["train"]) as go:
        if go:
            disk = shutil.disk_usage(work).free / 2**30
            room = tiny or disk >= RESUME_DISK_GIB[name]
            if not room:
                R.data.setdefault("resume", {})[name] = {
                    "exact": False, "skipped": f"{disk:.0f} GiB free at {work}; two checkpoints need "
                                               f"~{RESUME_DISK_GIB[name]} GiB (--work-dir)"}
                print(f"[resume] {name} skipped: {R.data['resume'][name]['skipped']}", flush=True)
            train_and_resume(R, backend, device, args, work, resume=room)
    R["peak_gib"] = max([v for v in (R.data.get("musicgen_peak_gib"), R.data.get("audioldm_peak_gib")) if v] or
                        [None]) if device.startswith("cuda") else None
    del backend
    free(device)


# --- data-parallel --------------------------------------------------------------------------------------

def ddp_worker(args) -> None:
    """One process of the data-parallel check (started by torchrun): MusicGen, the real profile, no checkpoint."""
    from tasks.training import distributed
    from tasks.training.trainer import train
    device = distributed.local_device("cuda" if torch.cuda.is_available() else "cpu")
    with distributed.process_group(device):
        cfg = profile("musicgen", args.tiny, args.steps + 1).model_copy(update={"checkpoint_every": 10**6})
        backend = musicgen_backend(args.tiny, device, crop_s=cfg.crop_s)
        data = items(backend, cfg.crop_s, cfg.batch_size * cfg.grad_accum * (args.steps + 1) * distributed.world_size())
        logged: list[dict] = []
        with tempfile.TemporaryDirectory() as d:  # stop before the last step: no final checkpoint to write
            res = train(backend, data, data[:cfg.batch_size], cfg, "voice_text", Path(d), seed=0,
                        log=lambda m, step: logged.append(m), stop_after=args.steps)
        if distributed.is_main():
            timed = logged[1:] or logged
            print(json.dumps({"world": distributed.world_size(), "parallel": res.parallel, "losses": res.losses,
                              "step_s": float(np.median([m["train/step_time_s"] for m in timed])),
                              "tokens_per_s": float(np.median([m["train/tokens_per_s"] for m in timed]))}))


def data_parallel(R: Report, args, device: str) -> None:
    n = torch.cuda.device_count() if device.startswith("cuda") else 2
    if device.startswith("cuda") and n < 2:
        R["ddp"] = "skipped (1 GPU)"
        print("[ddp] skipped (1 GPU)", flush=True)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "--local-ranks-filter=0", str(Path(__file__).resolve()), "--ddp-worker", "--steps", str(args.steps)]
    left = R.left()
    done = subprocess.run(cmd + (["--tiny"] if args.tiny else []), capture_output=True, text=True, cwd=ROOT,
                          timeout=max(60.0, left) if left != float("inf") else None)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{n} processes failed (exit {done.returncode}): {done.stderr[-1500:]}")
    out = json.loads(lines[-1])
    if not np.isfinite(out["losses"]).all():
        raise AssertionError(f"non-finite losses {out['losses']}")
    out["backend"] = "nccl" if device.startswith("cuda") else "gloo"
    single = R.data.get("musicgen_step_s")
    if single and device.startswith("cuda"):  # same per-GPU batch: ideal data-parallel keeps the step time
        out["efficiency"] = round(single / out["step_s"], 3)
    R["ddp"] = out
    print(f"[ddp] musicgen on {n} processes ({out['backend']}): {out['step_s']:.3f} s per optimizer step", flush=True)


# --- main -----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on any device (a dry run of the same code)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per training run (>= 3: resume at 2)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 400 s; --tiny: none)")
    ap.add_argument("--audioldm-steps", type=int, default=50, help="DDIM steps for the AudioLDM real-time factor")
    ap.add_argument("--work-dir", type=Path, default=None, help="where checkpoints go (default: the emptiest of "
                    "/dev/shm and the temp folder)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON line here")
    ap.add_argument("--skip", nargs="*", default=[], choices=["musicgen", "audioldm", "ddp"])
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ddp_worker:
        return ddp_worker(args)
    if args.steps < 3:
        sys.exit("--steps must be >= 3 (the resume check deletes step N's checkpoint and resumes from step 2)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        sys.exit("no CUDA device: run with --tiny for a CPU dry run")
    torch.backends.cuda.matmul.allow_tf32 = True
    if device == "cpu":
        torch.set_num_threads(1)  # a CPU dry run on a shared machine: 2 threads on 2 busy cores ran 3-30x slower
    import transformers
    R = Report(args.budget_s if args.budget_s is not None else (float("inf") if args.tiny else 400.0))
    R.data.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  gpus=torch.cuda.device_count() if device == "cuda" else 0, torch=torch.__version__,
                  transformers=transformers.__version__, size="tiny" if args.tiny else "real")
    print(f"device {R.data['device']} x {max(1, R.data['gpus'])}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}", flush=True)

    def interrupted(signum, frame):  # a timeout still leaves the figures so far as the last line
        R.data["errors"]["interrupted"] = f"signal {signum} after {time.monotonic() - R.t0:.0f} s"
        R["ok"] = False
        R.dump(args.out)
        os._exit(1)
    signal.signal(signal.SIGTERM, interrupted)

    candidates = [Path(p) for p in ("/dev/shm", tempfile.gettempdir()) if Path(p).is_dir()]
    base = args.work_dir or max(candidates, key=lambda p: shutil.disk_usage(p).free)
    with tempfile.TemporaryDirectory(prefix="v2m-acceptance-", dir=base) as work:
        for name in ("musicgen", "audioldm"):
            if name not in args.skip:
                backend_parts(R, name, args, device, Path(work))
    R["resume_exact"] = bool(R.data.get("resume")) and all(r["exact"] for r in R.data["resume"].values())
    if "ddp" not in args.skip:
        with R.part("ddp", 0 if args.tiny else 150) as go:
            if go:
                data_parallel(R, args, device)
    R.data.setdefault("ddp", "skipped")
    for key in REQUIRED:  # every figure is in the line, null where its part did not run
        R.data.setdefault(key, None)
    R["total_s"] = round(time.monotonic() - R.t0, 1)
    R["ok"] = bool(R.data["ok"] and R.data.get("conditioning_changes_codes") and R.data["resume_exact"]
                   and not R.data["skipped"])
    R.dump(args.out)
    sys.exit(0 if R.data["ok"] else 1)


if __name__ == "__main__":
    main()
