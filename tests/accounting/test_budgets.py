"""BudgetStore contract: the same tests against SQLite and Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from multiprocessing import get_context
from typing import Any

import pytest

from conclave.accounting.backends.redis import RedisBudgetStore
from conclave.accounting.budgets import (
    AlertDispatcher,
    BudgetAlert,
    BudgetSpec,
    BudgetStore,
    BudgetUpdate,
    Period,
    ScopeRef,
    period_key,
)
from conclave.errors import BudgetAlreadyExists, BudgetExceeded, BudgetNotFound, InvalidRequest

from . import _workers
from .conftest import REDIS_URL, SetClock

pytestmark = pytest.mark.integration

TEAM = ScopeRef(scope="team", id="research")
KEY = ScopeRef(scope="api_key", id="key_1")


def spec(**kw: Any) -> BudgetSpec:
    base: dict[str, Any] = {"scope": "team", "scope_id": "research", "period": "daily",
                            "limit_micros": 10_000}
    base.update(kw)
    return BudgetSpec(**base)


class WebhookSink:
    """A loopback HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> WebhookSink:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode().split("\r\n"):
            if line.lower().startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        body = await reader.readexactly(length)
        self.bodies.append(json.loads(body))
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()


async def test_both_backends_satisfy_the_protocol(budget_factory: Any) -> None:
    assert isinstance(await budget_factory(), BudgetStore)


async def test_crud(budget_factory: Any, clock: SetClock) -> None:
    store = await budget_factory(clock=clock)
    team = await store.create(spec(name="research daily"))
    clock.advance(seconds=1)
    glob = await store.create(BudgetSpec(scope="global", scope_id="ignored", period="monthly",
                                         limit_micros=5_000_000))
    assert glob.scope_id == "*"
    assert (await store.get(team.id)) == team
    assert [b.id for b in await store.list_budgets()] == [team.id, glob.id]
    assert [b.id for b in await store.list_budgets(TEAM)] == [team.id]
    assert await store.list_budgets(KEY) == []

    with pytest.raises(BudgetAlreadyExists, match=team.id) as exc:
        await store.create(spec(limit_micros=1))
    assert exc.value.http_status == 409

    clock.advance(minutes=1)
    updated = await store.update(team.id, BudgetUpdate(limit_micros=20_000,
                                                      webhook_url="http://127.0.0.1:9/x"))
    assert updated.limit_micros == 20_000 and updated.name == "research daily"
    assert updated.webhook_url == "http://127.0.0.1:9/x"
    assert updated.updated_at > updated.created_at
    cleared = await store.update(team.id, BudgetUpdate(webhook_url=""))
    assert cleared.webhook_url is None

    await store.delete(team.id)
    with pytest.raises(BudgetNotFound) as nf:
        await store.get(team.id)
    assert nf.value.http_status == 404
    for call in (store.delete(team.id), store.usage(team.id), store.reset(team.id),
                 store.update(team.id, BudgetUpdate(name="x"))):
        with pytest.raises(BudgetNotFound):
            await call
    # a deleted budget no longer applies (20_000 was its limit); the global one still does
    r = await store.reserve([TEAM], 1_000_000, request_id="after-delete")
    assert [b.budget_id for b in r.budgets] == [glob.id]

    with pytest.raises(ValueError, match="webhook_url"):
        spec(webhook_url="ftp://x")
    with pytest.raises(ValueError, match="needs an id"):
        spec(scope_id="")


async def test_refusal_names_the_budget_and_the_fix(budget_factory: Any, clock: SetClock) -> None:
    store = await budget_factory(clock=clock)
    b = await store.create(spec(limit_micros=1_000_000, name="research"))
    r = await store.reserve([TEAM], 600_000, request_id="a")
    await store.settle(r, 500_000)
    await store.reserve([TEAM], 300_000, request_id="b")
    with pytest.raises(BudgetExceeded) as exc:
        await store.reserve([TEAM], 250_000, request_id="c")
    err = exc.value
    assert err.http_status == 402
    assert (err.budget_id, err.limit_micros, err.spent_micros, err.reserved_micros,
            err.requested_micros) == (b.id, 1_000_000, 500_000, 300_000, 250_000)
    text = str(err)
    assert "research" in text and "limit $1.00" in text and "spent $0.50" in text
    assert "$0.30" in text and "$0.25" in text
    assert "conclave budget set --scope team --id research --period daily" in text
    assert "2025-03-15 00:00 UTC" in text
    # 200_000 still fits exactly
    await store.reserve([TEAM], 200_000, request_id="d")


