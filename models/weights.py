"""Where real weights come from: a local folder, or an s3:// prefix downloaded once into a local cache.

Never a model-hub name: the user configures a path (params.yaml `<backend>.presets.<preset>.weights`).
An S3 download lands in `<cache_root>/<bucket>/<prefix>/`, file by file through a temporary name, and is
integrity-checked against the sizes (and, for single-part uploads, the MD5 ETags) the server reports; a
`.complete.json` marker records what was verified, so later runs reuse the copy without network traffic.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from models.base import WeightsNotFoundError

DEFAULT_CACHE = Path(".v2m") / "weights"
MARKER = ".complete.json"


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def s3_client(endpoint_url: str | None = None):
    """boto3 S3 client; endpoint from the argument or AWS_ENDPOINT_URL / MLFLOW_S3_ENDPOINT_URL, credentials
    from the environment or profile as boto3 resolves them."""
    import boto3
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None)


def download_s3_prefix(uri: str, cache_root: Path = DEFAULT_CACHE, endpoint_url: str | None = None) -> Path:
    """Mirror s3://bucket/prefix into the cache (once) and return the local folder."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    local = Path(cache_root) / bucket / prefix
    if (local / MARKER).is_file():
        return local
    client = s3_client(endpoint_url)
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        objects += page.get("Contents", [])
    if not objects:
        raise WeightsNotFoundError(f"{uri}: no files under this S3 prefix; upload the model folder there "
                                   f"(config.json, *.safetensors, tokenizer files) or point the preset's weights elsewhere")
    verified = {}
    for obj in objects:
        rel = obj["Key"][len(prefix) + 1:]
        if not rel or rel.endswith("/"):
            continue
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        client.download_file(bucket, obj["Key"], str(tmp))
        if tmp.stat().st_size != obj["Size"]:
            tmp.unlink()
            raise IOError(f"{uri}/{rel}: downloaded {tmp.stat().st_size} bytes, the server lists {obj['Size']}")
        etag = obj.get("ETag", "").strip('"')
        if etag and "-" not in etag and _md5(tmp) != etag:  # multipart ETags are not plain MD5s
            tmp.unlink()
            raise IOError(f"{uri}/{rel}: MD5 does not match the server's ETag; the download is corrupt")
        os.replace(tmp, dest)
        verified[rel] = obj["Size"]
    (local / MARKER).write_text(json.dumps({"uri": uri, "files": verified}, indent=1, sort_keys=True))
    return local


def weight_files(stem: str) -> tuple[str, ...]:
    """The layouts save_pretrained writes for one model's weights, any of which loads: safetensors or a
    pickle `.bin` (transformers and diffusers read it with torch.load(weights_only=True)), each either whole
    or sharded with an index. `stem` is e.g. "model" (transformers) or "unet/diffusion_pytorch_model"."""
    sub, _, name = stem.rpartition("/")
    bin_stem = f"{sub}/" * bool(sub) + ("pytorch_model" if name == "model" else name)  # transformers' .bin name
    return (f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{bin_stem}.bin", f"{bin_stem}.bin.index.json")


def _missing(folder: Path, name: str | tuple[str, ...]) -> str | None:
    """None when `name` (or one of the alternatives) is there, complete; else what is missing."""
    options = (name,) if isinstance(name, str) else name
    for option in options:
        path = folder / option
        if not path.exists():
            continue
        if option.endswith(".index.json"):  # a sharded checkpoint: every shard the index names must be there
            shards = sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
            absent = [s for s in shards if not (path.parent / s).is_file()]
            if absent or not shards:
                return f"{option} (shards {', '.join(absent) or 'none listed'} missing)"
        return None
    return options[0] if len(options) == 1 else f"one of {' / '.join(options)}"


def resolve_weights(location: str, required: list[str | tuple[str, ...]], what: str,
                    cache_root: Path = DEFAULT_CACHE) -> Path:
    """A local folder holding `required` files, from a folder path or an s3:// URI. An entry that is a tuple
    is satisfied by any one of its files (see weight_files).

    Raises WeightsNotFoundError naming the location, the missing files, and what to put there.
    """
    if not location:
        raise WeightsNotFoundError(f"{what}: no weights location configured; set the preset's `weights` in "
                                   f"params.yaml to a local folder or an s3:// prefix")
    folder = download_s3_prefix(location, cache_root) if location.startswith("s3://") else Path(location)
    names = [n if isinstance(n, str) else n[0] for n in required]
    if not folder.is_dir():
        raise WeightsNotFoundError(f"{what}: weights folder {folder} does not exist. Put the model's files "
                                   f"({', '.join(names)}, ...) there, or set the preset's `weights` in params.yaml "
                                   f"to the folder or an s3:// prefix that holds them")
    missing = [m for m in (_missing(folder, name) for name in required) if m]
    if missing:
        raise WeightsNotFoundError(f"{what}: {folder} lacks {'; '.join(missing)}")
    return folder


def load_prefixed(folder: Path, prefix: str) -> dict:
    """The tensors named `prefix...` (prefix removed) of a transformers-layout folder, whole or sharded,
    safetensors or .bin (torch.load(weights_only=True)); reads only the shards that hold them, so one part of a
    large model (EnCodec in MusicGen) loads without the rest."""
    import torch
    from safetensors import safe_open
    folder = Path(folder)
    files: list[str] = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            files = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
            break
    else:
        files = [f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()][:1]
    out = {}
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), "pt") as f:
                out.update({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
        else:
            state = torch.load(folder / name, map_location="cpu", weights_only=True)
            out.update({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    if not out:
        raise WeightsNotFoundError(f"{folder}: no weights named {prefix}* in {', '.join(files) or 'any weights file'}")
    # Older checkpoints store weight-normed convs as weight_g / weight_v; torch's parametrizations name them so:
    return {k.replace(".weight_g", ".parametrizations.weight.original0")
             .replace(".weight_v", ".parametrizations.weight.original1"): v for k, v in out.items()}
