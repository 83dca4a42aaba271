"""Stopping a generation nobody waits for any more (a client that hung up, a request past its timeout).

The server gives each request a CancelToken and cancels it when the client goes away. models/longform.py
checks the tokens between windows and hands a `stop` check down to the backends, which look at it once per
decoding step (MusicGen: a transformers StoppingCriteria; AudioLDM: each diffusion step). A batch stops only
when every request in it is cancelled: the others still want their audio.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

StopCheck = Callable[[], bool]  # True = stop as soon as you can


class Cancelled(Exception):
    """The generation stopped early because every request it served was cancelled."""


class CancelToken:
    """One request's "nobody wants this any more", set from any thread."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def never() -> bool:
    return False
