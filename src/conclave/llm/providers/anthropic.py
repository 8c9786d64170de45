"""Anthropic Messages API provider, on the official ``anthropic`` SDK.

Like the OpenAI provider it runs with ``max_retries=0`` on Conclave's guarded
``httpx2`` client.  Streams are read as raw events (``messages.create(...,
stream=True)``) rather than through the SDK's accumulating helper, so every
event is seen as it arrives and closing the stream closes the connection.

Usage normalisation: Anthropic's ``input_tokens`` *excludes* prompt-cache
reads and writes, while OpenAI's ``prompt_tokens`` includes its cached tokens.
Conclave follows the OpenAI convention everywhere, so here
``Usage.input_tokens = input_tokens + cache_read_input_tokens +
cache_creation_input_tokens`` (every prompt token), with
``cached_input_tokens = cache_read_input_tokens`` and ``cache_write_tokens =
cache_creation_input_tokens`` as parts of that total.  Pricing bills the
uncached remainder at the input price and each part at its own price.

Structured output: a ``json_schema`` response format is sent as
``output_config={"format": {"type": "json_schema", "schema": ...}}`` (the
SDK's structured-outputs parameter), with the schema passed through the SDK's
``transform_schema`` so it meets the API's strict-schema rules.  Models marked
``supports_json_schema: false`` in the catalog, and ``json_object`` requests
(which the API has no mode for), get the instruction in the system prompt
instead.

Sampling: API version 2026-10-21, which the 2.x SDK sends by default, rejects
``temperature``, ``top_p`` and ``top_k`` with HTTP 400 (even at their default
values) and the SDK no longer has those parameters, so a request's
``temperature``/``top_p`` are not sent to Anthropic models.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
from anthropic import AsyncAnthropic, transform_schema

from conclave.config import ModelSpec, ProviderSpec, Settings
from conclave.errors import BadProviderRequest, ConnectionLost
from conclave.llm import net
from conclave.llm.providers._common import BaseUrlResolver, api_key, base_url, parse_arguments
from conclave.llm.providers._errors import ErrorBoundary, ErrorContext
from conclave.llm.providers.base import Provider
from conclave.llm.types import (
    ChatRequest,
    ChatResponse,
    Message,
    Role,
    StopReason,
    StreamChunk,
    ToolCall,
    Usage,
)

__all__ = ["AnthropicProvider"]

_STOP_REASONS = {
    "end_turn": StopReason.STOP,
    "stop_sequence": StopReason.STOP,
    "pause_turn": StopReason.STOP,
    "max_tokens": StopReason.LENGTH,
    "model_context_window_exceeded": StopReason.LENGTH,
    "tool_use": StopReason.TOOL_CALLS,
    "refusal": StopReason.CONTENT_FILTER,
}

JSON_OBJECT_INSTRUCTION = "Reply with one JSON object and nothing else: no prose, no code fences."


def stop_reason(reason: str | None) -> StopReason:
    return _STOP_REASONS.get(reason or "end_turn", StopReason.STOP)


def _count(obj: Any, name: str) -> int | None:
    value = getattr(obj, name, None)
    return value if isinstance(value, int) else None


class _UsageTracker:
    """Anthropic's usage fields, as last reported, normalised on read (module docstring)."""

    def __init__(self) -> None:
        self.input = 0
        self.cache_read = 0
        self.cache_write = 0
        self.output = 0

    def update(self, usage: Any) -> None:
        if usage is None:
            return
        for field, attr in (("input_tokens", "input"), ("cache_read_input_tokens", "cache_read"),
                            ("cache_creation_input_tokens", "cache_write"),
                            ("output_tokens", "output")):
            value = _count(usage, field)
            if value is not None:
                setattr(self, attr, value)

    def usage(self) -> Usage:
        return Usage(
            input_tokens=self.input + self.cache_read + self.cache_write,
            output_tokens=self.output,
            cached_input_tokens=self.cache_read,
            cache_write_tokens=self.cache_write,
        )


def _blocks(msg: Message) -> list[dict[str, Any]]:
    text = msg.content or ""
    if msg.role is Role.TOOL:
        return [{"type": "tool_result", "tool_use_id": msg.tool_call_id or "", "content": text}]
    blocks: list[dict[str, Any]] = []
    if text.strip():
        blocks.append({"type": "text", "text": text})
    if msg.role is Role.ASSISTANT:
        for call in msg.tool_calls:
            blocks.append({"type": "tool_use", "id": call.id, "name": call.name,
                           "input": call.arguments})
    return blocks


def messages_to_anthropic(messages: list[Message]) -> tuple[str, list[dict[str, Any]]]:
    """``(system, messages)``: system turns joined; tool results as user ``tool_result`` blocks.

    Consecutive turns of the same role are merged into one message, since the
    API wants all results of one tool-use turn in the single user turn after it.
    """
    system = "\n\n".join(m.content for m in messages if m.role is Role.SYSTEM and m.content)
    out: list[dict[str, Any]] = []
    for msg in messages:
        if msg.role is Role.SYSTEM:
            continue
        role = "assistant" if msg.role is Role.ASSISTANT else "user"
        blocks = _blocks(msg)
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return system, out


def tool_choice_to_anthropic(choice: str | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    mapping = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}
    return mapping.get(choice, {"type": "tool", "name": choice})


