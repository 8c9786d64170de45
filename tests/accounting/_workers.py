"""Code the tests run in other OS processes (multiprocessing spawn, or ``python -m``).

Each worker waits until a shared start time so the processes really hit the
server at once, then reports what it saw; the test checks the totals.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path


def _wait(start_at: float) -> None:
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)


def migrate_and_write(url: str, schema: str, start_at: float) -> str:
    """Open the PostgreSQL ledger (which runs ``alembic upgrade head``) and write one record."""
    from conclave.accounting.backends.postgres import PostgresLedger
    from conclave.accounting.ledger import InvocationRecord, Outcome

    _wait(start_at)

    async def run() -> str:
        ledger = await PostgresLedger.open(url, schema=schema)
        now = datetime.now(UTC)
        record = InvocationRecord(started_at=now, ended_at=now, outcome=Outcome.SUCCESS)
        await ledger.write(record)
        await ledger.aclose()
        return str(record.id)

    return asyncio.run(run())


def budget_race(
    url: str, prefix: str, team: str, n: int, amount: int, actual: int, start_at: float
) -> tuple[int, int]:
    """n concurrent reserve+settle against the team's budget; returns (admitted, refused)."""
    from conclave.accounting.backends.redis import RedisBudgetStore
    from conclave.accounting.budgets import ScopeRef
    from conclave.errors import BudgetExceeded

    async def run() -> tuple[int, int]:
        store = await RedisBudgetStore.open(url, prefix=prefix)
        scope = [ScopeRef(scope="team", id=team)]
        admitted = refused = 0

        async def one(i: int) -> None:
            nonlocal admitted, refused
            try:
                rid = f"{prefix}-{i}-{time.time_ns()}"
                res = await store.reserve(scope, amount, request_id=rid)
            except BudgetExceeded:
                refused += 1
                return
            admitted += 1
            await asyncio.sleep(0)
            await store.settle(res, actual)

        _wait(start_at)
        await asyncio.gather(*(one(i) for i in range(n)))
        await store.aclose()
        return admitted, refused

    return asyncio.run(run())


def rate_race(url: str, prefix: str, key: str, rpm: int, n: int, start_at: float) -> int:
    """n concurrent acquires on one key; returns how many were admitted."""
    from conclave.accounting.backends.redis_ratelimit import RedisRateLimiter
    from conclave.accounting.ratelimit import RateLimitRule

    async def run() -> int:
        limiter = await RedisRateLimiter.open(url, prefix=prefix)
        rule = RateLimitRule(requests_per_minute=rpm)
        _wait(start_at)
        results = await asyncio.gather(*(limiter.acquire(key, rule) for _ in range(n)))
        await limiter.aclose()
        return sum(r.allowed for r in results)

    return asyncio.run(run())


def sigterm_child(kind: str, target: str, n: int) -> None:
    """Write n records with a flush interval far in the future, say ready, wait for SIGTERM.

    Nothing reaches the database unless the SIGTERM handler drains the ledger.
    """
    from conclave.accounting.ledger import InvocationRecord, Outcome, install_signal_flush

    async def run() -> None:
        if kind == "sqlite":
            from conclave.accounting.backends.sqlite import SqliteLedger

            ledger = await SqliteLedger.open(Path(target), flush_interval_s=3600, batch_size=10**6)
        else:
            from conclave.accounting.backends.postgres import PostgresLedger

            url, schema = target.split("#", 1)
            ledger = await PostgresLedger.open(
                url, schema=schema, flush_interval_s=3600, batch_size=10**6
            )
        install_signal_flush(ledger)
        now = datetime.now(UTC)
        for i in range(n):
            await ledger.write(InvocationRecord(
                started_at=now, ended_at=now, outcome=Outcome.SUCCESS, cost_micros=i
            ))
        print(f"ready {ledger.pending}", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(run())


if __name__ == "__main__":
    if sys.argv[1] == "sigterm":
        sigterm_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
