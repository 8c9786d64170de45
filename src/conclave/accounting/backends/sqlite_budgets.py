"""The embedded budget store: SQLite, every operation one ``BEGIN IMMEDIATE`` transaction.

``BEGIN IMMEDIATE`` takes the database's write lock before the first read, so
"check every budget, then record the reservation" cannot interleave with
another reserve - not from another coroutine (all calls go through one
connection thread) and not from another process sharing the file (it waits on
``busy_timeout``).  Expired reservations are deleted at the start of each
reserve and usage read, inside the same transaction, so they stop counting the
moment their TTL passes.  The alert marks table has the (budget, period,
threshold) primary key that makes an alert fire exactly once.

Reserve and settle run on every model call, so they are kept lean: the store
runs them inline on the event loop (see :mod:`._sqlite`; another process
holding the lock sends them to the connection thread instead), a reserve reads
every applicable budget with its spend and reservations in one query, and no
``Budget`` model is built unless a refusal or an alert needs one.  Settled
request ids older than their retention are pruned at most once a minute, not
on every settle.
"""

from __future__ import annotations

import functools
import sqlite3
import uuid
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from conclave.accounting._common import Clock, as_utc, utc_now
from conclave.accounting.backends._sqlite import SqliteRunner, immediate
from conclave.accounting.backends.sqlite import parse_ts, ts
from conclave.accounting.budgets import (
    GLOBAL,
    AlertDispatcher,
    Budget,
    BudgetAlert,
    BudgetSpec,
    BudgetUpdate,
    BudgetUsage,
    Period,
    Reservation,
    ReservedBudget,
    ScopeRef,
    Settlement,
    check_amount,
    exceeded,
    period_key,
    usage_of,
)
from conclave.errors import BudgetAlreadyExists, BudgetNotFound, InvalidRequest

SCHEMA_VERSION = 1
#: how long a settled request id is remembered, so a late duplicate settle is still a no-op
SETTLED_RETENTION_MS = 7 * 24 * 3600 * 1000

_DDL = """
CREATE TABLE IF NOT EXISTS budgets (
    id TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    period TEXT NOT NULL,
    limit_micros INTEGER NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    webhook_url TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (scope, scope_id, period)
);
CREATE TABLE IF NOT EXISTS budget_spend (
    budget_id TEXT NOT NULL,
    period_key TEXT NOT NULL,
    spent_micros INTEGER NOT NULL,
    PRIMARY KEY (budget_id, period_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budget_reservations (
    request_id TEXT NOT NULL,
    budget_id TEXT NOT NULL,
    period_key TEXT NOT NULL,
    amount_micros INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (request_id, budget_id)
);
CREATE INDEX IF NOT EXISTS budget_reservations_budget
    ON budget_reservations (budget_id, period_key);
CREATE INDEX IF NOT EXISTS budget_reservations_expiry ON budget_reservations (expires_at_ms);
CREATE TABLE IF NOT EXISTS budget_settled (
    request_id TEXT PRIMARY KEY,
    settled_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS budget_settled_at ON budget_settled (settled_at_ms);
CREATE TABLE IF NOT EXISTS budget_alert_marks (
    budget_id TEXT NOT NULL,
    period_key TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    PRIMARY KEY (budget_id, period_key, threshold)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budget_alerts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    budget_id TEXT NOT NULL,
    budget_name TEXT NOT NULL,
    scope TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    period TEXT NOT NULL,
    period_key TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    spent_micros INTEGER NOT NULL,
    limit_micros INTEGER NOT NULL,
    fired_at TEXT NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS budget_alerts_budget ON budget_alerts (budget_id, seq)
"""


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _budget(row: sqlite3.Row) -> Budget:
    return Budget(
        id=row["id"], scope=row["scope"], scope_id=row["scope_id"], period=row["period"],
        limit_micros=row["limit_micros"], name=row["name"], webhook_url=row["webhook_url"],
        created_at=parse_ts(row["created_at"]), updated_at=parse_ts(row["updated_at"]),
    )


def _get(conn: sqlite3.Connection, budget_id: str) -> Budget:
    row = conn.execute("SELECT * FROM budgets WHERE id = ?", (budget_id,)).fetchone()
    if row is None:
        raise BudgetNotFound(
            f"no budget with id {budget_id!r}", hint="list budgets with `conclave budget list`"
        )
    return _budget(row)


def _spent(conn: sqlite3.Connection, budget_id: str, pk: str) -> int:
    row = conn.execute(
        "SELECT spent_micros FROM budget_spend WHERE budget_id = ? AND period_key = ?",
        (budget_id, pk),
    ).fetchone()
    return int(row[0]) if row else 0


