"""A scripted in-process provider for unit tests of pure routing and streaming logic.

Each call pops the next scripted outcome for the model: a ChatResponse, an
exception to raise, or a list of stream chunks (an exception in the list is
raised at that point of the stream).  It records calls and whether a stream
was closed early, so tests can assert on cancellation.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from conclave.config import ModelSpec, ProviderSpec, Settings
from conclave.llm.providers.base import Provider
from conclave.llm.types import ChatRequest, ChatResponse, StopReason, StreamChunk, Usage


class ScriptedProvider(Provider):
    def __init__(self, spec: ProviderSpec, settings: Settings, delay: float = 0.0) -> None:
        super().__init__(spec, settings)
        self.script: dict[str, list[Any]] = defaultdict(list)
        self.calls: list[tuple[str, ChatRequest, bool]] = []
        self.closed_early = 0
        self.delay = delay

    def add(self, model: str, *outcomes: Any) -> ScriptedProvider:
        self.script[model].extend(outcomes)
        return self

    def _next(self, model: ModelSpec) -> Any:
        if not self.script[model.name]:
            return ChatResponse(text="ok", usage=Usage(input_tokens=1, output_tokens=1))
        return self.script[model.name].pop(0)

    async def complete(self, model: ModelSpec, request: ChatRequest, *, privacy: bool
                       ) -> ChatResponse:
        self.calls.append((model.name, request, privacy))
        outcome = self._next(model)
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, list):
            text = "".join(c.delta for c in outcome if isinstance(c, StreamChunk))
            return ChatResponse(text=text, usage=Usage(output_tokens=len(outcome)))
        return outcome.model_copy(deep=True)

    async def stream(self, model: ModelSpec, request: ChatRequest, *, privacy: bool
                     ) -> AsyncIterator[StreamChunk]:
        self.calls.append((model.name, request, privacy))
        outcome = self._next(model)
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, ChatResponse):
            outcome = [StreamChunk(delta=outcome.text, usage=outcome.usage,
                                   stop_reason=StopReason.STOP)]
        finished = False
        try:
            for item in outcome:
                if self.delay:
                    await asyncio.sleep(self.delay)
                if isinstance(item, BaseException):
                    raise item
                yield item
            finished = True
        finally:
            if not finished:
                self.closed_early += 1


def words(*parts: str, usage: Usage | None = None) -> list[StreamChunk]:
    """Chunks for each part; the last carries the stop reason and optional usage."""
    chunks = [StreamChunk(delta=p) for p in parts]
    chunks.append(StreamChunk(usage=usage, stop_reason=StopReason.STOP))
    return chunks
