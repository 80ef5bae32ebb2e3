"""Prometheus metrics of one server (its own registry, so several apps in a process never collide)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-exported for app.py)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "budgetlm_request_seconds", "Request latency (to the last byte) by route", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "budgetlm_time_to_first_token_seconds", "Time from request to the first generated token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens_generated = Counter("budgetlm_tokens_generated", "Tokens sampled by the model", registry=r)
        self.prompt_tokens = Counter("budgetlm_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.active_requests = Gauge("budgetlm_active_requests", "Requests being answered", registry=r)
        self.queue_depth = Gauge("budgetlm_queue_depth", "Sequences waiting for a batch slot", registry=r)
        self.batch_size = Gauge("budgetlm_batch_size", "Sequences in the running batch", registry=r)
        self.batch_sizes = Histogram("budgetlm_decode_batch_size", "Sequences per decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.errors = Counter("budgetlm_errors", "Error responses by status code", ["status"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
