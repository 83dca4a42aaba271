"""Promotion: gate a candidate on its evaluation against the champion, then compare-and-set `champion`.

    decision = gates(candidate metrics, champion metrics, policy)      (computed without a lock)
    with the registry lock:
        if champion is still the one the decision was computed against and every gate passed:
            champion := candidate
        record the outcome as version tags (promotion.*) and an audit entry

The lock is a file lock under .v2m/locks/ (one host: the embedded store, or a team stack whose promotions
run on one CPU worker). If the champion moved after the decision was computed, the promotion is refused:
two concurrent promotions end with exactly one champion and two audit entries.
"""

from __future__ import annotations

import fcntl
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from tasks.registry.registry import (CHALLENGER, CHAMPION, alias_version, audit, audit_history, eval_metrics,
                                     model_name)
from v2m.config import Params, PromotionConfig
from v2m.errors import UserError


class PromotionError(UserError, ValueError):
    """Nothing to promote or roll back to; the message says what is missing."""


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str
    waiting: bool = False  # not enough evidence yet (e.g. listening votes): the promotion waits, it is not refused


@dataclass
class Decision:
    backend: str
    version: str
    champion_before: str | None
    gates: list[Gate] = field(default_factory=list)
    promoted: bool = False
    reason: str = ""

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def waiting(self) -> bool:
        """Only waiting gates stand in the way: run promote again once the evidence is in."""
        return not self.passed and all(g.passed or g.waiting for g in self.gates)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "waiting": self.waiting}


def _finite(x: float | None) -> bool:
    # MLflow stores +-inf as +-1.8e308: treat such magnitudes as infinite too.
    return x is not None and math.isfinite(x) and abs(x) < 1e300


def gates(candidate: dict[str, float], champion: dict[str, float] | None, cfg: PromotionConfig,
          approved: bool) -> list[Gate]:
    """Every gate of the policy, pass or fail, with the numbers behind it."""
    out = []
    missing = [m for m in cfg.required_metrics if not _finite(candidate.get(m))]
    out.append(Gate("metrics_present", not missing,
                    f"missing or NaN: {', '.join(missing)}" if missing else "all required metrics are finite"))
    nan = sorted(k for k, v in candidate.items() if not _finite(v))
    out.append(Gate("no_nan", not nan, f"NaN/inf: {', '.join(nan)}" if nan else "no NaN or inf metric"))
    sane = candidate.get("eval/sanity_pass")
    out.append(Gate("sanity", sane == 1.0, f"eval/sanity_pass = {sane}"))
    if champion:
        fad_c, fad_p = candidate.get("eval/fad"), champion.get("eval/fad")
        if _finite(fad_c) and _finite(fad_p):
            need = fad_p * (1 - cfg.fad_min_improvement)
            out.append(Gate("fad", fad_c <= need, f"FAD {fad_c:.4g} vs champion {fad_p:.4g} (needs <= {need:.4g})"))
        else:
            out.append(Gate("fad", False, f"FAD not comparable (candidate {fad_c}, champion {fad_p})"))
        hf_c, hf_p = candidate.get("eval/harmonic_fit"), champion.get("eval/harmonic_fit")
        if _finite(hf_c) and _finite(hf_p):
            out.append(Gate("harmonic_fit", hf_c >= hf_p - cfg.harmonic_fit_max_drop,
                            f"harmonic fit {hf_c:.4f} vs champion {hf_p:.4f} (max drop {cfg.harmonic_fit_max_drop})"))
        else:
            out.append(Gate("harmonic_fit", False, f"harmonic fit not comparable ({hf_c} vs {hf_p})"))
        regressions = []
        for key, before in champion.items():
            if (key.startswith(("eval/lang/", "eval/genre/")) and key.endswith("/harmonic_fit")):
                after = candidate.get(key)
                if not _finite(after) or after < before - cfg.breakdown_max_regression:
                    regressions.append(f"{key} {after} < {before:.4f} - {cfg.breakdown_max_regression}")
        out.append(Gate("no_group_regression", not regressions,
                        "; ".join(regressions) if regressions else "no language or genre regressed"))
    else:
        out.append(Gate("first_champion", True, "no champion yet: absolute gates only"))
    if cfg.manual_approval:
        out.append(Gate("manual_approval", approved, "approved" if approved else "needs --approve"))
    return out