async def test_amounts_are_integers(budget_factory: Any) -> None:
    store = await budget_factory()
    with pytest.raises(TypeError, match="micro-dollars"):
        await store.reserve([TEAM], 1.5, request_id="f")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.reserve([TEAM], -1, request_id="n")
    with pytest.raises(InvalidRequest):
        await store.reserve([TEAM], 1, request_id="")


async def test_every_applicable_budget_is_checked(budget_factory: Any, clock: SetClock) -> None:
    store = await budget_factory(clock=clock)
    glob = await store.create(BudgetSpec(scope="global", period="monthly", limit_micros=50_000))
    team = await store.create(spec(limit_micros=30_000))
    key = await store.create(BudgetSpec(scope="api_key", scope_id="key_1", period="lifetime",
                                        limit_micros=100_000))
    other = await store.create(BudgetSpec(scope="user", scope_id="bob", period="daily",
                                          limit_micros=1))

    r = await store.reserve([TEAM, KEY, ScopeRef(scope="user", id="ada")], 20_000,
                            request_id="r1")
    assert {b.budget_id for b in r.budgets} == {glob.id, team.id, key.id}
    await store.settle(r, 20_000)
    # the team budget is the tightest now: 10_000 left
    with pytest.raises(BudgetExceeded) as exc:
        await store.reserve([TEAM, KEY], 15_000, request_id="r2")
    assert exc.value.budget_id == team.id
    # the global budget applies even when not named
    r3 = await store.reserve([KEY], 25_000, request_id="r3")
    await store.settle(r3, 25_000)
    with pytest.raises(BudgetExceeded) as exc:
        await store.reserve([], 6_000, request_id="r4")
    assert exc.value.budget_id == glob.id
    for b, spent in ((glob, 45_000), (team, 20_000), (key, 45_000), (other, 0)):
        assert (await store.usage(b.id)).spent_micros == spent


async def test_concurrent_race_never_overruns(budget_factory: Any, clock: SetClock) -> None:
    """1,000 concurrent reserve+settle; the limit admits only a fraction of them."""
    store = await budget_factory(clock=clock)
    limit = 150_000
    b = await store.create(spec(limit_micros=limit))
    glob = await store.create(BudgetSpec(scope="global", period="lifetime", limit_micros=10**12))
    rng = random.Random(7)
    admitted: list[int] = []
    refused = 0

    async def call(i: int) -> None:
        nonlocal refused
        worst = 1_000
        await asyncio.sleep(rng.random() / 2)  # arrivals spread over 500 ms
        try:
            res = await store.reserve([TEAM], worst, request_id=f"race-{i}")
        except BudgetExceeded:
            refused += 1
            return
        await asyncio.sleep(rng.random() / 50)  # the "provider call"
        if i % 10 == 0:
            admitted.append(0)
            await store.release(res)  # failed call: nothing spent
        else:
            actual = rng.randint(300, worst)
            admitted.append(actual)
            await store.settle(res, actual)

    await asyncio.gather(*(call(i) for i in range(1000)))
    usage = await store.usage(b.id)
    assert usage.spent_micros == sum(admitted) <= limit
    assert refused > 500 and len(admitted) >= limit // 1000  # only a fraction got through
    # and the budget was used, not left idle (loose: on a loaded 2-core box some calls
    # arrive after the limit is reached by reservations still in flight)
    assert usage.spent_micros > limit * 0.5
    assert usage.reserved_micros == 0 and usage.active_reservations == 0
    assert (await store.usage(glob.id)).spent_micros == sum(admitted)


async def test_expired_reservations_stop_counting(budget_factory: Any, clock: SetClock) -> None:
    store = await budget_factory(clock=clock, reservation_ttl_s=30)
    b = await store.create(spec(limit_micros=1_000))
    await store.reserve([TEAM], 800, request_id="crashed")  # its replica never settles
    with pytest.raises(BudgetExceeded):
        await store.reserve([TEAM], 800, request_id="next")
    clock.advance(seconds=29)
    assert (await store.usage(b.id)).reserved_micros == 800
    clock.advance(seconds=1)
    usage = await store.usage(b.id)
    assert usage.reserved_micros == 0 and usage.active_reservations == 0
    r = await store.reserve([TEAM], 800, request_id="next", ttl_s=5)
    assert (r.expires_at - clock.now).total_seconds() == 5


async def test_settle_is_idempotent(budget_factory: Any, clock: SetClock) -> None:
    store = await budget_factory(clock=clock)
    b = await store.create(spec(limit_micros=10_000))
    r = await store.reserve([TEAM], 4_000, request_id="once")
    first, second = await asyncio.gather(store.settle(r, 3_000), store.settle(r, 3_000))
    assert sorted([first.already_settled, second.already_settled]) == [False, True]
    third = await store.settle(r, 9_999)
    assert third.already_settled
    usage = await store.usage(b.id)
    assert usage.spent_micros == 3_000 and usage.reserved_micros == 0
    with pytest.raises(InvalidRequest, match="already settled"):
        await store.reserve([TEAM], 1, request_id="once")


