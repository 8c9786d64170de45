"""Fixtures of the accounting contract suites: every store against its real engine.

PostgreSQL (127.0.0.1:5432, db ``test``) and Redis (127.0.0.1:6379) are the
machine's real services.  Each test gets its own PostgreSQL schema and its own
Redis key prefix, removed afterwards, so runs never see each other's data.
The clocks are injected (a settable time), which is how the tests cross day
boundaries and expire reservations without waiting.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio

from conclave.accounting.backends.memory import MemoryRateLimiter
from conclave.accounting.backends.postgres import PostgresLedger
from conclave.accounting.backends.redis import RedisBudgetStore
from conclave.accounting.backends.redis_ratelimit import RedisRateLimiter
from conclave.accounting.backends.sqlite import SqliteLedger
from conclave.accounting.backends.sqlite_budgets import SqliteBudgetStore
from conclave.accounting.budgets import AlertDispatcher

PG_URL = os.environ.get("CONCLAVE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CONCLAVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unique(tag: str) -> str:
    return f"{tag}_{uuid.uuid4().hex[:12]}"


def redis_prefix() -> str:
    return "{" + unique("ctest") + "}:"


def drop_schema(schema: str) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


class SetClock:
    """A clock the test sets and advances; both kinds the stores take."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2025, 3, 14, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def epoch(self) -> float:
        return self.now.timestamp()

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> SetClock:
    return SetClock()


# --- ledger ----------------------------------------------------------------------------


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def ledger_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    """``await make(**writer_options)`` opens a ledger of the parametrized kind."""
    kind = request.param
    opened: list[SqliteLedger | PostgresLedger] = []
    schema = unique("ledger")

    async def make(**writer: object) -> SqliteLedger | PostgresLedger:
        if kind == "sqlite":
            ledger: SqliteLedger | PostgresLedger = await SqliteLedger.open(
                tmp_path / "ledger.db", **writer  # type: ignore[arg-type]
            )
        else:
            ledger = await PostgresLedger.open(PG_URL, schema=schema, **writer)  # type: ignore[arg-type]
        opened.append(ledger)
        return ledger

    make.kind = kind  # type: ignore[attr-defined]
    make.schema = schema  # type: ignore[attr-defined]
    yield make
    for ledger in opened:
        await ledger.aclose()
    if kind == "postgres":
        drop_schema(schema)


# --- budgets ---------------------------------------------------------------------------


@pytest_asyncio.fixture(params=["sqlite", "redis"])
async def budget_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[object]:
    """``await make(clock=..., **options)``: a budget store of the parametrized kind; every
    store made in one test shares the same data (file or key prefix)."""
    kind = request.param
    prefix = redis_prefix()
    opened: list[SqliteBudgetStore | RedisBudgetStore] = []

    async def make(**options: object) -> SqliteBudgetStore | RedisBudgetStore:
        options.setdefault("dispatcher", AlertDispatcher())
        if kind == "sqlite":
            store: SqliteBudgetStore | RedisBudgetStore = await SqliteBudgetStore.open(
                tmp_path / "budgets.db", **options  # type: ignore[arg-type]
            )
        else:
            store = await RedisBudgetStore.open(REDIS_URL, prefix=prefix, **options)  # type: ignore[arg-type]
        opened.append(store)
        return store

    make.kind = kind  # type: ignore[attr-defined]
    make.prefix = prefix  # type: ignore[attr-defined]
    make.path = tmp_path / "budgets.db"  # type: ignore[attr-defined]
    yield make
    for store in opened:
        if isinstance(store, RedisBudgetStore) and store is opened[0]:
            await store.clear()
        await store.aclose()


# --- rate limits -----------------------------------------------------------------------


@pytest_asyncio.fixture(params=["memory", "redis"])
async def limiter_factory(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    kind = request.param
    prefix = redis_prefix()
    opened: list[MemoryRateLimiter | RedisRateLimiter] = []

    async def make(**options: object) -> MemoryRateLimiter | RedisRateLimiter:
        if kind == "memory":
            limiter: MemoryRateLimiter | RedisRateLimiter = MemoryRateLimiter(**options)  # type: ignore[arg-type]
        else:
            limiter = await RedisRateLimiter.open(REDIS_URL, prefix=prefix, **options)  # type: ignore[arg-type]
        opened.append(limiter)
        return limiter

    make.kind = kind  # type: ignore[attr-defined]
    make.prefix = prefix  # type: ignore[attr-defined]
    yield make
    for limiter in opened:
        await limiter.aclose()
    if kind == "redis":
        cleaner = await RedisBudgetStore.open(REDIS_URL, prefix=prefix)
        await cleaner.clear()
        await cleaner.aclose()
