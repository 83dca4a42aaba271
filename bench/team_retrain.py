"""Two hosts against one: wall time of `retrain` in team mode (a cpu worker and a gpu-a40 worker in two empty
folders, code from git, data through the DVC S3 remote, models through MLflow, results on S3) against the
same retrain embedded in one process, and the bytes that moved through S3 per step.

    python bench/team_retrain.py [--gpus N [N ...]]

Same tiny data and step counts as tests/flows/test_team_e2e.py (without the lost host). Prints the figures,
with each step's phases from the flow-run timeline (flows/timeline.py). --gpus N: the GPU host runs N jobs at
once (the `gpu` limit N); here they share this machine's CPU cores. Several N: one team run each (each its own
stack), against one embedded run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from flows.timeline import REPORT_LINE, format_timeline, timeline  # noqa: E402
from tests.flows.team_project import TEAM, merge, publish_project, s3_keys  # noqa: E402
from v2m.stack import NOT_INHERITED, Stack, _descendants  # noqa: E402

SETTINGS = merge(TEAM, {"train": {"musicgen": {"max_steps": 6}}})


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) of each named process, its live descendants and the children they reaped: all
    the team stack spends (servers, workers, their zygotes and every flow run), whatever else loads the host."""
    out = {}
    for name, root in pids.items():
        total = 0
        for pid in {root, *_descendants(root)}:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        out[name] = total / os.sysconf("SC_CLK_TCK")
    return out


def team_run(work: Path, gpus: int) -> tuple[float, dict, Path]:
    from flows.deploy import deploy_all
    from v2m.config import load_params
    from prefect.settings import (PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK,
                                  temporary_settings)
    work.mkdir(parents=True)
    st = Stack(work / "stack")
    st.up(servers_only=True, gpus=gpus)
    env = st.client_env("cpu")
    # Prefect reads its settings once: this stack's API for this run (a second run has a stack of its own)
    settings = temporary_settings(updates={
        PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"],
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"]})
    os.environ.update(env)
    settings.__enter__()
    try:
        owner, _ = publish_project(st, work, SETTINGS)
        deploy_all(load_params(owner / "params.yaml"), owner, st.client_env("cpu"))
        st.worker("cpu", work / "cpu-host")
        st.worker("gpu-a40", work / "gpu-host", gpu_ids=[str(i) for i in range(gpus)])
        ready = time.monotonic() + 120  # hosts that are up: their zygotes have imported the libraries (v2m/warm.py)
        while not all((work / h / "warm.sock").exists() for h in ("cpu-host", "gpu-host")) and time.monotonic() < ready:
            time.sleep(1)
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment
        before = {b: s3_keys(st, b) for b in ("v2m-dvc", "v2m-mlflow", "v2m-checkpoints", "v2m-results")}
        pids = st.state()["pids"]
        cpu0, t = cpu_seconds(pids), time.perf_counter()
        parent = run_deployment("retrain/retrain-manual", timeout=None)
        wall, cpu1 = time.perf_counter() - t, cpu_seconds(pids)
        by_process = {name: cpu1[name] - cpu0[name] for name in pids}
        cpu = sum(by_process.values())
        assert parent.state.is_completed(), parent.state
        out = parent.state.result()
        steps = timeline(parent.id)

        async def step_runs():
            async with get_client() as client:
                return await client.read_flow_runs()
        runs = [r for r in asyncio.run(step_runs()) if r.state.is_completed() and r.deployment_id]
        after = {b: s3_keys(st, b) for b in before}
        moved = {b: {k: v for k, v in after[b].items() if before[b].get(k) != v} for b in after}
        report = {"out": out, "moved": moved, "pulled": {}, "timeline": steps, "cpu": cpu, "by_process": by_process}
        for r in runs:
            try:
                res = r.state.result()
            except Exception:  # a result that was not persisted (not a step's)
                continue
            if isinstance(res, dict) and "data_bytes_pulled" in res:
                report["pulled"][f"{r.name} ({'finetune' if 'losses' in res else 'evaluate'})"] = res["data_bytes_pulled"]
        return wall, report, owner
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        for service in (EventsWorker, APILogWorker):  # what this process still sends, while the stack is up
            service.drain_all(timeout=30)
        settings.__exit__(None, None, None)
        st.down()


def embedded_settings(params: dict) -> dict:
    """The team project's params without what only team mode has: the S3 DVC remote and S3 checkpoints. A
    checkpoint_uri left in made the embedded retrain read S3 with no stack and no keys (NoCredentialsError
    in download_latest): the team settings leaked into the baseline."""
    params = merge(params, {"orchestration": {"mode": "embedded"}, "dvc": {"remote": "local"}})
    for backend in ("musicgen", "audioldm"):
        params["train"].get(backend, {}).pop("checkpoint_uri", None)
    return params


def embedded_run(owner: Path, work: Path) -> tuple[float, float, dict[str, float]]:
    """The same project and settings, one process, local DVC remote, embedded MLflow and Prefect. Returns wall
    and CPU seconds, and the seconds its log gives prepare-data and the reports."""
    proj = work / "embedded"
    shutil.copytree(owner, proj, ignore=shutil.ignore_patterns(".v2m"))
    params = embedded_settings(yaml.safe_load((proj / "params.yaml").read_text()))
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(NOT_INHERITED)}
    env.update(PYTHONPATH=str(proj), V2M_ORCHESTRATION="embedded",
               PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    code = "from flows.retrain import retrain; retrain(project_dir='.')"
    log = work / "embedded.log"
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=proj, env=env, stdout=out, stderr=subprocess.STDOUT)
        # wait4: this process tree's own CPU time (the stopped stack's processes may be reaped meanwhile too)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"embedded retrain failed:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    phases = {"prepare-data": sum(float(m) for m in re.findall(r"prepare-data in ([0-9.]+) s", text)),
              "reports": sum(float(m) for m in re.findall(REPORT_LINE, text))}
    return time.perf_counter() - t, usage.ru_utime + usage.ru_stime, phases


