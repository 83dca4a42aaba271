"""One fine-tuning run, end to end: cached inputs -> trainer -> MLflow run with samples and a pyfunc model.

    base model (or the previous stage's model) -> setup_finetune -> train (resumable) -> save
        -> samples (input vocal next to the generated instrumental) -> log_model(name="model")

A run's identity, its key, is everything that determines the result: backend, mode, preset and training
settings, seed, data version, cached inputs, starting point, and the code that trains (the backend's modules
and the training loop). The key names the local run folder `.v2m/runs/<backend>-<mode>-<key>/`, the run's
own checkpoint prefix `<checkpoint_uri>/<backend>-<mode>-<key>/` and the MLflow tag `run_key`. Running the
same command again, on this host or another, resumes that run from its own newest checkpoint or returns the
finished one without training (a cache hit); a run with another key never sees these checkpoints.

MusicGen's stage 2 starts from the finished stage-1 run whose key matches today's settings and data,
found through MLflow and loaded from its logged model (`runs:/<id>/model`), never from a path on the host
that trained it; its run id is recorded as the tag `init_from_run_id`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import configure_torch, default_device, get_backend, save_model
from models.base import Backend
from tasks.data.cache_inputs import CACHE_ROOT, load_base, load_split
from tasks.data.track_cache import cache_key, code_version, module_closure
from tasks.training import distributed
from tasks.training.checkpoints import load_checkpoint
from tasks.training.trainer import train
from v2m.audio import read_mono, write_wav
from v2m.config import Params
from v2m.errors import UserError
from v2m.tracking import EXPERIMENTS, experiment_id, flatten, git_commit, setup_mlflow

MODES = ("voice", "voice_text", "refined")  # refined = voice_text with the refined prompt template


class FinetuneError(UserError, ValueError):
    """The run cannot start as asked (unknown mode, missing previous stage); the message says what to do."""


@dataclass
class FinetuneResult:
    run_id: str
    run_dir: str
    model_dir: str
    model_uri: str
    losses: list[float]
    trained: bool  # False when a finished run with the same key was found (cache hit)
    resumed_from: int


def mode_settings(params: Params, backend: str, mode: str) -> tuple[str, str]:
    """(conditioning, prompt template) of a mode."""
    cfg = getattr(params, backend)
    if mode not in MODES:
        raise FinetuneError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "refined":
        if not hasattr(cfg, "refined_prompt_template"):
            raise FinetuneError(f"{backend} has no refined-prompt variant (params.yaml {backend}.refined_prompt_template)")
        return "voice_text", cfg.refined_prompt_template
    return mode, cfg.prompt_template


def data_version_of(root: Path) -> str:
    path = root / ".v2m" / "data_version.json"
    return json.loads(path.read_text())["data_version"] if path.is_file() else "unversioned"


def training_code_version(backend: str) -> str:
    """The code a fine-tuned model depends on: this module's import closure (the trainer, checkpoints,
    cached-input loading, the backend's own modules), less the other backends."""
    from models import BACKENDS
    return code_version(*module_closure(__file__, exclude=tuple(f"models/{b}" for b in BACKENDS if b != backend)))


def run_key(params: Params, backend: str, mode: str, init_from: str, data_version: str, cache_dir: Path,
            tcfg: Any = None) -> str:
    """The identity of a fine-tuning run (see the module docstring)."""
    tcfg = tcfg or params.train_config(backend)  # the preset's training profile with train.<backend> overrides
    index = cache_dir / "index.jsonl"
    world = distributed.world_size()  # N data-parallel processes train on N x the batch: another run
    return cache_key(backend, mode, params.backend_config(backend).model_dump(),
                     tcfg.model_dump(exclude={"checkpoint_uri"}), params.seed, data_version, init_from,
                     index.read_text() if index.is_file() else "", training_code_version(backend),
                     *([world] if world > 1 else []))[:10]


def find_run(params: Params, backend: str, root: Path, key: str):
    """The newest MLflow run with this key (finished, or interrupted and resumable), or None."""
    import mlflow
    runs = mlflow.search_runs([experiment_id(EXPERIMENTS[backend], params, root)],
                              filter_string=f"tags.run_key = '{key}'", order_by=["attributes.start_time DESC"],
                              max_results=5, output_format="list")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or runs or [None])[0]


def previous_stage_model(params: Params, backend: str, root: Path, data_version: str) -> str:
    """MusicGen's stage 2 starts from stage 1: the finished `voice` run with today's settings and data
    (the run that `v2m train --stage voice` would find as its own cache hit), as an MLflow model URI."""
    cache_dir = root / CACHE_ROOT / backend
    key = run_key(params, backend, "voice", "base", data_version, cache_dir)
    run = find_run(params, backend, root, key)
    if run is None or run.info.status != "FINISHED":
        preset = getattr(params, backend).preset
        raise FinetuneError(f"{backend} stage voice_text starts from a finished stage `voice` run with the same "
                            f"settings, preset {preset!r} and data {data_version} (run key {key}); run "
                            f"`v2m train --backend {backend} --stage voice` first, or pass --init-from base")
    return f"runs:/{run.info.run_id}/model"


