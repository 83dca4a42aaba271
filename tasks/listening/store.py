"""Trials, votes, invitations and refused attempts of the blind listening test, in one database: a SQLite file
(embedded default, .v2m/listening.db) or the team's PostgreSQL (listening.db or V2M_LISTENING_DB as a
postgresql:// URL, its password in V2M_LISTENING_DB_PASSWORD): then every host's promotion reads the same votes.
All SQL of the listening test is here, one schema and one set of statements for both databases (SQLAlchemy Core).

A trial is one test vocal shown to one listener: the two models' mixes as A and B, in an order drawn when
the trial is created and kept from then on (a reload or a restart shows the same order). A vote answers a
trial. Every vote row carries everything needed to analyse it on its own: listener, how the listener was
known (`via`), chunk (and its genre and language), the pair, which model was A and which B, the answer, the
winner, the ratings, the time and its place in the order votes were cast (`seq`).

Listeners are known by an invitation (`via` "invite": a personal token, stored only as its SHA-256) or by a
trusted auth proxy ("proxy"). Only those votes count (COUNTED). A file from before invitations keeps its votes
as "unverified" (their names were typed, or taken from a header any client could send), under names that
cannot collide with a real listener's. Refused attempts (no identity, a wrong token, an auth header from an
untrusted address) are kept as counts per (kind, claimed name, address), for the owner to see.

Every operation is one transaction, and they run one at a time (SQLite: BEGIN IMMEDIATE on a WAL file;
PostgreSQL: a transaction-scoped advisory lock), so a check and the write it allows cannot interleave with
another host's. A vote carries an id chosen by the client: sending it again (a retry after a lost response)
stores nothing new.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from v2m.config_listening import DB_PASSWORD_ENV
from v2m.errors import UserError

ANSWERS = ("A", "B", "none")
COUNTED = ("invite", "proxy")  # how a listener whose votes count was known
NAME = re.compile(r"^[\w.@+-]{1,64}$")  # listener names: no ':' (kept for "unverified:..."), no spaces
MAX_ATTEMPT_ROWS = 10_000  # past this, new refused attempts are counted under one row (the table stays small)
SCHEMA_VERSION = 2  # SQLite files: 1 = wave 3 (via), 2 = votes.seq
LOCK_KEY = 0x76326D  # PostgreSQL advisory lock of the vote store ("v2m"): one transaction at a time

SCHEMA = ["""
CREATE TABLE IF NOT EXISTS trials (
    trial_id TEXT PRIMARY KEY, listener TEXT NOT NULL, backend TEXT NOT NULL, pair TEXT NOT NULL,
    chunk_id TEXT NOT NULL, genre TEXT, language TEXT, position INTEGER NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, created TEXT NOT NULL, via TEXT NOT NULL DEFAULT 'unverified',
    UNIQUE (listener, pair, chunk_id))""", """
CREATE TABLE IF NOT EXISTS votes (
    vote_id TEXT PRIMARY KEY, trial_id TEXT NOT NULL UNIQUE REFERENCES trials(trial_id),
    listener TEXT NOT NULL, backend TEXT NOT NULL, pair TEXT NOT NULL, chunk_id TEXT NOT NULL,
    genre TEXT, language TEXT, model_a TEXT NOT NULL, model_b TEXT NOT NULL,
    answer TEXT NOT NULL CHECK (answer IN ('A', 'B', 'none')), winner TEXT NOT NULL,
    rating_a INTEGER CHECK (rating_a BETWEEN 1 AND 5), rating_b INTEGER CHECK (rating_b BETWEEN 1 AND 5),
    created TEXT NOT NULL, via TEXT NOT NULL DEFAULT 'unverified', seq BIGINT NOT NULL DEFAULT 0)""", """
CREATE TABLE IF NOT EXISTS invitations (name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE,
                                        created TEXT NOT NULL)""", """
