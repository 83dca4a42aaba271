"""The blind A/B page and its JSON API, as a FastAPI router: mounted at /listen by `v2m listen`; another app
(the serving app) mounts the same router at the same prefix, its clips prepared in the background:

    app.include_router(create_router(params, root, BackgroundListeningSet(params, root, backend)), prefix="/listen")
    app.add_exception_handler(NotReady, not_ready)

    GET  ""                      the page
    GET  /api/whoami             the listener named by the team's auth header, if any
    POST /api/session            {listener} -> this listener's trials (created on first call), progress
    GET  /audio/{trial}/{A|B}    the mix shown as A or B in that trial (the URL says nothing of the model)
    POST /api/votes              {vote_id, trial_id, listener, answer: A|B|none, rating_a?, rating_b?}
    GET  /api/results            the statistics for the pair (with the models' names: for after voting)
    GET  /api/votes              every vote on the pair, as stored

Errors are JSON {"error", "detail"}: 4xx for the request's fault, 503 while there is no listening set yet.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field

from tasks.listening.clips import ListeningSet
from tasks.listening.gate import record, store_for
from tasks.listening.lazy import NotReady
from tasks.listening.stats import summarize
from tasks.listening.store import VoteError
from v2m.config import Params

PAGE = Path(__file__).with_name("page.html")
log = logging.getLogger(__name__)


class SessionIn(BaseModel):
    listener: str = Field("", max_length=100)


class VoteIn(BaseModel):
    vote_id: str = Field(min_length=1, max_length=100)
    trial_id: str
    listener: str = Field("", max_length=100)
    answer: str
    rating_a: int | None = None
    rating_b: int | None = None


def finite(obj):
    """JSON has no NaN: an undefined statistic (no votes yet) goes out as null."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def create_router(params: Params, root: Path, source: ListeningSet | Callable[[], ListeningSet]) -> APIRouter:
    """The routes over a prepared ListeningSet, or a callable giving the current one (lazy.py's
    BackgroundListeningSet, which raises NotReady -> 503 while the clips are prepared)."""
    store = store_for(params, root)
    header = params.listening.auth_header
    router = APIRouter()

    def listener_of(request: Request, typed: str) -> str:
        # The auth proxy's header wins over a typed name: a signed-in listener cannot vote as someone else.
        return (request.headers.get(header, "") if header else "").strip() or typed.strip()

    def current() -> ListeningSet:
        return source() if callable(source) else source

    def public(trial: dict) -> dict:  # what the page may know of a trial: never which model is A or B
        return {"trial_id": trial["trial_id"], "position": trial["position"], "answered": trial["answer"] is not None}

    @router.get("", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(), headers={"Cache-Control": "no-store"})

    @router.get("/api/whoami")
    def whoami(request: Request) -> dict:
        return {"listener": listener_of(request, "") or None, "auth_header": header or None}

    @router.post("/api/session")
    def session(body: SessionIn, request: Request):
        who = listener_of(request, body.listener)
        ls = current()
        try:
            trials = store.trials_for(who, ls.backend, ls.models, ls.chunks)
        except VoteError as exc:
            return _error(400, "bad_request", str(exc))
        return {"listener": who, "backend": ls.backend, "total": len(trials),
                "answered": sum(t["answer"] is not None for t in trials), "trials": [public(t) for t in trials]}

    @router.get("/audio/{trial_id}/{slot}")
    def audio(trial_id: str, slot: str):
        if slot not in ("A", "B"):
            return _error(404, "not_found", "slot must be A or B")
        try:
            t = store.trial(trial_id)
        except VoteError as exc:
            return _error(404, "not_found", str(exc))
        model = t["model_a"] if slot == "A" else t["model_b"]
        ls = current()
        if (model, t["chunk_id"]) not in ls.clips:
            return _error(404, "not_found", f"trial {trial_id} is not part of this listening test")
        return FileResponse(ls.clip(model, t["chunk_id"]), media_type="audio/wav",
                            headers={"Cache-Control": "private, max-age=3600"})

    @router.post("/api/votes")
    def vote(body: VoteIn, request: Request):
        who = listener_of(request, body.listener)
        try:
            row, new = store.vote(body.vote_id, body.trial_id, who, body.answer, body.rating_a, body.rating_b)
        except VoteError as exc:
            status = 409 if "already" in str(exc) else 400
            return _error(status, "conflict" if status == 409 else "bad_request", str(exc))
        if new:
            ls = current()
            try:  # the vote is stored either way; the registry copy is refreshed on the next vote if this fails
                record(params, root, ls.backend, ls.models)
            except Exception:
                log.exception("could not record the listening results in MLflow")
        return {"vote_id": row["vote_id"], "trial_id": row["trial_id"], "stored": new, "answer": row["answer"]}

    @router.get("/api/results")
    def results() -> dict:
        ls = current()
        votes = store.votes(ls.backend, ls.models)
        model, opponent = ls.models
        s = summarize(votes, model, opponent, params.promotion.human_preference.confidence)
        return finite({**s, "roles": ls.roles})

    @router.get("/api/votes")
    def votes() -> list[dict]:
        ls = current()
        return store.votes(ls.backend, ls.models)

    return router


def not_ready(request: Request, exc: NotReady) -> JSONResponse:
    """Register on the app that includes the router: app.add_exception_handler(NotReady, not_ready)."""
    return _error(503, "not_ready", str(exc))


def create_app(params: Params, root: Path, ls: ListeningSet | Callable[[], ListeningSet]) -> FastAPI:
    """The stand-alone listening server of `v2m listen`: the router at /listen, / redirects there."""
    app = FastAPI(title="voice2music listening test", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(create_router(params, root, ls), prefix="/listen")
    app.add_exception_handler(NotReady, not_ready)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error(422, "invalid_request", where)

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/listen")

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 takes a free one (the caller prints the real address)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def serve(app: FastAPI, sock: socket.socket) -> None:
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