@contextmanager
def registry_lock(root: Path, backend: str, timeout_s: float = 120.0):
    path = Path(root) / ".v2m" / "locks" / f"{model_name(backend)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: registry lock held for over {timeout_s} s")
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _record(client: MlflowClient, name: str, d: Decision) -> None:
    for key, value in {"promotion.decision": "promoted" if d.promoted else "waiting" if d.waiting else "refused",
                       "promotion.reason": d.reason[:4000],
                       "promotion.champion_before": str(d.champion_before),
                       "promotion.gates": json.dumps({g.name: g.passed for g in d.gates}),
                       "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}.items():
        client.set_model_version_tag(name, d.version, key, value)


def decide(params: Params, backend: str, version: str | None = None, approved: bool = False,
           root: Path = Path(".")) -> Decision:
    """Evaluate the gates for `version` (default: the challenger) against the current champion."""
    version = version or alias_version(backend, CHALLENGER)
    if version is None:
        raise PromotionError(f"{model_name(backend)}: no challenger to promote; register a fine-tuned model first")
    champion = alias_version(backend, CHAMPION)
    d = Decision(backend, str(version), champion)
    champ_metrics = eval_metrics(backend, champion) if champion and champion != str(version) else None
    d.gates = gates(eval_metrics(backend, str(version)), champ_metrics, params.promotion, approved)
    if params.promotion.human_preference.required:
        from tasks.listening.gate import human_preference
        hp = human_preference(params, root, backend, str(version), champion)
        d.gates.append(Gate(hp.name, hp.passed, hp.reason, waiting=hp.waiting))
    return d


def promote(params: Params, root: Path, backend: str, version: str | None = None, approved: bool = False,
            decision: Decision | None = None) -> Decision:
    """Move `champion` to the candidate if every gate passes and the champion has not changed meanwhile."""
    d = decision or decide(params, backend, version, approved, root)
    client, name = MlflowClient(), model_name(backend)
    with registry_lock(root, backend):
        now = alias_version(backend, CHAMPION)
        if now != d.champion_before:
            d.reason = f"champion changed from v{d.champion_before} to v{now} after the decision; re-run promote"
        elif d.version == now:  # nothing to decide (an unchanged re-run): no tags, no audit entry
            d.reason = f"v{d.version} is already champion"
            return d
        elif d.waiting:
            d.reason = "waiting on gates: " + ", ".join(g.name for g in d.gates if g.waiting)
        elif not d.passed:
            d.reason = "failed gates: " + ", ".join(g.name for g in d.gates if not g.passed and not g.waiting)
        else:
            client.set_registered_model_alias(name, CHAMPION, d.version)
            d.promoted, d.reason = True, "all gates passed"
        try:
            _record(client, name, d)
        except Exception:
            if d.promoted:  # a failed promotion leaves the registry as it was
                if d.champion_before:
                    client.set_registered_model_alias(name, CHAMPION, d.champion_before)
                else:
                    client.delete_registered_model_alias(name, CHAMPION)
            raise
        audit(params, root, backend, "promote" if d.promoted else "wait" if d.waiting else "refuse", d.version, d.champion_before,
              alias_version(backend, CHAMPION), d.as_dict())
    return d


def rollback(params: Params, root: Path, backend: str) -> tuple[str, str]:
    """Restore the champion that the current one replaced; returns (from, to)."""
    client, name = MlflowClient(), model_name(backend)
    with registry_lock(root, backend):
        current = alias_version(backend, CHAMPION)
        if current is None:
            raise PromotionError(f"{name}: no champion to roll back")
        promotions = [e for e in audit_history(params, root, backend)
                      if e["action"] == "promote" and e["champion_after"] == current]
        previous = promotions[-1]["champion_before"] if promotions else "None"
        if previous in ("None", ""):
            raise PromotionError(f"{name}: v{current} has no previous champion to roll back to")
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_model_version_tag(name, current, "promotion.rolled_back", time.strftime("%Y-%m-%dT%H:%M:%SZ"))
        audit(params, root, backend, "rollback", previous, current, previous, {"from": current, "to": previous})
    return current, previous


# --- thin Prefect task wrappers --------------------------------------------------------------------------
from prefect import task  # noqa: E402

from tasks.orchestration import retry_transient  # noqa: E402
from tasks.registry.registry import register  # noqa: E402

register_task = task(register, name="register", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
# A promotion is compare-and-set: retrying after a transient error re-reads the champion first.
promote_task = task(promote, name="promote", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
