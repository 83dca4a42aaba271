"""Gates that trivial outputs cannot pass: with the true accompaniment of 20 rendered chorales as champion,
a tonic-triad drone, the vocal itself, white noise, silence and one bar looped are each refused, by the gate
tasks/registry/gates.py names for it, and that gate's metric is worse on every chorale. Run with -s for the
margins (the closing note of issue 11 quotes them)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.evaluation.evaluate import EvalResult
from tasks.evaluation.fad import MelStatsEmbedder
from tasks.evaluation.harmony import analyse, chroma_cosine, harmonic_fit
from tasks.evaluation.metrics import sanity
from tasks.evaluation.rhythm import repetition, rhythm_fit
from tasks.registry.gates import Evidence, run_gates
from tests.conftest import ROOT
from tests.model.conftest import CHORALE_SR, N_CHORALES, trivial_outputs
from v2m.config import load_params

SR = CHORALE_SR
CLIP_S = 10.0  # the first 10 s of each chorale: enough for every measure, half the analysis time
# trivial output -> (the gate that stops it, its per-chunk metric, whether higher is better)
CAUGHT_BY = {"drone": ("rhythm_fit", "rhythm_fit", True), "doubling": ("doubling", "chroma_cosine", False),
             "noise": ("harmonic_fit", "harmonic_fit", True), "silence": ("sanity", "sanity_pass", True),
             "loop": ("repetition", "repetition", False)}


def scored(name: str, chorales: list[dict], outputs: list[np.ndarray]) -> EvalResult:
    """What evaluate() would record for a 'model' whose outputs these are, on the chorales as test set."""
    emb, rows, gen, ref = MelStatsEmbedder(), [], [], []
    for c, out in zip(chorales, outputs):
        v, a = c["analysed"], analyse(out, SR)
        rows.append({"chunk_id": c["name"], "language": "de", "genre": "chorale", "harmonic_fit": harmonic_fit(v, a),
                     "chroma_cosine": chroma_cosine(v, a), "rhythm_fit": rhythm_fit(c["vocal"], out, SR),
                     "repetition": repetition(a), "sanity_pass": sanity(out, SR)["sanity_pass"]})
        gen.append(emb.embed(out, SR))
        ref.append(emb.embed(c["true"], SR))
    metrics = {f"eval/{k}": float(np.nanmean([r[k] for r in rows])) for k in rows[0] if k not in (
        "chunk_id", "language", "genre")}
    metrics["eval/fad"] = 0.0 if name == "true" else 1.0  # only the bootstrap FAD gate reads embeddings
    return EvalResult(f"run-{name}", "musicgen", metrics, rows, "chorales", "same", gen, ref)


@pytest.fixture(scope="module")
def evaluations(chorale_renders) -> dict[str, EvalResult]:
    n = int(CLIP_S * SR)
    chorales = [{k: v[:n] if isinstance(v, np.ndarray) else v for k, v in c.items()}
                for c in chorale_renders[:N_CHORALES]]
    for c in chorales:
        c["analysed"] = analyse(c["vocal"], SR)
    outputs = [trivial_outputs(c) for c in chorales]
    out = {"true": scored("true", chorales, [c["true"] for c in chorales])}
    for name in CAUGHT_BY:
        out[name] = scored(name, chorales, [o[name] for o in outputs])
    return out


def test_each_trivial_output_fails_the_gate_chosen_for_it(evaluations) -> None:
    p = load_params(ROOT / "params.yaml")
    cfg = p.promotion.model_copy(update={"bootstrap_resamples": 300})
    champion = evaluations["true"]
    control = run_gates(Evidence(cfg, champion, champion))
    assert all(g.passed for g in control), [g.line() for g in control if not g.passed]
    print(f"\nchallengers vs the true accompaniment as champion, {N_CHORALES} rendered chorales:")
    for name, (gate, metric, higher) in CAUGHT_BY.items():
        ch = evaluations[name]
        gates = {g.name: g for g in run_gates(Evidence(cfg, ch, champion))}
        print(f"  {name}: refused by " + ", ".join(n for n, g in gates.items() if not g.passed))
        for g in gates.values():
            if g.estimate is not None:
                print(f"      {g.line()}")
        assert not gates[gate].passed, (name, gates[gate].line())
        champ = np.array([r[metric] for r in champion.rows])
        mine = np.array([r[metric] for r in ch.rows])
        worse = int(np.sum(mine < champ) if higher else np.sum(mine > champ))
        print(f"      {metric} worse than the true accompaniment's on {worse}/{N_CHORALES} chorales "
              f"({np.nanmean(mine):+.3f} vs {np.nanmean(champ):+.3f})")
        assert worse == N_CHORALES, (name, metric, worse)
