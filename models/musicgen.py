"""MusicGen-Melody (Copet et al. 2023) as a voice2music backend: a vocal in, an instrumental out.

The model is a decoder-only transformer over EnCodec codes (4 codebooks of 2048 at 50 Hz, 32 kHz audio).
It is conditioned by a *prefix*: [melody chroma of the vocal ; T5 encoding of a genre prompt], then the codes.
The codebooks are interleaved with a *delay pattern*: codebook k runs k steps behind codebook 0, so one
decoder step predicts all four streams while each still sees the coarser ones of the same frame.

Training (train_step) is next-code cross-entropy on delayed codes, with each condition dropped at random so
that one network also knows the unconditional distribution; generation mixes the two,
logits = uncond + guidance_scale · (cond − uncond)  (classifier-free guidance, Ho & Salimans 2022).

Null conditions, shared by training and generate() so guidance compares like with like:
- no text: the empty prompt with an all-zero attention mask, so every text state is zero (audiocraft's T5
  conditioner for a dropped description; transformers' unconditional branch is the same zeros);
- no melody: the model's own null chroma, one-hot on bin 0 in every frame (what transformers' generate()
  feeds its unconditional branch, and what the chroma of silence is).

Tensors built here come from the cache that prepare() writes: "codes" [K, frames] and "chroma" [frames, 12].
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.base import CONDITIONINGS, Backend, draw_drops
from models.cancel import Cancelled, StopCheck, never
from models.musicgen_chroma import HOP, SAMPLE_RATE, melody_chroma
from models.weights import DEFAULT_CACHE, download_s3_prefix, resolve_weights, weight_files
from v2m.audio import resample, to_mono
from v2m.config_musicgen import MusicGenConfig

META_FILE = "v2m_musicgen.json"  # our settings (prompt template, dropout, ...) next to transformers' files


class _FullChromaWindowFilter(logging.Filter):
    """transformers warns "exceeds the maximum chroma duration" on every forward whose melody is exactly the
    model's window (its length test is `<`, not `<=`); we always pass exactly that window, so drop only this."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum chroma duration" not in record.getMessage()


logging.getLogger("transformers.models.musicgen_melody.modeling_musicgen_melody").addFilter(_FullChromaWindowFilter())


def _fork_rng(device: torch.device):
    """A private RNG scope: seeding inside it leaves the caller's (and the trainer's) RNG state untouched."""
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])


def resolve_folder(location: str | Path, what: str, cache_root: Path = DEFAULT_CACHE) -> Path:
    """A local folder in transformers' save_pretrained layout (safetensors or .bin, whole or sharded), from a
    path or an s3:// prefix."""
    location = str(location)
    folder = download_s3_prefix(location, cache_root) if location.startswith("s3://") else Path(location)
    return resolve_weights(str(folder), ["config.json", weight_files("model"), "tokenizer_config.json"], what,
                           cache_root)


