"""`conclave serve` end to end: the official SDK as client, budgets under a 1,000-request
race across replicas, cut streams, backend outages, rate limits across replicas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conclave.accounting import LedgerQuery, open_accounting
from conclave.config import load_settings
from tests.accounting._proxy import TcpProxy
from tests.api.conftest import (
    CALL_MICROS,
    MODEL,
    PG_URL,
    PRICE_IN,
    PRICE_OUT,
    Backends,
    Upstream,
    chat_body,
    conclave_cli,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.integration

BACKENDS = {"sqlite": Backends.embedded, "postgres+redis": Backends.scale_out}


def accounting_settings(env: dict[str, str]) -> Any:
    acc = {k.removeprefix("CONCLAVE_ACCOUNTING__").lower(): v for k, v in env.items()
           if k.startswith("CONCLAVE_ACCOUNTING__")}
    return load_settings(data_dir=Path(env["CONCLAVE_DATA_DIR"]), accounting=acc)


async def inspect(env: dict[str, str], budget_id: str | None = None) -> tuple[int, Any, list]:
    """(ledger record count, budget usage, records) read straight from the backends."""
    acc = await open_accounting(accounting_settings(env))
    try:
        records = await acc.ledger.list_records(LedgerQuery(limit=100_000))
        count = await acc.ledger.count(LedgerQuery())
        usage = await acc.budgets.usage(budget_id) if budget_id else None
        return count, usage, records
    finally:
        await acc.aclose()


async def test_openai_sdk_is_a_client(upstream: Upstream, servers_factory):
    (server,), env = servers_factory(upstream.url, Backends.embedded(), log_level="info")
    key = conclave_cli(env, "keys", "create", "--admin")["key"]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    try:
        r = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}],
            max_tokens=20)
        assert r.choices[0].message.content == "Paris."
        assert r.usage.prompt_tokens == 10 and r.usage.completion_tokens == 20

        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count."}], max_tokens=20,
            stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
        assert text == "".join(f"tok{i} " for i in range(20))
        assert usage is not None and usage.completion_tokens == 20

        c = await client.completions.create(model=MODEL, prompt="Capital of France?",
                                            max_tokens=20)
        assert c.choices[0].text == "Paris."

        models = [m.id async for m in client.models.list()]
        assert MODEL in models and "tier-0" in models

        with pytest.raises(openai.NotFoundError, match="unknown model"):
            await client.chat.completions.create(
                model="nope/nope", messages=[{"role": "user", "content": "x"}])
        bad = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="ck-wrong",
                                 max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model=MODEL,
                                              messages=[{"role": "user", "content": "x"}])
    finally:
        await client.close()
    # Structured access logs: one JSON object per request, no secrets, no prompts.
    lines = [json.loads(x) for x in server.log.read_text().splitlines() if x.startswith("{")]
    access = [x for x in lines if x.get("logger") == "conclave.access"]
    assert {x["route"] for x in access} >= {"/v1/chat/completions", "/v1/completions"}
    assert all(x["request_id"] for x in access)
    text = server.log.read_text()
    for secret in (key, "sk-upstream-secret-value", "Capital of France", "Paris."):
        assert secret not in text
    spend = conclave_cli(env, "spend", "--by", "model")
    row = next(r for r in spend["rows"] if r["key"] == MODEL)
    assert row["count"] == 3 and row["cost_micros"] == 3 * CALL_MICROS


@pytest.mark.parametrize("kind", ["sqlite", "postgres+redis"])
async def test_budget_race_never_overspends(upstream: Upstream, servers_factory, kind):
    replicas = 1 if kind == "sqlite" else 4
    servers, env = servers_factory(upstream.url, BACKENDS[kind](), n=replicas)
    key = conclave_cli(env, "keys", "create", "--admin")["key"]
    limit_usd = "2.00"  # 40 calls at $0.05; reservations hold the worst case while in flight
    budget = conclave_cli(env, "budget", "set", "--limit", limit_usd, "--period", "lifetime")
    total = 1000
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one(i: int) -> tuple[int, str | None]:
            r = await client.post(f"{servers[i % replicas].url}/v1/chat/completions",
                                  json=chat_body(), headers={"Authorization": f"Bearer {key}"})
            return r.status_code, r.json().get("id") if r.status_code == 200 else None

        results = await asyncio.gather(*(one(i) for i in range(total)))
    statuses = [s for s, _ in results]
    ok = statuses.count(200)
    assert set(statuses) <= {200, 402}, sorted(set(statuses))
    assert 0 < ok < total

    # SIGTERM every replica: each drains its ledger queue before exiting, so what is read
    # below is final (a replica's last records may otherwise still be queued, <= 50 ms).
    await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))
    count, usage, records = await inspect(env, budget["id"])
    limit_micros = 2_000_000
    assert usage.spent_micros <= limit_micros
    assert usage.spent_micros == ok * CALL_MICROS
    assert usage.reserved_micros == 0 and usage.active_reservations == 0
    assert count == total, "exactly one ledger record per request"
    from collections import Counter
    dups = [i for i, n in Counter(r.id for r in records).items() if n > 1]
    assert not dups, [r for r in records if r.id in dups][:4]
    succeeded = {str(r.id) for r in records if r.outcome == "success"}
    assert succeeded == {uuid.UUID(rid).__str__() for _, rid in results if rid}
    refused = [r for r in records if r.outcome == "error"]
    odd = [r for r in records if r.outcome not in ("error", "success")
           or (r.outcome == "success" and str(r.id) not in succeeded)]
    assert not odd, (len(odd), odd[:3])
    assert len(refused) == total - ok and {r.error_type for r in refused} == {"budget_exceeded"}
    assert sum(r.cost_micros for r in records) == usage.spent_micros


@pytest.mark.parametrize("kind", ["sqlite", "postgres+redis"])
async def test_client_disconnect_mid_stream_is_settled(upstream: Upstream, servers_factory,
                                                       kind):
    upstream.token_delay = 0.05
    (server,), env = servers_factory(upstream.url, BACKENDS[kind]())
    key = conclave_cli(env, "keys", "create", "--admin")["key"]
    budget = conclave_cli(env, "budget", "set", "--limit", "100", "--period", "daily")
    seen = 0
    async with httpx.AsyncClient(timeout=30) as client, client.stream(
        "POST", f"{server.url}/v1/chat/completions", json=chat_body(stream=True),
        headers={"Authorization": f"Bearer {key}"},
    ) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
                if seen == 3:
                    break  # leave mid-stream: the connection is closed here

    async def recorded() -> bool:
        return (await inspect(env))[0] == 1

    await wait_until(recorded, within=15)
    _, usage, (rec,) = await inspect(env, budget["id"])
    assert rec.outcome == "cut"
    assert 3 <= rec.output_tokens < 20 and rec.tokens_estimated
    assert rec.cost_micros == rec.input_tokens * PRICE_IN + rec.output_tokens * PRICE_OUT
    assert usage.spent_micros == rec.cost_micros
    assert usage.reserved_micros == 0 and usage.active_reservations == 0


async def test_backends_down_fail_closed_then_recover(upstream: Upstream, servers_factory,
                                                      tmp_path):
    redis_port = free_port()
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()

    def start_redis() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", str(redis_dir)], stdout=subprocess.DEVNULL)
        for _ in range(100):
            with contextlib.suppress(OSError), __import__("socket").create_connection(
                    ("127.0.0.1", redis_port), timeout=0.2):
                return proc
            __import__("time").sleep(0.05)
        raise RuntimeError("redis-server did not start")

    redis_proc = start_redis()
    proxy = await TcpProxy("127.0.0.1", 5432).start()
    pg_url = PG_URL.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    backends = Backends.scale_out(pg_url=pg_url, redis_url=f"redis://127.0.0.1:{redis_port}/0")
    try:
        # The proxy lives on this event loop: blocking calls go to threads so it can serve.
        (server,), env = await asyncio.to_thread(
            servers_factory, upstream.url, backends, CONCLAVE_API__KEY_CACHE_TTL_S="0")
        key = (await asyncio.to_thread(conclave_cli, env, "keys", "create", "--admin"))["key"]
        budget = await asyncio.to_thread(conclave_cli, env, "budget", "set", "--limit", "100",
                                         "--period", "monthly")
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{server.url}/v1/chat/completions"
            assert (await client.post(url, json=chat_body(), headers=headers)).status_code == 200

            # Redis (budgets) goes away: refused with a clear 503, nothing charged.
            redis_proc.terminate()
            redis_proc.wait(10)
            r = await client.post(url, json=chat_body(), headers=headers)
            assert r.status_code == 503, r.text
            assert "redis" in r.json()["error"]["message"].lower()
            ready = await client.get(f"{server.url}/readyz")
            assert ready.status_code == 503

            redis_proc = start_redis()

            async def serving() -> bool:
                return (await client.post(url, json=chat_body(), headers=headers)
                        ).status_code == 200

            await wait_until(serving, within=20, every=0.3)

            # PostgreSQL (keys, ledger) goes away: refused with a 503 as well.
            await proxy.cut()
            r = await client.post(url, json=chat_body(), headers=headers)
            assert r.status_code == 503, r.text
            await proxy.restore()
            await wait_until(serving, within=30, every=0.5)
        await asyncio.to_thread(server.stop)  # SIGTERM: the ledger drains before exit

        count, usage, records = await inspect(env, budget["id"])
        ok = [r for r in records if r.outcome == "success"]
        assert usage.spent_micros == len(ok) * CALL_MICROS
        assert usage.reserved_micros == 0
        assert count == len(records) and all(r.outcome in ("success", "error") for r in records)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        await proxy.cut()


async def test_rate_limit_holds_across_replicas(upstream: Upstream, servers_factory):
    servers, env = servers_factory(upstream.url, Backends.scale_out(), n=4)
    limit = 100
    key = conclave_cli(env, "keys", "create", "--rpm", str(limit))["key"]
    async with httpx.AsyncClient(timeout=60) as client:
        async def one(i: int) -> httpx.Response:
            return await client.post(f"{servers[i % 4].url}/v1/chat/completions",
                                     json=chat_body(), headers={"Authorization": f"Bearer {key}"})

        responses = await asyncio.gather(*(one(i) for i in range(400)))
    admitted = sum(r.status_code == 200 for r in responses)
    refused = [r for r in responses if r.status_code == 429]
    assert admitted + len(refused) == 400
    assert abs(admitted - limit) <= limit * 0.01, admitted
    r = refused[0]
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["X-RateLimit-Limit"] == str(limit)
    assert r.headers["X-RateLimit-Remaining"] == "0"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    ok = next(r for r in responses if r.status_code == 200)
    assert ok.headers["X-RateLimit-Limit"] == str(limit)