@functools.lru_cache(maxsize=16)
def _check_sql(n_scopes: int) -> str:
    """One read for every applicable budget, its spend and its live reservations in the
    current period (the expired ones are deleted just before, in the same transaction)."""
    values = ", ".join("(?, ?)" for _ in range(n_scopes))
    return (
        "WITH b AS (SELECT id, limit_micros, CASE period WHEN 'daily' THEN ? "
        "WHEN 'monthly' THEN ? ELSE ? END AS pk FROM budgets "
        f"WHERE (scope, scope_id) IN (VALUES {values})) "
        "SELECT b.id, b.pk, b.limit_micros, "
        "COALESCE((SELECT s.spent_micros FROM budget_spend s "
        "WHERE s.budget_id = b.id AND s.period_key = b.pk), 0), "
        "(SELECT COALESCE(SUM(r.amount_micros), 0) FROM budget_reservations r "
        "WHERE r.budget_id = b.id AND r.period_key = b.pk AND r.request_id != ?) "
        "FROM b ORDER BY b.id"
    )


def _reserved(
    conn: sqlite3.Connection, budget_id: str, pk: str, exclude: str = ""
) -> tuple[int, int]:
    row = conn.execute(
        "SELECT COALESCE(SUM(amount_micros), 0), COUNT(*) FROM budget_reservations "
        "WHERE budget_id = ? AND period_key = ? AND request_id != ?",
        (budget_id, pk, exclude),
    ).fetchone()
    return int(row[0]), int(row[1])


