"""Small pieces every provider needs: its key, its base URL, tool-argument parsing,
embedding checks."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from conclave.config import ProviderSpec, Settings
from conclave.errors import ConfigError, MalformedResponse, MissingCredentials
from conclave.llm.streaming import estimate_tokens
from conclave.llm.types import Message, Role, ToolCall, Usage

#: returns the base URL of a server started on demand (the managed llama.cpp server)
BaseUrlResolver = Callable[[], Awaitable[str]]

#: what local OpenAI-compatible servers get when they need no key (the SDK insists on one)
NO_KEY = "sk-no-key"


def api_key(spec: ProviderSpec, settings: Settings) -> str | None:
    """The provider's key, or None for a local server that needs none.

    A cloud provider without its key is a configuration error naming the
    variable to set, raised before any request leaves the machine.
    """
    key = settings.secret(spec.api_key_env)
    if key:
        return key
    if spec.local or spec.managed:
        return None
    env = spec.api_key_env or f"{spec.name.upper()}_API_KEY"
    raise MissingCredentials(
        f"provider {spec.name!r} needs an API key and {env} is not set",
        hint=f"export {env}=... (or put it in the Conclave config file)",
    )


async def base_url(spec: ProviderSpec, settings: Settings,
                   resolver: BaseUrlResolver | None) -> str:
    """The URL to send requests to: the resolver's answer, else settings and catalog."""
    if resolver is not None:
        url = await resolver()
    else:
        url = settings.base_url(spec) or ""
    if not url:
        env = f" or {spec.base_url_env}" if spec.base_url_env else ""
        hint = ("start the local runtime with `conclave local start`" if spec.managed
                else f"set base_url for it in the catalog{env}")
        raise ConfigError(f"provider {spec.name!r} has no base URL", hint=hint)
    return url.rstrip("/")


def parse_arguments(raw: str | None) -> tuple[dict[str, Any], str | None]:
    """Tool-call arguments sent as a JSON string: ``(parsed, None)`` or ``({}, raw)``.

    A model can emit broken JSON; keeping the raw text lets the agent loop
    show the model its mistake instead of silently calling with no arguments.
    """
    text = (raw or "").strip()
    if not text:
        return {}, None
    try:
        value = json.loads(text)
    except ValueError:
        return {}, raw
    if isinstance(value, dict):
        return value, None
    return {}, raw


def tool_names_by_id(messages: list[Message]) -> dict[str, str]:
    """Map tool-call ids to tool names, for wire formats that name tool results."""
    names: dict[str, str] = {}
    for msg in messages:
        if msg.role is Role.ASSISTANT:
            for call in msg.tool_calls:
                names[call.id] = call.name
    return names


def arguments_json(call: ToolCall) -> str:
    """The arguments of a call as the JSON string OpenAI-style APIs expect back."""
    if call.raw_arguments is not None and not call.arguments:
        return call.raw_arguments
    return json.dumps(call.arguments)


def embedding_vectors(rows: Any, n: int, provider: str) -> list[list[float]]:
    """``rows`` as ``n`` vectors of floats of one length, or a MalformedResponse.

    Checked here so a provider that answers with the wrong count or shape fails as
    that provider's error (not retried), before anything is billed as a success.
    """
    if not isinstance(rows, list) or len(rows) != n:
        count = len(rows) if isinstance(rows, list) else 0
        raise MalformedResponse(f"{provider} returned {count} embeddings for {n} inputs",
                                provider=provider)
    dim = None
    for row in rows:
        # (the numbers themselves are checked by EmbedResponse's validation)
        if not isinstance(row, list) or not row:
            raise MalformedResponse(f"{provider} returned an embedding that is not a list "
                                    "of numbers", provider=provider)
        if dim is None:
            dim = len(row)
        elif len(row) != dim:
            raise MalformedResponse(f"{provider} returned embeddings of different lengths "
                                    f"({dim} and {len(row)})", provider=provider)
    return rows


def embedding_usage(reported: int | None, inputs: list[str]) -> Usage:
    """Billed input tokens: the provider's count, else an estimate marked ``estimated``."""
    if isinstance(reported, int) and not isinstance(reported, bool) and reported > 0:
        return Usage(input_tokens=reported)
    return Usage(input_tokens=sum(estimate_tokens(t) for t in inputs), estimated=True)
