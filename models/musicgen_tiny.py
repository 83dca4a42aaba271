"""The tiny preset: a random-init MusicGen-Melody small enough to train on a CPU, built entirely offline.

Same architecture as facebook/musicgen-melody, scaled down (params.yaml `musicgen.presets.tiny.arch`):
- a T5 text encoder, with a sentencepiece tokenizer trained here on a built-in corpus of prompt-like text;
- a 32 kHz mono EnCodec with the real model's strides (8·5·4·4 = 640 samples, 50 code frames per second);
- the MusicGen-Melody decoder: `num_codebooks` parallel streams of `codebook_size` codes, prefix-conditioned
  on [chroma ; text].

What random init cannot give: a freshly built EnCodec has all-zero codebooks, so every frame would encode to
code 0. We seed each residual codebook with k-means on the encoder's outputs for some audio, so the codes
carry information and training has something to learn.
"""

from __future__ import annotations

import functools
import io
import itertools
import math

import numpy as np
import torch

from models.musicgen_chroma import HOP, NUM_CHROMA, SAMPLE_RATE

CODEC_RATIOS = [8, 5, 4, 4]  # EnCodec 32 kHz: hop 640 samples = 50 Hz, like the real model
FRAME_RATE = SAMPLE_RATE // math.prod(CODEC_RATIOS)
CHROMA_LENGTH = 30 * SAMPLE_RATE // HOP + 1  # 235 frames = the real model's 30 s window
KMEANS_ITERS = 8


# --- text: an offline T5 tokenizer -------------------------------------------------------------------
GENRES = ["pop", "rock", "disco", "classical", "jazz", "blues", "hip hop", "electronic", "ambient", "folk",
          "country", "reggae", "metal", "funk", "soul", "r&b", "latin", "lo-fi", "orchestral", "techno", "house",
          "gospel", "punk", "indie", "trap", "synthwave", "bossa nova", "afrobeat", "k-pop", "chanson", "arabic"]
MOODS = ["upbeat", "melancholic", "calm", "danceable", "energetic", "dark", "happy", "sad", "dreamy", "epic",
         "romantic", "relaxed", "aggressive", "uplifting", "peaceful", "tense", "joyful", "nostalgic"]
INSTRUMENTS = ["piano", "guitar", "bass", "drums", "strings", "synth", "organ", "violin", "brass", "choir"]
DESCRIPTORS = ["warm", "bright", "punchy", "lush", "sparse", "driving", "groovy", "heavy", "soft", "cinematic",
               "acoustic", "electric", "vintage", "modern", "minimal", "layered", "swinging", "syncopated",
               "reverberant", "distorted", "mellow", "catchy", "hypnotic", "atmospheric", "rhythmic", "melodic",
               "harmonic", "percussive", "instrumental", "accompaniment", "arrangement", "backing", "chorus",
               "verse", "bridge", "intro", "outro", "beat", "tempo", "slow", "fast", "medium", "loud", "quiet"]
