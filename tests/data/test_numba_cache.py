"""The numba cache race (wave 2): parallel workers compiling librosa's kernels from a cold cache must not leave
a cache that crashes later processes. Runs the real `v2m data label` command as separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.data.normalize import normalize_dataset
from tasks.data.validate import validate_dataset
from tests.conftest import ROOT, make_dataset, small_params


def test_label_stage_with_two_workers_from_a_cold_numba_cache_then_three_more_runs(tmp_path: Path) -> None:
    p = small_params()
    make_dataset(tmp_path / "raw", n_tracks=4, n_artists=2, seconds=8.0)
    validate_dataset(tmp_path / "raw", tmp_path / "validated", p.data.validate_, workers=1)
    normalize_dataset(tmp_path / "validated", tmp_path / "normalized", p.data.normalize, workers=1)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["workers"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cold = tmp_path / "numba"  # an empty cache base: every kernel is compiled by these runs
    env = {**os.environ, "V2M_NUMBA_CACHE_DIR": str(cold), "PYTHONFAULTHANDLER": "1"}
    env.pop("NUMBA_CACHE_DIR", None)
    for i in range(4):  # each run relabels every track (a new output folder), so librosa runs every time
        res = subprocess.run([sys.executable, "-m", "v2m.cli", "data", "label", str(tmp_path / "normalized"),
                              "--out", str(tmp_path / f"labelled-{i}"), "--params", str(tmp_path / "params.yaml")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"run {i}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
        assert (tmp_path / f"labelled-{i}" / "tracks.jsonl").read_text().count("\n") == 4
    # The two workers compiled into slots of their own (the command's own process runs no librosa code).
    compiled = [d for d in cold.iterdir() if d.is_dir() and any(d.rglob("*.nbc"))]
    assert len(compiled) == 2, sorted(d.name for d in cold.iterdir())


# Mixed float32/float64 inputs make concurrent processes compile different specialisations of the same
# kernels: with one shared cold cache this left files that crashed later processes (reproduced: segfaults in
# the two processes that ran after four concurrent ones).
LIBROSA_JOB = """
import sys
import v2m  # noqa: F401  (what every entry point of the project does first)
import numpy as np, librosa
i = int(sys.argv[1])
y = (0.1 * np.random.default_rng(i).standard_normal(16000 * 2)).astype(np.float32 if i % 2 else np.float64)
librosa.feature.chroma_cqt(y=y, sr=16000)
librosa.onset.onset_strength(y=y, sr=16000)
print("ok")
"""


def test_concurrent_cold_compiles_leave_a_cache_later_processes_can_load(tmp_path: Path) -> None:
    env = {**os.environ, "V2M_NUMBA_CACHE_DIR": str(tmp_path / "numba"), "PYTHONFAULTHANDLER": "1"}
    env.pop("NUMBA_CACHE_DIR", None)
    cmd = [sys.executable, "-c", LIBROSA_JOB]
    first = [subprocess.Popen([*cmd, str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in first]
    later = [subprocess.run([*cmd, str(i)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
             for i in (4, 5)]
    results += [(r.stdout, r.stderr, r.returncode) for r in later]
    for out, err, rc in results:
        assert rc == 0 and out.strip() == "ok", err[-3000:]


def test_each_live_process_claims_a_different_slot_and_a_fork_gets_its_own(tmp_path: Path) -> None:
    env = {**os.environ, "V2M_NUMBA_CACHE_DIR": str(tmp_path)}
    # Each process forks a child; all four stay alive (blocked on stdin) until every slot has been read.
    script = ("import os, sys, v2m\n"
              "from v2m import numba_cache\n"
              "print(os.environ['NUMBA_CACHE_DIR'], flush=True)\n"
              "r, w = os.pipe()\n"
              "if os.fork() == 0:\n"
              "    os.write(w, str(numba_cache.claim()).encode()); sys.stdin.read(); os._exit(0)\n"
              "print(os.read(r, 1000).decode(), flush=True)\n"
              "sys.stdin.read(); os.wait()\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        claimed = [p.stdout.readline().strip() for p in procs] + [p.stdout.readline().strip() for p in procs]
    finally:
        for p in procs:
            p.communicate("", timeout=60)
    assert len(set(claimed)) == 4, claimed  # two processes and their forked children: four distinct slots
    assert all(Path(c).parent == tmp_path for c in claimed)
    # Their locks died with them: the next process gets the first slot again, warm.
    again = subprocess.run([sys.executable, "-c", "import os, v2m; print(os.environ['NUMBA_CACHE_DIR'])"],
                           cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert again.stdout.strip() == str(tmp_path / "slot-0")
