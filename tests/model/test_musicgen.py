"""MusicGen-Melody backend on the tiny preset (CPU): conditioning, training, persistence, generation, weights."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from models.base import WeightsNotFoundError
from models.musicgen import MusicGenBackend
from models.musicgen_chroma import HOP, N_FFT, chroma_energy, melody_chroma, num_chroma_frames
from tests.conftest import synth_stems
from v2m.config_musicgen import ConditionDropout, MusicGenConfig, MusicGenPreset

SR = 32000
CFG = MusicGenConfig(crop_s=2.0)  # 3 s chunks below: two aligned crop starts (0 and 0.64 s)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's spinning
    threads make each op 10-100x slower whenever another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(cfg: MusicGenConfig = CFG, seed: int = 0) -> MusicGenBackend:
    return MusicGenBackend.from_preset(cfg, "tiny", seed=seed)


@pytest.fixture(scope="module")
def backend() -> MusicGenBackend:
    """Shared read-only model; tests that train or add adapters build their own."""
    return build()


@pytest.fixture(scope="module")
def chunks(tmp_path_factory) -> list[dict]:
    """Two 3 s segment-manifest rows with different melodies, as the segment stage writes them."""
    root = tmp_path_factory.mktemp("chunks")
    rows = []
    for i in range(2):
        vocal, inst = synth_stems(seed=10 + i, seconds=3.0, sr=SR)
        paths = {"vocals_path": root / f"{i}_vocals.wav", "instrumental_path": root / f"{i}_instrumental.wav"}
        sf.write(paths["vocals_path"], vocal, SR)
        sf.write(paths["instrumental_path"], inst, SR)
        rows.append({"chunk_id": f"c{i}", "sample_rate": SR, **{k: str(v) for k, v in paths.items()}})
    return rows


@pytest.fixture(scope="module")
def items(backend, chunks) -> list[dict]:
    prompts = ["pop music for input vocals", "disco music for input vocals"]
    return [{**backend.prepare(c), "prompt": p} for c, p in zip(chunks, prompts)]


# --- prepare & the melody condition -----------------------------------------------------------------
def test_prepare_gives_informative_codes_and_one_hot_chroma(items):
    codes, chroma = items[0]["codes"], items[0]["chroma"]
    assert codes.shape == (4, 150) and codes.dtype == np.int16  # 3 s at 50 Hz
    assert codes.min() >= 0 and codes.max() < 2048
    assert all(len(np.unique(row)) > 5 for row in codes), "seeded codebooks: codes must vary over time"
    assert chroma.dtype == np.float16 and chroma.shape == (num_chroma_frames(3 * SR), 12)
    assert np.array_equal(chroma.sum(axis=1), np.ones(len(chroma))) and set(np.unique(chroma)) == {0.0, 1.0}
    assert not np.array_equal(items[0]["codes"], items[1]["codes"])


def reference_chroma(audio: np.ndarray) -> np.ndarray:
    """The feature extractor's recipe rebuilt from librosa parts (float64): STFT, |.|^2 / window energy,
    librosa's chroma filters, max-normalised frames."""
    import librosa
    import scipy.signal
    window = scipy.signal.get_window("hann", N_FFT, fftbins=True)
    spec = librosa.stft(audio.astype(np.float64), n_fft=N_FFT, hop_length=HOP, window=window, center=True,
                        pad_mode="reflect")
    power = np.abs(spec) ** 2 / np.sum(window ** 2)
    raw = librosa.filters.chroma(sr=SR, n_fft=N_FFT, tuning=0.0, n_chroma=12) @ power
    return (raw / np.maximum(raw.max(axis=0, keepdims=True), 1e-6)).T


def test_chroma_matches_an_independent_reference():
    vocal, _ = synth_stems(seed=3, seconds=4.0, sr=SR)
    ours, ref = chroma_energy(vocal).numpy(), reference_chroma(vocal)
    assert ours.shape == ref.shape == (num_chroma_frames(len(vocal)), 12)
    np.testing.assert_allclose(ours, ref, atol=2e-4)
    onehot = melody_chroma(vocal)
    assert np.array_equal(onehot.argmax(1), ref.argmax(1)) and np.array_equal(onehot.sum(1), np.ones(len(onehot)))


