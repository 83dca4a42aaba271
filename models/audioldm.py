"""AudioLDM (Liu et al., 2023) conditioned on a vocal: latent diffusion over log-mel spectrograms.

    instrumental (16 kHz) -> log-mel (models/audioldm_mel.py) -> VAE -> latents x0
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps          UNet(x_t, t, c) predicts eps;  loss = |eps - eps_hat|^2
    c = [ CLAP_text(prompt) ; CLAP_audio(vocal @ 48 kHz) ]     -> the UNet's class-embedding projection
    generate: DDIM from noise with classifier-free guidance -> VAE decode -> mel -> HiFi-GAN -> 16 kHz audio

AudioLDM feeds one P-dim CLAP embedding (text at inference) through a linear projection concatenated to the
time embedding ("simple_projection" + class_embeddings_concat). We widen that projection to 2P inputs: the
pretrained text columns are copied and the vocal columns start at zero, so fine-tuning starts exactly at the
pretrained model and learns how much to listen to the vocal.

Null conditions (classifier-free guidance, condition dropout): "no vocal" is the zero vector (a real CLAP
embedding has unit norm, so zero is never a real vocal, and the zeroed columns make it what the pretrained model
saw). "No text" is, by default, the CLAP embedding of the empty prompt "": AudioLDM's own unconditional
embedding, so the base model's guidance is untouched at step 0 (params `audioldm.null_text: zero` switches to
a zero vector).

Real weights (preset `audioldm-s`, a local folder or s3:// prefix), diffusers layout of cvssp/audioldm-s-full-v2
plus the full CLAP model. Each weights file may also be a `.bin` (read with torch.load(weights_only=True)) and
either may be sharded with an `.index.json`, as save_pretrained writes them:
    unet/        config.json, diffusion_pytorch_model.safetensors   (text-only P or already widened 2P inputs)
    vae/         config.json, diffusion_pytorch_model.safetensors
    vocoder/     config.json, model.safetensors                     (SpeechT5HifiGan)
    scheduler/   scheduler_config.json                              (DDIMScheduler)
    tokenizer/   tokenizer_config.json + vocab.json/merges.txt or tokenizer.json (Roberta BPE, 50265 tokens)
    text_encoder/  config.json, model.safetensors (ClapTextModelWithProjection): AudioLDM's own CLAP text tower.
                 Required: its text tower replaces clap/'s, so the UNet hears exactly the text embedding it was
                 trained with. A different CLAP's text tower (clap/ alone) is refused, never used in its place.
    clap/        config.json, model.safetensors (transformers ClapModel), preprocessor_config.json
                 (ClapFeatureExtractor, 48 kHz, truncation rand_trunc, padding repeatpad): the audio tower.
The original pipeline has only the text tower. AudioLDM's own .ckpt holds its whole CLAP (HTSAT-tiny + Roberta,
laion/clap-htsat-unfused's architecture) under `cond_stage_model.model.*`: convert those keys with
transformers' CLAP conversion key map into a ClapModel and save it to clap/. A folder written by save() has the
same layout (with the widened UNet), so it is also a valid `weights:` location.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
from transformers import (ClapFeatureExtractor, ClapModel, ClapTextModelWithProjection, RobertaTokenizer,
                          SpeechT5HifiGan)

from models import audioldm_mel as mel
from models.base import CONDITIONINGS, Backend, draw_drops
from models.base import WeightsNotFoundError
from models.cancel import Cancelled, StopCheck, never
from models.weights import DEFAULT_CACHE, resolve_weights, weight_files
from v2m.audio import resample
from v2m.config_audioldm import AudioLDMConfig, ConditionDropout

CLAP_SR = 48000
CLAP_MAX_TOKENS = 77  # LAION CLAP's text length
CONFIG_FILE = "audioldm.json"
REQUIRED_FILES = ["unet/config.json", weight_files("unet/diffusion_pytorch_model"), "vae/config.json",
                  weight_files("vae/diffusion_pytorch_model"), "vocoder/config.json", weight_files("vocoder/model"),
                  "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json", "text_encoder/config.json",
                  weight_files("text_encoder/model"), "clap/config.json", weight_files("clap/model"),
                  "clap/preprocessor_config.json"]


def widen_class_projection(unet: UNet2DConditionModel, extra_dim: int) -> UNet2DConditionModel:
    """Class projection [P -> D] becomes [P + extra_dim -> D]: pretrained columns copied, new columns zero,
    so for any extra input the UNet computes exactly what it did before. In place; returns the UNet."""
    old = unet.class_embedding
    if not isinstance(old, nn.Linear):
        raise ValueError("the UNet has no simple_projection class embedding (class_embed_type) to widen")
    new = nn.Linear(old.in_features + extra_dim, old.out_features, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_features] = old.weight
        new.bias.copy_(old.bias)
    unet.class_embedding = new
    unet.register_to_config(projection_class_embeddings_input_dim=new.in_features)  # save_pretrained writes 2P
    return unet


def condition_masks(n: int, conditioning: str, dropout: ConditionDropout, generator: torch.Generator,
                    train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_text, keep_vocal) booleans [n]: conditions dropped by the configured recipe when training (draws
    from `generator`, see models.base.draw_drops); "voice" never shows the text, train or not."""
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning {conditioning!r} is not one of {', '.join(CONDITIONINGS)}")
    keep_text, keep_vocal = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    if train:
        drop_text, drop_vocal = draw_drops(n, dropout.text, dropout.vocal, dropout.joint, dropout.recipe, generator)
        keep_text, keep_vocal = ~drop_text, ~drop_vocal
    if conditioning == "voice":
        keep_text = torch.zeros(n, dtype=torch.bool)
    return keep_text, keep_vocal


