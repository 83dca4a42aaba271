"""`v2m` — the command line of voice2music. One command per pipeline step; dvc.yaml calls these.

Exit codes: 0 done; 1 the input or the configuration is wrong (the message names the file or key); 2 usage.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from v2m.config import ConfigError, Params, load_params
from v2m.errors import UserError

app = typer.Typer(help="voice2music: turn singing into instrumentals; train, measure and promote the models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Build, validate and prepare datasets (the DVC pipeline stages).",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(stderr=True, soft_wrap=True)  # no wrapping: messages stay greppable
ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Configuration file.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
DEFAULT_PARAMS = Path("params.yaml")


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(1)


def params_or_fail(path: Path) -> Params:
    try:
        return load_params(path)
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable; for type checkers


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix (bad files, bad config) into exit code 1 with the message."""
    try:
        yield
    except (UserError, FileNotFoundError) as exc:
        fail(str(exc))


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def report(summary: dict) -> None:
    typer.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))


# --- data -------------------------------------------------------------------------------------------

@data_app.command("demo")
def data_demo(out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default data/raw, "
                                                       "or data/mixes with --mixes).")] = None,
              params: ParamsOpt = DEFAULT_PARAMS,
              n_tracks: Annotated[int | None, typer.Option(help="Override data.demo.n_tracks.")] = None,
              mixes: Annotated[bool, typer.Option("--mixes", help="Finished songs (vocal + instrumental mixed) for "
                                                  "`v2m data separate`, with the true stems in OUT/stems/.")] = False
              ) -> None:
    """Render the demo dataset: Bach chorales (music21 corpus) as vocal + instrumental stems, or as mixes."""
    from tasks.data.demo import build_demo_dataset, write_mixes
    p = params_or_fail(params)
    cfg = p.data.demo if n_tracks is None else p.data.demo.model_copy(update={"n_tracks": n_tracks})
    out = out or Path("data/mixes" if mixes else "data/raw")
    with user_errors(), progress_bar("demo") as update:
        summary = build_demo_dataset(out / "stems" if mixes else out, cfg, seed=p.seed, progress=update)
        if mixes:
            summary["mixes"] = write_mixes(out / "stems", out)
    what = f"{summary['n_tracks']} mixes in {out} (true stems in {out / 'stems'})" if mixes else \
        f"{summary['n_tracks']} tracks in {out}"
    console.print(f"demo dataset: {what}")
    report(summary)


@data_app.command("separate")
def data_separate(mixes_dir: Path, out: OutOpt = Path("data/raw"), params: ParamsOpt = DEFAULT_PARAMS,
                  method: Annotated[str | None, typer.Option(help="Override separate.method: harmonic (weight-free) "
                                                             "or demucs (learned, needs weights).")] = None) -> None:
    """Split finished songs (metadata.csv + <track_id>.wav|flac|mp3) into the raw layout, one vocal and one
    instrumental per track, with separation.jsonl (method, model, quality); poor separations are quarantined."""
    from tasks.data.separate import REPORT, separate_dataset
    p = params_or_fail(params)
    if method not in (None, "harmonic", "demucs"):
        console.print(f"error: --method must be harmonic or demucs (got {method!r})")
        raise typer.Exit(2)
    cfg = p.separate.model_copy(update={"method": method or p.separate.method})
    with user_errors(), progress_bar("separate") as update:
        res = separate_dataset(mixes_dir, out, cfg, p.workers, update)
    for line in res["report"]:
        if line["status"] == "quarantined":
            console.print(f"[yellow]quarantined[/yellow] {line['track_id']}: {line['reason']} — {line['message']}",
                          highlight=False)
    console.print(f"separate ({cfg.method}): {len(res['accepted'])} separated, "
                  f"{len(res['report']) - len(res['accepted'])} quarantined (report: {out / REPORT}); "
                  f"{res['stats'].processed} processed, {res['stats'].reused} reused")


