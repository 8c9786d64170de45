"""The three providers against a loopback server speaking each documented wire protocol.

Nothing is mocked: the real SDKs send real HTTP to :class:`WireServer`, which
answers with the bytes the providers document (OpenAI SSE with ``[DONE]``,
Anthropic named SSE events, Ollama NDJSON) or with the failures seen in
practice (429 with Retry-After, an error event after HTTP 200, a connection
reset mid-stream, a client that hangs up).
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from conclave.config import ModelSpec, ProviderSpec, Settings
from conclave.errors import (
    AuthenticationFailed,
    BadProviderRequest,
    ConfigError,
    ConnectionLost,
    ContextTooLong,
    MalformedResponse,
    MissingCredentials,
    Overloaded,
    PrivacyViolation,
    ProviderError,
    ProviderTimeout,
    RateLimited,
)
from conclave.llm.prompts import BASE_STOPS, completion_prompt
from conclave.llm.providers import (
    AnthropicProvider,
    OllamaProvider,
    OpenAICompatProvider,
    Provider,
    build_provider,
)
from conclave.llm.providers._errors import parse_retry_after
from conclave.llm.types import (
    ChatRequest,
    Message,
    ResponseFormat,
    Role,
    StopReason,
    StreamChunk,
    ToolCall,
    ToolSpec,
)
from tests.support.wire_server import (
    Piece,
    ScriptedResponse,
    WireServer,
    ndjson_line,
    sse_event,
)

OPENAI_KEY = "sk-test-openai-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-test-0123456789abcdef"
TOGETHER_KEY = "tgp_v1_test0123456789abcdef"

WEATHER_TOOL = ToolSpec(
    name="get_weather",
    description="Current weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]},
)
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}},
          "required": ["answer"]}


# --- fixtures and helpers -------------------------------------------------------------


@pytest_asyncio.fixture
async def server() -> AsyncIterator[WireServer]:
    async with WireServer() as s:
        yield s


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "openai_api_key": OPENAI_KEY,
        "anthropic_api_key": ANTHROPIC_KEY,
        "together_api_key": TOGETHER_KEY,
        "data_dir": tmp_path / "data",
        "routing": {"request_timeout": 5.0, "connect_timeout": 2.0},
    }
    values.update(overrides)
    return Settings(**values)


def openai_provider(server: WireServer, tmp_path: Path, *, name: str = "openai",
                    key_env: str | None = "OPENAI_API_KEY", local: bool = False,
                    **settings: Any) -> OpenAICompatProvider:
    spec = ProviderSpec(name=name, type="openai", base_url=f"{server.url}/v1",
                        api_key_env=key_env, local=local)
    provider = build_provider(spec, make_settings(tmp_path, **settings))
    assert isinstance(provider, OpenAICompatProvider)
    return provider


def anthropic_provider(server: WireServer, tmp_path: Path) -> AnthropicProvider:
    spec = ProviderSpec(name="anthropic", type="anthropic", base_url=server.url,
                        api_key_env="ANTHROPIC_API_KEY")
    provider = build_provider(spec, make_settings(tmp_path))
    assert isinstance(provider, AnthropicProvider)
    return provider


def ollama_provider(server: WireServer, tmp_path: Path) -> OllamaProvider:
    spec = ProviderSpec(name="ollama", type="ollama", base_url=server.url, local=True)
    provider = build_provider(spec, make_settings(tmp_path))
    assert isinstance(provider, OllamaProvider)
    return provider


def chat_model(provider: str = "openai", model_id: str = "gpt-test") -> ModelSpec:
    return ModelSpec(name=f"{provider}/test", provider=provider, id=model_id, tier=1)


def base_model(provider: str = "llamacpp") -> ModelSpec:
    return ModelSpec(name="local/base", provider=provider, id="gemma-3-270m", tier=0,
                     kind="base", supports_tools=False)


def ask(text: str = "What is the capital of France?", **kwargs: Any) -> ChatRequest:
    kwargs.setdefault("max_tokens", 32)
    return ChatRequest(messages=[Message.user(text)], **kwargs)


async def collect(provider: Provider, model: ModelSpec, request: ChatRequest,
                  privacy: bool = False) -> list[StreamChunk]:
    return [c async for c in provider.stream(model, request, privacy=privacy)]


async def collect_until_error(provider: Provider, model: ModelSpec, request: ChatRequest,
                              ) -> tuple[list[StreamChunk], BaseException]:
    chunks: list[StreamChunk] = []
    try:
        async for chunk in provider.stream(model, request, privacy=False):
            chunks.append(chunk)
    except Exception as exc:
        return chunks, exc
    raise AssertionError(f"the stream ended without an error after {chunks}")


def text_of(chunks: list[StreamChunk]) -> str:
    return "".join(c.delta for c in chunks)


# --- OpenAI wire format ---------------------------------------------------------------


def oa_chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
             usage: dict[str, Any] | None = None, *, choices: bool = True) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
        "model": "gpt-test",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
        if choices else [],
    }
    if usage is not None:
        body["usage"] = usage
    return sse_event(body)


def oa_usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def oa_error(message: str, etype: str, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


DONE = sse_event("[DONE]")


async def test_openai_chat_complete(server: WireServer, tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.json({
        "id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "gpt-test",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Paris."}}],
        "usage": oa_usage(12, 5, cached=4),
    }))
    provider = openai_provider(server, tmp_path)
    request = ChatRequest(messages=[Message.system("Be brief."), Message.user("Capital?")],
                          max_tokens=32, temperature=0.2, stop=["\n\n"], seed=7)
    resp = await provider.complete(chat_model(), request, privacy=False)

    assert resp.text == "Paris."
    assert resp.stop_reason is StopReason.STOP
    assert (resp.usage.input_tokens, resp.usage.output_tokens,
            resp.usage.cached_input_tokens) == (12, 5, 4)
    assert (resp.provider, resp.model, resp.id) == ("openai", "openai/test", "chatcmpl-9")
    [req] = server.requests
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    body = req.json
    assert body["model"] == "gpt-test"
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Capital?"}]
    # OpenAI itself gets max_completion_tokens (its reasoning models reject max_tokens)
    assert body["max_completion_tokens"] == 32 and "max_tokens" not in body
    assert (body["temperature"], body["stop"], body["seed"]) == (0.2, ["\n\n"], 7)
    assert "stream" not in body
    await provider.aclose()


async def test_openai_sse_stream_with_usage_chunk(server: WireServer, tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.sse([
        oa_chunk({"role": "assistant", "content": ""}),
        oa_chunk({"content": "Hel"}),
        oa_chunk({"content": "lo"}),
        oa_chunk({}, finish="stop"),
        oa_chunk(usage=oa_usage(9, 2, cached=3), choices=False),
        DONE,
    ], delay=0.01))
    provider = openai_provider(server, tmp_path)
    chunks = await collect(provider, chat_model(), ask())

    assert [c.delta for c in chunks if c.delta] == ["Hel", "lo"]
    final = chunks[-1]
    assert final.stop_reason is StopReason.STOP
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens,
            final.usage.cached_input_tokens) == (9, 2, 3)
    body = server.requests[0].json
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    await provider.aclose()


async def test_openai_tool_call_deltas_accumulate(server: WireServer, tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.sse([
        oa_chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}),
        oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Par'}}]}),
        oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]}),
        oa_chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                  "function": {"name": "get_weather", "arguments": '{"city":'}}]}),
        oa_chunk({}, finish="tool_calls"),
        oa_chunk(usage=oa_usage(30, 12), choices=False),
        DONE,
    ]))
    provider = openai_provider(server, tmp_path)
    request = ask("Weather in Paris?", tools=[WEATHER_TOOL], tool_choice="get_weather")
    chunks = await collect(provider, chat_model(), request)

    final = chunks[-1]
    assert final.stop_reason is StopReason.TOOL_CALLS
    good, bad = final.tool_calls
    assert (good.id, good.name, good.arguments, good.raw_arguments) == (
        "call_a", "get_weather", {"city": "Paris"}, None)
    # broken JSON from the model is kept raw, not silently dropped
    assert (bad.id, bad.arguments, bad.raw_arguments) == ("call_b", {}, '{"city":')
    body = server.requests[0].json
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": WEATHER_TOOL.parameters}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    await provider.aclose()


async def test_openai_tool_history_and_json_schema_shape(server: WireServer,
                                                         tmp_path: Path) -> None:
    """A compatible server (not OpenAI itself) gets max_tokens; history round-trips."""
    server.enqueue(ScriptedResponse.json({
        "id": "x", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": '{"answer": "Paris"}'}}],
        "usage": oa_usage(40, 6),
    }))
    provider = openai_provider(server, tmp_path, name="together", key_env="TOGETHER_API_KEY")
    call = ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris"})
    request = ChatRequest(
        messages=[
            Message.user("Weather?"),
            Message(role=Role.ASSISTANT, content=None, tool_calls=[call]),
            Message(role=Role.TOOL, content="sunny", tool_call_id="call_1", name="get_weather"),
        ],
        max_tokens=64,
        response_format=ResponseFormat(type="json_schema", name="reply", schema=SCHEMA),
    )
    resp = await provider.complete(chat_model("together"), request, privacy=False)

    assert resp.text == '{"answer": "Paris"}'
    req = server.requests[0]
    assert req.headers["authorization"] == f"Bearer {TOGETHER_KEY}"
    body = req.json
    assert body["max_tokens"] == 64 and "max_completion_tokens" not in body
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "reply", "schema": SCHEMA}}
    assert body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    await provider.aclose()


async def test_base_model_completions_request_shape(server: WireServer, tmp_path: Path) -> None:
    completion = {"id": "cmpl-1", "object": "text_completion", "created": 1,
                  "model": "gemma-3-270m",
                  "choices": [{"index": 0, "text": " Paris", "finish_reason": "stop",
                               "logprobs": None}],
                  "usage": oa_usage(20, 2, cached=0)}
    server.enqueue(ScriptedResponse.json(completion), ScriptedResponse.json(completion))
    provider = openai_provider(server, tmp_path, name="llamacpp", key_env=None, local=True)
    messages = [Message.system("You answer geography questions."),
                Message.user("What is the capital of France?")]
    plain = ChatRequest(messages=messages, max_tokens=16, stop=["END"])
    resp = await provider.complete(base_model(), plain, privacy=True)
    assert resp.text == " Paris"
    assert resp.usage.input_tokens == 20

    constrained = ChatRequest(messages=messages, max_tokens=16, stop=["END"],
                              response_format=ResponseFormat(type="json_schema",
                                                             schema=SCHEMA))
    await provider.complete(base_model(), constrained, privacy=True)

    first, second = server.requests
    assert first.path == "/v1/completions"
    # a local server without a key still gets a syntactically valid one
    assert first.headers["authorization"] == "Bearer sk-no-key"
    prompt, stops = completion_prompt(messages)
    assert first.json["prompt"] == prompt
    assert first.json["stop"] == [*BASE_STOPS, "END"]
    assert first.json["max_tokens"] == 16
    assert "json_schema" not in first.json
    # with a schema: llama.cpp's json_schema field, and no Q/A stops that could cut the JSON
    assert second.json["json_schema"] == SCHEMA
    assert second.json["stop"] == ["END"]
    assert "response_format" not in second.json
    assert stops == BASE_STOPS
    await provider.aclose()


@pytest.mark.skipif("prompt" not in ChatRequest.model_fields,
                    reason="ChatRequest has no raw prompt field in this tree")
async def test_base_model_raw_prompt_is_sent_as_is(server: WireServer, tmp_path: Path) -> None:
    body = {"id": "c", "object": "text_completion", "created": 1, "model": "g",
            "choices": [{"index": 0, "text": " 4", "finish_reason": "stop", "logprobs": None}],
            "usage": oa_usage(5, 1)}
    server.enqueue(ScriptedResponse.json(body))
    provider = openai_provider(server, tmp_path, name="llamacpp", key_env=None, local=True)
    request = ChatRequest(messages=[Message.user("2+2=")], prompt="2+2=", max_tokens=4,
                          stop=[";"])
    assert (await provider.complete(base_model(), request, privacy=True)).text == " 4"
    sent = server.requests[0].json
    assert (sent["prompt"], sent["stop"]) == ("2+2=", [";"])
    await provider.aclose()


async def test_base_model_stream(server: WireServer, tmp_path: Path) -> None:
    def piece(text: str, finish: str | None = None, usage: dict[str, Any] | None = None
              ) -> bytes:
        body: dict[str, Any] = {"id": "cmpl-2", "object": "text_completion", "created": 1,
                                "model": "gemma",
                                "choices": [{"index": 0, "text": text, "logprobs": None,
                                             "finish_reason": finish}]}
        if usage:
            body["usage"] = usage
        return sse_event(body)

    server.enqueue(ScriptedResponse.sse([
        piece(" Par"), piece("is"), piece("", "length", oa_usage(18, 2)), DONE]))
    provider = openai_provider(server, tmp_path, name="llamacpp", key_env=None, local=True)
    chunks = await collect(provider, base_model(), ask(), privacy=True)
    assert text_of(chunks) == " Paris"
    assert chunks[-1].stop_reason is StopReason.LENGTH
    assert chunks[-1].usage is not None and chunks[-1].usage.output_tokens == 2
    assert server.requests[0].path == "/v1/completions"
    assert server.requests[0].json["stream"] is True
    await provider.aclose()


async def test_base_url_resolver_is_awaited_per_request(server: WireServer,
                                                        tmp_path: Path) -> None:
    calls = 0

    async def resolver() -> str:
        nonlocal calls
        calls += 1
        return f"{server.url}/v1"

    spec = ProviderSpec(name="llamacpp", type="openai", local=True, managed=True)
    provider = build_provider(spec, make_settings(tmp_path), base_url_resolver=resolver)
    body = {"id": "c", "object": "text_completion", "created": 1, "model": "g",
            "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
            "usage": oa_usage(1, 1)}
    server.enqueue(ScriptedResponse.json(body), ScriptedResponse.json(body))
    for _ in range(2):
        assert (await provider.complete(base_model(), ask(), privacy=True)).text == "ok"
    assert calls == 2
    # without a resolver the managed provider has no URL: a clear config error
    with pytest.raises(ConfigError, match="no base URL"):
        await build_provider(spec, make_settings(tmp_path)).complete(
            base_model(), ask(), privacy=True)
    await provider.aclose()


async def test_managed_server_moving_port_is_followed(server: WireServer,
                                                      tmp_path: Path) -> None:
    """A restarted managed server comes back on another port: requests follow it."""
    body = {"id": "c", "object": "text_completion", "created": 1, "model": "g",
            "choices": [{"index": 0, "text": "one", "finish_reason": "stop", "logprobs": None}],
            "usage": oa_usage(1, 1)}
    async with WireServer() as second:
        urls = [f"{server.url}/v1", f"{second.url}/v1"]

        async def resolver() -> str:
            return urls[0] if not server.requests else urls[1]

        server.enqueue(ScriptedResponse.json(body))
        second.enqueue(ScriptedResponse.json(body | {"choices": [
            {"index": 0, "text": "two", "finish_reason": "stop", "logprobs": None}]}))
        spec = ProviderSpec(name="llamacpp", type="openai", local=True, managed=True)
        provider = build_provider(spec, make_settings(tmp_path), base_url_resolver=resolver)
        assert (await provider.complete(base_model(), ask(), privacy=True)).text == "one"
        assert (await provider.complete(base_model(), ask(), privacy=True)).text == "two"
        assert len(server.requests) == 1 and len(second.requests) == 1
        await provider.aclose()


async def test_openai_429_retry_after(server: WireServer, tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.json(
        oa_error("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
        status=429, headers={"Retry-After": "7"}))
    provider = openai_provider(server, tmp_path)
    with pytest.raises(RateLimited) as info:
        await provider.complete(chat_model(), ask(), privacy=False)
    err = info.value
    assert err.retry_after == 7
    assert (err.status_code, err.provider, err.retryable) == (429, "openai", True)
    # the SDK must not retry on its own: exactly one request reached the server
    assert len(server.requests) == 1
    await provider.aclose()


def test_parse_retry_after_forms() -> None:
    now = time.time()
    http_date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"Retry-After": "7"}) == 7
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert 28 <= (parse_retry_after({"Retry-After": http_date}, now=now) or 0) <= 31
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


async def test_openai_401_names_the_variable_not_the_key(server: WireServer,
                                                         tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.json(oa_error(
        f"Incorrect API key provided: {OPENAI_KEY}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.", "invalid_request_error",
        "invalid_api_key"), status=401))
    provider = openai_provider(server, tmp_path)
    with pytest.raises(AuthenticationFailed) as info:
        await provider.complete(chat_model(), ask(), privacy=False)
    text = str(info.value)
    assert OPENAI_KEY not in text and OPENAI_KEY[-8:] not in text
    assert "OPENAI_API_KEY" in text
    assert info.value.status_code == 401
    await provider.aclose()


@pytest.mark.parametrize("status,body", [
    (400, oa_error("This model's maximum context length is 8192 tokens. However, your "
                   "messages resulted in 9001 tokens.", "invalid_request_error",
                   "context_length_exceeded")),
    # llama.cpp's server: integer code, its own error type
    (400, {"error": {"code": 400, "type": "exceed_context_size_error",
                     "message": "request (5000 tokens) exceeds the available context size "
                                "(4096 tokens), try increasing it",
                     "n_prompt_tokens": 5000, "n_ctx": 4096}}),
])
async def test_context_too_long(server: WireServer, tmp_path: Path, status: int,
                                body: dict[str, Any]) -> None:
    server.enqueue(ScriptedResponse.json(body, status=status))
    provider = openai_provider(server, tmp_path)
    with pytest.raises(ContextTooLong) as info:
        await provider.complete(chat_model(), ask(), privacy=False)
    assert info.value.status_code == 400
    assert not info.value.retryable
    await provider.aclose()


async def test_llamacpp_error_inside_stream(server: WireServer, tmp_path: Path) -> None:
    """llama.cpp reports a failure after HTTP 200 as ``data: {"error": {...}}``."""
    server.enqueue(ScriptedResponse.sse([
        oa_chunk({"content": "Par"}),
        sse_event({"error": {"code": 500, "type": "server_error",
                             "message": "slot crashed"}}),
    ]))
    provider = openai_provider(server, tmp_path, name="llamacpp", key_env=None, local=True)
    chunks, err = await collect_until_error(provider, chat_model("llamacpp"), ask())
    assert text_of(chunks) == "Par"
    assert isinstance(err, Overloaded)
    assert "slot crashed" in str(err)
    assert err.partial_text == "Par"
    await provider.aclose()


@pytest.mark.parametrize("status,kind", [(500, Overloaded), (502, Overloaded),
                                         (503, Overloaded), (404, BadProviderRequest),
                                         (422, BadProviderRequest), (408, ProviderTimeout)])
async def test_openai_status_mapping(server: WireServer, tmp_path: Path, status: int,
                                     kind: type[ProviderError]) -> None:
    server.enqueue(ScriptedResponse.json(oa_error("upstream says no", "server_error"
                                                  if status >= 500 else "invalid_request"),
                                         status=status))
    provider = openai_provider(server, tmp_path)
    with pytest.raises(kind) as info:
        await provider.complete(chat_model(), ask(), privacy=False)
    assert info.value.status_code == status
    assert info.value.provider == "openai"
    await provider.aclose()


async def test_malformed_sse_data(server: WireServer, tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.sse([
        oa_chunk({"content": "Hi"}),
        b'data: {"id": "chatcmpl-1", "choices": [{"delta": \n\n',
        DONE,
    ]))
    provider = openai_provider(server, tmp_path)
    chunks, err = await collect_until_error(provider, chat_model(), ask())
    assert isinstance(err, MalformedResponse)
    assert text_of(chunks) == "Hi"
    assert err.provider == "openai"
    await provider.aclose()


async def test_connection_aborted_mid_stream(server: WireServer, tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.sse([
        oa_chunk({"content": "Hello"}),
        oa_chunk({"content": " wor"}),
        oa_chunk({"content": "ld"}),
        oa_chunk({}, finish="stop"),
        DONE,
    ], delay=0.02, abort_after=2))
    provider = openai_provider(server, tmp_path)
    chunks, err = await collect_until_error(provider, chat_model(), ask())
    assert isinstance(err, ConnectionLost)
    assert err.partial_text == "Hello wor" == text_of(chunks)
    assert err.retryable
    assert server.requests[0].aborted
    await provider.aclose()


async def test_stream_ending_without_finish_is_connection_lost(server: WireServer,
                                                               tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.sse([oa_chunk({"content": "Half an ans"})]))
    provider = openai_provider(server, tmp_path)
    _, err = await collect_until_error(provider, chat_model(), ask())
    assert isinstance(err, ConnectionLost)
    assert err.partial_text == "Half an ans"
    await provider.aclose()


async def test_closing_the_stream_disconnects_upstream(server: WireServer,
                                                       tmp_path: Path) -> None:
    pieces = [oa_chunk({"content": f"t{i} "}) for i in range(50)]
    server.enqueue(ScriptedResponse.sse([*pieces, oa_chunk({}, finish="stop"), DONE],
                                        delay=0.05))
    provider = openai_provider(server, tmp_path)
    stream = provider.stream(chat_model(), ask(), privacy=False)
    first = await anext(stream)
    assert first.delta == "t0 "
    await stream.aclose()
    req = server.requests[0]
    await req.wait_done(within=3)
    assert req.client_disconnected
    assert req.pieces_sent < 10
    await provider.aclose()


async def test_openai_timeout(server: WireServer, tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.sse([Piece(oa_chunk({"content": "late"}), delay=3.0)]))
    provider = openai_provider(server, tmp_path,
                               routing={"request_timeout": 0.3, "connect_timeout": 1.0})
    _, err = await collect_until_error(provider, chat_model(), ask())
    assert isinstance(err, ProviderTimeout)
    assert err.retryable
    await provider.aclose()


async def test_connection_refused(tmp_path: Path) -> None:
    async with WireServer() as closed:
        port = closed.port
    spec = ProviderSpec(name="jan", type="openai", base_url=f"http://127.0.0.1:{port}/v1",
                        local=True)
    provider = build_provider(spec, make_settings(tmp_path))
    with pytest.raises(ConnectionLost, match="cannot connect to jan"):
        await provider.complete(chat_model("jan"), ask(), privacy=True)
    await provider.aclose()


async def test_missing_key_names_the_variable(tmp_path: Path) -> None:
    spec = ProviderSpec(name="fireworks", type="openai", base_url="http://127.0.0.1:9/v1",
                        api_key_env="CONCLAVE_TEST_UNSET_KEY_4F2A")
    provider = build_provider(spec, make_settings(tmp_path))
    with pytest.raises(MissingCredentials, match="CONCLAVE_TEST_UNSET_KEY_4F2A"):
        await provider.complete(chat_model("fireworks"), ask(), privacy=False)


@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
async def test_privacy_violation_propagates_unchanged(tmp_path: Path, kind: str) -> None:
    """A cloud address in privacy mode is refused in the socket layer, whatever the SDK."""
    url = "http://8.8.8.8:9/v1" if kind == "openai" else "http://8.8.8.8:9"
    spec = ProviderSpec(name=f"fake-{kind}", type=kind, base_url=url,  # type: ignore[arg-type]
                        api_key_env="OPENAI_API_KEY", local=True)
    provider = build_provider(spec, make_settings(tmp_path))
    model = chat_model(f"fake-{kind}")
    with pytest.raises(PrivacyViolation, match=r"8\.8\.8\.8"):
        await provider.complete(model, ask(), privacy=True)
    with pytest.raises(PrivacyViolation):
        await collect(provider, model, ask(), privacy=True)
    await provider.aclose()


# --- Anthropic wire format ------------------------------------------------------------


def an(event: str, **data: Any) -> bytes:
    return sse_event({"type": event, **data}, event=event)


def an_start(input_tokens: int = 20, cache_read: int = 0, cache_write: int = 0) -> bytes:
    return an("message_start", message={
        "id": "msg_01", "type": "message", "role": "assistant", "content": [],
        "model": "claude-test", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "cache_read_input_tokens": cache_read,
                  "cache_creation_input_tokens": cache_write, "output_tokens": 1}})


def an_text(index: int, text: str) -> bytes:
    return an("content_block_delta", index=index, delta={"type": "text_delta", "text": text})


async def test_anthropic_stream_text_tools_and_cache_usage(server: WireServer,
                                                           tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.sse([
        an_start(input_tokens=20, cache_read=100, cache_write=30),
        an("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        an("ping"),
        an_text(0, "Let me "),
        an_text(0, "check."),
        an("content_block_stop", index=0),
        an("content_block_start", index=1, content_block={
            "type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}),
        an("content_block_delta", index=1,
           delta={"type": "input_json_delta", "partial_json": ""}),
        an("content_block_delta", index=1,
           delta={"type": "input_json_delta", "partial_json": '{"ci'}),
        an("content_block_delta", index=1,
           delta={"type": "input_json_delta", "partial_json": 'ty": "Pa'}),
        an("content_block_delta", index=1,
           delta={"type": "input_json_delta", "partial_json": 'ris"}'}),
        an("content_block_stop", index=1),
        an("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None},
           usage={"output_tokens": 42}),
        an("message_stop"),
    ], delay=0.005))
    provider = anthropic_provider(server, tmp_path)
    request = ChatRequest(
        messages=[
            Message.system("You are terse."),
            Message.user("Weather in Paris and Rome?"),
            Message(role=Role.ASSISTANT, content="Checking.", tool_calls=[
                ToolCall(id="toolu_a", name="get_weather", arguments={"city": "Rome"}),
                ToolCall(id="toolu_b", name="get_weather", arguments={"city": "Oslo"})]),
            Message(role=Role.TOOL, content="warm", tool_call_id="toolu_a"),
            Message(role=Role.TOOL, content="cold", tool_call_id="toolu_b"),
        ],
        max_tokens=100, tools=[WEATHER_TOOL], tool_choice="required",
        temperature=0.5, top_p=0.9,
    )
    chunks = await collect(provider, chat_model("anthropic", "claude-test"), request)

    assert text_of(chunks) == "Let me check."
    final = chunks[-1]
    assert final.stop_reason is StopReason.TOOL_CALLS
    [call] = final.tool_calls
    assert (call.id, call.name, call.arguments) == ("toolu_01", "get_weather", {"city": "Paris"})
    usage = final.usage
    assert usage is not None
    # input normalised to every prompt token; cache reads/writes are parts of it
    assert (usage.input_tokens, usage.cached_input_tokens, usage.cache_write_tokens,
            usage.output_tokens) == (150, 100, 30, 42)

    req = server.requests[0]
    assert (req.method, req.path) == ("POST", "/v1/messages")
    # SDK 2.x sends the key as a bearer token, with API version 2026-10-21
    assert req.headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"
    assert req.headers["anthropic-version"] >= "2026-10-21"
    body = req.json
    assert body["stream"] is True
    assert body["max_tokens"] == 100
    assert body["system"] == "You are terse."
    # that API version rejects sampling parameters, so they are not sent
    assert "temperature" not in body and "top_p" not in body
    assert body["tools"] == [{"name": "get_weather", "description": "Current weather for a city",
                              "input_schema": WEATHER_TOOL.parameters}]
    assert body["tool_choice"] == {"type": "any"}
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_a", "name": "get_weather",
             "input": {"city": "Rome"}},
            {"type": "tool_use", "id": "toolu_b", "name": "get_weather",
             "input": {"city": "Oslo"}}]},
        # both results of one tool turn in one user message
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": "warm"},
            {"type": "tool_result", "tool_use_id": "toolu_b", "content": "cold"}]},
    ]
    await provider.aclose()


async def test_anthropic_complete_and_structured_output(server: WireServer,
                                                        tmp_path: Path) -> None:
    message = {"id": "msg_02", "type": "message", "role": "assistant", "model": "claude-test",
               "content": [{"type": "text", "text": '{"answer": "Paris"}'}],
               "stop_reason": "end_turn", "stop_sequence": None,
               "usage": {"input_tokens": 10, "cache_read_input_tokens": 5,
                         "cache_creation_input_tokens": 0, "output_tokens": 7}}
    server.enqueue(ScriptedResponse.json(message), ScriptedResponse.json(message))
    provider = anthropic_provider(server, tmp_path)
    model = chat_model("anthropic", "claude-test")
    # a large max_tokens without streaming: the SDK must not refuse it locally
    resp = await provider.complete(model, ask(max_tokens=64000, response_format=ResponseFormat(
        type="json_schema", schema=SCHEMA)), privacy=False)
    assert resp.text == '{"answer": "Paris"}'
    assert (resp.usage.input_tokens, resp.usage.cached_input_tokens) == (15, 5)
    assert resp.stop_reason is StopReason.STOP

    await provider.complete(model, ask(response_format=ResponseFormat(type="json_object")),
                            privacy=False)
    schema_req, object_req = server.requests
    assert schema_req.json["max_tokens"] == 64000
    fmt = schema_req.json["output_config"]["format"]
    assert fmt["type"] == "json_schema"
    assert fmt["schema"]["properties"] == SCHEMA["properties"]
    assert fmt["schema"]["additionalProperties"] is False
    assert "output_config" not in object_req.json
    assert "JSON object" in object_req.json["system"]
    await provider.aclose()


async def test_anthropic_overloaded_error_event_after_200(server: WireServer,
                                                          tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.sse([
        an_start(),
        an("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        an_text(0, "Par"),
        an_text(0, "tial"),
        sse_event({"type": "error", "error": {"type": "overloaded_error",
                                              "message": "Overloaded"}}, event="error"),
    ]))
    provider = anthropic_provider(server, tmp_path)
    chunks, err = await collect_until_error(provider, chat_model("anthropic"), ask())
    assert isinstance(err, Overloaded)
    assert err.retryable
    assert err.partial_text == "Partial" == text_of(chunks)
    assert err.provider == "anthropic"
    await provider.aclose()


async def test_anthropic_rate_limit_error_event(server: WireServer, tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.sse([
        an_start(),
        sse_event({"type": "error", "error": {"type": "rate_limit_error",
                                              "message": "Number of requests exceeded"}},
                  event="error"),
    ]))
    provider = anthropic_provider(server, tmp_path)
    _, err = await collect_until_error(provider, chat_model("anthropic"), ask())
    assert isinstance(err, RateLimited)
    await provider.aclose()


@pytest.mark.parametrize("status,etype,message,kind", [
    (529, "overloaded_error", "Overloaded", Overloaded),
    (400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum",
     ContextTooLong),
    (401, "authentication_error", "invalid x-api-key", AuthenticationFailed),
    (429, "rate_limit_error", "slow down", RateLimited),
])
async def test_anthropic_status_errors(server: WireServer, tmp_path: Path, status: int,
                                       etype: str, message: str,
                                       kind: type[ProviderError]) -> None:
    server.enqueue(ScriptedResponse.json(
        {"type": "error", "error": {"type": etype, "message": message}}, status=status,
        headers={"retry-after": "3"} if status == 429 else None))
    provider = anthropic_provider(server, tmp_path)
    with pytest.raises(kind) as info:
        await collect(provider, chat_model("anthropic"), ask())
    assert info.value.status_code == status
    if kind is RateLimited:
        assert info.value.retry_after == 3
    if kind is AuthenticationFailed:
        assert "ANTHROPIC_API_KEY" in str(info.value)
        assert ANTHROPIC_KEY not in str(info.value)
    assert len(server.requests) == 1
    await provider.aclose()


async def test_anthropic_stream_cut_before_message_stop(server: WireServer,
                                                        tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.sse([
        an_start(),
        an("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        an_text(0, "Once upon"),
        an_text(0, " a time"),
    ], abort_after=3))
    provider = anthropic_provider(server, tmp_path)
    _, err = await collect_until_error(provider, chat_model("anthropic"), ask())
    assert isinstance(err, ConnectionLost)
    assert err.partial_text == "Once upon"
    await provider.aclose()


async def test_anthropic_close_disconnects(server: WireServer, tmp_path: Path) -> None:
    events = [an_start(),
              an("content_block_start", index=0, content_block={"type": "text", "text": ""})]
    events += [an_text(0, f"w{i} ") for i in range(40)]
    server.enqueue(ScriptedResponse.sse(events, delay=0.05))
    provider = anthropic_provider(server, tmp_path)
    stream = provider.stream(chat_model("anthropic"), ask(), privacy=False)
    assert (await anext(stream)).delta == "w0 "
    await stream.aclose()
    req = server.requests[0]
    await req.wait_done(within=3)
    assert req.client_disconnected and req.pieces_sent < 10
    await provider.aclose()


# --- Ollama wire format ---------------------------------------------------------------


def ol_chat(content: str = "", *, done: bool = False, **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z",
                              "message": {"role": "assistant", "content": content},
                              "done": done}
    record.update(extra)
    return record


async def test_ollama_ndjson_chat_stream(server: WireServer, tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.ndjson([
        ol_chat("The"), ol_chat(" sky"), ol_chat(" is blue."),
        ol_chat("", done=True, done_reason="stop", total_duration=1000, prompt_eval_count=26,
                eval_count=4, eval_duration=500),
    ], delay=0.01))
    provider = ollama_provider(server, tmp_path)
    request = ask("Why is the sky blue?", temperature=0.1, stop=["\n\n"], seed=3,
                  response_format=ResponseFormat(type="json_schema", schema=SCHEMA))
    chunks = await collect(provider, chat_model("ollama", "llama3.2:3b"), request, privacy=True)

    assert text_of(chunks) == "The sky is blue."
    final = chunks[-1]
    assert final.stop_reason is StopReason.STOP
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (26, 4)
    req = server.requests[0]
    assert (req.method, req.path) == ("POST", "/api/chat")
    body = req.json
    assert body["model"] == "llama3.2:3b"
    assert body["stream"] is True
    assert body["options"] == {"num_predict": 32, "temperature": 0.1, "seed": 3,
                               "stop": ["\n\n"]}
    assert body["format"] == SCHEMA
    assert body["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]
    await provider.aclose()


async def test_ollama_tool_calls_with_object_arguments(server: WireServer,
                                                       tmp_path: Path) -> None:
    tool_msg = {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]}
    server.enqueue(
        ScriptedResponse.json(ol_chat(done=True, done_reason="stop", prompt_eval_count=50,
                                      eval_count=20) | {"message": tool_msg}),
        ScriptedResponse.ndjson([
            ol_chat() | {"message": tool_msg},
            ol_chat("", done=True, done_reason="stop", prompt_eval_count=50, eval_count=20),
        ]),
    )
    provider = ollama_provider(server, tmp_path)
    model = chat_model("ollama", "qwen3:8b")
    request = ChatRequest(
        messages=[
            Message.user("Weather?"),
            Message(role=Role.ASSISTANT, content="", tool_calls=[
                ToolCall(id="call_x", name="get_weather", arguments={"city": "Rome"})]),
            Message(role=Role.TOOL, content="warm", tool_call_id="call_x"),
        ],
        max_tokens=64, tools=[WEATHER_TOOL],
    )
    resp = await provider.complete(model, request, privacy=False)
    [call] = resp.tool_calls
    assert (call.name, call.arguments) == ("get_weather", {"city": "Paris", "days": 2})
    assert call.id.startswith("call_")
    assert resp.stop_reason is StopReason.TOOL_CALLS
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (50, 20)

    chunks = await collect(provider, model, request)
    assert chunks[-1].stop_reason is StopReason.TOOL_CALLS
    assert chunks[-1].tool_calls[0].arguments == {"city": "Paris", "days": 2}

    body = server.requests[0].json
    assert body["stream"] is False
    assert body["options"]["num_predict"] == 64
    assert body["tools"][0]["function"]["name"] == "get_weather"
    assert body["tools"][0]["function"]["parameters"]["properties"] == {
        "city": {"type": "string"}}
    assert body["messages"][1]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]
    # the tool result names its tool (Ollama has no call ids)
    assert body["messages"][2] == {"role": "tool", "content": "warm",
                                   "tool_name": "get_weather"}
    await provider.aclose()


async def test_ollama_base_model_uses_generate_raw(server: WireServer, tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.ndjson([
        {"model": "gemma", "created_at": "t", "response": " Paris", "done": False},
        {"model": "gemma", "created_at": "t", "response": "", "done": True,
         "done_reason": "length", "prompt_eval_count": 12, "eval_count": 2},
    ]))
    provider = ollama_provider(server, tmp_path)
    messages = [Message.user("What is the capital of France?")]
    chunks = await collect(provider, base_model("ollama"),
                           ChatRequest(messages=messages, max_tokens=8))
    assert text_of(chunks) == " Paris"
    assert chunks[-1].stop_reason is StopReason.LENGTH
    req = server.requests[0]
    assert req.path == "/api/generate"
    body = req.json
    assert body["raw"] is True
    assert body["prompt"] == completion_prompt(messages)[0]
    assert body["options"] == {"num_predict": 8, "stop": BASE_STOPS}
    await provider.aclose()


@pytest.mark.parametrize("status,error,kind", [
    (404, 'model "llama9" not found, try pulling it first', BadProviderRequest),
    (500, "llama runner process has terminated", Overloaded),
    (400, "invalid options", BadProviderRequest),
])
async def test_ollama_http_errors(server: WireServer, tmp_path: Path, status: int, error: str,
                                  kind: type[ProviderError]) -> None:
    server.enqueue(ScriptedResponse.json({"error": error}, status=status),
                   ScriptedResponse.json({"error": error}, status=status))
    provider = ollama_provider(server, tmp_path)
    model = chat_model("ollama", "llama9")
    with pytest.raises(kind) as info:
        await provider.complete(model, ask(), privacy=False)
    assert info.value.status_code == status
    assert error.split('"')[0] in str(info.value)
    with pytest.raises(kind):
        await collect(provider, model, ask())
    await provider.aclose()


async def test_ollama_error_record_inside_stream(server: WireServer, tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.ndjson([ol_chat("Hal"), {"error": "out of memory"}]))
    provider = ollama_provider(server, tmp_path)
    chunks, err = await collect_until_error(provider, chat_model("ollama"), ask())
    assert isinstance(err, ProviderError)
    assert "out of memory" in str(err)
    assert err.partial_text == "Hal" == text_of(chunks)
    await provider.aclose()


async def test_ollama_stream_without_done_and_bad_json(server: WireServer,
                                                       tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.ndjson([ol_chat("Part"), ol_chat("ial")]),
                   ScriptedResponse.ndjson([ol_chat("A"), b"{not json\n"]))
    provider = ollama_provider(server, tmp_path)
    _, err = await collect_until_error(provider, chat_model("ollama"), ask())
    assert isinstance(err, ConnectionLost)
    assert err.partial_text == "Partial"
    _, err = await collect_until_error(provider, chat_model("ollama"), ask())
    assert isinstance(err, MalformedResponse)
    await provider.aclose()


async def test_ollama_close_disconnects(server: WireServer, tmp_path: Path) -> None:
    server.enqueue(ScriptedResponse.ndjson([ol_chat(f"w{i} ") for i in range(40)], delay=0.05))
    provider = ollama_provider(server, tmp_path)
    stream = provider.stream(chat_model("ollama"), ask(), privacy=True)
    assert (await anext(stream)).delta == "w0 "
    await stream.aclose()
    req = server.requests[0]
    await req.wait_done(within=3)
    assert req.client_disconnected and req.pieces_sent < 10
    await provider.aclose()


# --- the wire server itself -----------------------------------------------------------


async def test_wire_server_fixed_mode_keeps_connections_alive() -> None:
    async with WireServer(record=False) as srv:
        srv.serve_fixed(ScriptedResponse.json({"ok": True}))
        async with httpx.AsyncClient(base_url=srv.url) as client:
            results = await asyncio.gather(*(client.post("/x", json={"i": i})
                                              for i in range(5)))
            for _ in range(20):
                r = await client.post("/x", json={"n": 1})
                assert r.json() == {"ok": True}
        assert all(r.status_code == 200 for r in results)
        assert srv.request_count == 25
        assert srv.requests == []
        # keep-alive: far fewer connections than requests
        assert srv.connections_opened <= 5


async def test_wire_server_unscripted_request_fails_loudly() -> None:
    async with WireServer() as srv, httpx.AsyncClient(base_url=srv.url) as client:
        r = await client.get("/nothing")
    assert r.status_code == 599
    assert "nothing scripted" in r.text
    assert srv.requests[0].path == "/nothing"


def test_ndjson_line_is_one_line() -> None:
    assert ndjson_line({"a": "x\ny"}).count(b"\n") == 1
