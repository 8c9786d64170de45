"""OpenAI wire format <-> Conclave types, so the official ``openai`` SDK works unchanged.

The ``model`` field takes a catalog name (``openai/gpt-5-mini``), or routes by
tier with ``tier-0`` ... ``tier-3`` (``auto`` means tier 0).  Privacy can be
asked per request with the ``X-Conclave-Privacy: 1`` header.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from conclave.errors import InvalidRequest
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
)

_FINISH = {
    StopReason.STOP: "stop",
    StopReason.LENGTH: "length",
    StopReason.TOOL_CALLS: "tool_calls",
    StopReason.CONTENT_FILTER: "content_filter",
    StopReason.CANCELLED: "stop",
    StopReason.ERROR: "stop",
}


def _text(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)
                 and p.get("type") in ("text", "input_text")]
        return "".join(parts)
    raise InvalidRequest("message content must be a string or a list of text parts")


def _message(raw: Any, i: int) -> Message:
    if not isinstance(raw, dict) or "role" not in raw:
        raise InvalidRequest(f"messages[{i}] must be an object with a role")
    role = raw["role"]
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant", "tool"):
        raise InvalidRequest(f"messages[{i}].role {role!r} is not one of system, user, "
                             "assistant, tool")
    calls = []
    for c in raw.get("tool_calls") or []:
        fn = c.get("function") or {}
        args = fn.get("arguments") or "{}"
        try:
            parsed = json.loads(args) if isinstance(args, str) else dict(args)
        except (json.JSONDecodeError, TypeError, ValueError):
            parsed = {}
        calls.append(ToolCall(id=c.get("id") or "", name=fn.get("name") or "",
                              arguments=parsed if isinstance(parsed, dict) else {}))
    return Message(role=Role(role), content=_text(raw.get("content")), tool_calls=calls,
                   tool_call_id=raw.get("tool_call_id"), name=raw.get("name"))


def _route(model: Any) -> dict[str, Any]:
    if not isinstance(model, str) or not model:
        raise InvalidRequest("`model` is required: a catalog name or tier-0 .. tier-3",
                             hint="GET /v1/models lists them")
    if model == "auto":
        return {"tier": 0}
    if model.startswith(("tier-", "tier:")):
        try:
            return {"tier": int(model[5:])}
        except ValueError:
            raise InvalidRequest(f"model {model!r}: tier must be tier-0 .. tier-3") from None
    return {"model": model}


def _common(body: dict[str, Any], privacy: bool | None) -> dict[str, Any]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    fields: dict[str, Any] = {
        **_route(body.get("model")),
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "seed": body.get("seed"),
        "stop": stops,
        "privacy": privacy,
    }
    if body.get("user"):
        fields["metadata"] = {"user": str(body["user"])}
    return fields


def chat_request(body: dict[str, Any], *, privacy: bool | None = None) -> ChatRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("`messages` must be a non-empty list")
    tools = [
        ToolSpec(name=t["function"]["name"], description=t["function"].get("description", ""),
                 parameters=t["function"].get("parameters") or {"type": "object"})
        for t in body.get("tools") or [] if t.get("type") == "function"
    ]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name")
    fmt = body.get("response_format")
    response_format = None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        js = fmt.get("json_schema") or {}
        response_format = ResponseFormat(type="json_schema", name=js.get("name", "response"),
                                         schema=js.get("schema") or {"type": "object"})
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        response_format = ResponseFormat(type="json_object")
    return ChatRequest(
        messages=[_message(m, i) for i, m in enumerate(messages)],
        tools=tools, tool_choice=choice, response_format=response_format,
        **_common(body, privacy),
    )


def completion_request(body: dict[str, Any], *, privacy: bool | None = None) -> ChatRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("`prompt` must be a non-empty string")
    return ChatRequest(messages=[Message.user(prompt)], prompt=prompt, **_common(body, privacy))


def _usage(resp: ChatResponse) -> dict[str, Any]:
    u = resp.usage
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
    }


def _conclave_extra(resp: ChatResponse) -> dict[str, Any]:
    return {"provider": resp.provider, "tier": resp.tier, "cost_usd": resp.cost_usd,
            "latency_ms": round(resp.latency_ms, 3), "ttft_ms": resp.ttft_ms,
            "estimated_usage": resp.usage.estimated, "routing_note": resp.routing_note,
            "stopped_by": resp.stopped_by}


def _tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for c in calls]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_response(resp: ChatResponse, rid: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": resp.text}
    if resp.tool_calls:
        message["tool_calls"] = _tool_calls(resp.tool_calls)
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()),
        "model": resp.model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _FINISH[resp.stop_reason]}],
        "usage": _usage(resp), "conclave": _conclave_extra(resp),
    }


def completion_response(resp: ChatResponse, rid: str) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()),
        "model": resp.model,
        "choices": [{"index": 0, "text": resp.text, "logprobs": None,
                     "finish_reason": _FINISH[resp.stop_reason]}],
        "usage": _usage(resp), "conclave": _conclave_extra(resp),
    }


def chat_chunk(rid: str, model: str, created: int, chunk: StreamChunk | None = None, *,
               role: bool = False, finish: StopReason | None = None,
               usage: ChatResponse | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if chunk is not None and chunk.delta:
        delta["content"] = chunk.delta
    if chunk is not None and chunk.tool_calls:
        delta["tool_calls"] = [{"index": i, **c} for i, c in
                               enumerate(_tool_calls(chunk.tool_calls))]
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": model}
    if usage is not None:
        out["choices"] = []
        out["usage"] = _usage(usage)
        out["conclave"] = _conclave_extra(usage)
    else:
        out["choices"] = [{"index": 0, "delta": delta,
                           "finish_reason": _FINISH[finish] if finish else None}]
    return out


def completion_chunk(rid: str, model: str, created: int, text: str = "", *,
                     finish: StopReason | None = None,
                     usage: ChatResponse | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                           "model": model}
    if usage is not None:
        out["choices"] = []
        out["usage"] = _usage(usage)
        out["conclave"] = _conclave_extra(usage)
    else:
        out["choices"] = [{"index": 0, "text": text, "logprobs": None,
                           "finish_reason": _FINISH[finish] if finish else None}]
    return out


def error_body(message: str, code: str, status: int) -> dict[str, Any]:
    """OpenAI's error envelope, which the SDK turns into the matching exception class."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
            403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
                status, "api_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


