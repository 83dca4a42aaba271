"""The retrain flow end to end in embedded mode, its cache, its retry policy, and the GPU tag limit."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.task_runners import ProcessPoolTaskRunner

from flows.retrain import retrain
from tasks.registry.registry import CHAMPION, alias_version, audit_history
from tasks.orchestration import retry_transient
from tasks.training.finetune import finetune_task
from v2m.config import load_params
from v2m.tracking import setup_mlflow
from v2m.s3server import SeaweedS3, free_port


def test_retrain_end_to_end_then_an_unchanged_rerun_trains_nothing(small_project: Path, harness) -> None:
    first = retrain(project_dir=str(small_project))
    for backend, n_modes in (("musicgen", 2), ("audioldm", 3)):
        entry = first["backends"][backend]
        assert len(entry["steps"]) == n_modes and all(s["trained"] for s in entry["steps"])
        assert entry["champion"] == alias_version(backend, CHAMPION) is not None
        assert Path(entry["report"]).is_file()
        assert entry["steps"][0]["promoted"]  # the first version becomes champion
    params = load_params(small_project / "params.yaml")
    audited = {b: len(audit_history(params, small_project, b)) for b in ("musicgen", "audioldm")}
    again = retrain(project_dir=str(small_project))
    assert again["data_version"] == first["data_version"]
    # Nothing was re-decided: the champion never moved (not even back and forth), the audit trail is unchanged.
    assert {b: len(audit_history(params, small_project, b)) for b in audited} == audited
    assert not any(s["promoted"] for b in ("musicgen", "audioldm") for s in again["backends"][b]["steps"])
    for backend in ("musicgen", "audioldm"):
        assert [s["trained"] for s in again["backends"][backend]["steps"]] == [False] * len(first["backends"][backend]["steps"])
        assert [s["run_id"] for s in again["backends"][backend]["steps"]] == [s["run_id"] for s in first["backends"][backend]["steps"]]
        assert again["backends"][backend]["champion"] == first["backends"][backend]["champion"]


def test_a_transient_storage_failure_is_retried_and_the_flow_completes(root: Path, harness, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """Checkpoints go to an S3 server that is not up yet: the first attempt fails at its first upload,
    Prefect retries the task once the server answers, and the run resumes from its local checkpoint."""
    port = free_port()
    s3 = SeaweedS3(tmp_path / "s3", buckets=["ckpts"], s3_port=port)
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail fast: the retry is Prefect's job here
    p = load_params(root / "params.yaml")
    tcfg = p.train.musicgen.model_copy(update={"checkpoint_uri": "s3://ckpts/runs"})
    p = p.model_copy(update={"train": p.train.model_copy(update={"musicgen": tcfg})})

    def start_s3_then_decide(task, task_run, state) -> bool:
        """The storage comes back between the attempts: started when Prefect decides on the first retry."""
        if s3.proc is None:
            s3.start()
        return retry_transient(task, task_run, state)

    @flow
    def train_once():
        return finetune_task.with_options(retry_delay_seconds=1, retry_condition_fn=start_s3_then_decide)(
            p, "musicgen", "voice", root, return_state=True)

    try:
        state = train_once()
    finally:
        s3.stop()
    assert state.is_completed(), state
    assert state.state_details.task_run_id
    run_count = _task_run(state.state_details.task_run_id).run_count
    assert run_count == 2  # failed once (no S3), then succeeded
    assert len(state.result().losses) == tcfg.max_steps


def test_a_deterministic_failure_is_not_retried(root: Path, harness) -> None:
    p = load_params(root / "params.yaml")

    @flow
    def bad():
        state = finetune_task(p, "musicgen", "sideways", root, return_state=True)  # unknown mode: a config error
        return {"failed": state.is_failed(), "message": str(state.message), "id": state.state_details.task_run_id}

    out = bad()
    assert out["failed"] and "unknown mode" in out["message"]
    assert _task_run(out["id"]).run_count == 1


def test_the_gpu_tag_limit_serialises_two_finetunes(root: Path, harness) -> None:
    import asyncio

    async def set_limit():
        async with get_client() as client:
            await client.create_concurrency_limit(tag="gpu", concurrency_limit=1)
    asyncio.run(set_limit())
    p = load_params(root / "params.yaml")

    @flow(task_runner=ProcessPoolTaskRunner(max_workers=2))  # GPU jobs are separate processes
    def two():
        a = finetune_task.submit(p, "musicgen", "voice", root)
        b = finetune_task.submit(p, "audioldm", "voice", root)
        return [a.wait() or a.state, b.wait() or b.state]

    try:
        states = two()
        assert all(s.is_completed() for s in states)
        # The work itself: each fine-tune's MLflow run, opened and closed inside the task (another process).
        setup_mlflow(p, root)
        runs = [mlflow.get_run(s.result().run_id).info for s in states]
        (s1, e1), (s2, e2) = sorted((r.start_time, r.end_time) for r in runs)
        assert e1 <= s2, f"the two fine-tunes overlapped: {s1}-{e1} and {s2}-{e2} (ms)"
    finally:
        async def drop():
            async with get_client() as client:
                await client.delete_concurrency_limit_by_tag("gpu")
        asyncio.run(drop())


def _task_run(task_run_id):
    import asyncio

    async def read():
        async with get_client() as client:
            return await client.read_task_run(task_run_id)
    return asyncio.run(read())
