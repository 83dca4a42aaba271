"""AudioLDM backend on the tiny random-init preset (CPU, 1-2 s clips, a few diffusion steps)."""

from __future__ import annotations

import copy

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from models.audioldm import REQUIRED_FILES, AudioLDMBackend, condition_masks, widen_class_projection
from models.audioldm_mel import HOP, N_MELS, SAMPLE_RATE, SILENCE, log_mel
from models.audioldm_tiny import tiny_unet
from models.base import WeightsNotFoundError
from v2m.config_audioldm import AudioLDMConfig, AudioLDMPreset, ConditionDropout

PROMPT = "disco music for input vocals"


def tone(freq: float, seconds: float, sr: int, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def melody(seed: int, seconds: float, sr: int) -> np.ndarray:
    """A few random notes: something CLAP and the VAE can tell apart from another seed's."""
    rng = np.random.default_rng(seed)
    notes = 220.0 * 2 ** (rng.integers(0, 12, size=4) / 12)
    return np.concatenate([tone(f, seconds / 4, sr) for f in notes])


def config(**overrides) -> AudioLDMConfig:
    return AudioLDMConfig(crop_s=1.0, inference_steps=3, **overrides)


def with_weights(cfg: AudioLDMConfig, location: str) -> AudioLDMConfig:
    return cfg.model_copy(update={"presets": {**cfg.presets, "real": AudioLDMPreset(weights=location)}})


def probe(backend: AudioLDMBackend, vocal_seed: int = 1, prompt: str = PROMPT) -> torch.Tensor:
    """The UNet's noise prediction on fixed inputs (the quantity save/load and weight loading must preserve)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, backend.unet.config.in_channels, 8, N_MELS // backend.vae_factor, generator=g)
    vocal = backend.vocal_embedding(melody(vocal_seed, 1.0, 48000))[None]
    labels = backend.class_labels([prompt], vocal, torch.tensor([True]), torch.tensor([True]))
    backend.unet.eval()
    with torch.no_grad():
        return backend.predict_noise(x, torch.tensor([500]), labels)


@pytest.fixture(scope="module")
def batch() -> list[dict]:
    """Two cached-looking items (2 s each): VAE latents of instrumentals, CLAP embeddings of vocals."""
    backend = AudioLDMBackend.from_preset(config(), "tiny", seed=0)
    return [{"latents": backend.encode_audio(melody(10 + i, 2.0, SAMPLE_RATE)).numpy().astype(np.float16),
             "vocal_embedding": backend.vocal_embedding(melody(i, 2.0, 48000)).numpy(), "prompt": PROMPT}
            for i in range(2)]


@pytest.fixture(scope="module")
def trained(batch):
    """A tiny backend after 12 Adam steps on one fixed batch (same noise each step), and its losses."""
    backend = AudioLDMBackend.from_preset(config(condition_dropout=ConditionDropout(joint=0, text=0, vocal=0)), "tiny", seed=0)
    opt = torch.optim.Adam([p for _, p in backend.trainable_parameters()], lr=2e-3)
    losses = []
    for _ in range(12):
        loss, metrics = backend.train_step(batch, "voice_text", torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(metrics["loss"])
    return backend, losses


def test_mel_front_end_matches_vae_and_vocoder():
    spec = log_mel(tone(1000.0, 1.0, SAMPLE_RATE))
    assert spec.shape == (SAMPLE_RATE // HOP + 1, N_MELS)  # 100 frames per second (+1: centred frames), 64 bins
    centres = librosa.mel_frequencies(N_MELS + 2, fmin=0, fmax=8000)[1:-1]  # Slaney scale, as the filterbank
    assert abs(centres[int(spec.mean(0).argmax())] - 1000.0) < 60.0
    assert float(log_mel(np.zeros(16000)).max()) == pytest.approx(SILENCE)  # log(1e-5) floor
    backend = AudioLDMBackend.from_preset(config(), "tiny", seed=0)
    voc = backend.vocoder.config
    assert (voc.sampling_rate, voc.model_in_dim, int(np.prod(voc.upsample_rates))) == (SAMPLE_RATE, N_MELS, HOP)
    with torch.no_grad():
        wave = backend.vocoder(spec[None])
    # HiFi-GAN's first transposed conv (kernel 16, stride 5) adds one sample, 32 after upsampling: trimmed later.
    assert spec.shape[0] * HOP <= wave.shape[-1] < (spec.shape[0] + 1) * HOP
    z = backend.encode_audio(tone(440.0, 1.0, SAMPLE_RATE))
    assert z.shape == (backend.unet.config.in_channels, 25 + 1, N_MELS // 4)  # 100 frames padded to 104, /4


def test_mel_frames_are_centred_like_audioldms_stft():
    """AudioLDM's STFT reflect-pads n_fft / 2: frame i is centred on sample 160 i (not 5 ms later)."""
    from models.audioldm_mel import N_FFT, mel_basis
    audio = melody(3, 1.0, SAMPLE_RATE)
    x = torch.from_numpy(audio)
    reference = torch.stft(x, N_FFT, hop_length=HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="reflect",
                           return_complex=True).abs()  # centre=True pads n_fft / 2, as AudioLDM's STFT module
    expected = torch.log(torch.clamp(mel_basis() @ reference, min=1e-5)).T
    torch.testing.assert_close(log_mel(audio), expected, rtol=1e-4, atol=1e-4)
    for frame in (20, 50, 77):  # a click 40 samples before frame's centre: nearest to that frame, not the one before
        click = np.zeros(SAMPLE_RATE, np.float32)
        click[frame * HOP - 40] = 1.0
        assert int(log_mel(click).mean(1).argmax()) == frame


def test_widened_projection_reproduces_text_only_model():
    torch.manual_seed(0)
    text_only = tiny_unet(AudioLDMConfig().presets["tiny"].arch, class_dim=32).eval()
    widened = widen_class_projection(copy.deepcopy(text_only), 32).eval()
    assert widened.config.projection_class_embeddings_input_dim == 64
    x, t = torch.randn(2, 8, 8, 16), torch.tensor([10, 700])
    text = F.normalize(torch.randn(2, 32), dim=-1)
    with torch.no_grad():
        base = text_only(x, t, None, class_labels=text).sample
        for vocal in (F.normalize(torch.randn(2, 32), dim=-1), torch.zeros(2, 32)):
            out = widened(x, t, None, class_labels=torch.cat([text, vocal], -1)).sample
            # Equal up to float rounding: the zeroed vocal columns add exact zeros, but the wider matmul
            # may sum in another order (it depends on the BLAS blocking and thread count).
            torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6)


