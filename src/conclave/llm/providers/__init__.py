"""Providers: one class per wire protocol, and :func:`build_provider` to pick one.

``openai`` covers every OpenAI-compatible server (OpenAI, Together, Fireworks,
Jan, llama.cpp), ``anthropic`` the Messages API, ``ollama`` Ollama's native API.
"""

from __future__ import annotations

from conclave.config import ProviderSpec, Settings
from conclave.errors import ConfigError
from conclave.llm.providers._common import BaseUrlResolver
from conclave.llm.providers.anthropic import AnthropicProvider
from conclave.llm.providers.base import Provider
from conclave.llm.providers.ollama import OllamaProvider
from conclave.llm.providers.openai_compat import OpenAICompatProvider

__all__ = [
    "AnthropicProvider",
    "BaseUrlResolver",
    "OllamaProvider",
    "OpenAICompatProvider",
    "Provider",
    "build_provider",
]

_TYPES: dict[str, type[OpenAICompatProvider | AnthropicProvider | OllamaProvider]] = {
    "openai": OpenAICompatProvider,
    "anthropic": AnthropicProvider,
    "ollama": OllamaProvider,
}


def build_provider(spec: ProviderSpec, settings: Settings, *,
                   base_url_resolver: BaseUrlResolver | None = None) -> Provider:
    """The provider for ``spec.type``.

    ``base_url_resolver`` is for servers started on demand (the managed
    llama.cpp server): it is awaited before each request and returns the
    current base URL, e.g. ``http://127.0.0.1:PORT/v1``.
    """
    cls = _TYPES.get(spec.type)
    if cls is None:
        raise ConfigError(
            f"provider {spec.name!r} has unknown type {spec.type!r}",
            hint=f"use one of: {', '.join(sorted(_TYPES))}",
        )
    return cls(spec, settings, base_url_resolver=base_url_resolver)
