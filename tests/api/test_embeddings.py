"""`POST /v1/embeddings` on `conclave serve`: the official SDK as client (it asks for
base64 by default), floats on request, the call priced and in the ledger like chat, and
clear refusals for what is not supported or not allowed."""

from __future__ import annotations

import httpx
import openai
import pytest

from conclave.accounting import LedgerQuery, open_accounting
from tests.api.conftest import (
    EMBED_MODEL,
    EMBED_PRICE,
    EMBED_TOKENS,
    Backends,
    Upstream,
    conclave_cli,
    embedding_of,
)
from tests.api.test_server import accounting_settings

pytestmark = pytest.mark.integration


async def test_embeddings_through_the_server(upstream: Upstream, servers_factory):
    (server,), env = servers_factory(upstream.url, Backends.embedded(), log_level="info")
    key = conclave_cli(env, "keys", "create", "--admin")["key"]
    texts = ["Paris is the capital of France.", "Berlin"]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    try:
        r = await client.embeddings.create(model=EMBED_MODEL, input=texts)
        assert [d.embedding for d in r.data] == [embedding_of(t) for t in texts]
        assert [d.index for d in r.data] == [0, 1]
        assert r.usage.prompt_tokens == EMBED_TOKENS * 2 and r.model == EMBED_MODEL
        one = await client.embeddings.create(model=EMBED_MODEL, input="Berlin",
                                             encoding_format="float")
        assert one.data[0].embedding == embedding_of("Berlin")
    finally:
        await client.close()

    async with httpx.AsyncClient(base_url=server.url,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        async def refused(body: dict, status: int, needle: str,
                          headers: dict | None = None) -> None:
            before = len(upstream.server.requests) if upstream.server.record else None
            resp = await http.post("/v1/embeddings", json=body, headers=headers or {})
            assert resp.status_code == status, resp.text
            assert needle in resp.json()["error"]["message"]
            if before is not None:
                assert len(upstream.server.requests) == before

        await refused({"model": "tier-1", "input": "x"}, 400, "named embedding model")
        await refused({"model": EMBED_MODEL, "input": [[1, 2, 3]]}, 400, "token-id")
        await refused({"model": EMBED_MODEL, "input": []}, 400, "non-empty list")
        await refused({"model": EMBED_MODEL, "input": ["ok", "  "]}, 400, "input[1] is empty")
        await refused({"model": EMBED_MODEL, "input": "x", "dimensions": 2}, 400,
                      "`dimensions` is not supported")
        await refused({"model": "nope/nope", "input": "x"}, 404, "unknown model")
        await refused({"model": "up/model", "input": "x"}, 400, "not an embedding model")
        # privacy mode: the upstream is a cloud provider, so nothing may be sent
        await refused({"model": EMBED_MODEL, "input": "secret text"}, 403, "privacy",
                      headers={"X-Conclave-Privacy": "1"})

    server.stop()  # drains the ledger
    acc = await open_accounting(accounting_settings(env))
    try:
        records = await acc.ledger.list_records(LedgerQuery(limit=100))
    finally:
        await acc.aclose()
    embeds = [r for r in records if r.operation == "embeddings"]
    done = [r for r in embeds if r.outcome.value == "success"]
    assert sorted(r.input_tokens for r in done) == [EMBED_TOKENS, 2 * EMBED_TOKENS]
    assert all(r.cost_micros == r.input_tokens * EMBED_PRICE for r in done)
    # calls the gateway refused are on the record too, at no cost
    refused_calls = [r for r in embeds if r.outcome.value != "success"]
    assert refused_calls and all(r.cost_micros == 0 for r in refused_calls)
    assert {r.error_type for r in refused_calls} >= {"privacy_violation"}
    text = server.log.read_text()
    assert "Paris is the capital" not in text and key not in text