CREATE TABLE IF NOT EXISTS attempts (kind TEXT NOT NULL, claimed TEXT NOT NULL, peer TEXT NOT NULL,
                                     count INTEGER NOT NULL, first TEXT NOT NULL, last TEXT NOT NULL,
                                     PRIMARY KEY (kind, claimed, peer))"""]
INDEXES = ["CREATE UNIQUE INDEX IF NOT EXISTS votes_seq ON votes (seq)"]  # after an old file's upgrade


class VoteError(UserError, ValueError):
    """A vote the store cannot take (unknown trial, bad answer, a second answer to a trial)."""


def pair_key(model_x: str, model_y: str) -> str:
    """The same key whichever model is named first."""
    return "|".join(sorted((model_x, model_y)))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    name = name.strip()
    if not NAME.match(name):
        raise VoteError(f"listener name {name[:70]!r}: use 1-64 letters, digits or . _ @ + - (no spaces)")
    return name


class VoteStoreError(UserError, RuntimeError):
    """The vote store cannot be opened (a wrong URL, a server that does not answer, a refused password)."""


class VoteStore:
    def __init__(self, target: str | Path):
        """`target`: a SQLite file (created with its folder), or a postgresql:// URL without a password."""
        self.engine, self.where = _engine(target)
        try:
            with self._db() as db:
                for statement in SCHEMA:
                    db.execute(sa.text(statement))
                if self.engine.dialect.name == "sqlite":
                    _upgrade_sqlite(db)
                for statement in INDEXES:
                    db.execute(sa.text(statement))
        except sa.exc.OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            hint = f" (its password comes from {DB_PASSWORD_ENV})" if "://" in self.where else ""
            raise VoteStoreError(f"the vote store {self.where} cannot be opened: {reason}{hint}") from None

    @contextmanager
    def _db(self) -> Iterator[sa.Connection]:
        """One transaction; one at a time across every process and host using this store."""
        with self.engine.begin() as db:  # SQLite: BEGIN IMMEDIATE (see _engine)
            if db.dialect.name == "postgresql":
                db.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
            yield db

    # --- who listens ---------------------------------------------------------------------------------
    def invite(self, name: str) -> str:
        """A new personal token for `name` (stored as its hash; an earlier token of the same name stops working)."""
        name, token = check_name(name), secrets.token_urlsafe(24)
        with self._db() as db:
            db.execute(sa.text("INSERT INTO invitations (name, token_sha256, created) VALUES (:name, :sha, :now) "
                               "ON CONFLICT (name) DO UPDATE SET token_sha256 = excluded.token_sha256, "
                               "created = excluded.created"), {"name": name, "sha": token_hash(token), "now": _now()})
        return token

    def invited(self, token: str) -> str | None:
        """The name a token was issued to, or None."""
        with self._db() as db:
            row = _one(db, "SELECT name FROM invitations WHERE token_sha256 = :sha", sha=token_hash(token))
        return row["name"] if row else None

    def note_attempt(self, kind: str, claimed: str, peer: str) -> None:
        """Count a refused attempt (nothing of it counts as a vote)."""
        claimed, peer = claimed.strip()[:100], peer[:64]
        key = {"kind": kind, "claimed": claimed, "peer": peer}
        with self._db() as db:
            known = _one(db, "SELECT 1 AS x FROM attempts WHERE kind = :kind AND claimed = :claimed AND peer = :peer",
                         **key)
            if not known and _one(db, "SELECT COUNT(*) AS n FROM attempts")["n"] >= MAX_ATTEMPT_ROWS:
                key |= {"claimed": "(more)", "peer": "(more)"}
            db.execute(sa.text("INSERT INTO attempts (kind, claimed, peer, count, first, last) "
                               "VALUES (:kind, :claimed, :peer, 1, :now, :now) ON CONFLICT (kind, claimed, peer) "
                               "DO UPDATE SET count = attempts.count + 1, last = excluded.last"), key | {"now": _now()})

    def attempts(self) -> list[dict[str, Any]]:
        """Refused attempts, most frequent first."""
        with self._db() as db:
            return _all(db, "SELECT * FROM attempts ORDER BY count DESC, last DESC")

    # --- trials and votes -----------------------------------------------------------------------------
    def trials_for(self, listener: str, backend: str, models: tuple[str, str],
                   chunks: list[dict[str, Any]], via: str = "invite") -> list[dict[str, Any]]:
        """The listener's trials for these chunks, created on first call. The A/B order is counterbalanced:
        each model is A in half of the new trials (one more for an odd count), in a random order. `via`: how
        the listener was known (COUNTED), recorded on the trials it creates and on their votes."""
        listener = check_name(listener)
        pair = pair_key(*models)
        with self._db() as db:
            have = {r["chunk_id"] for r in _all(db, "SELECT chunk_id FROM trials WHERE listener = :listener AND "
                                                    "pair = :pair", listener=listener, pair=pair)}
            new = [(i, c) for i, c in enumerate(chunks) if c["chunk_id"] not in have]
            flips = [k % 2 == 1 for k in range(len(new))]
            random.SystemRandom().shuffle(flips)
            for (i, c), flip in zip(new, flips):
                a, b = (models[1], models[0]) if flip else models
                _insert(db, "trials", {"trial_id": secrets.token_urlsafe(16), "listener": listener,
                                       "backend": backend, "pair": pair, "chunk_id": c["chunk_id"],
                                       "genre": c.get("genre"), "language": c.get("language"), "position": i,
                                       "model_a": a, "model_b": b, "created": _now(), "via": via})
            rows = _all(db, """SELECT t.*, v.answer, v.vote_id FROM trials t LEFT JOIN votes v USING (trial_id)
                               WHERE t.listener = :listener AND t.pair = :pair ORDER BY t.position""",
                        listener=listener, pair=pair)
            wanted = {c["chunk_id"] for c in chunks}
            return [r for r in rows if r["chunk_id"] in wanted]

    def trial(self, trial_id: str) -> dict[str, Any]:
        with self._db() as db:
            row = _one(db, "SELECT * FROM trials WHERE trial_id = :trial_id", trial_id=trial_id)
        if row is None:
            raise VoteError(f"unknown trial {trial_id!r}")
        return row

    def vote(self, vote_id: str, trial_id: str, listener: str, answer: str, rating_a: int | None = None,
             rating_b: int | None = None) -> tuple[dict[str, Any], bool]:
        """Store a vote; returns (the stored row, whether it is new). The same vote sent again is not new."""
        if not vote_id or len(vote_id) > 100:
            raise VoteError("vote_id: a client-chosen id of 1-100 characters is required")
        if answer not in ANSWERS:
            raise VoteError(f"answer must be one of {', '.join(ANSWERS)} (got {answer!r})")
        for name, r in (("rating_a", rating_a), ("rating_b", rating_b)):
            if r is not None and not (isinstance(r, int) and 1 <= r <= 5):
                raise VoteError(f"{name} must be an integer from 1 to 5 (got {r!r})")
        with self._db() as db:
            same = _one(db, "SELECT * FROM votes WHERE vote_id = :vote_id", vote_id=vote_id)
            if same is not None:
                if (same["trial_id"], same["listener"], same["answer"], same["rating_a"], same["rating_b"]) != (
                        trial_id, listener.strip(), answer, rating_a, rating_b):
                    raise VoteError(f"vote {vote_id!r} was already stored with other content")
                return same, False
            t = _one(db, "SELECT * FROM trials WHERE trial_id = :trial_id", trial_id=trial_id)
            if t is None:
                raise VoteError(f"unknown trial {trial_id!r}")
            if t["listener"] != listener.strip():
                raise VoteError(f"trial {trial_id!r} belongs to another listener")
            if _one(db, "SELECT 1 AS x FROM votes WHERE trial_id = :trial_id", trial_id=trial_id):
                raise VoteError(f"trial {trial_id!r} was already answered")
            winner = {"A": t["model_a"], "B": t["model_b"], "none": ""}[answer]
            seq = _one(db, "SELECT COALESCE(MAX(seq), 0) + 1 AS n FROM votes")["n"]  # under the store's lock
            _insert(db, "votes", {"vote_id": vote_id, **{k: t[k] for k in (
                "trial_id", "listener", "backend", "pair", "chunk_id", "genre", "language", "model_a", "model_b")},
                "answer": answer, "winner": winner, "rating_a": rating_a, "rating_b": rating_b, "created": _now(),
                "via": t["via"], "seq": seq})
            return _one(db, "SELECT * FROM votes WHERE vote_id = :vote_id", vote_id=vote_id), True

    def votes(self, backend: str | None = None, models: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        """Votes in the order they were cast, optionally for one backend and one pair of models."""
        where, args = [], {}
        if backend:
            where.append("backend = :backend")
            args["backend"] = backend
        if models:
            where.append("pair = :pair")
            args["pair"] = pair_key(*models)
        sql = "SELECT * FROM votes" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
        with self._db() as db:
            return _all(db, sql, **args)


def _one(db: sa.Connection, sql: str, **args: Any) -> dict[str, Any] | None:
    row = db.execute(sa.text(sql), args).mappings().first()
    return dict(row) if row is not None else None


def _all(db: sa.Connection, sql: str, **args: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in db.execute(sa.text(sql), args).mappings()]


def _insert(db: sa.Connection, table: str, row: dict[str, Any]) -> None:
    db.execute(sa.text(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})"), row)


# --- where the votes are ----------------------------------------------------------------------------------
_engines: dict[str, sa.Engine] = {}  # PostgreSQL: one pool per URL and password in this process
_engines_lock = threading.Lock()


def _engine(target: str | Path) -> tuple[sa.Engine, str]:
    """(engine, where it points, for messages: no password). SQLite: a connection per transaction, as the file
    is shared with other processes; BEGIN IMMEDIATE takes the write lock up front (no deadlock on upgrade)."""
    if "://" not in str(target):
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(f"sqlite:///{path}", poolclass=NullPool, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_connect)
        sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine, str(path)
    url = sa.make_url(str(target)).set(drivername="postgresql+psycopg",
                                       password=os.environ.get(DB_PASSWORD_ENV) or None)
    key = url.render_as_string(hide_password=False)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=8,
                                             connect_args={"connect_timeout": 10})
    return _engines[key], str(target)


