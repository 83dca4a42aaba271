"""How an instrumental sits with its vocal in time (rhythm fit), and how much it varies (loopiness).

Both are weight-free functions of mono float audio, analysed at ANALYSIS_SR like tasks/evaluation/harmony.py.

rhythm_fit is onset alignment, the measure accompaniment-generation papers report next to FAD (onset or
beat alignment between the conditioning track and the generation): the vocal's onset-strength envelope
(spectral flux, librosa.onset.onset_strength) is correlated with the accompaniment's, the latter widened by
a maximum filter of +-ONSET_TOLERANCE_S so that an accompaniment onset a few tens of ms off still counts.
On 20 rendered chorales (tests/model/test_rhythm.py re-measures it) the true accompaniment beats the same
accompaniment shifted by half a beat and the same accompaniment played 10 % faster on every chorale.

repetition measures the one way a generator can score well on harmony and rhythm without making music:
looping one bar. It is the highest mean cosine similarity between the clip's
mean-removed chroma at time t and at t + lag, over lags of REPEAT_MIN_S to half the clip. A loop of
one bar repeats exactly (1.00 on 20 rendered chorales); a held chord varies only by its bowing (0.46); the
true chorale accompaniment scored 0.18 on average (a verse repeated within the clip scores high too, which
is why the gate compares it with the champion's on the same vocals, not with a fixed bound).
"""

from __future__ import annotations

import librosa
import numpy as np
from scipy.ndimage import maximum_filter1d

from tasks.evaluation.harmony import ANALYSIS_SR, ChromaFrames, finite
from v2m.audio import resample

ONSET_HOP = 256              # 16 ms onset frames at 16 kHz
ONSET_TOLERANCE_S = 0.05     # an accompaniment onset within 50 ms of a vocal onset counts as aligned
REPEAT_MIN_S = 1.0           # shorter lags are the same note ringing on, not a repeat
CHROMA_HOP_S = 512 / ANALYSIS_SR


def onset_envelope(audio: np.ndarray, sr: int) -> np.ndarray:
    """Spectral-flux onset strength of a clip at ANALYSIS_SR, one value per ONSET_HOP samples."""
    y = resample(finite(audio), sr, ANALYSIS_SR)
    if not np.any(y):
        return np.zeros(1 + y.size // ONSET_HOP)
    return librosa.onset.onset_strength(y=y, sr=ANALYSIS_SR, hop_length=ONSET_HOP).astype(np.float64)


def rhythm_fit(vocal: np.ndarray, inst: np.ndarray, sr: int, inst_sr: int | None = None) -> float:
    """Pearson correlation of the vocal's onset envelope with the accompaniment's (max-filtered by
    +-ONSET_TOLERANCE_S), over the vocal's length. Range [-1, 1], higher is better; 0 for an accompaniment
    without onsets (silence, a constant tone); NaN when the vocal has none (nothing to align with).

    Reference points on 20 rendered chorales: true accompaniment +0.29, half a beat late +0.03, 10 %
    faster +0.03 (the true one wins on 20/20 against each); a held tonic triad 0.00, white noise -0.05,
    one bar looped +0.34; the vocal itself +0.56 (so read it beside chroma_cosine, which flags doubling)."""
    v, a = onset_envelope(vocal, sr), onset_envelope(inst, inst_sr or sr)
    a = np.pad(a[: v.size], (0, max(0, v.size - a.size)))
    width = 2 * int(round(ONSET_TOLERANCE_S * ANALYSIS_SR / ONSET_HOP)) + 1
    a = maximum_filter1d(a, width)
    if v.std() <= 1e-9:
        return float("nan")
    if a.std() <= 1e-9 * max(1.0, a.mean()):
        return 0.0
    return float(np.corrcoef(v, a)[0, 1])


def repetition(inst: ChromaFrames, min_lag_s: float = REPEAT_MIN_S) -> float:
    """How exactly the clip repeats itself: max over lags (min_lag_s .. half the clip) of the mean cosine
    between mean-removed chroma frames t and t + lag, over audible frames (a clip shorter than 4 x min_lag_s
    uses lags from a quarter of its length). Range [-1, 1]; 1 = a loop, lower is more varied; NaN for a
    silent clip. Lower is better."""
    audible = inst.rms > 1e-3 * max(inst.rms.max(initial=0.0), 1e-12)
    if inst.rms.max(initial=0.0) <= 1e-6 or audible.sum() < 4:
        return float("nan")
    x = inst.chroma - inst.chroma[:, audible].mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=0)
    scale = np.linalg.norm(inst.chroma, axis=0)
    # a frame that barely differs from the mean chroma (a drone) is the same as every other frame: cosine 1
    flat = norm < 0.05 * np.maximum(scale, 1e-12)
    unit = np.where(flat, 0.0, x / np.maximum(norm, 1e-12))
    hi = inst.n_frames // 2
    lo = max(1, min(int(round(min_lag_s / CHROMA_HOP_S)), hi // 2))  # short clips: from a quarter of their length
    if hi < lo:
        return float("nan")
    best = -1.0
    for lag in range(lo, hi + 1):
        both = audible[:-lag] & audible[lag:]
        if not both.any():
            continue
        cos = (unit[:, :-lag] * unit[:, lag:]).sum(axis=0)
        cos = np.where(flat[:-lag] & flat[lag:], 1.0, cos)
        best = max(best, float(cos[both].mean()))
    return best
