"""What the Prefect task wrappers share: which failures are worth a retry, and what keys their caches.

Transient failures (a storage server or the network not answering) are retried; deterministic ones (a bad
config, bad data, a bug) are not: retrying them only delays the error the user has to fix.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from v2m.errors import UserError

NON_TRANSIENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException | None) -> bool:
    if exc is None or isinstance(exc, (UserError, ValueError, TypeError, KeyError, AssertionError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, NON_TRANSIENT_OS_ERRORS):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    # botocore / urllib3 / requests / MLflow REST errors that mean "the server did not answer (yet)"
    transient_names = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                       "NewConnectionError", "MaxRetryError", "ProtocolError"}
    if names & transient_names:
        return True
    code = getattr(exc, "error_code", "")
    return code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry only transient failures."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result itself could not be read: treat as transient
        exc = e
    return is_transient(exc if isinstance(exc, BaseException) else None)


def params_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
