"""Whole songs: windowed generation gives the full length, with seams that do not stand out, and a clear error
past the configured limit (CLI exit 1, no traceback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from typer.testing import CliRunner

from models import get_backend, save_model
from models.cancel import Cancelled, CancelToken
from models.longform import Request, TooLongError, generate_batch, generate_long, seam_times, window_starts
from tests.conftest import synth_stems
from v2m.cli import app
from v2m.config import load_params
from v2m.config_serve import GenerateConfig, WindowConfig

ROOT = Path(__file__).resolve().parents[2]
# Short windows keep the tiny models fast; the chaining is the same as with the 30 s / 10 s defaults.
CFG = GenerateConfig(max_duration_s=120.0, musicgen=WindowConfig(window_s=4.0, stride_s=3.0),
                     audioldm=WindowConfig(window_s=10.0, stride_s=8.0))
SEAM_HALF_WIDTH_S = 0.1   # frames this close to a seam count as "at the seam"
EDGE_S = 0.5              # the first and last half second (onset, padding) are left out of the comparison


def tiny(name: str):
    return get_backend(name).from_preset(getattr(load_params(ROOT / "params.yaml"), name), "tiny", seed=0)


def spectral_flux(audio: np.ndarray, sr: int, hop: int = 256, n_fft: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(frame times, half-wave rectified frame-to-frame change of the log magnitude spectrum, summed over bins)."""
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[::hop] * np.hanning(n_fft)
    mag = np.log1p(100 * np.abs(np.fft.rfft(frames, axis=1)))
    flux = np.maximum(np.diff(mag, axis=0), 0).sum(axis=1)
    return (np.arange(1, len(mag)) * hop + n_fft / 2) / sr, flux


def seams_within_range(audio: np.ndarray, sr: int, seams: list[float]) -> tuple[float, float]:
    """(largest flux at any seam, largest flux elsewhere): a seam heard as a jump exceeds the second."""
    t, flux = spectral_flux(audio, sr)
    near = np.zeros(len(t), bool)
    for s in seams:
        near |= np.abs(t - s) <= SEAM_HALF_WIDTH_S
    inner = (t > EDGE_S) & (t < t[-1] - EDGE_S)
    return float(flux[near].max()), float(flux[inner & ~near].max())


def vocal(seconds: float, sr: int = 22050) -> np.ndarray:
    return synth_stems(7, seconds, sr)[0]


def test_the_flux_check_catches_a_jump() -> None:
    """A spliced level jump (what a seam without continuation or crossfade can sound like) fails the check."""
    sr = 16000
    noise = np.random.default_rng(0).standard_normal(sr * 6).astype(np.float32) * 0.05
    noise[3 * sr:] *= 8
    at_seam, elsewhere = seams_within_range(noise, sr, [3.0])
    assert at_seam > elsewhere


def test_audioldm_75_s_vocal_gives_75_s_with_smooth_crossfades() -> None:
    b = tiny("audioldm")
    out = generate_long(b, Request(vocal(75.0), 22050, None, 75.0, seed=3), CFG, steps=2)
    assert len(out) == 75 * b.sample_rate and np.isfinite(out).all() and np.abs(out).max() > 0.1
    seams = seam_times(75.0, CFG.audioldm, "audioldm")
    assert len(seams) == len(window_starts(75.0, CFG.audioldm)) - 1 == 9
    at_seam, elsewhere = seams_within_range(out, b.sample_rate, seams)
    assert at_seam <= elsewhere, f"a seam stands out: flux {at_seam:.1f} > {elsewhere:.1f} anywhere else"


