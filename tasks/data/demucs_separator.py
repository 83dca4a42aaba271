"""The learned separator: HTDemucs (htdemucs, htdemucs_ft; MIT) loaded from a weights folder, never downloaded.

Weights layout (params separate.demucs.weights: a local folder, or an s3:// prefix mirrored once into .v2m/weights):
    <model>.yaml                  the bag: `models: [<sig>, ...]`, optional `weights` (per model, per source) and
                                  `segment` (seconds), as in the demucs package's remote/ folder
    <sig>.safetensors             one per signature: tensors + metadata klass/args/kwargs (the Hugging Face export)
 or <sig>-<sha256[:8]>.th         the original release files (dl.fbaipublicfiles.com/demucs/hybrid_transformer/)
htdemucs = 1 signature (955717e8); htdemucs_ft = 4 (f7e0c4bc, d12395a8, 92cfc3b6, 04573f0d), one per source.

Only the `demucs` package's model classes are used (demucs.htdemucs / hdemucs / demucs: torch, einops, julius);
its audio I/O, its CLI and torchaudio are not. Model files are read without running pickled code: safetensors, or
torch.load(weights_only=True) allowing just the model classes and Fraction. The application is ours, after demucs'
apply_model: the song is normalised, cut into segments overlapping by `overlap` (triangular crossfade), and the
segments of several songs go through the model together in batches of `batch_size`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import yaml

from models.base import WeightsNotFoundError
from models.weights import download_s3_prefix
from v2m.audio import resample
from v2m.config_separate import DemucsConfig

LAYOUT = ("<model>.yaml (models: [signatures]) and, per signature, <sig>.safetensors or <sig>-<sha256[:8]>.th "
          "(the demucs release files)")
VOCALS = "vocals"


def model_classes() -> dict[str, type]:
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs
    return {f"{c.__module__}.{c.__name__}": c for c in (Demucs, HDemucs, HTDemucs)}


@dataclass
class Bag:
    """The models of a bag, each source averaged over them with the bag's weights."""
    models: list
    weights: list[list[float]]
    sources: list[str]
    samplerate: int
    audio_channels: int
    segment_s: float
    fingerprint: str        # content hash of the files loaded: part of every cache key

    def to(self, device: str) -> "Bag":
        for m in self.models:
            m.to(device).eval()
        return self


def weights_folder(cfg: DemucsConfig) -> Path:
    """The local folder holding cfg.model's files (an s3:// prefix is mirrored first), or a clear error."""
    where = cfg.weights
    if not where:
        raise WeightsNotFoundError(f"separate.demucs.weights is empty: set it to a local folder or an s3:// prefix "
                                   f"holding {LAYOUT}")
    folder = download_s3_prefix(where) if where.startswith("s3://") else Path(where)
    yaml_file = folder / f"{cfg.model}.yaml"
    if not yaml_file.is_file():
        raise WeightsNotFoundError(
            f"{yaml_file}: not found. The learned separator never downloads: put {LAYOUT} for `{cfg.model}` in "
            f"{folder} (params separate.demucs.weights; a local folder or an s3:// prefix), or set "
            f"separate.method: harmonic for the weight-free separator")
    return folder


def _decode(value):
    """The Hugging Face export's JSON for init arguments: fractions as {"_type": "fraction", ...}."""
    if isinstance(value, dict):
        if value.get("_type") == "fraction":
            return Fraction(value["numerator"], value["denominator"])
        return {k: _decode(v) for k, v in value.items()}
    return [_decode(v) for v in value] if isinstance(value, list) else value


def _build(klass_name: str, args, kwargs, state: dict, where: Path):
    classes = model_classes()
    if klass_name not in classes:
        raise WeightsNotFoundError(f"{where}: model class {klass_name!r} is not a demucs model "
                                   f"({', '.join(classes)})")
    if state.get("__quantized"):
        raise WeightsNotFoundError(f"{where}: a diffq-quantized model (mdx_q / mdx_extra_q); use htdemucs or "
                                   f"htdemucs_ft")
    model = classes[klass_name](*args, **kwargs)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def load_model_file(path: Path):
    import torch
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if "klass" not in meta:
            raise WeightsNotFoundError(f"{path}: no `klass` in the safetensors metadata (not a demucs export)")
        if "structure" in meta:
            raise WeightsNotFoundError(f"{path}: a quantized export; use htdemucs or htdemucs_ft")
        return _build(meta["klass"], _decode(json.loads(meta.get("args", "[]"))),
                      _decode(json.loads(meta.get("kwargs", "{}"))), state, path)
    with torch.serialization.safe_globals([*model_classes().values(), Fraction]):
        package = torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
    klass = package["klass"]
    return _build(f"{klass.__module__}.{klass.__name__}", package["args"], package["kwargs"], package["state"], path)


def _signature_file(folder: Path, sig: str) -> Path:
    found = [folder / f"{sig}.safetensors"] if (folder / f"{sig}.safetensors").is_file() else []
    found += sorted(p for p in folder.glob(f"{sig}*.th") if p.stem == sig or p.stem.rsplit("-", 1)[0] == sig)
    if not found:
        raise WeightsNotFoundError(f"{folder}: no {sig}.safetensors or {sig}-<sha256[:8]>.th for signature {sig} "
                                   f"(listed in its bag yaml); expected {LAYOUT}")
    path = found[0]
    if path.suffix == ".th" and "-" in path.stem:  # the release names carry a checksum prefix: check it
        want = path.stem.rsplit("-", 1)[1]
        if hashlib.sha256(path.read_bytes()).hexdigest()[: len(want)] != want:
            raise WeightsNotFoundError(f"{path}: sha256 does not start with {want}: the file is corrupt")
    return path


