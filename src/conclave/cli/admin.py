"""``conclave serve``, ``keys``, ``budget`` and ``spend``: they work on the stores directly,
so an admin needs no running server (and can create the first admin key)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from conclave.cli._common import cli_accounting, cli_errors, out, print_json, run
from conclave.config import Settings, load_settings
from conclave.errors import InvalidRequest

T = TypeVar("T")

keys_app = typer.Typer(help="Create, list and revoke API keys (stored hashed).",
                       no_args_is_help=True)
budget_app = typer.Typer(help="Set and inspect budgets.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _with_accounting(fn: Callable[[Any], Awaitable[T]]) -> T:
    async def go() -> T:
        async with cli_accounting(load_settings()) as acc:
            return await fn(acc)

    return run(go())


def _with_keys(fn: Callable[[Any], Awaitable[T]]) -> T:
    async def go() -> T:
        from conclave.api.keys import open_key_store

        store = await open_key_store(load_settings())
        try:
            return await fn(store)
        finally:
            await store.aclose()

    return run(go())


def _usd(micros: int) -> str:
    return format(Decimal(micros) / 1_000_000, "f")


# -- serve ----------------------------------------------------------------------------


@cli_errors
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default from settings: "
                                             "127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8400).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Run the OpenAI-compatible API server with accounting, budgets and metrics."""
    import uvicorn

    from conclave.api.app import configure_logging

    settings: Settings = load_settings()
    # Read the catalog here, where a mistake in it is a one-line error, rather than in the
    # server's start-up, where uvicorn would print it as a traceback.
    _ = settings.catalog
    api = settings.api
    configure_logging(log_level)
    uvicorn.run(
        "conclave.api.app:create_app", factory=True,
        host=host or api.host, port=api.port if port is None else port,
        workers=workers or api.workers, log_level=log_level, access_log=False,
        timeout_graceful_shutdown=int(api.graceful_timeout_s), lifespan="on",
        loop="uvloop", http="httptools",
    )


# -- keys -----------------------------------------------------------------------------


