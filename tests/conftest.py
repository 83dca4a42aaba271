"""Shared fixtures: small synthetic datasets in the raw layout, and a scratch copy of the project."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

# `make test` runs three pytest-xdist workers (Makefile): each gets its own Prefect home (before anything imports
# Prefect), so their temporary Prefect servers never share one SQLite database.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PREFECT_HOME"):
    os.environ["PREFECT_HOME"] = f"{os.environ['PREFECT_HOME']}-{os.environ['PYTEST_XDIST_WORKER']}"

# One intra-op thread per process, set before numpy and torch load their thread pools. `make test` runs
# xdist workers on 2 cores, and the tests start servers, CLIs and flow runs beside them. By default every
# process has a thread per core, so the cores are oversubscribed, and OpenMP's threads spin while they wait.
# Before this, the full suite at -n 3 ran the retrain e2e test in 552 s against 201 s with -n 2;
# bench/gpu_acceptance.py saw 3-30x on 2 busy cores. The variables are inherited by every subprocess a test starts.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np
import pytest
import soundfile as sf

from v2m.config import ChunkConfig, Params, SegmentConfig, load_params

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# dvc.yaml calls `v2m`: the stage shells must find this interpreter's scripts.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]

COLUMNS = ["track_id", "artist", "title", "genre", "bpm", "key", "mood", "language"]


def synth_stems(seed: int, seconds: float, sr: int, bpm: float = 120.0) -> tuple[np.ndarray, np.ndarray]:
    """A sung-like melody (notes with short rests) and an accompaniment (chord tones + beat clicks).

    Both carry the same time-varying pitch pattern, so a misaligned vocal/instrumental pair is detectable.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    beat = 60.0 / bpm
    scale = np.array([0, 2, 4, 5, 7, 9, 11, 12]) + 60 + int(rng.integers(0, 5))
    notes = rng.choice(scale, size=int(seconds / beat) + 1)
    idx = np.minimum((t / beat).astype(int), len(notes) - 1)
    f0 = 440.0 * 2 ** ((notes[idx] - 69) / 12)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    gate = ((t % beat) < 0.85 * beat).astype(np.float32)  # short rest at the end of each note
    vocal = 0.3 * gate * (np.sin(phase) + 0.3 * np.sin(2 * phase))
    inst = 0.2 * (np.sin(phase / 2) + np.sin(phase * 2 ** (-5 / 12)) + np.sin(phase * 2 ** (-8 / 12)))
    click = np.zeros(n)
    click[(np.arange(0, seconds, beat) * sr).astype(int)] = 1.0
    inst = inst + np.convolve(click, np.exp(-np.arange(int(0.03 * sr)) / (0.005 * sr)), mode="same")
    return vocal.astype(np.float32), (0.5 * inst).astype(np.float32)


def write_track(root: Path, track_id: str, seed: int, seconds: float = 12.0, sr: int = 22050,
                fmt: str = "wav", bpm: float = 120.0) -> None:
    vocal, inst = synth_stems(seed, seconds, sr, bpm)
    d = root / track_id
    d.mkdir(parents=True, exist_ok=True)
    sf.write(d / f"vocals.{fmt}", vocal, sr)
    sf.write(d / f"instrumental.{fmt}", inst, sr)


