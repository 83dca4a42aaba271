"""Build the service from params.yaml `serve:` and run it on uvicorn (what `v2m serve` calls)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from tasks.serving.access import (api_keys, check_exposure, check_registry_access, check_rollout_access,
                                  rollout_permissions)
from tasks.serving.app import Service, create_app
from tasks.serving.batcher import GENERATION, Batcher
from tasks.serving.guard import deadlined
from tasks.serving.holder import ModelHolder
from tasks.serving.metrics import Metrics
from tasks.serving.rollout import Rollout, rollout_key
from v2m.config import Params
from v2m.config_serve import ServeConfig
from v2m.tracking import REGISTERED_MODELS


# One model load at a time in this process: transformers builds models under a process-wide "init on the meta
# device" context, and two loads in two threads (champion and challenger holders) break each other.
LOADING = threading.Lock()


def default_ref(params: Params) -> str:
    return params.serve.model or f"{REGISTERED_MODELS[params.serve.backend]}@champion"


def build_service(params: Params, root: Path, ref: str | None = None, record: bool = True) -> Service:
    """Everything serve runs; record=False: online.* stays in /metrics (an MLflow user that may not write)."""
    from models import configure_torch, default_device
    from models.conditioning import require_conditioning
    from models.refs import resolve_model
    from v2m.tracking import setup_mlflow
    setup_mlflow(params, root)
    configure_torch(params.torch_threads)
    cfg, metrics = params.serve, Metrics()
    device = default_device()

    def on_change(h: ModelHolder) -> None:
        if h.current is not None:
            metrics.serving(h.current.label, h.current.backend.name)
        metrics.load_failed(h.failed[0] if h.failed else None)

    # A model whose generation ignores the melody or the prompt is refused at load (models/conditioning.py):
    # the failure shows in /readyz's load_error, and whatever served before keeps serving. The challenger too.
    def load(label: str):
        with LOADING:
            backend = resolve_model(label, device=device)
        with GENERATION.serving():  # the probe samples too: not beside a request's generation (batcher.py)
            return require_conditioning(backend)

    holder = ModelHolder(ref or default_ref(params), load, cfg.poll_s, on_change)
    batcher = Batcher(holder, params.generate, metrics, cfg.max_pending, cfg.batch_window_ms / 1000, cfg.max_batch)
    challenger = challenger_batcher = None
    if cfg.rollout.mode != "off":
        challenger = ModelHolder(challenger_ref(params), load, cfg.poll_s,
                                 lambda h: rollout.challenger_loaded(h))
    if cfg.rollout.mode == "canary":  # its own queue: a slow or failing challenger never holds the champion's
        challenger_batcher = Batcher(challenger, params.generate, metrics, cfg.max_pending,
                                     cfg.batch_window_ms / 1000, cfg.max_batch)
    rollout = Rollout(params, root, holder, batcher, metrics, challenger, challenger_batcher, record=record)
    return Service(cfg, params.generate, holder, batcher, metrics, rollout, api_keys())


def challenger_ref(params: Params) -> str:
    return params.serve.rollout.challenger or f"{REGISTERED_MODELS[params.serve.backend]}@challenger"


def server_config(app, cfg: ServeConfig, host: str, port: int, **options):
    """uvicorn's settings for a server that faces people: a deadline on every request's headers, and the
    client's address taken from the connection (uvicorn would otherwise believe X-Forwarded-For from loopback)."""
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, http=deadlined(cfg.header_timeout_s), proxy_headers=False,
                          **options)


def serve(params: Params, root: Path, ref: str | None = None, host: str | None = None,
          port: int | None = None) -> None:
    import uvicorn

    from models.refs import to_model_uri
    from v2m.tracking import tracking_uri
    ref, host = ref or default_ref(params), host or params.serve.host
    check_exposure(host, api_keys())  # before anything loads: an open server on the network is a mistake
    if not Path(ref).is_dir():
        to_model_uri(ref)  # a REF that can never name a model fails now (exit 1), not as a server never ready
        # the registry must answer serve's credentials, or the champion never loads
        check_registry_access(tracking_uri(params, root), registered_name(ref, params))
    rollout_key()  # a V2M_ROLLOUT_KEY too short to be secret stops serve now
    ro, name = params.serve.rollout, registered_name(ref, params)
    allowed = rollout_permissions(tracking_uri(params, root), name)
    check_rollout_access(ro.mode, ro.auto_rollback, allowed, name, os.environ.get("MLFLOW_TRACKING_USERNAME", ""))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not allowed["record"]:
        logging.getLogger("v2m.serve").info("online metrics stay in /metrics: this MLflow user may not write "
                                            "experiment voice2music-online (run as the `rollout` role to record)")
    app = create_app(build_service(params, root, ref, record=allowed["record"]))
    uvicorn.Server(server_config(app, params.serve, host, port or params.serve.port, log_level="info")).run()


def registered_name(ref: str, params: Params) -> str:
    """The registered model a REF reads (NAME@alias, NAME/VERSION), else (runs:/...) the backend's."""
    body = ref.removeprefix("models:/")
    if "@" in body:
        return body.split("@")[0]
    return body.rpartition("/")[0] if "/" in body and not ref.startswith("runs:/") else \
        REGISTERED_MODELS[params.serve.backend]
