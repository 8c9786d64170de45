"""``open_accounting`` picks the backends from settings; helpers for money and URLs."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from conclave.accounting import (
    BudgetSpec,
    InvocationRecord,
    Outcome,
    RateLimitRule,
    ScopeRef,
    micros_from_usd,
    open_accounting,
    usd,
)
from conclave.accounting import sqlite_path as _sqlite_path
from conclave.accounting._common import redact_url
from conclave.accounting.backends.memory import MemoryRateLimiter
from conclave.accounting.backends.postgres import PostgresLedger, check_schema, psycopg_url
from conclave.accounting.backends.redis import RedisBudgetStore
from conclave.accounting.backends.redis_ratelimit import RedisRateLimiter
from conclave.accounting.backends.sqlite import SqliteLedger
from conclave.accounting.backends.sqlite_budgets import SqliteBudgetStore
from conclave.config import load_settings
from conclave.errors import ConfigError

from .conftest import PG_URL, REDIS_URL, drop_schema, redis_prefix, unique

pytestmark = pytest.mark.integration


async def _exercise(acc: object) -> None:
    now = datetime.now(UTC)
    record = InvocationRecord(started_at=now, ended_at=now, outcome=Outcome.SUCCESS,
                              cost_micros=42)
    await acc.ledger.write(record)  # type: ignore[attr-defined]
    await acc.ledger.flush()  # type: ignore[attr-defined]
    assert await acc.ledger.get(record.id) == record  # type: ignore[attr-defined]
    b = await acc.budgets.create(  # type: ignore[attr-defined]
        BudgetSpec(scope="team", scope_id="t", period="daily", limit_micros=100))
    r = await acc.budgets.reserve([ScopeRef(scope="team", id="t")], 50,  # type: ignore[attr-defined]
                                  request_id=unique("req"))
    await acc.budgets.settle(r, 40)  # type: ignore[attr-defined]
    assert (await acc.budgets.usage(b.id)).spent_micros == 40  # type: ignore[attr-defined]
    res = await acc.ratelimiter.acquire("k|/r", RateLimitRule(requests_per_minute=1))  # type: ignore[attr-defined]
    assert res.allowed
    assert await acc.readiness() == {  # type: ignore[attr-defined]
        "ledger": "ok", "budgets": "ok", "ratelimiter": "ok"}


async def test_embedded_defaults(tmp_path: Path) -> None:
    acc = await open_accounting(load_settings(data_dir=tmp_path))
    try:
        assert isinstance(acc.ledger, SqliteLedger)
        assert isinstance(acc.budgets, SqliteBudgetStore)
        assert isinstance(acc.ratelimiter, MemoryRateLimiter)
        assert acc.ledger.path == tmp_path / "accounting" / "ledger.db"
        assert acc.budgets.path == tmp_path / "accounting" / "budgets.db"
        await _exercise(acc)
    finally:
        await acc.aclose()


async def test_scale_out_engines(tmp_path: Path) -> None:
    schema = unique("factory")
    prefix = redis_prefix()
    settings = load_settings(data_dir=tmp_path, accounting={
        "ledger_url": PG_URL.replace("postgres@", f"postgres:{'pw-x1'}@"),
        "ledger_schema": schema, "budget_backend": "redis", "redis_url": REDIS_URL,
        "redis_prefix": prefix,
    })
    acc = await open_accounting(settings)
    try:
        assert isinstance(acc.ledger, PostgresLedger)
        assert isinstance(acc.budgets, RedisBudgetStore)
        assert isinstance(acc.ratelimiter, RedisRateLimiter)  # follows the budget backend
        assert "pw-x1" not in str(acc.backends)
        await _exercise(acc)
    finally:
        await acc.budgets.clear()  # type: ignore[attr-defined]
        await acc.aclose()
        drop_schema(schema)


async def test_rate_limits_can_stay_in_process(tmp_path: Path) -> None:
    prefix = redis_prefix()
    acc = await open_accounting(load_settings(data_dir=tmp_path, accounting={
        "budget_backend": "redis", "ratelimit_backend": "memory", "redis_prefix": prefix}))
    try:
        assert isinstance(acc.ratelimiter, MemoryRateLimiter)
    finally:
        await acc.aclose()


def test_sqlite_urls(tmp_path: Path) -> None:
    assert _sqlite_path("sqlite:///ledger.db", tmp_path) == tmp_path / "ledger.db"
    assert _sqlite_path("sqlite:////var/x/ledger.db", tmp_path) == Path("/var/x/ledger.db")
    with pytest.raises(ConfigError, match="not a SQLite URL"):
        _sqlite_path("sqlite:/x.db", tmp_path)


async def test_bad_configuration_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unsupported ledger_url mysql://h/db"):
        await open_accounting(load_settings(data_dir=tmp_path, accounting={
            "ledger_url": "mysql://root:pw@h/db"}))
    with pytest.raises(ConfigError, match="invalid PostgreSQL schema"):
        check_schema("Robert'); DROP TABLE")
    with pytest.raises(ConfigError, match="not a PostgreSQL URL"):
        psycopg_url("mysql://h/db")
    assert psycopg_url("postgresql+psycopg://u@h/d") == "postgresql://u@h/d"
    with pytest.raises(ConfigError):
        load_settings(data_dir=tmp_path, accounting={"budget_backend": "memcached"})


def test_money_and_urls() -> None:
    assert usd(12_500_000) == "$12.50"
    assert usd(350) == "$0.00035"
    assert usd(0) == "$0.00"
    assert micros_from_usd(Decimal("1.234567")) == 1_234_567
    assert micros_from_usd("0.5") == 500_000
    with pytest.raises(TypeError):
        micros_from_usd(0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="6 decimal places"):
        micros_from_usd("0.0000001")
    assert redact_url("postgresql://bob:hunter2@db:5432/x") == "postgresql://db:5432/x"
    assert redact_url("redis://:pw@127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
