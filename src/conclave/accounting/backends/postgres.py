"""The scale-out ledger: PostgreSQL, natively range-partitioned by month.

Monthly partitions keep the hot month small, make retention a ``DROP TABLE``
of an old partition instead of a slow ``DELETE``, and let time-range queries
skip whole months.  Partitions are created ahead (the current month and the
next ``partitions_ahead``) when the ledger opens, and on demand for any month
a batch touches that is not known yet, so an insert never fails for a missing
partition - not for a record dated in the past, nor across a month boundary on
a server that has been up for weeks.  Creation runs under an advisory lock, so
replicas racing to create the same month do not collide.

The schema is managed with Alembic (``conclave/accounting/migrations``) and
upgraded to head on open; see ``migrations/env.py`` for why four processes
opening at once is safe.  psycopg 3 with an async connection pool; every
connection error becomes :class:`BackendUnavailable` (HTTP 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from conclave.accounting._common import redact_url, short_error, utc_now
from conclave.accounting.backends._spend import spend_row, spend_sql
from conclave.accounting.ledger import (
    COLUMNS,
    GROUP_COLUMNS,
    BatchingLedger,
    InvocationRecord,
    LedgerQuery,
    SpendGroup,
    SpendRow,
    sort_spend,
)
from conclave.errors import BackendUnavailable, ConfigError, InvalidRequest

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
#: errors that mean "the database is not reachable", as opposed to a bug in a statement
_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, OSError)


def psycopg_url(url: str) -> str:
    """Accept ``postgresql://``, ``postgres://`` and SQLAlchemy's ``postgresql+psycopg://``."""
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix):]
    if not url.startswith("postgresql://"):
        raise ConfigError(
            f"not a PostgreSQL URL: {redact_url(url)}",
            hint="use postgresql://user@host:5432/dbname",
        )
    return url


def check_schema(name: str) -> str:
    if not _SCHEMA_RE.match(name):
        raise ConfigError(
            f"invalid PostgreSQL schema name {name!r}",
            hint="use lower-case letters, digits and underscores, starting with a letter",
        )
    return name


