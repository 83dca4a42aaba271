"""Flow `data-watch`: retrain when the data changed. Scheduled (every 15 minutes in prefect.yaml), it
compares the raw data's content hash with the one the last retrain saw and starts `retrain` if they differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.steps import project_params, team_mode
from tasks.data.track_cache import cache_key

SEEN = Path(".v2m") / "data_watch.json"


@task(name="raw-data-fingerprint")
def raw_fingerprint(root: Path, raw_dir: str) -> str:
    """Content-addressed like DVC's own: names, sizes and mtimes of every raw file (cheap; a change to any
    file's bytes changes its size or mtime), hashed."""
    raw = root / raw_dir
    files = sorted(p for p in raw.rglob("*") if p.is_file())
    return cache_key([(str(p.relative_to(raw)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


@flow(name="data-watch")
def data_watch(project_dir: str = ".") -> dict[str, Any]:
    root, params = project_params(project_dir)
    log = get_run_logger()
    now = raw_fingerprint(root, params.data.input_dir)  # the songs, when the separate stage makes data/raw
    seen_file = root / SEEN
    before = json.loads(seen_file.read_text())["fingerprint"] if seen_file.is_file() else None
    if now == before:
        log.info("raw data unchanged (%s): nothing to do", now[:12])
        return {"changed": False, "fingerprint": now}
    log.info("raw data changed (%s -> %s): retraining", (before or "none")[:12], now[:12])
    if team_mode(params):
        from prefect.deployments import run_deployment
        run = run_deployment("retrain/retrain-manual", timeout=0)  # it runs in its own clone, on a cpu host
        started = str(run.id)
    else:
        from flows.retrain import retrain
        started = retrain(project_dir=str(root))["data_version"]
    seen_file.parent.mkdir(parents=True, exist_ok=True)
    seen_file.write_text(json.dumps({"fingerprint": now}))
    return {"changed": True, "fingerprint": now, "started": started}
