"""Prometheus metrics of one server (own CollectorRegistry, so several apps can live in one process: tests).

Names follow Prometheus' conventions: a `v2m_` prefix, base units in the name (`_seconds`), counters exposed
with `_total`, ratios and scores unit-free. The online metrics (tasks/serving/online.py) carry the word `online`
and the labels `model` (NAME/VERSION, as the X-V2M-Model header) and `variant` (champion: answered a client;
challenger: answered a canary client; shadow: generated beside the champion, never returned).
infra/grafana/v2m-serve.json charts them; tests/flows/test_rollout.py checks that every query it holds names a
metric this module exports.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
RTF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)
FIT_BUCKETS = (-0.5, -0.25, -0.1, 0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1)  # harmonic and rhythm fit
SANITY_BUCKETS = (0.5,)  # each output scores 0 or 1: _sum / _count is the share of sane outputs
ONLINE = ["model", "variant"]


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("v2m_requests", "Generate requests by HTTP status", ["status"], registry=r)
        self.latency = Histogram("v2m_request_latency_seconds", "Generate latency, queueing included",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.rtf = Histogram("v2m_realtime_factor", "Generation time / generated audio time (below 1 = faster "
                             "than real time), per request", buckets=RTF_BUCKETS, registry=r)
        self.cancelled = Counter("v2m_cancelled", "Requests whose client left (or that timed out): dropped from "
                                 "the queue, or stopped while generating", ["stage"], registry=r)
        self.queue_depth = Gauge("v2m_queue_depth", "Requests queued or running", registry=r)
        self.batch_size = Histogram("v2m_batch_size", "Requests per model call", buckets=(1, 2, 3, 4, 6, 8, 16),
                                    registry=r)
        self.model = Gauge("v2m_model_info", "The model being served (value 1)", ["model", "backend"], registry=r)
        self.load_failures = Counter("v2m_model_load_failures", "Model versions that failed to load", registry=r)
        self.load_error = Gauge("v2m_model_load_error", "1 while the newest target failed to load and an older "
                                "version keeps serving", ["model"], registry=r)

        # online: every served (and shadow) output scored without a reference (tasks/serving/online.py)
        self.online_harmonic_fit = Histogram("v2m_online_harmonic_fit", "Consonance of the output with the sung "
                                             "pitch class, per scored output", ONLINE, buckets=FIT_BUCKETS, registry=r)
        self.online_rhythm_fit = Histogram("v2m_online_rhythm_fit", "Onset alignment of the output with the vocal, "
                                           "per scored output", ONLINE, buckets=FIT_BUCKETS, registry=r)
        self.online_sanity_pass = Histogram("v2m_online_sanity_pass", "1 when the raw output is finite, unclipped "
                                            "and not silent, else 0", ONLINE, buckets=SANITY_BUCKETS, registry=r)
        self.online_latency = Histogram("v2m_online_latency_seconds", "Generate latency per model (shadow: the "
                                        "challenger's generation time)", ONLINE, buckets=LATENCY_BUCKETS, registry=r)
        self.online_rtf = Histogram("v2m_online_realtime_factor", "Generation time / audio time per model", ONLINE,
                                    buckets=RTF_BUCKETS, registry=r)
        self.online_skipped = Counter("v2m_online_scores_skipped", "Outputs left unscored: the scoring queue was "
                                      "full or the server loaded", ["reason"], registry=r)
        self.online_shadow = Counter("v2m_online_shadow_requests", "Requests sampled for the shadow challenger, by "
                                     "outcome", ["outcome"], registry=r)
        self.online_pairs = Counter("v2m_online_shadow_pairs", "Scored (champion, challenger) pairs on the same "
                                    "request", ["champion", "challenger"], registry=r)
        self.online_rollbacks = Counter("v2m_online_rollbacks", "Automatic rollbacks of a champion whose online "
                                        "scores fell below a bound (alert on any increase)", ["model"], registry=r)
        self.online_rollback_failures = Counter("v2m_online_rollback_failures", "Automatic rollbacks that the "
                                                "registry refused or could not do", ["model"], registry=r)
        self.online_canary_active = Gauge("v2m_online_canary_active", "1 while this challenger answers its share "
                                          "of clients, 0 once taken out", ["model"], registry=r)
        self.online_canary_removals = Counter("v2m_online_canary_removals", "Canary challengers taken out for "
                                              "failing a bound", ["model"], registry=r)
        self.online_recorded = Counter("v2m_online_recorder_flushes", "Writes of online.* into MLflow, by outcome",
                                       ["outcome"], registry=r)

    def serving(self, label: str, backend: str) -> None:
        self.model.clear()
        self.model.labels(model=label, backend=backend).set(1)

    def load_failed(self, label: str | None) -> None:
        self.load_error.clear()
        if label is not None:
            self.load_failures.inc()
            self.load_error.labels(model=label).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