def print_team(gpus: int, team_wall: float, report: dict, emb_wall: float, emb_cpu: float) -> None:
    print(f"\n=== team retrain, 2 hosts, {gpus} GPU job(s) at once ===")
    print(format_timeline(report["timeline"]))
    print(f"team retrain: {team_wall:7.1f} s wall, {report['cpu']:7.1f} s CPU (servers, workers and flow runs)   "
          f"team / embedded = {team_wall / emb_wall:.2f} (wall), {report['cpu'] / emb_cpu:.2f} (CPU)")
    print("team CPU by process tree: " + ", ".join(
        f"{name} {sec:.1f} s" for name, sec in sorted(report["by_process"].items(), key=lambda kv: -kv[1])))
    moved = report["moved"]
    dvc = moved["v2m-dvc"]
    print(f"prepare-data -> S3 (dvc push + version files): {sum(dvc.values()):,} bytes in {len(dvc)} objects")
    for name, size in sorted(report["pulled"].items()):
        print(f"  S3 -> {name}: {size:,} bytes of data pulled")
    for backend, entry in report["out"]["backends"].items():
        for step in entry["steps"]:
            for kind, run_id in (("finetune", step["run_id"]), ("evaluate", step["eval_run_id"])):
                art = sum(v for k, v in moved["v2m-mlflow"].items() if f"/{run_id}/" in k)
                print(f"  {backend} {step['mode']} {kind}: MLflow artifacts {art:,} bytes")
    print(f"checkpoints on S3: {sum(moved['v2m-checkpoints'].values()):,} bytes; "
          f"Prefect results on S3: {sum(moved['v2m-results'].values()):,} bytes "
          f"in {len(moved['v2m-results'])} objects")
    other = sum(moved["v2m-mlflow"].values()) - sum(
        v for k, v in moved["v2m-mlflow"].items()
        if any(f"/{s[i]}/" in k for e in report["out"]["backends"].values() for s in e["steps"]
               for i in ("run_id", "eval_run_id")))
    print(f"other MLflow artifacts (registered models, reports): {other:,} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1],
                    help="jobs the GPU host runs at once; several values: one team run each, one embedded run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="v2m-team-bench-"))
    try:
        teams = {g: team_run(work / f"team-{g}", g) for g in args.gpus}
        emb_wall, emb_cpu, emb_phases = embedded_run(teams[args.gpus[0]][2], work)
        print(f"embedded retrain: {emb_wall:7.1f} s wall, {emb_cpu:7.1f} s CPU: prepare-data "
              f"{emb_phases['prepare-data']:.1f} s, reports {emb_phases['reports']:.1f} s, the rest "
              f"{emb_wall - sum(emb_phases.values()):.1f} s (steps, process start)")
        for g, (team_wall, report, _) in teams.items():
            print_team(g, team_wall, report, emb_wall, emb_cpu)
        print(f"\nsummary, on {os.cpu_count()} cores: " + "; ".join(
            f"{g} GPU job(s) at once: team / embedded = {teams[g][0] / emb_wall:.2f}" for g in args.gpus))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
