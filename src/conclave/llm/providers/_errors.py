"""Turn whatever an SDK or a socket raised into one :mod:`conclave.errors` type.

The router decides on retries from the error *type* alone (``RateLimited``
waits ``retry_after``, ``Overloaded`` backs off, ``BadProviderRequest`` moves
on), so the mapping lives here, once, for all three SDKs and both httpx
generations, instead of in each provider.

Rules, in order:

* ``PrivacyViolation`` raised in the network backend propagates unchanged; the
  SDKs wrap transport errors (``APIConnectionError``), so causes are unwrapped.
* The error body's type counts as much as the status: an ``overloaded_error``
  or a context-length error reads the same whether it came as a status or as
  an error event after HTTP 200.
* 429 → ``RateLimited`` (``retry_after`` from ``retry-after-ms`` or
  ``Retry-After`` seconds / HTTP-date); 529, 500, 502, 503, 504 →
  ``Overloaded``; 401/403 → ``AuthenticationFailed``; 408 → ``ProviderTimeout``;
  other 4xx → ``BadProviderRequest``.
* Timeouts → ``ProviderTimeout``; refused/reset/cut connections →
  ``ConnectionLost`` carrying the text that had arrived; bytes that do not
  parse → ``MalformedResponse``.

Messages never carry a key: authentication messages are written here rather
than copied (OpenAI echoes part of the key back), and upstream text is
scrubbed of anything shaped like a key before it is quoted.
"""

from __future__ import annotations

import email.utils
import json
import re
import ssl
import time
from collections.abc import Iterable, Mapping
from typing import Any

import anthropic
import anyio
import httpx
import httpx2
import ollama
import openai
import pydantic

from conclave.errors import (
    AuthenticationFailed,
    BadProviderRequest,
    ConnectionLost,
    ContextTooLong,
    MalformedResponse,
    Overloaded,
    PrivacyViolation,
    ProviderError,
    ProviderTimeout,
    RateLimited,
)

__all__ = [
    "ErrorBoundary",
    "ErrorContext",
    "body_details",
    "error_from_status",
    "find_privacy_violation",
    "normalise_error",
    "parse_retry_after",
    "scrub",
]

_RETRYABLE_STATUSES = {500, 502, 503, 504, 529}

_CONTEXT_CODES = {"context_length_exceeded", "exceed_context_size_error",
                  "string_above_max_length"}
_CONTEXT_PATTERNS = re.compile(
    r"prompt is too long|context[ _-]length|maximum context|context window"
    r"|exceeds the available context size|larger than the max context size"
    r"|too many tokens|input is too long",
    re.IGNORECASE,
)
_KEY_SHAPES = re.compile(
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-*.]{4,}"  # sk-..., sk-ant-..., sk-proj-...
    r"|\b(?:fw|tgp_v1)_[A-Za-z0-9_\-*.]{8,}"  # Fireworks, Together
    r"|Bearer\s+\S+",
    re.IGNORECASE,
)
_MAX_QUOTE = 300


