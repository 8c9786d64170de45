"""The one door to models.

Every capability (RAG answers, agents, the API server, the CLI) calls models
through :class:`Gateway`, so routing, privacy, pricing, stream policies and
(later) accounting happen in one place and cannot be skipped:

    request -> validate and fill defaults -> router.plan (privacy, tiers)
            -> price check of every candidate (before anything is spent)
            -> router (retries, fallbacks) -> provider -> streaming manager
            -> response with usage, cost, latency and time to first token
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Mapping
from decimal import Decimal

from conclave.config import ModelSpec, Price, Settings, load_settings
from conclave.errors import InvalidRequest
from conclave.llm.pricing import cost, price_of
from conclave.llm.providers import build_provider
from conclave.llm.providers.base import Provider
from conclave.llm.router import RoutePlan, Router
from conclave.llm.streaming import ManagedStream, StreamPolicy
from conclave.llm.types import ChatRequest, ChatResponse, StreamChunk


class GatewayStream:
    """An answer arriving token by token; :attr:`response` is complete after iteration."""

    def __init__(self, managed: ManagedStream, model: ModelSpec, plan: RoutePlan) -> None:
        self._managed = managed
        self.model = model
        self.plan = plan
        r = managed.response
        r.model, r.provider, r.tier, r.routing_note = (
            model.name, model.provider, model.tier, plan.note)

    @property
    def response(self) -> ChatResponse:
        return self._managed.response

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return aiter(self._managed)


class Gateway:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        providers: Mapping[str, Provider] | None = None,
        runtime: object | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self._runtime = runtime
        self._providers = dict(providers) if providers is not None else self._build_providers()
        self.router = Router(self.settings, self._providers)

    # -- construction ---------------------------------------------------------------

    @property
    def runtime(self):  # noqa: ANN201 - LocalRuntime, imported lazily
        if self._runtime is None:
            from conclave.llm.local import LocalRuntime

            self._runtime = LocalRuntime(self.settings)
        return self._runtime

    def _build_providers(self) -> dict[str, Provider]:
        providers: dict[str, Provider] = {}
        for name, spec in self.settings.catalog.providers.items():
            resolver = self.runtime.ensure_running if spec.managed else None
            providers[name] = build_provider(spec, self.settings, base_url_resolver=resolver)
        return providers

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- calls ----------------------------------------------------------------------

    def prepare(self, request: ChatRequest) -> tuple[ChatRequest, RoutePlan, dict[str, Price]]:
        """Fill defaults, route, and price every candidate before anything is sent."""
        if request.max_tokens is not None and request.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {request.max_tokens}")
        if request.max_tokens is None:
            request = request.model_copy(update={"max_tokens": self.settings.default_max_tokens})
        plan = self.router.plan(request)
        prices = {m.name: price_of(m, self.settings.default_price) for m in plan.candidates}
        return request, plan, prices

    async def complete(
        self, request: ChatRequest, *, policies: Iterable[StreamPolicy] = ()
    ) -> ChatResponse:
        """One answer.  With stream policies the call streams internally so they can act."""
        policies = list(policies)
        if policies:
            stream = await self.stream(request, policies=policies)
            async for _ in stream:
                pass
            return stream.response
        request, plan, prices = self.prepare(request)
        started = time.perf_counter()
        response = await self.router.complete(request, plan)
        response.latency_ms = (time.perf_counter() - started) * 1000
        response.cost_usd = float(cost(response.usage, prices[response.model]))
        return response

    async def stream(
        self, request: ChatRequest, *, policies: Iterable[StreamPolicy] = ()
    ) -> GatewayStream:
        """Start a streamed answer: returns once the first chunk has arrived."""
        request, plan, prices = self.prepare(request)
        started = time.perf_counter()
        routed = await self.router.stream(request, plan)
        managed = ManagedStream(
            routed.chunks,
            price=prices[routed.model.name],
            prompt_text="\n".join(m.content or "" for m in request.messages),
            policies=list(policies),
            started=started,
        )
        return GatewayStream(managed, routed.model, plan)

    def cost_of(self, response: ChatResponse) -> Decimal:
        """Exact decimal cost of a response (the float in ``cost_usd`` is for display)."""
        model = self.settings.catalog.model(response.model)
        return cost(response.usage, price_of(model, self.settings.default_price))
