"""Admin API: budgets, their usage and alerts, spend breakdowns, API keys.

Money goes in as decimal dollars (``limit_usd: "12.50"``) or integer
micro-dollars (``limit_micros``) and comes out as both; never a float.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from conclave.accounting import (
    BudgetSpec,
    BudgetUpdate,
    LedgerQuery,
    Period,
    Scope,
    micros_from_usd,
)
from conclave.api.auth import authenticate, require_admin
from conclave.api.routes_openai import json_response
from conclave.api.state import AppState
from conclave.errors import InvalidRequest

router = APIRouter(prefix="/v1")

SPEND_GROUPS = ("provider", "model", "api_key", "user", "team", "day", "run", "outcome",
                "experiment", "variant", "route")


def _state(request: Request) -> AppState:
    return request.app.state.conclave


async def _admin(request: Request) -> AppState:
    state = _state(request)
    require_admin(await authenticate(request, state))
    return state


async def _json(request: Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return data


def _money(data: dict[str, Any], usd_key: str, micros_key: str) -> dict[str, Any]:
    """Turn ``limit_usd`` into ``limit_micros`` exactly (strings or numbers, never floats)."""
    out = dict(data)
    if usd_key in out:
        raw = out.pop(usd_key)
        try:
            out[micros_key] = micros_from_usd(Decimal(str(raw)))
        except (InvalidOperation, ValueError):
            raise InvalidRequest(f"{usd_key} must be a decimal amount like \"12.50\", got "
                                 f"{raw!r}") from None
    return out


def _parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "body"
        raise InvalidRequest(f"{where}: {e['msg']}") from None


def usd(micros: int) -> str:
    """Micro-dollars as an exact decimal string: 12500000 -> "12.5"."""
    return format(Decimal(micros) / 1_000_000, "f")


def budget_json(b: Any) -> dict[str, Any]:
    d = b.model_dump(mode="json")
    d["limit_usd"] = usd(b.limit_micros)
    return d


def usage_json(u: Any) -> dict[str, Any]:
    d = u.model_dump(mode="json")
    d["budget"] = budget_json(u.budget)
    for k in ("spent", "reserved", "remaining"):
        d[f"{k}_usd"] = usd(getattr(u, f"{k}_micros"))
    return d


# -- budgets --------------------------------------------------------------------------


@router.get("/budgets")
async def list_budgets(request: Request) -> Response:
    state = await _admin(request)
    budgets = await state.accounting.budgets.list_budgets()
    return json_response({"data": [budget_json(b) for b in budgets]})


@router.post("/budgets", status_code=201)
async def create_budget(request: Request) -> Response:
    state = await _admin(request)
    spec = _parse(BudgetSpec, _money(await _json(request), "limit_usd", "limit_micros"))
    budget = await state.accounting.budgets.create(spec)
    return json_response(budget_json(budget), status=201)


@router.get("/budgets/alerts")
async def list_alerts(request: Request, budget_id: str | None = None, limit: int = 100
                      ) -> Response:
    state = await _admin(request)
    alerts = await state.accounting.budgets.alerts(budget_id, limit)
    return json_response({"data": [a.model_dump(mode="json") | {"message": a.message()}
                                   for a in alerts]})


@router.get("/budgets/{budget_id}")
async def get_budget(request: Request, budget_id: str) -> Response:
    state = await _admin(request)
    return json_response(budget_json(await state.accounting.budgets.get(budget_id)))


@router.patch("/budgets/{budget_id}")
async def update_budget(request: Request, budget_id: str) -> Response:
    state = await _admin(request)
    patch = _parse(BudgetUpdate, _money(await _json(request), "limit_usd", "limit_micros"))
    return json_response(budget_json(await state.accounting.budgets.update(budget_id, patch)))


@router.delete("/budgets/{budget_id}", status_code=204)
async def delete_budget(request: Request, budget_id: str) -> Response:
    state = await _admin(request)
    await state.accounting.budgets.delete(budget_id)
    return Response(status_code=204)


@router.get("/budgets/{budget_id}/usage")
async def budget_usage(request: Request, budget_id: str) -> Response:
    state = await _admin(request)
    return json_response(usage_json(await state.accounting.budgets.usage(budget_id)))


@router.post("/budgets/{budget_id}/reset")
async def reset_budget(request: Request, budget_id: str) -> Response:
    state = await _admin(request)
    return json_response(usage_json(await state.accounting.budgets.reset(budget_id)))


# -- spend ----------------------------------------------------------------------------


@router.get("/spend")
async def spend(request: Request, by: str = "model", since: datetime | None = None,
                until: datetime | None = None) -> Response:
    state = await _admin(request)
    group = "api_key" if by == "key" else by
    if group not in SPEND_GROUPS:
        raise InvalidRequest(f"cannot break spend down by {by!r}",
                             hint=f"use one of: key, {', '.join(SPEND_GROUPS)}")
    # Read your own writes: records of this replica still queued (<= 50 ms) are included.
    await state.accounting.ledger.flush()
    rows = await state.accounting.ledger.spend(group, LedgerQuery(since=since, until=until))
    return json_response({"by": by, "data": [r.model_dump(mode="json") | {
        "cost_usd": usd(r.cost_micros)} for r in rows]})


# -- API keys -------------------------------------------------------------------------


class KeyCreate(BaseModel):
    name: str = ""
    scope: Literal["admin", "user"] = "user"
    user: str | None = None
    team: str | None = None
    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)


@router.get("/keys")
async def list_keys(request: Request, include_revoked: bool = False) -> Response:
    state = await _admin(request)
    assert state.keys is not None
    keys = await state.keys.list_keys(include_revoked)
    return json_response({"data": [k.model_dump(mode="json") for k in keys]})


@router.post("/keys", status_code=201)
async def create_key(request: Request) -> Response:
    state = await _admin(request)
    assert state.keys is not None
    spec = _parse(KeyCreate, await _json(request))
    new = await state.keys.create(**spec.model_dump())
    state.forget_key_count()
    # The only time the secret is ever shown.
    return json_response(new.key.model_dump(mode="json") | {"key": new.secret}, status=201)


@router.delete("/keys/{key_id}")
async def revoke_key(request: Request, key_id: str) -> Response:
    state = await _admin(request)
    assert state.keys is not None
    key = await state.keys.revoke(key_id)
    state.forget_key_count()
    return json_response(key.model_dump(mode="json"))


__all__ = ["Period", "Scope", "router"]
