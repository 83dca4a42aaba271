"""The evaluation task: generate for every vocal of the frozen test split and score what came out.

    model (folder | run | registered version | the base model)  +  data/segments/<backend>.jsonl (split=test)
      -> for each test chunk: generate(vocal, its genre prompt if the model was trained with text, fixed seed)
      -> per-sample metrics (tasks/evaluation/metrics.py) + FAD of generated vs true instrumentals
      -> aggregates, per-language and per-genre breakdowns
      -> an MLflow run in `voice2music-evaluation`: metrics, the per-sample table, the per-chunk FAD
         embeddings (for the paired FAD bootstrap), audio for a fixed subset; tags `test_fingerprint` (which
         chunks, which source audio) and `eval_settings` (how they were scored), the two things two
         evaluations must share to be compared; a registered version gets the run id as `eval_run_id`.

Sanity (clipping, NaN, silence) is measured on the raw model output, before generate()'s peak normalisation.
Every evaluation is cached by model (its training run), data version, settings and code: asking again
returns the finished run.

Breakdowns are means over the same per-sample rows as the aggregate, so a count-weighted mean of the
groups gives the aggregate back (tested). FAD is set-level and only reported for the whole test set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models import BACKENDS, configure_torch, default_device
from models.base import Backend, peak_normalize
from tasks.data.cache_inputs import CACHE_ROOT, backend_code_version, format_prompt, load_base
from tasks.data.segment import test_fingerprint
from tasks.data.track_cache import code_version, read_jsonl
from tasks.evaluation.fad import ClapEmbedder, MelStatsEmbedder, fad_from_embeddings
from tasks.evaluation.metrics import aggregate, compute_sample_metrics
from tasks.orchestration import params_hash
from tasks.training.finetune import data_version_of, mode_settings
from v2m.audio import read_mono, write_wav
from v2m.config import Params
from v2m.errors import UserError
from v2m.tracking import EXPERIMENTS, experiment_id, setup_mlflow

BASE_PREFIX = "base:"  # `base:musicgen` evaluates the pretrained (or tiny random-init) base model: the baseline


class EvaluationError(UserError, ValueError):
    """Nothing to evaluate (empty split, unknown model); the message says what is missing."""


@dataclass
class EvalResult:
    run_id: str
    backend: str
    metrics: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)
    test_fingerprint: str = ""
    settings: str = ""
    # per chunk (rows' order): window embeddings of the generation and of the reference, for FAD
    generated: list[np.ndarray] = field(default_factory=list, repr=False)
    references: list[np.ndarray] = field(default_factory=list, repr=False)


def scored_fingerprint(records: list[dict[str, Any]]) -> str:
    """Which chunks an evaluation scored, by the data stage's test-set fingerprint (chunk ids, spans, source
    content hashes): equal to the data version's `test_fingerprint` when the whole test split is scored.
    Two evaluations are comparable only when this and eval_settings are equal."""
    return test_fingerprint([{**r, "split": "test"} for r in records])


def eval_settings(params: Params) -> str:
    """How chunks are scored (generation length, seeds, embedder, sample cap) and the scoring code."""
    cfg = params.evaluation.model_dump(exclude={"audio_samples"})  # what is logged as audio changes no number
    return params_hash(cfg, params.seed, code_version(*Path(__file__).parent.glob("*.py")))[:16]


def load_for_eval(params: Params, root: Path, ref: str) -> tuple[Backend, dict[str, str]]:
    """The model and what is known of its lineage (mode, run, registered version)."""
    if ref.startswith(BASE_PREFIX):
        name = ref.removeprefix(BASE_PREFIX)
        backend, info = load_base(params, name, root / CACHE_ROOT / name, device=default_device())
        return backend, {"mode": "voice_text", "baseline": "true", **info}
    from mlflow.tracking import MlflowClient

    from models.refs import resolve_model, to_model_uri
    backend = resolve_model(ref, device=default_device())
    lineage: dict[str, str] = {"baseline": "false", "backend": backend.name}
    if not Path(ref).is_dir():
        uri = to_model_uri(ref)
        client = MlflowClient()
        if uri.startswith("models:/") and not uri.startswith("models:/m-"):
            name, _, rest = uri.removeprefix("models:/").partition("@" if "@" in uri else "/")
            mv = client.get_model_version_by_alias(name, rest) if "@" in uri else client.get_model_version(name, rest)
            lineage |= {"registered_model": name, "model_version": str(mv.version), "source_run_id": mv.run_id or ""}
            tags = mv.tags
        else:
            run_id = uri.removeprefix("runs:/").split("/")[0]
            lineage["source_run_id"] = run_id
            tags = client.get_run(run_id).data.tags
        lineage["mode"] = tags.get("stage") or tags.get("variant") or "voice_text"
    else:
        lineage["mode"] = "voice_text"
    return backend, lineage


def eval_key(params: Params, root: Path, ref: str, lineage: dict[str, str], split: str) -> str | None:
    """What determines an evaluation's outcome, hashed; None for references that can change underneath
    (a folder). Aliases were resolved to their version by load_for_eval."""
    if Path(ref).is_dir():
        return None
    # a registered version and its training run are the same weights: one cache entry for both
    model = lineage.get("source_run_id") or lineage.get("model_version") and \
        f"{lineage['registered_model']}/{lineage['model_version']}" or ref
    backend_cfg = getattr(params, ref.removeprefix(BASE_PREFIX)).model_dump() if ref.startswith(BASE_PREFIX) else None
    backend = lineage.get("backend") or ref.removeprefix(BASE_PREFIX)
    return params_hash(model, params.evaluation.model_dump(), split, data_version_of(root), backend_cfg,
                       lineage.get("mode"), params.seed, backend_code_version(backend) if backend in BACKENDS else "",
                       code_version(*Path(__file__).parent.glob("*.py")))


def finished_eval(experiment: str, key: str) -> EvalResult | None:
    from mlflow.tracking import MlflowClient
    runs = MlflowClient().search_runs([experiment], f"tags.eval_key = '{key}' and attributes.status = 'FINISHED'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    return load_eval_run(runs[0].info.run_id) if runs else None


def load_eval_run(run_id: str) -> EvalResult:
    """A finished evaluation run as it was logged: metrics, per-sample rows, FAD embeddings, fingerprint."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    run = client.get_run(run_id)
    table = json.loads(Path(client.download_artifacts(run_id, "eval/samples.json")).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    generated, references = [], []
    names = {a.path for a in client.list_artifacts(run_id, "eval")}
    if "eval/embeddings.npz" in names:
        with np.load(client.download_artifacts(run_id, "eval/embeddings.npz")) as z:
            generated = [z[f"gen_{i}"] for i in range(len(rows))]
            references = [z[f"ref_{i}"] for i in range(len(rows))]
    tags = run.data.tags
    return EvalResult(run_id, tags["backend"], dict(run.data.metrics), rows, tags.get("test_fingerprint", ""),
                      tags.get("eval_settings", ""), generated, references)


def _tag_version(lineage: dict[str, str], result: EvalResult) -> None:
    """A registered version points at its latest evaluation and the test set that one scored."""
    if lineage.get("model_version"):
        from mlflow.tracking import MlflowClient
        client, name, version = MlflowClient(), lineage["registered_model"], lineage["model_version"]
        client.set_model_version_tag(name, version, "eval_run_id", result.run_id)
        client.set_model_version_tag(name, version, "test_fingerprint", result.test_fingerprint)


def eval_chunks(params: Params, root: Path, backend: str, split: str | None = None) -> list[dict[str, Any]]:
    """The segment-manifest records an evaluation scores: the split's chunks, capped at max_samples."""
    split = split or params.evaluation.split
    manifest = Path(root) / "data" / "segments" / f"{backend}.jsonl"
    chunks = [c for c in read_jsonl(manifest) if c["split"] == split] if manifest.is_file() else []
    if params.evaluation.max_samples:
        chunks = chunks[: params.evaluation.max_samples]
    if not chunks:
        raise EvaluationError(f"data/segments/{backend}.jsonl: no chunks in split {split!r} to evaluate on")
    return chunks


def current_test_set(params: Params, root: Path, backend: str) -> tuple[str, str]:
    """(test_fingerprint, eval_settings) an evaluation made now would carry: what comparable means."""
    return scored_fingerprint(eval_chunks(params, root, backend)), eval_settings(params)


def embedder(params: Params):
    cfg = params.evaluation
    if cfg.clap_weights:
        from models.weights import resolve_weights
        return ClapEmbedder(resolve_weights(cfg.clap_weights, ["config.json"], "evaluation.clap_weights"))
    return MelStatsEmbedder()


def breakdowns(rows: list[dict[str, Any]], metric_names: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for column, label in (("language", "lang"), ("genre", "genre")):
        for group in sorted({r[column] for r in rows}):
            agg = aggregate([{m: r[m] for m in metric_names} for r in rows if r[column] == group])
            out |= {f"eval/{label}/{group}/{m}": v for m, v in agg.items()}
            out[f"eval/{label}/{group}/n"] = float(sum(r[column] == group for r in rows))
    return out


def generate_chunk(backend: Backend, chunk: dict[str, Any], index: int, seed: int, duration_s: float,
                   conditioning: str, template: str):
    """Sample `index` of a split as every evaluation generates it: the vocal cut to `duration_s` (0 = all),
    its prompt if the model takes text, seed `seed + index`. Returns (vocal, sr, reference, ref_sr, prompt,
    seed, raw output, peak-normalised output) at backend.sample_rate; the listening test reuses it."""
    vocal, sr = read_mono(chunk["vocals_path"])
    reference, ref_sr = read_mono(chunk["instrumental_path"])
    duration = min(len(vocal) / sr, duration_s or np.inf)
    vocal, reference = vocal[: int(duration * sr)], reference[: int(duration * ref_sr)]
    prompt = format_prompt(template, chunk) if conditioning == "voice_text" else None
    raw = backend.generate(vocal, sr, prompt, duration, seed=seed + index, normalize=False)
    return vocal, sr, reference, ref_sr, prompt, seed + index, raw, peak_normalize(raw)  # users hear the latter


def evaluate(params: Params, root: Path, ref: str, split: str | None = None) -> EvalResult:
    import mlflow
    root = Path(root).resolve()
    cfg = params.evaluation
    configure_torch(params.torch_threads)
    setup_mlflow(params, root)
    backend, lineage = load_for_eval(params, root, ref)
    name = backend.name
    conditioning, template = mode_settings(params, name, lineage["mode"])
    split = split or cfg.split
    chunks = eval_chunks(params, root, name, split)
    clap = embedder(params)
    clap_for_score = clap if isinstance(clap, ClapEmbedder) else None

    exp = experiment_id(EXPERIMENTS["evaluation"], params, root)
    key = eval_key(params, root, ref, lineage, split)
    if key:
        done = finished_eval(exp, key)
        if done is not None:  # same model, same test data, same settings: the scores cannot differ
            _tag_version(lineage, done)
            return done

    fingerprint, settings = scored_fingerprint(chunks), eval_settings(params)
    rows, generated, references, audio_dir = [], [], [], root / ".v2m" / "eval-audio"
    with mlflow.start_run(experiment_id=exp, run_name=f"eval-{name}-{ref}") as run:
        mlflow.set_tags({"test_fingerprint": fingerprint, "eval_settings": settings})
        if key:
            mlflow.set_tag("eval_key", key)
        for i, chunk in enumerate(chunks):
            vocal, sr, reference, ref_sr, prompt, seed, raw, out = generate_chunk(
                backend, chunk, i, cfg.seed, cfg.duration_s, conditioning, template)
            metrics = compute_sample_metrics(vocal, sr, out, backend.sample_rate, chunk, prompt=prompt,
                                             clap=clap_for_score, raw=raw)
            rows.append({"chunk_id": chunk["chunk_id"], "track_id": chunk["track_id"], "genre": chunk["genre"],
                         "language": chunk["language"], "prompt": prompt or "", "seed": seed, **metrics})
            generated.append(clap.embed(out, backend.sample_rate))
            references.append(clap.embed(reference, ref_sr))
            if i < cfg.audio_samples:  # a fixed subset to listen to: the first chunks of the split
                for kind, wav, rate in (("vocal", vocal, sr), ("reference", reference, ref_sr),
                                        ("output", out, backend.sample_rate)):
                    path = audio_dir / run.info.run_id / f"{chunk['chunk_id']}_{kind}.wav"
                    write_wav(path, wav, rate)
                    mlflow.log_artifact(str(path), "audio")
        metric_names = sorted({k for r in rows for k in r} - {"chunk_id", "track_id", "genre", "language",
                                                                 "prompt", "seed"})
        agg = {f"eval/{k}": v for k, v in aggregate([{m: r[m] for m in metric_names} for r in rows]).items()}
        agg["eval/fad"] = fad_from_embeddings(np.concatenate(generated), np.concatenate(references))
        agg["eval/n_samples"] = float(len(rows))
        agg |= breakdowns(rows, metric_names)
        mlflow.log_metrics(agg)  # NaN included: the promotion gates refuse a NaN metric
        nan = [k for k, v in agg.items() if not np.isfinite(v)]
        mlflow.log_params({"model_ref": ref, "backend": name, "split": split, "n_samples": len(rows),
                           "seed": cfg.seed, "embedder": getattr(clap, "name", type(clap).__name__),
                           "conditioning": conditioning, "duration_s": cfg.duration_s})
        mlflow.set_tags({"backend": name, "data_version": data_version_of(root), **lineage,
                         "nan_metrics": ",".join(nan)[:4000]})
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "eval/samples.json")
        mlflow.log_text(json.dumps({k: v for k, v in agg.items()}, indent=1, sort_keys=True), "eval/metrics.json")
        npz = audio_dir / run.info.run_id / "embeddings.npz"
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(npz, **{f"gen_{i}": g for i, g in enumerate(generated)},
                            **{f"ref_{i}": r for i, r in enumerate(references)})
        mlflow.log_artifact(str(npz), "eval")
    result = EvalResult(run.info.run_id, name, agg, rows, fingerprint, settings, generated, references)
    _tag_version(lineage, result)
    return result


# --- thin Prefect task wrapper ---------------------------------------------------------------------------
from prefect import task  # noqa: E402

from tasks.orchestration import retry_transient  # noqa: E402

# Generation-heavy: runs on the GPU pool in team mode, under the same `gpu` tag limit as fine-tuning.
evaluate_task = task(evaluate, name="evaluate", tags=["gpu"], retries=2, retry_delay_seconds=10,
                     retry_condition_fn=retry_transient)
