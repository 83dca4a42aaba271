"""A lease on a registered model, kept in the MLflow registry itself: who may move its aliases right now.

Why the registry: it is the one service every promotion already talks to, in both modes. In team mode it is
the MLflow server every host reaches; embedded, it is the SQLite store under .v2m/ that every local process
opens. (A Prefect global concurrency limit would serialise team hosts, but embedded each process may start
its own temporary Prefect server, so two local `v2m promote`s would not see each other's limit; a file lock
serialises one host only.)

How: MLflow has no compare-and-set on tags or aliases, but it numbers the versions of a registered model
max(existing)+1 under a unique (name, version) key, inside the transaction that also updates the model's row.
So a version number is handed out only after every lower one is committed: a queue ticket. The lease model
`<model>.lease` gets one version per request:

    take a ticket (a new version)  ->  wait until every lower ticket is dead  ->  hold  ->  release (tag)

A ticket is dead once released (tag lease.released), or once its holder stopped renewing it for `ttl_s`:
the holder renews through update_model_version, which stamps last_updated_timestamp with the *server's*
clock, and waiters compare against their own renewals (same clock, no host skew). The first waiter to see
an expired ticket tags it lease.broken; a holder that was only slow finds that tag in `check()` before it
writes, and stops. A crashed holder (killed, host lost) therefore blocks the others for at most `ttl_s`.
The registered model's tag `lease.floor` (the lowest ticket that may be live) keeps the scan short.

Tickets are never deleted: on the team stack a host's MLflow user may edit but not delete model versions.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

SOURCE = "lease:///voice2music"  # a version needs a source URI, with an absolute path; a ticket holds no model
RELEASED, BROKEN, FLOOR, HOLDER = "lease.released", "lease.broken", "lease.floor", "lease.holder"


class LeaseLost(RuntimeError):
    """This process's lease expired (it stalled past the TTL) and another took over: nothing was written."""


def lease_name(model: str) -> str:
    return f"{model}.lease"


class Lease:
    """A ticket on `<model>.lease`: renewed by a heartbeat thread while held (see the module docstring)."""

    def __init__(self, client: MlflowClient, model: str, ttl_s: float, purpose: str):
        self.client, self.model, self.name, self.ttl_s = client, model, lease_name(model), ttl_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]} {purpose}".strip()
        _ensure_model(client, self.name, model)
        mv = client.create_model_version(self.name, SOURCE, tags={HOLDER: self.holder},
                                         description=f"lease requested by {self.holder}", await_creation_for=0)
        self.ticket = int(mv.version)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def renew(self) -> int:
        """Stamp the ticket with the server's time; returns that time (ms)."""
        mv = self.client.update_model_version(self.name, str(self.ticket), description=f"lease held by {self.holder}")
        return int(mv.last_updated_timestamp)

    def wait(self, wait_s: float, poll_s: float = 0.25) -> None:
        """Block until every lower ticket is dead; TimeoutError (ticket released) after wait_s."""
        floor = int(self.client.get_registered_model(self.name).tags.get(FLOOR, 1))
        dead: set[int] = set()  # dead stays dead: released and broken tickets are never revived
        deadline = time.monotonic() + wait_s
        while (blocker := self._first_live(floor, dead, self.renew())) is not None:
            if time.monotonic() > deadline:
                holder = self._tags(blocker).get(HOLDER, "?")
                raise TimeoutError(f"{self.model}: waited {wait_s:.0f} s for the registry lease held by {holder} "
                                   f"(ticket {blocker} of {self.name})")
            time.sleep(poll_s)
        self.check()  # a waiter that stalled past the TTL may have been taken over itself
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=f"lease-{self.name}")
        self._beat.start()

    def _first_live(self, floor: int, dead: set[int], now_ms: int) -> int | None:
        for ticket in range(floor, self.ticket):
            if ticket in dead:
                continue
            if not self._is_dead(ticket, now_ms):
                return ticket
            dead.add(ticket)
        return None

    def _tags(self, ticket: int) -> dict[str, str]:
        return dict(self.client.get_model_version(self.name, str(ticket)).tags)

    def _is_dead(self, ticket: int, now_ms: int) -> bool:
        try:
            mv = self.client.get_model_version(self.name, str(ticket))
        except MlflowException as exc:  # deleted by hand: nobody holds it
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return True
            raise
        if RELEASED in mv.tags or BROKEN in mv.tags:
            return True
        if now_ms - int(mv.last_updated_timestamp) > self.ttl_s * 1000:
            self.client.set_model_version_tag(self.name, str(ticket), BROKEN,
                                              f"not renewed for {self.ttl_s:.0f} s; taken over by ticket {self.ticket}")
            return True
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except Exception:  # the server did not answer this time; check() tells the holder if it was too long
                pass

    def check(self) -> None:
        """Raise LeaseLost unless this process still holds the lease: call it right before writing."""
        if BROKEN in self._tags(self.ticket):
            raise LeaseLost(f"{self.model}: the registry lease of {self.holder} expired while held "
                            f"(stalled past {self.ttl_s:.0f} s); nothing was written, run it again")

    def release(self, advance_floor: bool = True) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        self.client.set_model_version_tag(self.name, str(self.ticket), RELEASED, str(int(time.time())))
        if advance_floor:  # every ticket up to this one is dead now
            self.client.set_registered_model_tag(self.name, FLOOR, str(self.ticket + 1))


def _ensure_model(client: MlflowClient, name: str, model: str) -> None:
    try:
        client.create_registered_model(name, tags={"voice2music.internal": "lease"}, description=(
            f"Not a model: queue tickets for changing the aliases of {model} (tasks/registry/lease.py)."))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


@contextmanager
def registry_lease(model: str, ttl_s: float = 30.0, wait_s: float = 300.0, purpose: str = "") -> Iterator[Lease]:
    """Hold the lease of registered model `model` for the block (one holder at a time, on every host)."""
    lease = Lease(MlflowClient(), model, ttl_s, purpose)
    try:
        lease.wait(wait_s)
    except BaseException:  # timed out or interrupted: give the ticket up so nobody waits for it
        lease.release(advance_floor=False)
        raise
    try:
        yield lease
    finally:
        lease.release()