@data_app.command("import")
def data_import(src: Annotated[Path, typer.Argument(help="The dataset's folder.")],
                format: Annotated[str, typer.Option("--format", help="musdb (MUSDB18-HQ folders or MUSDB18 "
                                                    ".stem.mp4), moisesdb, or stems (a folder per track).")],
                out: OutOpt = Path("data/raw"),
                genre: Annotated[str | None, typer.Option(help="Genre of every track the source gives none.")] = None,
                language: Annotated[str | None, typer.Option(help="ISO 639 language of every track (en, fr, ...).")] = None,
                artist: Annotated[str | None, typer.Option(help="Artist of every track the source names none.")] = None,
                metadata: Annotated[Path | None, typer.Option(help="CSV: a `track` column (the dataset's name or the "
                                                              "track_id) and any metadata columns.")] = None,
                vocals: Annotated[list[str] | None, typer.Option(help="--format stems: glob of vocal stem file names "
                                                                 "(repeatable; default *vocal* *vox* *voice* *sing*).")] = None,
                skip: Annotated[list[str] | None, typer.Option(help="--format stems: files that are neither, e.g. the "
                                                               "full mix (default mix* *mixture* *master* *full*).")] = None
                ) -> None:
    """Import a stem dataset into the raw layout: vocals + instrumental (every other stem) per track, metadata.csv."""
    from tasks.data.importers import REPORT, SKIP_PATTERNS, VOCAL_PATTERNS, import_dataset
    options = {"vocal_patterns": tuple(vocals or VOCAL_PATTERNS), "skip_patterns": tuple(skip or SKIP_PATTERNS)}
    with user_errors():
        res = import_dataset(format, src, out, {"genre": genre, "language": language, "artist": artist}, metadata,
                             **options)
    bad = [line for line in res["report"] if line["status"] != "ok"]
    for line in bad:
        console.print(f"[yellow]not imported[/yellow] {line['track_id']}: {line['reason']} — {line['message']}",
                      highlight=False)
    for column, tracks in res["lacking"].items():
        console.print(f"[yellow]{len(tracks)} track(s) have no {column}[/yellow] ({', '.join(tracks[:3])}"
                      f"{', ...' if len(tracks) > 3 else ''}): fill it in {out / 'metadata.csv'} or import again with "
                      f"--{column} / --metadata; until then validate quarantines them", highlight=False)
    console.print(f"import {format}: {len(res['report']) - len(bad)} tracks in {out}, {len(bad)} not imported "
                  f"(report: {out / REPORT})")


