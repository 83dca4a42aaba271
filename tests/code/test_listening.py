"""The listening test's parts without models: statistics against independent computations, the vote store,
the JSON API's refusals, and the human_preference gate in `promote` against a real MLflow registry."""

from __future__ import annotations

import io
import math
import os
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
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


def test_one_listener_weighs_at_most_the_cap() -> None:
    votes = [v(X, chunk=f"c{i}", listener="keen") for i in range(20)] + [v(Y, listener="a"),
                                                                         v(Y, listener="b", chunk="c1")]
    s = summarize(votes, X, Y, 0.95, max_per_listener=5)
    assert (s["n"], s["wins"], s["listeners"]) == (22, 20, 3) and s["weight"] == pytest.approx(7)
    assert s["win_rate"] == pytest.approx(5 / 7) and (s["ci_low"], s["ci_high"]) == pytest.approx(wilson(5, 7))
    assert summarize(votes, X, Y)["win_rate"] == pytest.approx(20 / 22)  # without the cap


def test_the_gate_waits_for_enough_people_not_just_enough_votes(tmp_path: Path) -> None:
    from tasks.listening.gate import human_preference
    p = load_params(ROOT / "params.yaml")
    hp = p.promotion.human_preference.model_copy(update={"min_votes": 6, "min_listeners": 3,
                                                         "max_votes_per_listener": 100})
    p = p.model_copy(update={"promotion": p.promotion.model_copy(update={"human_preference": hp})})
    store = VoteStore(tmp_path / p.listening.db)
    chunks = [{"chunk_id": f"c{i}"} for i in range(8)]
    for who in ("kim", "lee"):  # two people, sixteen votes for the challenger
        for t in store.trials_for(who, "musicgen", (X, Y), chunks):
            store.vote(f"{who}-{t['trial_id']}", t["trial_id"], who, "A" if t["model_a"] == X else "B")
    gate = human_preference(p, tmp_path, "musicgen", "2", "1")
    assert gate.status == "waiting" and "from 2 of 3 listeners" in gate.reason and gate.n == 16
    t = store.trials_for("max", "musicgen", (X, Y), chunks[:1])[0]
    store.vote("max-1", t["trial_id"], "max", "none")
    assert human_preference(p, tmp_path, "musicgen", "2", "1").status == "pass"


def test_summary_breaks_down_by_genre_and_language() -> None:
    votes = [v(X, genre="pop", language="en"), v(Y, genre="rock", language="en", chunk="c1"),
             v(X, genre="rock", language="fr", chunk="c2")]
    s = summarize(votes, X, Y)
    assert {g: r["n"] for g, r in s["genre"].items()} == {"pop": 1, "rock": 2}
    assert s["language"]["en"]["win_rate"] == 0.5 and s["language"]["fr"]["wins"] == 1


WAVE_2_SCHEMA = """
CREATE TABLE trials (trial_id TEXT PRIMARY KEY, listener TEXT NOT NULL, backend TEXT NOT NULL, pair TEXT NOT NULL,
    chunk_id TEXT NOT NULL, genre TEXT, language TEXT, position INTEGER NOT NULL, model_a TEXT NOT NULL,
    model_b TEXT NOT NULL, created TEXT NOT NULL, UNIQUE (listener, pair, chunk_id));
CREATE TABLE votes (vote_id TEXT PRIMARY KEY, trial_id TEXT NOT NULL UNIQUE REFERENCES trials(trial_id),
    listener TEXT NOT NULL, backend TEXT NOT NULL, pair TEXT NOT NULL, chunk_id TEXT NOT NULL, genre TEXT,
    language TEXT, model_a TEXT NOT NULL, model_b TEXT NOT NULL, answer TEXT NOT NULL, winner TEXT NOT NULL,
    rating_a INTEGER, rating_b INTEGER, created TEXT NOT NULL);
"""


