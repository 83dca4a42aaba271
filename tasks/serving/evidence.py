"""Paired online evidence, read back from MLflow: what `v2m rollout status` prints and the online_evidence gate.

The pairs are the shadow runs the recorder wrote (tasks/serving/recorder.py) for one (champion, challenger), in
the order they were scored (runs by start time, then step). Each paired difference (challenger - champion) gets
the interval every comparative promotion gate uses: tasks/evaluation/paired.paired_mean_ci with
promotion.bootstrap_resamples, bootstrap_seed and confidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.evaluation.paired import Interval, paired_mean_ci
from tasks.registry.gates import PASS, GateResult, online_evidence
from tasks.serving.recorder import ONLINE_EXPERIMENT, pair_key
from v2m.config import Params
from v2m.config_serve import ONLINE_METRICS
from v2m.errors import UserError


class NoRolloutError(UserError, ValueError):
    """No champion or no challenger to compare."""


def load_pairs(champion: str, challenger: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (challenger values, champion values), one entry per shadow pair (NaN where a metric has none)."""
    from mlflow import MlflowClient
    client = MlflowClient()
    exp = client.get_experiment_by_name(ONLINE_EXPERIMENT)
    out: dict[str, tuple[list, list]] = {m: ([], []) for m in ONLINE_METRICS}
    if exp is None:
        return {m: (np.array([]), np.array([])) for m in ONLINE_METRICS}
    runs = client.search_runs([exp.experiment_id], "tags.`online.kind` = 'pairs' and "
                              f"tags.`online.champion` = '{champion}' and tags.`online.challenger` = '{challenger}'",
                              order_by=["attributes.start_time ASC"], max_results=50000)
    for run in runs:
        n = int(run.data.metrics.get("online.pairs", 0))
        for m in ONLINE_METRICS:
            for side, values in zip(("challenger", "champion"), out[m]):
                by_step = {h.step: h.value for h in client.get_metric_history(run.info.run_id, pair_key(side, m))}
                values.extend(by_step.get(i, np.nan) for i in range(n))
    return {m: (np.array(a, np.float64), np.array(b, np.float64)) for m, (a, b) in out.items()}


def differences(params: Params, pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Interval]:
    """Challenger - champion per online metric, with the promotion gates' bootstrap interval."""
    p = params.promotion
    return {m: paired_mean_ci(a, b, p.bootstrap_resamples, p.bootstrap_seed, p.confidence)
            for m, (a, b) in pairs.items()}


@dataclass
class Status:
    champion: str
    challenger: str
    pairs: int
    intervals: dict[str, Interval]
    gate: GateResult


def version_label(name: str, ref: str) -> str | None:
    """NAME/VERSION that a REF (NAME@alias, NAME/VERSION) names now; None when the alias is unset."""
    from mlflow.exceptions import MlflowException

    from tasks.serving.holder import alias_target
    try:
        return alias_target(ref.removeprefix("models:/"))
    except MlflowException:
        return None


def status(params: Params, root: Path, backend: str) -> Status:
    """The challenger (serve.rollout.challenger, else NAME@challenger) against NAME@champion, as of now."""
    from tasks.registry.registry import model_name
    name = model_name(backend)
    champion = version_label(name, f"{name}@champion")
    challenger = version_label(name, params.serve.rollout.challenger or f"{name}@challenger")
    if champion is None or challenger is None:
        raise NoRolloutError(f"{name}: no {'champion' if champion is None else 'challenger'} to compare")
    pairs = load_pairs(champion, challenger)
    intervals = differences(params, pairs)
    return Status(champion, challenger, len(pairs[ONLINE_METRICS[0]][0]), intervals,
                  online_evidence(params.promotion.online_evidence, intervals))


def online_evidence_gate(params: Params, root: Path, backend: str, candidate: str,
                         champion: str | None) -> GateResult:
    """The gate for promotion (tasks/registry/promotion.decide): version `candidate` against version `champion`
    on the shadow pairs recorded so far."""
    from tasks.registry.registry import model_name
    if champion is None or champion == candidate:
        return GateResult("online_evidence", PASS, "no champion to compare with: no pairs to judge")
    name = model_name(backend)
    intervals = differences(params, load_pairs(f"{name}/{champion}", f"{name}/{candidate}"))
    return online_evidence(params.promotion.online_evidence, intervals)
