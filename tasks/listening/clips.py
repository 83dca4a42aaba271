"""The audio of a listening test: for each model of the pair and each of the first test chunks, the model's
instrumental mixed with the vocal, as a WAV file under .v2m/listening/clips/.

The instrumental is the one evaluation produces for that chunk (same chunk order, seed, duration and
prompt): taken from the model version's evaluation run when it logged that chunk's audio with the same
settings and data, generated through tasks/evaluation's `generate_chunk` otherwise. Clips are cached per
(model version, settings, data version), so a restart serves them without loading a model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from tasks.data.track_cache import confined
from tasks.orchestration import params_hash
from v2m.audio import read_mono, resample, write_wav
from v2m.config import Params
from v2m.errors import UserError

MIX_RMS = 0.1  # both stems at the same level (-20 dBFS RMS), so loudness gives neither model away
MIX_PEAK = 0.89  # -1 dBFS


class ListeningSetupError(UserError, ValueError):
    """The pair of models cannot be resolved (no challenger, no champion, an unknown reference)."""


@dataclass
class ListeningSet:
    backend: str
    models: tuple[str, str]  # registered versions, "NAME/VERSION"; the first is the one the gate judges
    roles: dict[str, str]  # model -> "challenger" / "champion" (shown only once a listener has finished)
    chunks: list[dict[str, Any]]  # chunk_id, genre, language, in test-split order
    clips: dict[tuple[str, str], Path] = field(default_factory=dict)  # (model, chunk_id) -> mix

    def clip(self, model: str, chunk_id: str) -> Path:
        return self.clips[(model, chunk_id)]


def version_ref(ref: str) -> str:
    """`NAME@alias` or `NAME/VERSION` -> `NAME/VERSION` (votes name fixed versions, not moving aliases)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    name, sep, rest = ref.partition("@")
    if not sep:
        name, _, rest = ref.rpartition("/")
        if not name or not rest.isdigit():
            raise ListeningSetupError(f"{ref!r}: name a registered version, NAME@alias or NAME/VERSION")
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, rest) if sep else client.get_model_version(name, rest)
    except MlflowException as exc:
        raise ListeningSetupError(f"{ref!r}: no such registered model version ({exc.message})") from exc
    return f"{name}/{mv.version}"


def resolve_pair(backend: str, models: list[str] | None) -> tuple[tuple[str, str], dict[str, str]]:
    """The two versions to compare and their roles: by default the challenger and the champion."""
    from tasks.registry.registry import CHALLENGER, CHAMPION, model_name
    if models:
        if len(models) != 2:
            raise ListeningSetupError(f"name exactly two models to compare (got {len(models)})")
        pair = (version_ref(models[0]), version_ref(models[1]))
        if pair[0] == pair[1]:
            raise ListeningSetupError(f"{models[0]} and {models[1]} are the same version: nothing to compare")
        return pair, {pair[0]: "model 1", pair[1]: "model 2"}
    name = model_name(backend)
    challenger, champion = (version_ref(f"{name}@{alias}") if _has_alias(name, alias) else None
                            for alias in (CHALLENGER, CHAMPION))
    if challenger is None or champion is None or challenger == champion:
        raise ListeningSetupError(f"{name}: a listening test needs a challenger and a different champion "
                                  f"(challenger {challenger}, champion {champion}); or name two models")
    return (challenger, champion), {challenger: CHALLENGER, champion: CHAMPION}


