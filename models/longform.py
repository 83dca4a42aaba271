"""Whole songs: generate past one model window by chaining windows.

    MusicGen   window 0 = [0, W); each next call continues the last W - S seconds of codes (the audio prompt)
               and adds S new seconds, with the melody of the matching span of the vocal: audiocraft's
               extend-stride generation (W = 30 s, S = 20 s by default). All codes are decoded once at the end,
               so there is no seam in the waveform, only in the conditioning.
    AudioLDM   windows [kS, kS + W) generated independently from the vocal's matching span (seed + k) and joined
               with an equal-power (sin/cos) crossfade over the W - S seconds they share.

A request may carry a CancelToken (models/cancel.py): when every request of a batch is cancelled, the batch
stops at the next window (and within a window at the next decoding or diffusion step) with Cancelled.

Both are built on the backends' own verbs (MusicGen's generate_codes, AudioLDM's synthesize_batch: generate for
a batch), and a batch of requests of the same duration runs through the windows together. Windows come from
params.yaml `generate:`, and a request past `generate.max_duration_s` fails with that limit named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from models.base import Backend, peak_normalize
from models.cancel import Cancelled, CancelToken, StopCheck
from v2m.audio import resample, to_mono
from v2m.config_serve import GenerateConfig, WindowConfig
from v2m.errors import UserError

MIN_MELODY_S = 0.2  # a vocal span shorter than this has no melody to speak of: the window runs without one
VOCAL_SR = 48000  # AudioLDM windows get their vocals at CLAP's rate (what it embeds them at), one rate per batch


class TooLongError(UserError, ValueError):
    """The requested length is past params.yaml generate.max_duration_s."""


@dataclass(frozen=True)
class Request:
    """One instrumental to make: a vocal (any rate, None for text only) and/or a prompt."""
    vocal: np.ndarray | None
    vocal_sr: int
    prompt: str | None
    duration_s: float
    seed: int = 0
    cancel: CancelToken | None = field(default=None, compare=False)  # set when nobody wants the result any more


def check_length(duration_s: float, cfg: GenerateConfig) -> None:
    if duration_s > cfg.max_duration_s:
        raise TooLongError(f"{duration_s:.1f} s is longer than the {cfg.max_duration_s:g} s limit "
                           f"(params.yaml generate.max_duration_s)")


def window_starts(duration_s: float, win: WindowConfig) -> list[float]:
    """Start times of the windows that cover [0, duration_s): 0, S, 2S, ... while the previous one ends early."""
    starts = [0.0]
    while starts[-1] + win.window_s < duration_s:
        starts.append(starts[-1] + win.stride_s)
    return starts


def seam_times(duration_s: float, win: WindowConfig, backend: str) -> list[float]:
    """Where one window's audio hands over to the next: MusicGen's new codes start at the end of each window;
    AudioLDM's crossfades are centred in each overlap."""
    starts = window_starts(duration_s, win)[1:]
    overlap = win.window_s - win.stride_s
    return [s + overlap for s in starts] if backend == "musicgen" else [s + overlap / 2 for s in starts]


def _span(vocal: np.ndarray | None, sr: int, start_s: float, end_s: float) -> np.ndarray | None:
    if vocal is None:
        return None
    part = vocal[round(start_s * sr): round(end_s * sr)]
    return part if len(part) >= MIN_MELODY_S * sr else None


def generate_long(backend: Backend, req: Request, cfg: GenerateConfig, guidance_scale: float | None = None,
                  steps: int | None = None) -> np.ndarray:
    """One instrumental of req.duration_s at backend.sample_rate, in as many windows as it takes."""
    return generate_batch(backend, [req], cfg, guidance_scale, steps)[0]


@dataclass(frozen=True)
class Generated:
    """One instrumental: what users get (peak-normalised) and the model's raw output, which sanity checks read
    (normalisation hides clipping and lifts quiet output)."""
    audio: np.ndarray
    raw: np.ndarray


def generate_batch(backend: Backend, reqs: list[Request], cfg: GenerateConfig, guidance_scale: float | None = None,
                   steps: int | None = None) -> list[np.ndarray]:
    """Several instrumentals; requests of the same duration run as one model batch. AudioLDM items keep their
    own seeds (their starting noise); MusicGen's sampling draws from one stream seeded by the batch's first
    request, so a MusicGen output reproduces from its seed only when it ran alone (serve.max_batch 1)."""
    return [g.audio for g in generate_batch_raw(backend, reqs, cfg, guidance_scale, steps)]