class AnthropicProvider(Provider):
    """The Anthropic Messages API; see the module docstring."""

    def __init__(self, spec: ProviderSpec, settings: Settings, *,
                 base_url_resolver: BaseUrlResolver | None = None) -> None:
        super().__init__(spec, settings)
        self._resolver = base_url_resolver
        self._clients: dict[bool, AsyncAnthropic] = {}
        self._http: dict[bool, httpx2.AsyncClient] = {}

    async def _client(self, privacy: bool) -> tuple[AsyncAnthropic, ErrorContext]:
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
            client = AsyncAnthropic(api_key=key or "no-key", base_url=url, max_retries=0,
                                    http_client=http)
            self._clients[privacy] = client
        elif str(client.base_url).rstrip("/") != url:
            client = client.with_options(base_url=url)
            self._clients[privacy] = client
        return client, ctx

    def _params(self, model: ModelSpec, request: ChatRequest) -> dict[str, Any]:
        system, messages = messages_to_anthropic(request.messages)
        params: dict[str, Any] = {"model": model.id, "max_tokens": request.max_tokens,
                                  "messages": messages}
        rf = request.response_format
        if rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
            if model.supports_json_schema:
                try:
                    schema = transform_schema(rf.json_schema)
                except (ValueError, TypeError) as exc:
                    raise BadProviderRequest(
                        f"the response_format schema cannot be sent to {self.name}: {exc}",
                        hint="give the schema a top-level 'type' (usually 'object')",
                        provider=self.name,
                    ) from None
                params["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
            else:
                system = _join(system, "Reply with one JSON object and nothing else, matching "
                               f"this JSON schema:\n{json.dumps(rf.json_schema)}")
        elif rf is not None and rf.type != "text":
            system = _join(system, JSON_OBJECT_INSTRUCTION)
        if system:
            params["system"] = system
        if request.stop:
            params["stop_sequences"] = list(request.stop)
        if request.tools:
            params["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters}
                for t in request.tools
            ]
            choice = tool_choice_to_anthropic(request.tool_choice)
            if choice is not None:
                params["tool_choice"] = choice
        return params

    async def complete(self, model: ModelSpec, request: ChatRequest, *, privacy: bool
                       ) -> ChatResponse:
        client, ctx = await self._client(privacy)
        with ErrorBoundary(ctx):
            routing = self.settings.routing
            # An explicit timeout: otherwise the SDK refuses large max_tokens without
            # streaming (its "may take longer than 10 minutes" check) with a ValueError.
            msg = await client.messages.create(
                **self._params(model, request),
                timeout=httpx2.Timeout(routing.request_timeout, connect=routing.connect_timeout),
            )
            texts: list[str] = []
            calls: list[ToolCall] = []
            for block in msg.content:
                if block.type == "text":
                    texts.append(block.text)
                elif block.type == "tool_use":
                    raw_input = block.input
                    args = raw_input if isinstance(raw_input, dict) else {}
                    calls.append(ToolCall(id=block.id, name=block.name, arguments=args))
            tracker = _UsageTracker()
            tracker.update(msg.usage)
            return ChatResponse(
                id=msg.id or "", text="".join(texts), tool_calls=calls,
                stop_reason=stop_reason(msg.stop_reason), usage=tracker.usage(),
                model=model.name, provider=self.name, tier=model.tier,
            )

    async def stream(self, model: ModelSpec, request: ChatRequest, *, privacy: bool
                     ) -> AsyncIterator[StreamChunk]:
        client, ctx = await self._client(privacy)
        upstream: Any = None
        boundary = ErrorBoundary(ctx)
        try:
            with boundary:
                upstream = await client.messages.create(**self._params(model, request),
                                                        stream=True)
                tracker = _UsageTracker()
                tool_blocks: dict[int, dict[str, Any]] = {}
                calls: list[ToolCall] = []
                reason: str | None = None
                finished = False
                async for event in upstream:
                    kind = event.type
                    if kind == "message_start":
                        tracker.update(event.message.usage)
                    elif kind == "content_block_start":
                        block = event.content_block
                        if block.type == "tool_use":
                            tool_blocks[event.index] = {"id": block.id, "name": block.name,
                                                        "json": [], "input": block.input}
                        elif block.type == "text" and block.text:
                            boundary.partial.append(block.text)
                            yield StreamChunk(delta=block.text)
                    elif kind == "content_block_delta":
                        delta = event.delta
                        if delta.type == "text_delta" and delta.text:
                            boundary.partial.append(delta.text)
                            yield StreamChunk(delta=delta.text)
                        elif delta.type == "input_json_delta" and event.index in tool_blocks:
                            tool_blocks[event.index]["json"].append(delta.partial_json)
                    elif kind == "content_block_stop":
                        slot = tool_blocks.pop(event.index, None)
                        if slot is not None:
                            calls.append(_tool_call(slot))
                    elif kind == "message_delta":
                        tracker.update(event.usage)
                        if event.delta.stop_reason:
                            reason = event.delta.stop_reason
                    elif kind == "message_stop":
                        finished = True
                if not finished:
                    raise ConnectionLost(
                        f"the stream from {self.name} ended before message_stop",
                        hint="retrying usually works", provider=self.name,
                        partial_text=boundary.partial_text,
                    )
                yield StreamChunk(tool_calls=calls, usage=tracker.usage(),
                                  stop_reason=stop_reason(reason))
        finally:
            if upstream is not None:
                with contextlib.suppress(Exception):
                    await upstream.close()

    async def aclose(self) -> None:
        for http in self._http.values():
            await http.aclose()
        self._http.clear()
        self._clients.clear()


def _tool_call(slot: dict[str, Any]) -> ToolCall:
    """A finished tool_use block: its streamed JSON pieces, or the input it started with."""
    raw = "".join(slot["json"])
    if raw.strip():
        args, bad = parse_arguments(raw)
    else:
        start = slot["input"]
        args, bad = (start if isinstance(start, dict) else {}), None
    return ToolCall(id=slot["id"], name=slot["name"], arguments=args, raw_arguments=bad)


def _join(system: str, extra: str) -> str:
    return f"{system}\n\n{extra}" if system else extra
