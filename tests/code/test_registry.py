"""Registry and promotion against a real MLflow store (SQLite + local artifacts in a tmp folder)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tasks.evaluation.evaluate import EvalResult, current_test_set
from tasks.evaluation.fad import fad_from_embeddings
from tasks.evaluation.paired import paired_fad_ci, paired_mean_ci
from tasks.registry.gates import Evidence, run_gates
from tasks.registry.promotion import PromotionError, promote, rollback
from tasks.registry.registry import CHALLENGER, CHAMPION, alias_version, audit_history, register, version_tags
from v2m.config import load_params
from v2m.tracking import EXPERIMENTS, experiment_id, setup_mlflow, tracking_uri

ROOT = Path(__file__).resolve().parents[2]


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


N_CHUNKS = 24
LANGS, GENRES = ("en", "fr"), ("pop", "rock")


def write_test_manifest(root: Path) -> list[dict]:
    """A segment manifest whose test split the fake evaluations below claim to have scored."""
    records = [{"chunk_id": f"t{i:02d}_000", "track_id": f"t{i:02d}", "split": "test", "start_s": 0.0, "end_s": 4.0,
                "language": LANGS[i % 2], "genre": GENRES[(i // 2) % 2], "vocals_sha256": f"v{i}",
                "instrumental_sha256": f"i{i}"} for i in range(N_CHUNKS)]
    path = root / "data" / "segments" / "musicgen.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def fake_evaluation(params, root: Path, *, harmonic: float = 0.0, fad_shift: float = 0.0, seed: int = 0,
                    sane: float = 1.0, lang_fr: float = 0.0, override: dict | None = None,
                    backend: str = "musicgen") -> str:
    """An evaluation run as tasks/evaluation/evaluate.py logs one, for a model whose per-chunk harmonic fit is
    the (shared) chunk difficulty + `harmonic` (+ `lang_fr` on French chunks) + a little noise, and whose
    generations sit `fad_shift` away from the references in embedding space (on data/segments/<backend>.jsonl)."""
    records = [json.loads(line) for line in (root / f"data/segments/{backend}.jsonl").read_text().splitlines()]
    difficulty = np.random.default_rng(99).normal(0.4, 0.08, N_CHUNKS)
    noise = np.random.default_rng(seed)
    rows, gen, ref = [], [], []
    for i, r in enumerate(records):
        hf = difficulty[i] + harmonic + (lang_fr if r["language"] == "fr" else 0.0) + noise.normal(0, 0.005)
        rows.append({"chunk_id": r["chunk_id"], "track_id": r["track_id"], "genre": r["genre"],
                     "language": r["language"], "harmonic_fit": hf, "rhythm_fit": 0.3 + noise.normal(0, 0.005),
                     "chroma_cosine": 0.1, "repetition": 0.2, "sanity_pass": float(i < sane * N_CHUNKS)})
        ref.append(np.random.default_rng(1000 + i).normal(0, 1, (6, 4)))
        gen.append(ref[-1] + fad_shift + noise.normal(0, 0.01, (6, 4)))
    metrics = {f"eval/{k}": float(np.mean([row[k] for row in rows])) for k in rows[0] if isinstance(rows[0][k], float)}
    metrics["eval/fad"] = fad_from_embeddings(np.concatenate(gen), np.concatenate(ref))
    metrics = {k: v for k, v in (metrics | (override or {})).items() if v is not None}  # None: not logged
    fingerprint, settings = current_test_set(params, root, backend)
    with mlflow.start_run(experiment_id=experiment_id(EXPERIMENTS["evaluation"], params, root)) as ev:
        mlflow.set_tags({"backend": backend, "test_fingerprint": fingerprint, "eval_settings": settings})
        mlflow.log_metrics(metrics)
        mlflow.log_table({k: [row[k] for row in rows] for k in rows[0]}, "eval/samples.json")
        npz = root / ev.info.run_id / "embeddings.npz"
        npz.parent.mkdir()
        np.savez(npz, **{f"gen_{i}": g for i, g in enumerate(gen)}, **{f"ref_{i}": x for i, x in enumerate(ref)})
        mlflow.log_artifact(str(npz), "eval")
    return ev.info.run_id


@pytest.fixture
def store(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(update={"promotion": params.promotion.model_copy(update={"bootstrap_resamples": 200})})
    setup_mlflow(params, tmp_path)
    write_test_manifest(tmp_path)
    return params, tmp_path


def candidate(params, root: Path, stage: str = "voice", **evaluation) -> str:
    """A finished 'fine-tune' run with a logged model, plus its evaluation run (fake_evaluation); registered."""
    exp = experiment_id(EXPERIMENTS["musicgen"], params, root)
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.set_tags({"backend": "musicgen", "stage": stage, "preset": "tiny", "base_model": "tiny (random init)",
                         "data_version": "dv1", "git_commit": "abc123"})
        mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
    return register(run.info.run_id, "musicgen", eval_run_id=fake_evaluation(params, root, **evaluation))


def test_registration_copies_lineage_tags_and_moves_challenger(store) -> None:
    params, root = store
    v1 = candidate(params, root)
    tags = version_tags("musicgen", v1)
    assert {k: tags[k] for k in ("backend", "stage", "preset", "data_version", "git_commit")} == {
        "backend": "musicgen", "stage": "voice", "preset": "tiny", "data_version": "dv1", "git_commit": "abc123"}
    assert tags["base_model"].startswith("tiny") and tags["eval_run_id"]
    assert tags["test_fingerprint"] == current_test_set(params, root, "musicgen")[0]
    v2 = candidate(params, root, stage="voice_text")
    assert alias_version("musicgen", CHALLENGER) == v2 == "2"


def test_better_is_promoted_worse_is_refused_with_the_gate_named_and_its_interval(store) -> None:
    params, root = store
    v1 = candidate(params, root, fad_shift=0.3)
    first = promote(params, root, "musicgen")
    assert first.promoted and alias_version("musicgen", CHAMPION) == v1
    assert "first_champion" in {g.name for g in first.gates}

    candidate(params, root, fad_shift=0.6, seed=1)  # generations further from the references
    worse = promote(params, root, "musicgen")
    assert not worse.promoted and worse.reason == "failed gates: fad"
    fad = next(g for g in worse.gates if g.name == "fad")
    assert fad.estimate > 0 and fad.low > 0 and fad.n == N_CHUNKS  # worse, and the interval says so
    assert alias_version("musicgen", CHAMPION) == v1  # unchanged
    tags = version_tags("musicgen", worse.version)
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.test_fingerprint"] == current_test_set(params, root, "musicgen")[0]
    assert tags["promotion.champion_eval_run_id"] == version_tags("musicgen", v1)["eval_run_id"]
    assert tags["promotion.challenger_eval_run_id"] == tags["eval_run_id"]
    entry = audit_history(params, root, "musicgen")[-1]
    detail = json.loads(mlflow.artifacts.load_text(f"runs:/{entry['run_id']}/decision.json"))
    assert detail["test_fingerprint"] == tags["promotion.test_fingerprint"]
    assert detail["champion_eval_run_id"] == tags["promotion.champion_eval_run_id"]
    assert {"estimate", "low", "high", "n"} <= set(detail["gates"][0])

    candidate(params, root, fad_shift=0.3, harmonic=-0.05, seed=2)  # harmonic fit drops beyond 0.02
    drop = promote(params, root, "musicgen")
    assert not drop.promoted and "harmonic_fit" in drop.reason
    hf = next(g for g in drop.gates if g.name == "harmonic_fit")
    assert hf.estimate == pytest.approx(-0.05, abs=0.005) and hf.low < -0.02

    candidate(params, root, fad_shift=0.3, lang_fr=-0.35, harmonic=0.25, seed=3)  # French regresses
    regress = promote(params, root, "musicgen")
    assert not regress.promoted and regress.reason == "failed gates: no_group_regression"

    candidate(params, root, fad_shift=0.3, sane=0.9, seed=4)  # some raw outputs are not sane
    insane = promote(params, root, "musicgen")
    assert not insane.promoted and insane.reason == "failed gates: sanity"

    v6 = candidate(params, root, fad_shift=0.2, harmonic=-0.01, seed=5)  # within noise on harmony, better FAD
    better = promote(params, root, "musicgen")
    assert better.promoted and alias_version("musicgen", CHAMPION) == v6
    assert [g.name for g in better.gates if not g.passed] == []
    assert {"same_test_set", "harmonic_fit", "rhythm_fit", "fad", "doubling", "repetition"} <= {
        g.name for g in better.gates}


def test_evaluations_of_different_test_sets_are_never_compared() -> None:
    params = load_params(ROOT / "params.yaml")
    rows = [{"chunk_id": "a", "harmonic_fit": 0.5, "language": "en", "genre": "pop"}]
    a = EvalResult("r1", "musicgen", {}, rows, "fp-new", "s1")
    b = EvalResult("r2", "musicgen", {}, rows, "fp-old", "s1")
    gates = run_gates(Evidence(params.promotion, a, b))
    same = next(g for g in gates if g.name == "same_test_set")
    assert not same.passed and "fp-old" in same.reason
    assert "harmonic_fit" not in {g.name for g in gates}  # nothing is compared across test sets


@pytest.mark.parametrize("bad", [{"eval/fad": math.nan}, {"eval/harmonic_fit": float("inf")},
                                 {"eval/chroma_cosine": None}])
def test_nan_or_missing_metrics_are_refused(store, bad) -> None:
    params, root = store
    candidate(params, root, override=bad)
    d = promote(params, root, "musicgen")
    assert not d.promoted and alias_version("musicgen", CHAMPION) is None
    assert d.reason == "failed gates: complete"


def test_manual_approval_gate_waits(store) -> None:
    params, root = store
    strict = params.model_copy(update={"promotion": params.promotion.model_copy(update={"manual_approval": True})})
    candidate(params, root)
    waiting = promote(strict, root, "musicgen")
    assert not waiting.promoted and waiting.reason == "waiting for: manual_approval"
    assert promote(strict, root, "musicgen", approved=True).promoted


def test_rollback_sticks_until_an_audited_reinstatement(store) -> None:
    params, root = store
    with pytest.raises(PromotionError, match="no champion"):
        rollback(params, root, "musicgen")
    v1 = candidate(params, root, fad_shift=0.3)
    promote(params, root, "musicgen")
    v2 = candidate(params, root, fad_shift=0.1, seed=1)
    promote(params, root, "musicgen")
    assert alias_version("musicgen", CHAMPION) == v2
    assert rollback(params, root, "musicgen") == (v2, v1)
    assert alias_version("musicgen", CHAMPION) == v1
    with pytest.raises(PromotionError, match="never rolled back"):
        promote(params, root, "musicgen", v1, reinstate=True)

    again = promote(params, root, "musicgen", v2)  # what an unchanged retrain or a schedule would do
    assert not again.promoted and again.reason == "failed gates: not_rolled_back"
    assert alias_version("musicgen", CHAMPION) == v1

    back = promote(params, root, "musicgen", v2, reinstate=True)
    assert back.promoted and alias_version("musicgen", CHAMPION) == v2
    assert version_tags("musicgen", v2)["promotion.reinstated"]
    history = [(e["action"], e["champion_before"], e["champion_after"]) for e in audit_history(params, root, "musicgen")]
    assert history == [("promote", "None", v1), ("promote", v1, v2), ("rollback", v2, v1), ("refuse", v1, v1),
                       ("reinstate", v1, v2)]
    assert rollback(params, root, "musicgen") == (v2, v1)  # a reinstatement can be rolled back like a promotion
    with pytest.raises(PromotionError, match="no previous champion"):
        rollback(params, root, "musicgen")


@pytest.mark.parametrize("folders", ["one project folder", "two project folders"])
def test_two_concurrent_promotions_leave_one_champion_and_two_audit_entries(store, folders, tmp_path_factory) -> None:
    """Two processes decide against champion v1, then race for the alias. In two project folders (two hosts
    sharing only the store) no file lock is shared: the registry lease must serialise them."""
    params, root = store
    v1 = candidate(params, root, fad_shift=0.3)
    promote(params, root, "musicgen")
    v2 = candidate(params, root, fad_shift=0.2, seed=1)
    v3 = candidate(params, root, fad_shift=0.1, seed=2)
    script = textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        from v2m.config import load_params
        from v2m.tracking import setup_mlflow
        from tasks.registry.promotion import decide, promote
        root, version = Path.cwd(), sys.argv[1]
        params = load_params({str(ROOT / 'params.yaml')!r})
        params = params.model_copy(update={{"promotion": params.promotion.model_copy(update={{"bootstrap_resamples": 200}})}})
        setup_mlflow(params, root)  # the shared store, from MLFLOW_TRACKING_URI
        d = decide(params, root, "musicgen", version)    # both decide against champion v{v1} ...
        (Path({str(root)!r}) / f"decided-{{version}}").touch()
        while not (Path({str(root)!r}) / "go").exists():  # ... then race for the alias
            time.sleep(0.01)
        d = promote(params, root, "musicgen", decision=d)
        print(json.dumps({{"version": version, "promoted": d.promoted, "reason": d.reason}}))
    """)
    cwds = [root, root] if folders == "one project folder" else [tmp_path_factory.mktemp(f"host-{v}") for v in (v2, v3)]
    for cwd in set(cwds) - {root}:
        (cwd / "data" / "segments").mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / "data" / "segments" / "musicgen.jsonl", cwd / "data" / "segments" / "musicgen.jsonl")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(params, root)}
    procs = [subprocess.Popen([sys.executable, "-c", script, v], cwd=cwd, stdout=subprocess.PIPE, env=env,
                              stderr=subprocess.PIPE, text=True) for v, cwd in zip((v2, v3), cwds)]
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


