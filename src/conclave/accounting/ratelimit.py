"""Rate limits per key (API key + route): requests per minute and tokens per minute.

Algorithm: a sliding-window *log*.  Each admitted request is an entry with its
timestamp (and, for tokens, its weight); an entry counts while it is younger
than the window.  A request is admitted only if the entries in the window
plus this one stay within the limit, so the admitted count in ANY window of
60 s never exceeds the limit - exactly, not approximately.  The alternatives
fall short of the "within 1%" goal: GCRA/token bucket admit a full burst and
then the steady rate, up to twice the limit in the first minute; the
sliding-window *counter* interpolates between two fixed windows and over- or
under-admits by the interpolation error.  The log costs memory proportional to
the limit per active key (a few bytes per request), which is fine for
per-minute limits.  Refused requests are not logged, so a client hammering a
closed limit does not push its own reopening further away.

Tokens: the estimate (prompt + max output tokens) is reserved up front with
the request; ``adjust`` replaces it with the actual count after the call.

Backends: in-process (:mod:`.backends.memory`, one process) and Redis
(:mod:`.backends.redis_ratelimit`, one Lua script per check, global across
replicas).  Both take the time from the caller's clock in milliseconds.
"""

from __future__ import annotations

import math
import uuid
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from conclave.errors import InvalidRequest, RateLimitExceeded


class RateLimitRule(BaseModel):
    """Limits for one key; None means no limit on that dimension."""

    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)


class WindowState(BaseModel):
    limit: int
    used: int
    remaining: int
    #: seconds until the oldest entry leaves the window (remaining next grows); 0 if empty
    reset_s: float


class RateLimitResult(BaseModel):
    """The answer to ``acquire``; ``headers()`` gives what the API server sends back."""

    allowed: bool
    key: str
    lease_id: str
    reserved_tokens: int = 0
    #: the binding dimension (the refusing one when refused, else the one nearest its limit)
    dimension: Literal["requests", "tokens"] | None = None
    limit: int | None = None
    remaining: int | None = None
    reset_s: float = 0.0
    #: seconds until a retry can succeed; None when allowed
    retry_after_s: float | None = None
    requests: WindowState | None = None
    tokens: WindowState | None = None

    def headers(self) -> dict[str, str]:
        """``X-RateLimit-Limit/Remaining/Reset`` for the binding limit, per-dimension
        ``X-RateLimit-*-Requests``/``-Tokens`` (OpenAI's names), and ``Retry-After`` (whole
        seconds, rounded up) when refused."""
        out: dict[str, str] = {}
        if self.limit is not None:
            out["X-RateLimit-Limit"] = str(self.limit)
            out["X-RateLimit-Remaining"] = str(max(0, self.remaining or 0))
            out["X-RateLimit-Reset"] = str(math.ceil(self.reset_s))
        for name, state in (("Requests", self.requests), ("Tokens", self.tokens)):
            if state is not None:
                out[f"X-RateLimit-Limit-{name}"] = str(state.limit)
                out[f"X-RateLimit-Remaining-{name}"] = str(state.remaining)
                out[f"X-RateLimit-Reset-{name}"] = f"{state.reset_s:.3f}s"
        if not self.allowed and self.retry_after_s is not None:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return out

    def raise_if_refused(self) -> RateLimitResult:
        if self.allowed:
            return self
        raise RateLimitExceeded(
            f"rate limit of {self.limit} {self.dimension} per minute reached for {self.key}",
            retry_after=self.retry_after_s or 0.0,
            headers=self.headers(),
            hint=f"retry after {math.ceil(self.retry_after_s or 0)} s, or ask an admin to "
            "raise the key's limit",
        )


def rate_key(api_key_id: str, route: str) -> str:
    """The limiter key for one API key on one route."""
    return f"{api_key_id}|{route}"


def new_lease() -> str:
    return uuid.uuid4().hex


def check_request(rule: RateLimitRule, tokens: int) -> None:
    if tokens < 0:
        raise InvalidRequest(f"token estimate must be >= 0, got {tokens}")
    tpm = rule.tokens_per_minute
    if tpm is not None and tokens > tpm:
        raise InvalidRequest(
            f"this request may use {tokens} tokens but the limit is {tpm} tokens per minute",
            hint="lower max_tokens or shorten the prompt, or ask an admin to raise the limit",
        )


def build_result(
    *,
    key: str,
    lease: str,
    rule: RateLimitRule,
    tokens: int,
    allowed: bool,
    count: int,
    used: int,
    retry_ms: int,
    reset_r_ms: int,
    reset_t_ms: int,
) -> RateLimitResult:
    """Assemble the result from the raw numbers both backends compute the same way."""
    req = tok = None
    if rule.requests_per_minute is not None:
        lim = rule.requests_per_minute
        req = WindowState(limit=lim, used=count, remaining=max(0, lim - count),
                          reset_s=max(0, reset_r_ms) / 1000)
    if rule.tokens_per_minute is not None:
        lim = rule.tokens_per_minute
        tok = WindowState(limit=lim, used=used, remaining=max(0, lim - used),
                          reset_s=max(0, reset_t_ms) / 1000)
    states = [s for s in (req, tok) if s is not None]
    binding: WindowState | None = None
    if states:
        if not allowed:
            # the dimension that refused: no room left for this request
            refusing = [
                s for s in states
                if (s is req and s.used + 1 > s.limit) or (s is tok and s.used + tokens > s.limit)
            ]
            binding = max(refusing or states, key=lambda s: s.reset_s)
        else:
            binding = min(states, key=lambda s: s.remaining / s.limit if s.limit else 0)
    return RateLimitResult(
        allowed=allowed,
        key=key,
        lease_id=lease,
        reserved_tokens=tokens if allowed else 0,
        dimension=None if binding is None else ("requests" if binding is req else "tokens"),
        limit=binding.limit if binding else None,
        remaining=binding.remaining if binding else None,
        reset_s=binding.reset_s if binding else 0.0,
        retry_after_s=None if allowed else max(0, retry_ms) / 1000,
        requests=req,
        tokens=tok,
    )


@runtime_checkable
class RateLimiter(Protocol):
    """Implementations: in-process (one replica), Redis (global across replicas)."""

    async def acquire(
        self, key: str, rule: RateLimitRule, *, tokens: int = 0, lease_id: str | None = None
    ) -> RateLimitResult:
        """Admit or refuse one request reserving ``tokens``; a refused one reserves nothing."""

    async def adjust(self, result: RateLimitResult, actual_tokens: int) -> None:
        """Replace the token estimate of an admitted request by the actual count."""

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
