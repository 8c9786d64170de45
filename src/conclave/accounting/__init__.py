"""Accounting: the invocation ledger, atomic budgets and global rate limits.

Three small protocols, each with an embedded default and a scale-out engine:

==============  ==========================  ==============================
protocol        embedded (one machine)      scale-out
==============  ==========================  ==============================
``Ledger``      SQLite, WAL                 PostgreSQL, monthly partitions
``BudgetStore`` SQLite transactions         Redis, Lua scripts
``RateLimiter`` in-process                  Redis, Lua scripts
==============  ==========================  ==============================

:func:`open_accounting` picks them from :class:`conclave.config.AccountingSettings`
and returns an :class:`Accounting` bundle.  The API server opens it in its
lifespan startup and calls ``await accounting.aclose()`` in its shutdown,
which drains the ledger (uvicorn turns SIGTERM into that shutdown, so no record
is lost); scripts can use :func:`install_signal_flush` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from conclave.accounting._common import Clock, micros_from_usd, redact_url, usd, utc_now
from conclave.accounting.budgets import (
    GLOBAL,
    AlertDispatcher,
    AlertHook,
    Budget,
    BudgetAlert,
    BudgetSpec,
    BudgetStore,
    BudgetUpdate,
    BudgetUsage,
    Period,
    Reservation,
    Scope,
    ScopeRef,
    Settlement,
    period_key,
)
from conclave.accounting.ledger import (
    OTEL_ATTRIBUTES,
    InvocationRecord,
    Ledger,
    LedgerQuery,
    Outcome,
    SpendGroup,
    SpendRow,
    install_signal_flush,
)
from conclave.accounting.ratelimit import (
    RateLimiter,
    RateLimitResult,
    RateLimitRule,
    rate_key,
)
from conclave.config import Settings
from conclave.errors import ConfigError

__all__ = [
    "GLOBAL",
    "OTEL_ATTRIBUTES",
    "Accounting",
    "AlertDispatcher",
    "AlertHook",
    "Budget",
    "BudgetAlert",
    "BudgetSpec",
    "BudgetStore",
    "BudgetUpdate",
    "BudgetUsage",
    "InvocationRecord",
    "Ledger",
    "LedgerQuery",
    "Outcome",
    "Period",
    "RateLimitResult",
    "RateLimitRule",
    "RateLimiter",
    "Reservation",
    "Scope",
    "ScopeRef",
    "Settlement",
    "SpendGroup",
    "SpendRow",
    "install_signal_flush",
    "micros_from_usd",
    "open_accounting",
    "period_key",
    "rate_key",
    "usd",
]


@dataclass
class Accounting:
    """The three stores the gateway and the API server use."""

    ledger: Ledger
    budgets: BudgetStore
    ratelimiter: RateLimiter
    #: which engine backs each, with URLs stripped of credentials (for /readyz and logs)
    backends: dict[str, str]

    async def readiness(self) -> dict[str, str]:
        """``{"ledger": "ok", "budgets": "<error>", ...}`` from a ping of each backend."""
        names = ("ledger", "budgets", "ratelimiter")
        results = await asyncio.gather(
            self.ledger.ping(), self.budgets.ping(), self.ratelimiter.ping(),
            return_exceptions=True,
        )
        return {
            name: "ok" if not isinstance(res, BaseException) else str(res)
            for name, res in zip(names, results, strict=True)
        }

    async def aclose(self) -> None:
        """Close everything; the ledger drains its pending records first."""
        results = await asyncio.gather(
            self.ledger.aclose(), self.budgets.aclose(), self.ratelimiter.aclose(),
            return_exceptions=True,
        )
        for res in results:
            if isinstance(res, BaseException):
                raise res


def sqlite_path(url: str, data_dir: Path) -> Path:
    """``sqlite:///ledger.db`` is relative to the data directory, ``sqlite:////abs/x.db``
    absolute (SQLAlchemy's spelling)."""
    if not url.startswith("sqlite:///"):
        raise ConfigError(
            f"not a SQLite URL: {redact_url(url)}",
            hint="use sqlite:///name.db (under the data directory) or sqlite:////absolute/path.db",
        )
    rest = url[len("sqlite:///"):]
    path = Path(rest)
    return path if path.is_absolute() else data_dir / path


async def open_accounting(
    settings: Settings,
    *,
    alert_hooks: Sequence[AlertHook] = (),
    clock: Clock = utc_now,
    rate_clock: Callable[[], float] | None = None,
) -> Accounting:
    """Open the ledger, budget store and rate limiter chosen by ``settings.accounting``.

    Raises BackendUnavailable when a configured PostgreSQL or Redis does not answer.
    """
    from conclave.llm.net import httpx_client

    acc = settings.accounting
    base = settings.data_dir / "accounting"
    writer = {
        "flush_interval_s": acc.ledger_flush_interval_ms / 1000,
        "batch_size": acc.ledger_batch_size,
        "spill_dir": acc.ledger_spill_dir or base / "ledger-spill",
    }
    dispatcher = AlertDispatcher(
        alert_hooks,
        webhook_timeout_s=acc.webhook_timeout_s,
        client_factory=lambda: httpx_client(
            privacy=settings.privacy_mode, timeout=acc.webhook_timeout_s,
            connect_timeout=acc.webhook_timeout_s,
        ),
    )
    budget_opts = {
        "reservation_ttl_s": acc.reservation_ttl_s,
        "alert_thresholds": acc.alert_thresholds,
        "dispatcher": dispatcher,
        "clock": clock,
    }
    rate_opts: dict[str, object] = {"window_s": acc.ratelimit_window_s}
    if rate_clock is not None:
        rate_opts["clock"] = rate_clock
    backends: dict[str, str] = {}
    opened: list[object] = []

    try:
        ledger_url = acc.ledger_url or "sqlite:///accounting/ledger.db"
        ledger: Ledger
        if ledger_url.startswith("sqlite:"):
            from conclave.accounting.backends.sqlite import SqliteLedger

            path = sqlite_path(ledger_url, settings.data_dir)
            ledger = await SqliteLedger.open(path, **writer)  # type: ignore[arg-type]
            backends["ledger"] = f"sqlite {path}"
        elif ledger_url.startswith(("postgresql", "postgres:")):
            from conclave.accounting.backends.postgres import PostgresLedger

            ledger = await PostgresLedger.open(
                ledger_url, schema=acc.ledger_schema, partitions_ahead=acc.ledger_partitions_ahead,
                pool_min=acc.ledger_pool_min, pool_max=acc.ledger_pool_max,
                timeout_s=acc.backend_timeout_s, **writer,  # type: ignore[arg-type]
            )
            backends["ledger"] = f"postgresql {redact_url(ledger_url)} schema {acc.ledger_schema}"
        else:
            raise ConfigError(
                f"unsupported ledger_url {redact_url(ledger_url)}",
                hint="use sqlite:///... or postgresql://...",
            )
        opened.append(ledger)

        budgets: BudgetStore
        if acc.budget_backend == "redis":
            from conclave.accounting.backends.redis import RedisBudgetStore

            budgets = await RedisBudgetStore.open(
                acc.redis_url, prefix=acc.redis_prefix, timeout_s=acc.backend_timeout_s,
                **budget_opts,  # type: ignore[arg-type]
            )
            backends["budgets"] = f"redis {redact_url(acc.redis_url)} prefix {acc.redis_prefix}"
        else:
            from conclave.accounting.backends.sqlite_budgets import SqliteBudgetStore

            path = acc.budget_path or base / "budgets.db"
            budgets = await SqliteBudgetStore.open(path, **budget_opts)  # type: ignore[arg-type]
            backends["budgets"] = f"sqlite {path}"
        opened.append(budgets)

        rate_backend = acc.ratelimit_backend or (
            "redis" if acc.budget_backend == "redis" else "memory"
        )
        ratelimiter: RateLimiter
        if rate_backend == "redis":
            from conclave.accounting.backends.redis_ratelimit import RedisRateLimiter

            ratelimiter = await RedisRateLimiter.open(
                acc.redis_url, prefix=acc.redis_prefix, timeout_s=acc.backend_timeout_s,
                **rate_opts,
            )
            backends["ratelimiter"] = f"redis {redact_url(acc.redis_url)}"
        else:
            from conclave.accounting.backends.memory import MemoryRateLimiter

            ratelimiter = MemoryRateLimiter(**rate_opts)  # type: ignore[arg-type]
            backends["ratelimiter"] = "memory (this process only)"
    except BaseException:
        for store in reversed(opened):
            await store.aclose()  # type: ignore[attr-defined]
        raise
    return Accounting(ledger=ledger, budgets=budgets, ratelimiter=ratelimiter, backends=backends)
