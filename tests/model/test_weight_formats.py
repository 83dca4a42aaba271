"""Published weight layouts at tiny size: whole or sharded (with an index), safetensors or pickle `.bin`, as
transformers' and diffusers' save_pretrained write them. Each loads to the same model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.audioldm import AudioLDMBackend
from models.base import WeightsNotFoundError
from models.musicgen import MusicGenBackend
from tests.model.test_audioldm import config as audioldm_config
from tests.model.test_audioldm import probe, with_weights
from v2m.config_musicgen import MusicGenConfig, MusicGenPreset

SHARD = "200KB"  # small enough that every tiny model is split into several shards


def save_bin(model, folder: Path, max_shard_size: str = SHARD) -> None:
    """What transformers' save_pretrained(safe_serialization=False) wrote (before 5.x made safetensors the only
    format, and still the layout of many published checkpoints): pytorch_model[-0000i-of-0000n].bin + index."""
    from huggingface_hub import split_torch_state_dict_into_shards
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        torch.save({n: state[n] for n in names}, folder / filename)
    if split.is_sharded:
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename}))


def clear_weights(folder: Path) -> None:
    for pattern in ("*.safetensors", "*.bin", "*.index.json"):
        for path in folder.glob(pattern):
            path.unlink()


# --- MusicGen (transformers layout) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def musicgen(tmp_path_factory):
    backend = MusicGenBackend.from_preset(MusicGenConfig(crop_s=1.0), "tiny", seed=0)
    folder = tmp_path_factory.mktemp("musicgen") / "saved"
    backend.save(folder)
    rng = np.random.default_rng(0)
    items = [{"codes": rng.integers(0, 2048, (4, 50)).astype(np.int16), "chroma": np.eye(12, dtype=np.float16)[
        rng.integers(0, 12, 9)], "prompt": "pop music for input vocals"}]
    return backend, folder, items


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin", "bin-sharded"])
def test_musicgen_loads_every_published_layout(musicgen, tmp_path, layout):
    backend, saved, items = musicgen
    folder = tmp_path / layout
    shutil.copytree(saved, folder)
    clear_weights(folder)
    if layout == "safetensors-sharded":
        backend.model.save_pretrained(folder, max_shard_size=SHARD)
    else:
        save_bin(backend.model, folder, SHARD if layout == "bin-sharded" else "10GB")
    names = {p.name for p in folder.iterdir()}
    expected = {"safetensors-sharded": "model.safetensors.index.json", "bin": "pytorch_model.bin",
                "bin-sharded": "pytorch_model.bin.index.json"}[layout]
    assert expected in names and not any(n.endswith(".safetensors") for n in names if layout.startswith("bin"))
    assert layout == "bin" or len([n for n in names if n.startswith(("model-", "pytorch_model-"))]) > 2

    cfg = MusicGenConfig(crop_s=1.0, presets={"real": MusicGenPreset(weights=str(folder))})
    loaded = MusicGenBackend.from_preset(cfg, "real")
    assert torch.equal(loaded.logits(items), backend.logits(items))


def test_a_sharded_checkpoint_with_a_missing_shard_is_refused(musicgen, tmp_path):
    backend, saved, _ = musicgen
    folder = tmp_path / "broken"
    shutil.copytree(saved, folder)
    clear_weights(folder)
    backend.model.save_pretrained(folder, max_shard_size=SHARD)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    cfg = MusicGenConfig(presets={"real": MusicGenPreset(weights=str(folder))})
    with pytest.raises(WeightsNotFoundError, match=f"shards {shard.name} missing"):
        MusicGenBackend.from_preset(cfg, "real")


# --- AudioLDM (diffusers layout, transformers parts) ------------------------------------------------------
@pytest.mark.parametrize("safe", [True, False])
def test_audioldm_loads_sharded_safetensors_and_bin(tmp_path, safe):
    backend = AudioLDMBackend.from_preset(audioldm_config(), "tiny", seed=0)
    folder = tmp_path / "w"
    backend.save(folder)
    for sub, part in (("unet", backend.unet), ("vae", backend.vae)):  # diffusers writes both formats itself
        clear_weights(folder / sub)
        part.save_pretrained(folder / sub, safe_serialization=safe, max_shard_size=SHARD)
    suffix = "safetensors" if safe else "bin"
    assert (folder / "unet" / f"diffusion_pytorch_model.{suffix}.index.json").is_file()
    if not safe:  # the transformers parts as pickles too
        from models.audioldm import text_encoder_of
        for sub, part in (("vocoder", backend.vocoder), ("clap", backend.clap),
                          ("text_encoder", text_encoder_of(backend.clap))):
            clear_weights(folder / sub)
            save_bin(part, folder / sub, "20KB")
        assert (folder / "text_encoder" / "pytorch_model.bin.index.json").is_file()
    loaded = AudioLDMBackend.from_preset(with_weights(audioldm_config(), str(folder)), "real")
    assert torch.equal(probe(loaded), probe(backend))
