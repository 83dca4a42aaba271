"""The `human_preference` promotion gate, and the listening results recorded on model versions.

    promotion.human_preference: {required, min_votes, min_lower_bound, confidence}

The gate reads the votes on (candidate, champion) from the vote store. With fewer than `min_votes` votes it
*waits*: the promotion is neither done nor refused, and runs again once people have listened. With enough
votes it passes when the lower Wilson bound of the candidate's win rate reaches `min_lower_bound`.

Results are recorded where the registry keeps evidence: tags `listening.*` on each registered version of the
pair (its own record against the other), and a run per pair in the `voice2music-listening` experiment whose
metrics (step = number of votes) trace the win rate as votes come in, with the full statistics as stats.json.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from tasks.listening.stats import summarize
from tasks.listening.store import VoteStore, pair_key
from tasks.registry.gates import FAIL, PASS, WAITING, GateResult
from v2m.config import Params

GATE = "human_preference"
EXPERIMENT = "voice2music-listening"
_record_lock = threading.Lock()


def store_for(params: Params, root: Path) -> VoteStore:
    return VoteStore(Path(root) / params.listening.db)


def human_preference(params: Params, root: Path, backend: str, candidate: str, champion: str | None) -> GateResult:
    """Judge version `candidate` against version `champion` of `backend` on the votes cast so far."""
    from tasks.registry.registry import model_name
    cfg = params.promotion.human_preference
    if champion is None or champion == candidate:
        return GateResult(GATE, PASS, "no champion to compare with: nothing for listeners to prefer")
    name = model_name(backend)
    me, other = f"{name}/{candidate}", f"{name}/{champion}"
    s = summarize(store_for(params, root).votes(backend, (me, other)), me, other, cfg.confidence)
    numbers = (s["win_rate"], s["ci_low"], s["ci_high"], s["n"])  # estimate: the win rate (ties = half)
    if s["n"] < cfg.min_votes:
        return GateResult(GATE, WAITING,
                          f"waiting for listeners: {s['n']} of {cfg.min_votes} votes on v{candidate} vs v{champion} "
                          f"(v2m listen --backend {backend})", *numbers)
    passed = s["ci_low"] >= cfg.min_lower_bound
    return GateResult(GATE, PASS if passed else FAIL,
                      f"win rate {s['win_rate']:.3f} over {s['n']} votes, {cfg.confidence:.0%} CI "
                      f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]; lower bound needs >= {cfg.min_lower_bound}", *numbers)


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.4f}"


def record(params: Params, root: Path, backend: str, models: tuple[str, str]) -> dict[str, dict[str, Any]]:
    """Write the pair's current statistics onto both registered versions and the pair's listening run."""
    from mlflow.tracking import MlflowClient

    from v2m.tracking import experiment_id
    conf = params.promotion.human_preference.confidence
    votes = store_for(params, root).votes(backend, models)
    client = MlflowClient()
    out = {}
    with _record_lock:
        exp = experiment_id(EXPERIMENT, params, root)
        key = pair_key(*models)
        runs = client.search_runs([exp], f"tags.pair = '{key}'", max_results=1)
        run_id = runs[0].info.run_id if runs else client.create_run(
            exp, run_name=f"listening {models[0]} vs {models[1]}", tags={"pair": key, "backend": backend}).info.run_id
        for me, other in (models, models[::-1]):
            s = summarize(votes, me, other, conf)
            out[me] = s
            name, _, version = me.rpartition("/")
            tags = {"listening.opponent": other, "listening.votes": str(s["n"]),
                    "listening.win_rate": _fmt(s["win_rate"]), "listening.ci_low": _fmt(s["ci_low"]),
                    "listening.ci_high": _fmt(s["ci_high"]), "listening.listeners": str(s["listeners"]),
                    "listening.agreement": _fmt(s["agreement"]["pairwise"]),
                    "listening.kappa": _fmt(s["agreement"]["kappa"]), "listening.run_id": run_id,
                    "listening.updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            for k, v in tags.items():
                client.set_model_version_tag(name, version, k, v)
            for k in ("win_rate", "ci_low", "ci_high"):  # one point per vote count: the history of the test
                if s[k] == s[k]:
                    client.log_metric(run_id, f"v{version}/{k}", s[k], step=s["n"])
        client.log_text(run_id, json.dumps(out, indent=1, sort_keys=True, default=str), "stats.json")
        client.log_metric(run_id, "votes", len(votes), step=len(votes))
    return out