def log_samples(backend: Backend, items, n: int, duration_s: float, conditioning: str, out: Path) -> list[Path]:
    """Generate for the first n validation chunks; write each input vocal next to its instrumental."""
    import mlflow
    written = []
    for i in range(min(n, len(items))):
        meta = items[i]["meta"]
        vocal, sr = read_mono(meta["vocals_path"])
        vocal = vocal[: int(duration_s * sr)]
        prompt = items[i]["prompt"] if conditioning == "voice_text" else None
        audio = backend.generate(vocal, sr, prompt, duration_s, seed=i)
        for name, wav, rate in (("vocal", vocal, sr), ("generated", audio, backend.sample_rate)):
            path = out / f"{meta['chunk_id']}_{name}.wav"
            write_wav(path, wav, rate)
            written.append(path)
        mlflow.log_text(json.dumps({"chunk": meta["chunk_id"], "prompt": prompt}), f"samples/{meta['chunk_id']}.json")
    for path in written:
        mlflow.log_artifact(str(path), "samples")
    return written


def finetune(params: Params, backend_name: str, mode: str, root: Path = Path("."), init_from: str = "auto",
             max_steps: int | None = None, stop_after: int | None = None, gpus: int = 1) -> FinetuneResult:
    """Fine-tune one backend in one mode (a stage for MusicGen, a variant for AudioLDM).

    gpus > 1: the same run as one data-parallel job of `gpus` processes on torchrun (see
    tasks/training/distributed.py); this call waits for it and returns rank 0's result."""
    if gpus > 1 and not distributed.launched():
        args = ["train", "--backend", backend_name, "--variant" if get_backend(backend_name).mode_tag == "variant"
                else "--stage", mode, "--init-from", init_from] + (["--max-steps", str(max_steps)] if max_steps else [])
        dump = params.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return FinetuneResult(**distributed.launch_train(dump, args, gpus, Path(root).resolve()))
    device = distributed.local_device(default_device())
    tcfg = params.train_config(backend_name)
    with distributed.process_group(device, tcfg.collective_timeout_s, tcfg.io_timeout_s):
        result = _finetune(params, backend_name, mode, Path(root), init_from, max_steps, stop_after, device)
    distributed.write_result(asdict(result))
    return result


