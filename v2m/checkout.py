"""A worker host's checkouts of the team's repository: one folder per commit, reused by every flow run of it.

Team mode runs each step as a flow run on some worker. Its pull step (flows/deploy.py `pull_steps`, and
prefect.yaml) runs `python -m v2m.checkout --repository URL (--branch B | --commit C)`, which prints the folder
the flow run then works in:

    <cache>/<commit>/   a clone checked out at that commit, made once per host: cloned into a temporary
                        folder, then renamed into place (atomic), so two runs starting together never see half
                        a checkout and the loser of the race just uses the winner's

The runs of one commit on one host share its folder, and with it what earlier runs fetched there: the DVC cache
and pulled data (a step pulls only what it lacks), local checkpoints. Their DVC work in it is serialised per
folder (tasks/handoff.py `workspace_lock`). A branch is resolved to its head at run start (git ls-remote), so a
new commit gets a new folder and a running flow never sees its code change underneath it.

<cache> is $V2M_CHECKOUT_CACHE (`v2m stack worker` sets <worker folder>/checkouts), else
~/.cache/voice2music/checkouts. Only the standard library and git: this runs before the commit's code is on
the path, in a process of its own (a pull step that imported the project here would shadow the commit's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = Path(".git") / "v2m-checkout"  # inside .git: the working tree stays clean


def default_cache() -> Path:
    env = os.environ.get("V2M_CHECKOUT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "voice2music" / "checkouts"


def _git(*args: str, cwd: Path | None = None) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {res.stderr.strip()[-1000:]}")
    return res.stdout.strip()


def head_commit(repository: str, branch: str) -> str:
    """The commit a branch points at now, without cloning."""
    line = _git("ls-remote", repository, f"refs/heads/{branch}")
    if not line:
        raise RuntimeError(f"{repository}: no branch {branch!r} (orchestration.code.branch in params.yaml)")
    return line.split()[0]


def checkout(repository: str, branch: str = "main", commit: str = "", cache: Path | None = None) -> tuple[Path, bool]:
    """The folder holding `repository` at `commit` (or at the head of `branch`); (folder, True if made now)."""
    cache = Path(cache or default_cache())
    commit = commit or head_commit(repository, branch)
    folder = cache / commit
    if (folder / MARKER).is_file():
        return folder, False
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{commit[:12]}-", dir=cache))
    try:
        _git("clone", "--quiet", "--no-checkout", repository, str(tmp))
        _git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit, cwd=tmp)
        (tmp / MARKER).write_text(f"{repository} {commit}\n")
        try:
            os.rename(tmp, folder)  # atomic; fails if another run put the same commit in place first
        except OSError:
            if not (folder / MARKER).is_file():
                raise
            return folder, False
        return folder, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m v2m.checkout", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", required=True)
    ap.add_argument("--branch", default="main")
    ap.add_argument("--commit", default="", help="a pinned commit (else the branch's head)")
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    folder, made = checkout(args.repository, args.branch, args.commit, args.cache)
    print(f"checkout {folder.name[:12]}: {'cloned' if made else 'reused'} in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    print(folder)  # the only line on stdout: the pull step's result
    return 0


if __name__ == "__main__":
    sys.exit(main())