async def test_reserve_retry_with_same_request_id_is_not_double_counted(
    budget_factory: Any,
) -> None:
    store = await budget_factory()
    b = await store.create(spec(limit_micros=1_000))
    await store.reserve([TEAM], 700, request_id="retry")
    await store.reserve([TEAM], 700, request_id="retry")  # e.g. a retried network call
    usage = await store.usage(b.id)
    assert usage.reserved_micros == 700 and usage.active_reservations == 1


async def test_release_frees_the_reservation(budget_factory: Any) -> None:
    store = await budget_factory()
    b = await store.create(spec(limit_micros=1_000))
    r = await store.reserve([TEAM], 900, request_id="fail")
    await store.release(r)
    await store.release(r)  # twice is harmless
    usage = await store.usage(b.id)
    assert (usage.spent_micros, usage.reserved_micros, usage.remaining_micros) == (0, 0, 1_000)
    await store.reserve([TEAM], 1_000, request_id="fits")


async def test_cut_stream_is_settled_for_what_was_consumed(budget_factory: Any) -> None:
    store = await budget_factory()
    b = await store.create(spec(limit_micros=100_000))
    r = await store.reserve([TEAM], 40_000, request_id="cut")
    await store.settle(r, 12_345)  # the tokens streamed before the client went away
    usage = await store.usage(b.id)
    assert usage.spent_micros == 12_345 and usage.reserved_micros == 0
    assert usage.percent == Decimal("12.34")  # 12.345 rounded down


async def test_settle_after_budget_deleted(budget_factory: Any) -> None:
    store = await budget_factory()
    b = await store.create(spec())
    r = await store.reserve([TEAM], 100, request_id="orphan")
    await store.delete(b.id)
    s = await store.settle(r, 100)
    assert not s.already_settled and s.alerts == []


async def test_alerts_fire_exactly_once_under_concurrency(
    budget_factory: Any, clock: SetClock, caplog: pytest.LogCaptureFixture
) -> None:
    sink = await WebhookSink().start()
    hooked: list[BudgetAlert] = []

    async def hook(alert: BudgetAlert) -> None:
        hooked.append(alert)

    dispatcher = AlertDispatcher([hook], webhook_timeout_s=5)
    store = await budget_factory(clock=clock, dispatcher=dispatcher)
    # a second replica on the same data, with its own dispatcher feeding the same hook
    other = await budget_factory(clock=clock, dispatcher=AlertDispatcher([hook]))
    b = await store.create(spec(limit_micros=10_000, webhook_url=sink.url, name="research"))
    try:
        async def call(s: Any, i: int) -> None:
            try:
                r = await s.reserve([TEAM], 100, request_id=f"al-{i}")
            except BudgetExceeded:
                return
            await s.settle(r, 100)

        with caplog.at_level(logging.WARNING, logger="conclave.accounting.budgets"):
            await asyncio.gather(*(call(store if i % 2 else other, i) for i in range(300)))
            await store.dispatcher.drain()
            await other.dispatcher.drain()

        usage = await store.usage(b.id)
        assert usage.spent_micros == 10_000  # exactly 100 calls fit
        history = await store.alerts(b.id)
        assert sorted(a.threshold for a in history) == [80, 100]
        by_thr = {a.threshold: a for a in history}
        assert 8_000 <= by_thr[80].spent_micros < 10_000
        assert by_thr[100].spent_micros == 10_000
        assert history[0].threshold == 100  # newest first
        assert all(a.period_key == period_key(Period.DAILY, clock.now) for a in history)

        # delivered once each, wherever the settle that crossed it ran
        delivered = [a.threshold for a in hooked]
        logged = [r for r in caplog.records if getattr(r, "conclave_event", {}).get(
            "type") == "budget.alert"]
        posted = [body["threshold"] for body in sink.bodies]
        assert len(logged) == 2
        assert sorted(posted) == [80, 100]
        assert sorted(delivered) == [80, 100]
        assert all(body["budget_id"] == b.id and body["type"] == "budget.alert"
                   for body in sink.bodies)
        assert "research" in logged[0].getMessage()
    finally:
        await sink.close()