def _finetune(params: Params, backend_name: str, mode: str, root: Path, init_from: str, max_steps: int | None,
              stop_after: int | None, device: str) -> FinetuneResult:
    import mlflow

    from models.pyfunc import log_pyfunc
    root = Path(root).resolve()
    conditioning, template = mode_settings(params, backend_name, mode)
    configure_torch(params.torch_threads)
    cls, bcfg = get_backend(backend_name), params.backend_config(backend_name)  # crop from the training profile
    tcfg = params.train_config(backend_name)  # the preset's profile with train.<backend> overrides
    if max_steps is not None:
        tcfg = tcfg.model_copy(update={"max_steps": max_steps})
    with distributed.main_first():  # one process creates the tracking database and the experiment
        setup_mlflow(params, root)
        experiment_id(EXPERIMENTS[backend_name], params, root)
    data_version = data_version_of(root)
    cache_dir = root / CACHE_ROOT / backend_name
    if init_from == "auto":
        init_from = previous_stage_model(params, backend_name, root, data_version) \
            if (cls.mode_tag == "stage" and mode == "voice_text") else "base"

    key = run_key(params, backend_name, mode, init_from, data_version, cache_dir, tcfg)
    name = f"{backend_name}-{mode}-{key}"
    run_dir = root / ".v2m" / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "finished.json"
    if done.is_file():
        return FinetuneResult(**{**json.loads(done.read_text()), "trained": False})
    prior = find_run(params, backend_name, root, key)
    if prior is not None and prior.info.status == "FINISHED":  # finished elsewhere (another host)
        return FinetuneResult(prior.info.run_id, str(run_dir), prior.data.tags.get("model_dir", ""),
                              f"runs:/{prior.info.run_id}/model", [], False, 0)
    if tcfg.checkpoint_uri:  # this run's own prefix: no other run resumes from it
        tcfg = tcfg.model_copy(update={"checkpoint_uri": f"{tcfg.checkpoint_uri.rstrip('/')}/{name}"})

    def starting_point() -> tuple[Backend, dict[str, str]]:
        backend, info = load_base(params, backend_name, cache_dir, device=device)
        if init_from != "base":
            from models.refs import resolve_model
            backend = resolve_model(init_from, device=device)
        backend.cfg = bcfg  # today's settings (dropout, crop, ...), not those saved with the base or previous stage
        method = getattr(bcfg, "finetune", "full")  # only backends that offer LoRA configure a method
        backend.setup_finetune(method, **(bcfg.lora.model_dump() if method == "lora" else {}))
        return backend, info

    backend, base_info = starting_point()
    train_items = load_split(cache_dir, "train", template)
    val_items = load_split(cache_dir, "val", template)

    if not distributed.is_main():  # data-parallel ranks > 0: train in step with rank 0, which logs and saves
        result = train(backend, train_items, val_items, tcfg, conditioning, run_dir, params.seed, stop_after=stop_after)
        distributed.finish()
        return FinetuneResult("", str(run_dir), "", "", result.losses, True, result.resumed_from)

    run_id_file = run_dir / "mlflow_run_id"
    exp = experiment_id(EXPERIMENTS[backend_name], params, root)
    resume_id = run_id_file.read_text() if run_id_file.is_file() else (prior.info.run_id if prior else None)
    with mlflow.start_run(run_id=resume_id, experiment_id=exp,
                          run_name=f"{backend_name}-{mode}-{bcfg.preset}") as run:
        run_id_file.write_text(run.info.run_id)
        if not (run_dir / "params_logged").exists():
            mlflow.log_params(flatten({"backend": backend_name, "mode": mode, "conditioning": conditioning,
                                       "seed": params.seed, "init_from": init_from,
                                       "train": tcfg.model_dump(), backend_name: bcfg.model_dump(),
                                       "data.segment": params.data.segment.model_dump()}))
            mlflow.set_tags({"backend": backend_name, cls.mode_tag: mode, "preset": bcfg.preset,
                             "base_model": base_info["base_model"], "data_version": data_version,
                             "git_commit": git_commit(root), "init_from": init_from, "run_key": key,
                             **({"init_from_run_id": init_from.split("/")[1]} if init_from.startswith("runs:/") else {})})
            (run_dir / "params_logged").touch()
        result = train(backend, train_items, val_items, tcfg, conditioning, run_dir, params.seed,
                       log=lambda m, step: mlflow.log_metrics(m, step=step), stop_after=stop_after)
        distributed.finish()  # the rest is rank 0's alone
        if result.steps < tcfg.max_steps:  # stopped early on purpose (stop_after): resume later
            mlflow.end_run(status="KILLED")
            return FinetuneResult(run.info.run_id, str(run_dir), "", "", result.losses, True, result.resumed_from)
        if result.parallel == "fsdp":  # the trained module is still sharded over a job that has ended
            backend, _ = starting_point()
            backend.load_trainable_state_dict(load_checkpoint(result.checkpoint)["model"])
        model_dir = run_dir / "model"
        save_model(backend, model_dir)
        log_samples(backend, val_items or train_items, tcfg.samples, tcfg.sample_duration_s, conditioning,
                    run_dir / "samples")
        model_uri = log_pyfunc(backend_name, model_dir)
        mlflow.set_tag("model_dir", str(model_dir))
        mlflow.log_metric("train/final_loss", float(np.mean(result.losses[-3:])))
    out = FinetuneResult(run.info.run_id, str(run_dir), str(model_dir), model_uri, result.losses, True,
                         result.resumed_from)
    done.write_text(json.dumps({k: v for k, v in asdict(out).items() if k != "trained"}))
    return out


# --- thin Prefect task wrapper ---------------------------------------------------------------------------
from prefect import task  # noqa: E402

from tasks.orchestration import params_hash, retry_transient  # noqa: E402


def _cache_key(context, arguments: dict[str, Any]) -> str:
    """Same data version + same settings + same training code = same model: an unchanged re-run of the flow
    trains nothing, and a fix to the training or model code retrains."""
    root, params = Path(arguments.get("root", ".")).resolve(), arguments["params"]
    return "finetune-" + params_hash(arguments["backend_name"], arguments["mode"], data_version_of(root),
                                     params.model_dump(), arguments.get("init_from", "auto"),
                                     arguments.get("max_steps"), str(root),
                                     training_code_version(arguments["backend_name"]),
                                     *([arguments["gpus"]] if arguments.get("gpus", 1) > 1 else []))


# GPU work: the `gpu` tag's concurrency limit (one per GPU) keeps one fine-tune per device.
finetune_task = task(finetune, name="finetune", tags=["gpu"], retries=2, retry_delay_seconds=10,
                     retry_condition_fn=retry_transient, cache_key_fn=_cache_key, persist_result=True)
