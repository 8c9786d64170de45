"""Embedders: the real MiniLM on the CPU, the on-disk cache, and the two remote wire formats.

The OpenAI-compatible and Ollama embedders talk to :class:`WireServer`, a
loopback server that answers ``POST /v1/embeddings`` and ``POST /api/embed``
with the documented JSON, so the real SDKs send real HTTP.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from conclave.errors import (
    AuthenticationFailed,
    ConfigError,
    MalformedResponse,
    PrivacyViolation,
    RateLimited,
)
from conclave.rag.embeddings import (
    CachedEmbedder,
    EmbeddingCache,
    LocalEmbedder,
    OllamaEmbedder,
    OpenAIEmbedder,
    build_embedder,
    normalise,
)
from tests.support.settings import make_settings
from tests.support.wire_server import RecordedRequest, ScriptedResponse, WireServer


@pytest.fixture(scope="module")
def local() -> LocalEmbedder:
    return LocalEmbedder()


def fake_vector(text: str, dim: int = 8) -> list[float]:
    """What the loopback 'provider' returns: a deterministic vector per text."""
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    return rng.normal(size=dim).round(6).tolist()


def openai_handler(req: RecordedRequest) -> ScriptedResponse:
    body = req.json
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = [{"object": "embedding", "index": i, "embedding": fake_vector(t)}
            for i, t in enumerate(inputs)]
    data.reverse()  # servers may answer out of order; the index field says where each goes
    return ScriptedResponse.json({"object": "list", "data": data, "model": body["model"],
                                  "usage": {"prompt_tokens": 3, "total_tokens": 3}})


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


# --- OpenAI-compatible ----------------------------------------------------------------------


async def test_openai_embedder_speaks_the_wire_format() -> None:
    async with WireServer(handler=openai_handler) as server:
        emb = OpenAIEmbedder(base_url=f"{server.url}/v1", model="text-embedding-3-small",
                             api_key="sk-test-key-0123456789", batch_size=2)
        try:
            v = await emb.embed(["one", "two", "three"])
        finally:
            await emb.aclose()
    assert v.shape == (3, 8) and emb.dim == 8
    expected = normalise(np.array([fake_vector(t) for t in ("one", "two", "three")]))
    assert np.allclose(v, expected, atol=1e-5)
    assert [r.path for r in server.requests] == ["/v1/embeddings", "/v1/embeddings"]
    first = server.requests[0]
    assert first.json == {"model": "text-embedding-3-small", "input": ["one", "two"],
                          "encoding_format": "float"}
    assert first.headers["authorization"] == "Bearer sk-test-key-0123456789"


async def test_openai_embedder_errors_are_normalised_and_never_show_the_key() -> None:
    async with WireServer() as server:
        key = "sk-secret-value-abcdefghijkl"
        emb = OpenAIEmbedder(base_url=f"{server.url}/v1", model="m", api_key=key,
                             api_key_env="UP_API_KEY")
        try:
            server.enqueue(ScriptedResponse.json(
                {"error": {"message": f"bad key {key}", "type": "invalid_request_error"}},
                status=401))
            with pytest.raises(AuthenticationFailed) as info:
                await emb.embed(["x"])
            assert key not in str(info.value) and key[-8:] not in str(info.value)
            server.enqueue(ScriptedResponse.json(
                {"error": {"message": "slow down"}}, status=429, headers={"retry-after": "3"}))
            with pytest.raises(RateLimited) as limited:
                await emb.embed(["x"])
            assert limited.value.retry_after == pytest.approx(3)
            server.enqueue(ScriptedResponse.json(
                {"object": "list", "data": [{"index": 0, "embedding": [0.1, 0.2]}],
                 "model": "m"}))
            with pytest.raises(MalformedResponse, match="1 embeddings for 2 inputs"):
                await emb.embed(["x", "y"])
        finally:
            await emb.aclose()


# --- Ollama ---------------------------------------------------------------------------------


async def test_ollama_embedder_speaks_the_wire_format() -> None:
    def handler(req: RecordedRequest) -> ScriptedResponse:
        body = req.json
        return ScriptedResponse.json({"model": body["model"],
                                      "embeddings": [fake_vector(t, 6) for t in body["input"]]})

    async with WireServer(handler=handler) as server:
        emb = OllamaEmbedder(host=server.url, model="nomic-embed-text")
        try:
            v = await emb.embed(["a b", "c d"])
        finally:
            await emb.aclose()
    assert v.shape == (2, 6)
    assert np.allclose(v, normalise(np.array([fake_vector("a b", 6), fake_vector("c d", 6)])),
                       atol=1e-5)
    req = server.requests[0]
    assert req.path == "/api/embed"
    assert json.loads(req.body)["input"] == ["a b", "c d"]


# --- construction and privacy ----------------------------------------------------------------


def test_build_embedder_from_settings(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    emb = build_embedder(settings)
    assert isinstance(emb, CachedEmbedder) and isinstance(emb.inner, LocalEmbedder)
    assert emb.cache.path == tmp_path / "data" / "rag" / "embeddings.sqlite"
    emb.cache.close()
    plain = build_embedder(settings, cache=False)
    assert isinstance(plain, LocalEmbedder)


@pytest.mark.parametrize(("spec", "message"), [
    ("bogus", "is not `local` or `<provider>:<model>`"),
    ("nowhere:model", "unknown provider 'nowhere'"),
    ("anthropic:claude", "has no embeddings API"),
])
def test_build_embedder_refuses_bad_specs(tmp_path: Path, spec: str, message: str) -> None:
    settings = make_settings(tmp_path, rag={"embedder": spec},
                             anthropic_api_key="sk-ant-test")
    with pytest.raises(ConfigError, match=message):
        build_embedder(settings)


def test_privacy_mode_refuses_a_cloud_embedding_provider(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, privacy_mode=True, openai_api_key="sk-test",
                             rag={"embedder": "openai:text-embedding-3-small"})
    with pytest.raises(PrivacyViolation, match="refuses the embedding provider 'openai'"):
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
