"""Backend outages, for real: fail closed with a 503, write nothing half-way, recover.

Redis: the test runs its own ``redis-server`` on a free port (password set, to
check it never appears in an error) and stops and restarts it.  PostgreSQL:
the client talks to 127.0.0.1:5432 through a TCP proxy the test cuts and
restores.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio

from conclave.accounting import open_accounting
from conclave.accounting.backends.postgres import PostgresLedger
from conclave.accounting.backends.redis import RedisBudgetStore
from conclave.accounting.backends.redis_ratelimit import RedisRateLimiter
from conclave.accounting.budgets import BudgetSpec, ScopeRef
from conclave.accounting.ledger import InvocationRecord, LedgerQuery, Outcome
from conclave.accounting.ratelimit import RateLimitRule
from conclave.config import load_settings
from conclave.errors import BackendUnavailable

from ._proxy import TcpProxy
from .conftest import drop_schema, redis_prefix, unique

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-pw-for-test"
TEAM = ScopeRef(scope="team", id="ops")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    """A redis-server this test starts and stops (append-only file, so data survives)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--dir", str(self.workdir), "--requirepass", PASSWORD,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()  # clean shutdown: the append-only file is complete
            await self.proc.wait()
        self.proc = None


@pytest_asyncio.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def assert_clean_503(err: BackendUnavailable, backend: str, port: int) -> None:
    assert err.http_status == 503 and err.backend == backend
    text = str(err)
    assert f"127.0.0.1:{port}" in text
    assert PASSWORD not in text and PASSWORD not in (err.url or "")
    assert "calls are refused until it is back" in text


async def test_redis_outage_fails_closed_and_recovers(own_redis: OwnRedis) -> None:
    prefix = redis_prefix()
    store = await RedisBudgetStore.open(own_redis.url, prefix=prefix, timeout_s=1)
    limiter = await RedisRateLimiter.open(own_redis.url, prefix=prefix, timeout_s=1)
    rule = RateLimitRule(requests_per_minute=100)
    try:
        b = await store.create(BudgetSpec(scope="team", scope_id="ops", period="daily",
                                          limit_micros=10_000))
        await store.settle(await store.reserve([TEAM], 1_000, request_id="before"), 1_000)
        in_flight = await store.reserve([TEAM], 5_000, request_id="in-flight")
        assert (await limiter.acquire("k", rule)).allowed

        await own_redis.stop()
        started = time.monotonic()
        attempts = [
            store.reserve([TEAM], 100, request_id="during"),
            store.settle(in_flight, 4_000),
            store.release(in_flight),
            store.usage(b.id),
            store.create(BudgetSpec(scope="team", scope_id="x", period="daily", limit_micros=1)),
            store.alerts(),
            limiter.acquire("k", rule),
            store.ping(),
        ]
        for attempt in attempts:
            with pytest.raises(BackendUnavailable) as exc:
                await attempt
            assert_clean_503(exc.value, "Redis", own_redis.port)
        assert time.monotonic() - started < 10  # fails fast, no long hang

        await own_redis.start()
        usage = await store.usage(b.id)
        # nothing from the outage was half-applied: the refused reserve left no reservation,
        # the settle that failed did not count
        assert (usage.spent_micros, usage.reserved_micros, usage.active_reservations) == (
            1_000, 5_000, 1)
        settled = await store.settle(in_flight, 4_000)  # the gateway retries the settle
        assert not settled.already_settled
        usage = await store.usage(b.id)
        assert (usage.spent_micros, usage.reserved_micros) == (5_000, 0)
        await store.reserve([TEAM], 5_000, request_id="after")
        after = await limiter.acquire("k", rule)
        assert after.allowed and after.requests.used == 2  # type: ignore[union-attr]
    finally:
        await limiter.aclose()
        await store.aclose()


async def test_redis_down_at_open(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    with pytest.raises(BackendUnavailable) as exc:
        await RedisBudgetStore.open(url, timeout_s=1)
    assert_clean_503(exc.value, "Redis", port)
    settings = load_settings(data_dir=tmp_path, accounting={
        "budget_backend": "redis", "redis_url": url, "backend_timeout_s": 1})
    with pytest.raises(BackendUnavailable):
        await open_accounting(settings)
    # the SQLite ledger opened before the failure was closed again: reopening works
    ok = await open_accounting(load_settings(data_dir=tmp_path))
    await ok.aclose()


def rec(i: int) -> InvocationRecord:
    now = datetime.now(UTC)
    return InvocationRecord(started_at=now, ended_at=now, outcome=Outcome.SUCCESS, cost_micros=i)


async def _until_flushed(ledger: PostgresLedger, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            await ledger.flush()
            return
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_postgres_outage_fails_closed_and_recovers(tmp_path: Path) -> None:
    proxy = await TcpProxy("127.0.0.1", 5432).start()
    schema = unique("outage")
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{proxy.port}/test"
    spill = tmp_path / "spill"
    ledger = await PostgresLedger.open(url, schema=schema, timeout_s=1, spill_dir=spill,
                                       flush_interval_s=0.02, close_timeout_s=1.5)
    reopened: PostgresLedger | None = None
    try:
        first = rec(0)
        await ledger.write(first)
        await ledger.flush()
        ledger.ensure_available()

        await proxy.cut()
        during = [rec(i) for i in range(1, 51)]
        for r in during:
            await ledger.write(r)  # accepted into memory: the calls already happened
        with pytest.raises(BackendUnavailable) as exc:
            await ledger.flush()
        assert_clean_503(exc.value, "PostgreSQL", proxy.port)
        with pytest.raises(BackendUnavailable):
            ledger.ensure_available()  # the gateway refuses new calls now
        for read in (ledger.count(), ledger.get(first.id), ledger.list_records(),
                     ledger.spend("day"), ledger.ping()):
            with pytest.raises(BackendUnavailable) as exc:
                await read
            assert_clean_503(exc.value, "PostgreSQL", proxy.port)

        await proxy.restore()
        await _until_flushed(ledger)
        ledger.ensure_available()
        assert await ledger.count() == 51
        got = await ledger.list_records(LedgerQuery(limit=1000))
        assert sorted(r.cost_micros for r in got) == list(range(51))  # each exactly once

        # Down at shutdown: the records are spilled to disk and replayed by the next open.
        await proxy.cut()
        late = [rec(i) for i in range(100, 120)]
        for r in late:
            await ledger.write(r)
        await ledger.aclose()
        files = list(spill.glob("spill-*.jsonl"))
        assert len(files) == 1 and len(files[0].read_text().splitlines()) == 20

        with pytest.raises(BackendUnavailable):
            await PostgresLedger.open(url, schema=schema, timeout_s=1, spill_dir=spill)
        assert len(list(spill.glob("spill-*.jsonl"))) == 1  # kept for the next try

        await proxy.restore()
        deadline = time.monotonic() + 30
        while reopened is None:
            try:
                reopened = await PostgresLedger.open(url, schema=schema, timeout_s=1,
                                                     spill_dir=spill)
            except BackendUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert await reopened.count() == 71
        assert list(spill.glob("spill-*.jsonl")) == []
    finally:
        await ledger.aclose()
        if reopened is not None:
            await reopened.aclose()
        await proxy.close()
        drop_schema(schema)