class SqliteBudgetStore:
    backend_name = "SQLite"

    def __init__(
        self,
        path: Path,
        *,
        reservation_ttl_s: float = 600.0,
        alert_thresholds: Sequence[int] = (80, 100),
        dispatcher: AlertDispatcher | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.path = path
        self._ttl = reservation_ttl_s
        self._thresholds = sorted(set(alert_thresholds))
        self.dispatcher = dispatcher or AlertDispatcher()
        self._clock = clock
        self._db = SqliteRunner(path, what="budgets", inline=True)
        self._pruned_at_ms = 0
        self._pks: tuple[date, dict[Period, str]] | None = None

    def _period_keys(self, now: datetime) -> dict[Period, str]:
        """The period keys of ``now``, computed once per UTC day."""
        day = as_utc(now).date()
        cached = self._pks
        if cached is None or cached[0] != day:
            cached = self._pks = (day, {p: period_key(p, now) for p in Period})
        return cached[1]

    @classmethod
    async def open(cls, path: Path, **kwargs: Any) -> SqliteBudgetStore:
        self = cls(path, **kwargs)
        await self._db.open(_setup)
        return self

    async def aclose(self) -> None:
        await self.dispatcher.aclose()
        await self._db.close()

    async def ping(self) -> None:
        await self._db.run(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- CRUD --------------------------------------------------------------------------

    async def create(self, spec: BudgetSpec) -> Budget:
        now = ts(self._clock())
        budget_id = f"bud_{uuid.uuid4().hex[:12]}"

        def fn(conn: sqlite3.Connection) -> Budget:
            with immediate(conn):
                row = conn.execute(
                    "SELECT id FROM budgets WHERE scope = ? AND scope_id = ? AND period = ?",
                    (spec.scope.value, spec.scope_id, spec.period.value),
                ).fetchone()
                if row is not None:
                    raise BudgetAlreadyExists(
                        f"a {spec.period.value} budget for {spec.scope.value}:{spec.scope_id} "
                        f"already exists (id {row[0]})",
                        hint=f"update it instead (PATCH /v1/budgets/{row[0]})",
                    )
                conn.execute(
                    "INSERT INTO budgets (id, scope, scope_id, period, limit_micros, name, "
                    "webhook_url, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (budget_id, spec.scope.value, spec.scope_id, spec.period.value,
                     spec.limit_micros, spec.name, spec.webhook_url, now, now),
                )
                return _get(conn, budget_id)

        return await self._db.run(fn)

    async def get(self, budget_id: str) -> Budget:
        return await self._db.run(_get, budget_id)

    async def list_budgets(self, scope: ScopeRef | None = None) -> list[Budget]:
        def fn(conn: sqlite3.Connection) -> list[Budget]:
            if scope is None:
                rows = conn.execute("SELECT * FROM budgets ORDER BY created_at, id")
            else:
                rows = conn.execute(
                    "SELECT * FROM budgets WHERE scope = ? AND scope_id = ? "
                    "ORDER BY created_at, id",
                    (scope.scope.value, scope.id),
                )
            return [_budget(r) for r in rows]

        return await self._db.run(fn)

    async def update(self, budget_id: str, patch: BudgetUpdate) -> Budget:
        now = ts(self._clock())

        def fn(conn: sqlite3.Connection) -> Budget:
            with immediate(conn):
                b = _get(conn, budget_id)
                limit = b.limit_micros if patch.limit_micros is None else patch.limit_micros
                name = b.name if patch.name is None else patch.name
                hook = b.webhook_url if patch.webhook_url is None else (patch.webhook_url or None)
                conn.execute(
                    "UPDATE budgets SET limit_micros = ?, name = ?, webhook_url = ?, "
                    "updated_at = ? WHERE id = ?",
                    (limit, name, hook, now, budget_id),
                )
                return _get(conn, budget_id)

        return await self._db.run(fn)

    async def delete(self, budget_id: str) -> None:
        def fn(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                _get(conn, budget_id)
                for table in ("budgets", "budget_spend", "budget_reservations",
                              "budget_alert_marks"):
                    col = "id" if table == "budgets" else "budget_id"
                    conn.execute(f"DELETE FROM {table} WHERE {col} = ?", (budget_id,))

        await self._db.run(fn)

    async def usage(self, budget_id: str, at: datetime | None = None) -> BudgetUsage:
        at = at or self._clock()
        now_ms = _ms(self._clock())

        def fn(conn: sqlite3.Connection) -> BudgetUsage:
            with immediate(conn):
                conn.execute("DELETE FROM budget_reservations WHERE expires_at_ms <= ?", (now_ms,))
                b = _get(conn, budget_id)
                pk = period_key(b.period, at)
                spent = _spent(conn, budget_id, pk)
                reserved, active = _reserved(conn, budget_id, pk)
            return usage_of(b, pk, at, spent, reserved, active)

        return await self._db.run(fn)

    async def reset(self, budget_id: str) -> BudgetUsage:
        at = self._clock()

        def fn(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                b = _get(conn, budget_id)
                pk = period_key(b.period, at)
                conn.execute(
                    "DELETE FROM budget_spend WHERE budget_id = ? AND period_key = ?",
                    (budget_id, pk),
                )
                conn.execute(
                    "DELETE FROM budget_alert_marks WHERE budget_id = ? AND period_key = ?",
                    (budget_id, pk),
                )

        await self._db.run(fn)
        return await self.usage(budget_id, at)

    # -- reserve / settle / release ------------------------------------------------------

    async def reserve(
        self,
        scopes: Sequence[ScopeRef],
        amount_micros: int,
        *,
        request_id: str,
        ttl_s: float | None = None,
    ) -> Reservation:
        check_amount(amount_micros)
        if not request_id:
            raise InvalidRequest("reserve needs a request_id", hint="pass the call's request id")
        now = self._clock()
        expires = now + timedelta(seconds=self._ttl if ttl_s is None else ttl_s)
        refs = list(dict.fromkeys([GLOBAL, *scopes]))
        pairs = [(r.scope.value, r.id) for r in refs]
        pks = self._period_keys(now)
        now_ms, exp_ms = _ms(now), _ms(expires)
        check_sql = _check_sql(len(pairs))
        check_args = [pks[Period.DAILY], pks[Period.MONTHLY], pks[Period.LIFETIME],
                      *[x for pair in pairs for x in pair], request_id]

        def fn(conn: sqlite3.Connection) -> tuple[Any, ...]:
            with immediate(conn):
                if conn.execute(
                    "SELECT 1 FROM budget_settled WHERE request_id = ?", (request_id,)
                ).fetchone():
                    return ("settled",)
                conn.execute("DELETE FROM budget_reservations WHERE expires_at_ms <= ?", (now_ms,))
                targets: list[tuple[str, str]] = []
                for bid, pk, limit, spent, reserved in conn.execute(check_sql, check_args
                                                                    ).fetchall():
                    if spent + reserved + amount_micros > limit:
                        return ("exceeded", _get(conn, bid), spent, reserved)
                    targets.append((bid, pk))
                conn.executemany(
                    "INSERT OR REPLACE INTO budget_reservations (request_id, budget_id, "
                    "period_key, amount_micros, expires_at_ms) VALUES (?, ?, ?, ?, ?)",
                    [(request_id, bid, pk, amount_micros, exp_ms) for bid, pk in targets],
                )
                return ("ok", targets)

        result = await self._db.run(fn)
        if result[0] == "settled":
            raise InvalidRequest(
                f"request {request_id!r} was already settled",
                hint="use a fresh request id for every call",
            )
        if result[0] == "exceeded":
            _, b, spent, reserved = result
            raise exceeded(b, spent=spent, reserved=reserved, amount=amount_micros, at=now)
        return Reservation(
            request_id=request_id,
            amount_micros=amount_micros,
            expires_at=expires,
            budgets=[ReservedBudget(budget_id=bid, period_key=pk) for bid, pk in result[1]],
        )

    async def settle(self, reservation: Reservation, actual_micros: int) -> Settlement:
        check_amount(actual_micros, "actual cost")
        now = self._clock()
        now_ms = _ms(now)
        rid = reservation.request_id
        thresholds = self._thresholds

        prune = now_ms - self._pruned_at_ms >= 60_000
        if prune:
            self._pruned_at_ms = now_ms

        def fn(conn: sqlite3.Connection) -> list[BudgetAlert] | None:
            with immediate(conn):
                cur = conn.execute(
                    "INSERT OR IGNORE INTO budget_settled (request_id, settled_at_ms) "
                    "VALUES (?, ?)",
                    (rid, now_ms),
                )
                if cur.rowcount == 0:
                    return None
                if prune:  # housekeeping: ids only need keeping for SETTLED_RETENTION_MS
                    conn.execute(
                        "DELETE FROM budget_settled WHERE settled_at_ms < ?",
                        (now_ms - SETTLED_RETENTION_MS,),
                    )
                conn.execute("DELETE FROM budget_reservations WHERE request_id = ?", (rid,))
                fired: list[BudgetAlert] = []
                for rb in reservation.budgets:
                    row = conn.execute(
                        "SELECT limit_micros FROM budgets WHERE id = ?", (rb.budget_id,)
                    ).fetchone()
                    if row is None:
                        continue  # deleted while the call ran
                    limit = row[0]
                    spent = conn.execute(
                        "INSERT INTO budget_spend (budget_id, period_key, spent_micros) "
                        "VALUES (?, ?, ?) ON CONFLICT (budget_id, period_key) DO UPDATE "
                        "SET spent_micros = spent_micros + excluded.spent_micros "
                        "RETURNING spent_micros",
                        (rb.budget_id, rb.period_key, actual_micros),
                    ).fetchone()[0]
                    for thr in thresholds:
                        if spent <= 0 or spent * 100 < limit * thr:
                            continue
                        mark = conn.execute(
                            "INSERT OR IGNORE INTO budget_alert_marks (budget_id, period_key, "
                            "threshold) VALUES (?, ?, ?)",
                            (rb.budget_id, rb.period_key, thr),
                        )
                        if mark.rowcount == 0:
                            continue
                        b = _get(conn, rb.budget_id)
                        alert = BudgetAlert(
                            budget_id=b.id, budget_name=b.name, scope=b.scope,
                            scope_id=b.scope_id, period=b.period, period_key=rb.period_key,
                            threshold=thr, spent_micros=spent, limit_micros=b.limit_micros,
                            fired_at=now, request_id=rid, webhook_url=b.webhook_url,
                        )
                        conn.execute(
                            "INSERT INTO budget_alerts (budget_id, budget_name, scope, scope_id, "
                            "period, period_key, threshold, spent_micros, limit_micros, "
                            "fired_at, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (b.id, b.name, b.scope.value, b.scope_id, b.period.value,
                             rb.period_key, thr, spent, b.limit_micros, ts(now), rid),
                        )
                        fired.append(alert)
                return fired

        fired = await self._db.run(fn)
        if fired is None:
            return Settlement(request_id=rid, actual_micros=actual_micros, already_settled=True)
        if fired:
            self.dispatcher.dispatch(fired)
        return Settlement(request_id=rid, actual_micros=actual_micros, alerts=fired)

    async def release(self, reservation: Reservation) -> None:
        def fn(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                conn.execute(
                    "DELETE FROM budget_reservations WHERE request_id = ?",
                    (reservation.request_id,),
                )

        await self._db.run(fn)

    async def alerts(self, budget_id: str | None = None, limit: int = 100) -> list[BudgetAlert]:
        def fn(conn: sqlite3.Connection) -> list[BudgetAlert]:
            if budget_id is None:
                rows = conn.execute(
                    "SELECT * FROM budget_alerts ORDER BY seq DESC LIMIT ?", (limit,)
                )
            else:
                rows = conn.execute(
                    "SELECT * FROM budget_alerts WHERE budget_id = ? ORDER BY seq DESC LIMIT ?",
                    (budget_id, limit),
                )
            return [
                BudgetAlert(
                    budget_id=r["budget_id"], budget_name=r["budget_name"], scope=r["scope"],
                    scope_id=r["scope_id"], period=r["period"], period_key=r["period_key"],
                    threshold=r["threshold"], spent_micros=r["spent_micros"],
                    limit_micros=r["limit_micros"], fired_at=parse_ts(r["fired_at"]),
                    request_id=r["request_id"],
                )
                for r in rows
            ]

        return await self._db.run(fn)




def _setup(conn: sqlite3.Connection) -> None:
    conn.row_factory = sqlite3.Row
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.OperationalError(
            f"budget schema version {version} is newer than this Conclave ({SCHEMA_VERSION})"
        )
    with immediate(conn):
        for statement in _DDL.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