def write_metadata(root: Path, rows: list[dict]) -> None:
    with (root / "metadata.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})


def make_dataset(root: Path, n_tracks: int = 6, n_artists: int = 3, seconds: float = 12.0) -> list[dict]:
    """n_tracks synthetic tracks spread over n_artists, genres and languages; half without bpm/key."""
    genres, langs = ["pop", "rock", "disco"], ["en", "fr", "ar"]
    rows = []
    for i in range(n_tracks):
        tid = f"t{i:02d}"
        bpm = 100.0 + 10 * (i % 3)
        write_track(root, tid, seed=i, seconds=seconds, bpm=bpm)
        rows.append({"track_id": tid, "artist": f"artist_{i % n_artists}", "title": f"song {i}",
                     "genre": genres[i % 3], "language": langs[(i % n_artists) % 3], "mood": "calm",
                     "bpm": "" if i % 2 else f"{bpm:g}", "key": "" if i % 2 else "C major"})
    write_metadata(root, rows)
    return rows


def small_params() -> Params:
    """The project's params with chunk lengths that fit the 12 s synthetic tracks, and 2 workers."""
    p = load_params(ROOT / "params.yaml")
    seg = SegmentConfig(musicgen=ChunkConfig(chunk_s=4.0, hop_s=4.0, min_chunk_s=2.0),
                        audioldm=ChunkConfig(chunk_s=3.0, hop_s=3.0, min_chunk_s=2.0),
                        vocal_active_dbfs=p.data.segment.vocal_active_dbfs,
                        min_vocal_active=p.data.segment.min_vocal_active)
    data = p.data.model_copy(update={"segment": seg})
    return p.model_copy(update={"data": data, "workers": 2})


@pytest.fixture
def raw_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    make_dataset(root)
    return root


def run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch git + DVC project: this repo's dvc.yaml and code, small params, a synthetic dataset."""
    proj = tmp_path / "project"
    proj.mkdir()
    shutil.copy(ROOT / "dvc.yaml", proj)
    for pkg in ("tasks", "v2m", "models"):  # dvc.yaml lists code files as deps
        shutil.copytree(ROOT / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "params.yaml").read_text()
    text = (text.replace("musicgen: {chunk_s: 30.0, hop_s: 30.0, min_chunk_s: 10.0}",
                         "musicgen: {chunk_s: 4.0, hop_s: 4.0, min_chunk_s: 2.0}")
                .replace("audioldm: {chunk_s: 20.0, hop_s: 20.0, min_chunk_s: 10.0}",
                         "audioldm: {chunk_s: 3.0, hop_s: 3.0, min_chunk_s: 2.0}"))
    assert "chunk_s: 4.0" in text and "chunk_s: 3.0" in text, "params.yaml segment lines changed"
    (proj / "params.yaml").write_text(text)
    make_dataset(proj / "data" / "raw")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        res = run(cmd, proj)
        assert res.returncode == 0, res.stderr
    return proj


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A private PostgreSQL (v2m/postgres.py) for the session; each test that needs one makes its own database.
    Without PostgreSQL's server programs this fails (never skips): the team's vote store must be tested."""
    import secrets

    from v2m.postgres import PrivatePostgres
    with PrivatePostgres(tmp_path_factory.mktemp("postgres"), password=secrets.token_urlsafe(18),
                         durable=False) as pg:
        yield pg


# The files that take minutes, longest first (`make test`'s durations): run first, so that the xdist workers
# (one file at a time each, --dist loadfile) end together instead of one finishing a long file alone at the end.
# The Makefile passes --no-loadscope-reorder: xdist otherwise orders files by their number of tests (the one-test
# team e2e then started last, after 22 minutes).
SLOW_FIRST = ["flows/test_team_e2e.py", "flows/test_retrain.py", "flows/test_team_gpus.py", "flows/test_team_hosts.py",
              "flows/test_rollout.py", "model/test_listening_page.py", "flows/test_week_two.py",
              "data/test_separate.py", "data/test_dvc.py", "flows/test_team_stack.py", "data/test_numba_cache.py",
              "model/test_metrics_separated.py", "model/test_distributed.py", "model/test_data_parallel.py"]


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0].removeprefix("tests/"), len(rank)))


def pytest_sessionfinish(session, exitstatus) -> None:
    """Prefect's temporary server logs its stop at interpreter exit, after pytest closed the captured streams
    (a 'Logging error' traceback under the summary of every run): the `prefect` logger keeps only warnings then."""
    import logging
    logging.getLogger("prefect").setLevel(logging.WARNING)
