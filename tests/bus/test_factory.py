"""open_bus, settings, and what the NATS backend does with an unfriendly server or stream."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats
import pytest

from conclave.bus import (
    DLQ_ERROR_TYPE,
    DLQ_REASON,
    BusSettings,
    Event,
    EventBus,
    MemoryBus,
    NatsBus,
    open_bus,
)
from conclave.bus.nats import consumer_name_for, stream_name_for
from conclave.config import load_settings
from conclave.errors import BackendUnavailable, ConfigError

from .conftest import NATS_URL, bus_settings, collect, delete_stream


async def test_default_is_the_in_process_bus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONCLAVE_BUS__BACKEND", raising=False)
    settings = load_settings()
    assert settings.bus.backend == "memory"
    bus = await open_bus(settings)
    assert isinstance(bus, MemoryBus) and isinstance(bus, EventBus)
    await bus.aclose()
    async with await open_bus(BusSettings()) as bus2:
        assert isinstance(bus2, MemoryBus)
    assert bus2.closed


def test_bus_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCLAVE_BUS__BACKEND", "nats")
    monkeypatch.setenv("CONCLAVE_BUS__MAX_DELIVER", "7")
    monkeypatch.setenv("CONCLAVE_BUS__DEAD_LETTER_TOPIC", "failed.{topic}")
    bus = load_settings().bus
    assert (bus.backend, bus.max_deliver, bus.dead_letter_topic) == ("nats", 7, "failed.{topic}")
    assert stream_name_for(BusSettings(prefix="acme.bus-1")) == "ACME_BUS-1"
    assert consumer_name_for("coders", "agents.>") != consumer_name_for("coders", "agents.*")


@pytest.mark.parametrize("backend", ["memory", "nats"])
async def test_invalid_prefix_or_dead_letter_topic_is_a_config_error(backend: str) -> None:
    with pytest.raises(ConfigError, match="bus prefix"):
        await open_bus(BusSettings(backend=backend, prefix="has space"))
    with pytest.raises(ConfigError, match="dead-letter topic"):
        await open_bus(BusSettings(backend=backend, dead_letter_topic="dlq.>"))


async def test_unreachable_nats_fails_fast_and_clearly() -> None:
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        await open_bus(BusSettings(backend="nats", nats_url="nats://user:s3cret@127.0.0.1:1",
                                   connect_timeout_s=1.0))
    assert time.monotonic() - started < 3
    assert info.value.backend == "nats"
    message = str(info.value)
    assert "127.0.0.1:1" in message and "s3cret" not in message
    assert "nats-server -js" in message and "BACKEND=memory" in message


@pytest.mark.integration
async def test_prefix_owned_by_another_stream_is_a_config_error() -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    await js.add_stream(name=f"OTHER_{prefix}", subjects=[f"{prefix}.>"])
    try:
        with pytest.raises(ConfigError, match="already belong to another stream"):
            await open_bus(bus_settings("nats", prefix))
        with pytest.raises(ConfigError, match="does not store"):
            await open_bus(bus_settings("nats", f"x{prefix}", stream=f"OTHER_{prefix}"))
        # naming the stream that does hold the subjects works
        bus = await open_bus(bus_settings("nats", prefix, stream=f"OTHER_{prefix}"))
        got: asyncio.Queue[Event] = asyncio.Queue()
        await bus.subscribe("a.b", got.put)
        await bus.publish("a.b", {"ok": 1})
        assert (await collect(got, 1))[0].payload == {"ok": 1}
        await bus.aclose()
    finally:
        await js.delete_stream(f"OTHER_{prefix}")
        await nc.close()


@pytest.mark.integration
async def test_foreign_message_on_a_bus_subject_is_dead_lettered() -> None:
    """Something other than Conclave (the `nats` CLI, another app) publishes raw bytes."""
    settings = bus_settings("nats", f"t{uuid.uuid4().hex[:12]}")
    bus = await open_bus(settings)
    assert isinstance(bus, NatsBus)
    try:
        handled: asyncio.Queue[Event] = asyncio.Queue()
        dlq: asyncio.Queue[Event] = asyncio.Queue()
        await bus.subscribe("in.raw", handled.put)
        await bus.subscribe("dlq.>", dlq.put)
        nc = await nats.connect(NATS_URL)
        await nc.jetstream().publish(f"{settings.prefix}.in.raw", b"not json at all")
        await nc.close()
        letter = (await collect(dlq, 1))[0]
        assert letter.topic == "dlq.in.raw"
        assert letter.payload == {"raw": "not json at all"}
        assert letter.headers[DLQ_ERROR_TYPE] == "InvalidEvent"
        assert "not a Conclave event envelope" in letter.headers[DLQ_REASON]
        assert handled.empty()
    finally:
        await bus.aclose()
        await delete_stream(settings)


@pytest.mark.integration
async def test_subscription_survives_its_stream_being_deleted() -> None:
    """An operator deletes the stream: publishing recreates it and members carry on."""
    settings = bus_settings("nats", f"t{uuid.uuid4().hex[:12]}")
    bus = await open_bus(settings)
    assert isinstance(bus, NatsBus)
    try:
        got: asyncio.Queue[Event] = asyncio.Queue()
        sub = await bus.subscribe("s.t", got.put, group="g")
        await delete_stream(settings)
        # the subscription notices the silence and puts stream and consumer back
        nc = await nats.connect(NATS_URL)
        try:
            async with asyncio.timeout(20):
                while True:
                    try:
                        await nc.jetstream().consumer_info(bus.stream_name, sub.consumer)
                        break
                    except nats.js.errors.NotFoundError:
                        await asyncio.sleep(0.2)
        finally:
            await nc.close()
        await bus.publish("s.t", {"n": 1})
        assert (await collect(got, 1))[0].payload == {"n": 1}
    finally:
        await bus.aclose()
        await delete_stream(settings)
