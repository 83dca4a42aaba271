"""The listening results of compared models, for the comparison report (tasks/registry/report.py).

Read from what the registry holds (the `listening.*` tags of each registered version and its listening run's
stats.json), so the report shows the same numbers in team mode, where the vote store is on another machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

ROWS = (("opponent", "opponent"), ("votes", "votes"), ("listeners", "listeners"), ("win_rate", "win rate"),
        ("ci_low", "CI low"), ("ci_high", "CI high"), ("agreement", "listener agreement"), ("kappa", "Fleiss' kappa"))


def listening_results(refs: list[str], scratch: Path) -> dict[str, dict[str, Any]]:
    """ref -> its recorded listening results, for each registered version among `refs` that has votes."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tasks.listening.clips import ListeningSetupError, version_ref
    client, out = MlflowClient(), {}
    for ref in refs:
        try:
            name, _, version = version_ref(ref).rpartition("/")
        except (ListeningSetupError, MlflowException):
            continue  # a run, a folder or a base model: never in a listening test
        tags = client.get_model_version(name, version).tags
        if "listening.votes" not in tags:
            continue
        res: dict[str, Any] = {k: tags.get(f"listening.{k}", "") for k, _ in ROWS}
        for k in ("win_rate", "ci_low", "ci_high", "agreement", "kappa"):
            res[k] = float(res[k]) if res[k] else float("nan")
        try:
            stats = json.loads(Path(client.download_artifacts(tags["listening.run_id"], "stats.json",
                                                              str(scratch))).read_text())
            mine = stats.get(f"{name}/{version}", {})
            res["groups"] = {f"{kind} {g}": r["win_rate"] for kind in ("genre", "language")
                             for g, r in mine.get(kind, {}).items()}
        except (MlflowException, OSError, KeyError):
            res["groups"] = {}
        out[ref] = res
    return out


def section(results: dict[str, dict[str, Any]], refs: list[str], table: Callable[..., str]) -> str:
    """The report's listening table, one column per compared model (beside the metric tables)."""
    if not results:
        return ""
    groups = sorted({g for r in results.values() for g in r["groups"]})
    rows = [label for _, label in ROWS] + [f"win rate, {g}" for g in groups]
    keys = dict((label, key) for key, label in ROWS)

    def cell(row: str, ref: str):
        r = results.get(ref)
        if r is None:
            return "–"
        if row in keys:
            return r[keys[row]]
        return r["groups"].get(row.removeprefix("win rate, "), float("nan"))

    return table("Blind listening test (win rate against the opponent; no preference = half a win)", rows, refs, cell)
