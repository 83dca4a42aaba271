"""`v2m compare`: a metrics table in the terminal and an HTML report people can listen to.

For each model (a registered version or alias, a run, a folder, or base:<backend>) the report uses its
evaluation run — the `eval_run_id` tag of a registered version, or a fresh evaluation on the same test
split and seeds — and shows:
- per test vocal (the fixed subset every evaluation logs as audio): the input vocal, the ground truth and
  each model's output as audio players, with spectrograms and the per-sample metrics;
- aggregate, per-genre and per-language tables.
The folder (index.html + audio/ + img/) is written under .v2m/reports/ and logged to MLflow.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from v2m.config import Params
from v2m.tracking import EXPERIMENTS, experiment_id, setup_mlflow

HEADLINE = ("eval/harmonic_fit", "eval/chroma_cosine", "eval/fad", "eval/key_agreement", "eval/tempo_agreement",
            "eval/sanity_pass", "eval/clipping", "eval/silence_ratio", "eval/clap_score")
GROUP_METRICS = ("harmonic_fit", "chroma_cosine", "tempo_agreement")


@dataclass
class ModelEval:
    ref: str
    eval_run_id: str
    metrics: dict[str, float]
    samples: list[dict[str, Any]]
    audio_dir: Path


def eval_run_for(params: Params, root: Path, ref: str) -> str:
    """The evaluation run of a model reference, evaluating it now if it has none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from models.refs import to_model_uri
    from tasks.evaluation.evaluate import evaluate
    if not ref.startswith("base:") and not Path(ref).is_dir():
        uri = to_model_uri(ref)
        if uri.startswith("models:/") and not uri.startswith("models:/m-"):
            name, sep, rest = uri.removeprefix("models:/").partition("@" if "@" in uri else "/")
            client = MlflowClient()
            try:
                mv = client.get_model_version_by_alias(name, rest) if sep == "@" else client.get_model_version(name, rest)
            except MlflowException:
                mv = None
            if mv is not None and mv.tags.get("eval_run_id"):
                return mv.tags["eval_run_id"]
    return evaluate(params, root, ref).run_id


def load_eval(ref: str, run_id: str, dest: Path) -> ModelEval:
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    run = client.get_run(run_id)
    table = json.loads(Path(client.download_artifacts(run_id, "eval/samples.json", str(dest))).read_text())
    samples = [dict(zip(table["columns"], row)) for row in table["data"]]
    audio = Path(client.download_artifacts(run_id, "audio", str(dest)))
    return ModelEval(ref, run_id, dict(run.data.metrics), samples, audio)


def spectrogram_png(wav: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import librosa
    import matplotlib.pyplot as plt

    from v2m.audio import read_mono
    y, sr = read_mono(wav)
    mel = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr, n_mels=64), ref=np.max)
    fig, ax = plt.subplots(figsize=(3.2, 1.4), dpi=80)
    ax.imshow(mel, origin="lower", aspect="auto", cmap="magma")
    ax.set_axis_off()
    fig.savefig(png, bbox_inches="tight", pad_inches=0)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "NaN" if v != v else f"{v:.4f}"
    return html.escape(str(v))


def _table(title: str, row_names: list[str], columns: list[str], cell) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(f"<tr><th>{html.escape(r)}</th>" + "".join(f"<td>{_fmt(cell(r, c))}</td>" for c in columns)
                   + "</tr>" for r in row_names)
    return f"<h2>{html.escape(title)}</h2><table data-table=\"{html.escape(title)}\"><tr><th></th>{head}</tr>{body}</table>"


