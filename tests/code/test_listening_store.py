"""The vote store (tasks/listening/store.py) on both of its databases: a SQLite file (embedded) and a real
private PostgreSQL (team mode; tests/conftest.py postgres_server). Each behaviour runs on both: the same
statements must mean the same thing on each."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from tasks.listening import store as store_module
from tasks.listening.gate import human_preference, store_for
from tasks.listening.store import VoteError, VoteStore, VoteStoreError
from v2m.config import ConfigError, load_params
from v2m.config_listening import DB_PASSWORD_ENV, DB_URL_ENV

ROOT = Path(__file__).resolve().parents[2]
X, Y = "voice2music-musicgen/2", "voice2music-musicgen/1"
CHUNKS = [{"chunk_id": f"c{i}", "genre": "pop", "language": "en"} for i in range(6)]


@pytest.fixture(params=["sqlite", "postgresql"])
def vote_db(request, tmp_path: Path, monkeypatch) -> str | Path:
    """Where a store keeps its votes: a new SQLite file, or a new database on the session's PostgreSQL (its URL
    and password in the environment, as the team stack hands them to its hosts)."""
    monkeypatch.delenv(DB_URL_ENV, raising=False)
    if request.param == "sqlite":
        return tmp_path / "votes.db"
    pg = request.getfixturevalue("postgres_server")
    url = pg.create_database(f"t{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv(DB_URL_ENV, url)
    monkeypatch.setenv(DB_PASSWORD_ENV, pg.password)
    return url


def answer_for(trial: dict, model: str) -> str:
    return "A" if trial["model_a"] == model else "B"


def test_trials_are_counterbalanced_kept_and_votes_idempotent(vote_db) -> None:
    store = VoteStore(vote_db)
    trials = store.trials_for("ann", "musicgen", (X, Y), CHUNKS)
    assert [t["chunk_id"] for t in trials] == [c["chunk_id"] for c in CHUNKS]
    assert sum(t["model_a"] == X for t in trials) == 3  # each model is A in half the trials
    again = VoteStore(vote_db).trials_for("ann", "musicgen", (Y, X), CHUNKS)  # a restart, either order
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
    assert len(VoteStore(vote_db).votes("musicgen", (Y, X))) == 1


def test_votes_come_back_in_the_order_they_were_cast(vote_db) -> None:
    store = VoteStore(vote_db)
    ann, bob = (store.trials_for(n, "musicgen", (X, Y), CHUNKS[:3]) for n in ("ann", "bob"))
    cast = [("ann", ann[2]), ("bob", bob[0]), ("ann", ann[0]), ("bob", bob[2]), ("ann", ann[1])]
    for i, (name, t) in enumerate(cast):
        store.vote(f"v{i}", t["trial_id"], name, "none")
    assert [v["vote_id"] for v in store.votes()] == [f"v{i}" for i in range(len(cast))]
    assert [v["vote_id"] for v in store.votes("musicgen", (X, Y))] == [f"v{i}" for i in range(len(cast))]
    assert store.votes("audioldm") == [] and store.votes("musicgen", (X, "voice2music-musicgen/9")) == []


def test_invitations_are_kept_as_hashes_and_a_new_link_replaces_the_old(vote_db) -> None:
    store = VoteStore(vote_db)
    first = store.invite("carol")
    assert store.invited(first) == "carol" and store.invited("guessed") is None
    second = store.invite("carol")
    assert store.invited(first) is None and store.invited(second) == "carol"
    with store.engine.connect() as db:
        rows = [tuple(r) for r in db.execute(sa.text("SELECT * FROM invitations"))]
    assert rows and all(second not in map(str, r) for r in rows)  # the token itself is stored nowhere
    assert rows[0][1] == hashlib.sha256(second.encode()).hexdigest()
    with pytest.raises(VoteError, match="listener name"):
        store.invite("two words")


def test_refused_attempts_are_counted_in_a_table_that_stays_small(vote_db, monkeypatch) -> None:
    monkeypatch.setattr(store_module, "MAX_ATTEMPT_ROWS", 3)
    store = VoteStore(vote_db)
    for name in ("a", "b", "c", "d", "e", "a"):
        store.note_attempt("anonymous", name, "10.0.0.1")
    got = {(a["claimed"], a["count"]) for a in store.attempts()}
    assert got == {("a", 2), ("b", 1), ("c", 1), ("(more)", 2)}  # d and e past the cap: one row
    assert store.attempts()[0]["count"] == 2  # most frequent first


def test_the_schema_itself_refuses_a_second_answer_and_a_bad_one(vote_db) -> None:
    """UNIQUE and CHECK live in the database, not only in VoteStore.vote's checks."""
    store = VoteStore(vote_db)
    t = store.trials_for("ann", "musicgen", (X, Y), CHUNKS[:1])[0]
    row, _ = store.vote("v1", t["trial_id"], "ann", "A")
    columns = [k for k in row if k != "seq"]
    insert = sa.text(f"INSERT INTO votes ({', '.join(columns)}, seq) VALUES "
                     f"({', '.join(':' + k for k in columns)}, :seq)")
    for change in ({"vote_id": "v2"}, {"vote_id": "v3", "trial_id": "other", "answer": "C"}):
        with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as db:
            db.execute(insert, {**row, **change, "seq": 99})


