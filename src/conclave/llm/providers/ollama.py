"""Ollama provider, on the official ``ollama`` SDK (httpx 0.x).

Chat models use ``/api/chat``; base models use ``/api/generate`` with
``raw: true`` (no template) and the Question/Answer prompt from
:mod:`conclave.llm.prompts` (or the request's raw ``prompt``).  Streams are
NDJSON; the final record carries ``done: true``, ``done_reason`` and the token
counts (``prompt_eval_count``, ``eval_count``), and a stream that ends without
it raises ``ConnectionLost``.

Privacy: the SDK builds its own ``httpx.AsyncClient`` and forwards keyword
arguments to it, so the guarded transport goes in as ``transport=`` (with
``trust_env=False`` in privacy mode, or an environment proxy would bypass it).

Ollama's tool calls carry arguments as JSON objects and no ids; Conclave
gives each call an id so tool results can be matched back, and sends results
as ``role: tool`` messages with ``tool_name``.  Note the SDK validates tool
schemas into its own model, which keeps ``type``, ``description``, ``enum``
and ``items`` of each top-level property and drops other keywords.

Embeddings use ``/api/embed`` (``client.embed``) with the whole batch as
``input``; the billed count is ``prompt_eval_count`` when the server reports
it, else an estimate marked ``estimated``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from ollama import AsyncClient

from conclave.config import ModelSpec, ProviderSpec, Settings
from conclave.errors import BadProviderRequest, ConnectionLost
from conclave.llm import net
from conclave.llm.providers._common import (
    BaseUrlResolver,
    api_key,
    base_url,
    embedding_usage,
    embedding_vectors,
    parse_arguments,
    tool_names_by_id,
)
from conclave.llm.providers._errors import ErrorBoundary, ErrorContext
from conclave.llm.providers.base import Provider
from conclave.llm.providers.openai_compat import base_prompt
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
    Usage,
)

__all__ = ["OllamaProvider"]


def stop_reason(done_reason: str | None, has_tool_calls: bool) -> StopReason:
    if has_tool_calls:
        return StopReason.TOOL_CALLS
    if done_reason == "length":
        return StopReason.LENGTH
    return StopReason.STOP


def usage_from(part: Any) -> Usage:
    return Usage(input_tokens=part.prompt_eval_count or 0, output_tokens=part.eval_count or 0)


def messages_to_ollama(messages: list[Message]) -> list[dict[str, Any]]:
    names = tool_names_by_id(messages)
    out: list[dict[str, Any]] = []
    for msg in messages:
        entry: dict[str, Any] = {"role": msg.role.value, "content": msg.content or ""}
        if msg.role is Role.ASSISTANT and msg.tool_calls:
            entry["tool_calls"] = [
                {"function": {"name": c.name, "arguments": c.arguments}} for c in msg.tool_calls
            ]
        if msg.role is Role.TOOL:
            name = msg.name or names.get(msg.tool_call_id or "")
            if name:
                entry["tool_name"] = name
        out.append(entry)
    return out


def format_to_ollama(rf: ResponseFormat | None) -> Any:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_schema" and rf.json_schema is not None:
        return rf.json_schema
    return "json"


def _tool_calls(raw: Any) -> list[ToolCall]:
    calls = []
    for tc in raw or []:
        fn = tc.function
        args: Any = fn.arguments
        raw_args = None
        if isinstance(args, str):  # some models' templates still yield a string
            args, raw_args = parse_arguments(args)
        calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:16]}", name=fn.name,
                              arguments=dict(args or {}), raw_arguments=raw_args))
    return calls


class OllamaProvider(Provider):
    """One Ollama server; see the module docstring."""

    def __init__(self, spec: ProviderSpec, settings: Settings, *,
                 base_url_resolver: BaseUrlResolver | None = None) -> None:
        super().__init__(spec, settings)
        self._resolver = base_url_resolver
        self._clients: dict[tuple[bool, str], AsyncClient] = {}

    async def _client(self, privacy: bool) -> tuple[AsyncClient, ErrorContext]:
        key = api_key(self.spec, self.settings)
        url = await base_url(self.spec, self.settings, self._resolver)
        ctx = ErrorContext(self.name, api_key_env=self.spec.api_key_env, secrets=[key],
                           base_url=url)
        client = self._clients.get((privacy, url))
        if client is None:
            routing = self.settings.routing
            headers = {"authorization": f"Bearer {key}"} if key else None
            client = AsyncClient(
                host=url,
                headers=headers,
                timeout=httpx.Timeout(routing.request_timeout, connect=routing.connect_timeout),
                transport=net.httpx_transport(privacy=privacy),
                trust_env=not privacy,
            )
            self._clients[(privacy, url)] = client
        return client, ctx

    def _options(self, request: ChatRequest, stop: list[str]) -> dict[str, Any]:
        options: dict[str, Any] = {"num_predict": request.max_tokens}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.top_p is not None:
            options["top_p"] = request.top_p
        if request.seed is not None:
            options["seed"] = request.seed
        if stop:
            options["stop"] = stop
        return options

    def _chat_params(self, model: ModelSpec, request: ChatRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": model.id,
            "messages": messages_to_ollama(request.messages),
            "options": self._options(request, list(request.stop)),
        }
        if request.tools and request.tool_choice != "none":
            params["tools"] = [
                {"type": "function",
                 "function": {"name": t.name, "description": t.description,
                              "parameters": t.parameters}}
                for t in request.tools
            ]
        fmt = format_to_ollama(request.response_format)
        if fmt is not None:
            params["format"] = fmt
        return params

    def _generate_params(self, model: ModelSpec, request: ChatRequest) -> dict[str, Any]:
        if request.tools:
            raise BadProviderRequest(
                f"model {model.name!r} is a base model and cannot call tools",
                hint="pick a chat model for tool use", provider=self.name,
            )
        prompt, base_stops = base_prompt(request)
        fmt = format_to_ollama(request.response_format)
        # Q/A stops could cut a JSON answer short; the format grammar ends it instead.
        stops = list(request.stop) if fmt is not None else base_stops + [
            s for s in request.stop if s not in base_stops
        ]
        params: dict[str, Any] = {"model": model.id, "prompt": prompt, "raw": True,
                                  "options": self._options(request, stops)}
        if fmt is not None:
            params["format"] = fmt
        return params

    async def complete(self, model: ModelSpec, request: ChatRequest, *, privacy: bool
                       ) -> ChatResponse:
        client, ctx = await self._client(privacy)
        with ErrorBoundary(ctx):
            if model.kind == "base":
                gen = await client.generate(**self._generate_params(model, request),
                                            stream=False)
                return ChatResponse(
                    text=gen.response or "", stop_reason=stop_reason(gen.done_reason, False),
                    usage=usage_from(gen), model=model.name, provider=self.name,
                    tier=model.tier,
                )
            resp = await client.chat(**self._chat_params(model, request), stream=False)
            calls = _tool_calls(resp.message.tool_calls)
            return ChatResponse(
                text=resp.message.content or "", tool_calls=calls,
                stop_reason=stop_reason(resp.done_reason, bool(calls)),
                usage=usage_from(resp), model=model.name, provider=self.name, tier=model.tier,
            )

    async def embed(self, model: ModelSpec, request: EmbedRequest, *, privacy: bool
                    ) -> EmbedResponse:
        client, ctx = await self._client(privacy)
        with ErrorBoundary(ctx):
            resp = await client.embed(model=model.id, input=request.inputs)
            vectors = [list(v) if isinstance(v, list | tuple) else v
                       for v in resp.embeddings or []]
            return EmbedResponse(
                vectors=embedding_vectors(vectors, len(request.inputs), self.name),
                usage=embedding_usage(resp.prompt_eval_count, request.inputs),
                model=model.name, provider=self.name, tier=model.tier)

    async def stream(self, model: ModelSpec, request: ChatRequest, *, privacy: bool
                     ) -> AsyncIterator[StreamChunk]:
        client, ctx = await self._client(privacy)
        upstream: Any = None
        boundary = ErrorBoundary(ctx)
        try:
            with boundary:
                base = model.kind == "base"
                if base:
                    upstream = await client.generate(**self._generate_params(model, request),
                                                     stream=True)
                else:
                    upstream = await client.chat(**self._chat_params(model, request),
                                                 stream=True)
                calls: list[ToolCall] = []
                final: Any = None
                async for part in upstream:
                    if base:
                        text = part.response or ""
                    else:
                        text = part.message.content or ""
                        calls.extend(_tool_calls(part.message.tool_calls))
                    if text:
                        boundary.partial.append(text)
                        yield StreamChunk(delta=text)
                    if part.done:
                        final = part
                        break
                if final is None:
                    raise ConnectionLost(
                        f"the stream from {self.name} ended before its done record",
                        hint="retrying usually works", provider=self.name,
                        partial_text=boundary.partial_text,
                    )
                yield StreamChunk(tool_calls=calls, usage=usage_from(final),
                                  stop_reason=stop_reason(final.done_reason, bool(calls)))
        finally:
            if upstream is not None:
                with contextlib.suppress(Exception):
                    await upstream.aclose()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
