"""RateLimiter contract: the same tests in-process and on Redis."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import pytest

from conclave.accounting.ratelimit import RateLimiter, RateLimitRule, rate_key
from conclave.errors import InvalidRequest, RateLimitExceeded

from . import _workers
from .conftest import REDIS_URL, SetClock, redis_prefix

pytestmark = pytest.mark.integration

KEY = rate_key("key_1", "/v1/chat/completions")


async def test_both_backends_satisfy_the_protocol(limiter_factory: Any) -> None:
    assert isinstance(await limiter_factory(), RateLimiter)


async def test_admitted_count_equals_the_limit_under_concurrency(limiter_factory: Any) -> None:
    limiter = await limiter_factory()
    limit = 1_000
    rule = RateLimitRule(requests_per_minute=limit)
    results = await asyncio.gather(*(limiter.acquire(KEY, rule) for _ in range(3_000)))
    admitted = sum(r.allowed for r in results)
    assert limit * 0.99 <= admitted <= limit
    refused = [r for r in results if not r.allowed]
    assert all(r.remaining == 0 and r.retry_after_s is not None for r in refused)
    assert all(0 < r.retry_after_s <= 60 for r in refused)  # type: ignore[operator]
    # another key is not affected
    other = await limiter.acquire(rate_key("key_2", "/v1/chat/completions"), rule)
    assert other.allowed and other.remaining == limit - 1


async def test_retry_after_and_headers(limiter_factory: Any) -> None:
    clock = SetClock()
    limiter = await limiter_factory(clock=clock.epoch)
    rule = RateLimitRule(requests_per_minute=3)
    first = await limiter.acquire(KEY, rule)
    assert first.allowed and (first.limit, first.remaining) == (3, 2)
    assert first.headers()["X-RateLimit-Remaining"] == "2"
    assert "Retry-After" not in first.headers()
    clock.advance(seconds=10)
    await limiter.acquire(KEY, rule)
    clock.advance(seconds=10)
    third = await limiter.acquire(KEY, rule)
    assert third.allowed and third.remaining == 0
    assert third.reset_s == pytest.approx(40.0)  # the first leaves the window at t=60

    clock.advance(seconds=5)  # t = 25
    refused = await limiter.acquire(KEY, rule)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(35.0)
    h = refused.headers()
    assert h["Retry-After"] == "35"
    assert (h["X-RateLimit-Limit"], h["X-RateLimit-Remaining"]) == ("3", "0")
    assert h["X-RateLimit-Reset"] == "35"
    assert h["X-RateLimit-Limit-Requests"] == "3"
    with pytest.raises(RateLimitExceeded) as exc:
        refused.raise_if_refused()
    assert exc.value.http_status == 429 and exc.value.headers["Retry-After"] == "35"
    assert "3 requests per minute" in str(exc.value) and KEY in str(exc.value)

    clock.advance(seconds=34.9)  # still inside the window
    assert not (await limiter.acquire(KEY, rule)).allowed
    clock.advance(seconds=0.2)  # t = 60.1: the first request has left the window
    again = await limiter.acquire(KEY, rule)
    assert again.allowed and again.remaining == 0
    assert first.raise_if_refused() is first


async def test_tokens_per_minute_reserve_and_adjust(limiter_factory: Any) -> None:
    clock = SetClock()
    limiter = await limiter_factory(clock=clock.epoch)
    rule = RateLimitRule(requests_per_minute=100, tokens_per_minute=10_000)
    a = await limiter.acquire(KEY, rule, tokens=6_000)  # prompt + max_tokens, worst case
    assert a.allowed and a.tokens is not None and a.tokens.remaining == 4_000
    assert a.dimension == "tokens"  # the tighter one
    clock.advance(seconds=1)
    b = await limiter.acquire(KEY, rule, tokens=6_000)
    assert not b.allowed and b.dimension == "tokens"
    assert b.retry_after_s == pytest.approx(59.0)
    assert b.headers()["X-RateLimit-Remaining-Tokens"] == "4000"
    assert b.requests is not None and b.requests.remaining == 99  # refused ones are not logged

    await limiter.adjust(a, 1_500)  # the call used far fewer tokens than reserved
    c = await limiter.acquire(KEY, rule, tokens=6_000)
    assert c.allowed and c.tokens is not None and c.tokens.used == 7_500
    await limiter.adjust(c, 9_000)  # more than estimated: counted, later calls wait
    d = await limiter.acquire(KEY, rule, tokens=1)
    assert not d.allowed
    # d needs 1 token: only when a (1,500 at t=0) leaves at t=60 is there room
    assert d.retry_after_s == pytest.approx(59.0)

    with pytest.raises(InvalidRequest, match="10000 tokens per minute"):
        await limiter.acquire(KEY, rule, tokens=10_001)


async def test_zero_limit_and_no_limit(limiter_factory: Any) -> None:
    limiter = await limiter_factory()
    closed = await limiter.acquire(KEY, RateLimitRule(requests_per_minute=0))
    assert not closed.allowed
    open_ = await limiter.acquire(KEY, RateLimitRule())
    assert open_.allowed and open_.limit is None and open_.headers() == {}


async def test_same_lease_is_admitted_once(limiter_factory: Any) -> None:
    limiter = await limiter_factory()
    rule = RateLimitRule(requests_per_minute=2)
    first = await limiter.acquire(KEY, rule, lease_id="req-1")
    assert first.allowed
    # a retried call (same lease) does not take a second slot
    again = await limiter.acquire(KEY, rule, lease_id="req-1")
    assert again.allowed and again.requests.used == 1  # type: ignore[union-attr]
    assert (await limiter.acquire(KEY, rule, lease_id="req-2")).allowed


async def test_redis_limit_is_global_across_four_processes() -> None:
    prefix = redis_prefix()
    limit = 1_000
    start_at = time.time() + 3.0
    with ProcessPoolExecutor(max_workers=4, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_workers.rate_race, REDIS_URL, prefix, KEY, limit, 600, start_at)
            for _ in range(4)
        ]
        admitted = await asyncio.to_thread(lambda: [f.result(timeout=90) for f in futures])
    total = sum(admitted)
    assert limit * 0.99 <= total <= limit
    assert all(a > 0 for a in admitted)  # every replica got a share: they really raced
    from conclave.accounting.backends.redis import RedisBudgetStore

    cleaner = await RedisBudgetStore.open(REDIS_URL, prefix=prefix)
    await cleaner.clear()
    await cleaner.aclose()
