"""How good a separation is, estimated without the true stems; and SDR where they are known (benchmarks, tests).

Every estimate reads only the mix and the two separated stems, so it judges either separator the same way.
The vocal's pitch is tracked *in the separated vocal* (harmonic_mask.lead_line), and its harmonics define a comb:
- vocal_share_db             vocal energy / mix energy. A song without a voice gives the learned separator an
                             (almost) silent vocal.
- lead_db                    in the mix, the sung pitch's loudness above the loudest pitch unrelated to it
                             (not an octave, twelfth, ... of it), median over sung frames. A lead voice stands out;
                             a separator handed an instrumental follows whichever line is on top, which does not.
- vocal_in_instrumental_db   energy of the instrumental on the sung harmonics / the vocal's energy there:
                             voice left behind in the instrumental.
- accompaniment_in_vocal_db  energy of the vocal off its own harmonics / on them: what else came along.
- residual_db                mix − (vocal + instrumental), relative to the mix: the stems add back to the song.
Each criterion scores 0 at its `bad` anchor and 1 at its `good` one (params separate.quality); a track's quality
is its weakest criterion's score, and that criterion names the quarantine reason.
"""

from __future__ import annotations

import librosa
import numpy as np

from tasks.data import harmonic_mask as hm
from v2m.audio import resample, to_mono
from v2m.config_separate import HarmonicConfig, QualityConfig

REASONS = {  # criterion -> (reason code, what a low score means)
    "vocal_share_db": ("no_vocal", "the separated vocal is (almost) silent: a song without vocals?"),
    "lead_db": ("no_vocal", "no sung line stands out above the accompaniment: a song without vocals?"),
    "vocal_in_instrumental_db": ("vocal_in_instrumental", "the instrumental is full of voice"),
    "accompaniment_in_vocal_db": ("accompaniment_in_vocal", "the vocal is full of accompaniment"),
    "residual_db": ("stems_do_not_add_up", "vocal + instrumental do not add back to the mix"),
}
RELATED_CENTS = 60   # a pitch within this of k x f0 or f0 / k (k = 1..5) counts as the sung line's own


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Signal-to-distortion ratio in dB (BSS-eval's plain SDR, as MUSDB's `new_sdr`)."""
    ref, est = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
    return float(10 * np.log10((np.sum(ref ** 2) + 1e-9) / (np.sum((ref - est) ** 2) + 1e-9)))


def sdr_improvement(reference: np.ndarray, estimate: np.ndarray, mix: np.ndarray) -> float:
    """SDRi: how much closer to the true stem the estimate is than the mix itself (dB)."""
    return sdr(reference, estimate) - sdr(reference, mix)


def _db(num: float, den: float) -> float:
    return float(10 * np.log10(max(num, 1e-20) / max(den, 1e-20)))


def lead_db(C: np.ndarray, f0: np.ndarray, voiced: np.ndarray, cfg: HarmonicConfig, chunk: int = 8192) -> float:
    """Median over sung frames of (mix |CQT| at the sung pitch) / (loudest unrelated |CQT| in the vocal range)."""
    n = min(C.shape[1], len(f0))
    frames = np.flatnonzero(voiced[:n])
    if frames.size == 0:
        return -np.inf
    bins = hm.FMIN * 2.0 ** (np.arange(C.shape[0]) / hm.BPO)
    in_range = ((bins >= cfg.fmin_hz) & (bins <= cfg.fmax_hz))[:, None]
    octaves = 1200 * np.log2(np.arange(1, 6))
    out = []
    for i in range(0, frames.size, chunk):  # bounded memory on long songs
        t = frames[i:i + chunk]
        cents = 1200 * np.log2(bins[:, None] / f0[t][None, :])
        related = (np.abs(np.abs(cents)[..., None] - octaves) < RELATED_CENTS).any(axis=-1)
        line = np.where(np.abs(cents) < RELATED_CENTS, C[:, t], 0).max(axis=0)
        other = np.where(in_range & ~related, C[:, t], 0).max(axis=0)
        out.append(20 * np.log10((line + 1e-9) / (other + 1e-9)))
    return float(np.median(np.concatenate(out)))


def estimate(mix: np.ndarray, vocals: np.ndarray, instrumental: np.ndarray, sr: int,
             harmonic: HarmonicConfig) -> dict[str, float]:
    """The five estimates (module docstring) for [channels, samples] arrays at rate `sr`."""
    m, v, i = (resample(to_mono(np.atleast_2d(x)), sr, hm.ANALYSIS_SR) for x in (mix, vocals, instrumental))
    residual = np.atleast_2d(mix) - np.atleast_2d(vocals) - np.atleast_2d(instrumental)
    out = {"vocal_share_db": _db(np.sum(v.astype(np.float64) ** 2), np.sum(m.astype(np.float64) ** 2)),
           "residual_db": _db(np.sum(residual.astype(np.float64) ** 2), np.sum(np.square(mix, dtype=np.float64)))}
    f0, voiced, _ = hm.lead_line(v, hm.ANALYSIS_SR, harmonic)
    out["lead_db"] = lead_db(hm.cqt_magnitude(m), f0, voiced, harmonic)
    V, I = (np.abs(librosa.stft(x, n_fft=2048, hop_length=hm.HOP)) ** 2 for x in (v, i))
    n = min(V.shape[1], len(f0))
    comb = hm.comb_mask(librosa.fft_frequencies(sr=hm.ANALYSIS_SR, n_fft=2048), f0[:n], voiced[:n],
                        harmonic.harmonics, hm.ANALYSIS_SR / 2048)
    on_vocal = float((comb * V[:, :n]).sum())
    out["vocal_in_instrumental_db"] = _db(float((comb * I[:, :n]).sum()), on_vocal)
    out["accompaniment_in_vocal_db"] = _db(float(V[:, :n].sum()) - on_vocal, on_vocal)
    return {k: round(x, 2) if np.isfinite(x) else (-999.0 if x < 0 else 999.0) for k, x in out.items()}


def score(estimates: dict[str, float], cfg: QualityConfig) -> tuple[float, str]:
    """(quality in 0..1, the weakest criterion): each criterion's position between its bad and good anchors."""
    scores = {}
    for name in REASONS:
        rng = getattr(cfg, name)
        scores[name] = float(np.clip((estimates[name] - rng.bad) / (rng.good - rng.bad), 0.0, 1.0))
    weakest = min(scores, key=scores.get)
    return round(scores[weakest], 4), weakest


def verdict(estimates: dict[str, float], cfg: QualityConfig, min_quality: float) -> dict:
    """{"quality", "status": ok|quarantined, and for a quarantined track "reason" and "message"}."""
    quality, weakest = score(estimates, cfg)
    if quality >= min_quality:
        return {"quality": quality, "status": "ok"}
    code, meaning = REASONS[weakest]
    rng = getattr(cfg, weakest)
    return {"quality": quality, "status": "quarantined", "reason": code,
            "message": f"{meaning} ({weakest} {estimates[weakest]:+.1f}; scores 0 at {rng.bad:+g}, 1 at "
                       f"{rng.good:+g}; quality {quality:.2f} < separate.min_quality {min_quality:g})"}