def _sqlite_connect(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # the driver opens no transaction of its own: BEGIN IMMEDIATE does
    dbapi_connection.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; survives a crash


# A flow run is a fork of its host's zygote: a pool inherited across fork() would share the parent's sockets.
os.register_at_fork(after_in_child=lambda: [e.dispose(close=False) for e in list(_engines.values())])


def _upgrade_sqlite(db: sa.Connection) -> None:
    """Files from earlier waves (PostgreSQL stores start at the current schema)."""
    if db.exec_driver_sql("PRAGMA user_version").scalar() >= SCHEMA_VERSION:
        return
    columns = {t: {r[1] for r in db.exec_driver_sql(f"PRAGMA table_info({t})")} for t in ("trials", "votes")}
    # Wave 2: votes stored before invitations came from typed names or a header any client could send: keep
    # them, as "unverified" (never counted), renamed so that no invited listener inherits their trials.
    for table in ("trials", "votes"):
        if "via" not in columns[table]:
            db.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN via TEXT NOT NULL DEFAULT 'unverified'")
            db.exec_driver_sql(f"UPDATE {table} SET listener = 'unverified:' || listener")
    if "seq" not in columns["votes"]:  # wave 3: votes were ordered by SQLite's rowid, which PostgreSQL lacks
        db.exec_driver_sql("ALTER TABLE votes ADD COLUMN seq BIGINT NOT NULL DEFAULT 0")
        db.exec_driver_sql("UPDATE votes SET seq = rowid")
    db.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")
