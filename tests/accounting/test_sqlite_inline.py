"""The SQLite budget store's inline mode: transactions on the event loop, the connection
thread when another connection holds the lock, bounded WAL, and still atomic across
processes sharing the file."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

from conclave.accounting.backends.sqlite_budgets import SqliteBudgetStore
from conclave.accounting.budgets import BudgetSpec, Period, Scope, ScopeRef
from conclave.errors import BudgetExceeded

TEAM = [ScopeRef(scope=Scope.TEAM, id="research")]


async def _store_with_budget(path: Path, limit: int) -> SqliteBudgetStore:
    store = await SqliteBudgetStore.open(path)
    await store.create(BudgetSpec(scope=Scope.TEAM, scope_id="research",
                                  period=Period.LIFETIME, limit_micros=limit))
    return store


async def test_reserve_and_settle_run_inline(tmp_path: Path) -> None:
    store = await _store_with_budget(tmp_path / "b.db", 1_000_000)
    try:
        before = store._db.inline_calls
        r = await store.reserve(TEAM, 100, request_id="a")
        await store.settle(r, 40)
        assert store._db.inline_calls - before == 2
        assert store._db.fallbacks == 0
        [budget] = await store.list_budgets()
        usage = await store.usage(budget.id)
        assert (usage.spent_micros, usage.reserved_micros) == (40, 0)
    finally:
        await store.aclose()


async def test_a_lock_held_elsewhere_moves_the_call_to_the_thread(tmp_path: Path) -> None:
    """Another connection (another process, in real life) holds the write lock: the call
    must neither fail nor block the event loop; it waits on the connection thread."""
    path = tmp_path / "b.db"
    store = await _store_with_budget(path, 1_000_000)
    locked = threading.Event()

    def hold_lock() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(0.4)
        conn.execute("COMMIT")
        conn.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        await asyncio.to_thread(locked.wait, 5)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        t0 = time.monotonic()
        r = await store.reserve(TEAM, 100, request_id="b")
        waited = time.monotonic() - t0
        tick_task.cancel()
        assert store._db.fallbacks == 1
        assert waited >= 0.2, "the reserve cannot have run while the lock was held"
        assert ticks >= 10, "the event loop kept running while the call waited"
        await store.settle(r, 100)
        [budget] = await store.list_budgets()
        assert (await store.usage(budget.id)).spent_micros == 100
    finally:
        holder.join()
        await store.aclose()


async def test_wal_stays_bounded_under_steady_writes(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    store = await _store_with_budget(path, 10**12)
    try:
        async def worker(w: int) -> None:
            for i in range(150):
                r = await store.reserve(TEAM, 100, request_id=f"{w}-{i}")
                await asyncio.sleep(0)  # the model call, which lets other tasks run
                await store.settle(r, 50)

        await asyncio.gather(*(worker(w) for w in range(8)))
        await asyncio.sleep(0.2)  # the last checkpoint
        wal = path.with_name(path.name + "-wal")
        # 2,400 transactions of several pages each: without checkpoints that completed,
        # the WAL would hold about 60 MB; with them it is reused from the start.
        assert wal.stat().st_size < 16 * 1024 * 1024, wal.stat().st_size
        [budget] = await store.list_budgets()
        assert (await store.usage(budget.id)).spent_micros == 8 * 150 * 50
    finally:
        await store.aclose()


def _race_worker(path: str, n: int, amount: int, actual: int, start_at: float
                 ) -> tuple[int, int]:
    async def run() -> tuple[int, int]:
        store = await SqliteBudgetStore.open(Path(path))
        admitted = refused = 0

        async def one(i: int) -> None:
            nonlocal admitted, refused
            try:
                r = await store.reserve(TEAM, amount,
                                        request_id=f"{multiprocessing.current_process().pid}-{i}")
            except BudgetExceeded:
                refused += 1
                return
            admitted += 1
            await asyncio.sleep(0.001)
            await store.settle(r, actual)

        delay = start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await asyncio.gather(*(one(i) for i in range(n)))
        await store.aclose()
        return admitted, refused

    return asyncio.run(run())


async def test_processes_sharing_the_file_never_overrun(tmp_path: Path) -> None:
    """Inline transactions in several processes on one file stay atomic: SQLite's lock
    serialises them (and sends the loser to its connection thread)."""
    path = tmp_path / "b.db"
    limit, amount, actual, n, procs = 30_000, 1_000, 700, 60, 3
    store = await _store_with_budget(path, limit)
    await store.aclose()
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 3.0
    with ctx.Pool(procs) as pool:
        results = await asyncio.to_thread(
            pool.starmap, _race_worker,
            [(str(path), n, amount, actual, start_at)] * procs)
    admitted = sum(a for a, _ in results)
    assert admitted + sum(r for _, r in results) == n * procs
    store = await SqliteBudgetStore.open(path)
    try:
        [budget] = await store.list_budgets()
        usage = await store.usage(budget.id)
        assert usage.reserved_micros == 0 and usage.active_reservations == 0
        assert usage.spent_micros == admitted * actual
        # every admission was checked against the worst case of all calls in flight
        assert admitted * actual <= limit
        assert admitted >= limit // amount, "at least the calls that fit one by one"
    finally:
        await store.aclose()