class ErrorContext:
    """Who failed, for messages and hints: provider name, key variable, what had arrived."""

    def __init__(self, provider: str, *, api_key_env: str | None = None,
                 secrets: Iterable[str | None] = (), base_url: str | None = None) -> None:
        self.provider = provider
        self.api_key_env = api_key_env
        self.secrets = [s for s in secrets if s and len(s) >= 4]
        self.base_url = base_url


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove key-shaped substrings and the given secret values; shorten to a quotable length."""
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
        if len(secret) > 8:
            text = text.replace(secret[-8:], "[redacted]")
    text = _KEY_SHAPES.sub("[redacted]", text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_QUOTE else text[: _MAX_QUOTE - 1] + "…"


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None
                      ) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP-date)."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    raw_ms = lower.get("retry-after-ms")
    if raw_ms:
        try:
            ms = float(raw_ms)
        except ValueError:
            ms = -1.0
        if ms >= 0:
            return ms / 1000.0
    raw = lower.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(seconds, 0.0) if seconds == seconds else None  # NaN check


def body_details(body: object) -> tuple[str | None, str | None, str | None]:
    """``(type, code, message)`` from the error bodies the providers document.

    Handles OpenAI ``{"error": {"type", "code", "message"}}`` (and the SDK's
    already-unwrapped inner dict), llama.cpp's same shape with an integer
    code, Anthropic ``{"type": "error", "error": {"type", "message"}}`` and
    Ollama ``{"error": "text"}``.  A JSON string body is parsed first.
    """
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return None, None, body or None
    if not isinstance(body, Mapping):
        return None, None, None
    inner: Any = body.get("error", body)
    if isinstance(inner, str):
        return None, None, inner
    if not isinstance(inner, Mapping):
        inner = body
    etype = inner.get("type")
    code = inner.get("code")
    message = inner.get("message")
    details = inner.get("details")
    if code is None and isinstance(details, Mapping):
        code = details.get("error_code")
    return (
        str(etype) if etype is not None else None,
        str(code) if code is not None else None,
        str(message) if message is not None else None,
    )


def _is_context_error(etype: str | None, code: str | None, message: str | None) -> bool:
    if code in _CONTEXT_CODES or etype in _CONTEXT_CODES:
        return True
    return bool(message and _CONTEXT_PATTERNS.search(message))


def error_from_status(status: int | None, body: object, headers: Mapping[str, str] | None,
                      ctx: ErrorContext, *, partial_text: str = "") -> ProviderError:
    """Map an HTTP status (None for an error event inside a 200 stream) and body."""
    etype, code, raw_message = body_details(body)
    quoted = scrub(raw_message or "", ctx.secrets)
    where = f"{ctx.provider}" + (f" (HTTP {status})" if status else "")
    detail = f": {quoted}" if quoted else ""
    common: dict[str, Any] = {"provider": ctx.provider, "status_code": status}
    err: ProviderError

    if etype == "overloaded_error" or status == 529:
        err = Overloaded(f"{where} is overloaded{detail}", hint="retrying later usually works",
                         retry_after=parse_retry_after(headers), **common)
    elif status == 429 or etype in {"rate_limit_error", "rate_limit_exceeded"}:
        retry_after = parse_retry_after(headers)
        wait = f"; retry after {retry_after:g}s" if retry_after is not None else ""
        err = RateLimited(f"{where} rate limit reached{wait}{detail}",
                          hint="lower the request rate or raise the provider quota",
                          retry_after=retry_after, **common)
    elif (status is None or 400 <= status < 500) and _is_context_error(etype, code,
                                                                        raw_message):
        err = ContextTooLong(
            f"{where}: the prompt does not fit the model's context window{detail}",
            hint="shorten the conversation or retrieved context, or pick a model with a "
                 "larger context_length", **common)
    elif status in {401, 403} or etype in {"authentication_error", "permission_error",
                                            "permission_denied"}:
        # Never quote the body: OpenAI echoes part of the rejected key.
        env = ctx.api_key_env
        hint = (f"check that {env} holds a valid key with access to this model" if env
                else "check the server's API key settings")
        verb = "refused access" if status == 403 else "rejected the API key"
        err = AuthenticationFailed(f"{where} {verb}", hint=hint, **common)
    elif status == 408:
        err = ProviderTimeout(f"{where} timed out handling the request{detail}", **common)
    elif (status in _RETRYABLE_STATUSES or etype in {"api_error", "server_error",
                                                     "unavailable_error"}):
        err = Overloaded(f"{where} failed on its side{detail}",
                         hint="this is usually temporary; the router retries it",
                         retry_after=parse_retry_after(headers), **common)
    elif status is not None and 400 <= status < 500:
        hint = ("check the model id in the catalog" if status == 404
                else "the request was rejected as invalid; see the provider's message")
        err = BadProviderRequest(f"{where} rejected the request{detail}", hint=hint, **common)
    else:
        err = ProviderError(f"{where} returned an error{detail}", **common)
    if partial_text:
        err.partial_text = partial_text
    return err


def find_privacy_violation(exc: BaseException | None) -> PrivacyViolation | None:
    """The PrivacyViolation somewhere in ``exc``'s cause/context chain, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PrivacyViolation):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


_TIMEOUTS: tuple[type[BaseException], ...] = (
    httpx.TimeoutException, httpx2.TimeoutException, TimeoutError,
    openai.APITimeoutError, anthropic.APITimeoutError,
)
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (httpx.ConnectError, httpx2.ConnectError,
                                                    ConnectionRefusedError)
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    httpx.TransportError, httpx2.TransportError, OSError, anyio.EndOfStream,
    anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError,
    openai.APIConnectionError, anthropic.APIConnectionError,
)


def _lost(ctx: ErrorContext, exc: BaseException, partial_text: str) -> ConnectionLost:
    if any(isinstance(e, _CONNECT_ERRORS) for e in _chain(exc)):
        where = f" at {ctx.base_url}" if ctx.base_url else ""
        return ConnectionLost(
            f"cannot connect to {ctx.provider}{where}",
            hint="is the server running and the base URL right?",
            provider=ctx.provider, partial_text=partial_text,
        )
    cause = next((e for e in _chain(exc) if not isinstance(
        e, openai.APIConnectionError | anthropic.APIConnectionError)), exc)
    what = type(cause).__name__
    if partial_text:
        msg = f"the connection to {ctx.provider} dropped mid-answer ({what})"
    else:
        msg = f"the connection to {ctx.provider} failed ({what})"
    return ConnectionLost(msg, hint="retrying usually works", provider=ctx.provider,
                          partial_text=partial_text)


