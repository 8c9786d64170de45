"""Budgets: reserve the worst case before a call, settle the actual cost after.

Protocol of one call (the gateway does this, in one place):

1. ``reserve(scopes, worst_case_micros, request_id=...)`` - atomically checks
   every budget that applies (the global one, and those of the API key, user,
   team and run named in ``scopes``) and refuses with :class:`BudgetExceeded`
   if ``spent + reserved + amount`` would pass any limit; otherwise records the
   reservation against all of them in the same step.
2. ``settle(reservation, actual_micros)`` after the call - the reservation is
   replaced by the actual spend.  Idempotent: a second settle of the same
   request id changes nothing.  A cut stream is settled with what was consumed.
3. ``release(reservation)`` when the call failed before costing anything.

Reservations carry a TTL: once expired they stop counting, so a replica that
crashed between reserve and settle never leaks budget.  Backends: SQLite
(``BEGIN IMMEDIATE`` transactions) and Redis (one Lua script per operation,
one round trip).  Amounts are integer micro-dollars.

Alerts at 80% and 100% of a limit (configurable) fire exactly once per
budget, period and threshold: the decision is taken inside the same atomic
step that settles, so concurrent settles crossing a threshold cannot both
fire.  Delivery (:class:`AlertDispatcher`) is a structured log record, the
async hooks (the event bus plugs in here) and the budget's optional webhook,
all fire-and-forget so they never slow a settle down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from enum import StrEnum
from typing import Protocol, runtime_checkable

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conclave.accounting._common import MAX_MICROS, as_utc, usd
from conclave.errors import BudgetExceeded

log = logging.getLogger("conclave.accounting.budgets")


class Scope(StrEnum):
    GLOBAL = "global"
    API_KEY = "api_key"
    USER = "user"
    TEAM = "team"
    RUN = "run"


class Period(StrEnum):
    DAILY = "daily"
    MONTHLY = "monthly"
    LIFETIME = "lifetime"


def period_key(period: Period, at: datetime) -> str:
    """The bucket a moment falls in, in UTC: ``d2025-01-31``, ``m2025-01``, ``lifetime``."""
    at = as_utc(at)
    if period is Period.DAILY:
        return f"d{at:%Y-%m-%d}"
    if period is Period.MONTHLY:
        return f"m{at:%Y-%m}"
    return "lifetime"


def period_bounds(period: Period, at: datetime) -> tuple[datetime | None, datetime | None]:
    """Start (inclusive) and end (exclusive) of the period containing ``at``; None for lifetime."""
    at = as_utc(at)
    if period is Period.DAILY:
        start = datetime(at.year, at.month, at.day, tzinfo=UTC)
        return start, start + timedelta(days=1)
    if period is Period.MONTHLY:
        start = datetime(at.year, at.month, 1, tzinfo=UTC)
        end = datetime(at.year + (at.month == 12), at.month % 12 + 1, 1, tzinfo=UTC)
        return start, end
    return None, None


class ScopeRef(BaseModel):
    """Who a call is charged to: ``ScopeRef(scope="team", id="research")``."""

    model_config = ConfigDict(frozen=True)

    scope: Scope
    #: the key id, user, team or run id; always ``*`` for the global scope
    id: str = "*"

    @model_validator(mode="before")
    @classmethod
    def _id(cls, data: object) -> object:
        if isinstance(data, dict) and "scope" in data:
            if str(data["scope"]) == Scope.GLOBAL.value:
                return {**data, "id": "*"}
            if not data.get("id") or data.get("id") == "*":
                raise ValueError(f"a {Scope(data['scope']).value} scope needs an id")
        return data

    def __str__(self) -> str:
        return "global" if self.scope is Scope.GLOBAL else f"{self.scope.value}:{self.id}"


GLOBAL = ScopeRef(scope=Scope.GLOBAL)


class BudgetSpec(BaseModel):
    """What ``create`` takes."""

    model_config = ConfigDict(extra="forbid")

    scope: Scope
    scope_id: str = "*"
    period: Period
    limit_micros: int = Field(ge=0, le=MAX_MICROS)
    name: str = ""
    #: POSTed (JSON) when an alert fires; fire-and-forget
    webhook_url: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _scope(cls, data: object) -> object:
        if isinstance(data, dict) and "scope" in data:
            ref = ScopeRef(scope=data["scope"], id=data.get("scope_id", "*"))
            return {**data, "scope_id": ref.id}
        return data

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("webhook_url must be an http:// or https:// URL")
        return v


class BudgetUpdate(BaseModel):
    """What ``update`` takes; fields left None are unchanged (``webhook_url=""`` clears it)."""

    model_config = ConfigDict(extra="forbid")

    limit_micros: int | None = Field(None, ge=0, le=MAX_MICROS)
    name: str | None = None
    webhook_url: str | None = None

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError("webhook_url must be an http:// or https:// URL")
        return v


class Budget(BudgetSpec):
    id: str
    created_at: datetime
    updated_at: datetime

    @property
    def ref(self) -> ScopeRef:
        return ScopeRef(scope=self.scope, id=self.scope_id)

    def label(self) -> str:
        return f"{self.name or self.ref} ({self.period.value}, id {self.id})"


class BudgetUsage(BaseModel):
    """A budget's state in the period containing ``at``."""

    budget: Budget
    period_key: str
    period_start: datetime | None
    period_end: datetime | None
    spent_micros: int
    reserved_micros: int
    #: limit - spent - reserved, never below zero
    remaining_micros: int
    #: spent as a percentage of the limit, two decimals rounded down (Decimal, never float)
    percent: Decimal
    active_reservations: int


