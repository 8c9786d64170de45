"""The Redis client the accounting backends share, and its failure mapping.

A blocking pool of a bounded size: a thousand concurrent calls queue for a
connection instead of opening a thousand sockets.  Short socket timeouts and
one reconnect-and-retry, so an outage fails closed within about
``timeout_s`` and a server restart (stale pooled sockets) heals on the next
call.  Retrying a script is safe because every script is idempotent by its
request id or lease id.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conclave.accounting._common import redact_url, short_error
from conclave.errors import BackendUnavailable

CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


def make_client(url: str, *, timeout_s: float = 2.0, max_connections: int = 64) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        decode_responses=True,
    )
    return aioredis.Redis(connection_pool=pool)


def unavailable(url: str, exc: BaseException) -> BackendUnavailable:
    safe = redact_url(url)
    return BackendUnavailable(
        f"Redis is unavailable at {safe}: {short_error(exc)}",
        backend="Redis",
        url=safe,
        hint="start Redis or fix accounting.redis_url; calls are refused until it is back",
    )


@contextlib.asynccontextmanager
async def guarded(url: str) -> AsyncIterator[None]:
    """Turn connection failures into BackendUnavailable (HTTP 503)."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise unavailable(url, exc) from exc