@data_app.command("validate")
def data_validate(raw_dir: Path, out: OutOpt = Path("data/validated"), params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Decode every track; quarantine bad ones (with a reason each) and keep the rest."""
    from tasks.data.validate import validate_dataset
    p = params_or_fail(params)
    with user_errors(), progress_bar("validate") as update:
        res = validate_dataset(raw_dir, out, p.data.validate_, p.workers, update)
    for q in res["quarantined"]:
        console.print(f"[yellow]quarantined[/yellow] {q['track_id']}: {q['reason']} — {q['message']}",
                      highlight=False)
    console.print(f"validate: {len(res['accepted'])} accepted, {len(res['quarantined'])} quarantined "
                  f"(report: {out / 'quarantine.jsonl'}); {res['stats'].processed} processed, "
                  f"{res['stats'].reused} reused")


@data_app.command("normalize")
def data_normalize(validated_dir: Path, out: OutOpt = Path("data/normalized"),
                   params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Mono, resampled to each backend's rate (+48 kHz vocal for CLAP), loudness-normalised."""
    from tasks.data.normalize import normalize_dataset
    p = params_or_fail(params)
    with user_errors(), progress_bar("normalize") as update:
        res = normalize_dataset(validated_dir, out, p.data.normalize, p.workers, update)
    console.print(f"normalize: {res['stats'].processed} processed, {res['stats'].reused} reused")


@data_app.command("label")
def data_label(normalized_dir: Path, out: OutOpt = Path("data/labelled"), params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Estimate BPM and key where the metadata leaves them blank; record each value's source."""
    from tasks.data.label import label_dataset
    p = params_or_fail(params)
    with user_errors(), progress_bar("label") as update:
        res = label_dataset(normalized_dir, out, p.data.label, p.data.normalize.audioldm_sr, p.workers, update)
    console.print(f"label: {res['stats'].processed} processed, {res['stats'].reused} reused")


@data_app.command("split")
def data_split(labelled_dir: Path, out: OutOpt = Path("data/split"), params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Train/val/test split, disjoint by artist, stratified by genre and language."""
    from tasks.data.split import split_dataset
    p = params_or_fail(params)
    with user_errors():
        res = split_dataset(labelled_dir, out, p.data.split, p.seed)
    for name, r in res["report"].items():
        console.print(f"{name:5s}: {r['tracks']:4d} tracks, {len(r['artists'])} artists, "
                      f"genres {r['genres']}, languages {r['languages']}", highlight=False)
    console.print(f"new artists placed: {len(res['new_artists'])}; every earlier artist kept its split")


@data_app.command("segment")
def data_segment(split_dir: Path, out: OutOpt = Path("data/segments"), params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Cut aligned vocal/instrumental chunks per backend and write the chunk manifests."""
    from tasks.data.segment import segment_dataset
    p = params_or_fail(params)
    with user_errors(), progress_bar("segment") as update:
        res = segment_dataset(split_dir, out, p.data.segment, p.data.normalize, p.workers, update)
    counts = {b: len(m) for b, m in res["manifests"].items()}
    console.print(f"segment: chunks {counts}; {res['stats'].processed} tracks processed, "
                  f"{res['stats'].reused} reused")


@data_app.command("prepare")
def data_prepare(params: ParamsOpt = DEFAULT_PARAMS,
                 push: Annotated[bool, typer.Option(help="Push the data to the DVC remote afterwards.")] = False) -> None:
    """Run the prepare-data Prefect flow: dvc repro, then record the data version."""
    from flows.prepare_data import prepare_data
    params_or_fail(params)
    with user_errors():
        version = prepare_data(project_dir=str(Path.cwd()), push=push)
    report(version)


@data_app.command("push")
def data_push(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Push DVC-tracked data to the configured remote (params.yaml dvc.remote)."""
    from tasks.data.versioning import push
    p = params_or_fail(params)
    with user_errors():
        n = push(Path.cwd(), p.dvc)
    console.print(f"pushed {n} file(s) to the '{p.dvc.remote}' remote")


@data_app.command("pull")
def data_pull(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Pull DVC-tracked data from the configured remote."""
    from tasks.data.versioning import pull
    p = params_or_fail(params)
    with user_errors():
        n = pull(Path.cwd(), p.dvc)
    console.print(f"pulled {n} file(s) from the '{p.dvc.remote}' remote")


@data_app.command("version")
def data_version_cmd() -> None:
    """Print the data version of the workspace (dvc.lock hashes + git revision)."""
    from tasks.data.versioning import data_version
    with user_errors():
        report(data_version(Path.cwd()))


@data_app.command("cache")
def data_cache(backend: Annotated[str, typer.Option(help="musicgen or audioldm.")],
               segments: Path = Path("data/segments"), params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Cache a backend's model inputs per chunk (codes / latents / embeddings) for training."""
    from tasks.data.cache_inputs import cache_dataset
    p = params_or_fail(params)
    with user_errors(), progress_bar(f"cache {backend}") as update:
        res = cache_dataset(p, backend, segments, progress=update)
    console.print(f"cache {backend}: {len(res['index'])} chunks; {res['stats'].processed} encoded, "
                  f"{res['stats'].reused} reused; base model: {res['base_model']}")


@app.command("train")
def train_cmd(backend: Annotated[str, typer.Option(help="musicgen or audioldm.")],
              stage: Annotated[str | None, typer.Option(help="MusicGen stage: voice, then voice_text.")] = None,
              variant: Annotated[str | None, typer.Option(help="AudioLDM variant: voice, voice_text or refined.")] = None,
              preset: Annotated[str | None, typer.Option(help="Override <backend>.preset.")] = None,
              max_steps: Annotated[int | None, typer.Option(help="Override train.<backend>.max_steps.")] = None,
              init_from: Annotated[str, typer.Option(help="auto (stage 2 starts from the matching stage-1 run in MLflow), base, or a model REF (runs:/ID, NAME/version, a folder).")] = "auto",
              gpus: Annotated[int, typer.Option(min=1, help="Processes of one data-parallel job on torchrun (one per GPU; gloo on a CPU).")] = 1,
              params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Fine-tune a backend (resumes an interrupted run with the same settings; a finished one is reused)."""
    from tasks.training.finetune import finetune
    p = params_or_fail(params)
    if preset:
        p = p.model_copy(update={backend: getattr(p, backend).model_copy(update={"preset": preset})})
    mode = stage or variant or "voice"
    with user_errors():
        res = finetune(p, backend, mode, Path.cwd(), init_from=init_from, max_steps=max_steps, gpus=gpus)
        if res.trained and res.model_uri:  # finished: its S3 checkpoints follow train.retention
            from tasks.training.retention import apply_retention
            apply_retention(p, backend, res.run_id, res.run_dir)
    what = "trained" if res.trained else "already trained (cache hit)"
    console.print(f"{backend} {mode}: {what}; run {res.run_id}; model {res.model_uri}")
    report({"run_id": res.run_id, "model_dir": res.model_dir, "model_uri": res.model_uri,
            "final_loss": res.losses[-1] if res.losses else None, "resumed_from": res.resumed_from})


@app.command("generate")
def generate_cmd(out: Annotated[Path, typer.Option("--out", "-o", help="Output .wav file.")],
                 duration: Annotated[float | None, typer.Option(help="Seconds of audio to generate (default: as "
                                                                "long as the vocal; text only: serve.default_duration_s).")] = None,
                 model: Annotated[str | None, typer.Option(help="NAME@alias, NAME/version or runs:/RUN_ID.")] = None,
                 checkpoint: Annotated[Path | None, typer.Option(help="A saved model folder.")] = None,
                 vocal: Annotated[Path | None, typer.Option(help="The vocal (wav, flac, mp3, ogg); omit for text only.")] = None,
                 prompt: Annotated[str | None, typer.Option(help='Text prompt, e.g. "Disco music for input vocals".')] = None,
                 backend: Annotated[str | None, typer.Option(help="Backend name (checked against the model).")] = None,
                 seed: int = 0, guidance: Annotated[float | None, typer.Option(help="Guidance scale.")] = None,
                 steps: Annotated[int | None, typer.Option(help="Diffusion steps (AudioLDM).")] = None,
                 params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Generate an instrumental for a vocal and/or a prompt, from a registered model, a run or a folder; songs
    longer than one model window are made in overlapping windows (params.yaml generate:)."""
    from models.longform import Request, check_length, generate_long
    from models.refs import resolve_model
    from v2m.audio import load_vocal, write_wav
    from v2m.tracking import setup_mlflow
    if (model is None) == (checkpoint is None):
        console.print("error: give exactly one of --model or --checkpoint")
        raise typer.Exit(2)
    if vocal is None and not prompt:
        console.print("error: give a --vocal, a --prompt, or both")
        raise typer.Exit(2)
    if duration is not None and duration <= 0:
        fail(f"--duration must be positive (got {duration})")
    p = params_or_fail(params)
    with user_errors():
        voice, sr = load_vocal(vocal) if vocal is not None else (None, 0)
        if duration is None:  # as `v2m serve` does: the vocal's length, else the text-only default
            duration = len(voice) / sr if voice is not None else p.serve.default_duration_s
        check_length(duration, p.generate)  # before any model loads
        setup_mlflow(p, Path.cwd())
        b = resolve_model(str(checkpoint or model))
    if backend and backend != b.name:
        fail(f"{checkpoint or model} is a {b.name} model, not {backend}")
    audio = generate_long(b, Request(voice, sr, prompt, duration, seed), p.generate, guidance, steps)
    write_wav(out, audio, b.sample_rate)
    console.print(f"wrote {out} ({len(audio) / b.sample_rate:.2f} s at {b.sample_rate} Hz, {b.name})")


@app.command("serve")
def serve_cmd(model: Annotated[str | None, typer.Option(help="REF to serve; default params serve.model, else voice2music-<serve.backend>@champion (followed as it moves).")] = None,
              host: Annotated[str | None, typer.Option(help="Default params serve.host.")] = None,
              port: Annotated[int | None, typer.Option(help="Default params serve.port.")] = None,
              allowed_host: Annotated[list[str] | None, typer.Option(help="Host header value to answer (repeat; \"*\" = any); default params serve.allowed_hosts.")] = None,
              params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Serve a model over HTTP: POST /v1/generate, /healthz, /readyz, /metrics, and a page at /.
    Open to this machine only by default; another --host needs API keys in V2M_SERVE_API_KEYS (NAME:KEY,...)."""
    from tasks.serving.server import serve
    p = params_or_fail(params)
    if allowed_host:  # validated as params.yaml would be
        p = p.model_copy(update={"serve": type(p.serve).model_validate({**p.serve.model_dump(),
                                                                        "allowed_hosts": allowed_host})})
    with user_errors():
        serve(p, Path.cwd(), model, host, port)


@app.command("evaluate")
def evaluate_cmd(model: Annotated[str, typer.Option(help="NAME@alias, NAME/version, runs:/RUN_ID, a folder, or base:<backend>.")],
                 split: Annotated[str | None, typer.Option(help="Override evaluation.split.")] = None,
                 params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Generate for every test vocal and score it (harmonic and rhythm fit, FAD, key/tempo, sanity) into MLflow."""
    from tasks.evaluation.evaluate import evaluate
    p = params_or_fail(params)
    with user_errors():
        res = evaluate(p, Path.cwd(), model, split)
    headline = {k: round(v, 4) for k, v in res.metrics.items() if k.count("/") == 1}
    console.print(f"evaluated {model} ({res.backend}) on {len(res.rows)} samples (test set {res.test_fingerprint}, "
                  f"settings {res.settings}); run {res.run_id}")
    report({"run_id": res.run_id, "test_fingerprint": res.test_fingerprint, "metrics": headline})


BackendOpt = Annotated[str, typer.Option(help="musicgen or audioldm.")]


@app.command("register")
def register_cmd(run: Annotated[str, typer.Option(help="The fine-tuning run id.")], backend: BackendOpt,
                 eval_run: Annotated[str | None, typer.Option(help="Its evaluation run id.")] = None,
                 params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Register a finished fine-tune as a new model version (alias challenger), with its lineage tags."""
    from tasks.registry.registry import model_name, register
    from v2m.tracking import setup_mlflow
    setup_mlflow(params_or_fail(params), Path.cwd())
    with user_errors():
        version = register(run, backend, eval_run)
    console.print(f"registered {model_name(backend)} v{version} (challenger)")


@app.command("promote")
def promote_cmd(backend: BackendOpt, version: Annotated[str | None, typer.Option(help="Default: the challenger.")] = None,
                approve: Annotated[bool, typer.Option(help="Manual approval, when the policy asks for it.")] = False,
                reinstate: Annotated[bool, typer.Option(help="Bring back a rolled-back version (audited).")] = False,
                params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Gate a version against the champion on the same test set and move `champion` if every gate passes."""
    from tasks.registry.promotion import promote
    from v2m.tracking import setup_mlflow
    p = params_or_fail(params)
    setup_mlflow(p, Path.cwd())
    with user_errors():
        d = promote(p, Path.cwd(), backend, version, approve, reinstate=reinstate)
    console.print(f"test set {d.test_fingerprint}; evaluations: v{d.version} {d.challenger_eval_run_id}, champion "
                  f"v{d.champion_before} {d.champion_eval_run_id or '-'}", highlight=False)
    for g in d.gates:
        console.print(f"  {g.line()}", highlight=False, markup=False)
    verdict = (f"promoted v{d.version} to champion" if d.promoted else f"v{d.version} not promoted yet, "
               f"{d.reason}" if d.reason.startswith("waiting") else f"refused v{d.version}: {d.reason}")
    console.print(verdict)
    if not d.promoted:
        raise typer.Exit(1)


@app.command("listen")
def listen_cmd(backend: BackendOpt,
               model: Annotated[list[str] | None, typer.Option(help="Two models to compare instead of challenger vs champion (NAME@alias, NAME/version); repeat.")] = None,
               invite: Annotated[list[str] | None, typer.Option(help="Invite a listener by name (repeat): prints their personal link; inviting a name again replaces its link.")] = None,
               host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
               port: Annotated[int, typer.Option(help="0 = a free port.")] = 0,
               params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Serve the blind A/B listening page; the votes of invited listeners feed the human_preference gate."""
    import secrets
    import socket

    from tasks.listening.app import bind, create_app, serve
    from tasks.listening.clips import prepare
    from tasks.listening.gate import store_for
    from v2m.tracking import setup_mlflow
    p = params_or_fail(params)
    setup_mlflow(p, Path.cwd())
    with user_errors():
        ls = prepare(p, Path.cwd(), backend, model,
                     progress=lambda m, c, reused: console.print(f"clip {m} {c}: {'from evaluation' if reused else 'generated'}"))
        store = store_for(p, Path.cwd())
        links = {name: store.invite(name) for name in invite or []}
    try:
        sock = bind(host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    shown = host if host not in ("0.0.0.0", "::") else socket.gethostname()
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{sock.getsockname()[1]}/listen"
    owner = secrets.token_urlsafe(24)  # this run's: results stay with whoever started it (and MLflow)
    for name, token in links.items():
        console.print(f"invitation for {name}: {url}#invite={token}", highlight=False)
    console.print(f"results (owner only, keep private): {url}#owner={owner}", highlight=False)
    console.print(f"listening test: {url}  ({ls.models[0]} vs {ls.models[1]}, {len(ls.chunks)} test vocals; votes in "
                  f"{store.where})", highlight=False)
    serve(create_app(p, Path.cwd(), ls, owner), sock, p.serve.header_timeout_s)


@app.command("rollback")
def rollback_cmd(backend: BackendOpt, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Restore the previous champion (the audit trail records the move)."""
    from tasks.registry.promotion import rollback
    from v2m.tracking import setup_mlflow
    p = params_or_fail(params)
    setup_mlflow(p, Path.cwd())
    with user_errors():
        current, previous = rollback(p, Path.cwd(), backend)
    console.print(f"champion: v{current} -> v{previous}")


rollout_app = typer.Typer(help="Evidence from production: `v2m serve`'s shadow pairs and online metrics.",
                          no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")


@rollout_app.command("status")
def rollout_status(backend: BackendOpt, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Challenger - champion on the shadow pairs so far: each difference as `estimate [low, high] n=N`, and the
    online_evidence gate's verdict."""
    from tasks.serving.evidence import status
    from v2m.tracking import setup_mlflow
    p = params_or_fail(params)
    setup_mlflow(p, Path.cwd())
    with user_errors():
        st = status(p, Path.cwd(), backend)
    typer.echo(f"challenger {st.challenger} - champion {st.champion}: {st.pairs} shadow pairs "
               f"({p.promotion.confidence:.0%} bootstrap intervals)")
    for metric, ci in st.intervals.items():
        typer.echo(f"  {metric}: {ci.estimate:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] n={ci.n}")
    typer.echo(f"  {st.gate.line()}")


@app.command("compare")
def compare_cmd(models: Annotated[list[str], typer.Argument(help="Two or more: NAME@alias, NAME/version, runs:/ID, base:<backend>.")],
                params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Compare models on the test split: a table here, an HTML report with audio players on disk and in MLflow."""
    from rich.table import Table

    from tasks.registry.report import HEADLINE, compare
    p = params_or_fail(params)
    with user_errors():
        index, evals, run_id = compare(p, Path.cwd(), models)
    table = Table(title="voice2music comparison (test split)")
    table.add_column("metric")
    for e in evals:
        table.add_column(e.ref, justify="right")
    for m in HEADLINE:
        if any(m in e.metrics for e in evals):
            table.add_row(m, *(f"{e.metrics.get(m, float('nan')):.4f}" for e in evals))
    Console().print(table)
    console.print(f"report: {index} (MLflow run {run_id}, artifacts report/)")


@app.command("retrain")
def retrain_cmd(backends: Annotated[list[str] | None, typer.Option("--backend", help="Repeatable; default params retrain.backends.")] = None,
                max_steps: Annotated[int | None, typer.Option(help="Override train.<backend>.max_steps.")] = None,
                push_data: Annotated[bool, typer.Option(help="dvc push after preparing the data.")] = False,
                params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """The whole pipeline as one Prefect flow: prepare data, fine-tune, evaluate, register, promote, report."""
    from flows.retrain import retrain
    params_or_fail(params)
    with user_errors():
        out = retrain(project_dir=str(Path.cwd()), backends=backends, max_steps=max_steps, push_data=push_data)
    summary = Path(".v2m") / "retrain-summary.json"  # every step's decision: a file, not a screenful of JSON
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(out, indent=2, sort_keys=True, default=str))
    console.print(f"details: {summary} (every step and gate), .v2m/data_version.json, "
                  f"data/validated/quarantine.jsonl; MLflow: mlflow ui --backend-store-uri sqlite:///.v2m/mlflow.db",
                  highlight=False)
    for backend, entry in out["backends"].items():  # the last lines: what a person looks at first
        console.print(f"{backend}: champion v{entry['champion']}; report {entry.get('report', '-')}", highlight=False)
    # ... also after Prefect's temporary server logs that it stops (at exit, on the `prefect` logger)
    logging.getLogger("prefect").setLevel(logging.WARNING)


stack_app = typer.Typer(help="The team stack on loopback: SeaweedFS (S3), MLflow server, Prefect server, workers.",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")
StackDir = Annotated[Path, typer.Option(help="Where the stack keeps all of its state.")]


@stack_app.command("up")
def stack_up(state_dir: StackDir = Path(".v2m/stack"),
             servers_only: Annotated[bool, typer.Option(help="Start the servers alone; workers run elsewhere "
                                                        "(`v2m stack worker`).")] = False,
             gpus: Annotated[int | None, typer.Option(help="The `gpu` limit: GPUs of all GPU hosts together "
                                                      "(default: params.yaml orchestration.gpu_hosts).")] = None,
             host: Annotated[str, typer.Option(help="Address the servers bind; another machine's workers need "
                                                    "this host's private address (they ask for credentials).")]
             = "127.0.0.1",
             params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Start what is not running and print how to point clients at it."""
    from v2m.stack import Stack
    total = gpus if gpus is not None else \
        (params_or_fail(params).orchestration.total_gpus if params.is_file() else 1)
    st = Stack(state_dir.resolve(), host=host)
    state = st.up(servers_only=servers_only, gpus=total)
    console.print(f"S3 {state['s3_url']}  MLflow {state['mlflow_url']}  Prefect {state['prefect_url']}")
    console.print(f"credentials: {st.state_dir / 'credentials.json'}; logs: {st.state_dir / 'logs'}")
    console.print("team mode: export the variables below (the cpu role's), then `v2m stack deploy`")
    for k, v in st.client_env("cpu").items():  # secrets are printed to the terminal only, never logged
        typer.echo(f"export {k}={v}")


@stack_app.command("init")
def stack_init(gpus: Annotated[int | None, typer.Option(help="The `gpu` limit (default: params.yaml "
                                                        "orchestration.gpu_hosts).")] = None,
               params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Prepare servers that run elsewhere (docker-compose): buckets, MLflow users, pools, limits, blocks."""
    from v2m.stack_init import init_from_environment
    total = gpus if gpus is not None else \
        (params_or_fail(params).orchestration.total_gpus if params.is_file() else 1)
    with user_errors():
        init_from_environment(total)
    console.print(f"initialised: buckets, MLflow users cpu and gpu, pools cpu and gpu-a40, gpu limit {total}")


@stack_app.command("worker")
def stack_worker(pool: Annotated[str, typer.Option(help="Work pool: cpu or gpu-a40.")],
                 dir: Annotated[Path, typer.Option(help="The worker's own folder (another machine's disk).")],
                 gpus: Annotated[str, typer.Option(help="GPU ids of this host, comma-separated (0,1): one job "
                                                   "per GPU.")] = "",
                 state_dir: StackDir = Path(".v2m/stack")) -> None:
    """Start a worker that acts as another machine: an empty folder, the service URLs and its role's keys."""
    from v2m.stack import Stack
    st = Stack(state_dir.resolve())
    if not st.state():
        console.print("the stack is not running (v2m stack up --servers-only)")
        raise typer.Exit(1)
    with user_errors():
        name = st.worker(pool, dir, [g.strip() for g in gpus.split(",") if g.strip()])
    console.print(f"{name} started in {dir.resolve()}; log {st.state_dir / 'logs' / (name + '.log')}")


@stack_app.command("deploy")
def stack_deploy(state_dir: StackDir = Path(".v2m/stack"), params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """`prefect deploy --all` with the code source from params.yaml orchestration.code (git URL and branch or
    commit): each flow run clones the code at that revision; nothing else is shared but the services."""
    from flows.deploy import deploy_all
    from v2m.stack import Stack
    st = Stack(state_dir.resolve())
    with user_errors():
        names = deploy_all(params_or_fail(params), Path.cwd(), st.client_env("cpu"))
    console.print(f"deployed: {', '.join(names)}")


@stack_app.command("status")
def stack_status(state_dir: StackDir = Path(".v2m/stack")) -> None:
    """Which parts of the stack answer."""
    from v2m.stack import Stack
    health = Stack(state_dir.resolve()).health()
    if not health:
        console.print("the stack is not running (v2m stack up)")
        raise typer.Exit(1)
    for part, ok in health.items():
        console.print(f"{part:16s} {'up' if ok else 'DOWN'}")
    if not all(health.values()):
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down(state_dir: StackDir = Path(".v2m/stack")) -> None:
    """Stop the workers, then the servers; state stays on disk for the next `up`."""
    from v2m.stack import Stack
    stopped = Stack(state_dir.resolve()).down()
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command("config")
def config_cmd(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Validate params.yaml and print the resolved configuration."""
    report(params_or_fail(params).model_dump(by_alias=True))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
