"""Prometheus metrics for the model server, in a registry of its own (no global state).

The ``model`` label is the resolved ``name:version`` (or the base model's name); requests that
fail before a model is resolved (401, 403, 429, bad JSON) are counted under ``model="-"`` so that
unauthenticated callers cannot grow the label set with made-up names.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)

UNRESOLVED = "-"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Counters, histograms and gauges of one server; ``render()`` gives the scrape body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "loft_requests", "Requests by model and HTTP status.", ["model", "status"], registry=r
        )
        self.tokens = Counter(
            "loft_tokens", "Tokens processed, by model and kind.", ["model", "kind"], registry=r
        )
        self.errors = Counter(
            "loft_request_errors", "Failed requests by model and error type.", ["model", "type"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "loft_request_latency_seconds", "Request latency (to the last byte).", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "loft_time_to_first_token_seconds", "Time from request to the first output token.",
            ["model"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.feedback = Summary(
            "loft_feedback_score", "Scores posted to /v1/feedback (0-1), by the rated model.",
            ["model"], registry=r,
        )  # fmt: skip
        self.resident_adapters = Gauge(
            "loft_resident_adapters", "Adapters currently loaded in the engine.", registry=r
        )
        self.queue_depth = Gauge(
            "loft_queue_depth", "Sequences waiting for or in a batch.", registry=r
        )
        self.in_flight = Gauge(
            "loft_requests_in_flight", "Generation requests being served now.", registry=r
        )

    def observe_request(
        self,
        model: str | None,
        status: int,
        latency_s: float,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        error_type: str | None = None,
    ) -> None:
        label = model or UNRESOLVED
        self.requests.labels(model=label, status=str(status)).inc()
        self.latency.labels(model=label).observe(latency_s)
        if prompt_tokens:
            self.tokens.labels(model=label, kind="prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(model=label, kind="completion").inc(completion_tokens)
        if error_type:
            self.errors.labels(model=label, type=error_type).inc()

    def observe_first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model=model).observe(seconds)

    def observe_feedback(self, model: str, score: float) -> None:
        self.feedback.labels(model=model).observe(score)

    def set_gauges(self, *, resident: int, queue_depth: int, in_flight: int) -> None:
        self.resident_adapters.set(resident)
        self.queue_depth.set(queue_depth)
        self.in_flight.set(in_flight)

    def render(self) -> tuple[bytes, str]:
        """(Prometheus text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
