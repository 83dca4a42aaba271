"""The background job that writes online.* into MLflow, every serve.rollout.record_every_s and once at shutdown.

Everything goes to the experiment `voice2music-online` (ONLINE_EXPERIMENT), one run per

    version and day   tags online.kind=version, online.model (NAME/VERSION), online.variant, online.day,
                      online.replica; metrics online.requests, online.scored, online.harmonic_fit,
                      online.rhythm_fit, online.sanity_pass (means of the day so far), online.latency_p50_s,
                      online.latency_p95_s, online.realtime_factor, logged again at each write (step = requests,
                      so the latest value is the day's); tags online.rolled_back / online.canary_removed say why
    shadow pairs      tags online.kind=pairs, online.champion, online.challenger, online.day, online.replica;
                      metrics online.pair.champion.<m> and online.pair.challenger.<m> with step = the pair's index
                      (tasks/serving/evidence.py reads them back for `v2m rollout status` and the gate)

online.replica is a random id per serve process (several replicas write their own runs). Only numbers and model
versions leave the process. Where the role may (the embedded store, or the rollback role), each version also gets
the tags online.day / online.run_id, so the registry points at its production record; a role that may not is
noticed once and the rest goes on. A failed write keeps the pairs for the next one.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path

from mlflow.entities import Metric

from tasks.serving.metrics import Metrics
from tasks.serving.online import Ledger, Pair, utc_day
from v2m.config import Params
from v2m.config_serve import ONLINE_METRICS

log = logging.getLogger("v2m.serve")
ONLINE_EXPERIMENT = "voice2music-online"
BATCH = 900  # MLflow takes at most 1000 metrics per log_batch


def pair_key(side: str, metric: str) -> str:
    return f"online.pair.{side}.{metric}"


class Recorder:
    def __init__(self, params: Params, root: Path, ledger: Ledger, metrics: Metrics):
        self.params, self.root, self.ledger, self.metrics = params, Path(root), ledger, metrics
        self.every_s = params.serve.rollout.record_every_s
        self.replica = secrets.token_hex(4)
        self._runs: dict[tuple, str] = {}       # (kind, ...) -> run id
        self._steps: dict[str, int] = {}        # pairs run id -> pairs written
        self._written: dict[tuple, dict] = {}   # (model, variant, day) -> the tally as last written
        self._may_tag_versions = True
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        def run() -> None:
            while not self._stop.wait(self.every_s):
                self.flush()
        self._thread = threading.Thread(target=run, name="v2m-online-recorder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.flush()
        self._close(everything=True)

    def flush(self) -> bool:
        """Write what the ledger holds; True when MLflow took it."""
        with self._lock:
            tallies, pairs = self.ledger.take()
            if not tallies and not pairs:
                return True
            try:
                self._write(tallies, pairs)
            except Exception as exc:  # MLflow unreachable or refusing: try again next time
                self.ledger.put_back(pairs)
                self.metrics.online_recorded.labels(outcome="failed").inc()
                log.warning("online metrics not recorded in MLflow (kept for the next try): %s: %s",
                            type(exc).__name__, exc)
                return False
            self.metrics.online_recorded.labels(outcome="ok").inc()
            self._close(everything=False)
        return True

    def _write(self, tallies: dict, pairs: list[Pair]) -> None:
        from mlflow import MlflowClient

        from v2m.tracking import experiment_id
        client = MlflowClient()
        exp = experiment_id(ONLINE_EXPERIMENT, self.params, self.root)
        now = int(time.time() * 1000)
        for (model, variant, day), t in tallies.items():
            if self._written.get((model, variant, day)) == t:
                continue  # nothing new since the last write
            run = self._run(client, exp, ("version", model, variant, day), f"{model} {variant} {day}",
                            {"online.kind": "version", "online.model": model, "online.variant": variant,
                             "online.day": day})
            step = int(t["metrics"]["online.requests"])
            client.log_batch(run, metrics=[Metric(k, v, now, step) for k, v in t["metrics"].items()])
            for name, why in t["events"].items():
                client.set_tag(run, name, why[:4000])
            self._tag_version(client, model, day, run)
            self._written[(model, variant, day)] = t
        groups: dict[tuple[str, str, str], list[Pair]] = {}
        for p in pairs:
            groups.setdefault((p.champion, p.challenger, p.day), []).append(p)
        for (champion, challenger, day), group in groups.items():
            run = self._run(client, exp, ("pairs", champion, challenger, day),
                            f"pairs {challenger} vs {champion} {day}",
                            {"online.kind": "pairs", "online.champion": champion, "online.challenger": challenger,
                             "online.day": day})
            first = self._steps.get(run, 0)
            rows = [Metric(pair_key(side, m), p.scores[side][m], now, first + i)
                    for i, p in enumerate(group) for side in ("champion", "challenger") for m in ONLINE_METRICS
                    if p.scores[side][m] == p.scores[side][m]]  # NaN (no vocal) is left out: read back as NaN
            rows.append(Metric("online.pairs", first + len(group), now, first + len(group)))
            for k in range(0, len(rows), BATCH):
                client.log_batch(run, metrics=rows[k:k + BATCH])
            self._steps[run] = first + len(group)

    def _run(self, client, exp: str, key: tuple, name: str, tags: dict[str, str]) -> str:
        if key not in self._runs:
            self._runs[key] = client.create_run(exp, run_name=name, tags={
                **tags, "online.replica": self.replica, "backend": self.params.serve.backend}).info.run_id
        return self._runs[key]

    def _tag_version(self, client, model: str, day: str, run: str) -> None:
        name, _, version = model.rpartition("/")
        if not (self._may_tag_versions and name and version.isdigit()):
            return
        try:
            client.set_model_version_tag(name, version, "online.day", day)
            client.set_model_version_tag(name, version, "online.run_id", run)
        except Exception as exc:  # the rollout role may write its experiment only: fine, say it once
            self._may_tag_versions = False
            log.info("online metrics stay in experiment %s; this role does not tag model versions (%s)",
                     ONLINE_EXPERIMENT, type(exc).__name__)

    def _close(self, everything: bool) -> None:
        """End the runs of past days (all of them at shutdown)."""
        from mlflow import MlflowClient
        today = utc_day()
        for key, run in list(self._runs.items()):
            if everything or key[-1] != today:
                try:
                    MlflowClient().set_terminated(run)
                except Exception:  # noqa: S110 - a run left RUNNING is harmless; the next start opens new ones
                    pass
                del self._runs[key]
                self._steps.pop(run, None)
                self._written.pop(key[1:], None)
