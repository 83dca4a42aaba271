"""Promotion: gate a candidate on its evaluation against the champion, then compare-and-set `champion`.

    evidence = the candidate's and the champion's evaluations on the same test set (fingerprint) and
               settings: the champion is re-evaluated on the candidate's test set when needed (cached)
    decision = gates(evidence, policy)   (tasks/registry/gates.py; computed without a lock)
    with the registry lease (tasks/registry/lease.py: one holder at a time on every host):
        if champion is still the one the decision was computed against and every gate passed:
            champion := candidate
        record the outcome as version tags (promotion.*, with the fingerprint and both evaluation runs)
        and an audit entry; if any of these writes fails, the alias and the tags go back to what they were

A rolled-back version (tag promotion.rolled_back) is never promoted again by a retrain or a schedule: its
`not_rolled_back` gate fails. `v2m promote --reinstate` is the explicit way back; it is audited as a
`reinstate` entry and tags the version promotion.reinstated.

The lease lives in the registry itself, so promotions on several CPU hosts (or several local processes on
the embedded store) are serialised, and a crashed holder's lease expires after orchestration.registry_lease_s.
If the champion moved after the decision was computed, the promotion is refused: two concurrent promotions of
two versions end with exactly one champion and two audit entries; two of the same version, with one champion
and one audit entry (the second finds it champion already and decides nothing).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from tasks.evaluation.evaluate import EvalResult
from tasks.registry.gates import FAIL, WAITING, Evidence, GateResult, run_gates
from tasks.registry.lease import registry_lease
from tasks.registry.registry import (CHALLENGER, CHAMPION, alias_version, audit, audit_history, model_name,
                                     version_tags)
from v2m.config import Params
from v2m.errors import UserError


class PromotionError(UserError, ValueError):
    """Nothing to promote or roll back to; the message says what is missing."""


@dataclass
class Decision:
    backend: str
    version: str
    champion_before: str | None
    gates: list[GateResult] = field(default_factory=list)
    promoted: bool = False
    reason: str = ""
    test_fingerprint: str = ""
    challenger_eval_run_id: str = ""
    champion_eval_run_id: str = ""
    reinstate: bool = False

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def waiting(self) -> list[str]:
        return [g.name for g in self.gates if g.status == WAITING]

    @property
    def outcome(self) -> str:
        """promoted, waiting (held back only by missing evidence: votes, approval) or refused."""
        if self.promoted:
            return "promoted"
        return "waiting" if self.waiting and all(g.status != FAIL for g in self.gates) else "refused"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def evaluation_of(params: Params, root: Path, backend: str, version: str) -> EvalResult:
    """The version's evaluation on the current test set (fingerprint) with the current settings: its
    `eval_run_id` when that one is such, else a new evaluation (itself cached by model, data version,
    settings and code). A version that was never evaluated is evaluated, not skipped."""
    from tasks.evaluation.evaluate import current_test_set, evaluate, load_eval_run
    run_id = version_tags(backend, version).get("eval_run_id")
    if run_id:
        known = load_eval_run(run_id)
        if (known.test_fingerprint, known.settings) == current_test_set(params, root, backend):
            return known
    return evaluate(params, root, f"{model_name(backend)}/{version}")


def promotion_lease(params: Params, backend: str, purpose: str):
    """The registry lease of a backend's registered model, with the TTL and wait from params.yaml."""
    orch = params.orchestration
    return registry_lease(model_name(backend), orch.registry_lease_s, orch.registry_wait_s, purpose)


