"""What the steps and their Prefect task wrappers share: a step's params, which failures are worth a retry,
what keys their caches, and a host's GPUs.

Transient failures (a storage server or the network not answering) are retried; deterministic ones (a bad
config, bad data, a bug) are not: retrying them only delays the error the user has to fix.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from v2m.config import Params, load_params
from v2m.errors import UserError
from v2m.tracking import setup_mlflow

NON_TRANSIENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def team_mode(params) -> bool:
    """Steps as deployments on the work pools (team) or in this process (embedded): params.yaml
    orchestration.mode, overridden by the environment variable V2M_ORCHESTRATION."""
    return (os.environ.get("V2M_ORCHESTRATION") or params.orchestration.mode) == "team"


def project_params(project_dir: str, presets: dict[str, str] | None = None) -> tuple[Path, Params]:
    """A step's project folder and params (with `presets` chosen), MLflow pointed at the configured store."""
    root = Path(project_dir).resolve()
    params = load_params(root / "params.yaml")
    for backend, preset in (presets or {}).items():
        params = params.model_copy(update={backend: getattr(params, backend).model_copy(update={"preset": preset})})
    setup_mlflow(params, root)
    if team_mode(params):  # DVC stages run `v2m ...`: they must import this clone's code, not an installed copy
        os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    return root, params


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


@contextmanager
def gpu_slot(count: int = 1, poll_s: float = 1.0) -> Iterator[str | None]:
    """`count` GPUs of this host for this process: ids of V2M_GPU_IDS (set by `v2m stack worker --gpus`) that
    no other job holds, exported as CUDA_VISIBLE_DEVICES before anything touches CUDA. The hold is an flock on
    a file per id under V2M_GPU_LOCK_DIR: the kernel frees it when the job exits or is killed, so a lost job
    never keeps its GPU. A job waits until it can hold all of its GPUs at once (it never holds some while
    waiting, so two multi-GPU jobs cannot block each other). Without V2M_GPU_IDS the environment is left as
    it is (None)."""
    ids = [i.strip() for i in os.environ.get("V2M_GPU_IDS", "").split(",") if i.strip()]
    if not ids:
        yield os.environ.get("CUDA_VISIBLE_DEVICES")
        return
    if count > len(ids):
        raise ValueError(f"a job for {count} GPUs on a host with {len(ids)} (V2M_GPU_IDS={','.join(ids)})")
    lock_dir = Path(os.environ.get("V2M_GPU_LOCK_DIR") or tempfile.gettempdir())
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        held: list[tuple[str, Any]] = []
        for gpu in ids:
            handle = open(lock_dir / f"gpu-{gpu}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            held.append((gpu, handle))
            if len(held) == count:
                break
        if len(held) == count:
            previous = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(g for g, _ in held)
            try:
                yield os.environ["CUDA_VISIBLE_DEVICES"]
            finally:
                if previous is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = previous
                for _, handle in held:
                    handle.close()  # releases the flock
            return
        for _, handle in held:
            handle.close()
        time.sleep(poll_s)
