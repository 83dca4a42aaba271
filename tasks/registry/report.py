"""`v2m compare`: a metrics table in the terminal and an HTML report people listen through.

Every model (a registered version or alias, a run, a folder, or base:<backend>) is evaluated on the current
test set with the current settings (a cache hit when it already was: tasks/evaluation/evaluate.py), so all
columns share one test-set fingerprint; evaluations of different test sets are refused, never mixed.

The page, for the people who decide:
- one row per test vocal (the fixed first chunks every evaluation logs as audio), every model side by side;
  for each model its instrumental *mixed with the vocal* (how an accompaniment is judged) next to the
  instrumental alone, with a spectrogram and the chunk's scores; the ground truth is the first column;
- aggregate, per-genre and per-language tables: each model's value and its paired difference from the
  first model (mean over the same chunks, bootstrap interval, n), with the side that wins marked when the
  interval excludes 0 and the difference reaches the practical threshold stated on the page (params `report:`).
The folder (index.html + audio/ + img/, relative links only) is written under .v2m/reports/ and logged to
MLflow, so it opens from disk or from the MLflow artifact store without a server.
"""

from __future__ import annotations

import html
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.evaluation.evaluate import EvalResult
from tasks.evaluation.metrics import METRICS
from tasks.evaluation.paired import Interval, paired_fad_ci, paired_mean_ci
from v2m.config import Params, ReportConfig
from v2m.errors import UserError
from v2m.tracking import EXPERIMENTS, experiment_id, setup_mlflow

HEADLINE = ("eval/harmonic_fit", "eval/rhythm_fit", "eval/fad", "eval/chroma_cosine", "eval/repetition",
            "eval/key_agreement", "eval/tempo_agreement", "eval/sanity_pass", "eval/clipping", "eval/silence_ratio",
            "eval/clap_score")
GROUP_METRICS = ("harmonic_fit", "rhythm_fit")


@dataclass
class ModelEval:
    ref: str
    result: EvalResult
    audio_dir: Path

    @property
    def eval_run_id(self) -> str:
        return self.result.run_id

    @property
    def metrics(self) -> dict[str, float]:
        return self.result.metrics


def load_eval(params: Params, root: Path, ref: str, dest: Path) -> ModelEval:
    """The model's evaluation on the current test set (evaluated now if it has none), with its audio."""
    from mlflow.tracking import MlflowClient

    from tasks.evaluation.evaluate import evaluate
    result = evaluate(params, root, ref)
    audio = Path(MlflowClient().download_artifacts(result.run_id, "audio", str(dest)))
    return ModelEval(ref, result, audio)


# ---- statistics for the tables ---------------------------------------------------------------------------
def difference(first: EvalResult, other: EvalResult, metric: str, params: Params,
               rows: set[str] | None = None) -> Interval:
    """Paired difference other - first of `metric` ("eval/<name>") over the chunks both scored (optionally
    only those in `rows`), with its bootstrap interval; FAD through the per-chunk embeddings."""
    cfg = params.promotion
    name = metric.removeprefix("eval/")
    if name == "fad":
        if rows is not None or not (first.generated and other.generated):
            return Interval(float("nan"), float("nan"), float("nan"), 0)
        return paired_fad_ci(other.generated, first.generated, first.references, cfg.bootstrap_resamples,
                             cfg.bootstrap_seed, cfg.confidence)
    base = {r["chunk_id"]: r.get(name) for r in first.rows}
    pairs = [(_num(r.get(name)), _num(base[r["chunk_id"]])) for r in other.rows
             if r["chunk_id"] in base and (rows is None or r["chunk_id"] in rows)]
    a, b = (np.array(x) for x in zip(*pairs)) if pairs else (np.array([]), np.array([]))
    return paired_mean_ci(a, b, cfg.bootstrap_resamples, cfg.bootstrap_seed, cfg.confidence)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def practical_threshold(metric: str, first_value: float, cfg: ReportConfig) -> float:
    """The smallest difference worth calling a win or a loss: report.min_difference, or for FAD (unbounded, its
    scale set by the embedder) report.min_fad_ratio x the first model's FAD."""
    if metric.removeprefix("eval/").split("/")[-1] == "fad":
        return cfg.min_fad_ratio * abs(first_value) if np.isfinite(first_value) else float("inf")
    return cfg.min_difference


def verdict(metric: str, ci: Interval, threshold: float = 0.0) -> str:
    """'better' / 'worse' than the first model when the interval excludes 0 (by the metric's direction) and the
    difference is at least `threshold`; 'negligible' when it excludes 0 but is smaller; else 'tie'."""
    info = METRICS.get(metric.removeprefix("eval/").split("/")[-1])
    if info is None or info.higher_is_better is None or not ci.n or not np.isfinite(ci.low):
        return ""
    if ci.low > 0 or ci.high < 0:
        if abs(ci.estimate) < threshold:
            return "negligible"
        up = ci.low > 0
        return "better" if up == info.higher_is_better else "worse"
    return "tie"


# ---- HTML ------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "NaN" if v != v else f"{v:.4f}"
    return html.escape(str(v))


