"""One job per GPU, many GPUs per host: a gpu-a40 worker started with two (fake) GPU ids runs two fine-tunes at
once, each pinned to its own CUDA_VISIBLE_DEVICES, and a third one waits until a GPU is free.
Real Prefect server and worker (in its own empty folder), real MLflow server, real S3; credentials required."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from flows.steps import finetune_flow

REPO = Path(__file__).resolve().parents[2]


def test_two_fine_tunes_share_a_two_gpu_host_one_gpu_each_and_a_third_waits(team_servers, root: Path, tmp_path,
                                                                             monkeypatch) -> None:
    st = team_servers(gpus=2)
    for k, v in st.client_env("cpu").items():
        monkeypatch.setenv(k, v)
    st.worker("gpu-a40", tmp_path / "gpu-host", gpu_ids=["0", "1"])

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import (PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK,
                                  temporary_settings)
    env = st.client_env("cpu")
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"],
                                     PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"],
                                     PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"]}):
        # A project folder with code and data stands in for both here; test_team_e2e.py covers git and DVC.
        for part in ("v2m", "tasks", "flows", "models"):
            shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
        finetune_flow.from_source(source=str(root), entrypoint="flows/steps.py:finetune_flow").deploy(
            name="finetune", work_pool_name="gpu-a40", job_variables={"device": "cpu"})
        runs = [run_deployment("finetune/finetune", timeout=0, parameters={
            "backend": "musicgen", "mode": "voice", "max_steps": steps}) for steps in (2, 3, 4)]

        async def wait_all():
            async with get_client() as client:
                while True:
                    done = [await client.read_flow_run(r.id) for r in runs]
                    if all(d.state.is_final() for d in done):
                        return done
                    await asyncio.sleep(2)

        done = asyncio.run(asyncio.wait_for(wait_all(), 900))
        log = (st.state_dir / "logs" / "worker-gpu-a40-gpu-host.log").read_text()[-3000:]
        assert all(d.state.is_completed() for d in done), ([d.state for d in done], log)
        results = [d.state.result() for d in done]

    spans = sorted((d.start_time, d.end_time, r["gpu"]) for d, r in zip(done, results))
    (s1, e1, g1), (s2, e2, g2), (s3, _, g3) = spans
    assert s2 < e1, "the first two fine-tunes did not run at the same time"
    assert {g1, g2} == {"0", "1"}, spans  # one GPU each
    assert s3 >= min(e1, e2), "a third fine-tune started while both GPUs were busy"
    assert g3 in ("0", "1")
    assert len({r["run_id"] for r in results}) == 3
