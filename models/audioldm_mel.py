"""AudioLDM's mel front end: the spectrogram its VAE encodes and its HiFi-GAN vocoder (SpeechT5HifiGan) inverts.

diffusers ships no such front end, so it lives here. The numbers are AudioLDM's (and its vocoder's): 16 kHz,
n_fft = win = 1024, hop 160 (100 frames per second), 64 Slaney-scale mel bins from 0 to 8 kHz, the natural log of
the mel *magnitude* clamped at 1e-5. Frames are centred as in AudioLDM's own STFT (audioldm/audio/stft.py):
reflect-pad n_fft / 2 on each side, so frame i is centred on sample 160 i and T samples give T // 160 + 1 frames
(AudioLDM then crops to its target length; the vocoder's 160x upsampling gives the samples back).
"""

from __future__ import annotations

from functools import lru_cache

import librosa
import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 1024
WIN_LENGTH = 1024
HOP = 160
N_MELS = 64
FMIN = 0.0
FMAX = 8000.0
LOG_FLOOR = 1e-5
SILENCE = float(np.log(LOG_FLOOR))  # the log-mel value of digital silence: what padding frames hold


@lru_cache(maxsize=None)
def mel_basis() -> torch.Tensor:
    """[64, 513] Slaney mel filterbank (librosa's default: htk=False, norm="slaney")."""
    return torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX))


def normalize_wav(audio: np.ndarray) -> np.ndarray:
    """AudioLDM's input normalisation: remove DC, peak at 0.5 (its VAE was trained on audio scaled so)."""
    audio = audio.astype(np.float32) - np.float32(audio.mean()) if audio.size else audio.astype(np.float32)
    return (0.5 * audio / (np.abs(audio).max() + 1e-8)).astype(np.float32)


def log_mel(audio: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Waveform(s) [..., T] at 16 kHz -> log-mel [..., T // 160 + 1, 64] (time first, as the VAE and vocoder read
    it); frame i is centred on sample 160 i."""
    x = torch.as_tensor(audio, dtype=torch.float32)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    pad = N_FFT // 2
    x = torch.nn.functional.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(x, N_FFT, hop_length=HOP, win_length=WIN_LENGTH, window=torch.hann_window(WIN_LENGTH),
                      center=False, return_complex=True).abs()  # [B, 513, frames]
    mel = torch.matmul(mel_basis(), spec)  # [B, 64, frames]
    return torch.log(torch.clamp(mel, min=LOG_FLOOR)).transpose(1, 2).reshape(*lead, -1, N_MELS)


def pad_frames(mel: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the time axis (dim -2) with silence up to a multiple of `multiple` frames (the VAE/UNet downsampling)."""
    extra = -mel.shape[-2] % multiple
    if not extra:
        return mel
    pad = mel.new_full((*mel.shape[:-2], extra, mel.shape[-1]), SILENCE)
    return torch.cat([mel, pad], dim=-2)
