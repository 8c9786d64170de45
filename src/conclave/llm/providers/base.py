"""The one async interface every provider implements.

A provider turns a normalised :class:`ChatRequest` for one catalog model into
its wire format, and the answer back into :class:`ChatResponse` or a stream
of :class:`StreamChunk`.  Errors leave a provider only as subclasses of
:class:`conclave.errors.ProviderError`, already normalised.

Streams are async generators: closing one (``aclose()``) must cancel the
upstream HTTP request, which is how stream policies stop a generation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from conclave.config import ModelSpec, ProviderSpec, Settings
from conclave.llm.types import ChatRequest, ChatResponse, StreamChunk


class Provider(ABC):
    def __init__(self, spec: ProviderSpec, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings

    @property
    def name(self) -> str:
        return self.spec.name

    @abstractmethod
    async def complete(
        self, model: ModelSpec, request: ChatRequest, *, privacy: bool
    ) -> ChatResponse:
        """One answer.  ``request.max_tokens`` is always set by the caller."""

    @abstractmethod
    def stream(
        self, model: ModelSpec, request: ChatRequest, *, privacy: bool
    ) -> AsyncIterator[StreamChunk]:
        """Token-by-token answer; the last chunk carries ``stop_reason`` and usage if known."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
