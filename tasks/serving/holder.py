"""The model being served, and how it follows a registry alias.

A REF like `voice2music-musicgen@champion` is looked up every `poll_s`: when the alias names another version,
that version loads in a background thread while the current one keeps serving, and only a fully loaded model
replaces it (one reference assignment: atomic). A version that fails to load leaves the old one serving; the
error shows in /readyz, /metrics (v2m_model_load_error) and the log, and it is tried again after RETRY_FAILED_S
or as soon as the alias moves elsewhere. Rollbacks are alias moves too, so they are followed the same way; the
version a swap replaced stays loaded (one model's memory more), so moving the alias back to it swaps at once:
a rollback does not wait for a load while the version rolled back from keeps answering.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from models.base import Backend

log = logging.getLogger("v2m.serve")
RETRY_FAILED_S = 300.0


@dataclass(frozen=True)
class Served:
    backend: Backend
    label: str        # what the X-V2M-Model header says: NAME/VERSION, or the REF itself
    loaded_at: float


def alias_target(ref: str) -> str:
    """NAME/VERSION that NAME@alias points at now; any other REF stays itself."""
    if "@" not in ref or ref.startswith(("runs:/", "/", ".")):
        return ref
    from mlflow import MlflowClient
    name, _, alias = ref.removeprefix("models:/").partition("@")
    return f"{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"


class ModelHolder:
    def __init__(self, ref: str, load: Callable[[str], Backend], poll_s: float,
                 on_change: Callable[["ModelHolder"], None] = lambda h: None,
                 resolve: Callable[[str], str] = alias_target):
        self.ref, self.poll_s = ref, poll_s
        self._load, self._resolve, self._on_change = load, resolve, on_change
        self.current: Served | None = None
        self.previous: Served | None = None  # what `current` replaced: a rollback to it swaps back at once
        self.error: str | None = None       # the last load or lookup failure, until a load succeeds
        self.failed: tuple[str, float] | None = None  # (label, when) of the version that failed to load
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.current is not None

    def refresh(self) -> bool:
        """Look the REF up; load and swap in what it names if that is new. True when the model changed."""
        try:
            label = self._resolve(self.ref)
        except Exception as exc:  # registry unreachable: keep serving, say so
            self._fail(None, f"{self.ref}: lookup failed: {exc}")
            return False
        if self.current is not None and label == self.current.label:
            if self.error is not None:  # the alias is back on what serves (or the registry answers again)
                self.error, self.failed = None, None
                self._on_change(self)
            return False
        if self.failed and self.failed[0] == label and time.monotonic() - self.failed[1] < RETRY_FAILED_S:
            return False
        if self.previous is not None and label == self.previous.label:  # a rollback: back at once, no reload
            self.current, self.previous = self.previous, self.current
            self.error, self.failed = None, None
            log.info("now serving %s again (kept loaded since it was replaced)", label)
            self._on_change(self)
            return True
        log.info("loading %s (serving %s meanwhile)", label, self.current.label if self.current else "nothing")
        try:
            backend = self._load(label)
        except Exception as exc:  # any failure to load must leave the old model serving
            self._fail(label, f"{label}: failed to load: {type(exc).__name__}: {exc}")
            return False
        # the swap: requests after this line get the new model; the one it replaces stays loaded for a rollback
        self.current, self.previous = Served(backend, label, time.time()), self.current
        self.error, self.failed = None, None
        log.info("now serving %s", label)
        self._on_change(self)
        return True

    def _fail(self, label: str | None, message: str) -> None:
        log.error("%s; still serving %s", message, self.current.label if self.current else "nothing")
        self.error = message
        if label is not None:
            self.failed = (label, time.monotonic())
        self._on_change(self)

    def poke(self) -> None:
        """Look the REF up now instead of at the next poll (after this process moved the alias itself)."""
        self._wake.set()

    def start(self) -> None:
        """Load in the background (the server answers /healthz at once) and then follow the REF."""
        def run() -> None:
            while not self._stop.is_set():
                self.refresh()
                if not self.poll_s and self.current is not None:
                    return
                self._wake.wait(self.poll_s or 5.0)
                self._wake.clear()
        self._thread = threading.Thread(target=run, name="v2m-model-holder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
