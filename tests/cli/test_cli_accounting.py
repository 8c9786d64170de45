"""`conclave chat` goes through the accounting like every other caller of the gateway.

Each call is an invocation record in the configured ledger and is held against the
configured budgets, embedded (SQLite) or scale-out (PostgreSQL + Redis): a spent
budget refuses the call before any request leaves, with the usual one-line error.
The priced model is a loopback OpenAI-compatible upstream in this test process
(fixed usage, so the cost is exact); the free one is the real local model.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from conclave.accounting import LedgerQuery, open_accounting
from conclave.config import load_settings
from tests.cli.test_cli_errors import conclave
from tests.support.wire_server import RecordedRequest, ScriptedResponse, WireServer

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
#: $ per million tokens; the upstream reports 10 prompt + 20 completion tokens, so a call
#: costs (10 * 1000 + 20 * 2000) / 1e6 = $0.05
PRICE_IN, PRICE_OUT = 1000, 2000
MODEL = "up/model"


def answer(req: RecordedRequest) -> ScriptedResponse:
    return ScriptedResponse.json({
        "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}})


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[WireServer]:
    async with WireServer(handler=answer) as server:
        yield server


def priced_env(tmp_path: Path, upstream_url: str) -> dict[str, str]:
    """A catalog with one priced model at ``upstream_url`` and the key it needs."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "providers:\n  up:\n    type: openai\n"
        f"    base_url: {upstream_url}\n    api_key_env: UP_API_KEY\n"
        f"models:\n  - name: {MODEL}\n    provider: up\n    id: m\n    tier: 1\n"
        f"    max_output_tokens: 100\n    price: {{input: {PRICE_IN}, output: {PRICE_OUT}}}\n")
    return {"CONCLAVE_CATALOG_FILE": str(catalog), "UP_API_KEY": "sk-upstream-secret-value",
            "CONCLAVE_ROUTING__MAX_RETRIES": "0"}