@pytest.mark.parametrize("midi", [57, 60, 64, 67, 70, 73])
def test_pure_tone_gives_its_pitch_class(midi):
    t = np.arange(SR) / SR
    tone = 0.5 * np.sin(2 * np.pi * 440.0 * 2 ** ((midi - 69) / 12) * t).astype(np.float32)
    assert set(melody_chroma(tone).argmax(axis=1)) == {midi % 12}  # C = 0, A = 9


# --- conditioning wired into the model --------------------------------------------------------------
def test_delay_pattern_shifts_codebook_k_by_k(backend):
    codes = torch.randint(0, 2048, (2, 4, 10))
    labels = backend.delay_labels(codes)
    assert labels.shape == (2, 10 + 4 - 1, 4)
    for k in range(4):
        assert torch.equal(labels[:, k: k + 10, k], codes[:, k])
        others = torch.cat([labels[:, :k, k], labels[:, k + 10:, k]], dim=1)
        assert (others == backend.pad_id).all()  # ignored by the loss


def test_melody_and_text_reach_the_logits(backend, items):
    base = backend.logits([items[0]])
    other_vocal = backend.logits([{**items[0], "chroma": items[1]["chroma"]}])
    assert not torch.allclose(base, other_vocal), "the vocal's chroma must change the prediction"
    other_prompt = backend.logits([{**items[0], "prompt": "metal music for input vocals"}])
    assert not torch.allclose(base, other_prompt), "voice_text must see the prompt"
    voice = backend.logits([items[0]], conditioning="voice")
    voice_other = backend.logits([{**items[0], "prompt": "metal music for input vocals"}], conditioning="voice")
    assert torch.equal(voice, voice_other), "voice conditioning must never show the text"


def test_condition_dropout_rate_and_wiring(backend, items):
    rates, n = CFG.condition_dropout, 20000
    assert rates.recipe == "joint"  # audiocraft's: both together at `joint`, then each at its own rate
    drop_text, drop_chroma = np.array(backend.draw_condition_dropout(n, "voice_text", torch.Generator().manual_seed(1),
                                                                     True))
    j = rates.joint
    assert abs(drop_text.mean() - (j + (1 - j) * rates.text)) < 0.015
    assert abs(drop_chroma.mean() - (j + (1 - j) * rates.chroma)) < 0.015
    assert abs((drop_text & drop_chroma).mean() - (j + (1 - j) * rates.text * rates.chroma)) < 0.015
    independent = MusicGenBackend(backend.model, backend.tokenizer, CFG.model_copy(
        update={"condition_dropout": rates.model_copy(update={"recipe": "independent"})}))
    drop_text, drop_chroma = independent.draw_condition_dropout(n, "voice_text", torch.Generator().manual_seed(1), True)
    assert abs(np.mean(drop_text) - rates.text) < 0.015 and abs(np.mean(drop_chroma) - rates.chroma) < 0.015
    assert np.corrcoef(drop_text, drop_chroma)[0, 1] < 0.03  # independent draws
    assert all(backend.draw_condition_dropout(50, "voice", torch.Generator(), True)[0])
    assert not any(sum(backend.draw_condition_dropout(50, "voice_text", None, False), []))  # validation: none
    # train_step really uses the draws: with both conditions always dropped, vocal and prompt stop mattering.
    always = MusicGenBackend(backend.model, backend.tokenizer, CFG.model_copy(
        update={"condition_dropout": ConditionDropout(joint=0.0, text=1.0, chroma=1.0)}))
    swapped = [{**items[0], "chroma": items[1]["chroma"], "prompt": "jazz"}]
    losses = [always.train_step(b, "voice_text", torch.Generator().manual_seed(0))[0].item()
              for b in ([items[0]], swapped)]
    assert losses[0] == losses[1]
    assert backend.train_step([items[0]], "voice_text", torch.Generator(), train=False)[0].item() != \
        backend.train_step(swapped, "voice_text", torch.Generator(), train=False)[0].item()