class ReservedBudget(BaseModel):
    model_config = ConfigDict(frozen=True)

    budget_id: str
    period_key: str


class Reservation(BaseModel):
    """Proof of a reservation; pass it back to ``settle`` or ``release``."""

    request_id: str
    amount_micros: int
    expires_at: datetime
    #: the budgets it was recorded against (empty: no budget applied)
    budgets: list[ReservedBudget] = Field(default_factory=list)


class BudgetAlert(BaseModel):
    """A threshold crossed: fired once per (budget, period, threshold)."""

    budget_id: str
    budget_name: str = ""
    scope: Scope
    scope_id: str
    period: Period
    period_key: str
    threshold: int
    spent_micros: int
    limit_micros: int
    fired_at: datetime
    request_id: str
    webhook_url: str | None = None

    @field_validator("fired_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return as_utc(v)

    def message(self) -> str:
        who = self.budget_name or (
            "global" if self.scope is Scope.GLOBAL else f"{self.scope.value}:{self.scope_id}"
        )
        return (
            f"budget {who} ({self.period.value}) reached {self.threshold}%: "
            f"{usd(self.spent_micros)} of {usd(self.limit_micros)}"
        )


class Settlement(BaseModel):
    request_id: str
    actual_micros: int
    #: True when this request id had been settled before: nothing was counted this time
    already_settled: bool = False
    alerts: list[BudgetAlert] = Field(default_factory=list)


AlertHook = Callable[[BudgetAlert], Awaitable[None]]


@runtime_checkable
class BudgetStore(Protocol):
    """Budgets and their spend.  Implementations: SQLite (embedded), Redis."""

    async def create(self, spec: BudgetSpec) -> Budget: ...

    async def get(self, budget_id: str) -> Budget: ...

    async def list_budgets(self, scope: ScopeRef | None = None) -> list[Budget]: ...

    async def update(self, budget_id: str, patch: BudgetUpdate) -> Budget: ...

    async def delete(self, budget_id: str) -> None: ...

    async def usage(self, budget_id: str, at: datetime | None = None) -> BudgetUsage: ...

    async def reset(self, budget_id: str) -> BudgetUsage:
        """Zero the current period's spend and re-arm its alerts (reservations stay)."""

    async def reserve(
        self,
        scopes: Sequence[ScopeRef],
        amount_micros: int,
        *,
        request_id: str,
        ttl_s: float | None = None,
    ) -> Reservation: ...

    async def settle(self, reservation: Reservation, actual_micros: int) -> Settlement: ...

    async def release(self, reservation: Reservation) -> None: ...

    async def alerts(self, budget_id: str | None = None, limit: int = 100) -> list[BudgetAlert]:
        """Alert history, newest first."""

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


def exceeded(
    budget: Budget, *, spent: int, reserved: int, amount: int, at: datetime
) -> BudgetExceeded:
    """The refusal, naming the budget, the numbers and how to get going again."""
    _, end = period_bounds(budget.period, at)
    when = f"the period resets at {end:%Y-%m-%d %H:%M} UTC" if end else "it never resets"
    scope_flag = "" if budget.scope is Scope.GLOBAL else f" --id {budget.scope_id}"
    return BudgetExceeded(
        f"budget {budget.label()} would be exceeded: limit {usd(budget.limit_micros)}, "
        f"spent {usd(spent)}, reserved by calls in flight {usd(reserved)}, "
        f"this call needs up to {usd(amount)}",
        budget_id=budget.id,
        limit_micros=budget.limit_micros,
        spent_micros=spent,
        reserved_micros=reserved,
        requested_micros=amount,
        hint=(
            f"raise it with `conclave budget set --scope {budget.scope.value}{scope_flag} "
            f"--period {budget.period.value} --limit <usd>` (or PATCH /v1/budgets/{budget.id}), "
            f"lower max_tokens, or wait: {when}"
        ),
    )


def check_amount(amount: int, what: str = "amount") -> int:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"{what} must be integer micro-dollars, got {type(amount).__name__}")
    if not 0 <= amount <= MAX_MICROS:
        raise ValueError(f"{what} must be between 0 and {MAX_MICROS} micro-dollars, got {amount}")
    return amount


