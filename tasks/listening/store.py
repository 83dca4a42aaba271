"""Trials, votes, invitations and refused attempts of the blind listening test, in one SQLite file (default
.v2m/listening.db). All SQL of the listening test is here: another backend (Postgres for team mode) replaces
this class, not its callers.

A trial is one test vocal shown to one listener: the two models' mixes as A and B, in an order drawn when
the trial is created and kept from then on (a reload or a restart shows the same order). A vote answers a
trial. Every vote row carries everything needed to analyse it on its own: listener, how the listener was
known (`via`), chunk (and its genre and language), the pair, which model was A and which B, the answer, the
winner, the ratings and the time.

Listeners are known by an invitation (`via` "invite": a personal token, stored only as its SHA-256) or by a
trusted auth proxy ("proxy"). Only those votes count (COUNTED). A file from before invitations keeps its votes
as "unverified" (their names were typed, or taken from a header any client could send), under names that
cannot collide with a real listener's. Refused attempts (no identity, a wrong token, an auth header from an
untrusted address) are kept as counts per (kind, claimed name, address), for the owner to see.

Writes are transactions on a file that outlives the server (WAL mode); a vote carries an id chosen by the
client, so sending it again (a retry after a lost response) stores nothing new.
"""

from __future__ import annotations

import hashlib
import random
import re
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from v2m.errors import UserError

ANSWERS = ("A", "B", "none")
COUNTED = ("invite", "proxy")  # how a listener whose votes count was known
NAME = re.compile(r"^[\w.@+-]{1,64}$")  # listener names: no ':' (kept for "unverified:..."), no spaces
MAX_ATTEMPT_ROWS = 10_000  # past this, new refused attempts are counted under one row (the table stays small)

SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    trial_id TEXT PRIMARY KEY, listener TEXT NOT NULL, backend TEXT NOT NULL, pair TEXT NOT NULL,
    chunk_id TEXT NOT NULL, genre TEXT, language TEXT, position INTEGER NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, created TEXT NOT NULL, via TEXT NOT NULL DEFAULT 'unverified',
    UNIQUE (listener, pair, chunk_id));
CREATE TABLE IF NOT EXISTS votes (
    vote_id TEXT PRIMARY KEY, trial_id TEXT NOT NULL UNIQUE REFERENCES trials(trial_id),
    listener TEXT NOT NULL, backend TEXT NOT NULL, pair TEXT NOT NULL, chunk_id TEXT NOT NULL,
    genre TEXT, language TEXT, model_a TEXT NOT NULL, model_b TEXT NOT NULL,
    answer TEXT NOT NULL CHECK (answer IN ('A', 'B', 'none')), winner TEXT NOT NULL,
    rating_a INTEGER CHECK (rating_a BETWEEN 1 AND 5), rating_b INTEGER CHECK (rating_b BETWEEN 1 AND 5),
    created TEXT NOT NULL, via TEXT NOT NULL DEFAULT 'unverified');