def load_bag(cfg: DemucsConfig) -> Bag:
    folder = weights_folder(cfg)
    spec = yaml.safe_load((folder / f"{cfg.model}.yaml").read_text()) or {}
    sigs = spec.get("models") or []
    if not sigs:
        raise WeightsNotFoundError(f"{folder / (cfg.model + '.yaml')}: lists no `models`")
    files = [_signature_file(folder, str(s)) for s in sigs]
    models = [load_model_file(f) for f in files]
    first = models[0]
    if any(m.sources != first.sources or m.samplerate != first.samplerate for m in models):
        raise WeightsNotFoundError(f"{folder}: the models of bag {cfg.model} disagree on sources or sample rate")
    if VOCALS not in first.sources:
        raise WeightsNotFoundError(f"{folder}: bag {cfg.model} has no `vocals` source ({first.sources})")
    weights = spec.get("weights") or [[1.0] * len(first.sources) for _ in models]
    segment = min(float(m.segment) for m in models)
    if spec.get("segment"):
        segment = min(segment, float(spec["segment"]))
    h = hashlib.sha256((folder / f"{cfg.model}.yaml").read_bytes())
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return Bag(models, weights, list(first.sources), int(first.samplerate), int(first.audio_channels), segment,
               h.hexdigest()[:16])


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _triangle(n: int):
    import torch
    w = torch.cat([torch.arange(1, n // 2 + 1), torch.arange(n - n // 2, 0, -1)]).float()
    return w / w.max()


def _segments(length: int, seg: int, stride: int) -> list[tuple[int, int, int]]:
    """(offset, kept length, left padding) of each segment: as demucs' TensorChunk.padded, a short last segment
    is centred in a full-length window (zeros outside the song)."""
    out = []
    for offset in range(0, length, stride):
        kept = min(seg, length - offset)
        out.append((offset, kept, (seg - kept) // 2))
    return out


def separate_batch(bag: Bag, mixes: list[tuple[np.ndarray, int]], cfg: DemucsConfig,
                   device: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(audio [channels, samples], sr)] -> [(vocals, instrumental)], each at its mix's rate and channel count;
    instrumental = every source but vocals."""
    import torch
    seg = int((cfg.segment_s or bag.segment_s) * bag.samplerate)
    seg = min(seg, int(bag.segment_s * bag.samplerate))  # HTDemucs cannot run past its training segment
    stride = max(1, int((1 - cfg.overlap) * seg))
    weight = _triangle(seg).to(device)
    vi = bag.sources.index(VOCALS)
    tracks, jobs = [], []
    for t, (audio, sr) in enumerate(mixes):
        x = np.atleast_2d(audio).astype(np.float32)
        if x.shape[0] != bag.audio_channels:  # mono (or more channels than the model): its mono mix
            x = np.repeat(x.mean(axis=0, keepdims=True), bag.audio_channels, axis=0)
        x = np.stack([resample(c, sr, bag.samplerate) for c in x])
        ref = x.mean(axis=0)
        mean, std = float(ref.mean()), float(ref.std()) or 1.0
        wav = torch.from_numpy((x - mean) / std)
        # accumulated per track: vocals and the sum of the other sources, [2, channels, samples]
        tracks.append({"wav": wav, "sr": sr, "channels": np.atleast_2d(audio).shape[0], "mean": mean, "std": std,
                       "out": torch.zeros(2, bag.audio_channels, wav.shape[1]), "norm": torch.zeros(wav.shape[1])})
        jobs += [(t, *s) for s in _segments(wav.shape[1], seg, stride)]
    with torch.inference_mode():
        for start in range(0, len(jobs), cfg.batch_size):
            group = jobs[start:start + cfg.batch_size]
            batch = torch.stack([_window(tracks[t]["wav"], off, kept, pad, seg) for t, off, kept, pad in group])
            est = _apply_bag(bag, batch.to(device))  # [B, sources, channels, seg]
            est = torch.stack([est[:, vi], est.sum(dim=1) - est[:, vi]], dim=1)
            for (t, off, kept, pad), y in zip(group, est):
                w = weight[:kept]
                tracks[t]["out"][..., off:off + kept] += (y[..., pad:pad + kept] * w).cpu()
                tracks[t]["norm"][off:off + kept] += w.cpu()
    results = []
    for tr in tracks:
        y = (tr["out"] / tr["norm"].clamp_min(1e-8)).numpy()
        # the normalisation's mean belongs to the mix, i.e. to the sum of the stems: add it once, to the instrumental
        stems = [y[0] * tr["std"], y[1] * tr["std"] + tr["mean"]]
        stems = [np.stack([resample(c, bag.samplerate, tr["sr"]) for c in s]) for s in stems]
        if tr["channels"] != bag.audio_channels:
            stems = [s.mean(axis=0, keepdims=True) for s in stems]
        results.append((stems[0], stems[1]))
    return results


def _window(wav, offset: int, kept: int, pad: int, seg: int):
    import torch.nn.functional as F
    a = offset - pad
    lo, hi = max(0, a), min(wav.shape[1], a + seg)
    return F.pad(wav[:, lo:hi], (lo - a, a + seg - hi))


def _apply_bag(bag: Bag, batch):
    total = 0.0
    for model, w in zip(bag.models, bag.weights):
        scale = batch.new_tensor(w)[None, :, None, None]
        total = total + model(batch) * scale
    return total / batch.new_tensor([sum(col) for col in zip(*bag.weights)])[None, :, None, None]
