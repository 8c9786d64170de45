"""The scale-out budget store: Redis, one Lua script (one round trip) per operation.

The reserve script reads the scope indexes, prunes expired reservations, checks
every applicable budget and records the reservation against all of them, in
one atomic step on the server - so any number of replicas can reserve against
the same budget without overrunning it.  Settle replaces the reservation with
the spend, marks the request id settled (idempotency) and decides the alerts in
the same step (``HSETNX`` on the period's alert marks: exactly once).  See
:mod:`._lua` for the scripts and key layout.

The time comes from the caller's clock (period keys, reservation expiry), so
replicas need synchronised clocks (NTP): a skew of a second shifts an expiry
by a second, nothing more.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from conclave.accounting._common import Clock, utc_now
from conclave.accounting.backends import _lua
from conclave.accounting.backends._redis import guarded, make_client
from conclave.accounting.budgets import (
    GLOBAL,
    AlertDispatcher,
    Budget,
    BudgetAlert,
    BudgetSpec,
    BudgetUpdate,
    BudgetUsage,
    Period,
    Reservation,
    ReservedBudget,
    ScopeRef,
    Settlement,
    check_amount,
    exceeded,
    period_key,
    usage_of,
)
from conclave.errors import BudgetAlreadyExists, BudgetNotFound, InvalidRequest

#: how long a settled request id is remembered, so a late duplicate settle is still a no-op
SETTLED_RETENTION_S = 7 * 24 * 3600


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


def _budget(h: dict[str, str]) -> Budget:
    return Budget(
        id=h["id"], scope=h["scope"], scope_id=h["scope_id"], period=h["period"],
        limit_micros=int(h["limit_micros"]), name=h.get("name", ""),
        webhook_url=h.get("webhook_url") or None,
        created_at=datetime.fromisoformat(h["created_at"]),
        updated_at=datetime.fromisoformat(h["updated_at"]),
    )


def _not_found(budget_id: str) -> BudgetNotFound:
    return BudgetNotFound(
        f"no budget with id {budget_id!r}", hint="list budgets with `conclave budget list`"
    )


class RedisBudgetStore:
    backend_name = "Redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "{conclave}:",
        reservation_ttl_s: float = 600.0,
        alert_thresholds: Sequence[int] = (80, 100),
        dispatcher: AlertDispatcher | None = None,
        clock: Clock = utc_now,
        timeout_s: float = 2.0,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self._ttl = reservation_ttl_s
        self._thresholds = sorted(set(alert_thresholds))
        self.dispatcher = dispatcher or AlertDispatcher()
        self._clock = clock
        self._r = make_client(url, timeout_s=timeout_s, max_connections=max_connections)
        s = self._r.register_script
        self._reserve, self._settle = s(_lua.RESERVE), s(_lua.SETTLE)
        self._release, self._usage = s(_lua.RELEASE), s(_lua.USAGE)
        self._create, self._update = s(_lua.CREATE), s(_lua.UPDATE)
        self._delete, self._reset, self._list = s(_lua.DELETE), s(_lua.RESET), s(_lua.LIST)

    @classmethod
    async def open(cls, url: str = "redis://127.0.0.1:6379/0", **kwargs: Any) -> RedisBudgetStore:
        """Connect and check Redis answers (BackendUnavailable if not)."""
        self = cls(url, **kwargs)
        try:
            await self.ping()
        except Exception:
            await self._r.aclose()
            raise
        return self

    async def aclose(self) -> None:
        await self.dispatcher.aclose()
        await self._r.aclose()

    async def ping(self) -> None:
        async with guarded(self.url):
            await self._r.ping()

    def _pks(self, at: datetime) -> list[str]:
        return [period_key(Period.DAILY, at), period_key(Period.MONTHLY, at)]

    # -- CRUD --------------------------------------------------------------------------

    async def create(self, spec: BudgetSpec) -> Budget:
        budget_id = f"bud_{uuid.uuid4().hex[:12]}"
        now = self._clock().isoformat()
        async with guarded(self.url):
            res = await self._create(args=[
                self.prefix, budget_id, spec.scope.value, spec.scope_id, spec.period.value,
                spec.limit_micros, spec.name, spec.webhook_url or "", now,
            ])
        if res[0] == "exists":
            raise BudgetAlreadyExists(
                f"a {spec.period.value} budget for {spec.scope.value}:{spec.scope_id} "
                f"already exists (id {res[1]})",
                hint=f"update it instead (PATCH /v1/budgets/{res[1]})",
            )
        return await self.get(budget_id)

    async def get(self, budget_id: str) -> Budget:
        async with guarded(self.url):
            h = await self._r.hgetall(f"{self.prefix}b:{budget_id}")
        if not h:
            raise _not_found(budget_id)
        return _budget(h)

    async def list_budgets(self, scope: ScopeRef | None = None) -> list[Budget]:
        args = [self.prefix, "", ""]
        if scope is not None:
            args = [self.prefix, scope.scope.value, scope.id]
        async with guarded(self.url):
            rows = await self._list(args=args)
        budgets = [_budget(_pairs(h)) for h in rows]
        return sorted(budgets, key=lambda b: (b.created_at, b.id))

    async def update(self, budget_id: str, patch: BudgetUpdate) -> Budget:
        fields: list[Any] = ["updated_at", self._clock().isoformat()]
        if patch.limit_micros is not None:
            fields += ["limit_micros", patch.limit_micros]
        if patch.name is not None:
            fields += ["name", patch.name]
        if patch.webhook_url is not None:
            fields += ["webhook_url", patch.webhook_url]
        async with guarded(self.url):
            h = await self._update(args=[self.prefix, budget_id, *fields])
        if not h:
            raise _not_found(budget_id)
        return _budget(_pairs(h))

    async def delete(self, budget_id: str) -> None:
        async with guarded(self.url):
            done = await self._delete(args=[self.prefix, budget_id, *self._pks(self._clock())])
        if not done:
            raise _not_found(budget_id)

    async def usage(self, budget_id: str, at: datetime | None = None) -> BudgetUsage:
        at = at or self._clock()
        now_ms = _ms(self._clock())
        async with guarded(self.url):
            res = await self._usage(args=[self.prefix, now_ms, budget_id, *self._pks(at)])
        if not res:
            raise _not_found(budget_id)
        h, spent, reserved, active = res
        b = _budget(_pairs(h))
        return usage_of(b, period_key(b.period, at), at, int(spent), int(reserved), int(active))

    async def reset(self, budget_id: str) -> BudgetUsage:
        at = self._clock()
        async with guarded(self.url):
            done = await self._reset(args=[self.prefix, budget_id, *self._pks(at)])
        if not done:
            raise _not_found(budget_id)
        return await self.usage(budget_id, at)

    # -- reserve / settle / release ------------------------------------------------------

    async def reserve(
        self,
        scopes: Sequence[ScopeRef],
        amount_micros: int,
        *,
        request_id: str,
        ttl_s: float | None = None,
    ) -> Reservation:
        check_amount(amount_micros)
        if not request_id:
            raise InvalidRequest("reserve needs a request_id", hint="pass the call's request id")
        now = self._clock()
        expires = now + timedelta(seconds=self._ttl if ttl_s is None else ttl_s)
        refs = list(dict.fromkeys([GLOBAL, *scopes]))
        args: list[Any] = [
            self.prefix, _ms(now), amount_micros, _ms(expires), request_id,
            *self._pks(now), len(refs),
        ]
        for ref in refs:
            args += [ref.scope.value, ref.id]
        async with guarded(self.url):
            res = await self._reserve(args=args)
        if res[0] == "settled":
            raise InvalidRequest(
                f"request {request_id!r} was already settled",
                hint="use a fresh request id for every call",
            )
        if res[0] == "exceeded":
            budget = _budget(_pairs(res[4]))
            raise exceeded(
                budget, spent=int(res[2]), reserved=int(res[3]), amount=amount_micros, at=now
            )
        budgets = [
            ReservedBudget(budget_id=str(res[i]), period_key=str(res[i + 1]))
            for i in range(1, len(res), 2)
        ]
        return Reservation(
            request_id=request_id, amount_micros=amount_micros, expires_at=expires,
            budgets=budgets,
        )

    async def settle(self, reservation: Reservation, actual_micros: int) -> Settlement:
        check_amount(actual_micros, "actual cost")
        now = self._clock()
        rid = reservation.request_id
        args: list[Any] = [
            self.prefix, _ms(now), rid, actual_micros, SETTLED_RETENTION_S, now.isoformat(),
            len(self._thresholds), *self._thresholds, len(reservation.budgets),
        ]
        for rb in reservation.budgets:
            args += [rb.budget_id, rb.period_key]
        async with guarded(self.url):
            res = await self._settle(args=args)
        if res[0] == "already":
            return Settlement(request_id=rid, actual_micros=actual_micros, already_settled=True)
        fired = [
            BudgetAlert.model_validate({**json.loads(res[i]), "webhook_url": res[i + 1] or None})
            for i in range(1, len(res), 2)
        ]
        if fired:
            self.dispatcher.dispatch(fired)
        return Settlement(request_id=rid, actual_micros=actual_micros, alerts=fired)

    async def release(self, reservation: Reservation) -> None:
        args: list[Any] = [self.prefix, reservation.request_id, len(reservation.budgets)]
        for rb in reservation.budgets:
            args += [rb.budget_id, rb.period_key]
        async with guarded(self.url):
            await self._release(args=args)

    async def alerts(self, budget_id: str | None = None, limit: int = 100) -> list[BudgetAlert]:
        async with guarded(self.url):
            rows = await self._r.lrange(f"{self.prefix}alerts", 0, -1)
        out = []
        for raw in rows:
            alert = BudgetAlert.model_validate(json.loads(raw))
            if budget_id is None or alert.budget_id == budget_id:
                out.append(alert)
                if len(out) >= limit:
                    break
        return out

    async def clear(self) -> int:
        """Delete every key under this store's prefix (tests, and tearing down a tenant)."""
        n = 0
        async with guarded(self.url):
            async for key in self._r.scan_iter(match=f"{_escape(self.prefix)}*", count=1000):
                n += await self._r.delete(key)
        return n


def _escape(prefix: str) -> str:
    """Escape glob characters so SCAN MATCH takes the prefix literally."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in prefix)
