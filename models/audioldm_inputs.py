"""What the cache stage needs of AudioLDM: the VAE (latents of the instrumental) and CLAP's audio tower (the
vocal's embedding). For real weights only vae/ and clap/ are loaded (not the UNet or the vocoder), on the
configured device; chunks are encoded in batches (same-length chunks share one VAE forward, every chunk's CLAP
windows share one CLAP forward)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models import audioldm_mel as mel
from v2m.audio import read_mono, resample

CLAP_SR = 48000


class AudioLDMInputs:
    def __init__(self, vae, clap, feature_extractor, frame_multiple: int):
        self.vae, self.clap, self.feature_extractor = vae, clap, feature_extractor
        self.frame_multiple = frame_multiple

    @classmethod
    def from_folder(cls, folder: Path, device: str = "cpu") -> "AudioLDMInputs":
        from diffusers import AutoencoderKL
        from transformers import ClapFeatureExtractor, ClapModel
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=any((folder / "vae").glob("*.safetensors")))
        unet = json.loads((folder / "unet" / "config.json").read_text())  # its downsampling fixes the lengths
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return cls(vae.to(device).eval(), ClapModel.from_pretrained(folder / "clap").to(device).eval(),
                   ClapFeatureExtractor.from_pretrained(folder / "clap"),
                   vae_factor * 2 ** (len(unet["block_out_channels"]) - 1))

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def latents(self, clips_16k: list[np.ndarray], scaled: bool = True) -> list[torch.Tensor]:
        """Instrumentals -> VAE latents [C, frames/4, 16] each (the posterior mean; scaled for the diffusion)."""
        # T samples give T // 160 + 1 centred frames; AudioLDM keeps duration x 100 of them (its _pad_spec).
        specs = [mel.pad_frames(mel.log_mel(mel.normalize_wav(a))[: max(1, len(a) // mel.HOP)], self.frame_multiple)
                 for a in clips_16k]
        out: list[torch.Tensor | None] = [None] * len(specs)
        for frames in sorted({s.shape[0] for s in specs}):
            idx = [i for i, s in enumerate(specs) if s.shape[0] == frames]
            with torch.autocast(self.device.type, enabled=False):
                z = self.vae.encode(torch.stack([specs[i] for i in idx])[:, None].to(self.device)).latent_dist.mode()
            for i, zi in zip(idx, z * self.vae.config.scaling_factor if scaled else z):
                out[i] = zi
        return out

    @torch.no_grad()
    def vocal_embeddings(self, vocals_48k: list[np.ndarray]) -> list[torch.Tensor]:
        """L2-normalised CLAP audio embedding [P] per 48 kHz vocal. CLAP sees 10 s windows, and its feature
        extractor crops longer input at random: we embed consecutive windows, each deterministic (short ones
        repeat-padded), and average them weighted by length."""
        win = self.feature_extractor.nb_max_samples
        pieces = [[v[i:i + win] for i in range(0, max(len(v), 1), win)] for v in vocals_48k]
        feats = [self.feature_extractor(p, sampling_rate=CLAP_SR, return_tensors="pt") for ps in pieces for p in ps]
        with torch.autocast(self.device.type, enabled=False):
            emb = self.clap.get_audio_features(
                input_features=torch.cat([f["input_features"] for f in feats]).to(self.device),
                is_longer=torch.cat([f["is_longer"] for f in feats]).to(self.device)).pooler_output.float()
        out, start = [], 0
        for ps in pieces:
            weights = torch.tensor([len(p) for p in ps], dtype=torch.float32, device=self.device)
            out.append(F.normalize((emb[start:start + len(ps)] * weights[:, None]).sum(0), dim=-1))
            start += len(ps)
        return out

    def prepare_batch(self, chunks: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        insts, vocals = [], []
        for chunk in chunks:
            inst, sr = read_mono(chunk["instrumental_path"])
            vocal, vsr = read_mono(chunk.get("vocals_clap_path") or chunk["vocals_path"])
            insts.append(resample(inst, sr, mel.SAMPLE_RATE))
            vocals.append(resample(vocal, vsr, CLAP_SR))
        return [{"latents": z.cpu().numpy().astype(np.float16), "vocal_embedding": e.cpu().numpy()}
                for z, e in zip(self.latents(insts), self.vocal_embeddings(vocals))]