@pytest.fixture(params=["embedded", pytest.param("scale-out", marks=pytest.mark.integration)])
def backends(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Environment choosing the accounting backends (a private schema and key prefix)."""
    if request.param == "embedded":
        yield {}
        return
    tag = uuid.uuid4().hex[:8]
    schema, prefix = f"t_cli_{tag}", f"{{t_cli_{tag}}}:"
    yield {"CONCLAVE_ACCOUNTING__LEDGER_URL": PG_URL,
           "CONCLAVE_ACCOUNTING__LEDGER_SCHEMA": schema,
           "CONCLAVE_ACCOUNTING__BUDGET_BACKEND": "redis",
           "CONCLAVE_ACCOUNTING__REDIS_URL": REDIS_URL,
           "CONCLAVE_ACCOUNTING__REDIS_PREFIX": prefix}
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        r.delete(*keys)


async def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # in a thread: the upstream answers on this test's event loop meanwhile
    return await asyncio.to_thread(conclave, tmp_path, *args, **env)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "sk-upstream-secret-value" not in r.stderr
    return r.stderr


async def test_chat_is_recorded_and_held_against_the_budgets(tmp_path, upstream, backends):
    env = priced_env(tmp_path, f"{upstream.url}/v1") | backends
    r = await cli(tmp_path, "budget", "set", "--limit", "5", "--period", "monthly", "--json",
                  **env)
    assert r.returncode == 0, r.stderr
    monthly = json.loads(r.stdout)["id"]

    r = await cli(tmp_path, "chat", "What is the capital of France?", "--model", MODEL,
                  "--json", **env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cost_usd"] == 0.05

    # The spend is settled against the budget (nothing left reserved) ...
    usage = json.loads((await cli(tmp_path, "budget", "show", monthly, "--json", **env)).stdout)
    assert (usage["spent_usd"], usage["reserved_usd"]) == ("0.05", "0")
    # ... and written to the ledger before the command exited.
    spend = json.loads((await cli(tmp_path, "spend", "--json", **env)).stdout)
    (row,) = spend["rows"]
    assert row["key"] == MODEL and row["count"] == 1 and row["cost_usd"] == "0.05"
    assert (row["input_tokens"], row["output_tokens"]) == (10, 20)

    # A lifetime budget smaller than the call's worst case refuses it before any request.
    r = await cli(tmp_path, "budget", "set", "--limit", "0.000001", "--period", "lifetime",
                  **env)
    assert r.returncode == 0, r.stderr
    for extra in ([], ["--stream"]):
        r = await cli(tmp_path, "chat", "And of Italy?", "--model", MODEL, *extra, **env)
        assert "budget global (lifetime" in one_line_error(r)
        assert "would be exceeded" in r.stderr
    assert upstream.request_count == 1

    # The refusals are records too: every call is one, whatever its outcome.
    outcomes = json.loads((await cli(tmp_path, "spend", "--by", "outcome", "--json",
                                     **env)).stdout)
    assert {row["key"]: row["count"] for row in outcomes["rows"]} == {"success": 1, "error": 2}
    usage = json.loads((await cli(tmp_path, "budget", "show", monthly, "--json", **env)).stdout)
    assert (usage["spent_usd"], usage["reserved_usd"]) == ("0.05", "0")


@pytest.mark.parametrize(("env", "needle"), [
    ({"CONCLAVE_ACCOUNTING__LEDGER_URL": "postgresql://conclave:pg-secret@127.0.0.1:1/x"},
     "PostgreSQL is unavailable at postgresql://"),
    ({"CONCLAVE_ACCOUNTING__BUDGET_BACKEND": "redis",
      "CONCLAVE_ACCOUNTING__REDIS_URL": "redis://:redis-secret@127.0.0.1:1/0"},
     "Redis is unavailable at redis://"),
])
def test_unreachable_accounting_backend_is_one_clear_line(tmp_path, env, needle):
    # the upstream does not exist either: the accounting must fail first, and clearly
    r = conclave(tmp_path, "chat", "hi", "--model", MODEL,
                 **priced_env(tmp_path, "http://127.0.0.1:9/v1"), **env)
    err = one_line_error(r)
    assert needle in err and "127.0.0.1:1" in err
    assert "pg-secret" not in err and "redis-secret" not in err


@pytest.mark.llama
async def test_local_chat_is_a_ledger_record(llama_server, tmp_path):
    # the session's data directory, so the command reuses the running server
    data_dir = llama_server.settings.data_dir
    since = datetime.now(UTC)
    r = await cli(tmp_path, "chat", "What is the capital of France?", "--json",
                  "--max-tokens", "16", CONCLAVE_DATA_DIR=str(data_dir))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    usage = data["usage"]

    r = await cli(tmp_path, "spend", "--since", since.isoformat(), "--json",
                  CONCLAVE_DATA_DIR=str(data_dir))
    spend = json.loads(r.stdout)
    (row,) = spend["rows"]
    assert row["key"] == "local/gemma-3-270m" and row["count"] == 1
    assert (row["input_tokens"], row["output_tokens"]) == (
        usage["input_tokens"], usage["output_tokens"])

    acc = await open_accounting(load_settings(data_dir=data_dir))
    try:
        records: list[Any] = await acc.ledger.list_records(LedgerQuery(since=since))
    finally:
        await acc.aclose()
    (rec,) = records
    assert rec.operation == "chat" and rec.outcome.value == "success"
    assert rec.response_model == "local/gemma-3-270m" and rec.provider == data["provider"]
    assert rec.request_model == "tier-0" and rec.tier == 0 and rec.cost_micros == 0
    assert (rec.input_tokens, rec.output_tokens) == (usage["input_tokens"],
                                                      usage["output_tokens"])


async def test_sigterm_mid_stream_still_records_the_call(tmp_path):
    """A supervisor's SIGTERM cancels the command: the cut call is recorded, nothing stays
    reserved, and the exit is a one-line message with status 143."""
    import signal

    from tests.cli.test_cli_errors import CONCLAVE, cli_env
    from tests.support.wire_server import Piece, sse_event

    def stalls(req: RecordedRequest) -> ScriptedResponse:
        first = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "Par"}, "finish_reason": None}]}
        # the first token, then nothing for a minute
        return ScriptedResponse.sse([Piece(sse_event(first)), Piece(sse_event("[DONE]"), 60)])

    async with WireServer(handler=stalls) as server:
        env = priced_env(tmp_path, f"{server.url}/v1")
        r = await cli(tmp_path, "budget", "set", "--limit", "5", "--period", "monthly",
                      "--json", **env)
        monthly = json.loads(r.stdout)["id"]
        proc = await asyncio.create_subprocess_exec(
            CONCLAVE, "chat", "What is the capital of France?", "--model", MODEL, "--stream",
            env=cli_env(tmp_path, **env), stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.read(3), timeout=60)
        assert first == b"Par"  # the command is mid-stream
        proc.send_signal(signal.SIGTERM)
        _, errs = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 143, errs
        assert errs.decode().strip() == "error: terminated"

    acc = await open_accounting(load_settings(data_dir=tmp_path / "data"))
    try:
        records: list[Any] = await acc.ledger.list_records(LedgerQuery())
    finally:
        await acc.aclose()
    (rec,) = records
    assert rec.operation == "chat" and rec.outcome.value in ("cancelled", "cut")
    assert rec.response_model == MODEL
    usage = json.loads((await cli(tmp_path, "budget", "show", monthly, "--json", **env)).stdout)
    assert usage["reserved_usd"] == "0"