def generate_batch_raw(backend: Backend, reqs: list[Request], cfg: GenerateConfig,
                       guidance_scale: float | None = None, steps: int | None = None) -> list[Generated]:
    """generate_batch, with each output's raw form beside it."""
    for r in reqs:
        check_length(r.duration_s, cfg)
        if r.vocal is None and not r.prompt:
            raise ValueError("generate needs a vocal, a prompt, or both")
    out: list[Generated | None] = [None] * len(reqs)
    groups: dict[float, list[int]] = {}
    for i, r in enumerate(reqs):
        groups.setdefault(r.duration_s, []).append(i)
    for idx in groups.values():
        group = [reqs[i] for i in idx]
        stop = _all_cancelled(group)
        audio = _continued(backend, group, cfg.musicgen, guidance_scale, stop) if backend.name == "musicgen" \
            else _crossfaded(backend, group, cfg.audioldm, guidance_scale, steps, stop)
        for i, a in zip(idx, audio):
            out[i] = a
    return out  # type: ignore[return-value]


def _all_cancelled(reqs: list[Request]) -> StopCheck:
    tokens = [r.cancel for r in reqs]
    return lambda: all(t is not None and t.cancelled for t in tokens)


def _check(stop: StopCheck) -> None:
    if stop():
        raise Cancelled("every request of this batch was cancelled")


def _continued(backend, reqs: list[Request], win: WindowConfig, guidance_scale: float | None,
               stop: StopCheck) -> list[Generated]:
    """MusicGen extend-stride over a batch of requests of one duration."""
    sr, hop = backend.sample_rate, backend.codec_hop
    n_samples = round(reqs[0].duration_s * sr)
    total = math.ceil(n_samples / hop)
    per_window = round(win.window_s * sr / hop)
    vocals = [None if r.vocal is None else resample(to_mono(np.asarray(r.vocal, np.float32)), r.vocal_sr, sr)
              for r in reqs]
    prompts = [r.prompt or None for r in reqs]
    codes = None
    for k, start in enumerate(window_starts(reqs[0].duration_s, win)):
        _check(stop)
        first = round(start * sr / hop)  # code frame where this window starts
        have = 0 if codes is None else codes.shape[-1]
        carried = None if codes is None else codes[:, :, first:have]
        new = min(per_window - (have - first), total - have)
        melodies = [_span(v, sr, first * hop / sr, (first + per_window) * hop / sr) for v in vocals]
        window = backend.generate_codes(melodies, prompts, new, seed=reqs[0].seed + k,
                                        guidance_scale=guidance_scale, prompt_codes=carried, stop=stop)
        codes = window if codes is None else np.concatenate([codes, window[:, :, have - first:]], -1)
    audio = []
    for c in codes:
        wav = backend.decode_codes(c)[:n_samples]
        raw = np.pad(wav, (0, n_samples - len(wav)))
        audio.append(Generated(peak_normalize(raw), raw))
    return audio


def equal_power(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(fade_out, fade_in) of n samples with fade_out² + fade_in² = 1: uncorrelated windows keep their power."""
    t = (np.arange(n, dtype=np.float32) + 0.5) / max(n, 1)
    return np.cos(t * np.pi / 2).astype(np.float32), np.sin(t * np.pi / 2).astype(np.float32)


def _crossfaded(backend, reqs: list[Request], win: WindowConfig, guidance_scale: float | None,
                steps: int | None, stop: StopCheck) -> list[Generated]:
    """AudioLDM over a batch of requests of one duration: independent windows on each vocal's matching span
    (seed + k for window k), each peak-normalised as generate() does, joined by equal-power crossfades."""
    sr, duration = backend.sample_rate, reqs[0].duration_s
    n_samples = round(duration * sr)
    vocals = [None if r.vocal is None else resample(to_mono(np.asarray(r.vocal, np.float32)), r.vocal_sr, VOCAL_SR)
              for r in reqs]  # one rate for the whole batch
    outs = [np.zeros(n_samples, np.float32) for _ in reqs]
    raws = [np.zeros(n_samples, np.float32) for _ in reqs]  # the same crossfades over the windows as generated
    fade = round((win.window_s - win.stride_s) * sr)
    for k, start in enumerate(window_starts(duration, win)):
        _check(stop)
        end = min(start + win.window_s, duration)
        parts = []
        for r, v in zip(reqs, vocals):
            part = _span(v, VOCAL_SR, start, end)
            if part is None and v is not None and not r.prompt:  # past the vocal's end, no text: its last span
                part = _span(v, VOCAL_SR, max(0.0, len(v) / VOCAL_SR - win.window_s), end)
            parts.append(part)
        audio = backend.synthesize_batch(parts, VOCAL_SR, [r.prompt for r in reqs], end - start,
                                         [r.seed + k for r in reqs], guidance_scale, steps, stop=stop)
        a = round(start * sr)
        for out, raw, window in zip(outs, raws, audio):
            for dest, w in ((out, peak_normalize(window)[: n_samples - a]), (raw, np.asarray(window)[: n_samples - a])):
                m = min(fade, len(w)) if k else 0
                fade_out, fade_in = equal_power(m)
                dest[a: a + m] = dest[a: a + m] * fade_out + w[:m] * fade_in
                dest[a + m: a + len(w)] = w[m:]
    return [Generated(peak_normalize(out), raw) for out, raw in zip(outs, raws)]
