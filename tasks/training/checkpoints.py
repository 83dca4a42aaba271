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
"""

from __future__ import annotations

import json
import os
import shutil
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
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a .tmp folder is an interrupted write and is ignored)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and not p.name.endswith(".tmp") and all((p / f).exists() for f in FILES))


def load_checkpoint(path: Path) -> dict[str, Any]:
    return {"model": load_file(str(path / "model.safetensors")),
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
            "rng": torch.load(path / "rng.pt", weights_only=True),
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
    """Fetch the newest complete checkpoint named by `<uri>/latest` into `directory`; None if there is none."""
    from botocore.exceptions import ClientError

    from models.weights import s3_client
    client, (bucket, prefix) = s3_client(), _split(uri)
    try:
        name = client.get_object(Bucket=bucket, Key=f"{prefix}/latest")["Body"].read().decode().strip()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    local, tmp = directory / name, directory / (name + ".tmp")
    if local.is_dir() and all((local / f).exists() for f in FILES):
        return local
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in FILES:
        client.download_file(bucket, f"{prefix}/{name}/{f}", str(tmp / f))
    os.replace(tmp, local)
    return local


def latest_checkpoint(directory: Path, uri: str = "") -> Path | None:
    """The newest checkpoint, local or on S3, whichever is further along."""
    local = list_checkpoints(directory)
    best = local[-1] if local else None
    if uri:
        remote = download_latest(uri, directory)
        if remote is not None and (best is None or remote.name > best.name):
            best = remote
    return best
