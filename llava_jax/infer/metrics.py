"""Prometheus metrics of `llava-jax serve` (GET /metrics), with prometheus-client.

Each server has its own registry (several servers may live in one process, as in the tests).
Queue length and busy slots are read from the scheduler when scraped; latencies are observed in
the engine thread as tokens are chosen, so they do not include the HTTP layer's delays.
"""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few ms (one CPU/TPU decode step) to minutes (a long queue on a CPU).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llava_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("llava_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("llava_completion_tokens", "Tokens generated", registry=r)
        self.finished = Counter("llava_finished", "Requests ended by the scheduler, by reason", ["reason"],
                                registry=r)
        queue = Gauge("llava_queue_length", "Requests waiting for a decode slot", registry=r)
        queue.set_function(lambda: scheduler.queue_length)
        ahead = Gauge("llava_prefilled_waiting", "Prefilled requests (first token sent) waiting for a slot",
                      registry=r)
        ahead.set_function(lambda: getattr(scheduler, "prefilled_waiting", 0))
        phases = Gauge("llava_engine_seconds", "Wall seconds the slot engine spent in prefill / decode calls",
                       ["phase"], registry=r)
        stats = getattr(scheduler, "stats", {})
        for phase in ("prefill", "decode"):
            phases.labels(phase).set_function(lambda key=f"{phase}_seconds": float(stats.get(key, 0.0)))
        busy = Gauge("llava_busy_slots", "Decode slots in use", registry=r)
        busy.set_function(lambda: scheduler.busy_slots)
        Gauge("llava_decode_slots", "Decode slots (--max-batch)", registry=r).set(scheduler.max_batch)
        self.ttft = Histogram("llava_time_to_first_token_seconds", "From accepting a request to its first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("llava_inter_token_latency_seconds", "Between consecutive tokens of one answer",
                             buckets=_ITL_BUCKETS, registry=r)

    def watch(self, request, forward):
        """An `on_event` for `request` that records its latencies and tokens, then calls `forward`."""
        last = [None]

        def on_event(kind, value):
            if kind == "token":
                now = time.monotonic()
                if last[0] is None:
                    self.ttft.observe(now - request.submitted_at)
                else:
                    self.itl.observe(now - last[0])
                last[0] = now
                self.completion_tokens.inc()
            elif kind == "done":
                self.finished.labels(value).inc()
            elif kind == "error":
                self.finished.labels("error").inc()
            forward(kind, value)

        return on_event

    def render(self) -> bytes:
        return generate_latest(self.registry)
