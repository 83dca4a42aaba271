"""Data between hosts in team mode, through the DVC S3 remote only (no shared disk).

The CPU host that prepared the data pushes every DVC output and publishes the small files that name them
(dvc.lock, data/*.dvc, the data version record) under `<remote bucket>/versions/<data_version>/`. A step on
another host checks out exactly that version: it fetches those files, then `dvc pull`s only the outputs it
reads (a fine-tune: its backend's cached model inputs, not the raw audio).

The flow runs of one commit on one host share that host's checkout (v2m/checkout.py): what one pulled, the
next finds. Their DVC work there is serialised by `workspace_lock`.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from v2m.config import DvcConfig, Params
from v2m.errors import UserError

VERSION_FILES = ("dvc.lock", ".v2m/data_version.json")  # plus every data/*.dvc


class DataVersionError(UserError, ValueError):
    """The data version asked for was never published, or the remote is not S3."""


@contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    """One flow run at a time does DVC work (pull, repro, push) in a checkout that several share. A lock on a
    local folder for that folder only (the kernel drops it when its holder exits or dies); it decides nothing
    between hosts."""
    path = Path(root) / ".v2m" / "workspace.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _remote(params: Params) -> tuple[DvcConfig, str, str]:
    """The DVC config with the S3 endpoint from the environment when params leave it empty, the bucket and
    the prefix under which versions are published."""
    cfg = params.dvc
    if cfg.remote != "s3":
        raise DataVersionError("params.yaml dvc.remote: team mode moves data through S3; set it to s3 "
                               "(and dvc.s3.url to a bucket every host can reach)")
    endpoint = cfg.s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")
    cfg = cfg.model_copy(update={"s3": cfg.s3.model_copy(update={"endpoint_url": endpoint})})
    bucket, _, prefix = cfg.s3.url.removeprefix("s3://").partition("/")
    return cfg, bucket, (prefix.strip("/") + "/versions").lstrip("/")


def _client():
    from models.weights import s3_client
    return s3_client()


def publish(root: Path, params: Params, data_version: str) -> dict[str, Any]:
    """dvc push every output, then upload the files naming this version; returns files and bytes sent."""
    from tasks.data.versioning import push
    cfg, bucket, prefix = _remote(params)
    pushed = push(root, cfg)
    client, sent = _client(), 0
    for rel in [*VERSION_FILES, *(str(p.relative_to(root)) for p in sorted(root.glob("data/*.dvc")))]:
        client.upload_file(str(root / rel), bucket, f"{prefix}/{data_version}/{rel}")
        sent += (root / rel).stat().st_size
    return {"pushed_files": pushed, "version_bytes": sent}


def pull_raw(root: Path, params: Params) -> int:
    """The raw data at the revision this clone names (data/raw.dvc, committed by whoever added the data)."""
    from tasks.data.versioning import _repo, configure_remote
    pointer = root / f"{params.data.input_dir}.dvc"  # data/raw, or the songs (data.mixes) separate splits
    if not pointer.is_file():
        raise DataVersionError(f"{pointer.relative_to(root)}: not in the repository; the data owner adds the raw "
                               f"data once with `dvc add {params.data.input_dir}`, commits the .dvc file and `dvc push`es")
    configure_remote(root, _remote(params)[0])
    with _repo(root) as repo:
        return int(repo.pull(targets=[str(pointer.relative_to(root))], force=True)["stats"].get("fetched", 0))


def checkout(root: Path, params: Params, data_version: str, targets: list[str]) -> dict[str, Any]:
    """Make `root` hold data version `data_version` for `targets` (DVC outputs, e.g. data/cache/musicgen)."""
    with workspace_lock(root):
        return _checkout(root, params, data_version, targets)


def _checkout(root: Path, params: Params, data_version: str, targets: list[str]) -> dict[str, Any]:
    from botocore.exceptions import ClientError

    from tasks.data.versioning import _repo, configure_remote
    cfg, bucket, prefix = _remote(params)
    client = _client()
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{data_version}/").get("Contents", [])
    if not listing:
        raise DataVersionError(f"data version {data_version}: not published under s3://{bucket}/{prefix}/; "
                               f"run prepare-data in team mode (it pushes and publishes) first")
    for obj in listing:
        dest = root / obj["Key"].removeprefix(f"{prefix}/{data_version}/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            client.download_file(bucket, obj["Key"], str(dest))
        except ClientError as exc:
            raise DataVersionError(f"s3://{bucket}/{obj['Key']}: {exc}") from exc
    configure_remote(root, cfg)
    with _repo(root) as repo:
        repo.pull(targets=targets, force=True)
    size = sum(p.stat().st_size for t in map(root.joinpath, targets)
               for p in ([t] if t.is_file() else t.rglob("*")) if p.is_file())
    recorded = json.loads((root / ".v2m" / "data_version.json").read_text())["data_version"]
    if recorded != data_version:
        raise DataVersionError(f"s3://{bucket}/{prefix}/{data_version}/ holds data version {recorded}")
    return {"data_version": data_version, "targets": targets, "bytes": size}
