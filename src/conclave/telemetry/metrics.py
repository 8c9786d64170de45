"""Prometheus metrics, named by Prometheus conventions (``conclave_`` prefix, base units,
``_total`` counters, ``_seconds`` durations).

Each app gets its own registry, so several servers (or tests) in one process
never share counters.  Labels stay low-cardinality: route templates and model
names, never user ids or request ids.  Because they are, the labelled children
are kept in dicts after their first use: ``labels()`` validates and locks on
every call, which on the per-request path cost more than the increments.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from conclave.llm.types import ChatResponse, EmbedResponse

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

        self._http: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._calls: dict[tuple[str, str, str], Any] = {}
        self._models: dict[str, tuple[Any, ...]] = {}

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._http.get(key)
        if children is None:
            children = self._http[key] = (
                self.http_requests.labels(route, method, str(status)),
                self.http_duration.labels(route, method))
        children[0].inc()
        children[1].observe(seconds)

    def observe_call(self, resp: ChatResponse | EmbedResponse, outcome: str) -> None:
        key = (resp.model, resp.provider, outcome)
        calls = self._calls.get(key)
        if calls is None:
            calls = self._calls[key] = self.llm_calls.labels(*key)
        per_model = self._models.get(resp.model)
        if per_model is None:
            m = resp.model
            per_model = self._models[m] = (
                self.llm_tokens.labels(m, "input"), self.llm_tokens.labels(m, "output"),
                self.llm_cost.labels(m), self.llm_latency.labels(m), self.llm_ttft.labels(m))
        tokens_in, tokens_out, cost, latency, ttft = per_model
        calls.inc()
        tokens_in.inc(resp.usage.input_tokens)
        tokens_out.inc(resp.usage.output_tokens)
        if resp.cost_usd:
            cost.inc(resp.cost_usd)
        latency.observe(resp.latency_ms / 1000)
        first_token = getattr(resp, "ttft_ms", None)  # embeddings have no first token
        if first_token is not None:
            ttft.observe(first_token / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