def _has_alias(name: str, alias: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    try:
        MlflowClient().get_model_version_by_alias(name, alias)
        return True
    except MlflowException:
        return False


def mix(vocal: np.ndarray, vocal_sr: int, inst: np.ndarray, sr: int) -> np.ndarray:
    """Vocal + instrumental at `sr`, each at MIX_RMS, scaled down if the sum would clip."""
    vocal = resample(vocal, vocal_sr, sr)
    n = min(len(vocal), len(inst))
    out = np.zeros(n, np.float32)
    for stem in (vocal[:n], inst[:n]):
        rms = float(np.sqrt(np.mean(np.square(stem, dtype=np.float64)))) if n else 0.0
        if rms > 1e-6:  # a silent stem stays silent
            out += stem * np.float32(MIX_RMS / rms)
    peak = float(np.max(np.abs(out))) if n else 0.0
    return out * np.float32(MIX_PEAK / peak) if peak > MIX_PEAK else out


def served_clip(path: Path, pair: list[Path], key: bytes) -> bytes:
    """The clip at `path` as 16-bit WAV bytes for one listener: cut to the shorter clip of its trial's `pair`
    (both sides the same length), plus a TPDF dither of one 16-bit step drawn from `key` (inaudible, at
    -90 dBFS; the same clip's bytes then differ from one listener to the next and map to no model)."""
    n = min(sf.info(str(p)).frames for p in pair)
    audio, sr = sf.read(str(path), dtype="float32", frames=n)
    rng = np.random.default_rng(int.from_bytes(key[:16], "little"))
    step = np.float32(1 / 32768)
    audio = audio + (rng.random(audio.shape, np.float32) - rng.random(audio.shape, np.float32)) * step
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _cached_eval_audio(model: str, duration: float, split: str, seed: int, data_version: str,
                       dest: Path) -> dict[str, tuple[Path, Path]]:
    """chunk_id -> (vocal, output) files from the version's evaluation run, if it used these settings."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    name, _, version = model.rpartition("/")
    run_id = client.get_model_version(name, version).tags.get("eval_run_id")
    if not run_id:
        return {}
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return {}
    p, tags = run.data.params, run.data.tags
    if (p.get("split"), p.get("seed"), tags.get("data_version")) != (split, str(seed), data_version) or \
            float(p.get("duration_s", -1)) != duration:
        return {}
    names = {Path(a.path).name for a in client.list_artifacts(run_id, "audio")}
    out = {}
    for fname in names:
        if fname.endswith("_output.wav") and fname.replace("_output.wav", "_vocal.wav") in names:
            chunk = fname.removesuffix("_output.wav")
            files = [Path(client.download_artifacts(run_id, f"audio/{chunk}_{kind}.wav", str(dest)))
                     for kind in ("vocal", "output")]
            out[chunk] = (files[0], files[1])
    return out


def prepare(params: Params, root: Path, backend: str, models: list[str] | None = None,
            progress=None) -> ListeningSet:
    """Resolve the pair and make sure every clip exists; generation happens only for clips not on disk."""
    from models import configure_torch
    from tasks.evaluation.evaluate import eval_chunks, generate_chunk, load_for_eval
    from tasks.training.finetune import data_version_of, mode_settings
    root = Path(root).resolve()
    pair, roles = resolve_pair(backend, models)
    cfg, lcfg = params.evaluation, params.listening
    duration = lcfg.duration_s or cfg.duration_s
    chunks = eval_chunks(params, root, backend)[: lcfg.max_chunks]
    data_version = data_version_of(root)
    ls = ListeningSet(backend, pair, roles, [{k: c.get(k) for k in ("chunk_id", "genre", "language")}
                                             for c in chunks])
    for model in pair:
        key = params_hash(model, duration, cfg.split, cfg.seed, data_version, [c["chunk_id"] for c in chunks])
        folder = root / ".v2m" / "listening" / "clips" / f"{model.replace('/', '-')}-{key[:12]}"
        paths = {c["chunk_id"]: confined(folder, f"{c['chunk_id']}.wav") for c in chunks}  # ids come from data
        missing = [i for i, c in enumerate(chunks) if not paths[c["chunk_id"]].is_file()]
        if missing:
            cached = _cached_eval_audio(model, duration, cfg.split, cfg.seed, data_version, folder / ".eval")
            loaded = None
            for i in missing:
                chunk = chunks[i]
                if chunk["chunk_id"] in cached:
                    (vocal, vsr), (out, sr) = (read_mono(f) for f in cached[chunk["chunk_id"]])
                else:
                    if loaded is None:  # load the model only when some clip has to be generated
                        configure_torch(params.torch_threads)
                        b, lineage = load_for_eval(params, root, model)
                        loaded = (b, *mode_settings(params, b.name, lineage["mode"]))
                    b, conditioning, template = loaded
                    vocal, vsr, *_, out = generate_chunk(b, chunk, i, cfg.seed, duration, conditioning, template)
                    sr = b.sample_rate
                tmp = paths[chunk["chunk_id"]].with_suffix(".tmp.wav")
                write_wav(tmp, mix(vocal, vsr, out, sr), sr)
                tmp.replace(paths[chunk["chunk_id"]])  # a clip on disk is always complete
                if progress:
                    progress(model, chunk["chunk_id"], chunk["chunk_id"] in cached)
        ls.clips |= {(model, cid): p for cid, p in paths.items()}
    return ls
