"""Fréchet Audio Distance with a pluggable embedding, and the CLAP text-audio score.

FAD (Kilgour et al. 2019) fits a Gaussian to the embeddings of a reference set and of a generated set and
reports the Fréchet (2-Wasserstein) distance between the two Gaussians: lower is better, 0 for identical
sets. Each embedder turns a clip into a matrix of window embeddings [n_windows, dim]; all windows of a
set are pooled before the Gaussian is fitted (as VGGish-FAD pools its 0.96 s frames).

Embedders:
- ClapEmbedder: LAION CLAP audio embeddings through transformers' ClapModel, loaded from a LOCAL folder
  (config.json + weights + preprocessor_config.json [+ tokenizer files for text]). Never a hub name: a
  path that is not a folder is refused. Input is resampled to the feature extractor's rate (48 kHz) and
  cut into windows of its maximum length (10 s), so no random cropping ever happens.
- MelStatsEmbedder: the weight-free fallback for CPU/CI, see its docstring.

Limits shared by every FAD: it is biased upwards for small sets (the covariance estimate needs many
more windows than dimensions; compare FADs only at equal set sizes), and it says nothing about whether a
given instrumental fits its vocal (harmonic_fit does).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import librosa
import numpy as np
import scipy.linalg

from tasks.evaluation.harmony import finite
from v2m.audio import resample

Clip = tuple[np.ndarray, int]  # (mono float audio, sample rate)


@runtime_checkable
class Embedder(Protocol):
    """Anything with a name and `embed(audio, sr) -> [n_windows, dim]` float array can feed `fad`."""

    name: str

    def embed(self, audio: np.ndarray, sr: int) -> np.ndarray: ...


# ---- the distance --------------------------------------------------------------------------------------
def gaussian_stats(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [dim] and covariance [dim, dim] (unbiased, rows = samples) of an embedding matrix."""
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need a [n >= 2, dim] embedding matrix, got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for two Gaussians; >= 0, 0 iff they are equal.

    The matrix square root is scipy.linalg.sqrtm. When S1 S2 is (near) singular, as it is when a set has
    fewer windows than dimensions, the square root is taken of (S1 + eps I)(S2 + eps I) instead (the fix
    of the reference FID/FAD implementations); tiny imaginary parts from round-off are dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all() or any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught):
        offset = eps * np.eye(s1.shape[0])
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)  # round-off can leave -1e-12 for identical sets


def embed_set(clips: Iterable[Clip], embedder: Embedder) -> np.ndarray:
    """All window embeddings of a set of (audio, sr) clips, stacked: [sum of n_windows, dim]."""
    parts = [np.atleast_2d(np.asarray(embedder.embed(audio, sr), np.float64)) for audio, sr in clips]
    if not parts:
        raise ValueError("empty clip set")
    return np.concatenate(parts, axis=0)


def fad_from_embeddings(emb_a: np.ndarray, emb_b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(emb_a), *gaussian_stats(emb_b))


def fad(set_a: Iterable[Clip], set_b: Iterable[Clip], embedder: Embedder) -> float:
    """Fréchet Audio Distance between two sets of (audio, sr) clips under `embedder`. Lower is better.

    Typical use: set_a = reference instrumentals of the test split, set_b = the generations for the same
    vocals. For a fixed reference, cache gaussian_stats(embed_set(reference, embedder)) and call
    frechet_distance directly.
    """
    return fad_from_embeddings(embed_set(set_a, embedder), embed_set(set_b, embedder))


# ---- weight-free fallback ------------------------------------------------------------------------------
class MelStatsEmbedder:
    """Per-window log-mel and chroma statistics: a weight-free stand-in for a learned audio embedding.

    For every 1 s window (hop 0.5 s) of 16 kHz audio: mean and standard deviation over its STFT frames of
    64 log-mel bands (dB re full scale) and of 12 chroma bins (chroma_stft, same spectrogram): 152 numbers.

    Why it is a reasonable proxy: learned embeddings used for FAD (VGGish, CLAP) are themselves functions
    of a log-mel spectrogram, and much of what FAD catches with them (wrong spectral balance / timbre,
    noise, muffled or harsh output, missing dynamics, smeared or absent harmony) shows up in these
    first- and second-order band statistics; the same statistics underlie classic MFCC-GMM comparisons
    of audio collections. It needs no weights, runs anywhere and is deterministic, so CI and CPU runs can
    track FAD trends. Limits: no semantics (genre, instrument identity, musical structure or rhythm
    beyond 1 s), sensitive to overall level and EQ (dB are absolute, deliberately: a level mismatch is a
    real defect), and its values are on another scale than VGGish/CLAP FADs: compare only with itself.
    """

    name = "melstats"
    sample_rate = 16000
    n_fft, hop, n_mels = 1024, 256, 64
    window_s, hop_s = 1.0, 0.5

    def embed(self, audio: np.ndarray, sr: int) -> np.ndarray:
        y = resample(finite(audio), sr, self.sample_rate)
        power = np.abs(librosa.stft(y, n_fft=self.n_fft, hop_length=self.hop, center=True)) ** 2
        mel = librosa.power_to_db(librosa.feature.melspectrogram(S=power, sr=self.sample_rate, n_mels=self.n_mels),
                                  ref=1.0, amin=1e-10, top_db=None)
        chroma = librosa.feature.chroma_stft(S=power, sr=self.sample_rate, tuning=0.0)
        feats = np.vstack([mel, chroma])                     # [76, frames]
        fps = self.sample_rate / self.hop
        win, step = int(round(self.window_s * fps)), int(round(self.hop_s * fps))
        n = feats.shape[1]
        starts = range(0, max(n - win, 0) + 1, step)
        rows = [np.concatenate([feats[:, s:s + win].mean(axis=1), feats[:, s:s + win].std(axis=1)]) for s in starts]
        return np.asarray(rows, np.float64)