def _cell(value: float, ci: Interval | None, metric: str, threshold: float = 0.0) -> str:
    out = f"<span class=\"value\">{_fmt(value)}</span>"
    if ci is None:
        return out
    if not ci.n or not np.isfinite(ci.estimate):
        return out + "<span class=\"delta\">no paired chunks</span>"
    mark = verdict(metric, ci, threshold)
    badge = {"better": "<b class=\"win\">▲ wins</b>", "worse": "<b class=\"lose\">▼ loses</b>",
             "tie": "<i>no clear winner</i>",
             "negligible": f"<i>no practical difference (|Δ| &lt; {threshold:.4g})</i>"}.get(mark, "")
    return (out + f"<span class=\"delta\" data-verdict=\"{mark}\">Δ {ci.estimate:+.4f} "
            f"[{ci.low:+.4f}, {ci.high:+.4f}] n={ci.n} {badge}</span>")


def _table(title: str, rows: list[tuple[str, str, set[str] | None]], evals: list[ModelEval], params: Params) -> str:
    """rows: (label, metric key for the value, chunk ids of the group or None for all)."""
    head = "".join(f"<th>{html.escape(e.ref)}</th>" for e in evals)
    body = []
    for label, key, group in rows:
        metric = "eval/" + key.split("/")[-1]
        first = evals[0].metrics.get(key, float("nan"))
        threshold = practical_threshold(metric, first, params.report)
        cells = [_cell(first, None, metric)]
        cells += [_cell(e.metrics.get(key, float("nan")), difference(evals[0].result, e.result, metric, params, group),
                        metric, threshold) for e in evals[1:]]
        body.append(f"<tr><th>{html.escape(label)}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f"<h2>{html.escape(title)}</h2><table data-table=\"{html.escape(title)}\"><tr><th></th>{head}</tr>"
            f"{''.join(body)}</table>")


def spectrogram_png(wav: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import librosa
    import matplotlib.pyplot as plt

    from v2m.audio import read_mono
    y, sr = read_mono(wav)
    mel = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr, n_mels=64), ref=np.max)
    fig, ax = plt.subplots(figsize=(3.2, 1.2), dpi=80)
    ax.imshow(mel, origin="lower", aspect="auto", cmap="magma")
    ax.set_axis_off()
    fig.savefig(png, bbox_inches="tight", pad_inches=0)
    plt.close(fig)


def _players(label: str, vocal: Path, inst: Path, out: Path, stem: str, stats: str = "") -> str:
    """The instrumental mixed with the vocal, then the instrumental alone (with its spectrogram)."""
    from v2m.audio import read_mono, resample, write_wav
    y, sr = read_mono(inst)
    v, vsr = read_mono(vocal)
    v = resample(v, vsr, sr)
    n = max(len(y), len(v))
    mix = np.pad(y, (0, n - len(y))) + np.pad(v, (0, n - len(v)))
    mix_path, alone, img = out / "audio" / f"{stem}_mix.wav", out / "audio" / f"{stem}.wav", out / "img" / f"{stem}.png"
    write_wav(mix_path, mix / max(1.0, float(np.abs(mix).max()) / 0.89), sr)  # never clip the mix
    shutil.copy(inst, alone)
    spectrogram_png(alone, img)
    return (f"<div class=\"player\"><b>{html.escape(label)}</b>"
            f"<label>with the vocal<audio controls preload=\"metadata\" src=\"audio/{mix_path.name}\"></audio></label>"
            f"<label>instrumental alone<audio controls preload=\"metadata\" src=\"audio/{alone.name}\"></audio></label>"
            f"<img src=\"img/{img.name}\" alt=\"spectrogram of {html.escape(label)}\">"
            f"<div class=\"stats\">{html.escape(stats)}</div></div>")


def _sample_rows(evals: list[ModelEval], out: Path) -> str:
    chunk_sets = [{p.name.rsplit("_", 1)[0] for p in e.audio_dir.glob("*_output.wav")} for e in evals]
    shared = sorted(set.intersection(*chunk_sets)) if chunk_sets else []
    head = "".join(f"<th>{html.escape(e.ref)}</th>" for e in evals)
    rows = []
    for chunk in shared:
        first = evals[0]
        vocal = first.audio_dir / f"{chunk}_vocal.wav"
        meta = next((s for s in first.result.rows if s["chunk_id"] == chunk), {})
        cells = [f"<th><b>{html.escape(chunk)}</b><br>{html.escape(str(meta.get('genre', '')))} · "
                 f"{html.escape(str(meta.get('language', '')))}<label>vocal alone<audio controls preload=\"metadata\" "
                 f"src=\"audio/{_copy(vocal, out, f'{chunk}_vocal')}\"></audio></label></th>",
                 f"<td>{_players('ground truth', vocal, first.audio_dir / f'{chunk}_reference.wav', out, f'{chunk}_truth')}</td>"]
        for i, e in enumerate(evals):
            row = next((s for s in e.result.rows if s["chunk_id"] == chunk), {})
            stats = ", ".join(f"{k} {_fmt(row[k])}" for k in ("harmonic_fit", "rhythm_fit", "chroma_cosine",
                                                               "repetition") if k in row)
            if row.get("prompt"):
                stats += f"; prompt: {row['prompt']}"
            cells.append(f"<td>{_players(e.ref, vocal, e.audio_dir / f'{chunk}_output.wav', out, f'{chunk}_model{i}', stats)}</td>")
        rows.append(f"<tr class=\"sample\" data-chunk=\"{html.escape(chunk)}\">{''.join(cells)}</tr>")
    return (f"<h2>Per test vocal</h2><table data-table=\"Per test vocal\" class=\"samples\"><tr><th>test vocal</th>"
            f"<th>ground truth</th>{head}</tr>{''.join(rows)}</table>")


