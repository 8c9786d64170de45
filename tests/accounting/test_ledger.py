"""Ledger contract: the same tests against SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from pydantic import ValidationError

from conclave.accounting.backends.postgres import PostgresLedger
from conclave.accounting.backends.sqlite import SqliteLedger
from conclave.accounting.ledger import (
    COLUMNS,
    OTEL_ATTRIBUTES,
    InvocationRecord,
    Ledger,
    LedgerQuery,
    Outcome,
)
from conclave.errors import InvalidRequest

from . import _workers
from .conftest import PG_URL, drop_schema, unique

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


def rec(**kw: Any) -> InvocationRecord:
    started = kw.pop("started_at", T0)
    latency = kw.pop("latency", 100)
    base: dict[str, Any] = {
        "started_at": started,
        "ended_at": started + timedelta(milliseconds=latency),
        "outcome": Outcome.SUCCESS,
        "provider": "openai",
        "request_model": "gpt-4o-mini",
        "response_model": "gpt-4o-mini-2024-07-18",
    }
    base.update(kw)
    return InvocationRecord(**base)


async def test_both_backends_satisfy_the_protocol(ledger_factory: Any) -> None:
    ledger = await ledger_factory()
    assert isinstance(ledger, Ledger)


async def test_round_trip_keeps_every_field(ledger_factory: Any) -> None:
    ledger = await ledger_factory()
    paris = timezone(timedelta(hours=1))
    full = InvocationRecord(
        started_at=datetime(2025, 3, 14, 13, 0, 0, 123456, tzinfo=paris),
        ended_at=datetime(2025, 3, 14, 13, 0, 2, 654321, tzinfo=paris),
        operation="chat", provider="anthropic", request_model="claude-haiku",
        response_model="claude-3-5-haiku-20241022", response_id="msg_01", max_tokens=512,
        finish_reasons=["stop", "length"], tier=2, privacy=True, input_tokens=1200,
        output_tokens=340, cached_input_tokens=1000, cache_write_tokens=200,
        tokens_estimated=True, cost_micros=123_456_789, ttft_ms=250, outcome=Outcome.CUT,
        error_type="client_disconnected", api_key_id="key_1", user="ada", team="research",
        run_id="run-7", workflow_id="wf-2", experiment="prompt-v2", variant="B",
        route="/v1/chat/completions", attributes={"ticket": "T-1"},
    )
    minimal = rec(provider=None, request_model=None, response_model=None, latency=0)
    await ledger.write(full)
    await ledger.write(minimal)
    await ledger.flush()

    got = await ledger.get(full.id)
    assert got == full
    assert got.started_at.tzinfo is not None and got.started_at.utcoffset() == timedelta(0)
    assert got.started_at.hour == 12  # stored in UTC
    assert got.latency_ms == 2530  # derived from the timestamps (floor)
    assert await ledger.get(minimal.id) == minimal
    assert await ledger.get(uuid4()) is None


async def test_otel_names_and_columns() -> None:
    r = rec(input_tokens=5, cached_input_tokens=2, error_type="timeout", user="u")
    attrs = r.otel_attributes()
    assert attrs["gen_ai.usage.input_tokens"] == 5
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 2
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert attrs["error.type"] == "timeout"
    assert attrs["user.id"] == "u"
    assert "gen_ai.response.id" not in attrs  # None values are left out
    for field, otel in OTEL_ATTRIBUTES.items():
        assert COLUMNS[field] == otel.replace(".", "_")
    assert COLUMNS["cost_micros"] == "cost_micros"


async def test_table_columns_match_the_mapping(ledger_factory: Any) -> None:
    ledger = await ledger_factory()
    if ledger_factory.kind == "sqlite":
        with sqlite3.connect(ledger.path) as conn:
            cols = [r[1] for r in conn.execute("PRAGMA table_info(invocations)")]
    else:
        with psycopg.connect(PG_URL) as conn:
            cols = [r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = 'invocations' ORDER BY ordinal_position",
                [ledger.schema],
            )]
    assert cols == list(COLUMNS.values())


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        InvocationRecord(started_at=datetime(2025, 1, 1), ended_at=datetime(2025, 1, 1),
                         outcome=Outcome.SUCCESS)
    with pytest.raises(ValidationError, match="before started_at"):
        rec(started_at=T0, ended_at=T0 - timedelta(seconds=1))
    with pytest.raises(ValidationError):
        rec(cost_micros=-1)


async def test_two_thousand_concurrent_writes_lose_nothing(ledger_factory: Any) -> None:
    ledger = await ledger_factory(batch_size=100, flush_interval_s=0.05)
    records = [rec(cost_micros=i, started_at=T0 + timedelta(seconds=i)) for i in range(2000)]
    await asyncio.gather(*(ledger.write(r) for r in records))
    await ledger.flush()
    assert await ledger.count() == 2000
    seen = await ledger.list_records(LedgerQuery(limit=5000))
    assert {r.id for r in seen} == {r.id for r in records}
    spend = await ledger.spend("provider")
    assert spend[0].cost_micros == sum(range(2000))


async def test_writes_flush_on_their_own(ledger_factory: Any) -> None:
    ledger = await ledger_factory(flush_interval_s=0.05, batch_size=1000)
    r = rec()
    await ledger.write(r)
    for _ in range(100):
        if await ledger.get(r.id) is not None:
            break
        await asyncio.sleep(0.02)
    assert await ledger.get(r.id) == r
    assert ledger.pending == 0


async def test_a_record_the_database_refuses_does_not_block_the_rest(
    ledger_factory: Any, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    ledger = await ledger_factory(spill_dir=spill)
    good = [rec(cost_micros=i) for i in range(3)]
    # bypasses validation the way a bug upstream might: a value no BIGINT column holds
    bad = InvocationRecord.model_construct(**{**rec().model_dump(), "cost_micros": 2**70})
    for r in (good[0], bad, good[1]):
        await ledger.write(r)
    await ledger.flush()
    await ledger.write(good[2])
    await ledger.flush()
    assert await ledger.count() == 3
    ledger.ensure_available()  # a data error is not an outage
    (rejected,) = spill.glob("rejected-*.jsonl")
    assert str(bad.id) in rejected.read_text()
    with pytest.raises(ValidationError, match="NUL"):
        rec(provider="open\x00ai")


async def test_the_same_record_twice_is_stored_once(ledger_factory: Any) -> None:
    ledger = await ledger_factory()
    r = rec()
    await ledger.write(r)
    await ledger.flush()
    await ledger.write(r)
    await ledger.flush()
    assert await ledger.count() == 1


async def test_aclose_drains_everything_and_reopen_sees_it(ledger_factory: Any) -> None:
    ledger = await ledger_factory(flush_interval_s=3600, batch_size=10**6)
    records = [rec(cost_micros=i) for i in range(300)]
    for r in records:
        await ledger.write(r)
    assert ledger.pending == 300
    await ledger.aclose()
    again = await ledger_factory()
    assert await again.count() == 300
    with pytest.raises(Exception, match="closed"):
        await ledger.write(rec())


async def test_list_filters_and_count(ledger_factory: Any) -> None:
    ledger = await ledger_factory()
    rows = [
        rec(started_at=T0 + timedelta(minutes=i), api_key_id=f"k{i % 2}", team="t",
            outcome=Outcome.ERROR if i % 5 == 0 else Outcome.SUCCESS, run_id=f"r{i % 3}")
        for i in range(20)
    ]
    for r in rows:
        await ledger.write(r)
    await ledger.flush()

    q = LedgerQuery(api_key_id="k1")
    assert await ledger.count(q) == 10
    listed = await ledger.list_records(q)
    assert [r.started_at for r in listed] == sorted((r.started_at for r in listed), reverse=True)
    assert all(r.api_key_id == "k1" for r in listed)

    window = LedgerQuery(since=T0 + timedelta(minutes=5), until=T0 + timedelta(minutes=10))
    assert await ledger.count(window) == 5  # half-open: minutes 5..9
    assert await ledger.count(LedgerQuery(outcome=Outcome.ERROR)) == 4
    assert await ledger.count(LedgerQuery(run_id="r0", api_key_id="k0")) == 4

    page1 = await ledger.list_records(LedgerQuery(limit=7))
    page2 = await ledger.list_records(LedgerQuery(limit=7, offset=7))
    assert len(page1) == 7 and len(page2) == 7
    assert not {r.id for r in page1} & {r.id for r in page2}
    assert page1[0].started_at == T0 + timedelta(minutes=19)


def _nearest_rank(values: list[int], p: int) -> int:
    ordered = sorted(values)
    return ordered[-(-p * len(ordered) // 100) - 1]


async def test_spend_breakdown_sums_and_percentiles(ledger_factory: Any) -> None:
    ledger = await ledger_factory()
    providers = ["openai", "anthropic", "local"]
    records = []
    for i in range(90):
        records.append(rec(
            started_at=T0 + timedelta(hours=7 * i),  # spreads over ~26 days, two months
            provider=providers[i % 3],
            request_model=f"m{i % 4}",
            response_model=None if i % 4 == 3 else f"m{i % 4}-resp",
            api_key_id=f"key{i % 2}",
            user=None if i % 6 == 0 else f"user{i % 5}",
            team="research" if i % 2 else "ops",
            cost_micros=1000 + 37 * i,
            input_tokens=100 + i,
            output_tokens=10 + i,
            cached_input_tokens=i % 7,
            cache_write_tokens=i % 3,
            latency=50 + (i * 53) % 400,
        ))
    for r in records:
        await ledger.write(r)
    await ledger.flush()

    keyers = {
        "provider": lambda r: r.provider,
        "model": lambda r: r.response_model or r.request_model,
        "api_key": lambda r: r.api_key_id,
        "user": lambda r: r.user,
        "team": lambda r: r.team,
        "day": lambda r: r.started_at.strftime("%Y-%m-%d"),
    }
    for by, keyer in keyers.items():
        groups: dict[Any, list[InvocationRecord]] = defaultdict(list)
        for r in records:
            groups[keyer(r)].append(r)
        rows = await ledger.spend(by)  # type: ignore[arg-type]
        assert {row.key for row in rows} == set(groups), by
        for row in rows:
            g = groups[row.key]
            assert row.count == len(g)
            assert row.cost_micros == sum(r.cost_micros for r in g)
            assert row.input_tokens == sum(r.input_tokens for r in g)
            assert row.output_tokens == sum(r.output_tokens for r in g)
            assert row.cached_input_tokens == sum(r.cached_input_tokens for r in g)
            assert row.cache_write_tokens == sum(r.cache_write_tokens for r in g)
            lat = [r.latency_ms for r in g]
            assert row.p50_latency_ms == _nearest_rank(lat, 50), by
            assert row.p95_latency_ms == _nearest_rank(lat, 95), by
        if by == "day":
            assert [r.key for r in rows] == sorted(groups)
        else:
            assert [r.cost_micros for r in rows] == sorted((r.cost_micros for r in rows),
                                                           reverse=True)
    assert sum(r.cost_micros for r in await ledger.spend("provider")) == sum(
        r.cost_micros for r in records
    )

    march = LedgerQuery(since=datetime(2025, 3, 1, tzinfo=UTC),
                        until=datetime(2025, 4, 1, tzinfo=UTC), provider="openai")
    in_march = [r for r in records if r.started_at.month == 3 and r.provider == "openai"]
    (row,) = await ledger.spend("provider", march)
    assert row.count == len(in_march)
    assert row.cost_micros == sum(r.cost_micros for r in in_march)

    with pytest.raises(InvalidRequest, match="cannot break spend down"):
        await ledger.spend("planet")  # type: ignore[arg-type]


# --- PostgreSQL only --------------------------------------------------------------------


async def test_partitions_are_created_for_past_and_future_months() -> None:
    schema = unique("parts")
    ledger = await PostgresLedger.open(PG_URL, schema=schema, partitions_ahead=2)
    try:
        now = datetime.now(UTC)
        ahead = await ledger.partitions()
        assert len(ahead) == 3  # this month and the next two
        assert ahead[0] == f"invocations_p{now:%Y%m}"

        past = rec(started_at=datetime(2023, 2, 27, 23, 59, 59, tzinfo=UTC))
        future = rec(started_at=datetime(2031, 7, 1, 0, 0, tzinfo=UTC))
        for r in (past, future):
            await ledger.write(r)
        await ledger.flush()
        names = await ledger.partitions()
        assert "invocations_p202302" in names and "invocations_p203107" in names
        assert await ledger.get(past.id) == past
        assert await ledger.get(future.id) == future

        # A partition dropped behind the ledger's back is recreated, the insert still lands.
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP TABLE "{schema}".invocations_p202302')
        again = rec(started_at=datetime(2023, 2, 1, tzinfo=UTC))
        await ledger.write(again)
        await ledger.flush()
        assert await ledger.get(again.id) == again
        with psycopg.connect(PG_URL) as conn:
            (where,) = conn.execute(
                f'SELECT tableoid::regclass::text FROM "{schema}".invocations WHERE id = %s',
                [again.id],
            ).fetchone()
        assert where.endswith("invocations_p202302")
    finally:
        await ledger.aclose()
        drop_schema(schema)


async def test_concurrent_migrations_from_four_processes() -> None:
    schema = unique("migr")
    start_at = time.time() + 3.0
    try:
        with ProcessPoolExecutor(max_workers=4, mp_context=get_context("spawn")) as pool:
            futures = [
                pool.submit(_workers.migrate_and_write, PG_URL, schema, start_at)
                for _ in range(4)
            ]
            ids = await asyncio.to_thread(lambda: [f.result(timeout=90) for f in futures])
        assert len(set(ids)) == 4
        with psycopg.connect(PG_URL) as conn:
            versions = conn.execute(
                f'SELECT version_num FROM "{schema}".alembic_version_accounting'
            ).fetchall()
            (count,) = conn.execute(f'SELECT count(*) FROM "{schema}".invocations').fetchone()
        assert versions == [("0001",)]
        assert count == 4
    finally:
        drop_schema(schema)


# --- SIGTERM ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_sigterm_flushes_pending_records(kind: str, tmp_path: Path) -> None:
    schema = unique("sigterm")
    target = str(tmp_path / "ledger.db") if kind == "sqlite" else f"{PG_URL}#{schema}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.accounting._workers", "sigterm", kind, target, "500",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
        assert line.decode().strip() == "ready 500", await proc.stderr.read()  # type: ignore[union-attr]
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        assert code == -signal.SIGTERM
        if kind == "sqlite":
            with sqlite3.connect(target) as conn:
                (count,) = conn.execute("SELECT count(*) FROM invocations").fetchone()
        else:
            with psycopg.connect(PG_URL) as conn:
                (count,) = conn.execute(f'SELECT count(*) FROM "{schema}".invocations').fetchone()
        assert count == 500
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if kind == "postgres":
            drop_schema(schema)


async def test_sqlite_file_is_wal(tmp_path: Path) -> None:
    ledger = await SqliteLedger.open(tmp_path / "x.db")
    await ledger.aclose()
    with sqlite3.connect(tmp_path / "x.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
