"""The edge of a server that faces people: what every request must satisfy before a route runs, and the
deadlines on reading it. Shared by `v2m serve` and `v2m listen`.

    Guard         ASGI middleware: the Host header among the allowed hosts (DNS rebinding), no cross-origin POST
                  (a web page's form or fetch aimed at this server), API keys when configured, and the body
                  counted as it arrives, chunked or not, against a byte limit and a deadline
    deadlined()   uvicorn's h11 protocol with a deadline on a request's headers (slowloris)
    client_id()   who a request counts as for per-client limits: its API key's name, else the peer's address

A body past the limit or the deadline raises EdgeError from `receive`, inside whatever is reading it (FastAPI's
form parser passes HTTPException through): the app answers it as JSON, with `Connection: close`, so uvicorn
drops the connection instead of reading the rest. Nothing past the limit is read, so nothing past it reaches
the multipart parser's temporary file.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
CLOSE = {"Connection": "close"}


class EdgeError(HTTPException):
    """A request refused at the edge: HTTP `status_code`, a short `code` and a sentence of `detail`."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status, detail, headers)
        self.code = code


def error_body(code: str, detail: str) -> dict[str, str]:
    return {"error": code, "detail": detail}


@dataclass
class EdgeRules:
    """What Guard enforces. `open_paths` skip the Host and key checks (health probes and metrics scrapers use
    the pod's address as Host and carry no key)."""
    max_body_bytes: int
    body_timeout_s: float
    allowed_hosts: list[str] = field(default_factory=lambda: ["*"])
    api_keys: dict[str, str] = field(default_factory=dict)  # name -> key; empty = no key needed
    open_paths: tuple[str, ...] = ()
    limit_hint: str = ""  # where the byte limit is configured, for the 413's message


class Guard:
    def __init__(self, app: ASGIApp, rules: EdgeRules, on_refused: Callable[[int], None] = lambda status: None):
        self.app, self.rules, self.on_refused = app, rules, on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check(scope)
        except EdgeError as exc:
            await self._refuse(exc, scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._counted(scope, receive), tracked)
        except EdgeError as exc:  # raised while reading the body outside a FastAPI route (none answered it)
            if started:
                raise
            await self._refuse(exc, scope, receive, send)

    async def _refuse(self, exc: EdgeError, scope: Scope, receive: Receive, send: Send) -> None:
        self.on_refused(exc.status_code)
        await JSONResponse(error_body(exc.code, exc.detail), exc.status_code, exc.headers)(scope, receive, send)

    def _check(self, scope: Scope) -> None:
        rules, headers = self.rules, Request(scope).headers
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > rules.max_body_bytes:
            raise EdgeError(413, "too_large", f"the request is larger than {_mb(rules.max_body_bytes)}"
                                              f"{rules.limit_hint}", CLOSE)
        if scope["path"] in rules.open_paths:
            return
        host = headers.get("host", "")
        name = (urlsplit("//" + host).hostname or "") if host else ""
        if "*" not in rules.allowed_hosts and name not in rules.allowed_hosts:
            raise EdgeError(400, "bad_host", f"this server does not answer for host {host[:100]!r} "
                                             f"(params.yaml serve.allowed_hosts)")
        if scope["method"] in UNSAFE_METHODS:
            site, origin = headers.get("sec-fetch-site"), headers.get("origin")
            if site in ("cross-site", "same-site") or (
                    origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host.lower())):
                raise EdgeError(403, "cross_origin", "requests from another web site are refused; use this "
                                                     "server's own page or a non-browser client")
        if rules.api_keys:
            name = key_name(headers, rules.api_keys)
            if name is None:
                raise EdgeError(401, "unauthorized", "send an API key: Authorization: Bearer <key> (or X-API-Key)",
                                {"WWW-Authenticate": "Bearer"})
            scope.setdefault("state", {})["v2m_client"] = f"key:{name}"

    def _counted(self, scope: Scope, receive: Receive) -> Receive:
        """`receive` that counts body bytes and enforces the body deadline until the body is complete."""
        rules = self.rules
        loop = asyncio.get_running_loop()
        deadline = loop.time() + rules.body_timeout_s
        received, done = 0, scope["method"] in ("GET", "HEAD")

        async def wrapped() -> Message:
            nonlocal received, done
            if done:  # after the body: only the disconnect notice is left to wait for, however long
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise EdgeError(408, "timeout", f"the request body did not arrive within {rules.body_timeout_s:g} s",
                                CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > rules.max_body_bytes:
                    raise EdgeError(413, "too_large", f"the request is larger than {_mb(rules.max_body_bytes)}"
                                                      f"{rules.limit_hint}", CLOSE)
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        return wrapped


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.3g} MB" if n >= 1024 * 1024 else f"{n / 1024:.3g} KB"


def key_name(headers, keys: dict[str, str]) -> str | None:
    """The name of the API key the request carries, or None (compared in constant time)."""
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "").strip()
    found = None
    for name, key in keys.items():
        if given and hmac.compare_digest(given.encode(), key.encode()):
            found = name
    return found


def client_id(scope: Scope) -> str:
    """Who a request counts as: its API key's name when keys are in use, else the connecting address (uvicorn
    runs with proxy_headers off, so a client cannot pick its own address with X-Forwarded-For)."""
    state = scope.get("state") or {}
    if state.get("v2m_client"):
        return state["v2m_client"]
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:unknown"


def edge_error_handler(request: Request, exc: HTTPException) -> JSONResponse:
    """Register on the app for starlette's HTTPException: EdgeError keeps its code; others are `http_error`."""
    code = exc.code if isinstance(exc, EdgeError) else "http_error"
    return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, exc.headers)


def deadlined(header_timeout_s: float):
    """uvicorn's h11 protocol, closing a connection whose next request's headers take longer than
    `header_timeout_s` to arrive (408 when part of them came). uvicorn itself waits for headers forever: its
    keep-alive timer stops at the first byte, so a client trickling one header byte at a time holds a
    connection for good. Pass as uvicorn.Config(http=deadlined(s))."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps(error_body("timeout", f"the request headers did not arrive within {header_timeout_s:g} s"))
    late = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n{body}").encode()

    class DeadlinedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = None if self.transport.is_closing() else \
                self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return  # the headers came (a request is being read or answered)
            if self.conn.trailing_data[0]:  # part of a request arrived: say why the connection closes
                self.transport.write(late)
            self.transport.close()

    return DeadlinedH11


class TooManyForClient(Exception):
    """This client already has its share of requests in flight."""


class ClientSlots:
    """At most `per_client` requests in flight per client (client_id), so one client cannot hold the whole
    queue. Kept by the app, not by a model's batcher: the limit holds whichever model answers."""

    def __init__(self, per_client: int):
        self.per_client = per_client
        self._busy: dict[str, int] = {}

    def acquire(self, client: str) -> None:
        if self._busy.get(client, 0) >= self.per_client:  # the event loop is single-threaded: no lock needed
            raise TooManyForClient(client)
        self._busy[client] = self._busy.get(client, 0) + 1

    def release(self, client: str) -> None:
        left = self._busy.get(client, 1) - 1
        if left > 0:
            self._busy[client] = left
        else:
            self._busy.pop(client, None)