def test_votes_from_before_invitations_are_kept_but_never_counted(tmp_path: Path) -> None:
    import sqlite3
    db = sqlite3.connect(tmp_path / "votes.db")
    db.executescript(WAVE_2_SCHEMA)
    pair = "|".join(sorted((X, Y)))
    db.execute("INSERT INTO trials VALUES ('t1', 'ann', 'musicgen', ?, 'c0', 'pop', 'en', 0, ?, ?, 'x')", (pair, X, Y))
    db.execute("INSERT INTO votes VALUES ('v1', 't1', 'ann', 'musicgen', ?, 'c0', 'pop', 'en', ?, ?, 'A', ?, NULL, "
               "NULL, 'x')", (pair, X, Y, X))
    db.commit()
    db.close()
    store = VoteStore(tmp_path / "votes.db")
    [old] = store.votes()
    assert old["via"] == "unverified" and old["listener"] == "unverified:ann"
    fresh = store.trials_for("ann", "musicgen", (X, Y), [{"chunk_id": "c0"}])  # the invited ann starts afresh
    assert fresh[0]["trial_id"] != "t1" and fresh[0]["answer"] is None and fresh[0]["via"] == "invite"
    from tasks.listening.gate import counted
    assert counted(store.votes()) == []


def listening_set(tmp_path: Path, models: tuple[str, str] = (X, Y), n: int = 2) -> ListeningSet:
    """Two 'models' whose clips differ (0.1 and 0.2 DC, a little noise), written as WAV files."""
    chunks = [{"chunk_id": f"c{i}", "genre": "pop", "language": "en"} for i in range(n)]
    ls = ListeningSet("musicgen", models, {models[0]: "challenger", models[1]: "champion"}, chunks)
    rng = np.random.default_rng(0)
    for i, model in enumerate(models):
        for c in chunks:
            path = tmp_path / f"{i}-{c['chunk_id']}.wav"
            write_wav(path, (0.1 * (i + 1) + 0.01 * rng.standard_normal(800)).astype(np.float32), 8000)
            ls.clips[(model, c["chunk_id"])] = path
    return ls


