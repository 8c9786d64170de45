"""The one async interface every provider implements.

A provider turns a normalised :class:`ChatRequest` for one catalog model into
its wire format, and the answer back into :class:`ChatResponse` or a stream
of :class:`StreamChunk`; providers whose API can embed also turn an
:class:`EmbedRequest` into an :class:`EmbedResponse`.  Errors leave a provider only as subclasses of
:class:`conclave.errors.ProviderError`, already normalised.

Streams are async generators: closing one (``aclose()``) must cancel the
upstream HTTP request, which is how stream policies stop a generation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from conclave.config import ModelSpec, ProviderSpec, Settings
from conclave.errors import BadProviderRequest
from conclave.llm.types import ChatRequest, ChatResponse, EmbedRequest, EmbedResponse, StreamChunk


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

    async def embed(
        self, model: ModelSpec, request: EmbedRequest, *, privacy: bool
    ) -> EmbedResponse:
        """One vector per input, in order, with usage (estimated when not reported).

        The default is for wire protocols without an embeddings API (Anthropic's):
        a non-retryable error raised before anything is sent.
        """
        raise BadProviderRequest(
            f"provider {self.name!r} ({self.spec.type}) has no embeddings API, so it cannot "
            f"embed with {model.name!r}",
            hint="use an embedding model of an openai- or ollama-type provider "
            "(e.g. openai/text-embedding-3-small), or the local embedder",
            provider=self.name,
        )

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
