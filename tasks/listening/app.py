"""The blind A/B page and its JSON API, as a FastAPI router: mounted at /listen by `v2m listen`; another app
(the serving app) can mount the same router at the same prefix, its clips prepared in the background:

    app.include_router(create_router(params, root, BackgroundListeningSet(params, root, backend)), prefix="/listen")
    app.add_exception_handler(NotReady, not_ready)

    GET  ""                      the page; a listener's personal link is /listen#invite=TOKEN, the owner's
                                 /listen#owner=TOKEN (after '#': never sent to the server, never in a log)
    GET  /api/whoami             who this request is, if anyone
    POST /api/session            this listener's trials (created on first call), progress
    GET  /audio/{trial}/{A|B}    the mix shown as A or B in that trial
    POST /api/votes              {vote_id, trial_id, answer: A|B|none, rating_a?, rating_b?}
    GET  /api/results            owner only: the statistics, the uncounted votes and the refused attempts
    GET  /api/votes              owner only: every vote on the pair, as stored

Who is listening: the invitation token in `Authorization: Bearer` (`v2m listen --invite NAME`), or the auth
header (listening.auth_header) when the request comes from a listening.trusted_proxies address. Nothing else:
a typed name, a header from anyone else or a wrong token is refused (401) and counted as a refused attempt,
which the owner sees. The owner is whoever holds the token `v2m listen` prints (or reads MLflow's record).

Nothing served tells A from B: trial ids are random per listener (the audio URL names no model), both sides go
out with the same headers (no Last-Modified, no ETag, the same length), and each copy carries a 16-bit dither
keyed by a secret, the trial and the side, so the same clip has different bytes for every listener.

Errors are JSON {"error", "detail"}: 4xx for the request's fault, 503 while there is no listening set yet.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from tasks.listening.clips import ListeningSet, served_clip
from tasks.listening.gate import counted, record, store_for
from tasks.listening.lazy import NotReady
from tasks.listening.stats import summarize
from tasks.listening.store import COUNTED, VoteError, check_name
from tasks.serving.guard import EdgeRules, Guard, edge_error_handler
from v2m.config import Params

PAGE = Path(__file__).with_name("page.html")
MAX_BODY_BYTES = 64 * 1024  # the API takes small JSON bodies only
SHOWN_ATTEMPTS = 50
log = logging.getLogger(__name__)


class SessionIn(BaseModel):
    listener: str = Field("", max_length=100)  # a typed name never identifies anyone; kept to show refusals


class VoteIn(BaseModel):
    vote_id: str = Field(min_length=1, max_length=100)
    trial_id: str = Field(max_length=100)
    listener: str = Field("", max_length=100)
    answer: str = Field(max_length=10)
    rating_a: int | None = None
    rating_b: int | None = None


@dataclass(frozen=True)
class Listener:
    name: str
    via: str  # "invite" | "proxy" (store.COUNTED)


class Refused(Exception):
    """No listener identity: `kind` (anonymous, bad_invitation, untrusted_header, bad_name) and who it claimed."""

    def __init__(self, kind: str, claimed: str, detail: str):
        super().__init__(detail)
        self.kind, self.claimed, self.detail = kind, claimed, detail


def finite(obj):
    """JSON has no NaN: an undefined statistic (no votes yet) goes out as null."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def trusted_peer(request: Request, networks: list) -> bool:
    """The connecting address (never a header) is one of the trusted proxies."""
    try:
        peer = ipaddress.ip_address(request.client.host if request.client else "")
    except ValueError:
        return False
    return any(peer in n for n in networks)