def usage_of(
    b: Budget, pk: str, at: datetime, spent: int, reserved: int, active: int
) -> BudgetUsage:
    """BudgetUsage from the raw numbers a backend read."""
    start, end = period_bounds(b.period, at)
    if b.limit_micros > 0:
        # rounded down: 99.999% must not show as 100.00% before the limit is reached
        percent = (Decimal(spent) * 100 / Decimal(b.limit_micros)).quantize(
            Decimal("0.01"), rounding=ROUND_DOWN
        )
    else:
        percent = Decimal("0.00") if spent == 0 else Decimal("100.00")
    return BudgetUsage(
        budget=b, period_key=pk, period_start=start, period_end=end, spent_micros=spent,
        reserved_micros=reserved, remaining_micros=max(0, b.limit_micros - spent - reserved),
        percent=percent, active_reservations=active,
    )


# --- alert delivery --------------------------------------------------------------------


class AlertDispatcher:
    """Delivers fired alerts: log record, hooks, webhook.  Never blocks the caller.

    Hooks and webhooks run as tasks; their failures are logged, not raised.
    ``aclose`` waits (bounded) for deliveries still in flight.
    """

    def __init__(
        self,
        hooks: Sequence[AlertHook] = (),
        *,
        webhook_timeout_s: float = 5.0,
        client_factory: Callable[[], httpx.AsyncClient] | None = None,
    ) -> None:
        self.hooks: list[AlertHook] = list(hooks)
        self._timeout = webhook_timeout_s
        self._client_factory = client_factory or (
            lambda: httpx.AsyncClient(timeout=self._timeout, trust_env=False)
        )
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def dispatch(self, alerts: Sequence[BudgetAlert]) -> None:
        for alert in alerts:
            event = alert.model_dump(mode="json", exclude={"webhook_url"})
            event["type"] = "budget.alert"
            log.warning(alert.message(), extra={"conclave_event": event})
            for hook in self.hooks:
                self._spawn(self._run_hook(hook, alert))
            if alert.webhook_url:
                self._spawn(self._post(alert))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_hook(self, hook: AlertHook, alert: BudgetAlert) -> None:
        try:
            await hook(alert)
        except Exception:
            log.exception("budget alert hook %r failed", hook)

    async def _post(self, alert: BudgetAlert) -> None:
        if self._client is None:
            self._client = self._client_factory()
        body = {"type": "budget.alert", **alert.model_dump(mode="json", exclude={"webhook_url"})}
        try:
            response = await asyncio.wait_for(
                self._client.post(alert.webhook_url or "", json=body), self._timeout
            )
            if response.status_code >= 400:
                log.warning("budget alert webhook answered HTTP %s", response.status_code,
                            extra={"conclave_event": {"budget_id": alert.budget_id}})
        except Exception as exc:
            log.warning("budget alert webhook failed: %s", type(exc).__name__,
                        extra={"conclave_event": {"budget_id": alert.budget_id}})

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait for deliveries in flight (tests and shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s or self._timeout + 1)

    async def aclose(self) -> None:
        await self.drain()
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None