def test_a_promotion_whose_audit_fails_leaves_the_registry_as_it_was(store, monkeypatch) -> None:
    params, root = store
    v1 = candidate(params, root, fad_shift=0.3)
    promote(params, root, "musicgen")
    v2 = candidate(params, root, fad_shift=0.1, seed=1)
    tags_before, entries_before = version_tags("musicgen", v2), audit_history(params, root, "musicgen")

    def audit_fails(*args, **kwargs):
        raise ConnectionError("the audit experiment could not be written")
    monkeypatch.setattr("tasks.registry.promotion.audit", audit_fails)
    with pytest.raises(ConnectionError):
        promote(params, root, "musicgen", v2)
    assert alias_version("musicgen", CHAMPION) == v1
    assert version_tags("musicgen", v2) == tags_before  # no promotion.* tag claims a decision
    assert audit_history(params, root, "musicgen") == entries_before
    monkeypatch.undo()
    assert promote(params, root, "musicgen", v2).promoted  # and it can simply be run again


def test_paired_intervals_match_their_definitions() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(0.4, 0.1, 40)
    ci = paired_mean_ci(base + 0.05 + rng.normal(0, 0.01, 40), base, resamples=500, seed=0)
    assert ci.n == 40 and ci.low < ci.estimate < ci.high and ci.estimate == pytest.approx(0.05, abs=0.005)
    assert ci.high - ci.low < 0.02  # the chunks' own spread (0.1) cancels in the pairs
    # the bootstrap FAD on all chunks is the plain FAD of the pooled windows, for both models
    ref = [rng.normal(0, 1, (5, 4)) for _ in range(12)]
    near, far = [r + 0.1 for r in ref], [r + 1.0 for r in ref]
    fad_ci = paired_fad_ci(far, near, ref, resamples=100, seed=0)
    want = fad_from_embeddings(np.concatenate(far), np.concatenate(ref)) - fad_from_embeddings(
        np.concatenate(near), np.concatenate(ref))
    assert fad_ci.estimate == pytest.approx(want, rel=1e-6) and 0 < fad_ci.low <= fad_ci.high and fad_ci.n == 12


