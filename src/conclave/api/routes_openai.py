"""OpenAI-compatible endpoints: chat and text completions, embeddings, the model list.

The hot path reads the body with orjson and builds Conclave types directly
(no FastAPI body model), since every microsecond here is added latency.
Per-key rate limits are taken here, around the gateway call; budgets are the
gateway's own business.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from conclave.accounting.ratelimit import RateLimitResult, RateLimitRule, rate_key
from conclave.api import openai_schema as oa
from conclave.api.auth import Caller, authenticate
from conclave.api.state import AppState
from conclave.errors import ConclaveError, InvalidRequest
from conclave.gateway import GatewayStream, embed_token_bound, input_token_bound
from conclave.llm.types import ChatRequest, ChatResponse, EmbedRequest, EmbedResponse

router = APIRouter()
Req = TypeVar("Req", ChatRequest, EmbedRequest)


def _state(request: Request) -> AppState:
    return request.app.state.conclave


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers,
                    media_type="application/json")


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _privacy(request: Request) -> bool | None:
    raw = request.headers.get("x-conclave-privacy")
    if raw is None:
        return None
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _label(req: Req, caller: Caller, request: Request, route: str) -> Req:
    meta = dict(req.metadata)
    meta["route"] = route
    # The call id is always ours: a client reusing X-Request-ID must not be able to make
    # two calls share a reservation or a ledger record.  The client's id is kept beside it.
    meta["request_id"] = uuid.uuid4().hex
    meta["client_request_id"] = request.state.request_id
    if caller.key is not None:
        meta["api_key_id"] = caller.key.id
        if caller.key.user:
            meta["user"] = caller.key.user
        if caller.key.team:
            meta["team"] = caller.key.team
    for header, key in (("x-conclave-run-id", "run_id"), ("x-conclave-workflow-id",
                        "workflow_id")):
        if request.headers.get(header):
            meta[key] = request.headers[header]
    return req.model_copy(update={"metadata": meta})


async def _admit(state: AppState, caller: Caller, route: str, tokens: int
                 ) -> RateLimitResult | None:
    """Take the caller's per-key rate limits for one call of at most ``tokens`` tokens."""
    api = state.settings.api
    key = caller.key
    rule = RateLimitRule(
        requests_per_minute=key.requests_per_minute if key and key.requests_per_minute
        is not None else api.requests_per_minute,
        tokens_per_minute=key.tokens_per_minute if key and key.tokens_per_minute
        is not None else api.tokens_per_minute,
    )
    if rule.requests_per_minute is None and rule.tokens_per_minute is None:
        return None
    result = await state.accounting.ratelimiter.acquire(
        rate_key(caller.key_id, route), rule,
        tokens=tokens if rule.tokens_per_minute is not None else 0)
    if not result.allowed:
        state.metrics.refusals.labels("rate_limit_exceeded").inc()
    result.raise_if_refused()
    return result


async def _settle_tokens(state: AppState, admitted: RateLimitResult | None,
                         resp: ChatResponse | EmbedResponse | None) -> None:
    if admitted is not None and admitted.reserved_tokens:
        with anyio.CancelScope(shield=True):
            actual = resp.usage.total_tokens if resp is not None else 0
            await state.accounting.ratelimiter.adjust(admitted, actual)


Resp = TypeVar("Resp", ChatResponse, EmbedResponse)


async def _settled(state: AppState, admitted: RateLimitResult | None,
                   call: Awaitable[Resp]) -> Resp:
    """Await a non-streamed gateway call; the rate-limit tokens it did not use go back
    however it ends, and a success is counted in the metrics."""
    resp: Resp | None = None
    try:
        resp = await call
    finally:
        await _settle_tokens(state, admitted, resp)
    state.metrics.observe_call(resp, "success")
    return resp


