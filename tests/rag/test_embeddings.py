"""Embedders: the real MiniLM on the CPU, the on-disk cache, and remote models through the
gateway.

Remote embeddings go through :class:`Gateway` to :class:`WireServer`, a loopback
server that answers ``POST /v1/embeddings`` (OpenAI) and ``POST /api/embed``
(Ollama) with the documented JSON, so the real SDKs send real HTTP; accounting
is the real embedded one (SQLite ledger and budgets under the test's data dir).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conclave.accounting import LedgerQuery, Outcome, open_accounting
from conclave.accounting.budgets import BudgetSpec, Period, Scope
from conclave.config import ModelSpec, ProviderSpec
from conclave.errors import (
    AuthenticationFailed,
    BadProviderRequest,
    BudgetExceeded,
    ConfigError,
    InvalidRequest,
    MalformedResponse,
    ModelNotFound,
    PrivacyViolation,
    RateLimited,
)
from conclave.gateway import Gateway
from conclave.llm.providers import AnthropicProvider
from conclave.llm.types import ChatRequest, EmbedRequest, Message
from conclave.rag.embeddings import (
    CachedEmbedder,
    EmbeddingCache,
    GatewayEmbedder,
    LocalEmbedder,
    build_embedder,
    normalise,
)
from tests.support.settings import make_settings
from tests.support.wire_server import RecordedRequest, ScriptedResponse, WireServer

KEY = "sk-test-key-0123456789abcdef"
#: tokens the loopback OpenAI reports per input: big enough for whole micro-dollars
TOKENS_PER_INPUT = 50_000


@pytest.fixture(scope="module")
def local() -> LocalEmbedder:
    return LocalEmbedder()


def fake_vector(text: str, dim: int = 8) -> list[float]:
    """What the loopback 'provider' returns: a deterministic vector per text."""
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    return rng.normal(size=dim).round(6).tolist()


def openai_body(inputs: list[str], model: str = "m") -> dict[str, Any]:
    data = [{"object": "embedding", "index": i, "embedding": fake_vector(t)}
            for i, t in enumerate(inputs)]
    data.reverse()  # servers may answer out of order; the index field says where each goes
    tokens = TOKENS_PER_INPUT * len(inputs)
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def openai_handler(req: RecordedRequest) -> ScriptedResponse:
    body = req.json
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    return ScriptedResponse.json(openai_body(inputs, body["model"]))


def ollama_handler(req: RecordedRequest) -> ScriptedResponse:
    body = req.json
    out: dict[str, Any] = {"model": body["model"],
                           "embeddings": [fake_vector(t, 6) for t in body["input"]]}
    if "count" in body["input"][0]:  # inputs that ask for it get a reported token count
        out["prompt_eval_count"] = 7
    return ScriptedResponse.json(out)


@pytest.fixture
async def openai_server() -> AsyncIterator[WireServer]:
    async with WireServer(handler=openai_handler) as server:
        yield server


def openai_settings(tmp_path: Path, server: WireServer, **overrides: Any):
    overrides.setdefault("routing", {"max_retries": 0})
    return make_settings(tmp_path, openai_api_key=KEY, openai_base_url=f"{server.url}/v1",
                         **overrides)


async def records(acc: Any) -> list[Any]:
    await acc.ledger.flush()
    found = await acc.ledger.list_records(LedgerQuery(limit=1000))
    return sorted(found, key=lambda r: r.started_at)


# --- local ------------------------------------------------------------------------------


async def test_local_embedder_gives_unit_float32_rows_that_mean_something(local) -> None:
    texts = ["A cat is sleeping on the mat.", "A kitten naps on a rug.",
             "The quarterly tax return is due in April."]
    v = await local.embed(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert local.dim == 384 and local.name == "local:all-MiniLM-L6-v2"
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2
    # offline is forced once the model was loaded: nothing may reach a hub
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    empty = await local.embed([])
    assert empty.shape == (0, 384)


async def test_local_embedder_is_deterministic_and_batch_independent(local) -> None:
    texts = [f"passage number {i} about topic {i % 3}" for i in range(10)]
    whole = await local.embed(texts)
    small = LocalEmbedder(batch_size=3)
    parts = await small.embed(texts)
    assert np.allclose(whole, parts, atol=1e-5)


def test_token_embeddings_drop_special_tokens(local) -> None:
    out = local.token_embeddings(["hello world", "a"])
    assert [x.shape for x in out] == [(2, 384), (1, 384)]
    assert np.allclose(np.linalg.norm(out[0], axis=1), 1.0, atol=1e-5)


def test_missing_model_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no sentence-transformers model"):
        LocalEmbedder(tmp_path).model  # noqa: B018


# --- the cache -------------------------------------------------------------------------


async def test_cache_embeds_each_distinct_text_once_and_survives_reopening(
        local, tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    cached = CachedEmbedder(local, EmbeddingCache(path))
    texts = ["alpha beta", "gamma delta", "alpha beta"]
    first = await cached.embed(texts)
    assert cached.computed == 2  # the duplicate was embedded once
    assert np.allclose(first[0], first[2])
    again = await cached.embed(list(reversed(texts)))
    assert cached.computed == 2
    assert np.allclose(again[::-1], first, atol=1e-6)
    cached.cache.close()

    reopened = CachedEmbedder(local, EmbeddingCache(path))
    v = await reopened.embed(["gamma delta", "epsilon"])
    assert reopened.computed == 1
    assert np.allclose(v[0], first[1], atol=1e-6)
    assert len(reopened.cache) == 3
    reopened.cache.close()


def test_cache_keys_depend_on_the_model_name() -> None:
    assert EmbeddingCache.key("local:a", "text") != EmbeddingCache.key("local:b", "text")
    assert EmbeddingCache.key("m", "text") == EmbeddingCache.key("m", "text")


def test_normalise_keeps_zero_rows_zero() -> None:
    out = normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert out.dtype == np.float32
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])


# --- remote models through the gateway: OpenAI wire format -------------------------------------


async def test_openai_embeddings_go_through_the_gateway_priced_and_recorded(
        tmp_path: Path, openai_server: WireServer) -> None:
    settings = openai_settings(tmp_path, openai_server)
    acc = await open_accounting(settings)
    try:
        budget = await acc.budgets.create(BudgetSpec(scope=Scope.GLOBAL, period=Period.MONTHLY,
                                                     limit_micros=1_000_000))
        async with Gateway(settings, accounting=acc) as gw:
            emb = GatewayEmbedder(gw, "openai:text-embedding-3-small", batch_size=2,
                                  metadata={"user": "alice", "purpose": "index"})
            assert emb.name == "openai:text-embedding-3-small" and emb.dim == 1536
            v = await emb.embed(["one", "two", "three"])
            await emb.aclose()  # not its gateway: stays open
            direct = await gw.embed(EmbedRequest(model="openai/text-embedding-3-large",
                                                 inputs=["four"]))
        assert v.shape == (3, 8) and emb.dim == 8 and v.dtype == np.float32
        expected = normalise(np.array([fake_vector(t) for t in ("one", "two", "three")]))
        assert np.allclose(v, expected, atol=1e-5)
        assert [r.path for r in openai_server.requests] == ["/v1/embeddings"] * 3
        first = openai_server.requests[0]
        assert first.json == {"model": "text-embedding-3-small", "input": ["one", "two"],
                              "encoding_format": "float"}
        assert first.headers["authorization"] == f"Bearer {KEY}"
        # the raw response: unnormalised vectors, usage, price at $0.13 per million
        assert direct.vectors == [pytest.approx(fake_vector("four"))]
        assert direct.usage.input_tokens == TOKENS_PER_INPUT and not direct.usage.estimated
        assert direct.model == "openai/text-embedding-3-large" and direct.provider == "openai"
        assert direct.cost_usd == pytest.approx(TOKENS_PER_INPUT * 0.13 / 1e6)

        recs = await records(acc)
        assert len(recs) == 3  # one per batch, one for the direct call
        small = [r for r in recs if r.response_model == "openai/text-embedding-3-small"]
        assert [r.input_tokens for r in small] == [2 * TOKENS_PER_INPUT, TOKENS_PER_INPUT]
        # $0.02 per million input tokens: 100k tokens = 2000 micro-dollars
        assert [r.cost_micros for r in small] == [2000, 1000]
        for r in recs:
            assert r.operation == "embeddings" and r.outcome is Outcome.SUCCESS
            assert r.provider == "openai" and r.output_tokens == 0 and r.tier == 1
            assert r.max_tokens is None and r.finish_reasons == [] and r.ttft_ms is None
            assert not r.tokens_estimated and not r.privacy
        assert {r.user for r in small} == {"alice"}
        assert small[0].attributes == {"purpose": "index"}
        assert recs[-1].cost_micros == 6500  # 50k tokens at $0.13 per million
        usage = await acc.budgets.usage(budget.id)
        assert usage.spent_micros == 2000 + 1000 + 6500 and usage.reserved_micros == 0
    finally:
        await acc.aclose()


async def test_a_budget_that_cannot_cover_the_worst_case_refuses_before_sending(
        tmp_path: Path) -> None:
    async with WireServer() as server:
        settings = openai_settings(tmp_path, server)
        acc = await open_accounting(settings)
        try:
            # worst case for 200 bytes: 204 tokens at $0.02 per million = 4.08 -> 5 micro-$
            budget = await acc.budgets.create(BudgetSpec(
                scope=Scope.USER, scope_id="bob", period=Period.DAILY, limit_micros=4))
            async with Gateway(settings, accounting=acc) as gw:
                emb = GatewayEmbedder(gw, "openai/text-embedding-3-small",
                                      metadata={"user": "bob"})
                with pytest.raises(BudgetExceeded) as info:
                    await emb.embed(["x" * 200])
                assert info.value.requested_micros == 5
                assert server.connections_opened == 0
                # a small batch fits: 4 bytes + 4 is 8 tokens at most, 0.16 -> 1 micro-$
                body = openai_body(["tiny"])
                body["usage"] = {"prompt_tokens": 2, "total_tokens": 2}
                server.enqueue(ScriptedResponse.json(body))
                ok = await emb.embed(["tiny"])
                assert ok.shape == (1, 8)
            recs = await records(acc)
            assert [(r.outcome, r.error_type) for r in recs] == [
                (Outcome.ERROR, "budget_exceeded"), (Outcome.SUCCESS, None)]
            assert recs[0].provider is None and recs[0].input_tokens == 0
            assert recs[0].request_model == "openai/text-embedding-3-small"
            assert recs[1].input_tokens == 2 and recs[1].cost_micros == 1  # 0.04 rounds up
            usage = await acc.budgets.usage(budget.id)
            assert usage.spent_micros == 1 and usage.reserved_micros == 0
        finally:
            await acc.aclose()


@pytest.mark.parametrize("how", ["privacy_mode", "request"])
async def test_privacy_refuses_a_cloud_embedding_model_without_connecting(
        tmp_path: Path, openai_server: WireServer, how: str) -> None:
    settings = openai_settings(tmp_path, openai_server, privacy_mode=how == "privacy_mode")
    acc = await open_accounting(settings)
    try:
        async with Gateway(settings, accounting=acc) as gw:
            emb = GatewayEmbedder(gw, "openai:text-embedding-3-small",
                                  privacy=True if how == "request" else None)
            with pytest.raises(PrivacyViolation, match="cloud model") as info:
                await emb.embed(["private text"])
            assert KEY not in str(info.value)
        assert openai_server.connections_opened == 0
        (rec,) = await records(acc)
        assert rec.outcome is Outcome.ERROR and rec.error_type == "privacy_violation"
        assert rec.privacy and rec.operation == "embeddings" and rec.cost_micros == 0
    finally:
        await acc.aclose()


async def test_provider_errors_are_normalised_recorded_and_never_show_the_key(
        tmp_path: Path) -> None:
    async with WireServer() as server:
        settings = openai_settings(tmp_path, server)
        acc = await open_accounting(settings)
        try:
            async with Gateway(settings, accounting=acc) as gw:
                emb = GatewayEmbedder(gw, "openai:text-embedding-3-small")
                server.enqueue(ScriptedResponse.json(
                    {"error": {"message": f"bad key {KEY}", "type": "invalid_request_error"}},
                    status=401))
                with pytest.raises(AuthenticationFailed) as info:
                    await emb.embed(["x"])
                assert KEY not in str(info.value) and KEY[-8:] not in str(info.value)
                assert "OPENAI_API_KEY" in (info.value.hint or "")
                server.enqueue(ScriptedResponse.json(
                    {"error": {"message": "slow down"}}, status=429,
                    headers={"retry-after": "3"}))
                with pytest.raises(RateLimited) as limited:
                    await emb.embed(["x"])
                assert limited.value.retry_after == pytest.approx(3)
                server.enqueue(ScriptedResponse.json(
                    {"object": "list", "data": [{"index": 0, "embedding": [0.1, 0.2]}],
                     "model": "m"}))
                with pytest.raises(MalformedResponse, match="1 embeddings for 2 inputs"):
                    await emb.embed(["x", "y"])
            recs = await records(acc)
            assert [r.error_type for r in recs] == [
                "authentication_failed", "rate_limited", "malformed_response"]
            assert all(r.outcome is Outcome.ERROR and r.cost_micros == 0 for r in recs)
            assert all(KEY not in r.model_dump_json() for r in recs)
        finally:
            await acc.aclose()


async def test_a_rate_limited_batch_is_retried_by_the_router_and_recorded_once(
        tmp_path: Path) -> None:
    async with WireServer() as server:
        settings = openai_settings(tmp_path, server,
                                   routing={"max_retries": 2, "backoff_base": 0.001})
        acc = await open_accounting(settings)
        try:
            server.enqueue(
                ScriptedResponse.json({"error": {"message": "slow down"}}, status=429,
                                      headers={"retry-after-ms": "10"}),
                ScriptedResponse.json(openai_body(["again"])))
            async with Gateway(settings, accounting=acc) as gw:
                v = await GatewayEmbedder(gw, "openai:text-embedding-3-small").embed(["again"])
            assert np.allclose(v, normalise(np.array([fake_vector("again")])), atol=1e-5)
            assert len(server.requests) == 2
            (rec,) = await records(acc)
            assert rec.outcome is Outcome.SUCCESS and rec.input_tokens == TOKENS_PER_INPUT
        finally:
            await acc.aclose()


async def test_missing_usage_is_estimated_and_marked(tmp_path: Path) -> None:
    async with WireServer() as server:
        settings = openai_settings(tmp_path, server)
        body = openai_body(["a" * 40, "b" * 8])
        del body["usage"]
        server.enqueue(ScriptedResponse.json(body))
        async with Gateway(settings) as gw:
            resp = await gw.embed(EmbedRequest(model="openai:text-embedding-3-small",
                                               inputs=["a" * 40, "b" * 8]))
        assert resp.usage.estimated and resp.usage.input_tokens == 10 + 2
        assert resp.usage.output_tokens == 0


# --- remote models through the gateway: Ollama wire format -----------------------------------


async def test_ollama_embeddings_speak_api_embed_and_record_prompt_eval_count(
        tmp_path: Path) -> None:
    async with WireServer(handler=ollama_handler) as server:
        # privacy mode: Ollama is a local provider, so it is allowed (loopback address)
        settings = make_settings(tmp_path, ollama_host=server.url, privacy_mode=True,
                                 rag={"embedder": "ollama:nomic-embed-text"})
        acc = await open_accounting(settings)
        try:
            async with Gateway(settings, accounting=acc) as gw:
                emb = build_embedder(settings, gateway=gw, cache=False)
                assert isinstance(emb, GatewayEmbedder) and emb.gateway is gw
                counted = await emb.embed(["count a b", "c d"])
                guessed = await emb.embed(["twelve chars"])
                await emb.aclose()
            recs = await records(acc)
        finally:
            await acc.aclose()
        assert counted.shape == (2, 6) and guessed.shape == (1, 6)
        assert np.allclose(counted, normalise(np.array(
            [fake_vector("count a b", 6), fake_vector("c d", 6)])), atol=1e-5)
        req = server.requests[0]
        assert req.path == "/api/embed"
        assert req.json["model"] == "nomic-embed-text"
        assert json.loads(req.body)["input"] == ["count a b", "c d"]
    assert [(r.input_tokens, r.tokens_estimated) for r in recs] == [(7, False), (3, True)]
    assert all(r.provider == "ollama" and r.cost_micros == 0 and r.privacy for r in recs)
    assert {r.response_model for r in recs} == {"ollama/nomic-embed-text"}


@pytest.fixture
def nomic_settings(tmp_path: Path):
    return make_settings(tmp_path, ollama_host="http://127.0.0.1:9",
                         rag={"embedder": "ollama:nomic-embed-text"})


# --- the catalog and routing ----------------------------------------------------------------


async def test_chat_routing_never_picks_an_embedding_model(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, openai_api_key=KEY, ollama_host="http://127.0.0.1:9")
    kinds = {m.kind for m in settings.catalog.models.values()}
    assert "embedding" in kinds
    async with Gateway(settings) as gw:
        for tier in range(4):
            plan = gw.router.plan(ChatRequest(messages=[Message.user("hi")], tier=tier))
            assert plan.candidates and all(m.kind != "embedding" for m in plan.candidates)
        with pytest.raises(InvalidRequest, match="is an embedding model"):
            gw.router.plan(ChatRequest(messages=[Message.user("hi")],
                                       model="openai/text-embedding-3-small"))
        with pytest.raises(InvalidRequest, match="not an embedding model"):
            await gw.embed(EmbedRequest(model="openai/gpt-5-nano", inputs=["x"]))
        with pytest.raises(ModelNotFound, match="no embedding model 'ada-9'"):
            await gw.embed(EmbedRequest(model="openai:ada-9", inputs=["x"]))


def test_embed_request_needs_inputs() -> None:
    with pytest.raises(ValueError, match="inputs must not be empty"):
        EmbedRequest(model="openai/text-embedding-3-small", inputs=[])


def test_catalog_refuses_an_embedding_model_on_a_provider_without_the_api(
        tmp_path: Path) -> None:
    extra = tmp_path / "catalog.yaml"
    extra.write_text("models:\n  - {name: anthropic/embed, provider: anthropic, id: e, tier: 1,"
                     " kind: embedding, price: {input: 1, output: 0}}\n")
    settings = make_settings(tmp_path, catalog_file=extra)
    with pytest.raises(ConfigError, match=r"'anthropic' \(anthropic\) has no embeddings API"):
        _ = settings.catalog


async def test_the_anthropic_provider_has_no_embeddings_api(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, anthropic_api_key="sk-ant-test")
    provider = AnthropicProvider(ProviderSpec(name="anthropic", type="anthropic",
                                              base_url="http://127.0.0.1:9"), settings)
    model = ModelSpec(name="anthropic/x", provider="anthropic", id="x", tier=1)
    with pytest.raises(BadProviderRequest, match="has no embeddings API") as info:
        await provider.embed(model, EmbedRequest(model="anthropic/x", inputs=["t"]),
                             privacy=False)
    assert not info.value.retryable and "openai" in (info.value.hint or "")


def test_an_unlisted_model_of_a_local_provider_is_added_at_price_zero(tmp_path: Path) -> None:
    catalog = make_settings(tmp_path).catalog
    spec = catalog.embedding_model("jan:bge-small")
    assert (spec.name, spec.kind, spec.local, spec.price.input) == (
        "jan:bge-small", "embedding", True, 0)
    assert catalog.embedding_model("jan:bge-small") is spec
    assert catalog.embedding_model("openai:text-embedding-3-small").name == \
        "openai/text-embedding-3-small"


# --- construction and privacy ----------------------------------------------------------------


def test_build_embedder_from_settings(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    emb = build_embedder(settings)
    assert isinstance(emb, CachedEmbedder) and isinstance(emb.inner, LocalEmbedder)
    assert emb.cache.path == tmp_path / "data" / "rag" / "embeddings.sqlite"
    emb.cache.close()
    plain = build_embedder(settings, cache=False)
    assert isinstance(plain, LocalEmbedder)


async def test_build_embedder_makes_a_gateway_when_given_none(nomic_settings) -> None:
    emb = build_embedder(nomic_settings)
    assert isinstance(emb, CachedEmbedder) and isinstance(emb.inner, GatewayEmbedder)
    assert emb.name == "ollama:nomic-embed-text" and emb.dim == 768
    await emb.aclose()  # closes the cache and the gateway it made


@pytest.mark.parametrize(("spec", "error", "message"), [
    ("bogus", ConfigError, "is not `local` or `<provider>:<model>`"),
    ("nowhere:model", ConfigError, "unknown provider 'nowhere'"),
    ("anthropic:claude", ConfigError, "has no embeddings API"),
    ("openai:gpt-5-nano", ConfigError, "is a chat model, not an embedding model"),
    ("openai:text-embedding-ada-002", ModelNotFound, "no embedding model"),
])
def test_build_embedder_refuses_bad_specs(tmp_path: Path, spec: str, error: type,
                                          message: str) -> None:
    settings = make_settings(tmp_path, rag={"embedder": spec},
                             anthropic_api_key="sk-ant-test", openai_api_key="sk-test")
    with pytest.raises(error, match=message):
        build_embedder(settings)


async def test_privacy_mode_guards_a_local_provider_pointing_off_the_machine(
        tmp_path: Path) -> None:
    # "jan" is local in the catalog; its URL here is a public address, which the guarded
    # client must refuse before any socket opens.
    settings = make_settings(tmp_path, privacy_mode=True, jan_base_url="http://93.184.216.34:9/v1",
                             rag={"embedder": "jan:some-model", "embedding_cache": False})
    emb = build_embedder(settings)
    try:
        with pytest.raises(PrivacyViolation, match=r"93\.184\.216\.34"):
            await emb.embed(["private text"])
    finally:
        await emb.aclose()


async def test_a_rag_folder_embeds_through_the_gateway_it_is_given(tmp_path: Path) -> None:
    from conclave.rag.pipeline import Rag

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Backups\n\nBackups run nightly and are kept for a month.\n")
    # a catalog entry of the loopback's vector size (the real model's 1536 would not fit)
    extra = tmp_path / "catalog.yaml"
    extra.write_text("models:\n  - {name: openai/tiny-embed, provider: openai, id: tiny-embed,"
                     " tier: 1, kind: embedding, dimensions: 8,"
                     " price: {input: 0.02, output: 0}}\n")
    async with WireServer(handler=openai_handler) as server:
        settings = openai_settings(tmp_path, server, catalog_file=extra,
                                   rag={"embedder": "openai:tiny-embed"})
        acc = await open_accounting(settings)
        try:
            async with Gateway(settings, accounting=acc) as gw:
                rag = await Rag.open(settings, folder=docs, gateway=gw)
                try:
                    report = await rag.sync()
                    hits = await rag.search("backups", k=1, mode="dense")
                finally:
                    await rag.aclose()
                assert rag.gateway is gw
                # the Rag did not close the gateway it was given
                await gw.embed(EmbedRequest(model="openai/tiny-embed", inputs=["still open"]))
            recs = await records(acc)
        finally:
            await acc.aclose()
    assert report.chunks_embedded >= 1 and hits
    assert len(recs) == len(server.requests) >= 3  # the chunks, the query, the last call
    assert all(r.operation == "embeddings" and r.outcome is Outcome.SUCCESS for r in recs)
    assert sum(r.cost_micros for r in recs) == sum(
        math.ceil(r.input_tokens * 0.02) for r in recs)
