"""What the cache stage needs of MusicGen-Melody: EnCodec (codes of the instrumental) and the vocal's chroma.

For real weights only EnCodec's tensors are read from the checkpoint (models.weights.load_prefixed), not the
1.5B decoder or T5; encoding runs on the configured device, in batches of same-length chunks (so padding never
changes a chunk's codes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.musicgen_chroma import SAMPLE_RATE, melody_chroma
from models.weights import load_prefixed
from v2m.audio import read_mono, resample


class MusicGenInputs:
    sample_rate = SAMPLE_RATE

    def __init__(self, codec, num_codebooks: int, pad_id: int):
        self.codec, self.num_codebooks, self.pad_id = codec.eval(), num_codebooks, pad_id

    @classmethod
    def from_folder(cls, folder: Path, device: str = "cpu") -> "MusicGenInputs":
        from transformers import EncodecModel, MusicgenMelodyConfig
        config = MusicgenMelodyConfig.from_pretrained(folder, local_files_only=True)
        codec = EncodecModel(config.audio_encoder)
        missing, unexpected = codec.load_state_dict(load_prefixed(folder, "audio_encoder."), strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: EnCodec weights do not fit its config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return cls(codec.to(device), config.decoder.num_codebooks, config.decoder.pad_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.codec.parameters()).device

    @torch.no_grad()
    def encode(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        """[num_codebooks, frames] codes (int16 when they fit) per mono 32 kHz clip; one forward per length."""
        codec = self.codec
        bandwidth = next(bw for bw in sorted(codec.config.target_bandwidths)
                         if codec.quantizer.get_num_quantizers_for_bandwidth(bw) >= self.num_codebooks)
        out: list[np.ndarray | None] = [None] * len(audios)
        for length in sorted({len(a) for a in audios}):
            idx = [i for i, a in enumerate(audios) if len(a) == length]
            wav = torch.from_numpy(np.stack([np.asarray(audios[i], np.float32) for i in idx])).to(self.device)[:, None]
            codes = codec.encode(wav, bandwidth=bandwidth).audio_codes[0, :, : self.num_codebooks]
            for i, c in zip(idx, codes.cpu().numpy()):
                out[i] = c.astype(np.int16 if self.pad_id < 2**15 else np.int32)
        return out

    def prepare_batch(self, chunks: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        """Codes of each instrumental (the target) and the melody chroma of each vocal (the condition)."""
        def read(path: str) -> np.ndarray:
            audio, sr = read_mono(path)
            return resample(audio, sr, self.sample_rate)
        codes = self.encode([read(c["instrumental_path"]) for c in chunks])
        return [{"codes": k, "chroma": melody_chroma(read(c["vocals_path"])).astype(np.float16)}
                for k, c in zip(codes, chunks)]
