"""The listening results of compared models, for the comparison report (tasks/registry/report.py).

Read from what the registry holds (the `listening.*` tags of each registered version and its listening run's
stats.json), so the report shows the same numbers in team mode, where the vote store is on another machine.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

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


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "NaN" if v != v else f"{v:.4f}"
    return html.escape(str(v))


def section(results: dict[str, dict[str, Any]], refs: list[str]) -> str:
    """The report's listening table, one column per compared model (beside the metric tables)."""
    if not results:
        return ""
    groups = sorted({g for r in results.values() for g in r["groups"]})
    rows = [(label, lambda r, k=key: r[k]) for key, label in ROWS] + \
           [(f"win rate, {g}", lambda r, g=g: r["groups"].get(g, float("nan"))) for g in groups]
    head = "".join(f"<th>{html.escape(ref)}</th>" for ref in refs)
    body = "".join(f"<tr><th>{html.escape(label)}</th>" + "".join(
        f"<td>{_cell(get(results[ref])) if ref in results else '–'}</td>" for ref in refs) + "</tr>"
        for label, get in rows)
    title = "Blind listening test (win rate against the opponent; no preference = half a win)"
    return (f"<h2>{html.escape(title)}</h2><table data-table=\"Blind listening test\"><tr><th></th>{head}</tr>"
            f"{body}</table>")
