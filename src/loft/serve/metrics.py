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


def summarise(text: str) -> list[dict[str, object]]:
    """Per-model totals from a server's ``/metrics`` text (what ``Metrics.render`` writes):
    ``{model, requests, errors, prompt_tokens, completion_tokens, latency_mean_s, latency_p50_s,
    latency_p95_s}``, busiest first. Quantiles are estimated from the histogram's buckets as
    Prometheus's ``histogram_quantile`` does (linear within a bucket)."""
    from prometheus_client.parser import text_string_to_metric_families

    rows: dict[str, dict[str, float]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}

    def row(model: str) -> dict[str, float]:
        return rows.setdefault(model, {
            "requests": 0.0, "errors": 0.0, "prompt_tokens": 0.0, "completion_tokens": 0.0,
            "latency_sum": 0.0, "latency_count": 0.0,
        })  # fmt: skip

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            model = s.labels.get("model")
            if model is None:
                continue
            if s.name == "loft_requests_total":
                row(model)["requests"] += s.value
                if int(s.labels.get("status", "200")) >= 400:
                    row(model)["errors"] += s.value
            elif s.name == "loft_tokens_total":
                row(model)[f"{s.labels.get('kind')}_tokens"] = s.value
            elif s.name == "loft_request_latency_seconds_sum":
                row(model)["latency_sum"] = s.value
            elif s.name == "loft_request_latency_seconds_count":
                row(model)["latency_count"] = s.value
            elif s.name == "loft_request_latency_seconds_bucket":
                buckets.setdefault(model, []).append((float(s.labels["le"]), s.value))
    out: list[dict[str, object]] = []
    for model, r in rows.items():
        count = r["latency_count"]
        cumulative = sorted(buckets.get(model, []))
        out.append({
            "model": model,
            "requests": int(r["requests"]),
            "errors": int(r["errors"]),
            "prompt_tokens": int(r.get("prompt_tokens", 0)),
            "completion_tokens": int(r.get("completion_tokens", 0)),
            "latency_mean_s": r["latency_sum"] / count if count else None,
            "latency_p50_s": _quantile(0.5, cumulative),
            "latency_p95_s": _quantile(0.95, cumulative),
        })  # fmt: skip
    return sorted(out, key=lambda d: (-int(d["requests"]), str(d["model"])))  # type: ignore[call-overload]


def _quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile(q)`` over ``[(le, cumulative count)]`` sorted by ``le``."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in cumulative:
        if count >= rank:
            if le == float("inf"):
                return lower_le  # beyond the largest finite bucket: its bound is all we know
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return None
