"""The FastAPI app: POST /v1/generate, GET /healthz /readyz /metrics, and the page at GET /.

create_app() takes the parts (holder, batcher, settings) and mounts one router per concern; another module adds
its own with `app.include_router(...)` (the listening page does). Every error is JSON
{"error": code, "detail": sentence} with its status: 4xx for the request's fault, 503/504 for the server's state.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

import soundfile as sf
from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.longform import Request as GenRequest
from tasks.serving.batcher import Batcher, NotReady, Overloaded
from tasks.serving.holder import ModelHolder
from tasks.serving.inputs import (RequestError, decode_vocal, max_upload_bytes, parse_duration, parse_prompt,
                                  parse_seed)
from tasks.serving.metrics import Metrics
from v2m.config_serve import GenerateConfig, ServeConfig

MULTIPART_SLACK = 64 * 1024  # form fields and boundaries around the file


@dataclass
class Service:
    """Everything a route needs, on app.state.service."""
    cfg: ServeConfig
    gen: GenerateConfig
    holder: ModelHolder
    batcher: Batcher
    metrics: Metrics


def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def api_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/generate")
    async def generate(request: Request, vocal: UploadFile | None = File(None), prompt: str | None = Form(None),
                       duration: str | None = Form(None), seed: str | None = Form(None)) -> Response:
        svc: Service = request.app.state.service
        started = time.perf_counter()
        try:
            response = await _generate(svc, vocal, prompt, duration, seed)
        except RequestError as exc:
            response = error(exc.status, exc.error, exc.detail, exc.headers)
        svc.metrics.requests.labels(status=str(response.status_code)).inc()
        if response.status_code == 200:
            svc.metrics.latency.observe(time.perf_counter() - started)
        return response

    return router


async def _generate(svc: Service, vocal: UploadFile | None, prompt: str | None, duration: str | None,
                    seed: str | None) -> Response:
    cfg = svc.cfg
    audio, sr = None, 0
    if vocal is not None and vocal.filename:
        data = await vocal.read(max_upload_bytes(cfg) + 1)
        audio, sr = await asyncio.to_thread(decode_vocal, data, vocal.filename, cfg)
    text = parse_prompt(prompt)
    if audio is None and text is None:
        raise RequestError(422, "no_input", "send a vocal file (field 'vocal'), a prompt (field 'prompt'), or both")
    seconds = parse_duration(duration, None if audio is None else len(audio) / sr, cfg, svc.gen)
    chosen = parse_seed(seed)
    chosen = secrets.randbelow(2**31) if chosen is None else chosen
    retry = {"Retry-After": str(cfg.retry_after_s)}
    try:
        future = svc.batcher.submit(GenRequest(audio, sr, text, seconds, chosen))
    except NotReady:
        raise RequestError(503, "not_ready", svc.holder.error or "the model is still loading", retry) from None
    except Overloaded:
        raise RequestError(503, "overloaded", f"{svc.batcher.pending} requests are queued (params.yaml "
                                              f"serve.max_pending); try again later", retry) from None
    try:
        result = await asyncio.wait_for(asyncio.wrap_future(future), cfg.timeout_s)
    except TimeoutError:
        raise RequestError(504, "timeout", f"no result within {cfg.timeout_s:g} s (params.yaml serve.timeout_s)",
                           retry) from None
    svc.metrics.rtf.observe(result.seconds / seconds)
    buf = io.BytesIO()
    sf.write(buf, result.audio, result.sample_rate, format="WAV", subtype="PCM_16")
    return Response(buf.getvalue(), media_type="audio/wav",
                    headers={"X-V2M-Model": result.model, "X-V2M-Seed": str(chosen),
                             "Content-Disposition": 'attachment; filename="instrumental.wav"'})


def ops_router() -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        svc: Service = request.app.state.service
        cur = svc.holder.current
        body = {"ready": cur is not None, "model": cur.label if cur else None,
                "backend": cur.backend.name if cur else None, "ref": svc.holder.ref,
                "load_error": svc.holder.error, "queue_depth": svc.batcher.pending}
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
        yield
        svc.batcher.stop()
        svc.holder.stop()

    app = FastAPI(title="voice2music", lifespan=lifespan)
    app.state.service = svc

    @app.middleware("http")
    async def upload_limit(request: Request, call_next):
        """Refuse an oversized upload from its Content-Length, before reading it."""
        size = request.headers.get("content-length")
        if request.method == "POST" and size and size.isdigit() and \
                int(size) > max_upload_bytes(svc.cfg) + MULTIPART_SLACK:
            svc.metrics.requests.labels(status="413").inc()
            return error(413, "too_large", f"the request is larger than {svc.cfg.max_upload_mb:g} MB "
                                           f"(params.yaml serve.max_upload_mb)")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        svc.metrics.requests.labels(status="422").inc()
        return error(422, "invalid_request", "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                       for e in exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, "http_error", str(exc.detail))

    for router in (api_router(), ops_router(), page_router()):
        app.include_router(router)
    return app