class AudioLDMBackend(Backend):
    name = "audioldm"
    mode_tag = "variant"
    sample_rate = mel.SAMPLE_RATE

    def __init__(self, parts: dict[str, Any], cfg: AudioLDMConfig, preset: str):
        self.unet: UNet2DConditionModel = parts["unet"]
        self.vae: AutoencoderKL = parts["vae"]
        self.vocoder: SpeechT5HifiGan = parts["vocoder"]
        self.clap: ClapModel = parts["clap"]
        self.tokenizer: RobertaTokenizer = parts["tokenizer"]
        self.feature_extractor: ClapFeatureExtractor = parts["feature_extractor"]
        self.scheduler: DDIMScheduler = parts["scheduler"]
        self.cfg, self.preset = cfg, preset
        self.module = nn.ModuleDict({"unet": self.unet, "vae": self.vae, "vocoder": self.vocoder, "clap": self.clap})
        self._text_memo: dict[str, torch.Tensor] = {}
        self._check_components()
        p = self.embed_dim
        if self.unet.class_embedding.in_features == p:  # a text-only (pretrained) UNet: add the vocal columns
            widen_class_projection(self.unet, p)
        self.setup_finetune("full")

    def _check_components(self) -> None:
        """The parts must fit together: mel front end <-> vocoder, CLAP <-> tokenizer, CLAP <-> UNet."""
        voc, proj = self.vocoder.config, getattr(self.unet, "class_embedding", None)
        p, vocab = self.embed_dim, self.clap.config.text_config.vocab_size
        problems = []
        if (voc.sampling_rate, voc.model_in_dim, math.prod(voc.upsample_rates)) != (mel.SAMPLE_RATE, mel.N_MELS, mel.HOP):
            problems.append(f"vocoder takes {voc.model_in_dim} bins at {voc.sampling_rate} Hz and upsamples "
                            f"{math.prod(voc.upsample_rates)}x; the mel front end gives {mel.N_MELS} bins, hop {mel.HOP}")
        if self.feature_extractor.sampling_rate != CLAP_SR:
            problems.append(f"CLAP feature extractor runs at {self.feature_extractor.sampling_rate} Hz, not {CLAP_SR}")
        if len(self.tokenizer) != vocab:  # offline tokenizer loads can fail silently, with a 5-token vocabulary
            problems.append(f"tokenizer has {len(self.tokenizer)} tokens, CLAP's text tower {vocab}")
        if not isinstance(proj, nn.Linear):
            problems.append("the UNet has no simple_projection class embedding")
        elif proj.in_features not in (p, 2 * p):
            problems.append(f"UNet class projection takes {proj.in_features} inputs; CLAP gives {p} (+{p} vocal)")
        if problems:
            raise ValueError("audioldm components do not fit: " + "; ".join(problems))

    # --- build & persist ------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, cfg: Any, preset: str, seed: int = 0, init_audio: list[np.ndarray] | None = None,
                    device: str = "cpu", cache_root: str | Path | None = None) -> "AudioLDMBackend":
        cfg = getattr(cfg, "audioldm", cfg)  # the whole Params or its audioldm section
        if preset not in cfg.presets:
            raise KeyError(f"audioldm preset {preset!r} is not one of {', '.join(cfg.presets)}")
        spec = cfg.presets[preset]
        if spec.weights:
            folder = resolve_weights(spec.weights, REQUIRED_FILES, f"audioldm preset {preset!r}",
                                     Path(cache_root) if cache_root else DEFAULT_CACHE)
            return cls(read_folder(folder), cfg, preset).to(device)
        from models.audioldm_tiny import build_tiny
        backend = cls(build_tiny(spec.arch, seed), cfg, preset).to(device)
        if init_audio:
            backend.scale_latents_by_std(init_audio)
        return backend

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        for sub, part in [("unet", self.unet), ("vae", self.vae), ("vocoder", self.vocoder), ("clap", self.clap),
                          ("clap", self.feature_extractor), ("text_encoder", text_encoder_of(self.clap)),
                          ("tokenizer", self.tokenizer), ("scheduler", self.scheduler)]:
            part.save_pretrained(d / sub)
        (d / CONFIG_FILE).write_text(json.dumps({"preset": self.preset, "config": self.cfg.model_dump()}, indent=1))

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "AudioLDMBackend":
        d = Path(directory)
        meta = json.loads((d / CONFIG_FILE).read_text())
        return cls(read_folder(d), AudioLDMConfig.model_validate(meta["config"]), meta["preset"]).to(device)

    def scale_latents_by_std(self, clips: list[np.ndarray]) -> None:
        """AudioLDM's scale_by_std for a random-init VAE: scale latents to unit variance on real audio."""
        z = torch.cat([self.encode_audio(c, scaled=False).flatten() for c in clips])
        self.vae.register_to_config(scaling_factor=float(1.0 / z.std().clamp(min=1e-6)))

    # --- conditions -----------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.clap.config.projection_dim

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """L2-normalised CLAP text embedding [P], memoised per prompt (the text tower is frozen)."""
        if prompt not in self._text_memo:
            ids = self.tokenizer(prompt, truncation=True, max_length=CLAP_MAX_TOKENS, return_tensors="pt")
            with torch.autocast(self.device.type, enabled=False):
                out = self.clap.get_text_features(**{k: v.to(self.device) for k, v in ids.items()})
            self._text_memo[prompt] = out.pooler_output[0].float().cpu()
        return self._text_memo[prompt].to(self.device)

    def null_text(self) -> torch.Tensor:
        return self.text_embedding("") if self.cfg.null_text == "empty_prompt" else self.null_vocal()

    def null_vocal(self) -> torch.Tensor:
        return torch.zeros(self.embed_dim, device=self.device)

    def vocal_embedding(self, vocal_48k: np.ndarray) -> torch.Tensor:
        """L2-normalised CLAP audio embedding [P] of a 48 kHz vocal (see AudioLDMInputs.vocal_embeddings)."""
        return self.inputs().vocal_embeddings([vocal_48k])[0]

    def class_labels(self, prompts: list[str | None], vocal_embs: torch.Tensor, keep_text: torch.Tensor,
                     keep_vocal: torch.Tensor) -> torch.Tensor:
        """[B, 2P] = [text ; vocal], each replaced by its null where not kept (or where the prompt is None)."""
        text = torch.stack([self.text_embedding(p) if (k and p is not None) else self.null_text()
                            for p, k in zip(prompts, keep_text.tolist())])
        vocal = torch.where(keep_vocal.to(self.device)[:, None], vocal_embs.to(self.device).float(), 0.0)
        return torch.cat([text, vocal], dim=-1)

    # --- prepare --------------------------------------------------------------------------------------
    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def frame_multiple(self) -> int:
        """Mel frames per latent frame times the UNet's downsampling: lengths must divide by it."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def inputs(self) -> "AudioLDMInputs":
        """This model's encoder side (VAE + CLAP audio tower): what prepare() runs."""
        from models.audioldm_inputs import AudioLDMInputs
        return AudioLDMInputs(self.vae, self.clap, self.feature_extractor, self.frame_multiple)

    def encode_audio(self, audio_16k: np.ndarray, scaled: bool = True) -> torch.Tensor:
        """Instrumental -> VAE latents [C, frames/4, 16] (the posterior mean; scaled for the diffusion)."""
        return self.inputs().latents([audio_16k], scaled)[0]

    def prepare(self, chunk: dict[str, Any]) -> dict[str, np.ndarray]:
        return self.inputs().prepare_batch([chunk])[0]

    @classmethod
    def input_encoder(cls, cfg: AudioLDMConfig, preset: str, device: str = "cpu",
                      cache_root: Path = DEFAULT_CACHE) -> "AudioLDMInputs":
        """The cache stage's encoders of a real preset: vae/ and clap/ alone (no UNet, no vocoder), on `device`."""
        from models.audioldm_inputs import AudioLDMInputs
        folder = resolve_weights(cfg.presets[preset].weights, REQUIRED_FILES, f"audioldm preset {preset!r}", cache_root)
        return AudioLDMInputs.from_folder(folder, device)

    # --- train ----------------------------------------------------------------------------------------
    def setup_finetune(self, method: str = "full", **options: Any) -> None:
        """Only the UNet trains; the VAE, vocoder and CLAP stay frozen (their outputs are cached or memoised)."""
        super().setup_finetune(method, **options)  # raises for anything but "full"
        for frozen in (self.vae, self.vocoder, self.clap):
            frozen.requires_grad_(False).eval()
        self.unet.requires_grad_(True)

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def trained_module(self) -> nn.Module:
        return self.unet

    def conditions_in_use(self) -> tuple[str, ...]:
        """The text always; the vocal once its class-projection columns are not all zero (a pretrained AudioLDM
        starts with them zero, i.e. deaf to the vocal, until fine-tuning teaches it to listen)."""
        vocal_columns = self.unet.class_embedding.weight[:, self.embed_dim:]
        return ("melody", "prompt") if bool(vocal_columns.abs().max() > 0) else ("prompt",)

    def shard_units(self) -> list[nn.Module]:
        return [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]

    def crop(self, latents: list[np.ndarray], generator: torch.Generator, train: bool) -> torch.Tensor:
        """Same-length windows [B, C, L, F] of crop_s (or the shortest item): random offsets when training,
        the start otherwise. L is a whole number of UNet blocks."""
        step = self.frame_multiple // self.vae_factor
        want = max(step, int(self.cfg.crop_s * mel.SAMPLE_RATE / mel.HOP / self.vae_factor) // step * step)
        length = min([want] + [z.shape[1] // step * step for z in latents])
        out = []
        for z in latents:
            start = int(torch.randint(0, z.shape[1] - length + 1, (1,), generator=generator)) if train else 0
            out.append(torch.from_numpy(np.ascontiguousarray(z[:, start:start + length], dtype=np.float32)))
        return torch.stack(out).to(self.device)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=None, class_labels=class_labels).sample

    def train_step(self, batch: list[dict[str, Any]], conditioning: str, generator: torch.Generator,
                   train: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        n = len(batch)
        x0 = self.crop([b["latents"] for b in batch], generator, train)
        keep_text, keep_vocal = condition_masks(n, conditioning, self.cfg.condition_dropout, generator, train)
        vocals = torch.from_numpy(np.stack([np.asarray(b["vocal_embedding"], dtype=np.float32) for b in batch]))
        cond = self.class_labels([b["prompt"] for b in batch], vocals, keep_text, keep_vocal)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator).to(self.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        target = self.scheduler.get_velocity(x0, noise, t) \
            if self.scheduler.config.prediction_type == "v_prediction" else noise
        self.unet.train(train)
        eps = self.train_call(train)(x_t, t, encoder_hidden_states=None, class_labels=cond).sample
        loss = F.mse_loss(eps.float(), target.float())
        return loss, {"loss": float(loss.detach()), "text_kept": float(keep_text.float().mean()),
                      "vocal_kept": float(keep_vocal.float().mean())}

    # --- generate -------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, T, F] -> log-mel [B, 4T, 64] -> waveform [B, 4T * 160]."""
        spec = self.vae.decode(latents / self.vae.config.scaling_factor).sample[:, 0]
        return self.vocoder(spec)

    @torch.no_grad()
    def synthesize(self, vocal: np.ndarray | None, vocal_sr: int, prompt: str | None, duration_s: float,
                 seed: int = 0, guidance_scale: float | None = None, steps: int | None = None) -> np.ndarray:
        return self.synthesize_batch([vocal], vocal_sr, [prompt], duration_s, [seed], guidance_scale, steps)[0]

    @torch.no_grad()
    def synthesize_batch(self, vocals: list[np.ndarray | None], vocal_sr: int, prompts: list[str | None],
                         duration_s: float, seeds: list[int], guidance_scale: float | None = None,
                         steps: int | None = None, stop: StopCheck = never) -> list[np.ndarray]:
        """synthesize() for several items of one duration in one UNet batch (the server's micro-batches). Each
        item's starting noise comes from its own seed and DDIM is deterministic, so an item's output does not
        depend on its batch companions (beyond float rounding). `stop` is asked before every diffusion step;
        True ends the call with Cancelled (models/cancel.py)."""
        scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        n_samples = round(duration_s * mel.SAMPLE_RATE)
        has_vocal = [v is not None and len(v) > 0 for v in vocals]
        vocal_emb = torch.stack([self.vocal_embedding(resample(np.asarray(v, np.float32), vocal_sr, CLAP_SR))
                                 if has else self.null_vocal() for v, has in zip(vocals, has_vocal)])
        n = len(vocals)
        cond = self.class_labels(list(prompts), vocal_emb, torch.ones(n, dtype=torch.bool), torch.tensor(has_vocal))
        uncond = torch.cat([self.null_text(), self.null_vocal()])[None].expand(n, -1)
        labels = torch.cat([uncond, cond]) if scale > 1.0 else cond

        frames = math.ceil(n_samples / mel.HOP / self.frame_multiple) * self.frame_multiple
        shape = (1, self.unet.config.in_channels, frames // self.vae_factor, mel.N_MELS // self.vae_factor)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # set_timesteps is stateful
        scheduler.set_timesteps(steps or self.cfg.inference_steps, device=self.device)
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators]) * scheduler.init_noise_sigma
        latents = latents.to(self.device)
        extra = {"generator": generators[0]} if "generator" in inspect.signature(scheduler.step).parameters else {}
        self.unet.eval()
        for t in scheduler.timesteps:
            if stop():
                raise Cancelled("generation stopped: nobody waits for it")
            x = scheduler.scale_model_input(torch.cat([latents] * (len(labels) // n)), t)
            eps = self.predict_noise(x, t, labels)
            if scale > 1.0:  # classifier-free guidance against the null condition
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + scale * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents, **extra).prev_sample
        out = []
        for audio in self.decode(latents).float().cpu().numpy():
            out.append(np.pad(audio[:n_samples], (0, max(0, n_samples - len(audio)))).astype(np.float32))
        return out


def own_memory(module: nn.Module) -> nn.Module:
    """Copy weights out of the safetensors memory map into fresh (aligned) tensors: mapped tensors sit at odd
    offsets, which sends CPU kernels down other SIMD paths, and load(save(m)) would differ from m in the 7th digit."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.data = t.data.clone()
    return module


def text_encoder_of(clap: ClapModel) -> ClapTextModelWithProjection:
    """CLAP's text tower as the diffusers layout stores it (text_encoder/)."""
    text = ClapTextModelWithProjection(clap.config.text_config).to(clap.device)
    text.text_model.load_state_dict(clap.text_model.state_dict())
    text.text_projection.load_state_dict(clap.text_projection.state_dict())
    return text


def read_folder(folder: Path) -> dict[str, Any]:
    """Components from a diffusers-layout folder (see the module docstring), all from local files."""
    if not (folder / "text_encoder" / "config.json").is_file():
        raise WeightsNotFoundError(
            f"{folder}: no text_encoder/ (AudioLDM's CLAP text tower, ClapTextModelWithProjection). The UNet was "
            f"trained on that tower's embeddings; clap/'s own text tower is a different CLAP and is not used in its "
            f"place. Copy text_encoder/ from the AudioLDM checkpoint (diffusers layout) into {folder}")
    clap = ClapModel.from_pretrained(folder / "clap")
    text = ClapTextModelWithProjection.from_pretrained(folder / "text_encoder")
    clap.text_model.load_state_dict(text.text_model.state_dict())
    clap.text_projection.load_state_dict(text.text_projection.state_dict())
    def diffusers_part(cls, sub: str):
        # diffusers looks for safetensors unless told otherwise: a folder of .bin files (whole or sharded) says so
        return own_memory(cls.from_pretrained(folder / sub, use_safetensors=any((folder / sub).glob("*.safetensors"))))
    return {"unet": diffusers_part(UNet2DConditionModel, "unet"),
            "vae": diffusers_part(AutoencoderKL, "vae"),
            "vocoder": own_memory(SpeechT5HifiGan.from_pretrained(folder / "vocoder")),
            "clap": own_memory(clap),
            "tokenizer": RobertaTokenizer.from_pretrained(folder / "tokenizer"),
            "feature_extractor": ClapFeatureExtractor.from_pretrained(folder / "clap"),
            "scheduler": DDIMScheduler.from_pretrained(folder / "scheduler")}
