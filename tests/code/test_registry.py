"""Registry and promotion against a real MLflow store (SQLite + local artifacts in a tmp folder)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from tasks.registry.promotion import PromotionError, promote, rollback
from tasks.registry.registry import CHALLENGER, CHAMPION, alias_version, audit_history, register, version_tags
from v2m.config import load_params
from v2m.tracking import EXPERIMENTS, experiment_id, setup_mlflow

ROOT = Path(__file__).resolve().parents[2]


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


GOOD = {"eval/fad": 10.0, "eval/harmonic_fit": 0.40, "eval/chroma_cosine": 0.3, "eval/sanity_pass": 1.0,
        "eval/lang/en/harmonic_fit": 0.41, "eval/lang/fr/harmonic_fit": 0.39, "eval/genre/pop/harmonic_fit": 0.4}


@pytest.fixture
def store(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(ROOT / "params.yaml")
    setup_mlflow(params, tmp_path)
    return params, tmp_path


def candidate(params, root: Path, metrics: dict[str, float], stage: str = "voice") -> str:
    """A finished 'fine-tune' run with a logged model, plus its evaluation run; registered."""
    exp = experiment_id(EXPERIMENTS["musicgen"], params, root)
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.set_tags({"backend": "musicgen", "stage": stage, "preset": "tiny", "base_model": "tiny (random init)",
                         "data_version": "dv1", "git_commit": "abc123"})
        mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
    with mlflow.start_run(experiment_id=experiment_id(EXPERIMENTS["evaluation"], params, root)) as ev:
        mlflow.log_metrics(metrics)
    return register(run.info.run_id, "musicgen", eval_run_id=ev.info.run_id)


def test_registration_copies_lineage_tags_and_moves_challenger(store) -> None:
    params, root = store
    v1 = candidate(params, root, GOOD)
    tags = version_tags("musicgen", v1)
    assert {k: tags[k] for k in ("backend", "stage", "preset", "data_version", "git_commit")} == {
        "backend": "musicgen", "stage": "voice", "preset": "tiny", "data_version": "dv1", "git_commit": "abc123"}
    assert tags["base_model"].startswith("tiny") and tags["eval_run_id"]
    v2 = candidate(params, root, GOOD, stage="voice_text")
    assert alias_version("musicgen", CHALLENGER) == v2 == "2"


def test_better_is_promoted_worse_is_refused_with_the_gate_named(store) -> None:
    params, root = store
    v1 = candidate(params, root, GOOD)
    first = promote(params, root, "musicgen")
    assert first.promoted and alias_version("musicgen", CHAMPION) == v1

    candidate(params, root, {**GOOD, "eval/fad": 12.0})  # worse FAD
    worse = promote(params, root, "musicgen")
    assert not worse.promoted and "fad" in worse.reason
    assert alias_version("musicgen", CHAMPION) == v1  # unchanged
    assert version_tags("musicgen", worse.version)["promotion.decision"] == "refused"

    candidate(params, root, {**GOOD, "eval/lang/fr/harmonic_fit": 0.20, "eval/fad": 8.0})  # a language regresses
    regress = promote(params, root, "musicgen")
    assert not regress.promoted and "no_group_regression" in regress.reason

    v4 = candidate(params, root, {**GOOD, "eval/fad": 8.0, "eval/harmonic_fit": 0.41})
    better = promote(params, root, "musicgen")
    assert better.promoted and alias_version("musicgen", CHAMPION) == v4
    assert [g.name for g in better.gates if not g.passed] == []


@pytest.mark.parametrize("bad", [{"eval/fad": math.nan}, {"eval/harmonic_fit": float("inf")}])
def test_nan_or_missing_metrics_are_refused(store, bad) -> None:
    params, root = store
    candidate(params, root, {**GOOD, **bad})
    d = promote(params, root, "musicgen")
    assert not d.promoted and alias_version("musicgen", CHAMPION) is None
    assert {"no_nan", "metrics_present"} & {g.name for g in d.gates if not g.passed}

    missing = {k: v for k, v in GOOD.items() if k != "eval/chroma_cosine"}
    candidate(params, root, missing)
    d = promote(params, root, "musicgen")
    assert not d.promoted and "metrics_present" in d.reason


def test_manual_approval_gate(store) -> None:
    params, root = store
    strict = params.model_copy(update={"promotion": params.promotion.model_copy(update={"manual_approval": True})})
    candidate(params, root, GOOD)
    assert not promote(strict, root, "musicgen").promoted
    assert promote(strict, root, "musicgen", approved=True).promoted


def test_rollback_restores_the_previous_champion_and_the_audit_says_when(store) -> None:
    params, root = store
    with pytest.raises(PromotionError, match="no champion"):
        rollback(params, root, "musicgen")
    v1 = candidate(params, root, GOOD)
    promote(params, root, "musicgen")
    v2 = candidate(params, root, {**GOOD, "eval/fad": 5.0})
    promote(params, root, "musicgen")
    assert alias_version("musicgen", CHAMPION) == v2
    assert rollback(params, root, "musicgen") == (v2, v1)
    assert alias_version("musicgen", CHAMPION) == v1
    history = [(e["action"], e["champion_before"], e["champion_after"]) for e in audit_history(params, root, "musicgen")]
    assert history == [("promote", "None", v1), ("promote", v1, v2), ("rollback", v2, v1)]
    with pytest.raises(PromotionError, match="no previous champion"):
        rollback(params, root, "musicgen")


def test_two_concurrent_promotions_leave_one_champion_and_two_audit_entries(store) -> None:
    params, root = store
    v1 = candidate(params, root, GOOD)
    promote(params, root, "musicgen")
    v2 = candidate(params, root, {**GOOD, "eval/fad": 7.0})
    v3 = candidate(params, root, {**GOOD, "eval/fad": 6.0})
    script = textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        from v2m.config import load_params
        from v2m.tracking import setup_mlflow
        from tasks.registry.promotion import decide, promote
        root, version = Path({str(root)!r}), sys.argv[1]
        params = load_params({str(ROOT / 'params.yaml')!r})
        setup_mlflow(params, root)
        d = decide(params, "musicgen", version)          # both decide against champion v{v1} ...
        (root / f"decided-{{version}}").touch()
        while not (root / "go").exists():                 # ... then race for the alias
            time.sleep(0.01)
        d = promote(params, root, "musicgen", decision=d)
        print(json.dumps({{"version": version, "promoted": d.promoted, "reason": d.reason}}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, v], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for v in (v2, v3)]
    deadline = time.monotonic() + 120
    while not all((root / f"decided-{v}").exists() for v in (v2, v3)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.stderr.read() for p in procs if p.poll() is not None]
        time.sleep(0.05)
    (root / "go").touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    winners = [o for o in outs if o["promoted"]]
    assert len(winners) == 1
    loser = next(o for o in outs if not o["promoted"])
    assert "champion changed" in loser["reason"]
    assert alias_version("musicgen", CHAMPION) == winners[0]["version"]
    entries = audit_history(params, root, "musicgen")[1:]  # after the first promotion of v1
    assert sorted(e["action"] for e in entries) == ["promote", "refuse"]
