"""A scripted in-process model for agent tests: a real Provider whose answers come from code.

``responder(model_name, request, call_index)`` returns a ChatResponse, a list of
stream chunks, or raises.  Unlike a fixed queue, it can answer by looking at the
request (the team runs candidates concurrently, so call order is not fixed).
Every request is recorded.  A catalog with a priced base model (no tools, like the
tier-0 Gemma) and a priced chat model with native tools goes with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from conclave.bus import Event
from conclave.config import ModelSpec, ProviderSpec, Settings
from conclave.gateway import Gateway
from conclave.llm.providers.base import Provider
from conclave.llm.types import ChatRequest, ChatResponse, StopReason, StreamChunk, Usage
from tests.support.settings import make_settings

BASE = "scripted/base"
CHAT = "scripted/chat"

CATALOG = """
providers:
  scripted:
    type: openai
    base_url: http://127.0.0.1:9/v1
    local: true
models:
  - name: scripted/base
    provider: scripted
    id: base
    tier: 0
    kind: base
    supports_tools: false
    priority: 1
    price: {input: 1, output: 2}
  - name: scripted/chat
    provider: scripted
    id: chat
    tier: 0
    kind: chat
    supports_tools: true
    priority: 2
    price: {input: 1, output: 2}
"""

Responder = Callable[[str, ChatRequest, int], Any]


class FunctionProvider(Provider):
    def __init__(self, spec: ProviderSpec, settings: Settings, responder: Responder) -> None:
        super().__init__(spec, settings)
        self.responder = responder
        self.requests: list[tuple[str, ChatRequest]] = []

    def _answer(self, model: ModelSpec, request: ChatRequest) -> Any:
        self.requests.append((model.name, request))
        return self.responder(model.name, request, len(self.requests) - 1)

    async def complete(self, model: ModelSpec, request: ChatRequest, *, privacy: bool
                       ) -> ChatResponse:
        out = self._answer(model, request)
        if isinstance(out, list):
            text = "".join(c.delta for c in out)
            return ChatResponse(text=text, usage=Usage(output_tokens=len(out)))
        return out

    async def stream(self, model: ModelSpec, request: ChatRequest, *, privacy: bool
                     ) -> AsyncIterator[StreamChunk]:
        out = self._answer(model, request)
        if isinstance(out, ChatResponse):
            # two deltas, so streaming is visible, then usage and tool calls
            half = len(out.text) // 2
            for piece in (out.text[:half], out.text[half:]):
                if piece:
                    yield StreamChunk(delta=piece)
            yield StreamChunk(tool_calls=out.tool_calls, usage=out.usage,
                              stop_reason=StopReason.TOOL_CALLS if out.tool_calls
                              else StopReason.STOP)
            return
        for chunk in out:
            yield chunk


class Collector:
    """A bus handler that keeps events and signals once ``done(events)`` holds."""

    def __init__(self, done: Callable[[list[Event]], bool]) -> None:
        self.events: list[Event] = []
        self._done = done
        self.ready = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if self._done(self.events):
            self.ready.set()

    async def wait(self, within: float = 5.0) -> list[Event]:
        async with asyncio.timeout(within):
            await self.ready.wait()
        return self.events


def answer(text: str = "", *, tool_calls: list[Any] | None = None, inp: int = 100,
           out: int = 50) -> ChatResponse:
    return ChatResponse(text=text, tool_calls=tool_calls or [],
                        usage=Usage(input_tokens=inp, output_tokens=out))


def scripted_settings(tmp: Path, **overrides: Any) -> Settings:
    catalog = tmp / "catalog.yaml"
    catalog.write_text(CATALOG)
    return make_settings(tmp, catalog_file=catalog, **overrides)


def scripted_gateway(settings: Settings, responder: Responder, *, accounting: Any = None
                     ) -> tuple[Gateway, FunctionProvider]:
    """A Gateway whose every provider is the same FunctionProvider (nothing leaves the process)."""
    spec = settings.catalog.providers["scripted"]
    provider = FunctionProvider(spec, settings, responder)
    providers = {name: provider for name in settings.catalog.providers}
    return Gateway(settings, providers=providers, accounting=accounting), provider
