"""params.yaml `listening:` (the blind A/B page) and `promotion.human_preference:` (the gate on its votes)."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from v2m.config_base import Strict
from v2m.config_serve import parse_networks


class ListeningConfig(Strict):
    """tasks/listening: which test vocals people hear and how a listener is identified."""
    max_chunks: int = Field(8, ge=1)  # test vocals per listening session: the first chunks of the split
    duration_s: float = Field(0.0, ge=0)  # seconds per clip; 0 = evaluation.duration_s (the evaluated audio)
    auth_header: str = "X-Forwarded-User"  # set by the team's auth proxy: believed from trusted_proxies only
    # Addresses (or CIDR networks) of the auth proxies whose auth_header names the listener. Empty: the header
    # is ignored (any client can send it) and listeners join by invitation (`v2m listen --invite NAME`).
    trusted_proxies: list[str] = []
    # Where the votes live: a file path (SQLite, relative to the project), or the team's database as
    # postgresql://USER@HOST:PORT/DATABASE, its password in the environment (DB_PASSWORD_ENV). DB_URL_ENV, set by
    # the team stack on its hosts, overrides this: every host's promotion then reads the same votes.
    db: str = ".v2m/listening.db"

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, entries: list[str]) -> list[str]:
        return parse_networks(entries)

    @field_validator("db")
    @classmethod
    def _db(cls, value: str) -> str:
        return check_vote_db(value)


DB_URL_ENV = "V2M_LISTENING_DB"  # overrides listening.db (a path or a URL without a password)
DB_PASSWORD_ENV = "V2M_LISTENING_DB_PASSWORD"  # the database URL's password: credentials travel in the environment
DB_SCHEMES = ("postgresql", "postgresql+psycopg")


def check_vote_db(value: str) -> str:
    """A vote store's address, checked without echoing it (a URL may hold a password, which is refused)."""
    value = value.strip()
    if not value:
        raise ValueError("empty: give a file path (SQLite) or postgresql://USER@HOST:PORT/DATABASE")
    if "://" not in value:
        return value  # a path: SQLite
    url = urlsplit(value)
    if url.scheme not in DB_SCHEMES:
        raise ValueError(f"scheme {url.scheme!r}: give a file path (SQLite) or a postgresql:// URL")
    try:
        url.port
    except ValueError:
        raise ValueError("the URL's port must be a number") from None
    if url.password is not None:
        raise ValueError(f"the URL holds a password: remove it and set the environment variable {DB_PASSWORD_ENV}")
    if not url.hostname or not url.username or not url.path.strip("/"):
        raise ValueError("a database URL needs a user, a host and a database: postgresql://USER@HOST:PORT/DATABASE")
    return value


class HumanPreferenceConfig(Strict):
    """Gate: the challenger's win rate against the champion in the blind test (ties count as half a win)."""
    required: bool = False
    min_votes: int = Field(30, ge=1)  # fewer votes than this: the promotion waits (it neither passes nor fails)
    min_listeners: int = Field(3, ge=1)  # ... and fewer distinct invited / proxy-signed-in people than this
    # One listener's votes count as at most this many (each of their votes weighs cap / their count): one keen
    # listener cannot carry the test alone.
    max_votes_per_listener: float = Field(10.0, gt=0)
    min_lower_bound: float = Field(0.5, ge=0, le=1)  # Wilson lower bound of the win rate must reach this
    confidence: float = Field(0.95, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> "HumanPreferenceConfig":
        if self.min_lower_bound >= 1:
            raise ValueError("min_lower_bound must be below 1 (a Wilson lower bound never reaches 1)")
        return self
