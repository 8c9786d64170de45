"""Prometheus metrics, named by Prometheus conventions (``conclave_`` prefix, base units,
``_total`` counters, ``_seconds`` durations).

Each app gets its own registry, so several servers (or tests) in one process
never share counters.  Labels stay low-cardinality: route templates and model
names, never user ids or request ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from conclave.llm.types import ChatResponse

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                    30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "conclave_http_requests_total", "HTTP requests by route, method and status.",
            ["route", "method", "status"], registry=r)
        self.http_duration = Histogram(
            "conclave_http_request_duration_seconds", "HTTP request duration.",
            ["route", "method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "conclave_http_requests_in_flight", "Requests being served.", registry=r)
        self.llm_calls = Counter(
            "conclave_llm_calls_total", "Model calls by model, provider and outcome.",
            ["model", "provider", "outcome"], registry=r)
        self.llm_tokens = Counter(
            "conclave_llm_tokens_total", "Tokens by model and direction (input, output).",
            ["model", "direction"], registry=r)
        self.llm_cost = Counter(
            "conclave_llm_cost_usd_total", "Spend in US dollars by model.", ["model"],
            registry=r)
        self.llm_latency = Histogram(
            "conclave_llm_call_duration_seconds", "Model call duration.", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.llm_ttft = Histogram(
            "conclave_llm_time_to_first_token_seconds", "Time to first streamed token.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.refusals = Counter(
            "conclave_refusals_total", "Requests refused before a model call, by reason "
            "(budget_exceeded, rate_limit_exceeded, backend_unavailable, ...).", ["reason"],
            registry=r)

    def observe_call(self, resp: ChatResponse, outcome: str) -> None:
        self.llm_calls.labels(resp.model, resp.provider, outcome).inc()
        self.llm_tokens.labels(resp.model, "input").inc(resp.usage.input_tokens)
        self.llm_tokens.labels(resp.model, "output").inc(resp.usage.output_tokens)
        if resp.cost_usd:
            self.llm_cost.labels(resp.model).inc(resp.cost_usd)
        self.llm_latency.labels(resp.model).observe(resp.latency_ms / 1000)
        if resp.ttft_ms is not None:
            self.llm_ttft.labels(resp.model).observe(resp.ttft_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