class MusicGenBackend(Backend):
    name = "musicgen"
    sample_rate = SAMPLE_RATE

    def __init__(self, model, tokenizer, cfg: MusicGenConfig, seed: int = 0):
        self.module = self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.seed = seed
        self._lora = False
        self._check_tokenizer()
        self.setup_finetune("full")

    # --- build & persist ----------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, cfg: MusicGenConfig, preset: str, seed: int = 0, init_audio: list[np.ndarray] | None = None,
                    device: str = "cpu", cache_root: Path = DEFAULT_CACHE) -> "MusicGenBackend":
        """The preset's base model.

        weights "": random init from `arch`, deterministic from `seed`. EnCodec's codebooks are seeded by k-means
        on `init_audio` (instrumental clips at 32 kHz) or, when it is None, on a fixed synthetic set of tones,
        noise and clicks (models.musicgen_tiny.synthetic_clips).
        weights set: facebook/musicgen-melody's files in transformers' layout, from a folder or an s3:// prefix
        (downloaded once under `cache_root`); `init_audio` is unused, real codebooks are trained."""
        if preset not in cfg.presets:
            raise ValueError(f"musicgen preset {preset!r} is not one of {', '.join(cfg.presets)}")
        spec = cfg.presets[preset]
        if spec.weights:
            folder = resolve_folder(spec.weights, f"musicgen preset {preset!r} (facebook/musicgen-melody files, "
                                                  f"transformers layout)", cache_root)
            return cls._from_folder(folder, cfg, seed, device)
        from models.musicgen_tiny import build_tiny
        model, tokenizer = build_tiny(spec.arch, seed, init_audio)
        return cls(model, tokenizer, cfg, seed).to(device)

    @classmethod
    def _from_folder(cls, folder: Path, cfg: MusicGenConfig, seed: int, device: str) -> "MusicGenBackend":
        from transformers import AutoTokenizer, MusicgenMelodyForConditionalGeneration
        # fp32 master weights whatever the checkpoint stores: the trainer adds mixed precision with autocast.
        model = MusicgenMelodyForConditionalGeneration.from_pretrained(folder, local_files_only=True,
                                                                       dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, cfg, seed).to(device)

    def save(self, directory: str | Path) -> None:
        """save_pretrained layout (config.json, generation_config.json, model.safetensors, tokenizer files) plus
        our settings; LoRA adapters are merged into a copy, so training can go on. The folder is a valid
        `weights:` location for from_preset."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._merged_model().save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        meta = {"backend": self.name, "seed": self.seed, "config": self.cfg.model_dump(mode="json")}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "MusicGenBackend":
        folder = resolve_folder(directory, "musicgen checkpoint")
        meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).is_file() else {}
        return cls._from_folder(folder, MusicGenConfig(**meta.get("config", {})), meta.get("seed", 0), device)

    def _check_tokenizer(self) -> None:
        """Offline tokenizer loads can fail silently (a placeholder with a handful of tokens): check its size
        against the text encoder's embedding table and that a prompt is not all <unk>."""
        vocab, table = len(self.tokenizer), self.model.config.text_encoder.vocab_size
        if not 0.9 * table <= vocab <= table:
            raise ValueError(f"musicgen tokenizer has {vocab} tokens but the T5 encoder embeds {table}: "
                             f"the tokenizer files are missing or do not belong to this model")
        ids = self.tokenizer("pop music for input vocals").input_ids
        if sum(i == self.tokenizer.unk_token_id for i in ids) > len(ids) // 2:
            raise ValueError("musicgen tokenizer maps a plain English prompt to <unk>: wrong tokenizer files")

    # --- what trains ----------------------------------------------------------------------------------
    def setup_finetune(self, method: str = "full", **options: Any) -> None:
        """"full": the decoder and the two condition projections train; T5 and EnCodec stay frozen (as in
        audiocraft). "lora": only LoRA adapters on the decoder's attention (options: r, alpha, dropout,
        target_modules, as params.yaml `musicgen.lora`)."""
        if self._lora:
            raise RuntimeError("LoRA adapters are already in place; start from a fresh base model to change method")
        self.model.requires_grad_(False)
        if method == "full":
            for part in (self.model.decoder, getattr(self.model, "enc_to_dec_proj", None),
                         getattr(self.model, "audio_enc_to_dec_proj", None)):
                if part is not None:
                    part.requires_grad_(True)
        elif method == "lora":
            import peft
            unknown = set(options) - {"r", "alpha", "dropout", "target_modules"}
            if unknown:
                raise TypeError(f"musicgen LoRA options: unknown {sorted(unknown)} (params.yaml musicgen.lora)")
            lora = peft.LoraConfig(r=options.get("r", 8), lora_alpha=options.get("alpha", 16),
                                   lora_dropout=options.get("dropout", 0.0),
                                   target_modules=list(options.get("target_modules", ["q_proj", "v_proj"])))
            with _fork_rng(self.device):  # adapter init is part of the seeded model, not of the caller's RNG
                torch.manual_seed(self.seed)
                peft.inject_adapter_in_model(lora, self.model.decoder)
            self._lora = True
        else:
            raise ValueError(f"musicgen: fine-tune method must be 'full' or 'lora', got {method!r}")

    def _merged_model(self):
        """The model with LoRA folded into the base weights (a copy; the live model keeps its adapters)."""
        if not self._lora:
            return self.model
        from peft.tuners.lora import LoraLayer
        merged = copy.deepcopy(self.model)
        for name, layer in [(n, m) for n, m in merged.named_modules() if isinstance(m, LoraLayer)]:
            layer.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, layer.get_base_layer())
        return merged

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer in the backward pass (frozen T5 and EnCodec keep no activations)."""
        decoder = self.model.decoder
        enable = getattr(decoder, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def trained_module(self) -> torch.nn.Module:
        return self.model  # one call per batch; T5 and EnCodec inside it are frozen

    def shard_units(self) -> list[torch.nn.Module]:
        return list(self.model.decoder.model.decoder.layers)

    # --- audio <-> codes --------------------------------------------------------------------------------
    @property
    def num_codebooks(self) -> int:
        return self.model.decoder.config.num_codebooks

    @property
    def pad_id(self) -> int:
        return self.model.decoder.config.pad_token_id

    @property
    def codec_hop(self) -> int:
        return self.model.audio_encoder.config.hop_length  # 640 samples = 50 code frames per second

    def inputs(self) -> "MusicGenInputs":
        """This model's encoder side (EnCodec + chroma): what prepare() runs."""
        from models.musicgen_inputs import MusicGenInputs
        return MusicGenInputs(self.model.audio_encoder, self.num_codebooks, self.pad_id)

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """[num_codebooks, frames] codes (int16 when they fit) of mono 32 kHz audio."""
        return self.inputs().encode([audio])[0]

    @torch.no_grad()
    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=self.device)
        return self.model.audio_encoder.decode(codes[None, None], [None]).audio_values[0, 0].float().cpu().numpy()

    def prepare(self, chunk: dict[str, Any]) -> dict[str, np.ndarray]:
        """Codes of the instrumental (the target) and the melody chroma of the vocal (the condition)."""
        return self.inputs().prepare_batch([chunk])[0]

    @classmethod
    def input_encoder(cls, cfg: MusicGenConfig, preset: str, device: str = "cpu",
                      cache_root: Path = DEFAULT_CACHE) -> "MusicGenInputs":
        """The cache stage's encoders of a real preset: EnCodec alone, read from the weights on `device`."""
        from models.musicgen_inputs import MusicGenInputs
        folder = resolve_folder(cfg.presets[preset].weights, f"musicgen preset {preset!r}", cache_root)
        return MusicGenInputs.from_folder(folder, device)

    # --- conditioning -------------------------------------------------------------------------------
    def draw_condition_dropout(self, n: int, conditioning: str, generator: torch.Generator | None,
                               train: bool) -> tuple[list[bool], list[bool]]:
        """(drop_text, drop_chroma) per item. Both are drawn from `generator` in every training step (so
        both conditionings consume the RNG alike); "voice" then hides the text whatever was drawn."""
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        drop_text, drop_chroma = [False] * n, [False] * n
        if train:
            r = self.cfg.condition_dropout
            text, chroma = draw_drops(n, r.text, r.chroma, r.joint, r.recipe, generator)
            drop_text, drop_chroma = text.tolist(), chroma.tolist()
        if conditioning == "voice":
            drop_text = [True] * n
        return drop_text, drop_chroma

    def _tokenise(self, prompts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 ids and attention mask; a None prompt is the null text (empty string, mask all zero)."""
        enc = self.tokenizer([p or "" for p in prompts], padding=True, truncation=True, max_length=256,
                             return_tensors="pt")
        mask = enc.attention_mask.clone()
        mask[[i for i, p in enumerate(prompts) if p is None]] = 0
        return enc.input_ids.to(self.device), mask.to(self.device)

    def _chroma_batch(self, chromas: list[np.ndarray | None]) -> torch.Tensor:
        """[B, chroma_length, 12]: each melody tiled (or cut) to the model's window, as the model itself does
        with a short one; None is the null melody."""
        length = self.model.config.chroma_length
        rows = []
        for chroma in chromas:
            if chroma is None:
                chroma = np.zeros((1, self.model.config.num_chroma), np.float32)
                chroma[:, 0] = 1.0
            rows.append(np.asarray(chroma, np.float32)[np.arange(length) % len(chroma)])
        return torch.from_numpy(np.stack(rows)).to(self.device, self.model.dtype)

    def delay_labels(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, K, T] codes -> [B, T + K - 1, K] labels in MusicGen's delay pattern: codebook k's frame t sits at
        position t + k; the corners are pad (= bos), which the loss ignores.

        Built with the decoder's own build_delay_pattern_mask on [bos ; codes], the sequence generate() grows;
        labels are that sequence minus its first (all-bos) column, i.e. what each decoder step must predict."""
        bsz, k, t = codes.shape
        bos = torch.full((bsz, k, 1), self.model.decoder.config.bos_token_id, dtype=torch.long, device=codes.device)
        sequence = torch.cat([bos, codes.long()], -1).reshape(bsz * k, -1)
        _, pattern = self.model.decoder.build_delay_pattern_mask(sequence, pad_token_id=self.pad_id, max_length=t + k)
        return pattern.reshape(bsz, k, -1)[..., 1:].transpose(1, 2)

    # --- train --------------------------------------------------------------------------------------
    def _crop(self, item: dict[str, Any], generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        """A crop_s window of (codes, chroma). Starts fall on multiples of lcm(640, 4096) samples = 0.64 s, where
        code frames (50 Hz) and chroma frames (7.8125 Hz) both begin; the first window without a generator."""
        codes, chroma = np.asarray(item["codes"]), np.asarray(item["chroma"])
        n_codes = round(self.cfg.crop_s * self.sample_rate / self.codec_hop)
        if codes.shape[1] <= n_codes:
            return codes, chroma
        unit = math.lcm(self.codec_hop, HOP)
        starts = (codes.shape[1] - n_codes) // (unit // self.codec_hop) + 1
        s = int(torch.randint(starts, (1,), generator=generator)) if generator is not None else 0
        c0, h0 = s * unit // self.codec_hop, s * unit // HOP
        return codes[:, c0: c0 + n_codes], chroma[h0: h0 + n_codes * self.codec_hop // HOP + 1]

    def _forward(self, batch: list[dict[str, Any]], conditioning: str, generator: torch.Generator | None,
                 train: bool):
        # Frozen parts always run in eval mode (no T5 dropout), whatever the trainer set on the module.
        self.model.train(train)
        self.model.text_encoder.eval()
        self.model.audio_encoder.eval()
        crops = [self._crop(item, generator if train else None) for item in batch]
        drop_text, drop_chroma = self.draw_condition_dropout(len(batch), conditioning, generator, train)
        input_ids, attention_mask = self._tokenise([None if d else it["prompt"] for it, d in zip(batch, drop_text)])
        features = self._chroma_batch([None if d else chroma for (_, chroma), d in zip(crops, drop_chroma)])
        width = max(codes.shape[1] for codes, _ in crops)  # shorter chunks: pad codes, which the loss ignores
        codes = torch.full((len(batch), self.num_codebooks, width), self.pad_id, dtype=torch.long)
        for i, (c, _) in enumerate(crops):
            codes[i, :, : c.shape[1]] = torch.from_numpy(c.astype(np.int64))
        labels = self.delay_labels(codes.to(self.device))
        out = self.train_call(train)(input_ids=input_ids, attention_mask=attention_mask, input_features=features,
                                     labels=labels)
        return out, labels

    def train_step(self, batch: list[dict[str, Any]], conditioning: str, generator: torch.Generator,
                   train: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over codebooks of next-code cross-entropy on the delayed codes of a crop_s window."""
        out, labels = self._forward(batch, conditioning, generator, train)
        tokens = float((labels != self.pad_id).sum())
        return out.loss, {"loss": float(out.loss.detach()), "tokens": tokens}

    @torch.no_grad()
    def logits(self, batch: list[dict[str, Any]], conditioning: str = "voice_text") -> torch.Tensor:
        """[B * K, prefix + T + K - 1, codebook_size] logits with no dropout and the first window (for tests
        and diagnostics)."""
        return self._forward(batch, conditioning, None, train=False)[0].logits

    # --- generate -----------------------------------------------------------------------------------
    @torch.no_grad()
    def synthesize(self, vocal: np.ndarray | None, vocal_sr: int, prompt: str | None, duration_s: float,
                 seed: int = 0, guidance_scale: float | None = None, steps: int | None = None) -> np.ndarray:
        """Voice only (prompt None), voice + text, or text only (vocal None), with classifier-free guidance.

        `steps` is unused: MusicGen decodes one code frame per step, so duration_s fixes the step count."""
        n_samples = round(duration_s * self.sample_rate)
        codes = self.generate_codes(*self._request(vocal, vocal_sr, prompt, duration_s), seed, guidance_scale)
        wav = self.decode_codes(codes[0])[:n_samples]
        return np.pad(wav, (0, n_samples - len(wav))).astype(np.float32)

    @torch.no_grad()
    def probe(self, vocal: np.ndarray | None, vocal_sr: int, prompt: str | None, duration_s: float, seed: int = 0,
              steps: int | None = None) -> np.ndarray:
        """The guided next-code scores of every generated step [steps, K, codebook_size], which the codes are
        drawn from: a condition that reaches the decoder changes them even where a weakly conditioned (e.g.
        random-init) model happens to sample the same codes; a condition that generate() drops never does."""
        scores: list[torch.Tensor] = []
        self.generate_codes(*self._request(vocal, vocal_sr, prompt, duration_s), seed, scores=scores)
        return torch.stack(scores).numpy()

    def _request(self, vocal: np.ndarray | None, vocal_sr: int, prompt: str | None, duration_s: float):
        """(melodies, prompts, frames) of one generate() request: the melody of the span we generate."""
        if vocal is None and prompt is None:
            raise ValueError("musicgen.generate needs a vocal, a prompt, or both")
        n_samples = round(duration_s * self.sample_rate)
        melody = None
        if vocal is not None:
            melody = resample(to_mono(np.asarray(vocal, np.float32)), vocal_sr, self.sample_rate)[:n_samples]
        return [melody], [prompt], math.ceil(n_samples / self.codec_hop)

    @torch.no_grad()
    def generate_codes(self, melodies: list[np.ndarray | None], prompts: list[str | None], frames: int,
                       seed: int = 0, guidance_scale: float | None = None,
                       prompt_codes: np.ndarray | None = None, scores: list | None = None,
                       stop: StopCheck = never) -> np.ndarray:
        """[B, K, P + frames] codes for a batch: melodies are 32 kHz audio (None = no melody), prompt_codes
        [B, K, P] are continued (audiocraft's audio prompt; the melody then spans prompt and new frames alike).
        All B items draw from one RNG seeded with `seed` (models/longform.py builds whole songs from this).
        `scores`, when given, receives each step's guided next-code scores [B * K, codebook_size] (see probe).
        `stop` is asked after every decoding step; True ends the call with Cancelled (models/cancel.py)."""
        input_ids, attention_mask = self._tokenise(prompts)
        features = self._chroma_batch([None if m is None else melody_chroma(m) for m in melodies])
        n_prompt = 0 if prompt_codes is None else prompt_codes.shape[-1]
        # un-delayed [B * K, P]; generate() prepends bos and builds the delay pattern
        start = torch.as_tensor(np.asarray(prompt_codes if n_prompt else np.zeros((len(prompts), self.num_codebooks, 0)),
                                           np.int64)).reshape(len(prompts) * self.num_codebooks, n_prompt)
        extra = {"decoder_input_ids": start.to(self.device)} if n_prompt else {}
        if scores is not None:
            from transformers import LogitsProcessorList
            extra["logits_processor"] = LogitsProcessorList([_ScoreRecorder(scores)])
        positions = features.shape[1] + input_ids.shape[1] + n_prompt + frames + self.num_codebooks
        if positions > self.model.decoder.config.max_position_embeddings:
            raise ValueError(f"musicgen: {(n_prompt + frames) * self.codec_hop / self.sample_rate:.1f} s is longer "
                             f"than one call can generate ({self.model.decoder.config.max_position_embeddings} "
                             f"positions, {positions} needed)")
        scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        was_training = self.model.training
        self.model.eval()
        try:
            with _fork_rng(self.device):
                torch.manual_seed(seed)
                # generate(max_new_tokens=N) yields N + 1 - K frames: the delay pattern costs K - 1 steps.
                recorder = _CodeRecorder()
                self.model.generate(input_ids=input_ids, attention_mask=attention_mask, input_features=features,
                                    do_sample=True, top_k=self.cfg.top_k, guidance_scale=scale, streamer=recorder,
                                    max_new_tokens=frames + self.num_codebooks - 1,
                                    stopping_criteria=_stopping(stop), **extra)
        finally:
            self.model.train(was_training)
        return recorder.codes(self.model.decoder, len(prompts), start, self.pad_id)


class _ScoreRecorder:
    """A logits processor that keeps each step's scores (after guidance, as sampling sees them) and changes none."""

    def __init__(self, out: list) -> None:
        self.out = out

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.out.append(scores.detach().float().cpu())
        return scores


def _stopping(stop: StopCheck):
    """A StoppingCriteriaList, asked after every decoding step, that leaves generate() with Cancelled once
    `stop()` says so. It raises rather than answering True: generate() would then undo the delay pattern of
    an unfinished sequence and fail on its shape."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhen(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            if stop():
                raise Cancelled("generation stopped: nobody waits for it")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhen()])


class _CodeRecorder:
    """A generate() streamer that keeps the token ids: transformers' MusicGen generate() returns decoded audio
    only, and continuing a song needs the codes. codes() undoes the delay pattern as generate() itself does."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def put(self, ids: torch.Tensor) -> None:
        self.parts.append(ids if ids.dim() == 2 else ids[:, None])  # first the prefix [B*K, L], then [B*K] a step

    def end(self) -> None:
        pass

    def codes(self, decoder, batch: int, prompt: torch.Tensor, pad_id: int) -> np.ndarray:
        """[B, K, P + frames]: the prompt codes [B * K, P] and what was generated after them."""
        seq = torch.cat(self.parts, -1)
        k = decoder.num_codebooks
        bos = torch.full((seq.shape[0], 1), pad_id, dtype=torch.long)  # bos = pad in MusicGen
        _, mask = decoder.build_delay_pattern_mask(torch.cat([bos, prompt.cpu()], -1), pad_token_id=pad_id,
                                                   max_length=seq.shape[-1])
        seq = decoder.apply_delay_pattern_mask(seq, mask)
        return seq[seq != pad_id].reshape(batch, k, -1).numpy()
