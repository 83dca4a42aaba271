"""`v2m retrain` (what `make demo` ends with): the champions and report paths are the last lines, the full result
goes to a file instead of hundreds of lines of JSON after them, and MLflow's progress bars stay off in a log."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import flows.retrain
from v2m.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_the_last_lines_are_the_champions_and_their_reports(tmp_path: Path, monkeypatch) -> None:
    steps = [{"mode": m, "gates": {f"gate_{i}": "pass" for i in range(12)}, "reason": "x" * 50} for m in "abc"]
    result = {"data_version": "abc123", "backends": {
        "musicgen": {"champion": "3", "report": "/p/.v2m/reports/compare-1/index.html", "steps": steps},
        "audioldm": {"champion": "2", "report": "/p/.v2m/reports/compare-2/index.html", "steps": steps}}}
    monkeypatch.setattr(flows.retrain, "retrain", lambda **_: result)  # the flow is not what is tested here
    monkeypatch.chdir(tmp_path)
    prefect_logger = logging.getLogger("prefect")
    level = prefect_logger.level
    try:
        res = CliRunner().invoke(app, ["retrain", "--params", str(ROOT / "params.yaml")])
        assert prefect_logger.level == logging.WARNING  # the temporary server's "Stopping" at exit: not printed
    finally:
        prefect_logger.setLevel(level)
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[-2:] == ["musicgen: champion v3; report /p/.v2m/reports/compare-1/index.html",
                          "audioldm: champion v2; report /p/.v2m/reports/compare-2/index.html"]
    assert len(lines) <= 4 and "{" not in res.output  # no JSON on screen ...
    assert json.loads((tmp_path / ".v2m" / "retrain-summary.json").read_text()) == result  # ... it is in a file


def test_mlflow_and_transformers_progress_bars_are_off_when_not_a_terminal() -> None:
    code = "import v2m, os; from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as V; " \
           "from transformers.utils import logging; print(V.get(), logging.is_progress_bar_enabled())"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
                                                            "HF_HUB_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"], out.stderr  # stderr is a pipe here, as in `make demo > log`
    env.update(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="true", HF_HUB_DISABLE_PROGRESS_BARS="0")  # explicit wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.stdout.split() == ["True", "True"]
