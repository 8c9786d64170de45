"""In-process rate limiter: the embedded default, exact within one process.

Same sliding-window log and the same numbers as the Redis limiter, kept in
deques.  asyncio runs one coroutine at a time and ``acquire`` never awaits
between its check and its write, so no lock is needed.  Limits are per
process: with several replicas use the Redis limiter.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from conclave.accounting.ratelimit import (
    RateLimitResult,
    RateLimitRule,
    build_result,
    check_request,
    new_lease,
)


@dataclass
class _Window:
    #: (timestamp ms, lease) of admitted requests, oldest first
    requests: deque[tuple[int, str]] = field(default_factory=deque)
    #: [timestamp ms, lease, tokens] of admitted token reservations, oldest first
    tokens: deque[list[int | str]] = field(default_factory=deque)
    weights: dict[str, list[int | str]] = field(default_factory=dict)
    #: leases of the requests in the window (a retried lease is admitted once)
    leases: set[str] = field(default_factory=set)
    used: int = 0

    def prune(self, cutoff: int) -> None:
        while self.requests and self.requests[0][0] <= cutoff:
            self.leases.discard(self.requests.popleft()[1])
        while self.tokens and int(self.tokens[0][0]) <= cutoff:
            _, lease, weight = self.tokens.popleft()
            self.weights.pop(str(lease), None)
            self.used -= int(weight)

    def empty(self) -> bool:
        return not self.requests and not self.tokens


class MemoryRateLimiter:
    backend_name = "memory"

    def __init__(
        self, *, window_s: float = 60.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._window = int(window_s * 1000)
        self._clock = clock
        self._keys: dict[str, _Window] = {}
        self._calls = 0

    async def acquire(
        self, key: str, rule: RateLimitRule, *, tokens: int = 0, lease_id: str | None = None
    ) -> RateLimitResult:
        check_request(rule, tokens)
        lease = lease_id or new_lease()
        now = int(self._clock() * 1000)
        w = self._keys.setdefault(key, _Window())
        w.prune(now - self._window)
        self._sweep(now)
        rpm, tpm = rule.requests_per_minute, rule.tokens_per_minute
        allowed, retry = True, 0
        count = len(w.requests)
        if (rpm is not None and lease in w.leases) or (tpm is not None and tokens > 0
                                                        and lease in w.weights):
            return self._result(key, lease, rule, tokens, True, w, 0, now)
        if rpm is not None and count + 1 > rpm:
            allowed = False
            retry = -1 if rpm == 0 else w.requests[count - rpm][0] + self._window - now
        if tpm is not None and w.used + tokens > tpm:
            allowed = False
            need, freed, wait = w.used + tokens - tpm, 0, -1
            for ts, _, weight in w.tokens:
                freed += int(weight)
                if freed >= need:
                    wait = int(ts) + self._window - now
                    break
            retry = max(retry, wait)
        if allowed:
            if rpm is not None:
                w.requests.append((now, lease))
                w.leases.add(lease)
            if tpm is not None and tokens > 0:
                entry: list[int | str] = [now, lease, tokens]
                w.tokens.append(entry)
                w.weights[lease] = entry
                w.used += tokens
        return self._result(key, lease, rule, tokens, allowed, w, retry, now)

    def _result(
        self, key: str, lease: str, rule: RateLimitRule, tokens: int, allowed: bool,
        w: _Window, retry: int, now: int,
    ) -> RateLimitResult:
        reset_r = w.requests[0][0] + self._window - now if w.requests else 0
        reset_t = int(w.tokens[0][0]) + self._window - now if w.tokens else 0
        return build_result(
            key=key, lease=lease, rule=rule, tokens=tokens, allowed=allowed,
            count=len(w.requests), used=w.used, retry_ms=retry, reset_r_ms=reset_r,
            reset_t_ms=reset_t,
        )

    async def adjust(self, result: RateLimitResult, actual_tokens: int) -> None:
        if not result.allowed or result.tokens is None:
            return  # refused, or no token limit to account against
        w = self._keys.setdefault(result.key, _Window())
        entry = w.weights.get(result.lease_id)
        if entry is not None:
            w.used += actual_tokens - int(entry[2])
            entry[2] = actual_tokens
        elif actual_tokens > 0:
            now = int(self._clock() * 1000)
            entry = [now, result.lease_id, actual_tokens]
            w.tokens.append(entry)
            w.weights[result.lease_id] = entry
            w.used += actual_tokens

    def _sweep(self, now: int) -> None:
        """Forget idle keys now and then, so memory follows the active keys only."""
        self._calls += 1
        if self._calls % 10_000:
            return
        cutoff = now - self._window
        for key in list(self._keys):
            w = self._keys[key]
            w.prune(cutoff)
            if w.empty():
                del self._keys[key]

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._keys.clear()
