"""A worker host's checkouts (v2m/checkout.py): one folder per commit, made once even when runs start together,
reused afterwards; a branch that moved gets a new folder and the old one stays as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from v2m.checkout import checkout

ROOT = Path(__file__).resolve().parents[2]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    git(src, "init", "-q", "-b", "main")
    (src / "code.py").write_text("VERSION = 1\n")
    git(src, "add", "-A")
    git(src, "commit", "-qm", "one")
    return src


def test_runs_starting_together_share_one_checkout_of_the_commit(repo: Path, tmp_path: Path) -> None:
    cache = tmp_path / "host" / "checkouts"
    cmd = [sys.executable, "-m", "v2m.checkout", "--repository", str(repo), "--branch", "main"]
    env = {**os.environ, "V2M_CHECKOUT_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    folders = {out.strip() for out, _ in outs}  # stdout holds the folder and nothing else
    assert folders == {str(cache / git(repo, "rev-parse", "HEAD"))}
    assert sum("cloned" in err for _, err in outs) >= 1 and all("in " in err for _, err in outs)
    assert [p.name for p in cache.iterdir()] == [git(repo, "rev-parse", "HEAD")]  # no half-made leftovers
    folder, made = checkout(str(repo), "main", cache=cache)  # a later run reuses it
    assert not made and (folder / "code.py").read_text() == "VERSION = 1\n"


def test_a_new_commit_gets_its_own_folder_and_a_pinned_commit_stays(repo: Path, tmp_path: Path) -> None:
    cache = tmp_path / "checkouts"
    first, _ = checkout(str(repo), "main", cache=cache)
    one = git(repo, "rev-parse", "HEAD")
    (repo / "code.py").write_text("VERSION = 2\n")
    git(repo, "commit", "-qam", "two")
    second, made = checkout(str(repo), "main", cache=cache)
    assert made and second != first and (second / "code.py").read_text() == "VERSION = 2\n"
    assert (first / "code.py").read_text() == "VERSION = 1\n"  # a run still working there is undisturbed
    pinned, made = checkout(str(repo), commit=one, cache=cache)
    assert pinned == first and not made
    assert git(second, "status", "--porcelain") == ""  # the marker lives in .git: the tree is clean
    with pytest.raises(RuntimeError, match="no branch 'nope'"):
        checkout(str(repo), "nope", cache=cache)