def test_cli_prints_each_gate_and_reinstates_only_on_request(store) -> None:
    from typer.testing import CliRunner

    from v2m.cli import app
    params, root = store
    text = (ROOT / "params.yaml").read_text().replace("bootstrap_resamples: 1000", "bootstrap_resamples: 100")
    (root / "params.yaml").write_text(text)
    cli = CliRunner()
    v1 = candidate(params, root, fad_shift=0.3)
    assert cli.invoke(app, ["promote", "--backend", "musicgen"]).exit_code == 0
    v2 = candidate(params, root, fad_shift=0.1, seed=1)
    out = cli.invoke(app, ["promote", "--backend", "musicgen"])
    assert out.exit_code == 0, out.output
    assert f"promoted v{v2}" in out.output and "test set " in out.output
    assert "PASS    harmonic_fit: " in out.output and f"n={N_CHUNKS}" in out.output  # estimate [interval] n
    assert cli.invoke(app, ["rollback", "--backend", "musicgen"]).exit_code == 0
    again = cli.invoke(app, ["promote", "--backend", "musicgen", "--version", v2])
    assert again.exit_code == 1 and "FAIL    not_rolled_back" in again.output
    back = cli.invoke(app, ["promote", "--backend", "musicgen", "--version", v2, "--reinstate"])
    assert back.exit_code == 0 and alias_version("musicgen", CHAMPION) == v2
    wrong = cli.invoke(app, ["promote", "--backend", "musicgen", "--version", v1, "--reinstate"])
    assert wrong.exit_code == 1 and "never rolled back" in wrong.output
