"""GPU smoke test at real size, random init (no downloads): both backends' architectures as in the mission.

    python bench/gpu_smoke.py                 # on a CUDA machine: real sizes, bf16
    python bench/gpu_smoke.py --tiny          # anywhere: the same code path at tiny sizes (a dry run)

MusicGen-Melody 1.5B (decoder 48 x 1536, T5-base text encoder, 32 kHz EnCodec): bf16 training steps at
batch 2 x 30 s (cached codes + chroma, as the trainer sees them), then a 10 s generation with guidance.
AudioLDM-S UNet (128/256/384/640 channels, 2 layers per block, class projection widened to text + vocal):
bf16 training steps at batch 2 x 20 s (the reference chunk length).
Prints step time, tokens/s (MusicGen), peak GPU memory and the generation real-time factor.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v2m.config_audioldm import AudioLDMArch, AudioLDMConfig, AudioLDMPreset  # noqa: E402
from v2m.config_musicgen import MusicGenArch, MusicGenConfig, MusicGenPreset  # noqa: E402

MUSICGEN_1_5B = MusicGenArch(decoder_layers=48, decoder_hidden=1536, decoder_heads=24, decoder_ffn=6144,
                             num_codebooks=4, codebook_size=2048, text_d_model=768, text_layers=12, text_heads=12,
                             text_ff=3072, text_vocab=256, codec_filters=64, codec_dim=128)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def timed_train_steps(backend, batch, conditioning: str, steps: int, device: torch.device, dtype) -> float:
    params = [p for _, p in backend.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):  # the first step allocates and compiles kernels: not timed
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss, _ = backend.train_step(batch, conditioning, gen, train=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def musicgen(args, device: torch.device, dtype) -> None:
    from models.musicgen import MusicGenBackend
    arch = MusicGenArch() if args.tiny else MUSICGEN_1_5B
    chunk_s = 2.0 if args.tiny else 30.0
    cfg = MusicGenConfig(preset="smoke", presets={"smoke": MusicGenPreset(arch=arch)}, crop_s=chunk_s)
    t = time.perf_counter()
    backend = MusicGenBackend.from_preset(cfg, "smoke", seed=0, device=str(device))
    n_params = sum(p.numel() for p in backend.module.parameters())
    print(f"[musicgen] built {n_params / 1e9:.2f} B parameters in {time.perf_counter() - t:.0f} s")
    backend.setup_finetune("full")
    if args.grad_checkpointing:
        backend.enable_gradient_checkpointing()
    frames, sr = int(chunk_s * 50), 32000
    rng = np.random.default_rng(0)
    vocal = rng.standard_normal(int(chunk_s * sr)).astype(np.float32) * 0.1
    chroma = np.eye(12, dtype=np.float16)[rng.integers(0, 12, int(np.ceil(chunk_s * sr / 4096)) + 1)]
    batch = [{"codes": rng.integers(0, arch.codebook_size, (arch.num_codebooks, frames)).astype(np.int16),
              "chroma": chroma, "prompt": "disco music for input vocals"} for _ in range(2)]
    step = timed_train_steps(backend, batch, "voice_text", args.steps, device, dtype)
    tokens = 2 * frames * arch.num_codebooks
    print(f"[musicgen] train step (batch 2 x {chunk_s:g} s, {dtype}): {step:.3f} s, {tokens / step:,.0f} tokens/s, "
          f"peak {peak_gb(device):.1f} GiB")
    gen_s = 1.0 if args.tiny else 10.0
    backend.module.eval()
    sync(device)
    t = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        audio = backend.generate(vocal, sr, "disco music for input vocals", gen_s, seed=0)
    sync(device)
    took = time.perf_counter() - t
    assert np.isfinite(audio).all() and len(audio) == round(gen_s * 32000)
    print(f"[musicgen] generate {gen_s:g} s with guidance: {took:.2f} s, real-time factor {took / gen_s:.2f} "
          f"(<1 = faster than real time), peak {peak_gb(device):.1f} GiB")


def audioldm_s_unet(class_dim: int):
    """AudioLDM-S's UNet as diffusers converts it (cvssp/audioldm-s-full-v2): text-only class projection."""
    from diffusers import UNet2DConditionModel
    ch = (128, 256, 384, 640)
    return UNet2DConditionModel(
        in_channels=8, out_channels=8, block_out_channels=ch, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=ch, attention_head_dim=[c // 32 for c in ch], class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=class_dim, class_embeddings_concat=True)


def audioldm_s_vae():
    """AudioLDM-S's VAE as diffusers converts it: 3 levels (128/256/512), 8 latent channels, one-channel log-mels."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(128, 256, 512),
                         latent_channels=8, layers_per_block=2, norm_num_groups=32, sample_size=512,
                         scaling_factor=0.9227914214134216)


def audioldm_s_vocoder():
    """AudioLDM-S's HiFi-GAN (SpeechT5HifiGan): 64 mel bins at 16 kHz, upsampling 5*4*2*2*2 from 1024 channels."""
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig
    return SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=64, sampling_rate=16000, upsample_initial_channel=1024, upsample_rates=[5, 4, 2, 2, 2],
        upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3, 7, 11],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], normalize_before=False))


def audioldm(args, device: torch.device, dtype) -> None:
    from models.audioldm import AudioLDMBackend
    from models.audioldm_tiny import build_tiny
    chunk_s = 2.0 if args.tiny else 20.0
    arch = AudioLDMArch(clap_dim=32 if args.tiny else 512)
    cfg = AudioLDMConfig(preset="smoke", presets={"smoke": AudioLDMPreset(arch=arch)}, crop_s=chunk_s)
    parts = build_tiny(arch, seed=0)  # VAE, vocoder and CLAP stay tiny: training only runs the UNet
    if not args.tiny:
        parts["unet"] = audioldm_s_unet(arch.clap_dim)
    backend = AudioLDMBackend(parts, cfg, "smoke").to(str(device))
    n = sum(p.numel() for p in backend.unet.parameters())
    print(f"[audioldm] UNet {n / 1e6:.0f} M parameters")
    if args.grad_checkpointing:
        backend.enable_gradient_checkpointing()
    frames = int(chunk_s * 100) // 4  # mel frames at hop 160, VAE downsampling 4
    frames = -(-frames // 8) * 8  # the UNet halves the time axis 3 times
    lat_c = backend.unet.config.in_channels
    rng = np.random.default_rng(0)
    batch = [{"latents": rng.standard_normal((lat_c, frames, 16)).astype(np.float16),
              "vocal_embedding": rng.standard_normal(arch.clap_dim).astype(np.float32),
              "prompt": "disco music for input vocals"} for _ in range(2)]
    step = timed_train_steps(backend, batch, "voice_text", args.steps, device, dtype)
    print(f"[audioldm] train step (batch 2 x {chunk_s:g} s = {frames} latent frames, {dtype}): {step:.3f} s, "
          f"peak {peak_gb(device):.1f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU dry run of the same code)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backend", choices=["musicgen", "audioldm", "both"], default="both")
    ap.add_argument("--grad-checkpointing", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        sys.exit("no CUDA device: run with --tiny for a CPU dry run")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    if args.backend in ("musicgen", "both"):
        musicgen(args, device, dtype)
        gc.collect()  # the MusicGen model may still be held by reference cycles: free it before measuring again
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if args.backend in ("audioldm", "both"):
        audioldm(args, device, dtype)


if __name__ == "__main__":
    main()