# --- training ---------------------------------------------------------------------------------------
def test_random_crops_are_aligned_for_codes_and_chroma(backend):
    """3 s chunk, 2 s crop: starts on the 0.64 s grid where a code frame (640 samples) and a chroma frame
    (4096 samples) begin together; validation (no generator) always takes the first window."""
    item = {"codes": np.tile(np.arange(150), (4, 1)), "chroma": np.arange(num_chroma_frames(3 * SR))[:, None]}
    starts = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        codes, chroma = backend._crop(item, gen)
        c0, h0 = int(codes[0, 0]), int(chroma[0, 0])
        assert codes.shape == (4, 100) and c0 % 32 == 0 and h0 * 4096 == c0 * 640 and len(chroma) == 16
        starts.add(c0)
    assert starts == {0, 32}
    assert int(backend._crop(item, None)[0][0, 0]) == 0


def test_training_lowers_the_loss(items):
    model = build(seed=1)
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    before = model.train_step(items, "voice_text", gen, train=False)[0].item()
    for _ in range(8):
        loss, metrics = model.train_step(items, "voice_text", gen)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.train_step(items, "voice_text", gen, train=False)[0].item()
    assert metrics["tokens"] == 2 * 4 * 100  # two items, four codebooks, 2 s crops at 50 Hz
    assert after < before - 0.5, (before, after)
    names = {n.split(".")[0] for n, _ in model.trainable_parameters()}
    assert names == {"decoder", "enc_to_dec_proj", "audio_enc_to_dec_proj"}  # T5 and EnCodec stay frozen


