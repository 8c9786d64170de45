"""OpenAI-compatible provider: OpenAI, Together, Fireworks, Jan and llama.cpp's server.

Built on the official ``openai`` SDK with ``max_retries=0`` (retries and
fallbacks are the router's job, and an SDK retrying underneath would double
the wait and hide failures from the cooldown logic) and with Conclave's
privacy-guarded ``httpx2`` client, one per privacy flag.

Chat models go to ``/chat/completions``.  Base models (``kind: base``) have no
chat template, so they go to the legacy ``/completions`` endpoint with the
Question/Answer prompt from :mod:`conclave.llm.prompts` (or the request's raw
``prompt``, sent as it is, when the caller gave one); a JSON schema for
them is sent as llama.cpp's ``json_schema`` body field (its ``/v1/completions``
turns it into a grammar), and then the Question/Answer stop sequences are
left out, since they could cut the JSON short.

Token limit: OpenAI's own API (provider ``openai``) takes
``max_completion_tokens`` (its reasoning models reject ``max_tokens``); every
other compatible server gets the widely supported ``max_tokens``.

A stream counts as complete once a choice reported its ``finish_reason``; the
SDK swallows the ``[DONE]`` line, so that is the terminal event we can see.  A
stream that ends without one raises ``ConnectionLost`` with the partial text.

Hot path: requests go through the SDK's generic ``client.post`` (its documented
way to call an endpoint) with the body already serialised by orjson, rather
than ``client.chat.completions.create``.  ``create`` runs every parameter
through the SDK's TypedDict transform, which for the plain JSON values built
here is the identity and cost about as much CPU as the whole HTTP exchange
(measured: 1.9 ms against 0.8 ms per call).  The client, its headers, auth,
timeouts and error mapping are the same.  A non-streamed answer is read as
bytes and parsed with orjson into plain dicts, checked field by field, instead
of being built into the SDK's pydantic models we would only copy out of.

Embeddings use ``client.embeddings.create(..., encoding_format="float")`` (a
batch per call, so the SDK's per-call overhead does not matter there); rows
are put back in input order by their ``index``, and ``usage.prompt_tokens`` is
the billed count (estimated, and marked so, when a server reports none).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import orjson
from openai import AsyncOpenAI, AsyncStream
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from conclave.config import ModelSpec, ProviderSpec, Settings
from conclave.errors import BadProviderRequest, ConnectionLost, MalformedResponse
from conclave.llm import net
from conclave.llm.prompts import completion_prompt
from conclave.llm.providers._common import (
    NO_KEY,
    BaseUrlResolver,
    api_key,
    arguments_json,
    base_url,
    embedding_usage,
    embedding_vectors,
    parse_arguments,
)
from conclave.llm.providers._errors import ErrorBoundary, ErrorContext
from conclave.llm.providers.base import Provider
from conclave.llm.types import (
    ChatRequest,
    ChatResponse,
    EmbedRequest,
    EmbedResponse,
    Message,
    ResponseFormat,
    Role,
    StopReason,
    StreamChunk,
    ToolCall,
    ToolSpec,
    Usage,
)

__all__ = ["OpenAICompatProvider"]

_STOP_REASONS = {
    "stop": StopReason.STOP,
    "length": StopReason.LENGTH,
    "tool_calls": StopReason.TOOL_CALLS,
    "function_call": StopReason.TOOL_CALLS,
    "content_filter": StopReason.CONTENT_FILTER,
}


def stop_reason(finish_reason: str | None) -> StopReason:
    return _STOP_REASONS.get(finish_reason or "stop", StopReason.STOP)


def usage_from(usage: Any) -> Usage | None:
    """OpenAI usage → Usage; ``prompt_tokens`` already includes the cached tokens."""
    if usage is None:
        return None
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or 0
    return Usage(
        input_tokens=usage.prompt_tokens or 0,
        output_tokens=usage.completion_tokens or 0,
        cached_input_tokens=cached,
    )


def _int(value: Any) -> int:
    """A token count from a JSON body: a non-negative int, else a MalformedResponse."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"token count {value!r}")
    return value


