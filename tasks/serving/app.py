"""The FastAPI app: POST /v1/generate, GET /healthz /readyz /metrics, and the page at GET /.

create_app() takes the parts (holder, batcher, settings) and mounts one router per concern; another module adds
its own with `app.include_router(...)` (the listening page does). Every error is JSON
{"error": code, "detail": sentence} with its status: 4xx for the request's fault, 503/504 for the server's state;
no detail ever carries a Python object's address.

Bounded work per request: guard.py refuses wrong hosts, cross-origin POSTs, missing API keys, and bodies past
serve.max_upload_mb or serve.body_timeout_s while they arrive; inputs.py reads a vocal's length and rate from its
header before decoding; each client has at most serve.max_per_client requests in flight; a request whose client
hangs up (or that passes serve.timeout_s) is dropped from the queue, or stops its batch at the next step when
it was the batch's last listener (models/cancel.py).

Rollout (tasks/serving/rollout.py): the route asks who answers (the champion, or in canary mode the challenger
for a share of clients) and says so in X-V2M-Variant; once the result is ready it hands it to online scoring
or the shadow (queue operations only), then answers. The client's slot and deadline are the same for both
variants; shadow work happens after the answer, in its own bounded queue.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import secrets
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

import soundfile as sf
from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.cancel import CancelToken
from models.longform import Request as GenRequest
from tasks.serving.batcher import Batcher, NotReady, Overloaded, Result
from tasks.serving.guard import (ClientSlots, EdgeError, EdgeRules, Guard, TooManyForClient, client_id,
                                 edge_error_handler)
from tasks.serving.holder import ModelHolder
from tasks.serving.inputs import (RequestError, decode_vocal, max_upload_bytes, parse_duration, parse_prompt,
                                  parse_seed)
from tasks.serving.metrics import Metrics
from tasks.serving.rollout import Rollout
from v2m.config_serve import GenerateConfig, ServeConfig

MULTIPART_SLACK = 64 * 1024  # form fields and boundaries around the file
OPEN_PATHS = ("/healthz", "/readyz", "/metrics")  # probes and scrapers: any Host, no API key
ADDRESS = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")
log = logging.getLogger("v2m.serve")


class ClientGone(Exception):
    """The client hung up before its result was ready."""


@dataclass
class Service:
    """Everything a route needs, on app.state.service."""
    cfg: ServeConfig
    gen: GenerateConfig
    holder: ModelHolder
    batcher: Batcher
    metrics: Metrics
    rollout: Rollout  # who answers (champion, canary challenger), shadow, online scores (tasks/serving/rollout.py)
    api_keys: dict[str, str] = field(default_factory=dict)  # name -> key (V2M_SERVE_API_KEYS); empty = open
    clients: ClientSlots = field(init=False)  # requests in flight per client, whichever model answers them

    def __post_init__(self) -> None:
        self.clients = ClientSlots(self.cfg.max_per_client)


def scrub(detail: str) -> str:
    """No `<object at 0x...>` in what a client reads: addresses help an attacker and nobody else."""
    return ADDRESS.sub("the upload", detail)


def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": scrub(detail)}, status_code=status, headers=headers)


def api_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/generate")
    async def generate(request: Request, vocal: UploadFile | None = File(None), prompt: str | None = Form(None),
                       duration: str | None = Form(None), seed: str | None = Form(None)) -> Response:
        svc: Service = request.app.state.service
        started = time.perf_counter()
        client = client_id(request.scope)
        try:
            svc.clients.acquire(client)
        except TooManyForClient:
            response = error(429, "too_many_requests", f"this client already has {svc.cfg.max_per_client} requests "
                             f"in flight (params.yaml serve.max_per_client)",
                             {"Retry-After": str(svc.cfg.retry_after_s)})
        else:
            try:
                response = await _generate(svc, request, vocal, prompt, duration, seed, client, started)
            except RequestError as exc:
                response = error(exc.status, exc.error, exc.detail, exc.headers)
            except ClientGone:
                response = error(499, "client_gone", "the client closed the connection")  # nobody reads it
            except Exception:  # the model failed: say so without internals (the log has the traceback)
                log.exception("generation failed")
                response = error(500, "generation_failed", "the model failed on this request; see the server log")
            finally:
                svc.clients.release(client)
        svc.metrics.requests.labels(status=str(response.status_code)).inc()
        if response.status_code == 200:
            svc.metrics.latency.observe(time.perf_counter() - started)
        return response

    return router


async def _generate(svc: Service, request: Request, vocal: UploadFile | None, prompt: str | None,
                    duration: str | None, seed: str | None, client: str, started: float) -> Response:
    cfg = svc.cfg
    requested = None if duration in (None, "") else parse_duration(duration, None, cfg, svc.gen)
    audio, sr = None, 0
    if vocal is not None and vocal.filename:
        data = await vocal.read(max_upload_bytes(cfg) + 1)
        audio, sr = await asyncio.to_thread(decode_vocal, data, vocal.filename, cfg, requested)
    text = parse_prompt(prompt)
    if audio is None and text is None:
        raise RequestError(422, "no_input", "send a vocal file (field 'vocal'), a prompt (field 'prompt'), or both")
    seconds = requested or parse_duration(None, None if audio is None else len(audio) / sr, cfg, svc.gen)
    chosen = parse_seed(seed)
    chosen = secrets.randbelow(2**31) if chosen is None else chosen
    retry = {"Retry-After": str(cfg.retry_after_s)}
    token = CancelToken()
    gen_request = GenRequest(audio, sr, text, seconds, chosen, cancel=token)
    variant, batcher = svc.rollout.route(client)
    try:
        future = batcher.submit(gen_request)
    except NotReady:
        raise RequestError(503, "not_ready", svc.holder.error or "the model is still loading", retry) from None
    except Overloaded:
        raise RequestError(503, "overloaded", f"{batcher.pending} requests are queued (params.yaml "
                                              f"serve.max_pending); try again later", retry) from None
    result = await _result(future, token, request, cfg.timeout_s)
    if result is None:
        raise RequestError(504, "timeout", f"no result within {cfg.timeout_s:g} s (params.yaml serve.timeout_s)",
                           retry)
    svc.metrics.rtf.observe(result.seconds / seconds)
    try:  # queue operations only (scoring, the shadow); a failure there must not cost the client its answer
        svc.rollout.served(variant, client, gen_request, result, time.perf_counter() - started)
    except Exception:
        log.exception("online scoring / shadow hand-off failed")
    buf = io.BytesIO()
    sf.write(buf, result.audio, result.sample_rate, format="WAV", subtype="PCM_16")
    return Response(buf.getvalue(), media_type="audio/wav",
                    headers={"X-V2M-Model": result.model, "X-V2M-Seed": str(chosen), "X-V2M-Variant": variant,
                             "Content-Disposition": 'attachment; filename="instrumental.wav"'})


async def _result(future: Future, token: CancelToken, request: Request, timeout_s: float) -> Result | None:
    """The generation's result; None past the timeout; ClientGone when the client hangs up first. Either way
    the request is cancelled: dropped if still queued, its batch stopped if nobody else waits for it."""
    waiter = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiter, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if waiter in done:
        return waiter.result()
    token.cancel()
    waiter.cancel()  # cancels the queued job too (a running one ends through its token)
    if gone in done:
        raise ClientGone()
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def ops_router() -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        svc: Service = request.app.state.service
        cur = svc.holder.current
        ro = svc.rollout
        challenger = ro.challenger.current.label if ro.challenger and ro.challenger.current else None
        body = {"ready": cur is not None, "model": cur.label if cur else None,
                "backend": cur.backend.name if cur else None, "ref": svc.holder.ref,
                "load_error": svc.holder.error, "queue_depth": svc.batcher.pending,
                "rollout": {"mode": ro.cfg.mode, "challenger": challenger, "canary": ro.canary_label(),
                            "challenger_error": ro.challenger.error if ro.challenger else None}}
        return JSONResponse(body, status_code=200 if cur is not None else 503)

    @router.get("/metrics")
    def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(request.app.state.service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


def page_router() -> APIRouter:
    router = APIRouter()
    html = resources.files("tasks.serving").joinpath("page.html").read_text()

    @router.get("/", response_class=HTMLResponse)
    def page() -> str:
        return html

    return router


def create_app(svc: Service) -> FastAPI:
    """The app over a Service; starting it starts the holder and the batcher, stopping it stops both."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.holder.start()
        svc.batcher.start()
        svc.rollout.start()
        yield
        svc.batcher.stop()
        svc.rollout.stop()
        svc.holder.stop()

    cfg = svc.cfg
    docs = cfg.docs  # off by default: the API's shape is in the README, not served to whoever asks
    app = FastAPI(title="voice2music", lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.service = svc
    count = lambda status: svc.metrics.requests.labels(status=str(status)).inc()  # noqa: E731
    app.add_middleware(Guard, on_refused=count, rules=EdgeRules(
        max_body_bytes=max_upload_bytes(cfg) + MULTIPART_SLACK, body_timeout_s=cfg.body_timeout_s,
        allowed_hosts=cfg.allowed_hosts, api_keys=svc.api_keys, open_paths=OPEN_PATHS,
        limit_hint=" (params.yaml serve.max_upload_mb)"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        count(422)
        return error(422, "invalid_request", "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                       for e in exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, EdgeError):  # a body past the limit or the deadline, met while the route read it
            count(exc.status_code)
        return edge_error_handler(request, exc)

    for router in (api_router(), ops_router(), page_router()):
        app.include_router(router)
    return app
