"""The FastAPI application behind ``conclave serve``.

OpenAI-compatible endpoints (so the official SDK works unchanged), the budget,
spend and key admin API, ``/metrics`` (Prometheus), ``/healthz`` (the process
lives) and ``/readyz`` (backends answer).  The lifespan opens the gateway and
accounting and, on shutdown (uvicorn turns SIGTERM into it), drains the
ledger so no record is lost.

Middleware is plain ASGI rather than ``BaseHTTPMiddleware``: it wraps every
request, and the plain form adds no task or stream copies on the hot path.

:class:`HotRoutes` sends ``POST /v1/chat/completions`` and ``/v1/completions``
straight to their handlers, past FastAPI's router, exception middleware and
dependency solver: those endpoints take no FastAPI parameters (they read the
raw body), so that machinery did nothing for them but cost about a sixth of
the server's CPU per call.  It is the innermost of our middleware, so CORS,
request ids, access logs and metrics apply as before, and the same
:func:`error_response` renders ConclaveErrors there and in the app's handler.
The routes stay registered with FastAPI, for OpenAPI and for any other method.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import conclave
from conclave.api import openai_schema as oa
from conclave.api import routes_admin, routes_openai
from conclave.api.routes_openai import json_response
from conclave.api.state import AppState
from conclave.config import Settings, load_settings
from conclave.errors import ConclaveError, RateLimitExceeded

access_log = logging.getLogger("conclave.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per line.  Only fields set on purpose: never prompts or keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "method", "route", "status", "duration_ms", "api_key_id",
                    "model", "input_tokens", "output_tokens", "cost_usd", "error", "alert",
                    "prompt", "answer"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        return orjson.dumps(out, default=str).decode()


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("conclave")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class RequestContext:
    """Request id (``X-Request-ID`` in and out), timing, access log and HTTP metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = v.decode("latin-1")[:128]
                break
        rid = rid or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        state: AppState | None = getattr(scope["app"].state, "conclave", None)
        if state is not None:
            state.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - t0
            route_obj = scope.get("route")
            route = getattr(route_obj, "path", None) or "unmatched"
            method = scope["method"]
            if state is not None:
                state.metrics.in_flight.dec()
                state.metrics.observe_http(route, method, status, elapsed)
            if access_log.isEnabledFor(logging.INFO) and route not in ("/metrics", "/healthz"):
                extra = {"request_id": rid, "method": method, "route": route, "status": status,
                         "duration_ms": round(elapsed * 1000, 3)}
                extra.update(scope["state"].get("log_extra") or {})
                access_log.info("request", extra=extra)


def error_response(request: Request, exc: ConclaveError) -> Response:
    """A ConclaveError as an OpenAI-style JSON error, with ``Retry-After`` where it helps."""
    state: AppState | None = getattr(request.app.state, "conclave", None)
    headers = dict(getattr(exc, "headers", None) or {})
    if isinstance(exc, RateLimitExceeded) and "Retry-After" not in headers:
        retry = getattr(exc, "retry_after_s", None)
        if retry is not None:
            headers["Retry-After"] = str(max(1, int(retry + 0.999)))
    retry_after = getattr(exc, "retry_after", None)
    if exc.http_status in (429, 503) and retry_after and "Retry-After" not in headers:
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    if state is not None and exc.http_status in (402, 429, 503):
        state.metrics.refusals.labels(exc.code).inc()
    request.state.log_extra = {"error": exc.code}
    return json_response(oa.error_body(str(exc), exc.code, exc.http_status),
                         status=exc.http_status, headers=headers)


class HotRoutes:
    """``POST`` to the OpenAI completion endpoints, served without FastAPI's routing."""

    def __init__(self, app: ASGIApp, routes: dict[str, tuple[Any, Any]]) -> None:
        self.app = app
        #: path -> (handler taking a Request, the APIRoute it stands for)
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if hot is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        handler, route = hot
        scope["route"] = route  # what RequestContext labels metrics and logs with
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except ConclaveError as exc:
            response = error_response(request, exc)
        await response(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = AppState(settings)
        app.state.conclave = state
        try:
            await state.ready()
        except ConclaveError as exc:
            # Serve anyway: requests get a 503 until the backends answer.
            logging.getLogger("conclave.api").error("starting without backends: %s", exc)
        try:
            yield
        finally:
            state.draining = True
            await state.aclose()

    app = FastAPI(
        title="Conclave", version=conclave.__version__, lifespan=lifespan,
        description="Local-first LLM gateway with exact accounting. OpenAI-compatible.",
    )
    if settings.api.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.api.cors_origins,
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-ID", "Retry-After", "X-RateLimit-Limit",
                                           "X-RateLimit-Remaining", "X-RateLimit-Reset"])
    app.add_middleware(RequestContext)

    @app.exception_handler(ConclaveError)
    async def conclave_error(request: Request, exc: ConclaveError) -> Response:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e.get("loc", ()))
        return json_response(oa.error_body(f"{where}: {e.get('msg')}", "invalid_request", 400),
                             status=400)

    app.include_router(routes_openai.router)
    app.include_router(routes_admin.router)
    hot = {}
    for route in routes_openai.router.routes:
        path = getattr(route, "path", None)
        if path in routes_openai.HOT_ROUTES and "POST" in getattr(route, "methods", ()):
            hot[path] = (routes_openai.HOT_ROUTES[path], route)
    # Added last of the middleware we add, so CORS and RequestContext wrap it.
    app.user_middleware.append(Middleware(HotRoutes, routes=hot))

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        state: AppState = request.app.state.conclave
        if state.draining:
            return json_response({"status": "draining"}, status=503)
        try:
            await state.ready()
        except ConclaveError as exc:
            return json_response({"status": "unavailable", "error": str(exc)}, status=503)
        checks = await state.accounting.readiness()
        ok = all(v == "ok" for v in checks.values())
        return json_response({"status": "ok" if ok else "unavailable", "checks": checks,
                              "backends": state.accounting.backends}, status=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state: AppState = request.app.state.conclave
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    return app