def test_hosts_writing_at_once_store_each_vote_once(vote_db) -> None:
    """Eight clients (each with its own store, like processes on several hosts) send one listener's votes at
    once, every vote twice: each trial ends with one vote, every resend is recognised, nothing fails."""
    VoteStore(vote_db).trials_for("ann", "musicgen", (X, Y), CHUNKS)
    trials = VoteStore(vote_db).trials_for("ann", "musicgen", (X, Y), CHUNKS)
    results, errors = [], []

    def client(k: int) -> None:
        store = VoteStore(vote_db)
        try:
            for t in trials[k % 2::2]:  # clients k and k+2 send the same votes
                results.append(store.vote(f"vote-{t['trial_id']}", t["trial_id"], "ann", answer_for(t, X))[1])
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == [] and len(results) == 4 * len(CHUNKS)
    assert results.count(True) == len(CHUNKS)  # one new vote per trial, the other 3 sends recognised
    votes = VoteStore(vote_db).votes()
    assert sorted(v["trial_id"] for v in votes) == sorted(t["trial_id"] for t in trials)
    assert sorted(v["seq"] for v in votes) == list(range(1, len(CHUNKS) + 1))


def test_a_wave_3_file_keeps_its_vote_order(tmp_path: Path) -> None:
    """Wave 3 ordered votes by SQLite's rowid; the upgrade copies that order into seq."""
    path = tmp_path / "votes.db"
    VoteStore(path).trials_for("ann", "musicgen", (X, Y), CHUNKS[:3])
    db = sqlite3.connect(path)
    db.execute("DROP INDEX votes_seq")
    db.execute("ALTER TABLE votes DROP COLUMN seq")
    db.execute("PRAGMA user_version = 1")
    trials = [r[0] for r in db.execute("SELECT trial_id FROM trials ORDER BY position")]
    for vote_id, trial in (("late", trials[2]), ("early", trials[0])):  # rowid order: late, then early
        db.execute("INSERT INTO votes VALUES (?, ?, 'ann', 'musicgen', ?, 'c0', NULL, NULL, ?, ?, 'A', ?, NULL, "
                   "NULL, 'x', 'invite')", (vote_id, trial, "|".join(sorted((X, Y))), X, Y, X))
    db.commit()
    db.close()
    store = VoteStore(path)
    store.vote("third", trials[1], "ann", "none")
    assert [(v["vote_id"], v["seq"]) for v in store.votes()] == [("late", 1), ("early", 2), ("third", 3)]


def test_any_hosts_gate_reads_the_team_database(postgres_server, tmp_path: Path, monkeypatch) -> None:
    """Votes cast from one project folder decide the gate in another, empty one, through the database the
    environment names; without it, that folder's own SQLite file has none."""
    p = load_params(ROOT / "params.yaml")
    hp = p.promotion.human_preference.model_copy(update={"min_votes": 6, "min_listeners": 3})
    p = p.model_copy(update={"promotion": p.promotion.model_copy(update={"human_preference": hp})})
    monkeypatch.setenv(DB_URL_ENV, postgres_server.create_database(f"t{uuid.uuid4().hex[:12]}"))
    monkeypatch.setenv(DB_PASSWORD_ENV, postgres_server.password)
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    store = store_for(p, host_a)
    for who in ("kim", "lee", "max"):
        for t in store.trials_for(who, "musicgen", (X, Y), CHUNKS[:2]):
            store.vote(f"{who}-{t['trial_id']}", t["trial_id"], who, answer_for(t, X))
    assert human_preference(p, host_b, "musicgen", "2", "1").status == "pass"
    assert not host_a.exists() and not host_b.exists()  # no file on either host
    monkeypatch.delenv(DB_URL_ENV)
    assert human_preference(p, host_b, "musicgen", "2", "1").status == "waiting"


def test_a_wrong_address_or_password_is_a_clear_error(postgres_server, tmp_path: Path, monkeypatch) -> None:
    url = postgres_server.create_database(f"t{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv(DB_PASSWORD_ENV, "not-the-password")
    with pytest.raises(VoteStoreError, match=f"cannot be opened: .*password.*{DB_PASSWORD_ENV}"):
        VoteStore(url)
    p = load_params(ROOT / "params.yaml")
    monkeypatch.setenv(DB_URL_ENV, "postgresql://listening:hunter2@127.0.0.1:1/listening")
    with pytest.raises(VoteStoreError, match=f"{DB_URL_ENV}: the URL holds a password") as err:
        store_for(p, tmp_path)
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("value,reason", [
    ("postgresql://listening:hunter2@db:5432/listening", "holds a password: remove it and set the environment "
                                                         f"variable {DB_PASSWORD_ENV}"),
    ("mysql://v2m@db/listening", "scheme 'mysql'"),
    ("postgresql://db:5432/listening", "needs a user, a host and a database"),
    ("postgresql://v2m@db:port/listening", "port must be a number"),
])
def test_listening_db_is_a_path_or_a_url_without_a_password(tmp_path: Path, value: str, reason: str) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(f"listening:\n  db: {value}\n")
    with pytest.raises(ConfigError, match="listening.db: ") as err:
        load_params(params)
    assert reason in str(err.value) and "hunter2" not in str(err.value)
    assert "hunter2" not in repr(err.value.__cause__)  # nor in the traceback's chained error
    params.write_text("listening:\n  db: postgresql://listening@db:5432/listening\n")
    assert load_params(params).listening.db == "postgresql://listening@db:5432/listening"
