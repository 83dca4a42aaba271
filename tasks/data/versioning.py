"""DVC operations behind the prepare-data flow: track raw data, reproduce, version, push and pull.

The data version is a short hash of every DVC-tracked output's content hash (dvc.lock and the raw data's
.dvc file), recorded with the git revision and each backend's test-set fingerprint (segment.py), so any
training run can log exactly which data it saw and any evaluation which test set it scored.
Remotes come from params.yaml (`dvc:`): a local folder by default, or S3 with the endpoint and bucket in
params and the credentials from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or a profile).
They are written to `.dvc/config.local` (git-ignored), never to a committed file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from contextlib import chdir, contextmanager
import sys
from pathlib import Path
from typing import Any

import yaml

from tasks.data.segment import FINGERPRINTS
from v2m.config import DvcConfig
from v2m.errors import UserError

VERSION_FILE = Path(".v2m") / "data_version.json"


@contextmanager
def _repo(root: Path):
    """A DVC Repo with the project as working directory (DVC resolves stage paths against the cwd)."""
    from dvc.repo import Repo
    with chdir(root), Repo(str(root)) as repo:
        yield repo


def _venv_on_path() -> None:
    """dvc.yaml calls `v2m`: make sure the interpreter's own bin folder is on PATH for the stage shells."""
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def track_raw(root: Path, raw_dir: str) -> bool:
    """`dvc add` the raw dataset if it changed; returns True if a new version was recorded."""
    with _repo(root) as repo:
        before = _read_yaml(root / f"{raw_dir}.dvc")
        repo.add(raw_dir)
        return before != _read_yaml(root / f"{raw_dir}.dvc")


def reproduce(root: Path, targets: list[str] | None = None) -> list[str]:
    """`dvc repro [targets]`: run the stages whose deps or params changed (of `targets` and what they need);
    returns the names of those that ran."""
    _venv_on_path()
    with _repo(root) as repo:
        stages = repo.reproduce(targets) if targets else repo.reproduce()
    return [s.addressing for s in stages]


def stage_locks(root: Path, stage: str) -> dict[str, Any]:
    """dvc.lock's entries for `stage` (for a foreach stage, every stage it generated: separate@data/mixes)."""
    lock = _read_yaml(Path(root) / "dvc.lock") or {}
    return {k: v for k, v in lock.get("stages", {}).items() if k == stage or k.startswith(f"{stage}@")}


def adopt_stages(root: Path, cfg: DvcConfig, entries: dict[str, Any]) -> int:
    """Stages another host ran (their dvc.lock entries, their outputs pushed to the remote in `cfg`): record them
    in this dvc.lock and pull their outputs, so `dvc repro` here finds them done. Returns the files fetched."""
    path = Path(root) / "dvc.lock"
    lock = _read_yaml(path) or {"schema": "2.0", "stages": {}}
    lock.setdefault("stages", {}).update(entries)
    path.write_text(yaml.safe_dump(lock, sort_keys=False))
    outs = [out["path"] for entry in entries.values() for out in entry.get("outs", [])]
    configure_remote(root, cfg)
    with _repo(root) as repo:
        return int(repo.pull(targets=outs, force=True)["stats"].get("fetched", 0)) if outs else 0


