"""One SQLite connection on one dedicated thread, driven from asyncio; optionally a
second connection used inline on the event loop for short transactions.

Why not aiosqlite: it is the same design (a thread per connection, a queue of
calls) as a dependency, and it hops threads once per statement.  Here a whole
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) is one plain function run on
the connection's thread, so a reserve with its checks and writes is one hop and
cannot interleave with another coroutine's transaction.  Several processes may
share the file: WAL mode lets readers run beside the writer, and
``busy_timeout`` makes a writer wait for another process's lock instead of
failing.

Inline mode (``inline=True``, used by the budget store, which sits on every
model call's path twice).  A budget transaction is a few indexed statements
and one WAL append: tens of microseconds of work.  Handing it to a thread
costs more than that, and under load far more: the sqlite3 module releases
the GIL around every statement, and each time the connection thread wants it
back while the event loop is busy it waits out the interpreter's switch
interval (5 ms).  A reserve of eight statements could so wait 40 ms on a
saturated server.  In inline mode a function first runs on a second
connection, on the event loop's thread itself, with ``busy_timeout=0``: it
never waits for a lock there.  If another process (or the connection thread)
holds the write lock, SQLite answers SQLITE_BUSY before anything is written,
the transaction is rolled back, and the call is re-run on the connection
thread, which waits for the lock as before.  Callers' functions are whole
transactions, so running one again after a rollback is safe.  The inline
connection never checkpoints the WAL itself (a checkpoint syncs to disk): the
connection thread runs one every ``checkpoint_every`` inline calls, off the event
loop, in RESTART mode, and until it is done calls queue on the connection thread
behind it instead of running inline.  So the checkpoint completes even under a
steady stream of writes, however busy the machine, and the next write starts
the WAL over; a passive checkpoint racing inline writers would rarely complete
and let the WAL grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from conclave.accounting._common import short_error
from conclave.errors import BackendUnavailable

T = TypeVar("T")

log = logging.getLogger("conclave.accounting.sqlite")

#: SQLITE_BUSY and SQLITE_LOCKED: another connection holds the lock (primary codes)
_LOCK_CODES = (5, 6)


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


def _locked(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _LOCK_CODES
    return "locked" in str(exc) or "busy" in str(exc)


class SqliteRunner:
    """Runs functions ``fn(conn, *args)`` on the connection's own thread (or inline)."""

    def __init__(self, path: Path, *, what: str, busy_timeout_s: float = 10.0,
                 inline: bool = False, checkpoint_every: int = 200) -> None:
        self.path = path
        self._what = what
        self._busy_ms = int(busy_timeout_s * 1000)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"conclave-{what}")
        self._conn: sqlite3.Connection | None = None
        self._inline_mode = inline
        self._inline: sqlite3.Connection | None = None
        self._checkpoint_every = checkpoint_every
        self._since_checkpoint = 0
        self._checkpointing = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: counters for tests and diagnostics
        self.inline_calls = 0
        self.fallbacks = 0

    def _connect(self, *, busy_ms: int, same_thread: bool) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=busy_ms / 1000,
                               check_same_thread=same_thread)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash or SIGKILL; only a power
        # loss can drop the last commits, never corrupt the file.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={busy_ms}")
        return conn

    async def open(self, setup: Callable[[sqlite3.Connection], None]) -> None:
        def connect() -> None:
            conn = self._connect(busy_ms=self._busy_ms, same_thread=True)
            setup(conn)
            self._conn = conn
            if self._inline_mode:
                # Set up on this thread (setup may wait for another process's lock), then
                # handed to the event loop's thread, which alone uses it from now on.
                inline = self._connect(busy_ms=self._busy_ms, same_thread=False)
                setup(inline)
                inline.execute("PRAGMA busy_timeout=0")
                inline.execute("PRAGMA wal_autocheckpoint=0")
                self._inline = inline

        await self._call(lambda: connect())

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._conn
        if conn is None:
            raise BackendUnavailable(
                f"the {self._what} database is not open", backend="SQLite", url=str(self.path),
                hint="open it before use; it may have been closed at shutdown",
            )
        inline = self._inline
        if inline is not None and not self._checkpointing:
            # Concurrent calls from this process carry no order between them (each caller
            # awaits its own), so an inline call may run while the thread works on another:
            # the two connections lock each other out like two processes would.
            try:
                result = fn(inline, *args)
            except sqlite3.OperationalError as exc:
                self._undo(inline)
                if not _locked(exc):
                    raise self._unavailable(exc) from exc
                self.fallbacks += 1
            except BaseException:
                self._undo(inline)
                raise
            else:
                self.inline_calls += 1
                self._after_inline()
                return result
        return await self._call(lambda: fn(conn, *args))

    @staticmethod
    def _undo(conn: sqlite3.Connection) -> None:
        """Roll back what a failed function left open (``immediate`` already does)."""
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _after_inline(self) -> None:
        self._since_checkpoint += 1
        if self._since_checkpoint < self._checkpoint_every or self._checkpointing:
            return
        self._since_checkpoint = 0
        self._checkpointing = True

        def checkpoint(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()

        async def go() -> None:
            try:
                await self._call(lambda: checkpoint(self._conn))  # type: ignore[arg-type]
            except BackendUnavailable as exc:
                log.warning("WAL checkpoint of the %s database failed: %s", self._what, exc)
            finally:
                self._checkpointing = False

        task = asyncio.get_running_loop().create_task(go())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _unavailable(self, exc: sqlite3.OperationalError) -> BackendUnavailable:
        return BackendUnavailable(
            f"SQLite {self._what} database {self.path} failed: {short_error(exc)}",
            backend="SQLite",
            url=str(self.path),
            hint="check the disk and file permissions; another process may hold a long lock",
        )

    async def _call(self, thunk: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, thunk)
        except sqlite3.OperationalError as exc:
            raise self._unavailable(exc) from exc

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        conn, self._conn = self._conn, None
        inline, self._inline = self._inline, None
        loop = asyncio.get_running_loop()
        for c in (inline, conn):
            if c is not None:
                with contextlib.suppress(sqlite3.Error):
                    await loop.run_in_executor(self._executor, c.close)
        self._executor.shutdown(wait=True)