async def test_reset_rearms_alerts(budget_factory: Any, clock: SetClock) -> None:
    store = await budget_factory(clock=clock)
    b = await store.create(spec(limit_micros=1_000))
    s = await store.settle(await store.reserve([TEAM], 900, request_id="x1"), 900)
    assert [a.threshold for a in s.alerts] == [80]
    usage = await store.reset(b.id)
    assert usage.spent_micros == 0
    s = await store.settle(await store.reserve([TEAM], 1_000, request_id="x2"), 1_000)
    assert [a.threshold for a in s.alerts] == [80, 100]
    assert len(await store.alerts(b.id)) == 3


async def test_daily_period_rolls_over_at_utc_midnight(
    budget_factory: Any, clock: SetClock
) -> None:
    clock.now = datetime(2025, 3, 14, 23, 59, 50, tzinfo=UTC)
    store = await budget_factory(clock=clock)
    daily = await store.create(spec(limit_micros=1_000))
    monthly = await store.create(spec(period="monthly", limit_micros=10_000))
    lifetime = await store.create(spec(period="lifetime", limit_micros=100_000))
    r = await store.reserve([TEAM], 1_000, request_id="late")
    await store.settle(r, 1_000)
    with pytest.raises(BudgetExceeded):
        await store.reserve([TEAM], 1, request_id="still-today")
    yesterday = clock.now

    clock.advance(seconds=20)  # 00:00:10 the next day
    u = await store.usage(daily.id)
    assert (u.period_key, u.spent_micros) == ("d2025-03-15", 0)
    assert u.period_start == datetime(2025, 3, 15, tzinfo=UTC)
    assert u.period_end == datetime(2025, 3, 16, tzinfo=UTC)
    assert (await store.usage(daily.id, at=yesterday)).spent_micros == 1_000
    r = await store.reserve([TEAM], 1_000, request_id="early")
    await store.settle(r, 1_000)
    assert (await store.usage(monthly.id)).spent_micros == 2_000

    clock.now = datetime(2025, 4, 1, 0, 0, 1, tzinfo=UTC)  # a new month
    assert (await store.usage(monthly.id)).spent_micros == 0
    life = await store.usage(lifetime.id)
    assert (life.period_key, life.spent_micros, life.period_end) == ("lifetime", 2_000, None)
    clock.now = datetime(2031, 1, 1, tzinfo=UTC)
    assert (await store.usage(lifetime.id)).spent_micros == 2_000


def test_period_keys() -> None:
    t = datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert period_key(Period.DAILY, t) == "d2024-12-31"
    assert period_key(Period.MONTHLY, t) == "m2024-12"
    assert period_key(Period.LIFETIME, t) == "lifetime"
    with pytest.raises(ValueError, match="timezone-aware"):
        period_key(Period.DAILY, datetime(2024, 1, 1))


async def test_two_stores_on_the_same_data_share_budgets(budget_factory: Any) -> None:
    a = await budget_factory()
    b = await budget_factory()
    budget = await a.create(spec(limit_micros=1_000))
    await b.settle(await b.reserve([TEAM], 600, request_id="x"), 600)
    with pytest.raises(BudgetExceeded):
        await a.reserve([TEAM], 600, request_id="y")
    assert (await a.usage(budget.id)).spent_micros == 600


# --- Redis from several OS processes ------------------------------------------------------


async def test_redis_race_from_four_processes() -> None:
    prefix = "{" + f"race4_{time.time_ns()}" + "}:"
    store = await RedisBudgetStore.open(REDIS_URL, prefix=prefix)
    try:
        limit, amount, actual = 300_000, 1_000, 900
        b = await store.create(spec(scope_id="race", limit_micros=limit))
        start_at = time.time() + 3.0
        with ProcessPoolExecutor(max_workers=4, mp_context=get_context("spawn")) as pool:
            futures = [
                pool.submit(_workers.budget_race, REDIS_URL, prefix, "race", 250, amount, actual,
                            start_at)
                for _ in range(4)
            ]
            results = await asyncio.to_thread(lambda: [f.result(timeout=90) for f in futures])
        admitted = sum(a for a, _ in results)
        refused = sum(r for _, r in results)
        assert admitted + refused == 1000
        usage = await store.usage(b.id)
        assert usage.spent_micros == admitted * actual <= limit
        # reservations are 1,000 but settle at 900: later calls fit into what settling freed
        assert 300 <= admitted <= limit // actual
        assert usage.reserved_micros == 0 and usage.active_reservations == 0
        crossed = [t for t in (80, 100) if usage.spent_micros * 100 >= limit * t]
        assert sorted(a.threshold for a in await store.alerts(b.id)) == crossed
        assert crossed  # 80% is always reached: at least 300 x 900 of 300,000
    finally:
        await store.clear()
        await store.aclose()