def check_source(root: Path, data) -> None:
    """The folder the user's data is in must be the one DVC tracks: with `data.mixes` set, the separate stage
    writes data/raw, which an old `data/raw.dvc` (stems added by hand) would also claim."""
    pointer = Path(root) / f"{data.raw_dir}.dvc"
    if data.mixes and pointer.is_file():
        raise UserError(f"{pointer}: {data.raw_dir} is tracked as your stems, but params.yaml data.mixes says the "
                        f"`separate` stage writes it from {data.mixes[0]}. Either set data.mixes: [] (use the stems), "
                        f"or `dvc remove {pointer.name}` (move {data.raw_dir} aside first to keep those stems)")


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _git_revision(root: Path) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def data_version(root: Path) -> dict[str, Any]:
    """Hashes of every DVC-tracked output (dvc.lock and *.dvc files) and the git revision."""
    root = Path(root)
    lock = _read_yaml(root / "dvc.lock")
    if not lock:
        raise FileNotFoundError(f"{root / 'dvc.lock'}: not found; run `dvc repro` (or `v2m data prepare`) first")
    outs: dict[str, str] = {}
    for stage in lock.get("stages", {}).values():
        for out in stage.get("outs", []):
            outs[out["path"]] = out.get("md5", "")
    for dvc_file in sorted(root.glob("data/*.dvc")):
        for out in (_read_yaml(dvc_file) or {}).get("outs", []):
            outs[str(Path(dvc_file.parent.name) / out["path"])] = out.get("md5", "")
    digest = hashlib.sha256(json.dumps(outs, sort_keys=True).encode()).hexdigest()
    fingerprints = root / "data" / "segments" / FINGERPRINTS
    return {"data_version": digest[:12], "git_revision": _git_revision(root), "outputs": outs,
            "test_fingerprint": json.loads(fingerprints.read_text()) if fingerprints.is_file() else {}}


def record_version(root: Path, version: dict[str, Any]) -> Path:
    path = Path(root) / VERSION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(version, indent=2, sort_keys=True))
    return path


def configure_remote(root: Path, cfg: DvcConfig) -> str:
    """Write the remote chosen in params into .dvc/config.local and make it the default."""
    with _repo(root) as repo:
        with repo.config.edit("local") as conf:
            if cfg.remote == "local":
                url = Path(cfg.local_url)
                conf["remote"]["local"] = {"url": str(url if url.is_absolute() else Path(root).resolve() / url)}
            else:
                remote = {"url": cfg.s3.url}
                if cfg.s3.endpoint_url:
                    remote["endpointurl"] = cfg.s3.endpoint_url
                if cfg.s3.profile:
                    remote["profile"] = cfg.s3.profile
                conf["remote"]["s3"] = remote
            conf["core"]["remote"] = cfg.remote
    return cfg.remote


def push(root: Path, cfg: DvcConfig) -> int:
    """Push every tracked output to the configured remote; returns the number of files sent."""
    configure_remote(root, cfg)
    with _repo(root) as repo:
        return int(repo.push() or 0)


def pull(root: Path, cfg: DvcConfig) -> int:
    """Fetch and check out every tracked output; returns the number of files fetched."""
    configure_remote(root, cfg)
    with _repo(root) as repo:
        result = repo.pull(force=True)
    return int(result["stats"].get("fetched", 0))


def dataset_stats(root: Path) -> dict[str, Any]:
    """Counts for the run log: tracks per split, quarantined, hours, chunks per backend."""
    from tasks.data.track_cache import read_jsonl
    root = Path(root)
    tracks = read_jsonl(root / "data/split/tracks.jsonl")
    quarantined = read_jsonl(root / "data/validated/quarantine.jsonl")
    stats: dict[str, Any] = {
        "tracks": len(tracks), "quarantined": len(quarantined),
        "hours": round(sum(t["duration_s"] for t in tracks) / 3600, 4),
        "artists": len({t["artist"] for t in tracks}),
        "splits": {s: sum(t["split"] == s for t in tracks) for s in ("train", "val", "test")},
        "genres": sorted({t["genre"] for t in tracks}),
        "languages": sorted({t["language"] for t in tracks}),
    }
    for backend in ("musicgen", "audioldm"):
        manifest = root / f"data/segments/{backend}.jsonl"
        stats[f"chunks_{backend}"] = len(read_jsonl(manifest)) if manifest.is_file() else 0
    return stats


# --- thin Prefect task wrappers (the flow in flows/prepare_data.py chains these) ---------------------
from prefect import task  # noqa: E402  (kept next to the functions they wrap)

track_raw_task = task(track_raw, name="dvc-add-raw")
reproduce_task = task(reproduce, name="dvc-repro")
data_version_task = task(data_version, name="data-version")
dataset_stats_task = task(dataset_stats, name="dataset-stats")
# Storage and network fail transiently; a push is idempotent, so it may retry.
push_task = task(push, name="dvc-push", retries=2, retry_delay_seconds=5)
