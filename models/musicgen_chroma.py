"""The melody condition of MusicGen-Melody: one dominant pitch class per frame, computed without torchaudio.

The recipe is transformers' MusicgenMelodyFeatureExtractor (a port of audiocraft's ChromaExtractor), which we
cannot call because it needs torchaudio (see shared/notes/stack-facts.md):

    32 kHz mono -> STFT (n_fft 16384, hop 4096, hann, centred, reflect-padded) -> power spectrogram,
    normalised by the window's energy (torchaudio `Spectrogram(normalized=True)`) -> librosa's chroma filter
    bank (12 pitch classes, C first) -> divide each frame by its max -> keep only the loudest class (one-hot).

The one-hot step is the paper's "dominant time-frequency bin": the model hears which note is on top, not the
timbre, so it cannot copy the vocal. A silent frame has all-zero energy; argmax then picks bin 0 (C), exactly
as the extractor does, which is also what the model's unconditional ("null") melody looks like.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

SAMPLE_RATE = 32000
N_FFT = 16384
HOP = 4096  # 32000 / 4096 = 7.8125 chroma frames per second
NUM_CHROMA = 12


@functools.lru_cache(maxsize=1)
def chroma_filters() -> np.ndarray:
    """[12, N_FFT // 2 + 1] float64: librosa's chroma filter bank, as the feature extractor builds it."""
    from transformers.audio_utils import chroma_filter_bank
    return chroma_filter_bank(sampling_rate=SAMPLE_RATE, num_frequency_bins=N_FFT, tuning=0, num_chroma=NUM_CHROMA)


def num_chroma_frames(num_samples: int) -> int:
    """Frames the centred STFT gives for a clip (clips shorter than one window are padded to it)."""
    return max(num_samples, N_FFT) // HOP + 1


def chroma_energy(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[frames, 12] float32 chroma of mono 32 kHz audio, each frame divided by its max (before the one-hot)."""
    wav = torch.as_tensor(np.asarray(audio, dtype=np.float32) if not torch.is_tensor(audio) else audio).float()
    if wav.shape[-1] < N_FFT:  # too short for one window: centre it in zeros, as the extractor does
        pad = N_FFT - wav.shape[-1]
        wav = torch.nn.functional.pad(wav, (pad // 2, pad - pad // 2))
    window = torch.hann_window(N_FFT, device=wav.device)
    spec = torch.stft(wav, N_FFT, hop_length=HOP, win_length=N_FFT, window=window, center=True,
                      pad_mode="reflect", return_complex=True)
    power = (spec.abs() / window.pow(2).sum().sqrt()).pow(2)  # torchaudio's normalized=True, then power 2
    filters = torch.from_numpy(chroma_filters()).float().to(wav.device)
    raw = filters @ power  # [12, frames]
    return torch.nn.functional.normalize(raw, p=float("inf"), dim=0, eps=1e-6).T


def melody_chroma(audio: np.ndarray | torch.Tensor) -> np.ndarray:
    """[frames, 12] float32 one-hot: the loudest pitch class of each frame (index 0 = C, 9 = A)."""
    energy = chroma_energy(audio)
    onehot = torch.zeros_like(energy)
    onehot.scatter_(1, energy.argmax(dim=1, keepdim=True), 1.0)
    return onehot.cpu().numpy()