def test_loss_decreases_on_a_fixed_batch(trained):
    _, losses = trained
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses


def test_vocal_changes_noise_prediction(trained):
    backend, _ = trained
    assert not torch.allclose(probe(backend, vocal_seed=1), probe(backend, vocal_seed=2), atol=1e-6)
    fresh = AudioLDMBackend.from_preset(config(), "tiny", seed=0)  # step 0: the vocal columns are zero
    assert torch.equal(probe(fresh, vocal_seed=1), probe(fresh, vocal_seed=2))


def test_condition_dropout_rates():
    rates = ConditionDropout(recipe="independent", text=0.3, vocal=0.6)
    g = torch.Generator().manual_seed(0)
    keep_text, keep_vocal = condition_masks(40000, "voice_text", rates, g, train=True)
    assert 1 - keep_text.float().mean() == pytest.approx(0.3, abs=0.01)
    assert 1 - keep_vocal.float().mean() == pytest.approx(0.6, abs=0.01)
    assert (~keep_text & ~keep_vocal).float().mean() == pytest.approx(0.18, abs=0.01)  # independent
    joint = ConditionDropout(recipe="joint", joint=0.2, text=0.3, vocal=0.6)  # audiocraft's recipe
    keep_text, keep_vocal = condition_masks(40000, "voice_text", joint, g, train=True)
    assert 1 - keep_text.float().mean() == pytest.approx(0.2 + 0.8 * 0.3, abs=0.01)
    assert (~keep_text & ~keep_vocal).float().mean() == pytest.approx(0.2 + 0.8 * 0.18, abs=0.01)
    assert not condition_masks(1000, "voice", rates, g, train=True)[0].any()  # voice never shows the text
    assert not condition_masks(10, "voice", rates, g, train=False)[0].any()
    assert all(m.all() for m in condition_masks(1000, "voice_text", rates, g, train=False))
    with pytest.raises(ValueError):
        condition_masks(1, "text", rates, g, train=True)


def test_train_step_applies_the_dropped_conditions(batch):
    """With both conditions always dropped, the loss cannot depend on the prompt or the vocal."""
    backend = AudioLDMBackend.from_preset(config(condition_dropout=ConditionDropout(text=1, vocal=1)), "tiny", seed=0)
    backend.unet.class_embedding.weight.data.normal_()  # make the vocal columns matter
    other = [{**b, "prompt": "metal music", "vocal_embedding": -b["vocal_embedding"]} for b in batch]

    def loss(items, train):
        return backend.train_step(items, "voice_text", torch.Generator().manual_seed(3), train)[0]

    assert torch.equal(loss(batch, True), loss(other, True))
    assert not torch.equal(loss(batch, False), loss(other, False))  # validation keeps both conditions
    _, metrics = backend.train_step(batch, "voice", torch.Generator().manual_seed(3), train=False)
    assert metrics["text_kept"] == 0.0 and metrics["vocal_kept"] == 1.0