@keys_app.command("create")
@cli_errors
def keys_create(
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    admin: Annotated[bool, typer.Option("--admin", help="May use the admin API.")] = False,
    user: Annotated[str | None, typer.Option(help="User the key's calls are charged to.")
                    ] = None,
    team: Annotated[str | None, typer.Option(help="Team the key's calls are charged to.")
                    ] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a key. The secret is printed once and never stored."""
    new = _with_keys(lambda s: s.create(name=name, scope="admin" if admin else "user",
                                        user=user, team=team, requests_per_minute=rpm,
                                        tokens_per_minute=tpm))
    if json_out:
        print_json(new.key.model_dump(mode="json") | {"key": new.secret})
        return
    out.print(f"created {new.key.scope} key {new.key.id}")
    out.print(f"  {new.secret}", markup=False)
    out.print("[dim]store it now: it is shown only once[/]")


@keys_app.command("list")
@cli_errors
def keys_list(
    all_: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """List keys (ids and prefixes, never secrets)."""
    keys = _with_keys(lambda s: s.list_keys(all_))
    if json_out:
        print_json({"keys": [k.model_dump(mode="json") for k in keys]})
        return
    table = Table("id", "name", "scope", "prefix", "user", "team", "rpm", "tpm", "created",
                  "revoked")
    for k in keys:
        table.add_row(k.id, k.name, k.scope, k.prefix + "…", k.user or "", k.team or "",
                      str(k.requests_per_minute or ""), str(k.tokens_per_minute or ""),
                      f"{k.created_at:%Y-%m-%d %H:%M}",
                      f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "")
    out.print(table)


@keys_app.command("revoke")
@cli_errors
def keys_revoke(key_id: str, json_out: JsonOpt = False) -> None:
    """Revoke a key; servers stop accepting it within the key cache time (5 s)."""
    key = _with_keys(lambda s: s.revoke(key_id))
    if json_out:
        print_json(key.model_dump(mode="json"))
    else:
        out.print(f"revoked {key.id}")


# -- budgets --------------------------------------------------------------------------


def _usage_row(u: Any) -> dict[str, Any]:
    b = u.budget
    return {"id": b.id, "name": b.name, "scope": b.scope.value, "scope_id": b.scope_id,
            "period": b.period.value, "period_key": u.period_key,
            "limit_usd": _usd(b.limit_micros), "spent_usd": _usd(u.spent_micros),
            "reserved_usd": _usd(u.reserved_micros), "remaining_usd": _usd(u.remaining_micros),
            "percent": str(u.percent), "webhook_url": b.webhook_url}


def _print_usage(rows: list[dict[str, Any]]) -> None:
    table = Table("id", "name", "scope", "period", "limit $", "spent $", "reserved $",
                  "remaining $", "%")
    for r in rows:
        scope = r["scope"] if r["scope"] == "global" else f"{r['scope']}:{r['scope_id']}"
        table.add_row(r["id"], r["name"], scope, r["period"], r["limit_usd"], r["spent_usd"],
                      r["reserved_usd"], r["remaining_usd"], r["percent"])
    out.print(table)


@budget_app.command("set")
@cli_errors
def budget_set(
    limit: Annotated[str, typer.Option("--limit", help="Limit in US dollars, e.g. 25.00.")],
    scope: Annotated[str, typer.Option(help="global, api_key, user, team or run.")] = "global",
    scope_id: Annotated[str | None, typer.Option("--id", help="Key id, user, team or run id "
                                                 "(not for global).")] = None,
    period: Annotated[str, typer.Option(help="daily, monthly or lifetime.")] = "monthly",
    name: Annotated[str, typer.Option(help="A label.")] = "",
    webhook: Annotated[str | None, typer.Option(help="URL POSTed when an alert fires.")
                       ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a budget, or change the limit of the one with the same scope and period."""
    from conclave.accounting import BudgetSpec, BudgetUpdate, Period, Scope, ScopeRef

    try:
        micros = int(Decimal(limit) * 1_000_000)
    except InvalidOperation:
        raise InvalidRequest(f"--limit must be an amount in dollars like 25.00, got {limit!r}"
                             ) from None
    try:
        sc, per = Scope(scope), Period(period)
    except ValueError as exc:
        raise InvalidRequest(str(exc), hint="scopes: global, api_key, user, team, run; "
                             "periods: daily, monthly, lifetime") from None
    ref = ScopeRef(scope=sc, id=scope_id or "*") if sc is not Scope.GLOBAL else ScopeRef(
        scope=sc)

    async def go(acc: Any) -> Any:
        for b in await acc.budgets.list_budgets(ref):
            if b.period is per:
                await acc.budgets.update(b.id, BudgetUpdate(
                    limit_micros=micros, name=name or None, webhook_url=webhook))
                return await acc.budgets.usage(b.id)
        b = await acc.budgets.create(BudgetSpec(scope=sc, scope_id=ref.id, period=per,
                                                limit_micros=micros, name=name,
                                                webhook_url=webhook))
        return await acc.budgets.usage(b.id)

    row = _usage_row(_with_accounting(go))
    if json_out:
        print_json(row)
    else:
        _print_usage([row])


@budget_app.command("show")
@cli_errors
def budget_show(budget_id: str, json_out: JsonOpt = False) -> None:
    """A budget's usage in its current period, and its alerts."""

    async def go(acc: Any) -> tuple[Any, list[Any]]:
        return await acc.budgets.usage(budget_id), await acc.budgets.alerts(budget_id)

    usage, alerts = _with_accounting(go)
    row = _usage_row(usage)
    row["alerts"] = [a.model_dump(mode="json") | {"message": a.message()} for a in alerts]
    if json_out:
        print_json(row)
        return
    _print_usage([row])
    for a in row["alerts"]:
        out.print(f"  {a['fired_at']}  {a['message']}")


@budget_app.command("list")
@cli_errors
def budget_list(json_out: JsonOpt = False) -> None:
    """All budgets with their current usage."""

    async def go(acc: Any) -> list[Any]:
        return [await acc.budgets.usage(b.id) for b in await acc.budgets.list_budgets()]

    rows = [_usage_row(u) for u in _with_accounting(go)]
    if json_out:
        print_json({"budgets": rows})
    else:
        _print_usage(rows)


# -- spend ----------------------------------------------------------------------------


@cli_errors
def spend(
    by: Annotated[str, typer.Option(help="provider, model, key, user, team or day.")
                  ] = "model",
    since: Annotated[str | None, typer.Option(help="ISO date or time, e.g. 2026-11-01.")
                     ] = None,
    until: Annotated[str | None, typer.Option(help="ISO date or time (exclusive).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Spend from the ledger, broken down by provider, model, key or day."""
    from conclave.accounting import LedgerQuery
    from conclave.api.routes_admin import SPEND_GROUPS

    group = "api_key" if by == "key" else by
    if group not in SPEND_GROUPS:
        raise InvalidRequest(f"cannot break spend down by {by!r}",
                             hint="use provider, model, key, user, team or day")

    def when(raw: str | None, flag: str) -> datetime | None:
        if raw is None:
            return None
        try:
            t = datetime.fromisoformat(raw)
        except ValueError:
            raise InvalidRequest(f"{flag} must be an ISO date like 2026-11-01, got {raw!r}"
                                 ) from None
        return t if t.tzinfo else t.replace(tzinfo=UTC)

    query = LedgerQuery(since=when(since, "--since"), until=when(until, "--until"))
    rows = _with_accounting(lambda acc: acc.ledger.spend(group, query))
    data = [r.model_dump(mode="json") | {"cost_usd": _usd(r.cost_micros)} for r in rows]
    if json_out:
        print_json({"by": by, "rows": data,
                    "total_usd": _usd(sum(r.cost_micros for r in rows)),
                    "total_calls": sum(r.count for r in rows)})
        return
    table = Table(by, "calls", "cost $", "input tokens", "output tokens", "p50 ms", "p95 ms")
    for r in data:
        table.add_row(str(r["key"]), str(r["count"]), r["cost_usd"], str(r["input_tokens"]),
                      str(r["output_tokens"]), str(r["p50_latency_ms"] or ""),
                      str(r["p95_latency_ms"] or ""))
    out.print(table)
