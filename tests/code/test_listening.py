"""The listening test's parts without models: statistics against independent computations, the vote store,
the JSON API's refusals, and the human_preference gate in `promote` against a real MLflow registry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from scipy.optimize import minimize
from scipy.stats import binomtest

from tasks.listening.app import create_app, create_router, not_ready
from tasks.listening.clips import ListeningSet, mix
from tasks.listening.lazy import BackgroundListeningSet, NotReady
from tasks.listening.stats import agreement, bradley_terry, summarize, wilson, win_rate
from tasks.listening.store import VoteError, VoteStore
from tasks.registry.promotion import promote
from tasks.registry.registry import CHAMPION, alias_version, version_tags
from tests.code.test_registry import candidate, store  # noqa: F401 (a fixture)
from v2m.audio import write_wav
from v2m.config import ConfigError, load_params
from v2m.tracking import setup_mlflow

ROOT = Path(__file__).resolve().parents[2]
X, Y = "voice2music-musicgen/2", "voice2music-musicgen/1"


def v(winner: str, a: str = X, b: str = Y, chunk: str = "c0", listener: str = "ann", genre: str = "pop",
      language: str = "en") -> dict:
    return {"model_a": a, "model_b": b, "winner": winner, "chunk_id": chunk, "listener": listener,
            "genre": genre, "language": language}


@pytest.mark.parametrize("k,n", [(8, 10), (0, 7), (30, 30), (13, 40)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n, 0.95) == pytest.approx((ci.low, ci.high), abs=1e-9)
    ci90 = binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
    assert wilson(k, n, 0.9) == pytest.approx((ci90.low, ci90.high), abs=1e-9)


def test_win_rate_counts_no_preference_as_half_and_ignores_other_pairs() -> None:
    votes = [v(X), v(X, a=Y, b=X), v(Y), v(""), v("Z", a="Z", b=Y)]
    r = win_rate(votes, X)
    assert (r["n"], r["wins"], r["losses"], r["ties"]) == (4, 2, 1, 1)
    assert r["win_rate"] == 2.5 / 4 and (r["ci_low"], r["ci_high"]) == wilson(2.5, 4)


def test_agreement_by_hand() -> None:
    # vocal c0: three listeners all prefer X; c1: two prefer X, one Y; c2 heard once (not counted).
    votes = [v(X, chunk="c0", listener=n) for n in "abc"] + [v(X, chunk="c1", listener="a"),
             v(X, a=Y, b=X, chunk="c1", listener="b"), v(Y, chunk="c1", listener="c"), v(Y, chunk="c2")]
    got = agreement(votes, X)
    # P_i: 1 and (2*1 + 0 ... ) = (4 + 1 - 3) / 6; categories over the 6 answers: 5 wins, 1 loss.
    observed = (1 + 2 / 6) / 2
    expected = (5 / 6) ** 2 + (1 / 6) ** 2
    assert got["items"] == 2 and got["pairwise"] == pytest.approx(observed)
    assert got["kappa"] == pytest.approx((observed - expected) / (1 - expected))
    assert math.isnan(agreement([v(X)], X)["kappa"])


def test_bradley_terry_matches_a_direct_likelihood_fit() -> None:
    rng = np.random.default_rng(0)
    true = {"m1": 0.5, "m2": 0.3, "m3": 0.2}
    votes = []
    for a, b in [("m1", "m2"), ("m2", "m3"), ("m1", "m3")] * 30:
        r = rng.random()
        p = true[a] / (true[a] + true[b])
        votes.append(v(a if r < p * 0.9 else b if r < 0.9 else "", a=a, b=b))
    got = bradley_terry(votes)
    models = sorted(true)

    def nll(theta):  # ties as half a win each, the same convention
        s = dict(zip(models, np.exp(theta)))
        total = 0.0
        for x in votes:
            pa = s[x["model_a"]] / (s[x["model_a"]] + s[x["model_b"]])
            wa = 1.0 if x["winner"] == x["model_a"] else 0.0 if x["winner"] else 0.5
            total -= wa * np.log(pa) + (1 - wa) * np.log(1 - pa)
        return total

    theta = minimize(nll, np.zeros(3), method="BFGS").x
    direct = np.exp(theta) / np.exp(theta).sum()
    assert [got[m] for m in models] == pytest.approx(list(direct), abs=1e-4)
    two = bradley_terry([v(X), v(X), v(Y), v("")])  # two models: P(X over Y) is the win rate
    assert two[X] / (two[X] + two[Y]) == pytest.approx(2.5 / 4, abs=1e-6)
    assert "bradley_terry" in summarize(votes + [v(X)], X, Y) and "bradley_terry" not in summarize([v(X)], X, Y)


def test_summary_breaks_down_by_genre_and_language() -> None:
    votes = [v(X, genre="pop", language="en"), v(Y, genre="rock", language="en", chunk="c1"),
             v(X, genre="rock", language="fr", chunk="c2")]
    s = summarize(votes, X, Y)
    assert {g: r["n"] for g, r in s["genre"].items()} == {"pop": 1, "rock": 2}
    assert s["language"]["en"]["win_rate"] == 0.5 and s["language"]["fr"]["wins"] == 1


def test_store_trials_are_counterbalanced_kept_and_votes_idempotent(tmp_path: Path) -> None:
    chunks = [{"chunk_id": f"c{i}", "genre": "pop", "language": "en"} for i in range(6)]
    store = VoteStore(tmp_path / "votes.db")
    trials = store.trials_for("ann", "musicgen", (X, Y), chunks)
    assert [t["chunk_id"] for t in trials] == [c["chunk_id"] for c in chunks]
    assert sum(t["model_a"] == X for t in trials) == 3  # each model is A in half the trials
    again = VoteStore(tmp_path / "votes.db").trials_for("ann", "musicgen", (Y, X), chunks)  # a restart, either order
    assert [(t["trial_id"], t["model_a"]) for t in again] == [(t["trial_id"], t["model_a"]) for t in trials]

    row, new = store.vote("id1", trials[0]["trial_id"], "ann", "A", 5, None)
    assert new and row["winner"] == trials[0]["model_a"] and row["rating_a"] == 5
    assert store.vote("id1", trials[0]["trial_id"], "ann", "A", 5, None) == (row, False)
    for bad, match in [(("id2", trials[0]["trial_id"], "ann", "B"), "already answered"),
                       (("id1", trials[0]["trial_id"], "ann", "B"), "other content"),
                       (("id3", trials[1]["trial_id"], "bob", "A"), "another listener"),
                       (("id4", trials[1]["trial_id"], "ann", "C"), "answer must be"),
                       (("id5", "nope", "ann", "A"), "unknown trial")]:
        with pytest.raises(VoteError, match=match):
            store.vote(*bad)
    with pytest.raises(VoteError, match="rating_b"):
        store.vote("id6", trials[1]["trial_id"], "ann", "none", None, 6)
    assert len(VoteStore(tmp_path / "votes.db").votes("musicgen", (Y, X))) == 1


def test_api_refuses_bad_votes_and_trusts_the_auth_header(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = load_params(ROOT / "params.yaml")
    setup_mlflow(p, tmp_path)  # votes are recorded on registered versions; these two are not registered
    chunks = [{"chunk_id": f"c{i}", "genre": "pop", "language": "en"} for i in range(2)]
    ls = ListeningSet("musicgen", (X, Y), {X: "challenger", Y: "champion"}, chunks)
    for i, model in enumerate((X, Y)):
        for c in chunks:
            path = tmp_path / f"{i}-{c['chunk_id']}.wav"
            write_wav(path, np.full(800, 0.1 * (i + 1), np.float32), 8000)
            ls.clips[(model, c["chunk_id"])] = path
    client = TestClient(create_app(p, tmp_path, ls))
    assert client.post("/listen/api/session", json={"listener": " "}).status_code == 400
    s = client.post("/listen/api/session", json={"listener": "typed"}, headers={"X-Forwarded-User": "carol"}).json()
    assert s["listener"] == "carol" and s["total"] == 2
    trial = s["trials"][0]["trial_id"]
    a = client.get(f"/listen/audio/{trial}/A")
    assert a.status_code == 200 and a.headers["content-type"] == "audio/wav" and a.content[:4] == b"RIFF"
    assert client.get(f"/listen/audio/{trial}/C").status_code == 404
    assert client.get("/listen/audio/unknown/A").json()["error"] == "not_found"
    body = {"vote_id": "v1", "trial_id": trial, "listener": "carol", "answer": "A"}
    assert client.post("/listen/api/votes", json={**body, "answer": "maybe"}).status_code == 400
    missing = client.post("/listen/api/votes", json={"answer": "A"})
    assert missing.status_code == 422 and "vote_id" in missing.json()["detail"]
    assert client.post("/listen/api/votes", json={**body, "listener": "mallory"}).status_code == 400
    res = client.post("/listen/api/votes", json={**body, "listener": "x"}, headers={"X-Forwarded-User": "carol"})
    assert res.status_code == 200 and res.json()["stored"] is True  # the header, not the typed name, says who
    dup = client.post("/listen/api/votes", json={**body, "vote_id": "v2"}, headers={"X-Forwarded-User": "carol"})
    assert dup.status_code == 409 and dup.json()["error"] == "conflict"
    r = client.get("/listen/api/results").json()
    assert r["n"] == 1 and r["roles"][X] == "challenger" and r["agreement"]["kappa"] is None  # NaN -> null


def test_a_mounted_router_answers_503_until_its_clips_are_ready_and_says_why(store) -> None:  # noqa: F811
    params, root = store  # an empty registry: no challenger and champion to compare
    source = BackgroundListeningSet(params, root, "musicgen", recheck_s=3600)
    app = FastAPI()
    app.include_router(create_router(params, root, source), prefix="/listen")
    app.add_exception_handler(NotReady, not_ready)
    client = TestClient(app)
    assert client.get("/listen").status_code == 200  # the page itself is always there
    first = client.get("/listen/api/results")
    assert first.status_code == 503 and "preparing" in first.json()["detail"]
    source.wait()
    then = client.post("/listen/api/session", json={"listener": "ann"})
    assert then.status_code == 503 and "needs a challenger and a different champion" in then.json()["detail"]


def test_mix_levels_both_stems_and_never_clips() -> None:
    sr = 8000
    t = np.arange(sr) / sr
    vocal, loud = 0.01 * np.sin(2 * np.pi * 440 * t), 0.9 * np.sign(np.sin(2 * np.pi * 110 * t))
    out = mix(vocal.astype(np.float32), sr, loud.astype(np.float32), sr)
    assert len(out) == sr and np.max(np.abs(out)) <= 0.89 + 1e-6
    silent = mix(vocal.astype(np.float32), sr, np.zeros(sr, np.float32), sr)
    assert np.sqrt(np.mean(silent ** 2)) == pytest.approx(0.1, rel=1e-3)


def test_config_names_the_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("promotion:\n  human_preference:\n    min_lower_bound: 1.5\n")
    with pytest.raises(ConfigError, match="promotion.human_preference.min_lower_bound"):
        load_params(bad)
    bad.write_text("listening:\n  max_chunk: 3\n")
    with pytest.raises(ConfigError, match="listening.max_chunk: unknown key"):
        load_params(bad)


def cast(root: Path, challenger: str, champion: str, outcomes: list[str]) -> None:
    """Votes as the page would store them: one listener per outcome on one vocal."""
    store = VoteStore(root / ".v2m" / "listening.db")
    x, y = f"voice2music-musicgen/{challenger}", f"voice2music-musicgen/{champion}"
    for i, o in enumerate(outcomes):
        t = store.trials_for(f"listener{i}", "musicgen", (x, y), [{"chunk_id": "c0"}])[0]
        answer = "none" if o == "tie" else "A" if (t["model_a"] == x) == (o == "win") else "B"
        store.vote(f"{challenger}-{i}", t["trial_id"], f"listener{i}", answer)  # re-sent votes are not new


def gate_status(d) -> str:
    return next(g.status for g in d.gates if g.name == "human_preference")


def test_human_preference_gate_waits_then_passes_or_refuses(store) -> None:  # noqa: F811
    params, root = store
    hp = params.promotion.human_preference.model_copy(update={"required": True, "min_votes": 10})
    strict = params.model_copy(update={"promotion": params.promotion.model_copy(update={"human_preference": hp})})
    v1 = candidate(params, root)
    assert promote(strict, root, "musicgen").promoted  # the first champion has no one to be compared with
    v2 = candidate(params, root)
    cast(root, v2, v1, ["win"] * 5)
    d = promote(strict, root, "musicgen")
    gate = next(g for g in d.gates if g.name == "human_preference")
    assert not d.promoted and d.waiting and gate.status == "waiting" and "5 of 10 votes" in gate.reason
    assert "waiting" in d.reason and version_tags("musicgen", v2)["promotion.decision"] == "waiting"

    cast(root, v2, v1, ["win"] * 5 + ["loss"] * 4 + ["tie"] * 2)  # 6 more listeners: 11 votes, 6 / 11 wins
    d = promote(strict, root, "musicgen")
    assert not d.promoted and gate_status(d) == "fail" and "human_preference" in d.reason  # 0.28 < 0.5
    assert alias_version("musicgen", CHAMPION) == v1

    v3 = candidate(params, root)
    cast(root, v3, v1, ["win"] * 10 + ["tie"])
    d = promote(strict, root, "musicgen")
    assert d.promoted and alias_version("musicgen", CHAMPION) == v3