CREATE TABLE IF NOT EXISTS invitations (name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE,
                                        created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (kind TEXT NOT NULL, claimed TEXT NOT NULL, peer TEXT NOT NULL,
                                     count INTEGER NOT NULL, first TEXT NOT NULL, last TEXT NOT NULL,
                                     PRIMARY KEY (kind, claimed, peer));
"""


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


class VoteStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; survives a crash mid-write
            db.executescript(SCHEMA)
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:
                _upgrade_from_wave_2(db)
                db.execute("PRAGMA user_version = 1")
            db.commit()
        finally:
            db.close()

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # One connection per operation: the server answers from several threads.
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # --- who listens ---------------------------------------------------------------------------------
    def invite(self, name: str) -> str:
        """A new personal token for `name` (stored as its hash; an earlier token of the same name stops working)."""
        name, token = check_name(name), secrets.token_urlsafe(24)
        with self._db() as db:
            db.execute("INSERT INTO invitations VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                       "token_sha256 = excluded.token_sha256, created = excluded.created",
                       (name, token_hash(token), _now()))
        return token

    def invited(self, token: str) -> str | None:
        """The name a token was issued to, or None."""
        with self._db() as db:
            row = db.execute("SELECT name FROM invitations WHERE token_sha256 = ?", (token_hash(token),)).fetchone()
        return row["name"] if row else None

    def note_attempt(self, kind: str, claimed: str, peer: str) -> None:
        """Count a refused attempt (nothing of it counts as a vote)."""
        claimed, peer = claimed.strip()[:100], peer[:64]
        with self._db() as db:
            known = db.execute("SELECT 1 FROM attempts WHERE kind = ? AND claimed = ? AND peer = ?",
                               (kind, claimed, peer)).fetchone()
            if not known and db.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] >= MAX_ATTEMPT_ROWS:
                claimed, peer = "(more)", "(more)"
            db.execute("INSERT INTO attempts VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (kind, claimed, peer) DO UPDATE "
                       "SET count = count + 1, last = excluded.last", (kind, claimed, peer, _now(), _now()))

    def attempts(self) -> list[dict[str, Any]]:
        """Refused attempts, most frequent first."""
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM attempts ORDER BY count DESC, last DESC")]

    # --- trials and votes -----------------------------------------------------------------------------
    def trials_for(self, listener: str, backend: str, models: tuple[str, str],
                   chunks: list[dict[str, Any]], via: str = "invite") -> list[dict[str, Any]]:
        """The listener's trials for these chunks, created on first call. The A/B order is counterbalanced:
        each model is A in half of the new trials (one more for an odd count), in a random order. `via`: how
        the listener was known (COUNTED), recorded on the trials it creates and on their votes."""
        listener = check_name(listener)
        pair = pair_key(*models)
        with self._db() as db:
            have = {r["chunk_id"] for r in db.execute(
                "SELECT chunk_id FROM trials WHERE listener = ? AND pair = ?", (listener, pair))}
            new = [(i, c) for i, c in enumerate(chunks) if c["chunk_id"] not in have]
            flips = [k % 2 == 1 for k in range(len(new))]
            random.SystemRandom().shuffle(flips)
            for (i, c), flip in zip(new, flips):
                a, b = (models[1], models[0]) if flip else models
                db.execute("INSERT INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (secrets.token_urlsafe(16), listener, backend, pair, c["chunk_id"], c.get("genre"),
                            c.get("language"), i, a, b, _now(), via))
            rows = db.execute("""SELECT t.*, v.answer, v.vote_id FROM trials t LEFT JOIN votes v USING (trial_id)
                                 WHERE t.listener = ? AND t.pair = ? ORDER BY t.position""", (listener, pair))
            wanted = {c["chunk_id"] for c in chunks}
            return [dict(r) for r in rows if r["chunk_id"] in wanted]

    def trial(self, trial_id: str) -> dict[str, Any]:
        with self._db() as db:
            row = db.execute("SELECT * FROM trials WHERE trial_id = ?", (trial_id,)).fetchone()
        if row is None:
            raise VoteError(f"unknown trial {trial_id!r}")
        return dict(row)

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
            same = db.execute("SELECT * FROM votes WHERE vote_id = ?", (vote_id,)).fetchone()
            if same is not None:
                if (same["trial_id"], same["listener"], same["answer"], same["rating_a"], same["rating_b"]) != (
                        trial_id, listener.strip(), answer, rating_a, rating_b):
                    raise VoteError(f"vote {vote_id!r} was already stored with other content")
                return dict(same), False
            t = db.execute("SELECT * FROM trials WHERE trial_id = ?", (trial_id,)).fetchone()
            if t is None:
                raise VoteError(f"unknown trial {trial_id!r}")
            if t["listener"] != listener.strip():
                raise VoteError(f"trial {trial_id!r} belongs to another listener")
            if db.execute("SELECT 1 FROM votes WHERE trial_id = ?", (trial_id,)).fetchone():
                raise VoteError(f"trial {trial_id!r} was already answered")
            winner = {"A": t["model_a"], "B": t["model_b"], "none": ""}[answer]
            db.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (vote_id, trial_id, t["listener"], t["backend"], t["pair"], t["chunk_id"], t["genre"],
                        t["language"], t["model_a"], t["model_b"], answer, winner, rating_a, rating_b, _now(),
                        t["via"]))
            return dict(db.execute("SELECT * FROM votes WHERE vote_id = ?", (vote_id,)).fetchone()), True

    def votes(self, backend: str | None = None, models: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        """Votes in the order they were cast, optionally for one backend and one pair of models."""
        where, args = [], []
        if backend:
            where.append("backend = ?")
            args.append(backend)
        if models:
            where.append("pair = ?")
            args.append(pair_key(*models))
        sql = "SELECT * FROM votes" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY rowid"
        with self._db() as db:
            return [dict(r) for r in db.execute(sql, args)]


def _upgrade_from_wave_2(db: sqlite3.Connection) -> None:
    """Votes stored before invitations came from typed names or a header any client could send: keep them,
    as "unverified" (never counted), renamed so that no invited listener inherits their trials."""
    for table in ("trials", "votes"):
        if "via" not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN via TEXT NOT NULL DEFAULT 'unverified'")
            db.execute(f"UPDATE {table} SET listener = 'unverified:' || listener")
