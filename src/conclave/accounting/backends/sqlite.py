"""The embedded ledger: one SQLite file in WAL mode under the data directory.

Timestamps are stored as fixed-width ISO-8601 UTC text
(``2025-01-31T23:59:59.123456Z``): it sorts and range-filters correctly as
text, the day is its first ten characters, and the file stays readable with
the ``sqlite3`` shell.  The schema is created on open and versioned with
``PRAGMA user_version``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from conclave.accounting.backends._spend import spend_row, spend_sql
from conclave.accounting.backends._sqlite import SqliteRunner, immediate
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
from conclave.errors import InvalidRequest

SCHEMA_VERSION = 1
_TS = "%Y-%m-%dT%H:%M:%S.%fZ"

_DDL = """
CREATE TABLE IF NOT EXISTS invocations (
    id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    ended_at TEXT NOT NULL,
    gen_ai_operation_name TEXT NOT NULL,
    gen_ai_provider_name TEXT,
    gen_ai_request_model TEXT,
    gen_ai_response_model TEXT,
    gen_ai_response_id TEXT,
    gen_ai_request_max_tokens INTEGER,
    gen_ai_response_finish_reasons TEXT NOT NULL DEFAULT '[]',
    tier INTEGER,
    privacy INTEGER NOT NULL,
    gen_ai_usage_input_tokens INTEGER NOT NULL,
    gen_ai_usage_output_tokens INTEGER NOT NULL,
    gen_ai_usage_cache_read_input_tokens INTEGER NOT NULL,
    gen_ai_usage_cache_creation_input_tokens INTEGER NOT NULL,
    tokens_estimated INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    latency_ms INTEGER,
    ttft_ms INTEGER,
    outcome TEXT NOT NULL,
    error_type TEXT,
    api_key_id TEXT,
    user_id TEXT,
    team TEXT,
    run_id TEXT,
    workflow_id TEXT,
    experiment TEXT,
    variant TEXT,
    http_route TEXT,
    attributes TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS invocations_started_at ON invocations (started_at);
CREATE INDEX IF NOT EXISTS invocations_api_key ON invocations (api_key_id, started_at);
CREATE INDEX IF NOT EXISTS invocations_run ON invocations (run_id);
"""


def ts(value: datetime) -> str:
    return value.astimezone(UTC).strftime(_TS)


def parse_ts(value: str) -> datetime:
    return datetime.strptime(value, _TS).replace(tzinfo=UTC)


def _to_row(r: InvocationRecord) -> tuple[Any, ...]:
    out: list[Any] = []
    for field in COLUMNS:
        value = getattr(r, field)
        if field == "id":
            value = str(value)
        elif field in ("started_at", "ended_at"):
            value = ts(value)
        elif field in ("finish_reasons", "attributes"):
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = int(value)
        elif field == "outcome":
            value = value.value
        out.append(value)
    return tuple(out)


def _from_row(row: sqlite3.Row) -> InvocationRecord:
    data: dict[str, Any] = {}
    for field, col in COLUMNS.items():
        value = row[col]
        if field == "id":
            value = UUID(value)
        elif field in ("started_at", "ended_at"):
            value = parse_ts(value)
        elif field in ("finish_reasons", "attributes"):
            value = json.loads(value)
        elif field in ("privacy", "tokens_estimated"):
            value = bool(value)
        data[field] = value
    return InvocationRecord.model_validate(data)


def _where(q: LedgerQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if q.since is not None:
        clauses.append("started_at >= ?")
        params.append(ts(q.since))
    if q.until is not None:
        clauses.append("started_at < ?")
        params.append(ts(q.until))
    for col, value in q.equality_filters():
        clauses.append(f"{col} = ?")
        params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _group_expr(by: str) -> str:
    if by == "day":
        return "substr(started_at, 1, 10)"
    try:
        return GROUP_COLUMNS[by]
    except KeyError:
        raise InvalidRequest(
            f"cannot break spend down by {by!r}",
            hint=f"use one of: day, {', '.join(GROUP_COLUMNS)}",
        ) from None


class SqliteLedger(BatchingLedger):
    backend_name = "SQLite"

    def __init__(self, path: Path, **writer: Any) -> None:
        super().__init__(**writer)
        self.path = path
        self._db = SqliteRunner(path, what="ledger")

    @classmethod
    async def open(cls, path: Path, **writer: Any) -> SqliteLedger:
        """Create the file and schema if needed, replay any spill, start the writer."""
        self = cls(path, **writer)
        await self._db.open(_setup)
        await self._start()
        return self

    # -- writer hooks ------------------------------------------------------------------

    async def _write_batch(self, records: Sequence[InvocationRecord]) -> None:
        rows = [_to_row(r) for r in records]
        await self._db.run(_insert, rows)

    async def _close_backend(self) -> None:
        await self._db.close()

    # -- reads -------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._db.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def get(self, record_id: UUID) -> InvocationRecord | None:
        def fn(conn: sqlite3.Connection) -> InvocationRecord | None:
            cur = conn.execute("SELECT * FROM invocations WHERE id = ?", (str(record_id),))
            row = cur.fetchone()
            return None if row is None else _from_row(row)

        return await self._db.run(fn)

    async def count(self, query: LedgerQuery | None = None) -> int:
        where, params = _where(query or LedgerQuery())

        def fn(conn: sqlite3.Connection) -> int:
            cur = conn.execute(f"SELECT COUNT(*) FROM invocations{where}", params)
            return int(cur.fetchone()[0])

        return await self._db.run(fn)

    async def list_records(self, query: LedgerQuery | None = None) -> list[InvocationRecord]:
        q = query or LedgerQuery()
        where, params = _where(q)
        sql = (
            f"SELECT * FROM invocations{where} ORDER BY started_at DESC, id DESC LIMIT ? OFFSET ?"
        )

        def fn(conn: sqlite3.Connection) -> list[InvocationRecord]:
            return [_from_row(r) for r in conn.execute(sql, [*params, q.limit, q.offset])]

        return await self._db.run(fn)

    async def spend(self, by: SpendGroup, query: LedgerQuery | None = None) -> list[SpendRow]:
        key = _group_expr(by)
        where, params = _where(query or LedgerQuery())
        sql = spend_sql(key, where, "IS")

        def fn(conn: sqlite3.Connection) -> list[SpendRow]:
            return [spend_row(tuple(r)) for r in conn.execute(sql, params)]

        return sort_spend(by, await self._db.run(fn))


def _setup(conn: sqlite3.Connection) -> None:
    conn.row_factory = sqlite3.Row
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.OperationalError(
            f"ledger schema version {version} is newer than this Conclave ({SCHEMA_VERSION})"
        )
    with immediate(conn):
        for statement in _DDL.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


_INSERT = (
    f"INSERT OR IGNORE INTO invocations ({', '.join(COLUMNS.values())}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)})"
)


def _insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    with immediate(conn):
        conn.executemany(_INSERT, rows)