def _headers_of(response: object) -> Mapping[str, str] | None:
    headers = getattr(response, "headers", None)
    return headers if isinstance(headers, Mapping) else None


def normalise_error(exc: BaseException, ctx: ErrorContext, *, partial_text: str = ""
                    ) -> BaseException:
    """The error to raise in place of ``exc``: a ProviderError, or a PrivacyViolation.

    Cancellation and other ``BaseException``s that are not ``Exception`` are
    returned as they are: they are control flow, not provider failures.  So is
    any exception not recognised here: that is a bug in Conclave, and hiding it
    behind a ProviderError would send the router retrying it.
    """
    if not isinstance(exc, Exception):
        return exc
    privacy = find_privacy_violation(exc)
    if privacy is not None:
        return privacy
    if isinstance(exc, ProviderError):
        if partial_text and not getattr(exc, "partial_text", ""):
            exc.partial_text = partial_text
        return exc

    # HTTP status errors from the SDKs (also Anthropic error events, status 200).
    if isinstance(exc, openai.APIStatusError | anthropic.APIStatusError):
        status = exc.status_code if exc.status_code >= 400 else None
        return error_from_status(status, exc.body, _headers_of(exc.response), ctx,
                                 partial_text=partial_text)
    if isinstance(exc, openai.APIResponseValidationError | anthropic.APIResponseValidationError):
        return MalformedResponse(f"{ctx.provider} sent a response that does not match its API",
                                 provider=ctx.provider, status_code=exc.status_code)
    if isinstance(exc, ollama.ResponseError):
        status = exc.status_code if exc.status_code >= 400 else None
        return error_from_status(status, {"error": exc.error}, None, ctx,
                                 partial_text=partial_text)
    if isinstance(exc, ollama.RequestError):
        return BadProviderRequest(f"{ctx.provider}: {scrub(exc.error, ctx.secrets)}",
                                  provider=ctx.provider)
    if isinstance(exc, httpx.HTTPStatusError | httpx2.HTTPStatusError):
        resp = exc.response
        return error_from_status(resp.status_code, resp.text if resp.is_stream_consumed else None,
                                 resp.headers, ctx, partial_text=partial_text)

    # Transport: timeouts, refused or dropped connections.
    if any(isinstance(e, _TIMEOUTS) for e in _chain(exc)):
        err = ProviderTimeout(f"{ctx.provider} did not answer in time",
                              hint="raise routing.request_timeout, or retry",
                              provider=ctx.provider)
        if partial_text:
            err.partial_text = partial_text
        return err
    if isinstance(exc, _TRANSPORT_ERRORS):
        return _lost(ctx, exc, partial_text)

    # An error event inside a stream: the SDK's APIError carries the error body.
    if isinstance(exc, openai.APIError | anthropic.APIError):
        status = None
        if isinstance(exc.body, Mapping) and isinstance(exc.body.get("code"), int):
            status = exc.body["code"] if exc.body["code"] >= 400 else None
        body = exc.body if exc.body is not None else {"error": {"message": exc.message}}
        return error_from_status(status, body, None, ctx, partial_text=partial_text)

    # Bytes that do not parse.
    if isinstance(exc, json.JSONDecodeError | pydantic.ValidationError | UnicodeDecodeError):
        return MalformedResponse(
            f"{ctx.provider} sent data that is not valid JSON for its API "
            f"({type(exc).__name__}: {scrub(str(exc), ctx.secrets)})",
            hint="is the base URL pointing at the right kind of server?",
            provider=ctx.provider,
        )
    if isinstance(exc, openai.OpenAIError | anthropic.AnthropicError):
        return ProviderError(f"{ctx.provider}: {scrub(str(exc), ctx.secrets)}",
                             provider=ctx.provider)
    return exc


class ErrorBoundary:
    """``with ErrorBoundary(ctx) as b:`` around a provider call: errors leave normalised.

    Streams append what they yield to ``b.partial`` so a failure mid-answer
    carries the text that had arrived.  ``GeneratorExit`` and cancellation pass
    through untouched, which keeps ``aclose()`` on a stream working.
    """

    def __init__(self, ctx: ErrorContext) -> None:
        self.ctx = ctx
        self.partial: list[str] = []

    @property
    def partial_text(self) -> str:
        return "".join(self.partial)

    def __enter__(self) -> ErrorBoundary:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        err = normalise_error(exc, self.ctx, partial_text=self.partial_text)
        if err is exc:
            return False
        if isinstance(err, PrivacyViolation):
            raise err from None
        raise err from exc
