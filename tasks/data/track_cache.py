"""Per-track, content-addressed work cache shared by the per-track data stages.

(The unit is whatever a stage makes records of: a track, or for normalize one stem of a track.)

DVC skips a stage whose inputs did not change, but when one track of hundreds changes the whole stage
reruns. Each stage therefore keeps, inside its own (DVC `persist: true`) output folder, one small JSON
file per track: the key the track was last processed under and the record it produced. On a re-run a
track is processed again only if its key changed (new audio, new metadata, new stage params or a new
version of the stage's code) or one of its output files is gone; tracks that left the input are removed.

Work runs in a process pool; `fn(record) -> record` must be a picklable top-level function
(use functools.partial to bind configuration).
"""

from __future__ import annotations

import ast
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from v2m import numba_cache
from v2m.errors import UserError

CACHE_DIR = ".cache"


class StageError(UserError, RuntimeError):
    """Some tracks failed in a stage; the message lists each track and its error."""


@dataclass
class StageStats:
    """What a stage run did: counted, so tests and benchmarks check work rather than time."""

    stage: str
    processed: int = 0
    reused: int = 0
    removed: int = 0
    failed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "processed": self.processed, "reused": self.reused,
                "removed": self.removed, "failed": self.failed}


_POOLS: dict[int, ProcessPoolExecutor] = {}
THREADED_LIBRARIES = {"torch", "numba", "prefect", "mlflow"}


def _pool(n_workers: int) -> ProcessPoolExecutor:
    """One pool per size, kept for the process's life, so stages run back to back share their workers.

    A worker pool is forked while this process is still plain (the `v2m data <stage>` commands dvc.yaml
    runs): workers inherit the imported modules and start in milliseconds. Once a library that runs its
    own threads is loaded (torch, numba through librosa, Prefect, MLflow), a forked child could inherit a
    lock held by one of those threads and hang; then the pool uses a fork server (a fresh single-threaded
    process that forks the workers), which costs about a second to start. A broken pool is replaced.
    """
    pool = _POOLS.get(n_workers)
    if pool is None or getattr(pool, "_broken", False):
        pool = _POOLS[n_workers] = ProcessPoolExecutor(n_workers, mp_context=safe_context(),
                                                        initializer=numba_cache.worker_init)
    return pool


def safe_context() -> mp.context.BaseContext:
    """`fork` while this process is plain, else a fork server (see _pool): a thread of our own (a database
    driver's, a server fixture's) can hold a lock at the fork as well as a library's can."""
    threaded = THREADED_LIBRARIES & sys.modules.keys() or threading.active_count() > 1
    return mp.get_context("forkserver" if threaded else "fork")


def entry_name(track_id: str) -> str:
    """The cache file of a record. Ids come from the data (metadata.csv, folder names) and may be hostile
    (`..`, absolute paths, NUL, 300 characters): only a hash of the id ever becomes a file name."""
    return hashlib.sha256(track_id.encode("utf-8", "surrogatepass")).hexdigest()[:32] + ".json"


def confined(base: Path, *parts: str) -> Path:
    """`base/parts...`, refusing any part that could leave `base` (separators, `..`, NUL, absolute)."""
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part or len(part) > 255:
            raise StageError(f"{base}: refusing to write under the name {part[:80]!r}: not a plain file name")
    path = Path(base).joinpath(*parts)
    if not path.resolve().is_relative_to(Path(base).resolve()):
        raise StageError(f"{path}: resolves outside {base}")
    return path


def cache_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


PROJECT = Path(__file__).resolve().parents[2]
PACKAGES = ("v2m", "tasks", "flows", "models")
# Modules that only declare settings, errors or process set-up: what they mean for an output reaches the
# cache keys as the settings' values, so editing them (a new params section, say) re-does nothing.
NOT_CODE = {"v2m/__init__.py", "tasks/__init__.py", "flows/__init__.py", "v2m/config.py", "v2m/config_base.py", "v2m/config_musicgen.py",
            "v2m/config_audioldm.py", "v2m/config_train.py", "v2m/config_listening.py", "v2m/config_serve.py",
            "v2m/config_separate.py", "v2m/errors.py", "v2m/numba_cache.py"}


def module_closure(*files: str | Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """The project source files that `files` run: themselves plus every project module they import,
    directly or through others (imports inside functions count), minus NOT_CODE and paths starting with
    one of `exclude`. This is what a stage's output depends on, so it is what its cache key hashes and
    what dvc.yaml lists as the stage's code deps (tests/code/test_dvc_deps.py checks they agree)."""
    seen: set[Path] = set()
    todo = [Path(f).resolve() for f in files]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] not in PACKAGES:
                    continue
                module = PROJECT / name.replace(".", "/")
                for target in (module.with_suffix(".py"), module / "__init__.py"):  # a module, or a package
                    if target.is_file():
                        todo.append(target)
    rel = sorted(p.relative_to(PROJECT).as_posix() for p in seen)
    return [PROJECT / r for r in rel if r not in NOT_CODE and not r.startswith(exclude)]


