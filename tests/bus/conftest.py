"""Bus fixtures: the same tests run on the in-process bus and on the real NATS server.

Each NATS test gets its own subject prefix, hence its own JetStream stream,
which is deleted afterwards, so tests never see each other's events or
durable consumers.  Timings are shrunk (``ack_wait`` 1 s, backoff 50 ms) so
redelivery and dead-lettering finish in a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import pytest
import pytest_asyncio

from conclave.bus import EventBus, open_bus
from conclave.bus.nats import stream_name_for
from conclave.config import BusSettings

NATS_URL = "nats://127.0.0.1:4222"

#: settings every contract test starts from
FAST = {
    "ack_wait_s": 1.0,
    "max_deliver": 3,
    "retry_backoff_s": 0.05,
    "retry_backoff_max_s": 0.2,
    "request_timeout_s": 3.0,
    "drain_timeout_s": 5.0,
    "connect_timeout_s": 3.0,
}

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("nats", id="nats", marks=pytest.mark.integration),
]

BusFactory = Callable[..., Awaitable[EventBus]]


def bus_settings(backend: str, prefix: str, **overrides: Any) -> BusSettings:
    return BusSettings(**{"backend": backend, "nats_url": NATS_URL, "prefix": prefix,
                          **FAST, **overrides})


async def delete_stream(settings: BusSettings) -> None:
    nc = await nats.connect(settings.nats_url)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(stream_name_for(settings))
    finally:
        await nc.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture
async def make_bus(backend: str, prefix: str) -> AsyncIterator[BusFactory]:
    """``await make_bus(**settings)``: a bus on this test's backend and prefix, closed after."""
    buses: list[EventBus] = []
    made: list[BusSettings] = []

    async def make(**overrides: Any) -> EventBus:
        settings = bus_settings(backend, prefix, **overrides)
        bus = await open_bus(settings)
        buses.append(bus)
        made.append(settings)
        return bus

    yield make
    await asyncio.gather(*(b.aclose() for b in buses), return_exceptions=True)
    if backend == "nats":
        for settings in {s.stream or s.prefix: s for s in made}.values():
            await delete_stream(settings)


@pytest_asyncio.fixture
async def bus(make_bus: BusFactory) -> EventBus:
    return await make_bus()


async def collect(queue: asyncio.Queue[Any], count: int, within: float = 5.0) -> list[Any]:
    """``count`` items from ``queue``, failing the test if they take longer than ``within`` s."""
    items = []
    async with asyncio.timeout(within):
        for _ in range(count):
            items.append(await queue.get())
    return items


async def nothing_more(queue: asyncio.Queue[Any], wait: float) -> None:
    """Assert nothing else arrives on ``queue`` for ``wait`` seconds."""
    await asyncio.sleep(wait)
    extra = [queue.get_nowait() for _ in range(queue.qsize())]
    assert not extra, f"unexpected extra items: {extra}"
