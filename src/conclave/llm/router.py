"""Choose a model for a request, and retry or fall back when providers fail.

A request names a model or a tier.  A named model is served by that model
alone (retried on transient errors): swapping the model someone asked for is
not ours to decide.  A tier is served by the enabled models of that tier in
catalog priority order, then by tier 0 as a last resort
(``routing.fallback_to_local``).  When no cloud provider is configured at all,
every tier resolves to tier 0 and the response says so in ``routing_note``.

Privacy mode (global or per request) admits local models only; a cloud model
asked for by name is refused with :class:`PrivacyViolation` before anything
is sent.  The network guard in :mod:`conclave.llm.net` enforces the same rule
again at the socket, whatever the catalog says.

Embedding models (``kind: embedding``) are never candidates of a tier and
cannot be named in a chat request; :meth:`Router.plan_embed` and
:meth:`Router.embed` serve them, named only, with the same privacy rule and
the same retries.

Retries use exponential backoff with full jitter and honour ``Retry-After``;
a provider failing ``cooldown_failures`` times in a row is skipped for
``cooldown_seconds``.  A stream is retried only until its first chunk:
after that, output has reached the caller and a retry would repeat it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from conclave.config import ModelSpec, Settings
from conclave.errors import (
    ConclaveError,
    InvalidRequest,
    MissingCredentials,
    NoProviderAvailable,
    PrivacyViolation,
    ProviderError,
)
from conclave.llm.providers.base import Provider
from conclave.llm.types import (
    ChatRequest,
    ChatResponse,
    EmbedRequest,
    EmbedResponse,
    StreamChunk,
)


@dataclass
class RoutePlan:
    candidates: list[ModelSpec]
    privacy: bool
    note: str | None = None


@dataclass
class _Health:
    failures: int = 0
    cooled_until: float = 0.0


@dataclass
class Attempt:
    model: str
    error: ConclaveError


@dataclass
class RoutedStream:
    """A stream whose first chunk has arrived; ``model`` is who is answering."""

    model: ModelSpec
    plan: RoutePlan
    chunks: AsyncIterator[StreamChunk]
    attempts: list[Attempt] = field(default_factory=list)


class Router:
    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.catalog = settings.catalog
        self.providers = providers
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._health: dict[str, _Health] = {}

    # -- planning -------------------------------------------------------------------

    def enabled(self, model: ModelSpec) -> bool:
        return model.provider in self.providers and self.settings.provider_enabled(
            self.catalog.provider_of(model)
        )

    def plan(self, request: ChatRequest) -> RoutePlan:
        privacy = self.settings.privacy_mode if request.privacy is None else request.privacy
        if request.model and request.tier is not None:
            raise InvalidRequest(
                "give a model or a tier, not both",
                hint=f"drop the tier to use {request.model}, or drop the model to route by tier",
            )
        if request.model:
            spec = self._named(request.model, privacy)
            if spec.kind == "embedding":
                raise InvalidRequest(
                    f"{request.model!r} is an embedding model and cannot answer prompts",
                    hint="name a chat model or a tier; embeddings go through Gateway.embed",
                )
            return RoutePlan([spec], privacy)
        tier = 0 if request.tier is None else request.tier
        return self._tier(tier, privacy)

    def plan_embed(self, request: EmbedRequest) -> RoutePlan:
        """The one model that may embed ``request``: named, of kind embedding, allowed.

        Privacy is checked exactly as for chat, before anything is sent.
        """
        privacy = self.settings.privacy_mode if request.privacy is None else request.privacy
        name = request.model
        if name not in self.catalog.models and ":" in name:
            # the ``provider:id`` spelling of CONCLAVE_RAG__EMBEDDER
            name = self.catalog.embedding_model(name).name
        spec = self.catalog.model(name)
        if spec.kind != "embedding":
            raise InvalidRequest(
                f"{name!r} is a {spec.kind} model, not an embedding model",
                hint="name a catalog model with `kind: embedding` (see `conclave models`)",
            )
        return RoutePlan([self._named(name, privacy)], privacy)

    def _named(self, name: str, privacy: bool) -> ModelSpec:
        spec = self.catalog.model(name)
        provider = self.catalog.provider_of(spec)
        if privacy and not spec.local:
            raise PrivacyViolation(
                f"privacy mode is on and {name!r} is a cloud model ({provider.name})",
                hint="use --tier 0 or a local model, or turn privacy mode off",
            )
        if not self.enabled(spec):
            if provider.api_key_env and not provider.local:
                raise MissingCredentials(
                    f"{name!r} needs {provider.api_key_env}, which is not set",
                    hint=f"export {provider.api_key_env}=... or pick another model",
                )
            raise NoProviderAvailable(
                f"provider {provider.name!r} of {name!r} is not enabled",
                hint=f"set {provider.base_url_env or provider.api_key_env or 'its endpoint'} "
                "to use it",
            )
        return spec

    def _tier(self, tier: int, privacy: bool) -> RoutePlan:
        usable = [
            m for m in self.catalog.models.values()
            if m.kind != "embedding" and self.enabled(m) and (m.local or not privacy)
        ]
        local = _ordered(m for m in usable if m.tier == 0 and m.local)
        note = None
        if tier > 0 and privacy:
            note = f"privacy mode: tier {tier} served by tier 0 (local models only)"
            tier = 0
        elif tier > 0 and not any(not m.local for m in usable):
            note = f"no cloud provider configured: tier {tier} served by tier 0"
            tier = 0
        candidates = _ordered(m for m in usable if m.tier == tier)
        if tier > 0 and not candidates:
            for lower in range(tier - 1, -1, -1):
                candidates = _ordered(m for m in usable if m.tier == lower)
                if candidates:
                    note = f"no tier {tier} model is configured: served by tier {lower}"
                    break
        if tier > 0 and self.settings.routing.fallback_to_local:
            candidates += [m for m in local if m not in candidates]
        if not candidates:
            raise NoProviderAvailable(
                f"no model can serve tier {tier}"
                + (" in privacy mode" if privacy else ""),
                hint="run `conclave models` to see what is enabled; `conclave local build` "
                "sets up the local model",
            )
        return RoutePlan(candidates, privacy, note)

    # -- health ---------------------------------------------------------------------

    def _cooling(self, provider: str) -> float:
        h = self._health.get(provider)
        remaining = (h.cooled_until - self._clock()) if h else 0.0
        return max(remaining, 0.0)

    def _succeeded(self, provider: str) -> None:
        self._health.pop(provider, None)

    def _failed(self, provider: str) -> None:
        h = self._health.setdefault(provider, _Health())
        h.failures += 1
        if h.failures >= self.settings.routing.cooldown_failures:
            h.cooled_until = self._clock() + self.settings.routing.cooldown_seconds
            h.failures = 0

    def _delay(self, attempt: int, error: ProviderError) -> float:
        r = self.settings.routing
        backoff = self._rng() * min(r.backoff_max, r.backoff_base * 2**attempt)
        return max(backoff, error.retry_after or 0.0)

    # -- execution ------------------------------------------------------------------

    async def _attempts(self, plan: RoutePlan, run: Callable[[ModelSpec], Awaitable[object]]
                        ) -> tuple[ModelSpec, object, list[Attempt]]:
        """Try candidates in order with retries; return the first success."""
        attempts: list[Attempt] = []
        r = self.settings.routing
        for spec in plan.candidates:
            wait = self._cooling(spec.provider)
            if wait > 0:
                attempts.append(Attempt(spec.name, NoProviderAvailable(
                    f"provider {spec.provider} is cooling down for {wait:.0f}s after repeated "
                    "failures")))
                continue
            for attempt in range(r.max_retries + 1):
                try:
                    result = await run(spec)
                except PrivacyViolation:
                    raise
                except ProviderError as exc:
                    self._failed(spec.provider)
                    attempts.append(Attempt(spec.name, exc))
                    if not exc.retryable or attempt == r.max_retries:
                        break
                    delay = self._delay(attempt, exc)
                    if delay > r.max_retry_after or self._cooling(spec.provider):
                        break
                    await self._sleep(delay)
                else:
                    self._succeeded(spec.provider)
                    return spec, result, attempts
        raise _exhausted(attempts)

    async def complete(self, request: ChatRequest, plan: RoutePlan | None = None) -> ChatResponse:
        plan = plan or self.plan(request)

        async def run(spec: ModelSpec) -> ChatResponse:
            return await self.providers[spec.provider].complete(
                spec, _for_model(request, spec), privacy=plan.privacy or spec.local
            )

        spec, result, _ = await self._attempts(plan, run)
        response = result if isinstance(result, ChatResponse) else ChatResponse()
        response.model, response.provider, response.tier = spec.name, spec.provider, spec.tier
        response.routing_note = plan.note
        return response

    async def embed(self, request: EmbedRequest, plan: RoutePlan | None = None
                    ) -> EmbedResponse:
        """Embed with the planned model, retried on transient errors like a chat call."""
        plan = plan or self.plan_embed(request)

        async def run(spec: ModelSpec) -> EmbedResponse:
            return await self.providers[spec.provider].embed(
                spec, request, privacy=plan.privacy or spec.local)

        spec, result, _ = await self._attempts(plan, run)
        response = result if isinstance(result, EmbedResponse) else EmbedResponse()
        response.model, response.provider, response.tier = spec.name, spec.provider, spec.tier
        return response

    async def stream(self, request: ChatRequest, plan: RoutePlan | None = None) -> RoutedStream:
        """Open a stream and wait for its first chunk (retrying until then)."""
        plan = plan or self.plan(request)

        async def run(spec: ModelSpec) -> tuple[AsyncIterator[StreamChunk], StreamChunk | None]:
            it = aiter(self.providers[spec.provider].stream(
                spec, _for_model(request, spec), privacy=plan.privacy or spec.local))
            try:
                first = await anext(it)
            except StopAsyncIteration:
                return it, None
            except BaseException:
                await _aclose(it)
                raise
            return it, first

        spec, result, attempts = await self._attempts(plan, run)
        it, first = result  # type: ignore[misc]
        return RoutedStream(spec, plan, _prepend(first, it), attempts)


def _for_model(request: ChatRequest, spec: ModelSpec) -> ChatRequest:
    """Apply the model's defaults where the request left a choice open."""
    if request.temperature is None and spec.default_temperature is not None:
        return request.model_copy(update={"temperature": spec.default_temperature})
    return request


def _ordered(models: object) -> list[ModelSpec]:
    return sorted(models, key=lambda m: (m.priority, m.name))  # type: ignore[arg-type]


def _exhausted(attempts: list[Attempt]) -> ConclaveError:
    if not attempts:
        return NoProviderAvailable("no candidate model was tried")
    models = {a.model for a in attempts}
    last = attempts[-1].error
    if len(models) == 1:
        return last
    tried = "; ".join(f"{a.model}: {a.error.code}" for a in attempts)
    return NoProviderAvailable(f"every candidate failed ({tried})", hint=str(last))


async def _prepend(first: StreamChunk | None, rest: AsyncIterator[StreamChunk]
                   ) -> AsyncIterator[StreamChunk]:
    try:
        if first is not None:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        await _aclose(rest)


async def _aclose(it: object) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()
