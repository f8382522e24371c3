"""The server's counters, in Prometheus' text format at ``GET /metrics`` (``prometheus_client``, a registry of
the server's own, so two servers in one process do not share counts).

``loraq_requests_total{model,status}`` (status: ok, cancelled, or the HTTP status of a refusal),
``loraq_prompt_tokens_total{model}``, ``loraq_generation_tokens_total{model}`` (``model``: the base's name or the
adapter's, as the request named it), ``loraq_queue_depth``, ``loraq_batch_rows``,
``loraq_time_to_first_token_seconds`` and ``loraq_request_seconds`` (histograms),
``loraq_adapter_events_total{adapter,event}`` (load, eviction, unload), ``loraq_decode_steps_total`` and
``loraq_decode_rows_total`` (rows summed over steps: their ratio is the mean batch).
"""
from __future__ import annotations

import time

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The counters (see the module docstring)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraq_requests", "requests answered", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("loraq_prompt_tokens", "prompt tokens of finished requests", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("loraq_generation_tokens", "tokens generated", ["model"], registry=r)
        self.queue_depth = Gauge("loraq_queue_depth", "requests waiting to join the batch", registry=r)
        self.batch_rows = Gauge("loraq_batch_rows", "rows decoding in the batch", registry=r)
        self.time_to_first_token = Histogram("loraq_time_to_first_token_seconds", "from arrival to first token",
                                             buckets=BUCKETS, registry=r)
        self.latency = Histogram("loraq_request_seconds", "from arrival to the last token", buckets=BUCKETS,
                                 registry=r)
        self.decode_steps = Counter("loraq_decode_steps", "decode steps run", registry=r)
        self.decode_rows = Counter("loraq_decode_rows", "rows decoded, summed over steps (/ steps: the mean batch)",
                                   registry=r)
        self.adapter_events = Counter("loraq_adapter_events", "adapters loaded, evicted, unloaded",
                                      ["adapter", "event"], registry=r)

    def finished(self, pending) -> None:
        job = pending.job
        self.requests.labels(job.model, "ok").inc()
        self.prompt_tokens.labels(job.model).inc(sum(len(p) for p in job.prompts))  # as usage counts them
        self.generation_tokens.labels(job.model).inc(sum(len(c.row.result.tokens) for c in pending.choices))
        self.latency.observe(time.monotonic() - pending.submitted)

    def cancelled(self, pending) -> None:
        self.requests.labels(pending.job.model, "cancelled").inc()

    def refused(self, model: str, status: int) -> None:
        self.requests.labels(model or "", str(status)).inc()

    def adapter_event(self, event: str, adapter: str) -> None:
        self.adapter_events.labels(adapter, event).inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