def code_version(*files: str | Path) -> str:
    """Hash of the source files a stage runs (pass module_closure(...)), so editing the code invalidates its cache."""
    h = hashlib.sha256()
    project = Path(__file__).resolve().parents[2]
    for f in sorted(map(Path, files)):
        # renaming or moving a file is a change too; where the checkout lives is not (a clone on another host
        # must find the same run key, and with it the run's checkpoints)
        name = f.resolve().relative_to(project) if f.resolve().is_relative_to(project) else f
        h.update(name.as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def _outputs_exist(result: dict[str, Any]) -> bool:
    return all(Path(p).exists() for p in result.get("outputs", []))


def _remove_outputs(result: dict[str, Any], out_dir: Path) -> None:
    for p in map(Path, result.get("outputs", [])):
        if not p.resolve().is_relative_to(out_dir.resolve()):
            continue  # only ever delete inside this stage's own output
        p.unlink(missing_ok=True)
        if p.parent.is_dir() and not any(p.parent.iterdir()):
            p.parent.rmdir()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)


def run_per_track(
    stage: str,
    records: Sequence[dict[str, Any]],
    key_fn: Callable[[dict[str, Any]], str],
    fn: Callable[[dict[str, Any]], dict[str, Any]] | None,
    out_dir: Path,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    batch_fn: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
    batch_size: int = 1,
) -> tuple[list[dict[str, Any]], StageStats]:
    """Apply `fn` to every record whose key changed; reuse cached results for the rest.

    `batch_fn` (in this process): up to `batch_size` changed records at a time instead of `fn` one by one,
    for work that runs faster batched (a model on a GPU).

    Each result lists the files it wrote under "outputs"; they (and a folder `out_dir/<track_id>/`)
    are deleted when the track disappears from the input.
    """
    out_dir = Path(out_dir)
    cache = out_dir / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    stats = StageStats(stage)
    results: dict[str, dict[str, Any]] = {}
    todo: list[tuple[dict[str, Any], str]] = []

    for rec in records:
        key = key_fn(rec)
        entry_path = cache / entry_name(rec["track_id"])
        if entry_path.exists():
            entry = json.loads(entry_path.read_text())
            if entry.get("key") == key and _outputs_exist(entry["result"]):
                results[rec["track_id"]] = entry["result"]
                stats.reused += 1
                continue
        todo.append((rec, key))

    # Tracks that left the input: drop their outputs and cache entries.
    wanted = {entry_name(r["track_id"]) for r in records}
    for entry_path in cache.glob("*.json"):
        if entry_path.name not in wanted:
            entry = json.loads(entry_path.read_text())
            _remove_outputs(entry["result"], out_dir)
            try:
                shutil.rmtree(confined(out_dir, entry.get("track_id", entry_path.stem)), ignore_errors=True)
            except StageError:
                pass  # an id that was never a folder name never got a folder
            entry_path.unlink()
            stats.removed += 1

    done = len(results)
    if progress:
        progress(done, len(records))
    n_workers = min(resolve_workers(workers), max(1, len(todo)))

    def _finish(rec: dict[str, Any], key: str, result: dict[str, Any]) -> None:
        nonlocal done
        results[rec["track_id"]] = result
        _write_json_atomic(cache / entry_name(rec["track_id"]), {"key": key, "track_id": rec["track_id"], "result": result})
        stats.processed += 1
        done += 1
        if progress:
            progress(done, len(records))

    errors: list[str] = []
    if batch_fn is not None:
        for start in range(0, len(todo), batch_size):
            group = todo[start:start + batch_size]
            try:
                outs = batch_fn([rec for rec, _ in group])
            except Exception as exc:  # keep going: finished batches stay cached
                errors += [f"{rec['track_id']}: {exc}" for rec, _ in group]
                continue
            for (rec, key), result in zip(group, outs):
                _finish(rec, key, result)
    elif n_workers <= 1:
        for rec, key in todo:
            try:
                _finish(rec, key, fn(rec))
            except Exception as exc:  # keep going: finished tracks stay cached
                errors.append(f"{rec['track_id']}: {exc}")
    else:
        pool = _pool(n_workers)
        futures = {pool.submit(fn, rec): (rec, key) for rec, key in todo}
        for fut in as_completed(futures):
            rec, key = futures[fut]
            try:
                _finish(rec, key, fut.result())
            except Exception as exc:
                errors.append(f"{rec['track_id']}: {exc}")
    if errors:
        stats.failed = sorted(errors)
        raise StageError(f"stage {stage}: {len(errors)} track(s) failed (the others are cached):\n  "
                         + "\n  ".join(stats.failed))

    ordered = [results[r["track_id"]] for r in records]
    return ordered, stats


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a JSONL file from the previous stage; run it first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    os.replace(tmp, path)


def write_stats(out_dir: str | Path, stats: StageStats, **extra: Any) -> None:
    _write_json_atomic(Path(out_dir) / "stats.json", {**stats.as_dict(), **extra})
