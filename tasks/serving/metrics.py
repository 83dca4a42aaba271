"""Prometheus metrics of one server (own CollectorRegistry, so several apps can live in one process: tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
RTF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)


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
