"""Global rate limits on Redis: one Lua script per check, shared by every replica.

The sliding-window log of :mod:`conclave.accounting.ratelimit` kept in Redis
sorted sets (``<prefix>rl:<key>:r`` for requests, ``:t``/``:tw``/``:ts`` for
token reservations, their weights and their sum).  Check and record happen in
one script, so four replicas admitting against one key admit exactly the limit
between them.  Keys expire one window after their last use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from conclave.accounting.backends import _lua
from conclave.accounting.backends._redis import guarded, make_client
from conclave.accounting.ratelimit import (
    RateLimitResult,
    RateLimitRule,
    build_result,
    check_request,
    new_lease,
)


class RedisRateLimiter:
    backend_name = "Redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "{conclave}:",
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 2.0,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self._window = int(window_s * 1000)
        self._clock = clock
        self._r = make_client(url, timeout_s=timeout_s, max_connections=max_connections)
        self._acquire = self._r.register_script(_lua.RATE_ACQUIRE)
        self._adjust = self._r.register_script(_lua.RATE_ADJUST)

    @classmethod
    async def open(cls, url: str = "redis://127.0.0.1:6379/0", **kwargs: Any) -> RedisRateLimiter:
        self = cls(url, **kwargs)
        try:
            await self.ping()
        except Exception:
            await self._r.aclose()
            raise
        return self

    def _base(self, key: str) -> str:
        return f"{self.prefix}rl:{key}"

    async def acquire(
        self, key: str, rule: RateLimitRule, *, tokens: int = 0, lease_id: str | None = None
    ) -> RateLimitResult:
        check_request(rule, tokens)
        lease = lease_id or new_lease()
        rpm = -1 if rule.requests_per_minute is None else rule.requests_per_minute
        tpm = -1 if rule.tokens_per_minute is None else rule.tokens_per_minute
        now = int(self._clock() * 1000)
        async with guarded(self.url):
            allowed, count, used, retry, reset_r, reset_t = await self._acquire(
                args=[self._base(key), now, self._window, rpm, tpm, tokens, lease]
            )
        return build_result(
            key=key, lease=lease, rule=rule, tokens=tokens, allowed=bool(allowed),
            count=int(count), used=int(used), retry_ms=int(retry), reset_r_ms=int(reset_r),
            reset_t_ms=int(reset_t),
        )

    async def adjust(self, result: RateLimitResult, actual_tokens: int) -> None:
        if not result.allowed or result.tokens is None:
            return  # refused, or no token limit to account against
        now = int(self._clock() * 1000)
        async with guarded(self.url):
            await self._adjust(
                args=[self._base(result.key), result.lease_id, actual_tokens, now, self._window]
            )

    async def ping(self) -> None:
        async with guarded(self.url):
            await self._r.ping()

    async def aclose(self) -> None:
        await self._r.aclose()