def test_train_step_under_autocast_and_checkpointing(batch):
    backend = AudioLDMBackend.from_preset(config(), "tiny", seed=0)
    backend.enable_gradient_checkpointing()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = backend.train_step(batch, "voice_text", torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for _, p in backend.trainable_parameters())
    assert all(p.grad is None for p in backend.clap.parameters())  # CLAP, VAE and vocoder stay frozen
    with pytest.raises(NotImplementedError):
        backend.setup_finetune("lora")


def test_prepare_reads_a_manifest_chunk(tmp_path):
    backend = AudioLDMBackend.from_preset(config(), "tiny", seed=0)
    chunk = {"instrumental_path": tmp_path / "inst.wav", "vocals_path": tmp_path / "voc.wav",
             "vocals_clap_path": tmp_path / "voc48.wav"}
    sf.write(chunk["instrumental_path"], melody(5, 2.0, 16000), 16000, subtype="FLOAT")  # no PCM rounding
    sf.write(chunk["vocals_path"], melody(6, 2.0, 16000), 16000)
    sf.write(chunk["vocals_clap_path"], melody(6, 2.0, 48000), 48000)
    out = backend.prepare(chunk)
    assert out["latents"].dtype == np.float16 and out["latents"].shape == (8, 50, 16)
    assert out["vocal_embedding"].dtype == np.float32 and out["vocal_embedding"].shape == (32,)
    assert np.linalg.norm(out["vocal_embedding"]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(out["latents"], backend.encode_audio(melody(5, 2.0, 16000)).numpy(), atol=2e-3)


def test_generation_in_all_three_modes(trained):
    backend, _ = trained
    vocal = melody(1, 2.0, 22050)
    outputs = {}
    for mode, (v, prompt) in {"voice": (vocal, None), "voice_text": (vocal, PROMPT), "text": (None, PROMPT)}.items():
        audio = backend.generate(v, 22050, prompt, duration_s=1.5, seed=7, steps=3)
        assert audio.dtype == np.float32 and audio.shape == (round(1.5 * backend.sample_rate),)
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0
        outputs[mode] = audio
    assert backend.sample_rate == 16000
    assert np.array_equal(outputs["voice"], backend.generate(vocal, 22050, None, 1.5, seed=7, steps=3))
    assert not np.array_equal(outputs["voice"], backend.generate(vocal, 22050, None, 1.5, seed=8, steps=3))
    assert not np.array_equal(outputs["voice"], outputs["text"])
    assert backend.generate(None, 16000, PROMPT, 0.37, seed=0, steps=1, guidance_scale=1.0).shape == (5920,)


def test_save_load_round_trip_is_exact(trained, tmp_path):
    backend, _ = trained
    backend.save(tmp_path / "model")
    loaded = AudioLDMBackend.load(tmp_path / "model")
    assert torch.equal(probe(loaded), probe(backend))
    assert loaded.cfg == backend.cfg and len(loaded.tokenizer) == len(backend.tokenizer)
    vocal = melody(1, 1.0, 16000)
    assert np.array_equal(loaded.generate(vocal, 16000, PROMPT, 1.0, seed=3, steps=2),
                          backend.generate(vocal, 16000, PROMPT, 1.0, seed=3, steps=2))


def test_missing_weights_folder_names_folder_and_files(tmp_path):
    cfg = AudioLDMConfig(presets={"audioldm-s": AudioLDMPreset(weights=str(tmp_path / "audioldm-s"))})
    with pytest.raises(WeightsNotFoundError) as err:
        AudioLDMBackend.from_preset(cfg, "audioldm-s")
    assert str(tmp_path / "audioldm-s") in str(err.value)
    assert all((name if isinstance(name, str) else name[0]) in str(err.value) for name in REQUIRED_FILES)
    (tmp_path / "audioldm-s" / "unet").mkdir(parents=True)
    with pytest.raises(WeightsNotFoundError, match="lacks unet/config.json"):
        AudioLDMBackend.from_preset(cfg, "audioldm-s")


def test_a_folder_without_audioldms_text_encoder_is_refused(tmp_path):
    """clap/ holds a CLAP text tower too, but not the one the UNet was trained with: never a silent fallback."""
    import shutil
    AudioLDMBackend.from_preset(config(), "tiny", seed=0).save(tmp_path / "w")
    shutil.rmtree(tmp_path / "w" / "text_encoder")
    with pytest.raises(WeightsNotFoundError, match="lacks text_encoder/config.json"):
        AudioLDMBackend.from_preset(with_weights(config(), str(tmp_path / "w")), "real")
    with pytest.raises(WeightsNotFoundError, match="no text_encoder/.*not used in its place"):
        AudioLDMBackend.load(tmp_path / "w")


def test_mismatched_components_are_refused():
    """A tokenizer that silently fell back to Roberta's 5-token default must not pass for the real one."""
    from transformers import RobertaTokenizer

    from models.audioldm_tiny import build_tiny
    parts = build_tiny(AudioLDMConfig().presets["tiny"].arch, seed=0)
    with pytest.raises(ValueError, match="tokenizer has 5 tokens"):
        AudioLDMBackend({**parts, "tokenizer": RobertaTokenizer()}, config(), "tiny")


def test_real_weights_from_a_saved_folder(trained, tmp_path):
    backend, _ = trained
    backend.save(tmp_path / "w")
    loaded = AudioLDMBackend.from_preset(with_weights(config(), str(tmp_path / "w")), "real")
    assert torch.equal(probe(loaded), probe(backend))


def test_pretrained_layout_text_only_unet_and_text_encoder(tmp_path):
    """An AudioLDM-S-shaped folder: text-only UNet (P inputs) and a separate ClapTextModelWithProjection, as in
    cvssp/audioldm-s-full-v2. Loading widens the UNet (same output for any vocal) and takes the text tower
    from text_encoder/, giving the embedding the diffusers AudioLDMPipeline would compute."""
    from transformers import ClapTextModelWithProjection
    source = AudioLDMBackend.from_preset(config(), "tiny", seed=0)
    source.save(tmp_path / "w")
    torch.manual_seed(1)
    text_only = tiny_unet(AudioLDMConfig().presets["tiny"].arch, class_dim=32)
    text_only.save_pretrained(tmp_path / "w" / "unet")
    torch.manual_seed(2)
    encoder = ClapTextModelWithProjection(source.clap.config.text_config).eval()  # not clap/'s text weights
    encoder.save_pretrained(tmp_path / "w" / "text_encoder")

    loaded = AudioLDMBackend.from_preset(with_weights(config(), str(tmp_path / "w")), "real")
    assert loaded.unet.class_embedding.in_features == 64
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        pipeline_embedding = F.normalize(encoder(**ids).text_embeds, dim=-1)[0]  # what AudioLDMPipeline does
        x, t = torch.randn(1, 8, 8, 16), torch.tensor([300])
        base = text_only.eval()(x, t, None, class_labels=pipeline_embedding[None]).sample
    torch.testing.assert_close(loaded.text_embedding(PROMPT), pipeline_embedding, rtol=0, atol=1e-6)
    assert not torch.allclose(source.text_embedding(PROMPT), pipeline_embedding, atol=1e-3)
    loaded.unet.eval()
    for seed in (1, 2):  # the widened UNet ignores the vocal until trained
        labels = loaded.class_labels([PROMPT], loaded.vocal_embedding(melody(seed, 1.0, 48000))[None],
                                     torch.tensor([True]), torch.tensor([True]))
        with torch.no_grad():
            torch.testing.assert_close(loaded.predict_noise(x, t, labels), base, rtol=0, atol=1e-5)


def test_real_weights_from_s3(trained, tmp_path, monkeypatch):
    from v2m.s3server import SeaweedS3
    backend, _ = trained
    backend.save(tmp_path / "w")
    with SeaweedS3(tmp_path / "s3", buckets=["weights"]) as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        client = s3.client()
        files = [p for p in (tmp_path / "w").rglob("*") if p.is_file()]
        for path in files:
            client.upload_file(str(path), "weights", f"audioldm/tiny/{path.relative_to(tmp_path / 'w')}")
        cfg = with_weights(config(), "s3://weights/audioldm/tiny")
        loaded = AudioLDMBackend.from_preset(cfg, "real", cache_root=tmp_path / "cache")
    local = tmp_path / "cache" / "weights" / "audioldm" / "tiny"
    assert (local / ".complete.json").is_file() and len([p for p in local.rglob("*") if p.is_file()]) == len(files) + 1
    assert torch.equal(probe(loaded), probe(backend))
    again = AudioLDMBackend.from_preset(cfg, "real", cache_root=tmp_path / "cache")  # server gone: the cache serves
    assert torch.equal(probe(again), probe(backend))