@pytest.fixture
def api(tmp_path: Path, monkeypatch):
    """The stand-alone listening app over two unregistered 'models', with its owner's token."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = load_params(ROOT / "params.yaml")
    setup_mlflow(p, tmp_path)  # votes are recorded on registered versions; these two are not registered
    ls = listening_set(tmp_path)
    return p, tmp_path, ls, create_app(p, tmp_path, ls, "owner-secret")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_invited_listeners_vote_once_each_and_bad_votes_are_refused(api) -> None:
    p, root, ls, app = api
    client = TestClient(app)
    carol = VoteStore(root / p.listening.db).invite("carol")
    s = client.post("/listen/api/session", json={"listener": "typed"}, headers=bearer(carol)).json()
    assert s["listener"] == "carol" and s["total"] == 2  # the invitation says who, not the typed name
    trial = s["trials"][0]["trial_id"]
    a = client.get(f"/listen/audio/{trial}/A")
    assert a.status_code == 200 and a.headers["content-type"] == "audio/wav" and a.content[:4] == b"RIFF"
    assert client.get(f"/listen/audio/{trial}/C").status_code == 404
    assert client.get("/listen/audio/unknown/A").json()["error"] == "not_found"
    body = {"vote_id": "v1", "trial_id": trial, "answer": "A"}
    assert client.post("/listen/api/votes", json={**body, "answer": "maybe"}, headers=bearer(carol)).status_code == 400
    missing = client.post("/listen/api/votes", json={"answer": "A"}, headers=bearer(carol))
    assert missing.status_code == 422 and "vote_id" in missing.json()["detail"]
    res = client.post("/listen/api/votes", json=body, headers=bearer(carol))
    assert res.status_code == 200 and res.json()["stored"] is True
    dup = client.post("/listen/api/votes", json={**body, "vote_id": "v2"}, headers=bearer(carol))
    assert dup.status_code == 409 and dup.json()["error"] == "conflict"
    dave = VoteStore(root / p.listening.db).invite("dave")
    other = client.post("/listen/api/votes", json={**body, "vote_id": "v3", "trial_id": s["trials"][1]["trial_id"]},
                        headers=bearer(dave))
    assert other.status_code == 400 and "another listener" in other.json()["detail"]
    again = VoteStore(root / p.listening.db).invite("carol")  # a new link for carol: the old one stops working
    assert client.post("/listen/api/session", json={}, headers=bearer(carol)).status_code == 401
    assert client.post("/listen/api/session", json={}, headers=bearer(again)).json()["answered"] == 1
    r = client.get("/listen/api/results", headers=bearer("owner-secret")).json()
    assert r["n"] == 1 and r["roles"][X] == "challenger" and r["agreement"]["kappa"] is None  # NaN -> null
    assert r["refused"]["total"] == 2  # dave's vote on carol's trial, carol's old link
    assert {a["kind"] for a in r["refused"]["shown"]} == {"not_yours", "bad_invitation"}


# --- the attacks of issue 18: each passed before invitations -----------------------------------------------
def favourite(client: TestClient, trial_id: str) -> str:
    """The side an attacker takes for the challenger: the one whose clip is older by Last-Modified (the wave-2
    leak); a guess when the server tells nothing."""
    stamps = {slot: client.get(f"/listen/audio/{trial_id}/{slot}").headers.get("last-modified") for slot in "AB"}
    if all(stamps.values()):
        return min("AB", key=lambda slot: parsedate_to_datetime(stamps[slot]))
    return "A"


def stuff(client: TestClient, names: list[str], headers_for) -> int:
    """One client votes for the challenger (as far as it can tell) under every name it can think of; returns the
    votes stored."""
    stored = 0
    for name in names:
        s = client.post("/listen/api/session", json={"listener": name}, headers=headers_for(name))
        for t in s.json().get("trials", []) if s.status_code == 200 else []:
            r = client.post("/listen/api/votes", headers=headers_for(name),
                            json={"vote_id": f"{name}-{t['trial_id']}", "trial_id": t["trial_id"], "listener": name,
                                  "answer": favourite(client, t["trial_id"])})
            stored += r.status_code == 200
    return stored


def test_an_auth_header_from_an_untrusted_address_names_nobody(api) -> None:
    p, root, ls, app = api
    client = TestClient(app, client=("203.0.113.7", 40000))
    r = client.post("/listen/api/session", json={}, headers={"X-Forwarded-User": "mallory"})
    assert r.status_code == 401 and r.json()["error"] == "untrusted_header"
    assert client.get("/listen/api/whoami", headers={"X-Forwarded-User": "mallory"}).json()["listener"] is None
    spoof = {"X-Forwarded-User": "mallory", "X-Forwarded-For": "10.0.0.5", "X-Real-IP": "10.0.0.5",
             "Forwarded": "for=10.0.0.5"}  # pretending to come through the proxy changes nothing
    assert client.post("/listen/api/session", json={}, headers=spoof).status_code == 401


def test_the_auth_header_is_believed_from_a_trusted_proxy_only(api) -> None:
    p, root, ls, _ = api
    p = p.model_copy(update={"listening": p.listening.model_copy(update={"trusted_proxies": ["10.0.0.0/24"]})})
    app = create_app(p, root, ls, "owner-secret")
    proxied = TestClient(app, client=("10.0.0.5", 40000))
    s = proxied.post("/listen/api/session", json={}, headers={"X-Forwarded-User": "erin@example.com"})
    assert s.status_code == 200 and s.json()["listener"] == "erin@example.com"
    assert proxied.post("/listen/api/session", json={}, headers={"X-Forwarded-User": "<b>x</b>"}).status_code == 401
    direct = TestClient(app, client=("10.0.1.5", 40000))
    erin = {"X-Forwarded-User": "erin@example.com"}
    assert direct.post("/listen/api/session", json={}, headers=erin).status_code == 401


def test_typed_names_are_refused_and_shown_to_the_owner(api) -> None:
    p, root, ls, app = api
    client = TestClient(app)
    names = [f"sock{i}" for i in range(4)]
    assert stuff(client, names, lambda name: {}) == 0
    assert stuff(client, names, lambda name: {"X-Forwarded-User": name}) == 0
    assert stuff(client, names, lambda name: bearer("guessed-" + name)) == 0
    assert VoteStore(root / p.listening.db).votes() == []
    r = client.get("/listen/api/results", headers=bearer("owner-secret")).json()
    assert r["n"] == 0 and r["refused"]["total"] == 12
    assert {a["kind"] for a in r["refused"]["shown"]} == {"anonymous", "untrusted_header", "bad_invitation"}
    assert {a["claimed"] for a in r["refused"]["shown"]} == set(names)


def test_votes_and_results_are_for_the_owner_only(api) -> None:
    p, root, ls, app = api
    client = TestClient(app)
    for path in ("/listen/api/results", "/listen/api/votes"):
        for headers in ({}, {"X-Forwarded-User": "owner"}, bearer("owner")):
            assert client.get(path, headers=headers).status_code == 403, (path, headers)
    listener = VoteStore(root / p.listening.db).invite("gina")  # a listener's own link shows no results either
    for path in ("/listen/api/results", "/listen/api/votes"):
        assert client.get(path, headers=bearer(listener)).status_code == 403
        assert client.get(path, headers=bearer("owner-secret")).status_code == 200


def test_nothing_served_tells_a_from_b(api) -> None:
    p, root, ls, app = api
    client = TestClient(app)
    store = VoteStore(root / p.listening.db)
    heard = {}
    for name in ("hal", "ivy"):
        for t in store.trials_for(name, "musicgen", ls.models, ls.chunks):
            sides = {slot: client.get(f"/listen/audio/{t['trial_id']}/{slot}") for slot in "AB"}
            assert all(r.status_code == 200 for r in sides.values())
            a, b = (dict(r.headers) for r in sides.values())
            assert a == b  # the same headers, byte for byte: no validator, date or length differs by side
            assert not {"last-modified", "etag"} & set(a)
            for slot, r in sides.items():
                model = t["model_a"] if slot == "A" else t["model_b"]
                audio, _ = sf.read(io.BytesIO(r.content), dtype="float32")
                original, _ = sf.read(ls.clip(model, t["chunk_id"]), dtype="float32")
                assert np.abs(audio - original[:len(audio)]).max() < 3 / 32768  # the same clip, within dither
                heard.setdefault((model, t["chunk_id"]), set()).add(r.content)
    assert all(len(copies) == 2 for copies in heard.values())  # each listener got other bytes for one clip


def test_one_client_inventing_listeners_cannot_pass_the_gate(store, monkeypatch) -> None:  # noqa: F811
    params, root = store
    hp = params.promotion.human_preference.model_copy(update={"required": True, "min_votes": 4})
    strict = params.model_copy(update={"promotion": params.promotion.model_copy(update={"human_preference": hp})})
    v1 = candidate(params, root)
    assert promote(strict, root, "musicgen").promoted
    v2 = candidate(params, root)
    models = (f"voice2music-musicgen/{v2}", f"voice2music-musicgen/{v1}")
    ls = listening_set(root, models, n=3)
    for chunk in ls.chunks:  # the challenger's clips are the older files, as they were in wave 2's attack
        os.utime(ls.clip(models[0], chunk["chunk_id"]), (time.time() - 3600,) * 2)
    client = TestClient(create_app(strict, root, ls))
    names = [f"fan{i}" for i in range(6)]
    tricks = [lambda n: {},  # typed names
              lambda n: {"X-Forwarded-User": n},
              lambda n: {"X-Forwarded-User": n, "X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"},
              lambda n: {"X-Remote-User": n, "Remote-User": n, "X-Auth-Request-User": n},
              lambda n: bearer(n)]  # a guessed token
    for trick in tricks:
        stuff(client, names, trick)
    d = promote(strict, root, "musicgen")
    assert not d.promoted and alias_version("musicgen", CHAMPION) == v1
    gate = next(g for g in d.gates if g.name == "human_preference")
    assert gate.status == "waiting" and "refused or uncounted" in gate.reason


def test_a_mounted_router_answers_503_until_its_clips_are_ready_and_says_why(store) -> None:  # noqa: F811
    params, root = store  # an empty registry: no challenger and champion to compare
    source = BackgroundListeningSet(params, root, "musicgen", recheck_s=3600)
    app = FastAPI()
    app.include_router(create_router(params, root, source, "owner-secret"), prefix="/listen")
    app.add_exception_handler(NotReady, not_ready)
    client = TestClient(app)
    assert client.get("/listen").status_code == 200  # the page itself is always there
    first = client.get("/listen/api/results", headers=bearer("owner-secret"))
    assert first.status_code == 503 and "preparing" in first.json()["detail"]
    source.wait()
    ann = VoteStore(root / params.listening.db).invite("ann")
    then = client.post("/listen/api/session", json={}, headers=bearer(ann))
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