def usage_from_json(usage: Any) -> Usage:
    """``usage`` of a JSON body → Usage (missing usage: zero, as the SDK path had it)."""
    if usage is None:
        return Usage()
    details = usage.get("prompt_tokens_details") or {}
    return Usage(
        input_tokens=_int(usage.get("prompt_tokens")),
        output_tokens=_int(usage.get("completion_tokens")),
        cached_input_tokens=_int(details.get("cached_tokens")),
    )


def _str(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def messages_to_openai(messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for msg in messages:
        if msg.role is Role.TOOL:
            out.append({"role": "tool", "tool_call_id": msg.tool_call_id or "",
                        "content": msg.content or ""})
        elif msg.role is Role.ASSISTANT and msg.tool_calls:
            out.append({
                "role": "assistant",
                "content": msg.content or None,
                "tool_calls": [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": arguments_json(c)}}
                    for c in msg.tool_calls
                ],
            })
        else:
            entry: dict[str, Any] = {"role": msg.role.value, "content": msg.content or ""}
            if msg.name and msg.role is Role.USER:
                entry["name"] = msg.name
            out.append(entry)
    return out


def tools_to_openai(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {"type": "function",
         "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in tools
    ]


def tool_choice_to_openai(choice: str | None) -> Any:
    if choice is None:
        return None
    if choice in {"auto", "none", "required"}:
        return choice
    return {"type": "function", "function": {"name": choice}}


def response_format_to_openai(rf: ResponseFormat | None) -> dict[str, Any] | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_schema" and rf.json_schema is not None:
        return {"type": "json_schema", "json_schema": {"name": rf.name, "schema": rf.json_schema}}
    return {"type": "json_object"}


def base_schema(rf: ResponseFormat | None) -> dict[str, Any] | None:
    """The schema a base model's output must follow, or None for free text."""
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_schema" and rf.json_schema is not None:
        return rf.json_schema
    return {"type": "object"}


def base_prompt(request: ChatRequest) -> tuple[str, list[str]]:
    """A base model's prompt and default stops: the caller's raw prompt as-is, if given
    (no Q/A stops then, as the prompt is not in that form), else the Q/A rendering."""
    raw = getattr(request, "prompt", None)
    if raw is not None:
        return raw, []
    return completion_prompt(request.messages)


def _body(params: dict[str, Any]) -> bytes:
    """The JSON request body (the SDK sends ``content`` as it is, as application/json)."""
    return orjson.dumps(params)


class _ToolCallAccumulator:
    """Collects streamed tool-call deltas: id and name once, arguments in pieces."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, deltas: list[Any]) -> None:
        for pos, delta in enumerate(deltas):
            index = delta.index if getattr(delta, "index", None) is not None else pos
            slot = self._calls.setdefault(index, {"id": "", "name": "", "args": []})
            if delta.id:
                slot["id"] = delta.id
            fn = getattr(delta, "function", None)
            if fn is not None:
                if fn.name and not slot["name"]:
                    slot["name"] = fn.name
                if fn.arguments:
                    slot["args"].append(fn.arguments)

    def calls(self) -> list[ToolCall]:
        out = []
        for index in sorted(self._calls):
            slot = self._calls[index]
            args, raw = parse_arguments("".join(slot["args"]))
            out.append(ToolCall(id=slot["id"] or f"call_{index}", name=slot["name"],
                                arguments=args, raw_arguments=raw))
        return out


class OpenAICompatProvider(Provider):
    """One OpenAI-compatible endpoint; see the module docstring."""

    def __init__(self, spec: ProviderSpec, settings: Settings, *,
                 base_url_resolver: BaseUrlResolver | None = None) -> None:
        super().__init__(spec, settings)
        self._resolver = base_url_resolver
        self._clients: dict[bool, AsyncOpenAI] = {}
        self._http: dict[bool, httpx2.AsyncClient] = {}

    async def _client(self, privacy: bool) -> tuple[AsyncOpenAI, ErrorContext]:
        key = api_key(self.spec, self.settings)
        url = await base_url(self.spec, self.settings, self._resolver)
        ctx = ErrorContext(self.name, api_key_env=self.spec.api_key_env, secrets=[key],
                           base_url=url)
        client = self._clients.get(privacy)
        if client is None:
            routing = self.settings.routing
            http = net.httpx2_client(privacy=privacy, timeout=routing.request_timeout,
                                     connect_timeout=routing.connect_timeout,
                                     lean=routing.lean_http)
            self._http[privacy] = http
            client = AsyncOpenAI(api_key=key or NO_KEY, base_url=url, max_retries=0,
                                 http_client=http)
            self._clients[privacy] = client
        elif str(client.base_url).rstrip("/") != url:
            # The managed server came back on another port: same connection pool.
            client = client.with_options(base_url=url)
            self._clients[privacy] = client
        return client, ctx

    # -- request building -------------------------------------------------------------

    def _chat_params(self, model: ModelSpec, request: ChatRequest) -> dict[str, Any]:
        params: dict[str, Any] = {"model": model.id,
                                  "messages": messages_to_openai(request.messages)}
        tokens_key = "max_completion_tokens" if self.spec.name == "openai" else "max_tokens"
        params[tokens_key] = request.max_tokens
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.top_p is not None:
            params["top_p"] = request.top_p
        if request.stop:
            params["stop"] = list(request.stop)
        if request.seed is not None:
            params["seed"] = request.seed
        if request.tools:
            params["tools"] = tools_to_openai(request.tools)
            choice = tool_choice_to_openai(request.tool_choice)
            if choice is not None:
                params["tool_choice"] = choice
        fmt = response_format_to_openai(request.response_format)
        if fmt is not None:
            params["response_format"] = fmt
        return params

    def _completion_params(self, model: ModelSpec, request: ChatRequest) -> dict[str, Any]:
        if request.tools:
            raise BadProviderRequest(
                f"model {model.name!r} is a base model and cannot call tools",
                hint="pick a chat model (supports_tools: true) for tool use",
                provider=self.name,
            )
        prompt, base_stops = base_prompt(request)
        schema = base_schema(request.response_format)
        # Q/A stops could cut a JSON answer short; the grammar ends it instead.
        stops = list(request.stop) if schema is not None else base_stops + [
            s for s in request.stop if s not in base_stops
        ]
        params: dict[str, Any] = {"model": model.id, "prompt": prompt,
                                  "max_tokens": request.max_tokens}
        if stops:
            params["stop"] = stops
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.top_p is not None:
            params["top_p"] = request.top_p
        if request.seed is not None:
            params["seed"] = request.seed
        if schema is not None:
            # llama.cpp's body field (not part of OpenAI's API): turned into a grammar
            params["json_schema"] = schema
        return params

    # -- calls ------------------------------------------------------------------------

    async def complete(self, model: ModelSpec, request: ChatRequest, *, privacy: bool
                       ) -> ChatResponse:
        client, ctx = await self._client(privacy)
        with ErrorBoundary(ctx):
            base = model.kind == "base"
            params = (self._completion_params(model, request) if base
                      else self._chat_params(model, request))
            raw = await client.post("/completions" if base else "/chat/completions",
                                    cast_to=httpx2.Response, content=_body(params))
            try:
                data = orjson.loads(raw.content)
                return self._parse(data, model, base)
            except (orjson.JSONDecodeError, TypeError, AttributeError, KeyError,
                    IndexError, ValueError) as exc:
                raise MalformedResponse(
                    f"{self.name} sent a response that does not match its API "
                    f"({type(exc).__name__})", provider=self.name,
                    status_code=raw.status_code) from None

    def _parse(self, data: Any, model: ModelSpec, base: bool) -> ChatResponse:
        if not isinstance(data, dict):
            raise TypeError("the body is not a JSON object")
        choices = data.get("choices")
        if not choices:
            raise MalformedResponse(f"{self.name} returned no choices", provider=self.name)
        choice = choices[0]
        usage = usage_from_json(data.get("usage"))
        reason = stop_reason(choice.get("finish_reason"))
        if base:
            return ChatResponse(
                id=_str(data.get("id")), text=_str(choice.get("text")), stop_reason=reason,
                usage=usage, model=model.name, provider=self.name, tier=model.tier)
        message = choice.get("message") or {}
        calls = []
        for i, tc in enumerate(message.get("tool_calls") or []):
            fn = tc.get("function")
            if fn is None:
                continue
            args, raw_args = parse_arguments(fn.get("arguments"))
            calls.append(ToolCall(id=_str(tc.get("id")) or f"call_{i}",
                                  name=_str(fn.get("name")), arguments=args,
                                  raw_arguments=raw_args))
        return ChatResponse(
            id=_str(data.get("id")), text=_str(message.get("content")), tool_calls=calls,
            stop_reason=reason, usage=usage, model=model.name, provider=self.name,
            tier=model.tier,
        )

    async def embed(self, model: ModelSpec, request: EmbedRequest, *, privacy: bool
                    ) -> EmbedResponse:
        client, ctx = await self._client(privacy)
        with ErrorBoundary(ctx):
            resp = await client.embeddings.create(model=model.id, input=request.inputs,
                                                  encoding_format="float")
            try:
                rows = sorted(resp.data, key=lambda d: d.index)
                vectors = [row.embedding for row in rows]
                reported = getattr(resp.usage, "prompt_tokens", None)
            except (AttributeError, TypeError):
                raise MalformedResponse(f"{self.name} answered without embedding data",
                                        provider=self.name) from None
            return EmbedResponse(
                vectors=embedding_vectors(vectors, len(request.inputs), self.name),
                usage=embedding_usage(reported, request.inputs),
                model=model.name, provider=self.name, tier=model.tier)

    async def stream(self, model: ModelSpec, request: ChatRequest, *, privacy: bool
                     ) -> AsyncIterator[StreamChunk]:
        client, ctx = await self._client(privacy)
        upstream: Any = None
        boundary = ErrorBoundary(ctx)
        try:
            with boundary:
                base = model.kind == "base"
                params = (self._completion_params(model, request) if base
                          else self._chat_params(model, request))
                params["stream"] = True
                params["stream_options"] = {"include_usage": True}
                if base:
                    upstream = await client.post(
                        "/completions", cast_to=Completion, content=_body(params),
                        stream=True, stream_cls=AsyncStream[Completion])
                else:
                    upstream = await client.post(
                        "/chat/completions", cast_to=ChatCompletionChunk,
                        content=_body(params), stream=True,
                        stream_cls=AsyncStream[ChatCompletionChunk])
                tools = _ToolCallAccumulator()
                finish: str | None = None
                usage: Usage | None = None
                async for chunk in upstream:
                    if chunk.usage is not None:
                        usage = usage_from(chunk.usage)
                    for choice in chunk.choices:
                        if choice.index not in (0, None):
                            continue
                        if base:
                            text = choice.text or ""
                        else:
                            text = (choice.delta.content or "") if choice.delta else ""
                            if choice.delta and choice.delta.tool_calls:
                                tools.add(list(choice.delta.tool_calls))
                        if choice.finish_reason:
                            finish = choice.finish_reason
                        if text:
                            boundary.partial.append(text)
                            yield StreamChunk(delta=text)
                if finish is None:
                    raise ConnectionLost(
                        f"the stream from {self.name} ended before the answer was complete",
                        hint="retrying usually works", provider=self.name,
                        partial_text=boundary.partial_text,
                    )
                yield StreamChunk(tool_calls=tools.calls(), usage=usage,
                                  stop_reason=stop_reason(finish))
        finally:
            if upstream is not None:
                with contextlib.suppress(Exception):
                    await upstream.close()

    async def aclose(self) -> None:
        for http in self._http.values():
            await http.aclose()
        self._http.clear()
        self._clients.clear()