def build_report(evals: list[ModelEval], out: Path, listening: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write out/index.html with audio/ and img/ next to it; every link is relative. `listening`: the
    blind listening test's results per model ref (tasks/listening/report.py), shown after the metrics."""
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "img").mkdir(exist_ok=True)
    names = [e.ref for e in evals]
    parts = [f"<h1>voice2music comparison</h1><p>{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"evaluation runs: {', '.join(html.escape(e.eval_run_id) for e in evals)}</p>"]
    metrics = [m for m in HEADLINE if any(m in e.metrics for e in evals)]
    parts.append(_table("Aggregate", metrics, names,
                        lambda m, ref: next(e for e in evals if e.ref == ref).metrics.get(m, float("nan"))))
    for label, title in (("genre", "Per genre"), ("lang", "Per language")):
        groups = sorted({k.split("/")[2] for e in evals for k in e.metrics if k.startswith(f"eval/{label}/")})
        rows = [f"{g} / {m}" for g in groups for m in GROUP_METRICS]
        parts.append(_table(f"{title} (harmonic fit, chroma cosine, tempo agreement)", rows, names,
                            lambda r, ref, label=label: next(e for e in evals if e.ref == ref).metrics.get(
                                f"eval/{label}/{r.split(' / ')[0]}/{r.split(' / ')[1]}", float("nan"))))
    if listening:
        from tasks.listening.report import section
        parts.append(section(listening, names, _table))
    # Per test vocal: the chunks whose audio every evaluation logged (the same first chunks of the split).
    chunk_sets = [{p.name.rsplit("_", 1)[0] for p in e.audio_dir.glob("*_output.wav")} for e in evals]
    shared = sorted(set.intersection(*chunk_sets)) if chunk_sets else []
    parts.append("<h2>Per test vocal</h2>")
    for chunk in shared:
        first = evals[0]
        players = []
        for kind, src in (("input vocal", first.audio_dir / f"{chunk}_vocal.wav"),
                          ("ground truth", first.audio_dir / f"{chunk}_reference.wav")):
            players.append(_player(kind, src, out, f"{chunk}_{kind.split()[-1]}"))
        for i, e in enumerate(evals):
            row = next((s for s in e.samples if s["chunk_id"] == chunk), {})
            stats = ", ".join(f"{k} {_fmt(row[k])}" for k in ("harmonic_fit", "chroma_cosine", "key_agreement",
                                                               "tempo_agreement") if k in row)
            players.append(_player(e.ref, e.audio_dir / f"{chunk}_output.wav", out, f"{chunk}_model{i}", stats))
        prompt = next((s.get("prompt") for s in evals[-1].samples if s["chunk_id"] == chunk), "")
        parts.append(f"<section class=\"sample\" data-chunk=\"{html.escape(chunk)}\"><h3>{html.escape(chunk)}</h3>"
                     f"<p>prompt: {html.escape(prompt or '(none)')}</p>{''.join(players)}</section>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.player{display:inline-block;"
             "margin:0 1em 1em 0;vertical-align:top}.player img{display:block;width:256px}")
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>voice2music comparison</title>"
            f"<link rel=\"icon\" href=\"data:,\"><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    (out / "index.html").write_text(page)
    return out / "index.html"


def _player(label: str, wav: Path, out: Path, stem: str, stats: str = "") -> str:
    audio, img = out / "audio" / f"{stem}.wav", out / "img" / f"{stem}.png"
    shutil.copy(wav, audio)
    spectrogram_png(audio, img)
    return (f"<div class=\"player\"><b>{html.escape(label)}</b><img src=\"img/{img.name}\" alt=\"spectrogram\">"
            f"<audio controls preload=\"metadata\" src=\"audio/{audio.name}\"></audio>"
            f"<div class=\"stats\">{html.escape(stats)}</div></div>")


def compare(params: Params, root: Path, refs: list[str]) -> tuple[Path, list[ModelEval], str]:
    """Evaluate (or look up) each model, write the report and log it to MLflow; returns (index.html, evals, run)."""
    import mlflow
    root = Path(root).resolve()
    setup_mlflow(params, root)
    out = root / ".v2m" / "reports" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    scratch = out / ".downloads"
    evals = [load_eval(ref, eval_run_for(params, root, ref), scratch / str(i)) for i, ref in enumerate(refs)]
    from tasks.listening.report import listening_results
    index = build_report(evals, out, listening_results(refs, scratch / "listening"))
    shutil.rmtree(scratch, ignore_errors=True)
    with mlflow.start_run(experiment_id=experiment_id(EXPERIMENTS["evaluation"], params, root),
                          run_name="compare " + " vs ".join(refs)) as run:
        mlflow.set_tags({"kind": "comparison", "models": " | ".join(refs)[:4000]})
        mlflow.log_artifacts(str(out), "report")
    return index, evals, run.info.run_id


# --- thin Prefect task wrapper ---------------------------------------------------------------------------
from prefect import task  # noqa: E402

from tasks.orchestration import retry_transient  # noqa: E402

compare_task = task(compare, name="compare-report", retries=1, retry_delay_seconds=5,
                    retry_condition_fn=retry_transient)