def _months_after(year: int, month: int, n: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + n
    return index // 12, index % 12 + 1


def partition_name(year: int, month: int) -> str:
    return f"invocations_p{year:04d}{month:02d}"


def unavailable(url: str, exc: BaseException) -> BackendUnavailable:
    safe = redact_url(url)
    return BackendUnavailable(
        f"PostgreSQL is unavailable at {safe}: {short_error(exc)}",
        backend="PostgreSQL",
        url=safe,
        hint="start PostgreSQL or fix accounting.ledger_url; calls are refused until it is back",
    )


def run_migrations(url: str, schema: str, connect_timeout_s: float = 10.0) -> None:
    """``alembic upgrade head`` on the ledger schema (synchronous; call it in a thread)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.pool import NullPool

    conninfo = psycopg_url(url)
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(conninfo, connect_timeout=max(2, int(connect_timeout_s))),
        poolclass=NullPool,
    )
    cfg = Config()
    cfg.set_main_option("script_location", "conclave.accounting:migrations")
    try:
        with engine.connect() as connection:
            cfg.attributes["connection"] = connection
            cfg.attributes["schema"] = schema
            command.upgrade(cfg, "head")
    except DBAPIError as exc:
        # SQLAlchemy wraps the driver's error; a connection failure is an outage, not a bug
        if isinstance(exc.orig, _CONNECTION_ERRORS) or exc.connection_invalidated:
            raise unavailable(url, exc.orig or exc) from exc
        raise
    finally:
        engine.dispose()


def _to_row(r: InvocationRecord) -> tuple[Any, ...]:
    out: list[Any] = []
    for field in COLUMNS:
        value = getattr(r, field)
        if field == "attributes":
            value = Jsonb(value)
        elif field == "outcome":
            value = value.value
        out.append(value)
    return tuple(out)


def _from_row(row: dict[str, Any]) -> InvocationRecord:
    data = {field: row[col] for field, col in COLUMNS.items()}
    if isinstance(data["attributes"], str):
        data["attributes"] = json.loads(data["attributes"])
    data["started_at"] = data["started_at"].astimezone(UTC)
    data["ended_at"] = data["ended_at"].astimezone(UTC)
    return InvocationRecord.model_validate(data)


def _where(q: LedgerQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if q.since is not None:
        clauses.append("started_at >= %s")
        params.append(q.since)
    if q.until is not None:
        clauses.append("started_at < %s")
        params.append(q.until)
    for col, value in q.equality_filters():
        clauses.append(f"{col} = %s")
        params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


_INSERT = (
    f"INSERT INTO invocations ({', '.join(COLUMNS.values())}) "
    f"VALUES ({', '.join('%s' for _ in COLUMNS)}) ON CONFLICT (id, started_at) DO NOTHING"
)


class PostgresLedger(BatchingLedger):
    backend_name = "PostgreSQL"

    def __init__(
        self,
        url: str,
        *,
        schema: str = "conclave",
        partitions_ahead: int = 3,
        pool_min: int = 1,
        pool_max: int = 10,
        timeout_s: float = 2.0,
        **writer: Any,
    ) -> None:
        super().__init__(**writer)
        self.url = psycopg_url(url)
        self.schema = check_schema(schema)
        self._ahead = partitions_ahead
        self._timeout = timeout_s
        self._partitions: set[tuple[int, int]] = set()
        self._ahead_checked: tuple[int, int] | None = None
        self._partition_lock = asyncio.Lock()
        self._pool = AsyncConnectionPool(
            self.url,
            min_size=pool_min,
            max_size=pool_max,
            open=False,
            timeout=timeout_s,
            check=AsyncConnectionPool.check_connection,
            configure=self._configure,
            kwargs={"autocommit": True, "connect_timeout": max(2, int(timeout_s))},
            name=f"conclave-ledger-{self.schema}",
        )

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        schema: str = "conclave",
        migrate: bool = True,
        spill_dir: Path | None = None,
        **kwargs: Any,
    ) -> PostgresLedger:
        """Migrate to head, open the pool, create partitions ahead, replay any spill."""
        self = cls(url, schema=schema, spill_dir=spill_dir, **kwargs)
        try:
            if migrate:
                await asyncio.to_thread(run_migrations, self.url, self.schema, self._timeout)
            await self._pool.open(wait=True, timeout=self._timeout)
            await self._load_partitions()
            await self._ensure_ahead()
        except _CONNECTION_ERRORS as exc:
            await self._pool.close()
            raise unavailable(self.url, exc) from exc
        except Exception:
            await self._pool.close()
            raise
        await self._start()
        return self

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            async with self._pool.connection() as conn:
                yield conn
        except _CONNECTION_ERRORS as exc:
            raise unavailable(self.url, exc) from exc

    # -- partitions --------------------------------------------------------------------

    async def _load_partitions(self) -> None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT c.relname FROM pg_inherits i
                JOIN pg_class c ON c.oid = i.inhrelid
                JOIN pg_class p ON p.oid = i.inhparent
                JOIN pg_namespace n ON n.oid = p.relnamespace
                WHERE p.relname = 'invocations' AND n.nspname = %s
                """,
                [self.schema],
            )
            for (name,) in await cur.fetchall():
                m = re.fullmatch(r"invocations_p(\d{4})(\d{2})", name)
                if m:
                    self._partitions.add((int(m.group(1)), int(m.group(2))))

    async def _ensure_ahead(self) -> None:
        now = utc_now()
        current = (now.year, now.month)
        if self._ahead_checked == current:
            return
        months = {_months_after(now.year, now.month, k) for k in range(self._ahead + 1)}
        await self.ensure_partitions(months)
        self._ahead_checked = current

    async def ensure_partitions(self, months: set[tuple[int, int]]) -> None:
        """Create the monthly partitions that do not exist yet (idempotent, race-safe)."""
        if months <= self._partitions:
            return
        async with self._partition_lock:
            missing = sorted(months - self._partitions)
            if not missing:
                return
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))",
                    [f"conclave.accounting.partition:{self.schema}"],
                )
                for year, month in missing:
                    start = datetime(year, month, 1, tzinfo=UTC)
                    ny, nm = _months_after(year, month, 1)
                    end = datetime(ny, nm, 1, tzinfo=UTC)
                    await conn.execute(
                        sql.SQL(
                            "CREATE TABLE IF NOT EXISTS {} PARTITION OF invocations "
                            "FOR VALUES FROM ({}) TO ({})"
                        ).format(
                            sql.Identifier(partition_name(year, month)),
                            sql.Literal(start),
                            sql.Literal(end),
                        )
                    )
            self._partitions.update(missing)

    async def partitions(self) -> list[str]:
        """Names of the existing monthly partitions, oldest first."""
        self._partitions.clear()
        async with self._conn():
            await self._load_partitions()
        return [partition_name(y, m) for y, m in sorted(self._partitions)]

    # -- writer hooks ------------------------------------------------------------------

    async def _write_batch(self, records: Sequence[InvocationRecord]) -> None:
        months = {(r.started_at.year, r.started_at.month) for r in records}
        rows = [_to_row(r) for r in records]
        try:
            await self._ensure_ahead()
            await self.ensure_partitions(months)
            try:
                await self._insert(rows)
            except psycopg.errors.CheckViolation:
                # "no partition of relation found for row": a partition was dropped behind
                # our back; forget what we knew, recreate, and try once more.
                self._partitions.clear()
                await self._load_partitions()
                await self.ensure_partitions(months)
                await self._insert(rows)
        except _CONNECTION_ERRORS as exc:
            raise unavailable(self.url, exc) from exc

    async def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.executemany(_INSERT, rows)

    async def _close_backend(self) -> None:
        await self._pool.close()

    # -- reads -------------------------------------------------------------------------

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.execute("SELECT 1")

    async def get(self, record_id: UUID) -> InvocationRecord | None:
        async with self._conn() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT * FROM invocations WHERE id = %s", [record_id])
            row = await cur.fetchone()
        return None if row is None else _from_row(row)

    async def count(self, query: LedgerQuery | None = None) -> int:
        where, params = _where(query or LedgerQuery())
        async with self._conn() as conn:
            cur = await conn.execute(f"SELECT COUNT(*) FROM invocations{where}", params)
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def list_records(self, query: LedgerQuery | None = None) -> list[InvocationRecord]:
        q = query or LedgerQuery()
        where, params = _where(q)
        async with self._conn() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT * FROM invocations{where} ORDER BY started_at DESC, id DESC "
                "LIMIT %s OFFSET %s",
                [*params, q.limit, q.offset],
            )
            rows = await cur.fetchall()
        return [_from_row(r) for r in rows]

    async def spend(self, by: SpendGroup, query: LedgerQuery | None = None) -> list[SpendRow]:
        if by == "day":
            key = "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
        elif by in GROUP_COLUMNS:
            key = GROUP_COLUMNS[by]
        else:
            raise InvalidRequest(
                f"cannot break spend down by {by!r}",
                hint=f"use one of: day, {', '.join(GROUP_COLUMNS)}",
            )
        where, params = _where(query or LedgerQuery())
        async with self._conn() as conn:
            cur = await conn.execute(spend_sql(key, where, "IS NOT DISTINCT FROM"), params)
            rows = await cur.fetchall()
        return sort_spend(by, [spend_row(r) for r in rows])