# --- embeddings -------------------------------------------------------------------------


def embed_request(body: dict[str, Any], *, privacy: bool | None = None) -> EmbedRequest:
    """``POST /v1/embeddings``: text inputs for one named embedding model.

    Token-id inputs and ``dimensions`` are refused with a clear error rather than
    ignored: Conclave has no tokenizer of the remote model to decode ids with, and
    quietly returning full-size vectors to a client that asked for fewer would
    corrupt its index.
    """
    route = _route(body.get("model"))
    if "tier" in route:
        raise InvalidRequest("embeddings need a named embedding model, not a tier",
                             hint="GET /v1/models lists the models of kind embedding")
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("`input` must be a string or a non-empty list of strings")
    for i, item in enumerate(inputs):
        if not isinstance(item, str):
            raise InvalidRequest(f"input[{i}] is not a string: token-id inputs are not "
                                 "supported", hint="send the text itself")
        if not item.strip():
            raise InvalidRequest(f"input[{i}] is empty", hint="every input needs some text")
    if body.get("dimensions") is not None:
        raise InvalidRequest("`dimensions` is not supported: vectors come at the model's "
                             "own size", hint="leave `dimensions` out")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise InvalidRequest(f"encoding_format {fmt!r} is not float or base64")
    metadata = {"user": str(body["user"])} if body.get("user") else {}
    return EmbedRequest(model=route["model"], inputs=inputs, privacy=privacy,
                        metadata=metadata)


def embed_response(resp: EmbedResponse, encoding_format: str = "float") -> dict[str, Any]:
    """OpenAI's list of embeddings; ``base64`` packs little-endian float32 as OpenAI does."""
    import numpy as np

    def encode(vector: list[float]) -> Any:
        if encoding_format == "base64":
            return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        return vector

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                 for i, v in enumerate(resp.vectors)],
        "model": resp.model,
        "usage": {"prompt_tokens": resp.usage.input_tokens,
                  "total_tokens": resp.usage.input_tokens},
    }
