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


# --- the cache stage's encoders ------------------------------------------------------------------------------
def chunks(folder: Path, sr: int) -> list[dict]:
    """Three chunks, two of the same length (one batch forward) and a shorter one."""
    import soundfile as sf
    rng = np.random.default_rng(1)
    rows = []
    for i, seconds in enumerate((1.5, 1.5, 1.0)):
        t = np.arange(int(seconds * sr)) / sr
        paths = {"vocals_path": folder / f"{i}_v.wav", "instrumental_path": folder / f"{i}_i.wav"}
        sf.write(paths["vocals_path"], (0.3 * np.sin(2 * np.pi * (220 + 50 * i) * t)).astype(np.float32), sr)
        sf.write(paths["instrumental_path"], (0.2 * rng.standard_normal(len(t))).astype(np.float32), sr)
        rows.append({k: str(v) for k, v in paths.items()})
    return rows


def test_musicgen_cache_encoder_loads_only_encodec_and_batches(musicgen, tmp_path):
    backend, saved, _ = musicgen
    cfg = MusicGenConfig(presets={"real": MusicGenPreset(weights=str(saved))})
    encoder = MusicGenBackend.input_encoder(cfg, "real")
    live = backend.model.audio_encoder.state_dict()
    assert all(torch.equal(v, live[k]) for k, v in encoder.codec.state_dict().items())  # EnCodec's own weights
    assert type(encoder.codec).__name__ == "EncodecModel" and not hasattr(encoder, "model")  # no decoder, no T5
    rows = chunks(tmp_path, 32000)
    batched = encoder.prepare_batch(rows)
    for row, got in zip(rows, batched):
        want = backend.prepare(row)
        # Same codes up to float noise of batched kernels at quantizer boundaries (a flip carries on in the residual)
        assert got["codes"].shape == want["codes"].shape and (got["codes"] == want["codes"]).mean() > 0.95
        assert np.array_equal(got["chroma"], want["chroma"])


def test_audioldm_cache_encoder_loads_only_vae_and_clap_and_batches(tmp_path):
    backend = AudioLDMBackend.from_preset(audioldm_config(), "tiny", seed=0)
    backend.save(tmp_path / "w")
    encoder = AudioLDMBackend.input_encoder(with_weights(audioldm_config(), str(tmp_path / "w")), "real")
    assert not hasattr(encoder, "unet") and not hasattr(encoder, "vocoder")
    rows = chunks(tmp_path, 16000)
    for row, got in zip(rows, encoder.prepare_batch(rows)):
        want = backend.prepare(row)
        np.testing.assert_allclose(got["latents"].astype(np.float32), want["latents"].astype(np.float32), atol=2e-2)
        np.testing.assert_allclose(got["vocal_embedding"], want["vocal_embedding"], atol=1e-5)
