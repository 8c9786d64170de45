"""One SQLite connection on one dedicated thread, driven from asyncio.

Why not aiosqlite: it is the same design (a thread per connection, a queue of
calls) as a dependency, and it hops threads once per statement.  Here a whole
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) is one plain function run on
the connection's thread, so a reserve with its checks and writes is one hop and
cannot interleave with another coroutine's transaction.  Several processes may
share the file: WAL mode lets readers run beside the writer, and
``busy_timeout`` makes a writer wait for another process's lock instead of
failing.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from conclave.accounting._common import short_error
from conclave.errors import BackendUnavailable

T = TypeVar("T")


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` takes the write lock up front, so a read-check-write sequence
    cannot be overtaken by another writer (a deferred transaction could fail to upgrade)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteRunner:
    """Runs functions ``fn(conn, *args)`` on the connection's own thread."""

    def __init__(self, path: Path, *, what: str, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self._what = what
        self._busy_ms = int(busy_timeout_s * 1000)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"conclave-{what}")
        self._conn: sqlite3.Connection | None = None

    async def open(self, setup: Callable[[sqlite3.Connection], None]) -> None:
        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_ms / 1000)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process crash or SIGKILL; only a power
            # loss can drop the last commits, never corrupt the file.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            setup(conn)
            self._conn = conn

        await self._call(lambda: connect())

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._conn
        if conn is None:
            raise BackendUnavailable(
                f"the {self._what} database is not open", backend="SQLite", url=str(self.path),
                hint="open it before use; it may have been closed at shutdown",
            )
        return await self._call(lambda: fn(conn, *args))

    async def _call(self, thunk: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, thunk)
        except sqlite3.OperationalError as exc:
            raise BackendUnavailable(
                f"SQLite {self._what} database {self.path} failed: {short_error(exc)}",
                backend="SQLite",
                url=str(self.path),
                hint="check the disk and file permissions; another process may hold a long lock",
            ) from exc

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)
