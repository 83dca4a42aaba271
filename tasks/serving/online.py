"""Online metrics: every served output scored without a reference, off the response path.

    score()     harmonic fit and rhythm fit of the output against the request's vocal, sanity of the raw output:
                the evaluation's own functions (tasks/evaluation), as `eval/*` uses them
    Background  a bounded queue and one worker thread at a lower CPU priority (serve.rollout.background_nice)
    CpuBudget   scoring takes at most serve.rollout.score_cpu cores on average (a bucket of CPU seconds)
    Bounds      the last `window` scores of a version against serve.rollout.min_* (bootstrap, as the gates do)
    Ledger      what leaves the process: per (model, variant, day) tallies and the shadow pairs; metrics only
    Online      the whole: observe, score later, judge, remember for the recorder (tasks/serving/recorder.py)

Skipped first under load: an output is not scored when the scoring queue is full or the server's queue is at
least half full (v2m_online_scores_skipped_total{reason}; a canary challenger's outputs only when the queue is
full: they are its evidence); a response never waits for its score. Nothing of a
request but its scores leaves this module: no audio, no prompt, no client id.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from models.longform import Request
from tasks.evaluation.harmony import ChromaFrames, analyse, harmonic_fit
from tasks.evaluation.metrics import sanity
from tasks.evaluation.paired import paired_mean_ci
from tasks.evaluation.rhythm import rhythm_fit
from tasks.serving.batcher import Result
from tasks.serving.metrics import Metrics
from v2m.config import PromotionConfig
from v2m.config_serve import ONLINE_METRICS, RolloutConfig

log = logging.getLogger("v2m.serve")
LATENCY_SAMPLES = 5000  # per (model, variant, day): enough for a p95, bounded memory


def score(vocal: np.ndarray | None, vocal_sr: int, audio: np.ndarray, raw: np.ndarray | None, sr: int,
          vocal_frames: ChromaFrames | None = None) -> dict[str, float]:
    """{harmonic_fit, rhythm_fit, sanity_pass} of one output. The vocal is cut to the output's length (a request
    may ask for less than its vocal); a text-only request has no fit (NaN). Sanity reads the raw output."""
    out = {"sanity_pass": sanity(audio if raw is None else raw, sr)["sanity_pass"]}
    if vocal is None:
        return out | {"harmonic_fit": math.nan, "rhythm_fit": math.nan}
    vocal = vocal[: round(len(audio) / sr * vocal_sr)]
    frames = vocal_frames or analyse(vocal, vocal_sr)
    return out | {"harmonic_fit": harmonic_fit(frames, analyse(audio, sr)),
                  "rhythm_fit": rhythm_fit(vocal, audio, vocal_sr, sr)}


def lower_priority(nice: int) -> None:
    """This thread (and the threads it starts, torch's included) at `nice` above the process: on a busy CPU the
    scheduler gives it what the request threads leave. Linux sets nice per thread."""
    if nice:
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except (AttributeError, OSError):  # not Linux, or not allowed: the queue bounds still hold
            pass


class Background:
    """A bounded queue of jobs and one worker thread: offer() never blocks and says whether the job was taken."""

    def __init__(self, name: str, max_pending: int, nice: int):
        self.name, self.nice = name, nice
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(max_pending)
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def offer(self, job: Callable[[], None]) -> bool:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        self._idle.clear()
        return True

    def start(self) -> None:
        def run() -> None:
            lower_priority(self.nice)
            while not self._stop.is_set():
                try:
                    job = self._queue.get(timeout=0.5)
                except queue.Empty:
                    self._idle.set()
                    continue
                if job is None:
                    break
                try:
                    job()
                except Exception:  # a failing job must not stop the worker
                    log.exception("%s: background job failed", self.name)
                if self._queue.empty():
                    self._idle.set()
        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def wait_idle(self, timeout_s: float) -> bool:
        return self._idle.wait(timeout_s)

    def stop(self) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout=30)


class CpuBudget:
    """At most `cores` CPU seconds per wall second on average, with `burst_s` of credit: a worker spends what its
    thread used (time.thread_time: waiting for a busy machine costs nothing) and waits while in debt."""

    def __init__(self, cores: float, burst_s: float = 2.0):
        self.cores, self.burst_s = cores, burst_s
        self._tokens, self._at = burst_s, time.monotonic()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst_s, self._tokens + (now - self._at) * self.cores)
        self._at = now

    def spend(self, cpu_s: float) -> None:
        with self._lock:
            self._refill()
            self._tokens -= cpu_s

    def wait(self, stop: threading.Event) -> None:
        while True:
            with self._lock:
                self._refill()
                debt = -self._tokens
            if debt <= 0 or stop.wait(debt / self.cores):
                return


class Bounds:
    """A version fails when the upper confidence bound of its mean online score over its last `window` scored
    outputs is below the bound: a real drop, not the noise of a few outputs. Intervals: the gates' bootstrap
    (tasks/evaluation/paired.py) at promotion.confidence, of the mean itself (paired against 0)."""

    def __init__(self, cfg: RolloutConfig, promo: PromotionConfig):
        self.cfg, self.promo = cfg, promo
        self.limits = {"sanity_pass": cfg.min_sanity_pass, "harmonic_fit": cfg.min_harmonic_fit}

    def judge(self, scores: list[dict[str, float]]) -> str | None:
        """None while the scores hold up, else why not (the first bound failed, with its interval)."""
        for metric, bound in self.limits.items():
            values = np.array([s[metric] for s in scores], np.float64)
            values = values[np.isfinite(values)]
            if values.size < 2:  # text-only traffic has no harmonic fit: nothing to judge
                continue
            ci = paired_mean_ci(values, np.zeros_like(values), self.promo.bootstrap_resamples,
                                self.promo.bootstrap_seed, self.promo.confidence)
            if ci.high < bound:
                return (f"online {metric} {ci.estimate:.3f} [{ci.low:.3f}, {ci.high:.3f}] n={ci.n} over its last "
                        f"{len(scores)} outputs is below {bound:g} (serve.rollout.min_{metric})")
        return None


def utc_day(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


@dataclass
class Tally:
    """One (model, variant, day): served requests, their latencies and real-time factors, and the scores."""
    requests: int = 0
    latencies: list[float] = field(default_factory=list)
    rtf_sum: float = 0.0
    scored: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ONLINE_METRICS, 0.0))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ONLINE_METRICS, 0))
    events: dict[str, str] = field(default_factory=dict)  # online.rolled_back / online.canary_removed -> why

    def summary(self) -> dict[str, float]:
        """The online.* metrics of this day so far (NaN-free: a metric without values is left out)."""
        out = {"online.requests": float(self.requests), "online.scored": float(self.scored)}
        if self.requests:
            out["online.realtime_factor"] = self.rtf_sum / self.requests
            out["online.latency_p50_s"], out["online.latency_p95_s"] = (
                float(v) for v in np.quantile(self.latencies, [0.5, 0.95]))
        for m in ONLINE_METRICS:
            if self.counts[m]:
                out[f"online.{m}"] = self.sums[m] / self.counts[m]
        return out


@dataclass(frozen=True)
class Pair:
    champion: str     # NAME/VERSION
    challenger: str
    day: str
    scores: dict[str, dict[str, float]]  # "champion" / "challenger" -> score()


class Ledger:
    """What the recorder writes to MLflow: per-day tallies (cumulative) and the pairs not yet written."""

    def __init__(self, max_pairs: int = 20000):
        self._tallies: dict[tuple[str, str, str], Tally] = {}
        self._pairs: list[Pair] = []
        self.max_pairs, self.lost_pairs = max_pairs, 0
        self._lock = threading.Lock()

    def _tally(self, model: str, variant: str) -> Tally:
        return self._tallies.setdefault((model, variant, utc_day()), Tally())

    def served(self, model: str, variant: str, latency_s: float, rtf: float) -> None:
        with self._lock:
            t = self._tally(model, variant)
            t.requests += 1
            t.rtf_sum += rtf
            if len(t.latencies) < LATENCY_SAMPLES:
                t.latencies.append(latency_s)
            else:  # reservoir: every latency of the day equally likely to be kept
                k = np.random.default_rng().integers(0, t.requests)
                if k < LATENCY_SAMPLES:
                    t.latencies[k] = latency_s

    def scored(self, model: str, variant: str, scores: dict[str, float]) -> None:
        with self._lock:
            t = self._tally(model, variant)
            t.scored += 1
            for m in ONLINE_METRICS:
                if math.isfinite(scores[m]):
                    t.sums[m] += scores[m]
                    t.counts[m] += 1

    def event(self, model: str, variant: str, name: str, why: str) -> None:
        with self._lock:
            self._tally(model, variant).events[name] = why

    def pair(self, p: Pair) -> None:
        with self._lock:
            self._pairs.append(p)
            if len(self._pairs) > self.max_pairs:  # MLflow unreachable for long: keep the newest
                self.lost_pairs += len(self._pairs) - self.max_pairs
                del self._pairs[: len(self._pairs) - self.max_pairs]

    def take(self) -> tuple[dict[tuple[str, str, str], dict], list[Pair]]:
        """(summary and events of every tally, the pairs written since the last take); tallies of past days are
        handed over one last time and forgotten."""
        with self._lock:
            today = utc_day()
            out = {k: {"metrics": t.summary(), "events": dict(t.events)} for k, t in self._tallies.items()}
            self._tallies = {k: t for k, t in self._tallies.items() if k[2] == today}
            pairs, self._pairs = self._pairs, []
        return out, pairs

    def put_back(self, pairs: list[Pair]) -> None:
        """Pairs whose write failed: first in line for the next one."""
        with self._lock:
            self._pairs = pairs + self._pairs


class Online:
    """Observes every answered request, scores outputs in the background, and judges each version's window.
    on_fail(model, variant, reason) is called (in the scoring thread) when a champion or canary challenger fails
    a bound; shadow outputs are scored and recorded, never judged (they answered nobody)."""

    def __init__(self, cfg: RolloutConfig, promo: PromotionConfig, metrics: Metrics, loaded: Callable[[], bool],
                 on_fail: Callable[[str, str, str], None] = lambda model, variant, reason: None):
        self.cfg, self.metrics, self.loaded, self.on_fail = cfg, metrics, loaded, on_fail
        self.scorer = Background("v2m-online-score", cfg.max_score_pending, cfg.background_nice)
        self.budget = CpuBudget(cfg.score_cpu)
        self.bounds = Bounds(cfg, promo)
        self.ledger = Ledger()
        self._windows: dict[tuple[str, str], deque] = {}
        self._unscored: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        self.scorer.start()

    def stop(self) -> None:
        self._stop.set()
        self.scorer.stop()

    def served(self, variant: str, result: Result, duration_s: float, latency_s: float) -> None:
        """A request was answered (or a shadow generated): latency and real-time factor, at once (cheap)."""
        rtf = result.seconds / duration_s
        self.metrics.online_latency.labels(model=result.model, variant=variant).observe(latency_s)
        self.metrics.online_rtf.labels(model=result.model, variant=variant).observe(rtf)
        self.ledger.served(result.model, variant, latency_s, rtf)

    def score_later(self, variant: str, req: Request, result: Result) -> None:
        """Queue the output for scoring, unless the server is loaded or the queue full (then it is skipped). A
        canary challenger's outputs are scored under load too: they are the only evidence that takes a bad one out,
        and skipping them left a silent canary answering 91 requests instead of its window of 4 on a busy server."""
        if not self.cfg.score_cpu:
            return
        reason = "load" if variant != "challenger" and self.loaded() else None
        if reason is None and not self.scorer.offer(lambda: self._scored_job(variant, req, result)):
            reason = "queue_full"
        if reason:
            self.metrics.online_skipped.labels(reason=reason).inc()
        elif variant == "challenger":
            with self._lock:
                self._unscored[result.model] += 1

    def unscored(self, model: str) -> int:
        """A canary challenger's answers whose scores are queued and not yet in (rollout.route bounds them)."""
        return self._unscored[model]

    def _scored_job(self, variant: str, req: Request, result: Result) -> None:
        try:
            with self._budgeted():
                scores = score(req.vocal, req.vocal_sr, result.audio, result.raw, result.sample_rate)
            self._record(result.model, variant, scores)
        finally:  # judged (or failed): no longer holds the canary back
            if variant == "challenger":
                with self._lock:
                    self._unscored[result.model] -= 1

    def pair(self, req: Request, champion: Result, challenger: Result) -> Pair:
        """Score both outputs of one shadowed request (the vocal analysed once) and remember the pair."""
        with self._budgeted():
            frames = None if req.vocal is None else analyse(
                req.vocal[: round(len(champion.audio) / champion.sample_rate * req.vocal_sr)], req.vocal_sr)
            s = {name: score(req.vocal, req.vocal_sr, r.audio, r.raw, r.sample_rate, frames)
                 for name, r in (("champion", champion), ("challenger", challenger))}
        self._record(champion.model, "champion", s["champion"])
        self._record(challenger.model, "shadow", s["challenger"])
        p = Pair(champion.model, challenger.model, utc_day(), s)
        self.ledger.pair(p)
        self.metrics.online_pairs.labels(champion=champion.model, challenger=challenger.model).inc()
        return p

    @contextmanager
    def _budgeted(self) -> Iterator[None]:
        """Wait while scoring is over its CPU budget, then charge what this block used."""
        self.budget.wait(self._stop)
        t0 = time.thread_time()
        try:
            yield
        finally:
            self.budget.spend(time.thread_time() - t0)

    def _record(self, model: str, variant: str, scores: dict[str, float]) -> None:
        labels = {"model": model, "variant": variant}
        for m, hist in (("harmonic_fit", self.metrics.online_harmonic_fit),
                        ("rhythm_fit", self.metrics.online_rhythm_fit),
                        ("sanity_pass", self.metrics.online_sanity_pass)):
            if math.isfinite(scores[m]):
                hist.labels(**labels).observe(scores[m])
        self.ledger.scored(model, variant, scores)
        if variant == "shadow":
            return
        window = self._windows.setdefault((model, variant), deque(maxlen=self.cfg.window))
        window.append(scores)
        if len(window) == self.cfg.window and (why := self.bounds.judge(list(window))):
            window.clear()  # judged: the next verdict on this version needs a whole new window
            self.on_fail(model, variant, why)