def _record(client: MlflowClient, name: str, d: Decision) -> None:
    tags = {"promotion.decision": d.outcome,
            "promotion.reason": d.reason[:4000],
            "promotion.champion_before": str(d.champion_before),
            "promotion.gates": json.dumps({g.name: g.status for g in d.gates}),
            "promotion.test_fingerprint": d.test_fingerprint,
            "promotion.challenger_eval_run_id": d.challenger_eval_run_id,
            "promotion.champion_eval_run_id": d.champion_eval_run_id,
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if d.promoted and d.reinstate:
        tags["promotion.reinstated"] = tags["promotion.time"]
    for key, value in tags.items():
        client.set_model_version_tag(name, d.version, key, value)


def decide(params: Params, root: Path, backend: str, version: str | None = None, approved: bool = False,
           reinstate: bool = False) -> Decision:
    """The gates for `version` (default: the challenger) against the current champion, both evaluated on
    the same test set (the challenger's evaluation is the current one; the champion is re-evaluated on it
    when its own is older, once: evaluations are cached)."""
    version = version or alias_version(backend, CHALLENGER)
    if version is None:
        raise PromotionError(f"{model_name(backend)}: no challenger to promote; register a fine-tuned model first")
    champion = alias_version(backend, CHAMPION)
    d = Decision(backend, str(version), champion, reinstate=reinstate)
    tags = version_tags(backend, d.version)
    if reinstate and not tags.get("promotion.rolled_back"):
        raise PromotionError(f"{model_name(backend)}: v{version} was never rolled back; promote it without "
                             "--reinstate")
    cand = evaluation_of(params, root, backend, d.version)
    champ = evaluation_of(params, root, backend, champion) if champion and champion != d.version else None
    d.test_fingerprint, d.challenger_eval_run_id = cand.test_fingerprint, cand.run_id
    d.champion_eval_run_id = champ.run_id if champ else ""
    d.gates = run_gates(Evidence(params.promotion, cand, champ, tags, approved, reinstate))
    if params.promotion.human_preference.required:  # the blind listening test (tasks/listening/gate.py)
        from tasks.listening.gate import human_preference
        d.gates.append(human_preference(params, root, backend, d.version, champion))
    if params.promotion.online_evidence.required:  # shadow pairs from `v2m serve` (tasks/serving/evidence.py)
        from tasks.serving.evidence import online_evidence_gate
        d.gates.append(online_evidence_gate(params, root, backend, d.version, champion))
    return d


def promote(params: Params, root: Path, backend: str, version: str | None = None, approved: bool = False,
            decision: Decision | None = None, reinstate: bool = False) -> Decision:
    """Move `champion` to the candidate if every gate passes and the champion has not changed meanwhile.
    A rolled-back version is refused unless `reinstate` (the explicit, audited way back)."""
    d = decision or decide(params, root, backend, version, approved, reinstate)
    client, name = MlflowClient(), model_name(backend)
    with promotion_lease(params, backend, f"promote v{d.version}") as lease:
        now = alias_version(backend, CHAMPION)
        if d.version == now:  # an unchanged re-run, or another host promoted it meanwhile: nothing to decide
            d.reason = f"v{d.version} is already champion"
            return d
        if now != d.champion_before:
            d.reason = f"champion changed from v{d.champion_before} to v{now} after the decision; re-run promote"
        elif not d.passed:
            failed = [g.name for g in d.gates if g.status == FAIL]
            d.reason = ("failed gates: " + ", ".join(failed)) if failed else "waiting for: " + ", ".join(d.waiting)
        else:
            d.promoted = True
            d.reason = "reinstated: all gates passed" if reinstate else "all gates passed"
        tags_before = version_tags(backend, d.version)
        try:
            lease.check()  # still ours: nothing is written by a holder whose lease was taken over
            if d.promoted:
                client.set_registered_model_alias(name, CHAMPION, d.version)
            _record(client, name, d)
            action = {"promoted": "reinstate" if d.reinstate else "promote", "waiting": "wait",
                      "refused": "refuse"}[d.outcome]
            audit(params, root, backend, action, d.version, d.champion_before, alias_version(backend, CHAMPION),
                  d.as_dict())
        except BaseException:
            _restore(client, name, d, tags_before)  # a failed promotion leaves the registry as it was
            d.promoted = False
            raise
    return d


def _restore(client: MlflowClient, name: str, d: Decision, tags_before: dict[str, str]) -> None:
    """Undo a promotion's writes: the champion alias as it was, the version's promotion.* tags as they were."""
    if d.promoted:
        if d.champion_before:
            client.set_registered_model_alias(name, CHAMPION, d.champion_before)
        else:
            client.delete_registered_model_alias(name, CHAMPION)
    for key in [k for k in version_tags(d.backend, d.version) if k.startswith("promotion.")]:
        if key in tags_before:
            client.set_model_version_tag(name, d.version, key, tags_before[key])
        else:
            client.delete_model_version_tag(name, d.version, key)


def earlier_decision(backend: str, version: str) -> Decision | None:
    """The decision a flow took on this version before, if it was final (promoted or refused), else None.

    Flows re-decide nothing: an unchanged re-run of retrain registers the same versions again, and
    re-deciding them in order would move the champion back to v1 and forward again (each older version
    passes against the newer one within noise), churning the registry, the audit trail and every server
    that follows the alias. A version that was waiting (for votes, or approval) is decided again; a person
    re-decides any version with `v2m promote --version N`."""
    tags = version_tags(backend, version)
    if tags.get("promotion.decision") not in ("promoted", "refused"):
        return None
    champion_before = tags.get("promotion.champion_before")
    return Decision(backend, str(version), None if champion_before in (None, "None") else champion_before,
                    promoted=False, reason=f"decided before ({tags['promotion.decision']}): "
                    + tags.get("promotion.reason", ""), test_fingerprint=tags.get("promotion.test_fingerprint", ""),
                    challenger_eval_run_id=tags.get("promotion.challenger_eval_run_id", ""),
                    champion_eval_run_id=tags.get("promotion.champion_eval_run_id", ""))


def rollback(params: Params, root: Path, backend: str, expected: str | None = None,
             reason: str = "") -> tuple[str, str]:
    """Restore the champion that the current one replaced; returns (from, to). With `expected`, only if the
    champion is still that version (an automatic rollback judged it: it must not roll back its successor)."""
    client, name = MlflowClient(), model_name(backend)
    with promotion_lease(params, backend, "rollback") as lease:
        current = alias_version(backend, CHAMPION)
        if current is None:
            raise PromotionError(f"{name}: no champion to roll back")
        if expected is not None and current != str(expected):
            raise PromotionError(f"{name}: the champion is v{current}, not v{expected}: nothing to roll back")
        promotions = [e for e in audit_history(params, root, backend)
                      if e["action"] in ("promote", "reinstate") and e["champion_after"] == current]
        previous = promotions[-1]["champion_before"] if promotions else "None"
        if previous in ("None", ""):
            raise PromotionError(f"{name}: v{current} has no previous champion to roll back to")
        lease.check()
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_model_version_tag(name, current, "promotion.rolled_back", time.strftime("%Y-%m-%dT%H:%M:%SZ"))
        audit(params, root, backend, "rollback", previous, current, previous,
              {"from": current, "to": previous} | ({"reason": reason} if reason else {}))
    return current, previous


# --- thin Prefect task wrappers --------------------------------------------------------------------------
from prefect import task  # noqa: E402

from tasks.orchestration import retry_transient  # noqa: E402
from tasks.registry.registry import register  # noqa: E402

register_task = task(register, name="register", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
# A promotion is compare-and-set: retrying after a transient error re-reads the champion first.
promote_task = task(promote, name="promote", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