LANGUAGES = ["English", "French", "Arabic", "Spanish", "German", "Italian", "Portuguese", "Japanese", "Korean"]
KEYS = [f"{n} {m}" for n, m in itertools.product(
    ["C", "C#", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"], ["major", "minor"])]


def text_corpus() -> list[str]:
    """Prompt-like sentences covering the project's templates ("{genre} music for input vocals",
    "{genre} music, {mood} mood, {bpm} bpm, in {key}") plus free descriptions; deterministic."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(1000):
        g, m, ins = GENRES[i % len(GENRES)], MOODS[i % len(MOODS)], INSTRUMENTS[i % len(INSTRUMENTS)]
        key, bpm = KEYS[int(rng.integers(len(KEYS)))], int(rng.integers(50, 200))
        lines += [f"{g} music for input vocals", f"{g.capitalize()} music for input vocals",
                  f"{g} music, {m} mood, {bpm} bpm, in {key}",
                  f"An {m} {g} track with {ins} and {INSTRUMENTS[(i * 7) % len(INSTRUMENTS)]}.",
                  f"{m.capitalize()} {g} song at {bpm} BPM in {key}; {ins}-driven, {1950 + 10 * (i % 7)}s style!",
                  f"{DESCRIPTORS[i % len(DESCRIPTORS)]} {DESCRIPTORS[(i * 5) % len(DESCRIPTORS)]} {g} backing for a "
                  f"{LANGUAGES[i % len(LANGUAGES)]} singer, {ins} solo"]
    return lines


@functools.lru_cache(maxsize=4)
def _sentencepiece_vocab(vocab_size: int) -> tuple[tuple[str, float], ...]:
    """(piece, score) pairs of a unigram model trained in memory on text_corpus() (deterministic, cached)."""
    import sentencepiece as spm
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text_corpus()), model_writer=proto, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    return tuple((sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size()))


def train_tokenizer(vocab_size: int):
    """A T5Tokenizer with exactly `vocab_size` pieces: sentencepiece unigram trained in memory.

    T5's special ids are kept (<pad> 0, </s> 1, <unk> 2; no <s>). `T5Tokenizer(vocab_file=...)` is silently
    ignored by transformers 5, so the pieces and scores are passed as `vocab`."""
    from transformers import T5Tokenizer
    tokenizer = T5Tokenizer(vocab=list(_sentencepiece_vocab(vocab_size)), extra_ids=0)
    assert len(tokenizer) == vocab_size, f"tiny tokenizer has {len(tokenizer)} pieces, expected {vocab_size}"
    return tokenizer


# --- the model ---------------------------------------------------------------------------------------
def codec_bandwidth(num_codebooks: int, codebook_size: int) -> float:
    """EnCodec bandwidth (kbps) that selects exactly `num_codebooks` residual quantizers (2.2 for 4 × 2048)."""
    bits = math.log2(codebook_size)
    return (num_codebooks * FRAME_RATE * bits + 0.5) / 1000  # + 0.5 bps: EnCodec floors; keep float noise out


def tiny_config(arch):
    """MusicgenMelodyConfig for a `MusicGenArch` (params.yaml `musicgen.presets.<name>.arch`)."""
    from transformers import EncodecConfig, MusicgenMelodyConfig, MusicgenMelodyDecoderConfig, T5Config
    text = T5Config(vocab_size=arch.text_vocab, d_model=arch.text_d_model, d_kv=arch.text_d_model // arch.text_heads,
                    d_ff=arch.text_ff, num_layers=arch.text_layers, num_heads=arch.text_heads, dropout_rate=0.0,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    codec = EncodecConfig(sampling_rate=SAMPLE_RATE, audio_channels=1, upsampling_ratios=CODEC_RATIOS,
                          num_filters=arch.codec_filters, hidden_size=arch.codec_dim, codebook_size=arch.codebook_size,
                          target_bandwidths=[codec_bandwidth(arch.num_codebooks, arch.codebook_size)],
                          use_causal_conv=False, use_conv_shortcut=False, num_lstm_layers=1, normalize=False)
    assert codec.num_quantizers == arch.num_codebooks and codec.frame_rate == FRAME_RATE
    # pad = bos = codebook_size: one id past the codes (the decoder's embeddings have vocab + 1 rows).
    decoder = MusicgenMelodyDecoderConfig(vocab_size=arch.codebook_size, num_codebooks=arch.num_codebooks,
                                          hidden_size=arch.decoder_hidden, num_hidden_layers=arch.decoder_layers,
                                          num_attention_heads=arch.decoder_heads, ffn_dim=arch.decoder_ffn,
                                          dropout=arch.dropout, pad_token_id=arch.codebook_size, bos_token_id=arch.codebook_size)
    return MusicgenMelodyConfig(text_encoder=text, audio_encoder=codec, decoder=decoder, num_chroma=NUM_CHROMA,
                                chroma_length=CHROMA_LENGTH)


def synthetic_clips() -> list[np.ndarray]:
    """Fixed audio for codebook seeding when no instrumental clips are given: 0.5 s each of harmonic tones over
    four octaves, a triad, white and brown noise, a click train and a near-silence (32 kHz, deterministic)."""
    rng = np.random.default_rng(0)
    n = SAMPLE_RATE // 2
    t = np.arange(n) / SAMPLE_RATE
    clips = []
    for midi in range(36, 85, 7):
        f0 = 440.0 * 2 ** ((midi - 69) / 12)
        clips.append(sum(0.3 / h * np.sin(2 * np.pi * h * f0 * t) for h in (1, 2, 3)))
    clips.append(sum(0.2 * np.sin(2 * np.pi * 261.63 * r * t) for r in (1, 1.26, 1.5)))
    clips.append(0.3 * rng.standard_normal(n))
    brown = np.cumsum(rng.standard_normal(n))
    clips.append(0.5 * brown / np.abs(brown).max())
    clicks = np.zeros(n)
    clicks[:: SAMPLE_RATE // 8] = 1.0
    clips.append(clicks)
    clips.append(1e-4 * rng.standard_normal(n))
    return [c.astype(np.float32) for c in clips]


def _kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """[k, D] centroids of x [N, D], seeded from k distinct data points; empty clusters keep their centroid."""
    centroids = x[torch.randperm(len(x), generator=generator)[:k]]
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


@torch.no_grad()
def seed_codebooks(codec, clips: list[np.ndarray], generator: torch.Generator) -> None:
    """Fill EnCodec's residual codebooks in place: layer q is k-means on what layers < q left unexplained.

    With few frames, k = frames / 4 clusters (not one per frame, which would leave later layers nothing to
    quantize); the remaining rows repeat those centroids, so a sampled code always decodes to something the
    codec has seen, and encoding picks the first copy (torch.max returns the first maximal index)."""
    audio = torch.from_numpy(np.concatenate(clips).astype(np.float32))[None, None]
    residual = codec.encoder(audio)[0].T  # [frames, D]
    for layer in codec.quantizer.layers:
        book = layer.codebook
        k = max(1, min(book.codebook_size, len(residual) // 4))
        centroids = _kmeans(residual, k, generator)
        table = centroids[torch.arange(book.codebook_size) % k]
        book.embed.copy_(table)
        book.embed_avg.copy_(table)
        book.cluster_size.fill_(1.0)
        residual = residual - table[book.quantize(residual)]


def build_tiny(arch, seed: int, init_audio: list[np.ndarray] | None):
    """(model, tokenizer) for a random-init preset, identical for the same arch, seed and init_audio."""
    from transformers import GenerationConfig, MusicgenMelodyForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MusicgenMelodyForConditionalGeneration(tiny_config(arch)).eval()
    clips = init_audio if init_audio else synthetic_clips()
    seed_codebooks(model.audio_encoder, clips, torch.Generator().manual_seed(seed))
    pad = arch.codebook_size
    # MusicGen's sampling defaults (audiocraft: top-k 250, CFG 3), saved with the model as generation_config.json.
    model.generation_config = GenerationConfig(do_sample=True, top_k=250, guidance_scale=3.0, max_length=1500,
                                               pad_token_id=pad, bos_token_id=pad, decoder_start_token_id=pad)
    return model, train_tokenizer(arch.text_vocab)