def test_autocast_and_gradient_checkpointing(items):
    model = build()
    plain, _ = model.train_step(items, "voice_text", torch.Generator().manual_seed(0))
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.trainable_parameters()}
    model.module.zero_grad()
    model.enable_gradient_checkpointing()
    assert all(layer.gradient_checkpointing for layer in model.model.decoder.model.decoder.layers)
    ckpt, _ = model.train_step(items, "voice_text", torch.Generator().manual_seed(0))
    ckpt.backward()
    assert torch.allclose(plain, ckpt)
    assert all(torch.allclose(grads[n], p.grad, atol=1e-6) for n, p in model.trainable_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.train_step(items, "voice_text", torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - plain.item()) < 0.1


def test_lora_trains_only_adapters_and_merges_on_save(items, tmp_path):
    model = build()
    frozen = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    model.setup_finetune("lora", **CFG.lora.model_dump())
    trainable = dict(model.trainable_parameters())
    assert trainable and all("lora_" in n and n.startswith("decoder.") for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(2):
        loss, _ = model.train_step(items, "voice_text", torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.module.named_parameters())
    for name, value in frozen.items():  # base weights untouched (LoRA wraps them as ...base_layer...)
        live = after.get(name) if name in after else after[name.replace("q_proj.", "q_proj.base_layer.")
                                                                 .replace("v_proj.", "v_proj.base_layer.")]
        assert torch.equal(live, value), name
    assert any(p.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)

    model.save(tmp_path / "lora")
    loaded = MusicGenBackend.load(tmp_path / "lora")
    assert not any("lora_" in n for n, _ in loaded.module.named_parameters())
    live, merged = model.logits([items[0]]), loaded.logits([items[0]])
    assert not torch.allclose(live, build().logits([items[0]]), atol=1e-4), "the adapters changed the model"
    torch.testing.assert_close(merged, live, atol=1e-5, rtol=1e-5)


# --- persistence & generation -----------------------------------------------------------------------
def test_save_load_round_trip_is_exact(backend, items, tmp_path):
    backend.save(tmp_path / "ckpt")
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"):
        assert (tmp_path / "ckpt" / name).is_file()
    loaded = MusicGenBackend.load(tmp_path / "ckpt")
    assert loaded.cfg == backend.cfg
    assert torch.equal(backend.logits(items), loaded.logits(items))
    audio, _ = synth_stems(seed=4, seconds=1.0, sr=SR)
    assert np.array_equal(loaded.encode_audio(audio), backend.encode_audio(audio))  # seeded codebooks saved
    vocal, _ = synth_stems(seed=5, seconds=1.0, sr=SR)
    a = backend.generate(vocal, SR, "rock music for input vocals", 0.4, seed=7)
    b = loaded.generate(vocal, SR, "rock music for input vocals", 0.4, seed=7)
    assert np.array_equal(a, b)


def test_generate_three_modes(backend):
    vocal, _ = synth_stems(seed=6, seconds=1.0, sr=44100)  # any input rate: resampled to 32 kHz inside
    outs = {}
    for mode, (v, prompt) in {"voice": (vocal, None), "voice_text": (vocal, "disco music"),
                              "text": (None, "disco music")}.items():
        outs[mode] = backend.generate(v, 44100, prompt, 0.37, seed=3)
        assert outs[mode].dtype == np.float32 and outs[mode].shape == (round(0.37 * SR),)
        assert np.isfinite(outs[mode]).all() and np.abs(outs[mode]).max() > 0
    assert np.array_equal(outs["voice"], backend.generate(vocal, 44100, None, 0.37, seed=3))
    assert not np.array_equal(outs["voice"], backend.generate(vocal, 44100, None, 0.37, seed=4))
    with pytest.raises(ValueError, match="vocal, a prompt, or both"):
        backend.generate(None, SR, None, 1.0)


def test_generated_codes_follow_the_melody_and_the_prompt(monkeypatch):
    """Guards a known regression of the transformers port (generate() silently ignored melody, text and guidance;
    fixed in 5.24): with the same seed, another melody or another prompt must give other codes.

    A random-init decoder barely listens to its prefix (its code logits move by ~1e-4 with the prompt), so the
    condition projections are amplified 10x: a model that does listen, which generate() must then honour."""
    backend = build()
    with torch.no_grad():
        backend.model.enc_to_dec_proj.weight.mul_(10)
        backend.model.audio_enc_to_dec_proj.weight.mul_(10)
    codes = []
    decode = backend.model.audio_encoder.decode

    def recording_decode(audio_codes, *args, **kwargs):  # records the sampled codes, then decodes them as usual
        codes.append(audio_codes.detach().clone())
        return decode(audio_codes, *args, **kwargs)

    monkeypatch.setattr(backend.model.audio_encoder, "decode", recording_decode)
    vocal, _ = synth_stems(seed=6, seconds=1.0, sr=SR)
    other_vocal, _ = synth_stems(seed=8, seconds=1.0, sr=SR)
    disco, metal = "disco music for input vocals", "An aggressive metal track with drums and guitar."
    final = []  # the codes each generate() decoded last (long-form generation may decode more than once)
    for v, prompt in ((vocal, disco), (vocal, disco), (other_vocal, disco), (vocal, metal)):
        codes.clear()
        backend.generate(v, SR, prompt, 0.5, seed=11)
        final.append(codes[-1])
    codes = final
    same, melody, text = (torch.equal(codes[0], c) for c in codes[1:])
    assert same and codes[0].shape[-1] == 25  # 0.5 s of 50 Hz frames, deterministic for a seed
    assert not melody, "a different melody gave the same codes: generate() ignores the melody"
    assert not text, "a different prompt gave the same codes: generate() ignores the text"


# --- real weights: local folder and S3 --------------------------------------------------------------
def test_missing_real_weights_name_folder_and_files(tmp_path):
    folder = tmp_path / "musicgen-melody"
    cfg = CFG.model_copy(update={"presets": {"melody-1.5b": MusicGenPreset(weights=str(folder))}})
    with pytest.raises(WeightsNotFoundError) as err:
        MusicGenBackend.from_preset(cfg, "melody-1.5b")
    message = str(err.value)
    assert str(folder) in message and "melody-1.5b" in message
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        assert name in message


def test_real_weight_loading_from_folder_and_s3(backend, items, tmp_path, monkeypatch):
    from v2m.s3server import SeaweedS3
    folder = tmp_path / "tiny-as-real"
    backend.save(folder)
    expected = backend.logits(items)

    local = CFG.model_copy(update={"presets": {"real": MusicGenPreset(weights=str(folder))}})
    assert torch.equal(MusicGenBackend.from_preset(local, "real").logits(items), expected)

    with SeaweedS3(tmp_path / "s3", buckets=["weights"]) as s3:
        for path in folder.iterdir():
            s3.client().upload_file(str(path), "weights", f"musicgen/tiny/{path.name}")
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        remote = CFG.model_copy(update={"presets": {"real": MusicGenPreset(weights="s3://weights/musicgen/tiny")}})
        model = MusicGenBackend.from_preset(remote, "real", cache_root=tmp_path / "cache")
    assert (tmp_path / "cache" / "weights" / "musicgen" / "tiny" / "model.safetensors").is_file()
    assert torch.equal(model.logits(items), expected)
