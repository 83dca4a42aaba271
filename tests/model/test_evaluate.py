"""The evaluation task on the tiny presets: what it logs, breakdowns that add up, and the registry link."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tasks.evaluation.evaluate import evaluate
from tasks.registry.registry import register, version_tags
from tasks.training.finetune import finetune
from v2m.config import load_params


@pytest.mark.parametrize("backend", ["musicgen", "audioldm"])
def test_baseline_run_logs_metrics_table_audio_and_breakdowns_that_add_up(root: Path, backend: str) -> None:
    p = load_params(root / "params.yaml")
    res = evaluate(p, root, f"base:{backend}")
    test_chunks = [json.loads(line) for line in (root / f"data/segments/{backend}.jsonl").read_text().splitlines()]
    test_chunks = [c for c in test_chunks if c["split"] == "test"]
    assert len(res.rows) == len(test_chunks) > 0

    run = mlflow.get_run(res.run_id)
    assert run.data.tags["baseline"] == "true" and run.data.tags["backend"] == backend
    for name in ("eval/harmonic_fit", "eval/chroma_cosine", "eval/fad", "eval/sanity_pass", "eval/tempo_agreement"):
        assert name in run.data.metrics, name
    assert np.isfinite(run.data.metrics["eval/fad"]) and run.data.metrics["eval/fad"] >= 0
    client = MlflowClient()
    table = json.loads(Path(client.download_artifacts(res.run_id, "eval/samples.json")).read_text())
    assert len(table["data"]) == len(test_chunks) and "harmonic_fit" in table["columns"]
    audio = {a.path.split("/")[-1].rsplit("_", 1)[1] for a in client.list_artifacts(res.run_id, "audio")}
    assert audio == {"vocal.wav", "reference.wav", "output.wav"}

    # Breakdowns: count-weighted means of the groups give the aggregate back, per language and per genre.
    for label in ("lang", "genre"):
        groups = {k.split("/")[2] for k in res.metrics if k.startswith(f"eval/{label}/")}
        assert groups
        for metric in ("harmonic_fit", "chroma_cosine", "sanity_pass", "clipping"):
            n = np.array([res.metrics[f"eval/{label}/{g}/n"] for g in sorted(groups)])
            v = np.array([res.metrics[f"eval/{label}/{g}/{metric}"] for g in sorted(groups)])
            assert n.sum() == len(res.rows)
            assert (n * v).sum() / n.sum() == pytest.approx(res.metrics[f"eval/{metric}"], abs=1e-9), (label, metric)


def test_a_registered_version_gets_its_eval_run_and_mode(root: Path) -> None:
    p = load_params(root / "params.yaml")
    ft = finetune(p, "musicgen", "voice", root)
    version = register(ft.run_id, "musicgen")
    res = evaluate(p, root, "voice2music-musicgen@challenger")
    assert version_tags("musicgen", version)["eval_run_id"] == res.run_id
    tags = mlflow.get_run(res.run_id).data.tags
    assert (tags["mode"], tags["model_version"], tags["baseline"]) == ("voice", version, "false")
    assert all(r["prompt"] == "" for r in res.rows)  # a voice-only model is evaluated without prompts

    # Production names no file: promote, then generate from the registry alias.
    from tasks.registry.promotion import promote
    assert promote(p, root, "musicgen").promoted
    from typer.testing import CliRunner

    from v2m.cli import app
    vocal = Path(json.loads((root / "data/segments/musicgen.jsonl").read_text().splitlines()[0])["vocals_path"])
    out = CliRunner().invoke(app, ["generate", "--model", "voice2music-musicgen@champion", "--vocal", str(vocal),
                                   "--duration", "1", "-o", str(root / "from-registry.wav")])
    assert out.exit_code == 0, out.output
    import soundfile as sf
    audio, sr = sf.read(root / "from-registry.wav")
    assert sr == 32000 and len(audio) == 32000
