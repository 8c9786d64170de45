"""The admin API over HTTP: keys, budgets (CRUD, usage, reset, alerts), spend breakdowns,
health, readiness, metrics and OpenAPI."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import CALL_MICROS, MODEL, Backends, Upstream, chat_body

pytestmark = pytest.mark.integration


async def test_admin_api_end_to_end(upstream: Upstream, servers_factory):
    (server,), _ = servers_factory(upstream.url, Backends.embedded())
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        # Before any key exists, a loopback client may bootstrap the first admin key.
        r = await c.post("/v1/keys", json={"name": "root", "scope": "admin"})
        assert r.status_code == 201, r.text
        admin = r.json()
        assert admin["key"].startswith("ck-") and admin["scope"] == "admin"
        c.headers["Authorization"] = f"Bearer {admin['key']}"

        # Now keys are required; the secret is never listed again.
        assert (await c.get("/v1/keys", headers={"Authorization": ""})).status_code == 401
        r = await c.post("/v1/keys", json={"name": "alice", "user": "alice", "team": "ml"})
        user_key = r.json()
        listed = (await c.get("/v1/keys")).json()["data"]
        assert {k["name"] for k in listed} == {"root", "alice"}
        assert all("key" not in k for k in listed)
        user_h = {"Authorization": f"Bearer {user_key['key']}"}
        r = await c.get("/v1/budgets", headers=user_h)
        assert r.status_code == 403 and "admin" in r.json()["error"]["message"]

        # Budgets: create, get, update, usage; bad input is a clear 400.
        bad = await c.post("/v1/budgets", json={"scope": "team", "scope_id": "ml",
                                                "period": "weekly", "limit_usd": "1"})
        assert bad.status_code == 400 and "period" in bad.json()["error"]["message"]
        bad = await c.post("/v1/budgets", json={"scope": "global", "period": "daily",
                                                "limit_usd": "abc"})
        assert bad.status_code == 400 and "limit_usd" in bad.json()["error"]["message"]
        r = await c.post("/v1/budgets", json={"scope": "team", "scope_id": "ml",
                                              "period": "daily", "limit_usd": "0.185",
                                              "name": "ml-daily"})
        assert r.status_code == 201, r.text
        budget = r.json()
        assert budget["limit_micros"] == 185_000 and budget["limit_usd"] == "0.185"
        bid = budget["id"]
        assert (await c.get(f"/v1/budgets/{bid}")).json()["name"] == "ml-daily"
        assert (await c.get("/v1/budgets/bud_nope")).status_code == 404

        # Spend as alice (team ml) until the team budget refuses.  Each call reserves its
        # worst case (82,000 micros: prompt bytes + max_tokens) and settles 50,000, so the
        # third fits (100k + 82k <= 185k) and the fourth does not (150k + 82k).
        statuses = []
        for _ in range(5):
            r = await c.post("/v1/chat/completions", json=chat_body(), headers=user_h)
            statuses.append(r.status_code)
        assert statuses == [200, 200, 200, 402, 402]
        refusal = r.json()["error"]
        assert refusal["code"] == "budget_exceeded" and "ml-daily" in refusal["message"]
        usage = (await c.get(f"/v1/budgets/{bid}/usage")).json()
        assert usage["spent_micros"] == 3 * CALL_MICROS and usage["reserved_micros"] == 0
        alerts = (await c.get("/v1/budgets/alerts", params={"budget_id": bid})).json()["data"]
        assert [a["threshold"] for a in alerts] == [80]  # 150k of 185k, fired once

        # Raise the limit, spend again, then reset.
        r = await c.patch(f"/v1/budgets/{bid}", json={"limit_usd": "10"})
        assert r.json()["limit_micros"] == 10_000_000
        r = await c.post("/v1/chat/completions", json=chat_body(), headers=user_h)
        assert r.status_code == 200
        r = await c.post(f"/v1/budgets/{bid}/reset")
        assert r.json()["spent_micros"] == 0

        # Spend breakdowns from the ledger.
        for by, key in (("provider", "up"), ("model", MODEL), ("key", user_key["id"])):
            rows = (await c.get("/v1/spend", params={"by": by})).json()["data"]
            row = next((x for x in rows if x["key"] == key), None)
            assert row is not None, (by, rows)
            assert row["cost_micros"] == 4 * CALL_MICROS, (by, rows)
        days = (await c.get("/v1/spend", params={"by": "day"})).json()["data"]
        assert sum(d["count"] for d in days) == 6  # 4 served + 2 refused, all recorded
        assert (await c.get("/v1/spend", params={"by": "planet"})).status_code == 400

        # Revoke: the key stops working.
        assert (await c.delete(f"/v1/keys/{user_key['id']}")).status_code == 200
        r = await c.post("/v1/chat/completions", json=chat_body(), headers=user_h)
        assert r.status_code == 401
        assert (await c.delete(f"/v1/budgets/{bid}")).status_code == 204

        # Operations endpoints.
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        ready = (await c.get("/readyz")).json()
        assert ready["status"] == "ok" and set(ready["checks"]) == {"ledger", "budgets",
                                                                    "ratelimiter"}
        metrics = (await c.get("/metrics")).text
        assert 'conclave_llm_calls_total{model="up/model",outcome="success",provider="up"} 4.0' \
            in metrics
        assert 'conclave_refusals_total{reason="budget_exceeded"}' in metrics
        assert "conclave_http_request_duration_seconds_bucket" in metrics
        spec = (await c.get("/openapi.json")).json()
        assert "/v1/chat/completions" in spec["paths"] and "/v1/budgets" in spec["paths"]
