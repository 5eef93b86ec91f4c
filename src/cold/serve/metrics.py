"""Prometheus metrics of one server, in their own registry (several servers may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cold_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("cold_prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
        self.completion_tokens = Counter("cold_completion_tokens", "Tokens generated.", registry=r)
        self.disconnects = Counter("cold_client_disconnects", "Requests whose client went away before the "
                                   "whole answer (not errors: 499, or a stream closed early).", registry=r)
        self.cancelled = Counter("cold_cancelled_sequences", "Sequences dropped because their client went away.",
                                 registry=r)
        self.queue_length = Gauge("cold_queue_length", "Sequences waiting to join the running batch.", registry=r)
        self.running = Gauge("cold_running_sequences", "Sequences in the running batch.", registry=r)
        self.step_seconds = Histogram("cold_step_seconds", "Latency of one decode step of the running batch.",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.prefill_seconds = Histogram("cold_prefill_seconds", "Latency of prefilling sequences that join the batch.",
                                         buckets=_STEP_BUCKETS, registry=r)
        self.batch_size = Histogram("cold_step_sequences", "Sequences decoded per step.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.request_seconds = Histogram("cold_request_seconds", "End-to-end latency of completed generation requests.",
                                         buckets=_REQUEST_BUCKETS, registry=r)
        self.first_token_seconds = Histogram("cold_time_to_first_token_seconds",
                                             "Time from a request's arrival to its first generated text.",
                                             buckets=_REQUEST_BUCKETS, registry=r)

        self.broken_pairs = Counter("cold_broken_pairs", "Tries of CoLD pairs that fell out of step inside vLLM "
                                    "(--engine vllm; each is retried once).", registry=r)
        self.failed_pairs = Counter("cold_failed_pairs", "CoLD pairs whose retry fell out of step too (answered 500).",
                                    registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
