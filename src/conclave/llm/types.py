"""Normalised request, response and stream types shared by every provider.

Providers translate between these and their wire formats; nothing above
``llm/`` ever sees a provider-specific object.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class ToolCall(BaseModel):
    """A tool call requested by the model; ``arguments`` is always a parsed object."""

    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    #: the raw argument text when the provider sent a string that failed to parse
    raw_arguments: str | None = None


class Message(BaseModel):
    role: Role
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    #: for ``role == tool``: the id of the call this message answers
    tool_call_id: str | None = None
    name: str | None = None

    @classmethod
    def system(cls, text: str) -> Message:
        return cls(role=Role.SYSTEM, content=text)

    @classmethod
    def user(cls, text: str) -> Message:
        return cls(role=Role.USER, content=text)

    @classmethod
    def assistant(cls, text: str) -> Message:
        return cls(role=Role.ASSISTANT, content=text)


class ToolSpec(BaseModel):
    """A tool offered to the model: a name, what it does, and a JSON schema for its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ResponseFormat(BaseModel):
    """Constrained output.  ``json_schema`` makes llama.cpp decode with a grammar."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")

    model_config = ConfigDict(populate_by_name=True)


class StopReason(StrEnum):
    STOP = "stop"  # natural end or a stop sequence
    LENGTH = "length"  # max tokens reached
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    CANCELLED = "cancelled"  # a stream policy or the caller stopped it
    ERROR = "error"


class ChatRequest(BaseModel):
    """What a caller asks for.  Name a ``model`` or a ``tier``; neither means tier 0."""

    messages: list[Message]
    model: str | None = None
    tier: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    tools: list[ToolSpec] = Field(default_factory=list)
    tool_choice: Literal["auto", "none", "required"] | str | None = None
    response_format: ResponseFormat | None = None
    #: a raw completion prompt (``/v1/completions``): sent as-is to base models, instead of
    #: the Question/Answer rendering of ``messages``; chat models get ``messages``
    prompt: str | None = None
    #: None means "use the global setting"
    privacy: bool | None = None
    #: free-form labels carried to the ledger (user, team, run id, ...)
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("tier")
    @classmethod
    def _tier_range(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= 3:
            raise ValueError(f"tier must be 0, 1, 2 or 3, got {v}")
        return v

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[Message]) -> list[Message]:
        if not v:
            raise ValueError("messages must not be empty")
        if not any((m.content or "").strip() or m.tool_calls for m in v):
            raise ValueError("the prompt is empty: give at least one message with text")
        return v


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    #: input tokens served from the provider's prompt cache (billed at the cached price)
    cached_input_tokens: int = 0
    #: input tokens written to the prompt cache (Anthropic bills these above the input price)
    cache_write_tokens: int = 0
    #: True when any count was computed by Conclave because the provider reported none
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class StreamChunk(BaseModel):
    """One piece of a streamed answer.  ``usage`` is cumulative when present."""

    delta: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage | None = None
    stop_reason: StopReason | None = None


class ChatResponse(BaseModel):
    id: str = ""
    text: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    stop_reason: StopReason = StopReason.STOP
    usage: Usage = Field(default_factory=Usage)
    #: the catalog name of the model that answered, and its provider
    model: str = ""
    provider: str = ""
    tier: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    #: why routing chose this model when it was not what was asked for
    routing_note: str | None = None
    #: which stream policy stopped the answer early, if any
    stopped_by: str | None = None


class EmbedRequest(BaseModel):
    """Texts to embed with one named embedding model (``kind: embedding`` in the catalog).

    There is no tier routing for embeddings: vectors of two models are not comparable,
    so silently swapping the model would corrupt an index.
    """

    model: str
    inputs: list[str]
    #: None means "use the global setting"
    privacy: bool | None = None
    #: free-form labels carried to the ledger (user, team, run id, ...), as for chat
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _model_named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name the embedding model (a catalog model of kind embedding)")
        return v

    @field_validator("inputs")
    @classmethod
    def _inputs_not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("inputs must not be empty: give at least one text to embed")
        return v


class EmbedResponse(BaseModel):
    """One vector per input, in input order, as the provider sent it (not normalised)."""

    id: str = ""
    vectors: list[list[float]] = Field(default_factory=list)
    #: ``usage.input_tokens`` is what is billed; ``usage.estimated`` when the provider
    #: reported no count and Conclave estimated it; output tokens are always 0
    usage: Usage = Field(default_factory=Usage)
    #: the catalog name of the model that answered, and its provider
    model: str = ""
    provider: str = ""
    tier: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
