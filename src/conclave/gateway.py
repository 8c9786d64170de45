"""The one door to models.

Every capability (RAG answers, agents, the API server, the CLI) calls models
through :class:`Gateway`, so routing, privacy, pricing, stream policies and
accounting happen in one place and cannot be skipped:

    request -> validate and fill defaults -> router.plan (privacy, tiers)
            -> price check of every candidate (before anything is spent)
            -> budgets: reserve the worst case against every applicable budget
            -> router (retries, fallbacks) -> provider -> streaming manager
            -> budgets: settle the actual cost (or release on failure)
            -> ledger: one invocation record, whatever the outcome
            -> response with usage, cost, latency and time to first token

Embeddings take the same path (:meth:`Gateway.embed`): a named model of
kind ``embedding``, the same privacy rule and retries, a reservation for the
worst case (every input byte a token, at the model's input price), settlement
for the reported tokens, and one ledger record with operation ``embeddings``
and no output tokens.

Accounting is optional (``accounting=None`` for library use without a
ledger); when present it wraps the router here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import anyio

from conclave.config import ModelSpec, Price, Settings, load_settings
from conclave.errors import ConclaveError, InvalidRequest
from conclave.llm.pricing import cost, price_of, to_micros, worst_case_cost
from conclave.llm.providers import build_provider
from conclave.llm.providers.base import Provider
from conclave.llm.router import RoutePlan, Router
from conclave.llm.streaming import ManagedStream, StreamPolicy
from conclave.llm.types import (
    ChatRequest,
    ChatResponse,
    EmbedRequest,
    EmbedResponse,
    StopReason,
    StreamChunk,
)

if TYPE_CHECKING:
    from conclave.accounting import Accounting
    from conclave.accounting.budgets import Reservation

log = logging.getLogger("conclave.gateway")

#: ChatRequest.metadata keys that name who pays; they become ledger fields and budget scopes
CALLER_FIELDS = ("api_key_id", "user", "team", "run_id", "workflow_id", "experiment",
                 "variant", "route", "operation")


def record_id(request_id: str) -> uuid.UUID:
    """The ledger id of a request: its id when that is a UUID, else a UUID derived from it.

    Deterministic, so a record written twice (a retried flush) is stored once.
    """
    try:
        return uuid.UUID(request_id)
    except ValueError:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"conclave:{request_id}")


def input_token_bound(request: ChatRequest) -> int:
    """An upper bound on the prompt's tokens without a tokenizer.

    No tokenizer makes more tokens than UTF-8 bytes, so bytes (plus a few tokens of
    chat-template overhead per message) can be reserved safely: a budget is never
    overrun by an under-estimate.  Settlement then charges the real count.
    """
    total = len(request.prompt.encode()) if request.prompt else 0
    for m in request.messages:
        total += len((m.content or "").encode()) + 8
        for c in m.tool_calls:
            total += len(c.name) + len(str(c.arguments).encode()) + 8
    for t in request.tools:
        total += len(t.model_dump_json().encode())
    if request.response_format is not None:
        total += len(request.response_format.model_dump_json().encode())
    return total + 16


def embed_token_bound(request: EmbedRequest) -> int:
    """An upper bound on the tokens of texts to embed: their UTF-8 bytes.

    As for prompts, no tokenizer makes more tokens than bytes; a few per input
    cover the special tokens an embedding model adds around each text.
    """
    return sum(len(t.encode()) + 4 for t in request.inputs)


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
        accounting: Accounting | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self.accounting = accounting
        self._background: set[asyncio.Task[None]] = set()
        self._runtime = runtime
        self._providers = dict(providers) if providers is not None else self._build_providers()
        self.router = Router(self.settings, self._providers)

    # -- construction ---------------------------------------------------------------

    @property
    def runtime(self):
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

    def _retry_settle(self, reservation: Reservation, micros: int) -> None:
        task = asyncio.get_running_loop().create_task(self._settle_later(reservation, micros))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle_later(self, reservation: Reservation, micros: int) -> None:
        assert self.accounting is not None
        ttl = self.settings.accounting.reservation_ttl_s
        deadline = time.monotonic() + ttl
        delay = 0.5
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            try:
                await self.accounting.budgets.settle(reservation, micros)
                log.info("settled %s after a backend outage", reservation.request_id)
                return
            except ConclaveError:
                delay = min(delay * 2, 10.0)
        log.error("gave up settling %s: its reservation expired", reservation.request_id)

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        if self._background:
            # Give outstanding settlements a moment; an expired reservation frees itself.
            _, pending = await asyncio.wait(self._background, timeout=5)
            for task in pending:
                task.cancel()

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

    def prepare_embed(self, request: EmbedRequest
                      ) -> tuple[EmbedRequest, RoutePlan, dict[str, Price]]:
        """Route (privacy included) and price an embedding call before anything is sent."""
        plan = self.router.plan_embed(request)
        prices = {m.name: price_of(m, self.settings.default_price) for m in plan.candidates}
        return request, plan, prices

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        """One vector per input, from the named embedding model, accounted like a chat call.

        A cloud model under privacy mode raises PrivacyViolation and a budget that
        cannot cover the worst case raises BudgetExceeded, both before any byte is sent.
        """
        return await self._accounted(request, "embeddings", self.router.embed)

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
        operation = "chat" if request.prompt is None else "text_completion"
        return await self._accounted(request, operation, self.router.complete)

    async def _accounted(self, request: Any, operation: str,
                         send: Callable[[Any, RoutePlan], Awaitable[Any]]) -> Any:
        """One non-streamed call through the accounting: reserve, send, settle and record."""
        call = _Call(self, request, operation)
        request, plan, prices = await call.begin()
        try:
            response = await send(request, plan)
        except BaseException as exc:
            await call.fail(exc)
            raise
        response.latency_ms = (time.perf_counter() - call.t0) * 1000
        response.cost_usd = float(cost(response.usage, prices[response.model]))
        await call.finish(response, None)
        return response

    async def stream(
        self, request: ChatRequest, *, policies: Iterable[StreamPolicy] = ()
    ) -> GatewayStream:
        """Start a streamed answer: returns once the first chunk has arrived.

        The stream must be iterated to its end or closed (``aclose`` on the iterator,
        or breaking out of ``async for``): either way it is settled and recorded.
        """
        call = _Call(self, request, "chat" if request.prompt is None else "text_completion")
        request, plan, prices = await call.begin()
        try:
            routed = await self.router.stream(request, plan)
        except BaseException as exc:
            await call.fail(exc)
            raise
        managed = ManagedStream(
            routed.chunks,
            price=prices[routed.model.name],
            prompt_text="\n".join(m.content or "" for m in request.messages),
            policies=list(policies),
            started=call.t0,
            on_finish=call.finish,
        )
        call.managed = managed
        return GatewayStream(managed, routed.model, plan)

    def cost_of(self, response: ChatResponse | EmbedResponse) -> Decimal:
        """Exact decimal cost of a response (the float in ``cost_usd`` is for display)."""
        model = self.settings.catalog.model(response.model)
        return cost(response.usage, price_of(model, self.settings.default_price))


class _Call:
    """The accounting around one gateway call: reserve, then settle or release, then record.

    Every exit path goes through :meth:`finish` or :meth:`fail` exactly once, shielded
    from cancellation, so a client that disconnects mid-stream still gets settled for
    what it consumed and its reservation never lingers.
    """

    def __init__(self, gateway: Gateway, request: ChatRequest | EmbedRequest,
                 operation: str) -> None:
        self.gw = gateway
        self.request = request
        self.operation = request.metadata.get("operation", operation)
        self.request_id = request.metadata.get("request_id") or uuid.uuid4().hex
        self.started_at = datetime.now(UTC)
        self.t0 = time.perf_counter()
        self.plan: RoutePlan | None = None
        self.reservation: Reservation | None = None
        self.managed: ManagedStream | None = None
        self._done = False
        self._spent: int | None = None

    def scopes(self) -> list[Any]:
        from conclave.accounting.budgets import GLOBAL, Scope, ScopeRef

        meta = self.request.metadata
        refs = [GLOBAL]
        for scope, key in ((Scope.API_KEY, "api_key_id"), (Scope.USER, "user"),
                           (Scope.TEAM, "team"), (Scope.RUN, "run_id")):
            if meta.get(key):
                refs.append(ScopeRef(scope=scope, id=meta[key]))
        return refs

    async def begin(self) -> tuple[Any, RoutePlan, dict[str, Price]]:
        try:
            request: Any
            if isinstance(self.request, EmbedRequest):
                request, plan, prices = self.gw.prepare_embed(self.request)
            else:
                request, plan, prices = self.gw.prepare(self.request)
            self.request, self.plan = request, plan
            acc = self.gw.accounting
            if acc is not None:
                # Fail closed while the ledger cannot write: a call we could not record
                # must not happen (the records already queued are kept and written later).
                acc.ledger.ensure_available()
                if isinstance(request, EmbedRequest):
                    bound, max_out = embed_token_bound(request), 0
                else:
                    bound, max_out = input_token_bound(request), request.max_tokens or 0
                worst = max(worst_case_cost(bound, max_out, p) for p in prices.values())
                self.reservation = await acc.budgets.reserve(
                    self.scopes(), to_micros(worst), request_id=self.request_id,
                    ttl_s=self.gw.settings.accounting.reservation_ttl_s,
                )
        except BaseException as exc:
            await self.fail(exc)
            raise
        return request, plan, prices

    async def fail(self, exc: BaseException) -> None:
        """Before any output: release the reservation and record the error."""
        if self._done:
            return
        self._done = True
        acc = self.gw.accounting
        if acc is None:
            return
        with anyio.CancelScope(shield=True):
            if self.reservation is not None:
                try:
                    await acc.budgets.release(self.reservation)
                except ConclaveError as err:
                    log.warning("could not release %s: %s (expires by TTL)", self.request_id, err)
            await acc.ledger.write(self._record(None, exc))

    async def finish(self, response: ChatResponse | EmbedResponse,
                     error: BaseException | None) -> None:
        """After output: settle what was consumed (release if nothing was) and record."""
        if self._done:
            return
        self._done = True
        acc = self.gw.accounting
        if acc is None:
            return
        with anyio.CancelScope(shield=True):
            spent = to_micros(self.gw.cost_of(response)) if response.model else 0
            self._spent = spent  # the ledger record's cost: priced once per call
            if self.reservation is not None:
                try:
                    await acc.budgets.settle(self.reservation, spent)
                except ConclaveError as exc:
                    # The budget backend went down mid-call.  Settling is idempotent, so
                    # keep trying in the background; meanwhile the reservation holds the
                    # worst case (never less than the spend), and the ledger has it exact.
                    log.warning("could not settle %s yet: %s", self.request_id, exc)
                    self.gw._retry_settle(self.reservation, spent)
            await acc.ledger.write(self._record(response, error))

    def _record(self, response: ChatResponse | EmbedResponse | None,
                error: BaseException | None) -> Any:
        from conclave.accounting.ledger import InvocationRecord, Outcome

        meta = self.request.metadata
        ended = datetime.now(UTC)
        # Embedding calls have no stop reason, token limit, tier request or first token.
        stop = response.stop_reason if isinstance(response, ChatResponse) else None
        chat = self.request if isinstance(self.request, ChatRequest) else None
        if error is not None:
            outcome = Outcome.ERROR
        elif self.managed is not None and self.managed.cut:
            outcome = Outcome.CUT
        elif stop is StopReason.CANCELLED:
            outcome = Outcome.CANCELLED
        else:
            outcome = Outcome.SUCCESS
        plan = self.plan
        usage = response.usage if response is not None else None
        privacy = plan.privacy if plan is not None else bool(
            self.request.privacy if self.request.privacy is not None
            else self.gw.settings.privacy_mode)
        fields: dict[str, Any] = {
            k: meta[k] for k in CALLER_FIELDS if meta.get(k) and k != "operation"
        }
        return InvocationRecord(
            id=record_id(self.request_id),
            started_at=self.started_at,
            ended_at=ended,
            operation=self.operation,
            provider=(response.provider or None) if response else None,
            request_model=self.request.model or (
                f"tier-{chat.tier if chat is not None and chat.tier is not None else 0}"),
            response_model=(response.model or None) if response else None,
            response_id=(response.id or None) if response else None,
            max_tokens=chat.max_tokens if chat is not None else None,
            finish_reasons=[stop.value] if stop is not None and response.model else [],
            tier=response.tier if response and response.model else None,
            privacy=privacy,
            input_tokens=usage.input_tokens if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
            cached_input_tokens=usage.cached_input_tokens if usage else 0,
            cache_write_tokens=usage.cache_write_tokens if usage else 0,
            tokens_estimated=usage.estimated if usage else False,
            cost_micros=(self._spent if self._spent is not None
                         else to_micros(self.gw.cost_of(response)))
            if response and response.model else 0,
            latency_ms=int((time.perf_counter() - self.t0) * 1000),
            ttft_ms=int(response.ttft_ms) if isinstance(response, ChatResponse)
            and response.ttft_ms is not None else None,
            outcome=outcome,
            error_type=(getattr(error, "code", None) or type(error).__name__) if error else None,
            attributes={k: v for k, v in meta.items()
                        if k not in CALLER_FIELDS and k != "request_id"},
            **fields,
        )