async def _serve(request: Request, route: str,
                 parse: Callable[..., ChatRequest],
                 render: Callable[[ChatResponse, str], dict[str, Any]],
                 stream_render: Callable[..., AsyncIterator[bytes]]) -> Response:
    state = _state(request)
    caller = await authenticate(request, state)
    body = await _body(request)
    req = _label(parse(body, privacy=_privacy(request)), caller, request, route)
    tokens = input_token_bound(req) + (req.max_tokens or state.settings.default_max_tokens)
    admitted = await _admit(state, caller, route, tokens)
    headers = admitted.headers() if admitted is not None else {}
    rid = req.metadata["request_id"]
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            stream = await state.gateway.stream(req)
        except BaseException:
            await _settle_tokens(state, admitted, None)
            raise
        return StreamingResponse(
            stream_render(state, stream, rid, include_usage, admitted),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    resp = await _settled(state, admitted, state.gateway.complete(req))
    request.state.log_extra = {"model": resp.model, "input_tokens": resp.usage.input_tokens,
                               "output_tokens": resp.usage.output_tokens,
                               "cost_usd": resp.cost_usd}
    if state.settings.api.log_bodies:  # opt-in only: prompts can hold personal data
        request.state.log_extra["prompt"] = [m.content for m in req.messages]
        request.state.log_extra["answer"] = resp.text
    return json_response(render(resp, rid), headers=headers)


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _stream_events(state: AppState, stream: GatewayStream, rid: str, include_usage: bool,
                         admitted: RateLimitResult | None, *, chat: bool) -> AsyncIterator[bytes]:
    """SSE in OpenAI's format.  However the stream ends (finished, error, or the client
    gone), the gateway stream is closed, which settles and records the call."""
    created = int(time.time())
    model = stream.model.name
    it = aiter(stream)
    try:
        if chat:
            yield _sse(oa.chat_chunk(rid, model, created, role=True))
        try:
            async for chunk in it:
                if chunk.delta or chunk.tool_calls:
                    yield _sse(oa.chat_chunk(rid, model, created, chunk) if chat else
                               oa.completion_chunk(rid, model, created, chunk.delta))
        except ConclaveError as exc:
            # Headers are sent: the error can only travel as an event now.
            yield _sse(oa.error_body(str(exc), exc.code, exc.http_status))
            return
        resp = stream.response
        yield _sse(oa.chat_chunk(rid, model, created, finish=resp.stop_reason) if chat else
                   oa.completion_chunk(rid, model, created, finish=resp.stop_reason))
        if include_usage:
            yield _sse(oa.chat_chunk(rid, model, created, usage=resp) if chat else
                       oa.completion_chunk(rid, model, created, usage=resp))
        yield b"data: [DONE]\n\n"
    finally:
        with anyio.CancelScope(shield=True):
            await it.aclose()  # type: ignore[attr-defined]
            resp = stream.response
            outcome = "cut" if stream._managed.cut else "success"
            if resp.model:
                state.metrics.observe_call(resp, outcome)
            await _settle_tokens(state, admitted, resp)


async def _chat_events(state: AppState, stream: GatewayStream, rid: str, include_usage: bool,
                       admitted: RateLimitResult | None) -> AsyncIterator[bytes]:
    async for b in _stream_events(state, stream, rid, include_usage, admitted, chat=True):
        yield b


async def _completion_events(state: AppState, stream: GatewayStream, rid: str,
                             include_usage: bool, admitted: RateLimitResult | None
                             ) -> AsyncIterator[bytes]:
    async for b in _stream_events(state, stream, rid, include_usage, admitted, chat=False):
        yield b


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _serve(request, "/v1/chat/completions", oa.chat_request, oa.chat_response,
                        _chat_events)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _serve(request, "/v1/completions", oa.completion_request,
                        oa.completion_response, _completion_events)


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    """Vectors from a catalog embedding model, accounted like a chat call."""
    state = _state(request)
    caller = await authenticate(request, state)
    body = await _body(request)
    route = "/v1/embeddings"
    req = _label(oa.embed_request(body, privacy=_privacy(request)), caller, request, route)
    admitted = await _admit(state, caller, route, embed_token_bound(req))
    headers = admitted.headers() if admitted is not None else {}
    resp = await _settled(state, admitted, state.gateway.embed(req))
    request.state.log_extra = {"model": resp.model, "input_tokens": resp.usage.input_tokens,
                               "inputs": len(req.inputs), "cost_usd": resp.cost_usd}
    return json_response(oa.embed_response(resp, body.get("encoding_format") or "float"),
                         headers=headers)


#: POST endpoints that take only the raw request: app.HotRoutes serves them directly
HOT_ROUTES: dict[str, Callable[[Request], Awaitable[Response]]] = {
    "/v1/chat/completions": chat_completions,
    "/v1/completions": completions,
    "/v1/embeddings": embeddings,
}


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state = _state(request)
    await authenticate(request, state)
    settings = state.settings
    data = [{"id": f"tier-{t}", "object": "model", "created": 0, "owned_by": "conclave"}
            for t in range(4)]
    for m in settings.catalog.models.values():
        if settings.provider_enabled(settings.catalog.provider_of(m)):
            data.append({"id": m.name, "object": "model", "created": 0, "owned_by": m.provider,
                         "conclave": {"tier": m.tier, "kind": m.kind, "local": m.local,
                                      "context_length": m.context_length}})
    return json_response({"object": "list", "data": data})
