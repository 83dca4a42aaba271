"""params.yaml `listening:` (the blind A/B page) and `promotion.human_preference:` (the gate on its votes)."""

from __future__ import annotations

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
    db: str = ".v2m/listening.db"  # the votes (SQLite), next to the embedded MLflow store

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, entries: list[str]) -> list[str]:
        return parse_networks(entries)


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
