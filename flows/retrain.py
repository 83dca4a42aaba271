"""Flow `retrain`: the whole pipeline, from raw tracks to a champion and a report people can listen to.

    prepare-data  ->  for each backend, for each stage / variant:
                          finetune -> evaluate (and the champion, on the same test set) -> register + promote
                  ->  baseline evaluation of the base model -> comparison report per backend

In team mode the two backends' pipelines run side by side (their GPU steps share the gpu-a40 pool and its
limit: with room for both they train at once, else one waits in the queue); embedded, one after the other.

Unchanged data and settings make every fine-tune a cache hit (nothing trains). Steps run in-process in
embedded mode and as deployments on the gpu-a40 / cpu pools in team mode (flows/steps.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.prepare_data import prepare_data
from flows.steps import (evaluate_flow, finetune_flow, model_inputs, project_params, promote_flow, run_step,
                         side_by_side)
from tasks.orchestration import team_mode
from tasks.handoff import checkout
from tasks.registry.registry import CHAMPION, alias_version, model_name
from tasks.registry.report import compare_task
from v2m.config import Params


def outcome_line(decision: dict[str, Any]) -> str:
    """How the log tells a promotion step's decision ("decided before ..." is an earlier, final one)."""
    if decision["promoted"]:
        return "promoted"
    if decision["reason"].startswith("decided before"):
        return decision["reason"]
    return f"kept out: {decision['reason']}"


def backend_pipeline(params: Params, root: Path, backend: str, modes: list[str], presets: dict[str, str] | None,
                     max_steps: int | None, version: dict[str, str], baseline: bool) -> list[dict[str, Any]]:
    """One backend, each stage / variant in order: finetune -> evaluate (and the champion on the same test
    set) -> register + promote; then (baseline) the base model's evaluation for the report, as a step of its
    own (on the GPU pool in team mode; the report finds it cached). Returns one record per stage / variant."""
    log = get_run_logger()
    steps = []
    for mode in modes:
        ft = run_step(params, "finetune", finetune_flow, backend=backend, mode=mode, project_dir=str(root),
                      presets=presets, max_steps=max_steps, **version)
        ev = run_step(params, "evaluate", evaluate_flow, model=f"runs:/{ft['run_id']}", project_dir=str(root),
                      presets=presets, backend=backend, **version)
        champion = alias_version(backend, CHAMPION)
        if champion:  # on the challenger's test set, on the GPU pool (a cache hit once done)
            run_step(params, "evaluate", evaluate_flow, model=f"{model_name(backend)}/{champion}",
                     project_dir=str(root), presets=presets, backend=backend, **version)
        decision = run_step(params, "promote", promote_flow, backend=backend, run_id=ft["run_id"],
                            eval_run_id=ev["run_id"], project_dir=str(root), **version)
        log.info("%s %s: %s; v%s %s", backend, mode, "trained" if ft["trained"] else "cache hit",
                 decision["version"], outcome_line(decision))
        steps.append({"mode": mode, "run_id": ft["run_id"], "trained": ft["trained"],
                      "eval_run_id": ev["run_id"], "version": decision["version"], "promoted": decision["promoted"],
                      "reason": decision["reason"], "test_fingerprint": decision["test_fingerprint"],
                      "champion_before": decision["champion_before"],
                      "champion_eval_run_id": decision["champion_eval_run_id"],
                      "gates": {g["name"]: g["status"] for g in decision["gates"]}})
    if baseline and alias_version(backend, CHAMPION):  # what the report compares the champion with
        run_step(params, "evaluate", evaluate_flow, model=f"base:{backend}", project_dir=str(root), presets=presets,
                 backend=backend, **version)
    return steps


@flow(name="retrain", persist_result=True)
def retrain(project_dir: str = ".", backends: list[str] | None = None, musicgen_stages: list[str] | None = None,
            audioldm_variants: list[str] | None = None, presets: dict[str, str] | None = None,
            max_steps: int | None = None, push_data: bool = False, report: bool = True) -> dict[str, Any]:
    root, params = project_params(project_dir, presets)
    log = get_run_logger()
    modes = {"musicgen": musicgen_stages or params.retrain.musicgen_stages,
             "audioldm": audioldm_variants or params.retrain.audioldm_variants}
    team = team_mode(params)
    started = time.perf_counter()
    data = run_step(params, "prepare-data", prepare_data, project_dir=str(root), push=push_data or team)
    log.info("data version %s (prepare-data in %.1f s)", data["data_version"], time.perf_counter() - started)
    # Team mode: steps on other hosts check this version out of the DVC remote; embedded: the data is here.
    version = {"data_version": data["data_version"]} if team else {}

    reports = threading.Lock()  # one report at a time: they check out into this one workspace, and draw plots

    def pipeline(backend: str) -> dict[str, Any]:
        """One backend's steps, then its report: in team mode while the other backend's steps still run."""
        steps = backend_pipeline(params, root, backend, modes[backend], presets, max_steps, version, report)
        entry: dict[str, Any] = {"steps": steps, "champion": alias_version(backend, CHAMPION)}
        if report and entry["champion"]:
            with reports:
                started = time.perf_counter()
                if team:  # the report reads the champion's evaluation samples: the test chunks of this version
                    checkout(root, params, data["data_version"], model_inputs(backend))
                index, _, _ = compare_task(params, root, [f"{model_name(backend)}@{CHAMPION}", f"base:{backend}"])
                entry["report"] = str(index)
                log.info("report: %s in %.1f s", backend, time.perf_counter() - started)  # flows/timeline.py
        return entry

    out: dict[str, Any] = {"data_version": data["data_version"],
                           "backends": side_by_side(params, pipeline, backends or params.retrain.backends)}

    lines = [f"# Retrain on data `{out['data_version']}`", ""]
    for backend, entry in out["backends"].items():
        lines.append(f"- **{backend}**: champion v{entry['champion']}; report `{entry.get('report', '-')}`")
        lines += [f"  - {s['mode']}: v{s['version']} {'promoted' if s['promoted'] else 'not promoted'}"
                  f" ({'trained' if s['trained'] else 'cache hit'})" for s in entry["steps"]]
    create_markdown_artifact(key="retrain-summary", markdown="\n".join(lines), description="retrain outcome")
    return out


if __name__ == "__main__":
    import json
    print(json.dumps(retrain(project_dir=str(Path.cwd())), indent=2, default=str))
