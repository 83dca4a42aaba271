"""The `human_preference` promotion gate, and the listening results recorded on model versions.

    promotion.human_preference: {required, min_votes, min_listeners, max_votes_per_listener, min_lower_bound,
                                 confidence}

The gate reads the votes on (candidate, champion) from the vote store, and only those of listeners known by an
invitation or a trusted auth proxy (store.COUNTED); each listener's votes weigh at most max_votes_per_listener.
With less than `min_votes` of that weight, or fewer than `min_listeners` people, it *waits*: the promotion is
neither done nor refused, and runs again once people have listened. Then it passes when the lower Wilson bound
of the candidate's win rate reaches `min_lower_bound`. Uncounted votes and refused attempts are reported in the
reason, never counted.

Results are recorded where the registry keeps evidence: tags `listening.*` on each registered version of the
pair (its own record against the other), and a run per pair in the `voice2music-listening` experiment whose
metrics (step = number of votes) trace the win rate as votes come in, with the full statistics as stats.json.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from tasks.listening.stats import summarize
from tasks.listening.store import COUNTED, VoteStore, VoteStoreError, pair_key
from tasks.registry.gates import FAIL, PASS, WAITING, GateResult
from v2m.config import Params
from v2m.config_listening import DB_URL_ENV, check_vote_db

GATE = "human_preference"
EXPERIMENT = "voice2music-listening"
_record_lock = threading.Lock()


def vote_target(params: Params, root: Path) -> str | Path:
    """Where the votes are: the team's database when the environment names one (DB_URL_ENV: the team stack
    sets it on its hosts, so a promotion on any host reads the votes cast on any other), else listening.db;
    a path is relative to the project."""
    target = os.environ.get(DB_URL_ENV, "").strip() or params.listening.db
    if target != params.listening.db:
        try:
            check_vote_db(target)
        except ValueError as exc:
            raise VoteStoreError(f"environment variable {DB_URL_ENV}: {exc}") from None
    return target if "://" in target else Path(root) / target


def store_for(params: Params, root: Path) -> VoteStore:
    return VoteStore(vote_target(params, root))


def counted(votes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The votes of people the test knows (invited, or signed in by a trusted proxy)."""
    return [v for v in votes if v["via"] in COUNTED]


def refused(store: VoteStore, votes: list[dict[str, Any]]) -> int:
    """Attempts that were refused plus votes that do not count: shown, never counted."""
    return sum(a["count"] for a in store.attempts()) + len(votes) - len(counted(votes))


def human_preference(params: Params, root: Path, backend: str, candidate: str, champion: str | None) -> GateResult:
    """Judge version `candidate` against version `champion` of `backend` on the votes cast so far."""
    from tasks.registry.registry import model_name
    cfg = params.promotion.human_preference
    if champion is None or champion == candidate:
        return GateResult(GATE, PASS, "no champion to compare with: nothing for listeners to prefer")
    name = model_name(backend)
    me, other = f"{name}/{candidate}", f"{name}/{champion}"
    store = store_for(params, root)
    votes = store.votes(backend, (me, other))
    s = summarize(counted(votes), me, other, cfg.confidence, cfg.max_votes_per_listener)
    numbers = (s["win_rate"], s["ci_low"], s["ci_high"], s["n"])  # estimate: the win rate (ties = half)
    aside = f"; {n} refused or uncounted attempts left out" if (n := refused(store, votes)) else ""
    if s["weight"] < cfg.min_votes or s["listeners"] < cfg.min_listeners:
        return GateResult(GATE, WAITING,
                          f"waiting for listeners: {s['weight']:g} of {cfg.min_votes} votes from {s['listeners']} of "
                          f"{cfg.min_listeners} listeners on v{candidate} vs v{champion} (v2m listen --backend "
                          f"{backend} --invite NAME){aside}", *numbers)
    passed = s["ci_low"] >= cfg.min_lower_bound
    return GateResult(GATE, PASS if passed else FAIL,
                      f"win rate {s['win_rate']:.3f} over {s['weight']:g} votes from {s['listeners']} listeners, "
                      f"{cfg.confidence:.0%} CI [{s['ci_low']:.3f}, {s['ci_high']:.3f}]; lower bound needs >= "
                      f"{cfg.min_lower_bound}{aside}", *numbers)


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.4f}"


def record(params: Params, root: Path, backend: str, models: tuple[str, str]) -> dict[str, dict[str, Any]]:
    """Write the pair's current statistics onto both registered versions and the pair's listening run."""
    from mlflow.tracking import MlflowClient

    from v2m.tracking import experiment_id
    cfg = params.promotion.human_preference
    store = store_for(params, root)
    votes = store.votes(backend, models)
    left_out = str(refused(store, votes))
    client = MlflowClient()
    out = {}
    with _record_lock:
        exp = experiment_id(EXPERIMENT, params, root)
        key = pair_key(*models)
        runs = client.search_runs([exp], f"tags.pair = '{key}'", max_results=1)
        run_id = runs[0].info.run_id if runs else client.create_run(
            exp, run_name=f"listening {models[0]} vs {models[1]}", tags={"pair": key, "backend": backend}).info.run_id
        for me, other in (models, models[::-1]):
            s = summarize(counted(votes), me, other, cfg.confidence, cfg.max_votes_per_listener)
            out[me] = s
            name, _, version = me.rpartition("/")
            tags = {"listening.opponent": other, "listening.votes": str(s["n"]),
                    "listening.win_rate": _fmt(s["win_rate"]), "listening.ci_low": _fmt(s["ci_low"]),
                    "listening.ci_high": _fmt(s["ci_high"]), "listening.listeners": str(s["listeners"]),
                    "listening.agreement": _fmt(s["agreement"]["pairwise"]),
                    "listening.kappa": _fmt(s["agreement"]["kappa"]), "listening.run_id": run_id,
                    "listening.weight": _fmt(s["weight"]), "listening.refused": left_out,
                    "listening.updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            for k, v in tags.items():
                client.set_model_version_tag(name, version, k, v)
            for k in ("win_rate", "ci_low", "ci_high"):  # one point per vote count: the history of the test
                if s[k] == s[k]:
                    client.log_metric(run_id, f"v{version}/{k}", s[k], step=s["n"])
        client.log_text(run_id, json.dumps(out, indent=1, sort_keys=True, default=str), "stats.json")
        n = len(counted(votes))
        client.log_metric(run_id, "votes", n, step=n)
    return out
