"""Training checkpoints: written atomically, kept locally (and mirrored to S3 when configured).

A checkpoint is a folder `ckpt-<step>/` holding
  model.safetensors   the trainable tensors (full weights or LoRA adapters)
  optimizer.pt        optimizer, LR-scheduler and GradScaler state  } torch.save, read back with weights_only=True
  rng.pt              per training process: the project generator,  }   (tensors and plain numbers only)
                      torch's CPU RNG and every CUDA device's RNG   }
  state.json          step, data position, losses so far
It is written into `ckpt-<step>.tmp/` and renamed into place, so a kill mid-write leaves no half checkpoint.
On S3 the files go under `<uri>/ckpt-<step>/` and the object `<uri>/latest` is written last: it names the
newest complete checkpoint, so a reader never sees a partial one.

Reading puts every tensor on the CPU (map_location): a checkpoint written on cuda:0 would otherwise come back
on cuda:0 in every process of a multi-GPU job (about 10 GiB of optimizer state per extra process at 1.5B), or
not at all on a machine without that device. The caller copies what it needs and drops the rest.
Saving, pruning, uploading and downloading are separate functions: each is one step a caller may schedule
on its own (the trainer uploads in the background, see AsyncUpload).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "ckpt-"
FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")


def _name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save_checkpoint(directory: Path, step: int, model_state: dict[str, torch.Tensor], optim_state: dict,
                    rng_state: dict, state: dict[str, Any], keep: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final, tmp = directory / _name(step), directory / (_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    torch.save(optim_state, tmp / "optimizer.pt")
    torch.save(rng_state, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, sort_keys=True))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    prune_local(directory, keep)
    return final


def prune_local(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete local checkpoints."""
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a .tmp folder is an interrupted write and is ignored)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and not p.name.endswith(".tmp") and _complete(p))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Everything in a checkpoint, on the CPU whatever device wrote it. The optimizer file is memory-mapped:
    the processes of one host share its pages instead of each reading its own copy."""
    return {"model": load_file(str(path / "model.safetensors"), device="cpu"),
            "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True),
            "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
            "state": json.loads((path / "state.json").read_text())}


# --- S3 mirror ---------------------------------------------------------------------------------------

def _split(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def upload_checkpoint(path: Path, uri: str) -> None:
    from models.weights import s3_client
    client, (bucket, prefix) = s3_client(), _split(uri)
    for f in FILES:
        client.upload_file(str(path / f), bucket, f"{prefix}/{path.name}/{f}")
    client.put_object(Bucket=bucket, Key=f"{prefix}/latest", Body=path.name.encode())


def download_latest(uri: str, directory: Path) -> Path | None:
    """Fetch the newest complete checkpoint named by `<uri>/latest` into `directory`; None if there is none.
    Call it from one process per host (trainer.resume_point): the temporary folder is this process's own, and a
    copy that another process (another host on a shared disk) finished first is kept."""
    from botocore.exceptions import ClientError

    from models.weights import s3_client
    client, (bucket, prefix) = s3_client(), _split(uri)
    try:
        name = client.get_object(Bucket=bucket, Key=f"{prefix}/latest")["Body"].read().decode().strip()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    local = directory / name
    if _complete(local):
        return local
    tmp = directory / f"{name}.{socket.gethostname()}-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in FILES:
            client.download_file(bucket, f"{prefix}/{name}/{f}", str(tmp / f))
        if local.exists() and not _complete(local):  # an interrupted copy from before
            shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
    except OSError:
        if not _complete(local):  # not another process's finished copy: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def _complete(path: Path) -> bool:
    return path.is_dir() and all((path / f).exists() for f in FILES)


def latest_local(directory: Path) -> Path | None:
    local = list_checkpoints(directory)
    return local[-1] if local else None


class AsyncUpload:
    """Uploads one checkpoint at a time in a background thread, so that training goes on meanwhile.

    wait() returns when the previous upload is done (and raises its error): call it before writing the next
    checkpoint (whose pruning may delete the folder being uploaded) and before the run ends."""

    def __init__(self, uri: str):
        self.uri = uri
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, path: Path) -> None:
        self.wait()

        def run() -> None:
            try:
                upload_checkpoint(path, self.uri)
            except BaseException as exc:  # handed to the training thread at wait()
                self._error = exc
        self._thread = threading.Thread(target=run, name=f"upload-{path.name}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"checkpoint upload to {self.uri} failed: {error}") from error