# ---- CLAP ----------------------------------------------------------------------------------------------
class ClapEmbedder:
    """CLAP audio (and text) embeddings from a local folder holding a transformers ClapModel.

    model_dir: a folder with config.json, the weights, preprocessor_config.json (ClapFeatureExtractor)
    and, for text, the tokenizer files (e.g. a converted laion/clap-htsat-unfused). Never a hub name.
    Audio embeddings are `get_audio_features(...).pooler_output` (L2-normalised by transformers), one
    per window of the feature extractor's maximum length (10 s at 48 kHz); a final partial window is kept
    when it is at least `min_window_s` long (or is the only one) and repeat-padded by the extractor.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", batch_size: int = 8, min_window_s: float = 1.0):
        import torch
        from transformers import ClapFeatureExtractor, ClapModel

        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{model_dir}: CLAP weights must be a local folder (config.json, weights, "
                                    "preprocessor_config.json); hub names are not loaded")
        self.path, self.device, self.batch_size, self.min_window_s = path, device, batch_size, min_window_s
        self.model = ClapModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.extractor = ClapFeatureExtractor.from_pretrained(str(path), local_files_only=True)
        self.sample_rate = int(self.extractor.sampling_rate)
        self.window = int(self.extractor.nb_max_samples)
        self.name = f"clap:{path.name}"
        self._tokenizer = None
        self._torch = torch

    def windows(self, audio: np.ndarray, sr: int) -> list[np.ndarray]:
        y = resample(finite(audio), sr, self.sample_rate)
        out = [y[s:s + self.window] for s in range(0, max(len(y), 1), self.window)]
        keep = [w for w in out if len(w) >= self.min_window_s * self.sample_rate]
        return keep or [out[0] if out[0].size else np.zeros(self.sample_rate, np.float32)]

    def embed(self, audio: np.ndarray, sr: int) -> np.ndarray:
        wins = self.windows(audio, sr)
        rows = []
        for i in range(0, len(wins), self.batch_size):
            inputs = self.extractor(wins[i:i + self.batch_size], sampling_rate=self.sample_rate, return_tensors="pt")
            with self._torch.inference_mode():
                out = self.model.get_audio_features(**{k: v.to(self.device) for k, v in inputs.items()})
            rows.append(out.pooler_output.float().cpu().numpy())
        return np.concatenate(rows, axis=0).astype(np.float64)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            vocab = self.model.config.text_config.vocab_size
            # offline loads of real tokenizers can fail silently into a 5-token placeholder: check
            if len(tok) <= 5 or len(tok) > vocab:
                raise ValueError(f"{self.path}: tokenizer has {len(tok)} tokens for a text model of vocabulary "
                                 f"{vocab}; the tokenizer files are missing or do not belong to this model")
            self._tokenizer = tok
        return self._tokenizer

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] L2-normalised CLAP text embeddings."""
        inputs = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        with self._torch.inference_mode():
            out = self.model.get_text_features(**{k: v.to(self.device) for k, v in inputs.items()})
        emb = out.pooler_output.float().cpu().numpy().astype(np.float64)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def clap_score(text: str, audio: np.ndarray, sr: int, clap: ClapEmbedder) -> float:
    """Prompt adherence: cosine between the CLAP embedding of `text` and of `audio`. Range [-1, 1],
    higher is better.

    The audio embedding is the mean of the clip's (unit) window embeddings, renormalised. This is the raw
    cosine; papers often print "CLAP score" as 100 * max(cos, 0). Meaningful only with real CLAP weights
    (a random model gives arbitrary values) and only relative to other models scored with the same weights.
    """
    a = clap.embed(audio, sr).mean(axis=0)
    a = a / max(float(np.linalg.norm(a)), 1e-12)
    t = clap.embed_text([text])[0]
    return float(np.clip(a @ t, -1.0, 1.0))
