"""The server's Prometheus figures (`GET /metrics`, the text format), one registry per server.

Requests and errors by endpoint, latency and time-to-first-token histograms, generated tokens (a
counter, whose rate is tokens/s, and a gauge of the last few seconds' rate for a glance), rows per
decode step (the batch size), requests waiting and sequences running.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: one timestamp per label set is noise for a scrape

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pipeline_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"], registry=r)
        self.errors = Counter("pipeline_request_errors", "requests answered with an error (4xx, 5xx), by endpoint and status code", ["endpoint", "status"], registry=r)
        self.latency = Histogram("pipeline_request_latency_seconds", "time from a request's arrival to its last byte", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("pipeline_time_to_first_token_seconds", "time from a generation request's arrival to its first token", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("pipeline_generated_tokens", "tokens generated, by model", ["model"], registry=r)
        self.tokens_per_s = Gauge("pipeline_generated_tokens_per_second", f"tokens generated per second over the last {RATE_WINDOW_S:g} s, by model", ["model"], registry=r)
        self.batch_size = Histogram("pipeline_batch_size", "sequences decoded together in one step, by model", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("pipeline_queue_depth", "requests waiting to join the batch, by model", ["model"], registry=r)
        self.running = Gauge("pipeline_running_sequences", "sequences being generated, by model", ["model"], registry=r)
        self._recent: dict[str, deque] = {}
        self._lock = threading.Lock()

    def generated_tokens(self, model: str, count: int) -> None:
        """Count tokens of one decode step and refresh the model's recent rate."""
        self.tokens.labels(model).inc(count)
        now = time.monotonic()
        with self._lock:
            recent = self._recent.setdefault(model, deque())
            recent.append((now, count))
            while recent and recent[0][0] < now - RATE_WINDOW_S:
                recent.popleft()
            span = max(now - recent[0][0], 1.0) if recent else RATE_WINDOW_S
            self.tokens_per_s.labels(model).set(sum(c for _, c in recent) / span)

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
