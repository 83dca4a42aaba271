"""Flow `data-watch`: retrain when the data changed. Scheduled (every 15 minutes in prefect.yaml), it
compares the raw data's fingerprint with the one the last retrain saw and starts `retrain` if they differ.

What it saw lives in Prefect (a Variable), not in a file: in team mode each run may be on another host, in a
fresh checkout, and must still see what the run before it saw. Embedded, the Variable lives in the project's
own Prefect database (.v2m/prefect), which every local run opens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.variables import Variable

from tasks.orchestration import project_params, team_mode
from tasks.data.track_cache import cache_key
from v2m.config import Params


def seen_variable(params: Params) -> str:
    """The Variable's name: one per repository and raw folder, so projects sharing a server keep apart."""
    return "v2m_data_watch_" + cache_key([params.orchestration.code.repository, params.data.input_dir])[:12]


@task(name="raw-data-fingerprint")
def raw_fingerprint(root: Path, raw_dir: str, team: bool) -> str:
    """Embedded: names, sizes and mtimes of every raw file (cheap; a change to any file's bytes changes its
    size or mtime), hashed, like DVC's own. Team mode: a checkout holds no raw data, only the pointer the data
    owner committed (`<raw_dir>.dvc`); its content hash names what a retrain would pull."""
    pointer = root / f"{raw_dir}.dvc"
    if team and pointer.is_file():
        outs = yaml.safe_load(pointer.read_text())["outs"]
        return cache_key([(o.get("md5") or o.get("hash"), o.get("path")) for o in outs])
    raw = root / raw_dir
    files = sorted(p for p in raw.rglob("*") if p.is_file())
    return cache_key([(str(p.relative_to(raw)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


@flow(name="data-watch")
def data_watch(project_dir: str = ".") -> dict[str, Any]:
    root, params = project_params(project_dir)
    log = get_run_logger()
    team = team_mode(params)
    now = raw_fingerprint(root, params.data.input_dir, team)  # the songs, when the separate stage makes data/raw
    name = seen_variable(params)
    before = (Variable.get(name) or {}).get("fingerprint")
    if now == before:
        log.info("raw data unchanged (%s): nothing to do", now[:12])
        return {"changed": False, "fingerprint": now}
    log.info("raw data changed (%s -> %s): retraining", (before or "none")[:12], now[:12])
    if team:
        from prefect.deployments import run_deployment
        run = run_deployment("retrain/retrain-manual", timeout=0)  # it runs in its own checkout, on a cpu host
        started = str(run.id)
    else:
        from flows.retrain import retrain
        started = retrain(project_dir=str(root))["data_version"]
    Variable.set(name, {"fingerprint": now, "raw_dir": params.data.raw_dir, "started": started,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, overwrite=True)
    return {"changed": True, "fingerprint": now, "started": started}