def create_router(params: Params, root: Path, source: ListeningSet | Callable[[], ListeningSet],
                  owner_token: str | None = None) -> APIRouter:
    """The routes over a prepared ListeningSet, or a callable giving the current one (lazy.py's
    BackgroundListeningSet, which raises NotReady -> 503 while the clips are prepared). `owner_token`: who may
    read results and votes here (None: nobody through this router; the owner reads MLflow or the CLI)."""
    store = store_for(params, root)
    cfg, hp = params.listening, params.promotion.human_preference
    header = cfg.auth_header
    networks = [ipaddress.ip_network(n, strict=False) for n in cfg.trusted_proxies]
    owner_hash = hashlib.sha256(owner_token.encode()).digest() if owner_token else None
    dither_key = secrets.token_bytes(32)  # this process's: copies of one clip differ per trial and side
    router = APIRouter()

    def identify(request: Request, claimed: str = "") -> Listener:
        token = bearer(request)
        if token:
            if name := store.invited(token):
                return Listener(name, "invite")
            raise Refused("bad_invitation", claimed, "this invitation link is not (or no longer) valid; ask the "
                                                     "test's owner for a new one")
        signed_in = (request.headers.get(header, "") if header else "").strip()
        if signed_in and trusted_peer(request, networks):
            try:
                return Listener(check_name(signed_in), "proxy")
            except VoteError as exc:
                raise Refused("bad_name", signed_in, str(exc)) from None
        if signed_in:
            raise Refused("untrusted_header", signed_in, f"{header} is believed only from the team's auth proxy "
                                                         f"(listening.trusted_proxies); open your personal link")
        raise Refused("anonymous", claimed, "this listening test is by invitation: open the personal link you "
                                            "were sent")

    def refuse(request: Request, exc: Refused) -> JSONResponse:
        store.note_attempt(exc.kind, exc.claimed, request.client.host if request.client else "")
        log.info("refused a listener: %s (%r)", exc.kind, exc.claimed[:100])
        return _error(401, exc.kind, exc.detail, {"WWW-Authenticate": "Bearer"})

    def is_owner(request: Request) -> bool:
        token = bearer(request)
        return owner_hash is not None and bool(token) and \
            hmac.compare_digest(hashlib.sha256(token.encode()).digest(), owner_hash)

    def current() -> ListeningSet:
        return source() if callable(source) else source

    def public(trial: dict) -> dict:  # what the page may know of a trial: never which model is A or B
        return {"trial_id": trial["trial_id"], "position": trial["position"], "answered": trial["answer"] is not None}

    @router.get("", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(), headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})

    @router.get("/api/whoami")
    def whoami(request: Request) -> dict:
        try:
            who = identify(request)
        except Refused:
            return {"listener": None, "via": None, "owner": is_owner(request)}
        return {"listener": who.name, "via": who.via, "owner": is_owner(request)}

    @router.post("/api/session")
    def session(body: SessionIn, request: Request):
        try:
            who = identify(request, body.listener)
        except Refused as exc:
            return refuse(request, exc)
        ls = current()
        trials = store.trials_for(who.name, ls.backend, ls.models, ls.chunks, who.via)
        return {"listener": who.name, "total": len(trials), "answered": sum(t["answer"] is not None for t in trials),
                "trials": [public(t) for t in trials]}

    @router.get("/audio/{trial_id}/{slot}")
    def audio(trial_id: str, slot: str):
        if slot not in ("A", "B"):
            return _error(404, "not_found", "slot must be A or B")
        try:
            t = store.trial(trial_id)
        except VoteError:
            return _error(404, "not_found", "no such trial")
        ls = current()
        sides = [(t["model_a"], t["chunk_id"]), (t["model_b"], t["chunk_id"])]
        if any(side not in ls.clips for side in sides):
            return _error(404, "not_found", "this trial is not part of the current listening test")
        key = hmac.new(dither_key, f"{trial_id}/{slot}".encode(), hashlib.sha256).digest()
        wav = served_clip(ls.clips[sides[0 if slot == "A" else 1]], [ls.clips[s] for s in sides], key)
        return Response(wav, media_type="audio/wav", headers={"Cache-Control": "private, no-store"})

    @router.post("/api/votes")
    def vote(body: VoteIn, request: Request):
        try:
            who = identify(request, body.listener)
        except Refused as exc:
            return refuse(request, exc)
        try:
            row, new = store.vote(body.vote_id, body.trial_id, who.name, body.answer, body.rating_a, body.rating_b)
        except VoteError as exc:
            if "another listener" in str(exc):
                store.note_attempt("not_yours", who.name, request.client.host if request.client else "")
            status = 409 if "already" in str(exc) else 400
            return _error(status, "conflict" if status == 409 else "bad_request", str(exc))
        if new:
            ls = current()
            try:  # the vote is stored either way; the registry copy is refreshed on the next vote if this fails
                record(params, root, ls.backend, ls.models)
            except Exception:
                log.exception("could not record the listening results in MLflow")
        return {"vote_id": row["vote_id"], "trial_id": row["trial_id"], "stored": new, "answer": row["answer"]}

    def owner_only() -> JSONResponse:
        return _error(403, "forbidden", "results and votes are for the test's owner (the link `v2m listen` "
                                        "prints; MLflow holds them too)")

    @router.get("/api/results")
    def results(request: Request):
        if not is_owner(request):
            return owner_only()
        ls = current()
        votes = store.votes(ls.backend, ls.models)
        model, opponent = ls.models
        s = summarize(counted(votes), model, opponent, hp.confidence, hp.max_votes_per_listener)
        attempts = store.attempts()
        return finite({**s, "roles": ls.roles,
                       "uncounted": dict(Counter(v["via"] for v in votes if v["via"] not in COUNTED)),
                       "refused": {"total": sum(a["count"] for a in attempts), "shown": attempts[:SHOWN_ATTEMPTS]}})

    @router.get("/api/votes")
    def votes(request: Request):
        if not is_owner(request):
            return owner_only()
        ls = current()
        return store.votes(ls.backend, ls.models)

    return router


def not_ready(request: Request, exc: NotReady) -> JSONResponse:
    """Register on the app that includes the router: app.add_exception_handler(NotReady, not_ready)."""
    return _error(503, "not_ready", str(exc))


def create_app(params: Params, root: Path, ls: ListeningSet | Callable[[], ListeningSet],
               owner_token: str | None = None) -> FastAPI:
    """The stand-alone listening server of `v2m listen`: the router at /listen, / redirects there. The edge is
    serve's (tasks/serving/guard.py): no cross-origin POST, small bodies only, a deadline on each body."""
    app = FastAPI(title="voice2music listening test", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(create_router(params, root, ls, owner_token), prefix="/listen")
    app.add_exception_handler(NotReady, not_ready)
    app.add_exception_handler(HTTPException, edge_error_handler)
    # Any Host: nothing here acts on the visitor's behalf without their own token, which a rebinding page lacks.
    app.add_middleware(Guard, rules=EdgeRules(max_body_bytes=MAX_BODY_BYTES,
                                              body_timeout_s=params.serve.body_timeout_s))

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


def serve(app: FastAPI, sock: socket.socket, header_timeout_s: float = 10.0) -> None:
    """uvicorn on the socket, with serve's edge settings: a deadline on headers, and the client's address from
    the connection (uvicorn would believe X-Forwarded-For from loopback, and trusted_proxies would mean nothing)."""
    import uvicorn

    from tasks.serving.guard import deadlined
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, proxy_headers=False,
                                           http=deadlined(header_timeout_s)))
    server.run(sockets=[sock])
