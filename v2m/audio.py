"""Audio I/O shared by every pipeline step: decode, resample, measure, write.

We decode with soundfile (wav, flac, mp3 through libsndfile >= 1.1) and resample with soxr; torchaudio is
deliberately not used (see shared/notes/stack-facts.md: it does not load beside the CPU torch build).
"""

from __future__ import annotations

import hashlib
import wave
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf
import soxr

from v2m.errors import UserError

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3")


class AudioError(UserError, ValueError):
    """A file could not be used as audio; the message names the file and the problem."""


def read_audio(path: str | Path, dtype: str = "float32") -> tuple[np.ndarray, int]:
    """Decode a file to `dtype` (float32 in [-1, 1] by default) of shape [channels, samples], and its rate."""
    path = Path(path)
    try:
        data, sr = sf.read(str(path), dtype=dtype, always_2d=True)
    except Exception as exc:  # libsndfile raises LibsndfileError, RuntimeError or TypeError by format
        raise AudioError(f"{path}: cannot decode audio ({exc})") from exc
    return np.ascontiguousarray(data.T), int(sr)


def read_mono(path: str | Path, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, int]:
    """Decode (a frame range of) a file and average its channels."""
    try:
        data, sr = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(f"{path}: cannot decode audio ({exc})") from exc
    return data.mean(axis=1), int(sr)


def load_vocal(path: str | Path, min_duration_s: float = 1.0, silence_dbfs: float = -60.0) -> tuple[np.ndarray, int]:
    """A vocal to generate from, checked: a supported format, decodable, finite, long enough, not silent."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: file not found")
    if path.suffix.lower() not in AUDIO_SUFFIXES + (".ogg",):
        raise AudioError(f"{path}: unsupported format {path.suffix!r}; use wav, flac, mp3 or ogg")
    audio, sr = read_audio(path)
    mono = to_mono(audio)
    if not np.isfinite(mono).all():
        raise AudioError(f"{path}: the audio holds NaN or infinite samples")
    if len(mono) < min_duration_s * sr:
        raise AudioError(f"{path}: {len(mono) / sr:.2f} s is too short; a vocal needs at least {min_duration_s} s")
    if peak_dbfs(mono) < silence_dbfs:
        raise AudioError(f"{path}: the vocal is silent (peak {peak_dbfs(mono):.1f} dBFS < {silence_dbfs} dBFS)")
    return mono, sr


def to_mono(audio: np.ndarray) -> np.ndarray:
    return audio.mean(axis=0) if audio.ndim == 2 else audio


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return audio.astype(np.float32, copy=False)
    return soxr.resample(audio, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def write_wav(path: str | Path, audio: np.ndarray, sr: int, subtype: str = "PCM_16", gain: float = 1.0) -> None:
    """Write mono or [channels, samples] audio, times `gain`; the parent folder is created.

    Mono 16-bit files (every file the pipeline writes) are quantised in numpy and written with the
    standard library's `wave`: several times faster than libsndfile's float conversion, same bytes out.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if subtype == "PCM_16" and audio.ndim == 1 and path.suffix.lower() == ".wav":
        if audio.dtype == np.int16 and gain == 1.0:
            pcm = audio
        else:
            scaled = np.multiply(audio, np.float32(gain * 32767.0), dtype=np.float32)
            pcm = np.clip(scaled, -32767.0, 32767.0, out=scaled).astype(np.int16)
        with wave.open(str(path), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(sr)
            f.writeframes(pcm.tobytes())
        return
    data = audio.T if audio.ndim == 2 else audio
    sf.write(str(path), data * gain if gain != 1.0 else data, sr, subtype=subtype)


def integrated_loudness(audio: np.ndarray, sr: int) -> float:
    """ITU-R BS.1770-4 integrated loudness (LUFS) of mono audio, vectorised.

    Same filters and gating as pyloudnorm (K-weighting, 400 ms blocks with 75 % overlap, -70 LUFS
    absolute and -10 LU relative gates) without its per-block Python loop.
    """
    from pyloudnorm.iirfilter import IIRfilter
    shelf = IIRfilter(4.0, 1 / np.sqrt(2), 1500.0, sr, "high_shelf")
    highpass = IIRfilter(0.0, 0.5, 38.0, sr, "high_pass")
    # Both K-weighting biquads in one second-order-sections pass (half the time of two lfilter calls).
    sos = np.vstack([scipy.signal.tf2sos(shelf.b, shelf.a), scipy.signal.tf2sos(highpass.b, highpass.a)])
    y = scipy.signal.sosfilt(sos, audio.astype(np.float64))
    hop = int(0.1 * sr)  # blocks of 4 hops = 400 ms, stepping one hop = 75 % overlap
    n_hops = len(y) // hop
    if n_hops < 4:
        return -np.inf
    hop_energy = np.square(y[: n_hops * hop]).reshape(n_hops, hop).sum(axis=1)
    z = np.convolve(hop_energy, np.ones(4), mode="valid") / (4 * hop)  # mean square per block
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10 * np.log10(z)
    z = z[block_lufs >= -70.0]
    if z.size == 0:
        return -np.inf
    relative_gate = -0.691 + 10 * np.log10(z.mean()) - 10.0
    z = z[-0.691 + 10 * np.log10(z) >= relative_gate]
    return float(-0.691 + 10 * np.log10(z.mean()))


def peak_dbfs(audio: np.ndarray) -> float:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return 20.0 * np.log10(peak) if peak > 0 else -np.inf


def frame_rms_db(audio: np.ndarray, sr: int, frame_s: float = 0.05) -> np.ndarray:
    """RMS level in dBFS of consecutive non-overlapping frames (the tail shorter than a frame is dropped)."""
    n = max(1, int(sr * frame_s))
    frames = audio[: len(audio) // n * n].reshape(-1, n)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    return 20.0 * np.log10(np.maximum(rms, 1e-10))


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