def test_musicgen_continues_each_window_from_the_previous_codes() -> None:
    b = tiny("musicgen")
    duration = 13.0  # 4 windows of 4 s advancing by 3 s
    out = generate_long(b, Request(vocal(duration), 22050, "pop music", duration, seed=3), CFG)
    assert len(out) == duration * b.sample_rate and np.isfinite(out).all() and np.abs(out).max() > 0.1
    seams = seam_times(duration, CFG.musicgen, "musicgen")
    assert seams == [4.0, 7.0, 10.0]
    at_seam, elsewhere = seams_within_range(out, b.sample_rate, seams)
    assert at_seam <= elsewhere, f"a seam stands out: flux {at_seam:.1f} > {elsewhere:.1f} anywhere else"
    # One window of the same song is the first window of the long one: continuation never rewrites what exists.
    first = generate_long(b, Request(vocal(duration), 22050, "pop music", 4.0, seed=3), CFG)
    head = out[: len(first)]
    assert np.corrcoef(head[: 3 * b.sample_rate], first[: 3 * b.sample_rate])[0, 1] > 0.99


def test_past_the_limit_is_a_clear_error() -> None:
    with pytest.raises(TooLongError, match=r"120 s limit \(params.yaml generate.max_duration_s\)"):
        generate_long(tiny("musicgen"), Request(None, 0, "pop", 121.0), CFG)


def test_cli_generate_past_the_limit_exits_1_naming_it(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["generate"]["max_duration_s"] = 30.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    sf.write(tmp_path / "song.wav", vocal(31.0), 22050)
    save_model(tiny("musicgen"), tmp_path / "model")
    res = CliRunner().invoke(app, ["generate", "--checkpoint", str(tmp_path / "model"), "--vocal",
                                   str(tmp_path / "song.wav"), "--duration", "31", "-o", str(tmp_path / "o.wav"),
                                   "--params", str(tmp_path / "params.yaml")])
    assert res.exit_code == 1, res.output
    assert "generate.max_duration_s" in res.output and "Traceback" not in res.output


def test_audioldm_batches_keep_each_requests_own_seed() -> None:
    """The server batches requests of one duration; with AudioLDM each still gets what it would get alone."""
    b = tiny("audioldm")
    reqs = [Request(vocal(6.0), 22050, None, 6.0, seed=1), Request(None, 0, "rock", 6.0, seed=2),
            Request(vocal(6.0), 22050, "pop", 6.0, seed=3)]
    batch = generate_batch(b, reqs, CFG, steps=2)
    alone = generate_long(b, reqs[1], CFG, steps=2)
    assert [len(a) for a in batch] == [6 * b.sample_rate] * 3
    assert np.abs(batch[1] - alone).max() < 1e-3
    assert np.abs(batch[0] - batch[2]).max() > 0.1  # different requests, different audio


class CancelAfter(CancelToken):
    """A token that cancels itself after being asked `checks` times: where generation stops shows how often a
    backend looks (once per window, once per decoding or diffusion step)."""

    def __init__(self, checks: int):
        super().__init__()
        self.asked, self.checks = 0, checks

    @property
    def cancelled(self) -> bool:
        self.asked += 1
        return self.asked > self.checks


@pytest.mark.parametrize("name", ["musicgen", "audioldm"])
def test_a_batch_whose_clients_all_left_stops_within_a_window(name: str) -> None:
    b = tiny(name)
    kept, gone = CancelToken(), CancelAfter(3)
    with pytest.raises(Cancelled):  # asked before the first window, then after its 1st, 2nd and 3rd step: stop
        generate_batch(b, [Request(vocal(12.0), 22050, None, 12.0, seed=1, cancel=gone)], CFG, steps=5)
    assert gone.asked == 4
    other = CancelAfter(3)  # one client still waits: the batch runs to the end for it
    out = generate_batch(b, [Request(None, 0, "Pop", 2.0, seed=1, cancel=other),
                             Request(None, 0, "Pop", 2.0, seed=2, cancel=kept)], CFG, steps=5)
    assert [len(a) for a in out] == [round(2.0 * b.sample_rate)] * 2
    assert other.asked > 3  # asked all along, at least once per step
