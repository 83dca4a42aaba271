"""A bounded queue and one generation worker that runs requests arriving close together as one batch.

One worker owns the model calls (a GPU runs one generate at a time best; batching is how it serves several).
Each batch takes the holder's current model once, so a swap between batches never splits a request across
two models. Requests beyond `max_pending` (queued + running) are refused at once (Overloaded -> 503 with
Retry-After) instead of queueing without bound. A request leaves the count the moment its future is done or
cancelled: a client that hangs up frees its slot at once, and a cancelled job is skipped when its turn comes.
A batch whose every request was cancelled stops at its next step (models/cancel.py) and serves the next one.
Every model call in the process passes GENERATION, one at a time (see GenerationGate).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from models.cancel import Cancelled
from models.longform import Request, generate_batch_raw
from tasks.serving.holder import ModelHolder
from tasks.serving.metrics import Metrics
from v2m.config_serve import GenerateConfig

log = logging.getLogger("v2m.serve")


class GenerationGate:
    """One generation at a time in this process. MusicGen samples from torch's global RNG, seeded per call inside
    fork_rng: two threads sampling at once would draw from one stream and restore each other's RNG state, and an
    output would no longer reproduce from its seed. (A GPU runs one generate at a time best anyway: batching is
    how it serves several.) Clients' generations (the champion's batcher, a canary challenger's) go first:
    background work (the shadow) takes the gate only when nobody waits, and stops at its next step (`wanted`
    as its cancel check) as soon as a client's generation waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting = 0
        self._count = threading.Lock()

    @contextmanager
    def serving(self) -> Iterator[None]:
        with self._count:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._count:
                self._waiting -= 1
        try:
            yield
        finally:
            self._lock.release()

    def wanted(self) -> bool:
        """A client's generation waits for the gate."""
        return self._waiting > 0

    def try_background(self) -> bool:
        """Take the gate for background work if it is free and nobody waits; release() when done."""
        return not self.wanted() and self._lock.acquire(blocking=False)

    def release(self) -> None:
        self._lock.release()


GENERATION = GenerationGate()  # the process's one gate: every Batcher and the shadow share it


class Overloaded(Exception):
    """The queue is full."""


class NotReady(Exception):
    """No model is loaded yet."""


@dataclass(frozen=True)
class Result:
    audio: np.ndarray
    sample_rate: int
    model: str
    seconds: float  # time spent generating (the batch's), for the real-time factor
    raw: np.ndarray | None = None  # before peak normalisation: what online sanity reads


class Batcher:
    def __init__(self, holder: ModelHolder, gen: GenerateConfig, metrics: Metrics, max_pending: int,
                 window_s: float, max_batch: int):
        self.holder, self.gen, self.metrics = holder, gen, metrics
        self.max_pending, self.window_s, self.max_batch = max_pending, window_s, max_batch
        self._queue: queue.Queue[tuple[Request, Future] | None] = queue.Queue()
        self._pending = 0
        self._idle_since = time.monotonic()  # when the last request left (pending went to 0)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def idle_for(self) -> float:
        """Seconds since the last request left, 0 while any is queued or running (background work's cue)."""
        return 0.0 if self._pending else time.monotonic() - self._idle_since

    def submit(self, req: Request) -> Future:
        if not self.holder.ready:
            raise NotReady()
        with self._lock:
            if self._pending >= self.max_pending:
                raise Overloaded()
            self._pending += 1
            self.metrics.queue_depth.set(self._pending)
        fut: Future = Future()
        fut.add_done_callback(lambda f: self._done(1))  # result, error or cancel: the slot is free
        self._queue.put((req, fut))
        return fut

    def _done(self, n: int) -> None:
        with self._lock:
            self._pending -= n
            self.metrics.queue_depth.set(self._pending)
            if self._pending == 0:
                self._idle_since = time.monotonic()

    def _collect(self, first: tuple[Request, Future]) -> list[tuple[Request, Future]]:
        """The first job plus whatever else arrives within the batch window (up to max_batch)."""
        batch, deadline = [first], time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # let run() see the stop after this batch
                break
            batch.append(job)
        return batch

    def run_batch(self, batch: list[tuple[Request, Future]]) -> None:
        live = [(r, f) for r, f in batch if f.set_running_or_notify_cancel()]  # cancelled while queued: skipped
        self.metrics.cancelled.labels(stage="queued").inc(len(batch) - len(live))
        if not live:
            return
        served = self.holder.current  # one model for the whole batch, even if a swap happens meanwhile
        for group in _same_duration(live):
            try:
                with GENERATION.serving():
                    start = time.perf_counter()
                    outputs = generate_batch_raw(served.backend, [r for r, _ in group], self.gen)
                    took = time.perf_counter() - start
                self.metrics.batch_size.observe(len(group))
                for (_, fut), g in zip(group, outputs):
                    fut.set_result(Result(g.audio, served.backend.sample_rate, served.label, took, g.raw))
            except Cancelled as exc:  # every client of this group left: nobody to answer
                log.info("stopped a batch of %d: %s", len(group), exc)
                self.metrics.cancelled.labels(stage="running").inc(len(group))
                for _, fut in group:
                    fut.set_exception(exc)
            except Exception as exc:  # fail the group's requests (500), keep the worker alive
                log.exception("generation failed")
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(exc)

    def start(self) -> None:
        def run() -> None:
            while (job := self._queue.get()) is not None:
                self.run_batch(self._collect(job))
        self._thread = threading.Thread(target=run, name="v2m-generate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)


def _same_duration(jobs: list[tuple[Request, Future]]) -> list[list[tuple[Request, Future]]]:
    groups: dict[float, list[tuple[Request, Future]]] = {}
    for job in jobs:
        groups.setdefault(job[0].duration_s, []).append(job)
    return list(groups.values())
