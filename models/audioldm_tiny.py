"""Random-init AudioLDM components for the `tiny` preset: the same classes and wiring as AudioLDM-S, tiny widths.

Everything builds offline. The CLAP tokenizer is a byte-level BPE (Roberta's scheme) trained in memory on a
built-in corpus of the prompts this project writes, because a bare `RobertaTokenizer()` silently maps every text
to the same ids (see shared/notes/stack-facts.md).
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (ClapConfig, ClapFeatureExtractor, ClapModel, RobertaTokenizer, SpeechT5HifiGan,
                          SpeechT5HifiGanConfig)

from models import audioldm_mel as mel

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # Roberta's ids 0..4
TOKENIZER_VOCAB = 512  # BPE target; the corpus yields fewer merges, so the real size is asserted, not assumed
GENRES = ["pop", "rock", "disco", "classical", "jazz", "hip hop", "electronic", "folk", "metal", "ambient"]
MOODS = ["upbeat", "calm", "melancholic", "danceable", "dark", "happy", "energetic", "sad"]
KEYS = [f"{n} {m}" for n in ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"] for m in ("major", "minor")]


def prompt_corpus() -> list[str]:
    """Texts shaped like the prompt templates (genre / mood / bpm / key), to train the tiny tokenizer on."""
    texts = [f"{g} music for input vocals" for g in GENRES]
    for i, (genre, mood) in enumerate((g, m) for g in GENRES for m in MOODS):
        texts.append(f"{genre} music, {mood} mood, {60 + 7 * (i % 20)} bpm, in {KEYS[i % len(KEYS)]}")
    return texts + [" ".join(KEYS), " ".join(str(bpm) for bpm in range(40, 240))]


def offline_tokenizer() -> RobertaTokenizer:
    """A Roberta byte-level BPE tokenizer trained on prompt_corpus(), deterministic, no network."""
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(prompt_corpus(), vocab_size=TOKENIZER_VOCAB, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    with tempfile.TemporaryDirectory() as d:
        bpe.save_model(d)
        tokenizer = RobertaTokenizer.from_pretrained(d)
    # A failed load falls back to a 5-token vocabulary without an error: check we got the merges we trained.
    assert len(tokenizer) == bpe.get_vocab_size() > 256 + len(SPECIAL_TOKENS), len(tokenizer)
    return tokenizer


def tiny_unet(arch, class_dim: int) -> UNet2DConditionModel:
    """AudioLDM-S's UNet layout (first level plain, deeper levels with attention whose "cross" attention attends
    to itself since AudioLDM passes no encoder states; the CLAP embedding enters through a simple projection
    concatenated to the time embedding) at tiny widths. `class_dim` is the TEXT-only width, as pretrained."""
    ch = tuple(arch.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(ch) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        in_channels=arch.latent_channels, out_channels=arch.latent_channels, down_block_types=down,
        up_block_types=up, block_out_channels=ch, layers_per_block=1, cross_attention_dim=ch,
        attention_head_dim=8, norm_num_groups=min(32, ch[0]), class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=class_dim, class_embeddings_concat=True)


def tiny_vae(arch) -> AutoencoderKL:
    """A 3-level VAE (4x down in time and mel, as AudioLDM's) on one-channel log-mels."""
    ch = tuple(arch.vae_channels)
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * len(ch),
                         up_block_types=("UpDecoderBlock2D",) * len(ch), block_out_channels=ch,
                         latent_channels=arch.latent_channels, layers_per_block=1, norm_num_groups=min(32, ch[0]))


def tiny_vocoder(arch) -> SpeechT5HifiGan:
    """HiFi-GAN with AudioLDM's upsampling (5*4*2*2*2 = 160 = the mel hop) and input (64 bins, no normalisation)."""
    config = SpeechT5HifiGanConfig(
        model_in_dim=mel.N_MELS, sampling_rate=mel.SAMPLE_RATE, upsample_initial_channel=arch.vocoder_channels,
        upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]], normalize_before=False,
        # The default 0.01 compounds to ~1e-9 output, and 0.1 to -65 dBFS: the evaluation's sanity check (on the
        # raw output) calls that silence. 0.2 gives about -16 dBFS peaks; 0.3 already clips.
        initializer_range=0.2)
    return SpeechT5HifiGan(config)


def tiny_clap(arch, vocab_size: int) -> ClapModel:
    """CLAP with a 2-layer Roberta text tower and a 2-stage HTSAT audio tower, both projected to clap_dim."""
    d = arch.clap_dim
    text = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=128)
    audio = dict(patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[1, 2], hidden_size=32,
                 window_size=8, spec_size=256, num_mel_bins=64)
    return ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=d))


def clap_feature_extractor() -> ClapFeatureExtractor:
    """The unfused LAION CLAP front end AudioLDM's CLAP uses: 48 kHz, 10 s windows, 64 mel bins 50 Hz-14 kHz."""
    return ClapFeatureExtractor(sampling_rate=48000, max_length_s=10, feature_size=64, frequency_min=50,
                                frequency_max=14000, truncation="rand_trunc", padding="repeatpad")


def audioldm_scheduler() -> DDIMScheduler:
    """AudioLDM's noise schedule (scaled-linear betas 0.0015..0.0195 over 1000 steps), DDIM sampling, epsilon."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def build_tiny(arch, seed: int) -> dict:
    """All components, random-init and deterministic from `seed` (each built under its own derived seed so that
    changing one architecture knob does not reshuffle the others' weights)."""
    tokenizer = offline_tokenizer()
    parts = {}
    for i, (name, make) in enumerate([("unet", lambda: tiny_unet(arch, arch.clap_dim)), ("vae", lambda: tiny_vae(arch)),
                                      ("vocoder", lambda: tiny_vocoder(arch)),
                                      ("clap", lambda: tiny_clap(arch, len(tokenizer)))]):
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
            torch.manual_seed(seed * 1000 + i)
            parts[name] = make()
    return {**parts, "tokenizer": tokenizer, "feature_extractor": clap_feature_extractor(),
            "scheduler": audioldm_scheduler()}
