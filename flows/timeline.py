"""Where a team-mode retrain's time goes, read back from Prefect's own records of its step flow runs.

Each step (a flow run started by the parent with run_deployment) is split into phases from its state history
and from the log lines the engine and our steps write:

    queue     Scheduled -> Pending          waiting for a worker to take it (poll interval, a full pool or limit)
    start     Pending -> "Running N deployment pull step(s)"   the worker starts a Python process with Prefect
    checkout  the pull steps                 the code: a git clone, or the worker's per-commit checkout
    imports   pull steps done -> Running     importing the flow's module and what it imports
    data      the step's own "data checkout ... in X s" line (flows/steps.py): the DVC pull of its inputs
    work      Running -> Completed, less data

and the parent's own time: its reports (its "report: ... in X s" lines, flows/retrain.py) and `between`, the
rest of its wall time that neither a step nor a report covers (polling, reading results, its own logic).
Each step also lists the time of its task runs by name (`tasks`: where its work went, e.g. reproduce, publish).
`python -m flows.timeline FLOW_RUN_ID` prints the table for a parent flow run (PREFECT_API_URL set).
"""

from __future__ import annotations

import asyncio
import re
import sys
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

PHASES = ("queue", "start", "checkout", "imports", "data", "work")
PULL_START = re.compile(r"Running \d+ deployment pull step")
PULL_DONE = "All deployment steps completed successfully"
DATA_LINE = re.compile(r"data checkout: .* in ([0-9.]+) s")
REPORT_LINE = re.compile(r"report: .* in ([0-9.]+) s")


def _first(states: list, kind: str) -> datetime | None:
    times = [s.timestamp for s in states if s.type.value == kind]
    return min(times) if times else None


def _seconds(a: datetime | None, b: datetime | None) -> float:
    return max(0.0, (b - a).total_seconds()) if a and b else 0.0


def step_phases(run, states: list, logs: list) -> dict[str, Any]:
    """One step's phases in seconds (see the module docstring), with its name and wall time."""
    scheduled = _first(states, "SCHEDULED") or run.created
    pending, running = _first(states, "PENDING"), _first(states, "RUNNING")
    ended = max((s.timestamp for s in states if s.is_final()), default=None)
    pull_start = min((lg.timestamp for lg in logs if PULL_START.search(lg.message)), default=None)
    pull_done = min((lg.timestamp for lg in logs if PULL_DONE in lg.message), default=None)
    data = sum(float(m.group(1)) for lg in logs if (m := DATA_LINE.search(lg.message)))
    row = {"step": run.name, "deployment": str(run.deployment_id), "state": run.state_name,
           "scheduled": scheduled, "ended": ended,
           "queue": _seconds(scheduled, pending), "start": _seconds(pending, pull_start or running),
           "checkout": _seconds(pull_start, pull_done), "imports": _seconds(pull_done or pending, running),
           "data": data, "work": max(0.0, _seconds(running, ended) - data)}
    row["total"] = _seconds(scheduled, ended)
    return row


def _covered(spans: list[tuple[datetime, datetime]]) -> float:
    """Seconds covered by at least one of the spans (steps of two backends overlap)."""
    total, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += (b - a).total_seconds()
            end = b
        elif b > end:
            total += (b - end).total_seconds()
            end = b
    return total


async def _read(parent_id: UUID) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId,
                                                LogFilter, LogFilterFlowRunId)
    async with get_client() as client:
        parent = await client.read_flow_run(parent_id)
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
        deployments = {d.id: d.name for d in await client.read_deployments()}
        rows = []
        for run in children:
            states = await client.read_flow_run_states(run.id)
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            row = step_phases(run, states, logs)
            row["deployment"] = deployments.get(run.deployment_id, row["deployment"])
            row["tasks"] = {}
            for tr in await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))):
                name = tr.name.rsplit("-", 1)[0]  # "reproduce-0a1" -> "reproduce"
                row["tasks"][name] = row["tasks"].get(name, 0.0) + tr.total_run_time.total_seconds()
            rows.append(row)
        parent_states = await client.read_flow_run_states(parent_id)
        parent_logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[parent_id])))
    rows.sort(key=lambda r: r["scheduled"])
    # a report's line is written when it ends; reports may overlap the other backend's steps
    report_spans = [(lg.timestamp - timedelta(seconds=float(m.group(1))), lg.timestamp)
                    for lg in parent_logs if (m := REPORT_LINE.search(lg.message))]
    reports = sum((b - a).total_seconds() for a, b in report_spans)
    start = _first(parent_states, "RUNNING") or parent.start_time
    end = max((s.timestamp for s in parent_states if s.is_final()), default=None)
    wall = _seconds(start, end)
    spans = [(r["scheduled"], r["ended"]) for r in rows if r["ended"]]
    return {"wall": wall, "steps": rows, "reports": reports, "between": max(0.0, wall - _covered(spans + report_spans)),
            "sums": {p: sum(r[p] for r in rows) for p in PHASES}}


def timeline(parent_flow_run_id: str | UUID) -> dict[str, Any]:
    """The step phases of a parent flow run (e.g. retrain in team mode): {"wall", "steps", "sums", "reports",
    "between"}."""
    return asyncio.run(_read(UUID(str(parent_flow_run_id))))


def format_timeline(t: dict[str, Any]) -> str:
    head = f"{'step':<34}" + "".join(f"{p:>9}" for p in (*PHASES, "total"))
    lines = [head]
    for r in t["steps"]:
        lines.append(f"{(r['deployment'] + ' ' + r['step'])[:33]:<34}"
                     + "".join(f"{r[p]:9.1f}" for p in (*PHASES, "total")))
    tasks: dict[str, float] = {}
    for r in t["steps"]:
        for name, sec in r.get("tasks", {}).items():
            key = f"{r['deployment']}/{name}"
            tasks[key] = tasks.get(key, 0.0) + sec
    lines.append(f"{'sum over steps':<34}" + "".join(f"{t['sums'][p]:9.1f}" for p in PHASES))
    lines.append(f"parent wall {t['wall']:.1f} s: its reports {t['reports']:.1f} s, and {t['between']:.1f} s "
                 "more while no step was queued or running")
    if tasks:
        lines.append("work by task (step/task, summed): " + ", ".join(
            f"{k} {v:.1f} s" for k, v in sorted(tasks.items(), key=lambda kv: -kv[1]) if v >= 0.5))
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_timeline(timeline(sys.argv[1])))
