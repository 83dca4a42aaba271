"""The listening set for a server that starts before its clips exist (`v2m serve` mounting /listen): the
clips are prepared in a background thread, and prepared again when the challenger or the champion moves.
Until they are ready, the API answers 503 with what it is doing (or why it cannot: no pair to compare)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tasks.listening.clips import ListeningSet, prepare, resolve_pair
from v2m.config import Params


class NotReady(Exception):
    """No listening set to serve yet; the message says why."""


class BackgroundListeningSet:
    def __init__(self, params: Params, root: Path, backend: str, recheck_s: float = 30.0):
        self.params, self.root, self.backend, self.recheck_s = params, Path(root), backend, recheck_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ls: ListeningSet | None = None
        self._error: str | None = None
        self._checked = 0.0

    def _prepare(self) -> None:
        try:
            ls, error = prepare(self.params, self.root, self.backend), None
        except Exception as exc:  # reported to listeners as 503 with the reason; tried again after recheck_s
            ls, error = None, str(exc)
        with self._lock:
            self._ls, self._error, self._checked = ls, error, time.monotonic()

    def _start(self) -> None:
        self._ls, self._error = None, None
        self._thread = threading.Thread(target=self._prepare, name="listening-clips", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def __call__(self) -> ListeningSet:
        with self._lock:
            busy = self._thread is not None and self._thread.is_alive()
            if self._thread is None:
                self._start()
                busy = True
            elif not busy and time.monotonic() - self._checked > self.recheck_s:
                self._checked = time.monotonic()
                try:
                    moved = self._ls is None or resolve_pair(self.backend, None)[0] != self._ls.models
                except Exception:
                    moved = True
                if moved:  # a promotion happened (or the last attempt failed): a new pair, new clips
                    self._start()
                    busy = True
            if busy:
                raise NotReady("preparing the listening clips (the models generate them once); try again shortly")
            if self._ls is None:
                raise NotReady(f"no listening test: {self._error}")
            return self._ls