def _copy(src: Path, out: Path, stem: str) -> str:
    shutil.copy(src, out / "audio" / f"{stem}.wav")
    return f"{stem}.wav"


def build_report(evals: list[ModelEval], out: Path, params: Params,
                 listening: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write out/index.html with audio/ and img/ next to it; every link is relative. `listening`: the blind
    listening test's results per model ref (tasks/listening/report.py), shown after the metric tables."""
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "img").mkdir(exist_ok=True)
    first = evals[0].result
    parts = [f"<h1>voice2music comparison</h1><p>{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; test set "
             f"<code>{html.escape(first.test_fingerprint)}</code> ({len(first.rows)} chunks), settings "
             f"<code>{html.escape(first.settings)}</code>; evaluation runs: "
             f"{', '.join(html.escape(e.eval_run_id) for e in evals)}. Differences are paired (same chunks, same "
             f"seeds) against <b>{html.escape(evals[0].ref)}</b>, with {params.promotion.confidence:.0%} bootstrap "
             f"intervals; ▲/▼ marks a model that wins/loses when the interval excludes 0 <i>and</i> the difference "
             f"is at least {params.report.min_difference:g} (FAD: {params.report.min_fad_ratio:.0%} of the first "
             f"model's; params.yaml report:), smaller ones read &ldquo;no practical difference&rdquo;.</p>"]
    parts.append(_sample_rows(evals, out))
    metrics = [m for m in HEADLINE if any(m in e.metrics for e in evals)]
    parts.append(_table("Aggregate", [(m, m, None) for m in metrics], evals, params))
    for column, label, title in (("genre", "genre", "Per genre"), ("language", "lang", "Per language")):
        groups = sorted({r[column] for r in first.rows})
        rows = [(f"{g} / {m} (n={sum(r[column] == g for r in first.rows)})", f"eval/{label}/{g}/{m}",
                 {r["chunk_id"] for r in first.rows if r[column] == g}) for g in groups for m in GROUP_METRICS]
        parts.append(_table(f"{title} ({', '.join(GROUP_METRICS)})", rows, evals, params))
    if listening:
        from tasks.listening.report import section
        parts.append(section(listening, [e.ref for e in evals]))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}"
             ".value{display:block;font-weight:bold}.delta{display:block;font-size:85%;color:#444}"
             ".win{color:#070}.lose{color:#a00}.samples td,.samples th{text-align:left}"
             ".player label,th label{display:block;font-size:80%}.player img{display:block;width:256px}"
             "audio{display:block;width:256px}")
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>voice2music comparison</title>"
            f"<link rel=\"icon\" href=\"data:,\"><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    (out / "index.html").write_text(page)
    return out / "index.html"


def compare(params: Params, root: Path, refs: list[str]) -> tuple[Path, list[ModelEval], str]:
    """Evaluate (or look up) each model on the current test set, write the report and log it to MLflow;
    returns (index.html, evals, the comparison run id)."""
    import mlflow
    root = Path(root).resolve()
    setup_mlflow(params, root)
    out = root / ".v2m" / "reports" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    scratch = out / ".downloads"
    evals = [load_eval(params, root, ref, scratch / str(i)) for i, ref in enumerate(refs)]
    keys = {(e.result.test_fingerprint, e.result.settings) for e in evals}
    if len(keys) > 1:
        raise UserError("the evaluations differ in test set or settings and cannot be compared: " + ", ".join(
            f"{e.ref}: {e.result.test_fingerprint}/{e.result.settings}" for e in evals))
    from tasks.listening.report import listening_results
    index = build_report(evals, out, params, listening_results(refs, scratch / "listening"))
    shutil.rmtree(scratch, ignore_errors=True)
    with mlflow.start_run(experiment_id=experiment_id(EXPERIMENTS["evaluation"], params, root),
                          run_name="compare " + " vs ".join(refs)) as run:
        mlflow.set_tags({"kind": "comparison", "models": " | ".join(refs)[:4000],
                         "test_fingerprint": evals[0].result.test_fingerprint})
        mlflow.log_artifacts(str(out), "report")
    return index, evals, run.info.run_id


# --- thin Prefect task wrapper ---------------------------------------------------------------------------
from prefect import task  # noqa: E402

from tasks.orchestration import retry_transient  # noqa: E402

compare_task = task(compare, name="compare-report", retries=1, retry_delay_seconds=5,
                    retry_condition_fn=retry_transient)
