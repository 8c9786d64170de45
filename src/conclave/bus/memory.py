"""The in-process backend: asyncio queues with the same semantics as JetStream consumers.

Each subscription without a group owns a queue (an ephemeral consumer); each
(group, pattern) pair shares one queue that outlives its members (a durable
consumer), so events wait while no member runs and a cancelled member's event
goes to the next.  Events cross the bus as JSON, as they would over NATS: a
handler never shares a dict with the publisher, and a payload that could not
travel over NATS fails here too.

A "crash" in one process is a cancelled handler task; its event is put back at
once with the attempt count raised, where JetStream would wait ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from conclave.bus._core import BaseBus, BaseSubscription, Deduper, Delivery
from conclave.bus.base import Event, Handler, topic_matches
from conclave.config import BusSettings


@dataclass
class _Pending:
    data: bytes
    #: deliveries so far
    delivered: int = 0


@dataclass(eq=False)
class _Consumer:
    pattern: str
    group: str | None
    queue: asyncio.Queue[_Pending] = field(default_factory=asyncio.Queue)


class _MemoryDelivery(Delivery):
    def __init__(self, consumer: _Consumer, pending: _Pending) -> None:
        pending.delivered += 1
        self._consumer = consumer
        self._pending = pending
        self._settled = False
        self.event = Event.model_validate_json(pending.data)
        self.event.attempt = pending.delivered

    async def ack(self) -> None:
        self._settled = True

    async def term(self) -> None:
        self._settled = True

    async def nak(self, delay: float) -> None:
        if self._settled:
            return
        self._settled = True
        queue, pending = self._consumer.queue, self._pending
        if delay <= 0:
            queue.put_nowait(pending)
        else:
            asyncio.get_running_loop().call_later(delay, queue.put_nowait, pending)


class MemorySubscription(BaseSubscription):
    def __init__(self, bus: MemoryBus, consumer: _Consumer, handler: Handler,
                 concurrency: int) -> None:
        super().__init__(bus, consumer.pattern, handler, consumer.group, concurrency)
        self._consumer = consumer
        self._memory_bus = bus

    async def _receive(self) -> Delivery | None:
        pending = await self._consumer.queue.get()
        return _MemoryDelivery(self._consumer, pending)

    async def _detach(self) -> None:
        if self._consumer.group is None:
            self._memory_bus._consumers.pop(id(self._consumer), None)


class MemoryBus(BaseBus):
    """The default backend: everything in this process, nothing to run or configure."""

    def __init__(self, settings: BusSettings | None = None) -> None:
        super().__init__(settings or BusSettings())
        #: ephemeral consumers by id(), durable ones by (group, pattern)
        self._consumers: dict[object, _Consumer] = {}
        self._dedupe = Deduper(self.settings.dedupe_window_s)

    async def _send(self, event: Event, data: bytes) -> None:
        if self._dedupe.seen(event.id):
            return
        for consumer in list(self._consumers.values()):
            if topic_matches(consumer.pattern, event.topic):
                consumer.queue.put_nowait(_Pending(data))

    async def _send_reply(self, address: str, reply: Event, data: bytes) -> None:
        if address == self._reply_address:
            self._on_reply(data)

    async def _open_reply_address(self) -> str:
        return f"_reply.{uuid.uuid4().hex}"

    async def _create_subscription(
        self, pattern: str, handler: Handler, group: str | None, concurrency: int
    ) -> BaseSubscription:
        if group is None:
            consumer = _Consumer(pattern, None)
            self._consumers[id(consumer)] = consumer
        else:
            key = (group, pattern)
            existing = self._consumers.get(key)
            if existing is None:
                existing = self._consumers[key] = _Consumer(pattern, group)
            consumer = existing
        return MemorySubscription(self, consumer, handler, concurrency)

    async def _close_transport(self) -> None:
        self._consumers.clear()
