"""One numba cache folder per live process, so no two processes ever write the same cache at once.

Why: librosa compiles its kernels with numba `cache=True`. numba's on-disk cache is not safe for concurrent
writers: when several pool workers compile the same kernels from a cold cache, each rewrites the index file
(`*.nbi`) and numbers its own `*.nbc` entries, and the files they leave can disagree. Every later process that
loads such a cache segfaults (seen in wave 2: `make demo` died in the `label` stage after the demo builder's
workers had compiled the kernels in parallel).

The fix does not depend on timing: every process that imports `v2m` (the CLI, DVC's stage commands, pool
workers, Prefect workers, tests) claims the first *slot* folder `<base>/slot-<k>` whose lock file it can lock
exclusively, and points NUMBA_CACHE_DIR there before numba is imported. The lock (fcntl.flock) lives as long
as the process and is released by the kernel when it exits, even on a crash. A slot is therefore written by
one process at a time, and stays warm for the next process that gets it: a fresh machine compiles each kernel
once per slot, not once per process.

The base folder is `$V2M_NUMBA_CACHE_DIR`, else `$XDG_CACHE_HOME/voice2music/numba` (`~/.cache/...`): compiled
code depends on the installed packages, not on a project, so every project on the host shares it.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from pathlib import Path

_claim: tuple[int, int, Path] | None = None  # (pid, lock fd, slot folder) of this process


def base_dir() -> Path:
    env = os.environ.get("V2M_NUMBA_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "voice2music" / "numba"


def claim() -> Path:
    """Point this process's numba cache at a slot no other live process holds, and return the slot.
    Idempotent per process; a forked child (same module state, new pid) claims its own slot."""
    global _claim
    pid = os.getpid()
    if _claim is not None and _claim[0] == pid:
        return _claim[2]
    if _claim is not None:  # forked: the parent's descriptor is shared with the parent; leave it be
        _claim = None
    try:
        base = base_dir()
        base.mkdir(parents=True, exist_ok=True)
        k = 0
        while True:
            fd = os.open(base / f"slot-{k}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                os.close(fd)
                k += 1
        slot = base / f"slot-{k}"
        slot.mkdir(exist_ok=True)
    except OSError:  # no writable cache home: a private folder, cold but never shared
        fd, slot = -1, Path(tempfile.mkdtemp(prefix="v2m-numba-"))
    _claim = (pid, fd, slot)
    os.environ["NUMBA_CACHE_DIR"] = str(slot)  # read by numba at import, and inherited by child processes
    config = sys.modules.get("numba.core.config")
    if config is not None:
        # numba was imported before us (a script that imported librosa first): functions it already
        # decorated keep their cache folder; ones decorated from now on use the slot.
        config.CACHE_DIR = str(slot)
    return slot


def worker_init() -> None:
    """ProcessPoolExecutor initializer: a worker claims its own slot before any task imports librosa."""
    claim()
