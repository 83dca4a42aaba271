"""Traffic between the champion and a challenger (params serve.rollout), and what a failed bound does.

    off      every request goes to the champion; outputs are still scored (online.py) and auto_rollback may act
    shadow   once the champion's result is ready, a sampled share of requests (`share`) is queued for the
             challenger with the same vocal, prompt and seed; the two outputs are scored as a pair and the
             challenger's is never returned. A shadow holds no client slot and runs only in idle moments: it
             waits until no client's request has been queued for SHADOW_IDLE_S, takes the process's generation
             gate (batcher.GenerationGate: one generation at a time), and stops at its next step when a client's
             generation arrives (it tries again later, for at most serve.timeout_s). Its queue holds max_shadow_pending; a shadow is dropped
             when the queue is full or the champion's queue is at least half full. One client adds at most
             max_pairs_per_client pairs a day.
    canary   a share of clients is answered by the challenger (X-V2M-Variant: challenger), sticky by client id
             (guard.client_id: the API key's name, else the connecting address) through a keyed hash: HMAC-SHA256
             with V2M_ROLLOUT_KEY (shared by replicas, so a client keeps its variant across them), else a key drawn
             at start. A session id or header chosen by the client would let it pick its variant by trying values;
             without the key nobody can tell which identities land in the canary before asking.

A canary challenger that fails a bound (online.Bounds) is taken out of the canary at once (its clients get the
champion; v2m_online_canary_active 0). With auto_rollback, a champion that fails one is rolled back through the
registry (tasks/registry/promotion.rollback: audited like `v2m rollback`, and sticky: the version cannot be
promoted again without --reinstate), compare-and-set on the version judged, so two replicas never roll back twice.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import replace
from pathlib import Path

from models.cancel import Cancelled, CancelToken
from models.longform import Request, generate_batch_raw
from tasks.serving.batcher import GENERATION, Batcher, Result
from tasks.serving.holder import ModelHolder
from tasks.serving.metrics import Metrics
from tasks.serving.keep import Keeper
from tasks.serving.online import Background, Online, utc_day
from tasks.serving.recorder import Recorder
from v2m.config import Params
from v2m.errors import UserError

log = logging.getLogger("v2m.serve")
KEY_ENV = "V2M_ROLLOUT_KEY"  # the canary's hash key; replicas that share it agree on every client's variant
MIN_KEY_CHARS = 16
MAX_CLIENTS_TRACKED = 100_000  # per day, for the shadow cap per client (then the count starts over)
IDLE_POLL_S = 0.05  # how often a waiting shadow looks for an idle moment ...
SHADOW_IDLE_S = 0.25  # ... and how long the server must have been idle for it to start


class RolloutKeyError(UserError, ValueError):
    """V2M_ROLLOUT_KEY is set but too short to be a secret."""


def rollout_key(environ: dict[str, str] | None = None) -> bytes:
    raw = (os.environ if environ is None else environ).get(KEY_ENV, "")
    if not raw:
        return secrets.token_bytes(32)
    if len(raw) < MIN_KEY_CHARS:
        raise RolloutKeyError(f"{KEY_ENV} must have at least {MIN_KEY_CHARS} characters")
    return raw.encode()


def in_canary(key: bytes, client: str, share: float) -> bool:
    """Whether `client` is in the canary's `share`: the first 8 bytes of HMAC-SHA256(key, client) as a number
    in [0, 1). Uniform over clients, the same for one client every time, unpredictable without the key."""
    digest = hmac.new(key, client.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


class YieldToken(CancelToken):
    """A shadow's cancel token: it reads as cancelled as soon as a client's generation waits for the gate, so the
    shadow stops at its next decoding or diffusion step (models/cancel.py) and tries again later."""

    @property
    def cancelled(self) -> bool:
        return super().cancelled or GENERATION.wanted()


class Rollout:
    """Chooses who answers (route), and hands every answer to online scoring or to the shadow (served)."""

    def __init__(self, params: Params, root: Path, champion: ModelHolder, batcher: Batcher, metrics: Metrics,
                 challenger: ModelHolder | None = None, challenger_batcher: Batcher | None = None,
                 key: bytes | None = None, record: bool = True):
        self.params, self.root, self.cfg = params, Path(root), params.serve.rollout
        self.champion, self.batcher, self.metrics = champion, batcher, metrics
        self.challenger, self.challenger_batcher = challenger, challenger_batcher
        self.key = key if key is not None else rollout_key()
        self.online = Online(self.cfg, params.promotion, metrics, self.loaded, self.on_fail)
        self.shadow = Background("v2m-shadow", self.cfg.max_shadow_pending, self.cfg.background_nice) \
            if self.cfg.mode == "shadow" else None
        self.removed: dict[str, str] = {}  # canary challengers taken out -> why
        self._mirrored: dict[str, int] = {}  # pseudonym -> shadow pairs today (in memory only)
        self._mirrored_day = utc_day()
        self._day_key = secrets.token_bytes(32)  # pseudonyms for the per-client cap, never written anywhere
        self._rng = secrets.SystemRandom()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.keeper = Keeper(self.cfg, self.root) if self.cfg.keep_audio else None
        self.recorder = Recorder(params, self.root, self.online.ledger, metrics) if record else None

    # --- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """The challenger (loaded in the background like the champion), the workers and the recorder."""
        if self.challenger is not None:
            self.challenger.start()
        if self.challenger_batcher is not None:
            self.challenger_batcher.start()
        self.online.start()
        if self.shadow is not None:
            self.shadow.start()
        if self.recorder is not None:
            self.recorder.start()

    def stop(self) -> None:
        self._stopping.set()
        if self.challenger_batcher is not None:
            self.challenger_batcher.stop()
        if self.shadow is not None:
            self.shadow.stop()
        self.online.stop()
        if self.recorder is not None:
            self.recorder.stop()  # the last write: what was scored before shutdown reaches MLflow
        if self.challenger is not None:
            self.challenger.stop()

    def challenger_loaded(self, holder: ModelHolder) -> None:
        """The challenger holder's on_change: a canary challenger starts answering its share (gauge 1)."""
        if self.cfg.mode == "canary" and holder.current is not None:
            label = holder.current.label
            self.metrics.online_canary_active.labels(model=label).set(0 if label in self.removed else 1)

    # --- load -----------------------------------------------------------------------------------------------
    def loaded(self) -> bool:
        """The champion's queue is at least half full: background work steps aside."""
        return self.batcher.pending >= max(1, self.batcher.max_pending // 2)

    # --- routing --------------------------------------------------------------------------------------------
    def canary_label(self) -> str | None:
        """The challenger answering canary clients now, or None (not canary mode, not loaded, taken out, or the
        same version as the champion)."""
        if self.cfg.mode != "canary" or self.challenger is None or self.challenger.current is None:
            return None
        label = self.challenger.current.label
        champ = self.champion.current
        return None if label in self.removed or (champ is not None and champ.label == label) else label

    def route(self, client: str) -> tuple[str, Batcher]:
        """("champion" | "challenger", the batcher that answers). A canary never runs ahead of its evidence: while
        a window's worth of the challenger's answers wait for their scores (a busy scorer), its clients get the
        champion, so a bad challenger answers at most about two windows before it is judged and taken out."""
        label = self.canary_label()
        if label is not None and in_canary(self.key, client, self.cfg.share) \
                and self.online.unscored(label) < self.cfg.window:
            return "challenger", self.challenger_batcher
        return "champion", self.batcher

    # --- after an answer ------------------------------------------------------------------------------------
    def served(self, variant: str, client: str, req: Request, result: Result, latency_s: float) -> None:
        """Called once a request's result is ready, before its response goes out: only queue operations here."""
        self.online.served(variant, result, req.duration_s, latency_s)
        if variant == "champion" and self.shadow is not None and self._mirror(client, req, result):
            return  # the shadow scores the champion's output with the challenger's
        self.online.score_later(variant, req, result)

    def _mirror(self, client: str, req: Request, champion: Result) -> bool:
        """Queue a shadow of this request; False (with the outcome counted) when it is not sampled or dropped."""
        count = self.metrics.online_shadow.labels
        if self._rng.random() >= self.cfg.share:
            return False
        served = self.challenger.current if self.challenger is not None else None
        if served is None or served.label == champion.model:
            count(outcome="no_challenger").inc()
            return False
        pseudonym = self._pseudonym(client)
        if self._mirrored.get(pseudonym, 0) >= self.cfg.max_pairs_per_client:
            count(outcome="client_cap").inc()
            return False
        if self.loaded():
            count(outcome="dropped_load").inc()
            return False
        if not self.shadow.offer(lambda: self._shadow_job(req, champion)):
            count(outcome="dropped_full").inc()
            return False
        with self._lock:
            self._mirrored[pseudonym] = self._mirrored.get(pseudonym, 0) + 1
        count(outcome="queued").inc()  # then done, expired or failed (yielded: each time it gave way)
        return True

    def _pseudonym(self, client: str) -> str:
        """A per-day, per-process keyed hash of the client id: counts one client's shadows without keeping who."""
        with self._lock:
            if self._mirrored_day != utc_day() or len(self._mirrored) > MAX_CLIENTS_TRACKED:
                self._mirrored, self._mirrored_day, self._day_key = {}, utc_day(), secrets.token_bytes(32)
            return hmac.new(self._day_key, client.encode(), hashlib.sha256).hexdigest()[:16]

    def idle(self) -> bool:
        """No client's request queued or generating (any variant) for SHADOW_IDLE_S: a gap between requests of
        a busy server is shorter (clients send the next one at once), so a shadow does not start in it only to
        give way a moment later (what it computed before its first decoding step would be lost)."""
        return min(b.idle_for() for b in (self.batcher, self.challenger_batcher) if b is not None) >= SHADOW_IDLE_S

    def _shadow_job(self, req: Request, champion: Result) -> None:
        """Generate the challenger's output for a champion-answered request, in the machine's idle moments: wait
        until no client's request has been queued for SHADOW_IDLE_S, take the generation gate, and start over when
        a client's generation arrives meanwhile (YieldToken); give up after serve.timeout_s."""
        count = self.metrics.online_shadow.labels
        deadline = time.monotonic() + self.params.serve.timeout_s
        while True:
            served = self.challenger.current
            if served is None:
                count(outcome="no_challenger").inc()
                return
            if time.monotonic() > deadline or self._stopping.is_set():
                count(outcome="expired").inc()
                return
            if not self.idle() or not GENERATION.try_background():
                self._stopping.wait(IDLE_POLL_S)
                continue
            try:
                start = time.perf_counter()
                g = generate_batch_raw(served.backend, [replace(req, cancel=YieldToken())], self.params.generate)[0]
                took = time.perf_counter() - start
            except Cancelled:
                count(outcome="yielded").inc()  # a client came first; this shadow tries again when it is idle
                continue
            except Exception:
                log.exception("shadow generation failed on %s", served.label)
                count(outcome="failed").inc()
                return
            finally:
                GENERATION.release()
            break
        shadow = Result(g.audio, served.backend.sample_rate, served.label, took, g.raw)
        self.online.served("shadow", shadow, req.duration_s, took)
        pair = self.online.pair(req, champion, shadow)
        count(outcome="done").inc()
        if self.keeper is not None:
            self.keeper.offer(req, champion, shadow, pair)

    # --- failed bounds --------------------------------------------------------------------------------------
    def on_fail(self, model: str, variant: str, why: str) -> None:
        if variant == "challenger":
            self.take_out(model, why)
        elif variant == "champion" and self.cfg.auto_rollback:
            self.roll_back(model, why)
        else:
            log.warning("%s fails a bound (%s); auto_rollback is off: nothing done", model, why)

    def take_out(self, model: str, why: str) -> None:
        self.removed[model] = why
        self.metrics.online_canary_active.labels(model=model).set(0)
        self.metrics.online_canary_removals.labels(model=model).inc()
        self.online.ledger.event(model, "challenger", "online.canary_removed", why)
        log.warning("canary: %s taken out of the canary: %s; its clients get the champion", model, why)

    def roll_back(self, model: str, why: str) -> None:
        """Roll the champion back from `model` (NAME/VERSION) through the registry, if it is still champion."""
        from tasks.registry.promotion import rollback
        name, _, version = model.rpartition("/")
        ref = self.champion.ref.removeprefix("models:/")
        if ref != f"{name}@champion":
            log.warning("%s fails a bound (%s), but serve follows %s, not %s@champion: no rollback", model, why,
                        self.champion.ref, name)
            return
        try:
            current, previous = rollback(self.params, self.root, self.params.serve.backend, expected=version,
                                         reason=f"auto_rollback by v2m serve: {why}")
        except Exception as exc:  # already rolled back elsewhere, no previous champion, or no permission
            self.metrics.online_rollback_failures.labels(model=model).inc()
            log.error("auto_rollback of %s failed: %s: %s", model, type(exc).__name__, exc)
            return
        self.metrics.online_rollbacks.labels(model=model).inc()
        self.online.ledger.event(model, "champion", "online.rolled_back", why)
        log.warning("auto_rollback: champion %s rolled back to v%s: %s", model, previous, why)
        self.champion.poke()
