"""The event bus: how agents talk to each other, in one process or across many.

``open_bus(settings)`` returns an :class:`EventBus`: the in-process
:class:`MemoryBus` by default, or :class:`NatsBus` (NATS JetStream) with
``CONCLAVE_BUS__BACKEND=nats``.  Both give:

* publish/subscribe by topic with NATS wildcards (``agents.*``, ``agents.>``);
* queue groups (``group=``): each event to one member, durable across restarts;
* request/reply with correlation ids (``request()`` -> the handler's return value);
* at-least-once delivery: returning acknowledges, raising redelivers with
  backoff, and after ``max_deliver`` deliveries the event goes to the
  dead-letter topic (``dlq.<topic>``) with the reason in its headers;
* ``aclose()`` lets running handlers finish first.

Typical use::

    bus = await open_bus(settings)
    async def plan(event: Event) -> dict:
        return {"steps": [...]}                 # becomes the reply to a request
    await bus.subscribe("agents.planner.tasks", plan, group="planners")
    reply = await bus.request("agents.planner.tasks", {"task": "..."}, timeout=60)
    await bus.aclose()
"""

from __future__ import annotations

from conclave.bus._core import retry_delay
from conclave.bus.base import (
    DLQ_ATTEMPTS,
    DLQ_ERROR_TYPE,
    DLQ_EVENT_ID,
    DLQ_GROUP,
    DLQ_REASON,
    DLQ_TOPIC,
    ERROR_REPLY_TYPE,
    REPLY_TYPE,
    Event,
    EventBus,
    Handler,
    HandlerResult,
    RejectEvent,
    Subscription,
    topic_matches,
    validate_pattern,
    validate_topic,
)
from conclave.bus.memory import MemoryBus
from conclave.config import BusSettings, Settings, load_settings
from conclave.errors import (
    BusClosed,
    BusError,
    InvalidEvent,
    InvalidTopic,
    RequestFailed,
    RequestTimeout,
)

__all__ = [
    "DLQ_ATTEMPTS",
    "DLQ_ERROR_TYPE",
    "DLQ_EVENT_ID",
    "DLQ_GROUP",
    "DLQ_REASON",
    "DLQ_TOPIC",
    "ERROR_REPLY_TYPE",
    "REPLY_TYPE",
    "BusClosed",
    "BusError",
    "BusSettings",
    "Event",
    "EventBus",
    "Handler",
    "HandlerResult",
    "InvalidEvent",
    "InvalidTopic",
    "MemoryBus",
    "NatsBus",
    "RejectEvent",
    "RequestFailed",
    "RequestTimeout",
    "Subscription",
    "open_bus",
    "retry_delay",
    "topic_matches",
    "validate_pattern",
    "validate_topic",
]


async def open_bus(settings: Settings | BusSettings | None = None) -> EventBus:
    """The bus ``settings.bus.backend`` names, connected and ready; close it with ``aclose()``.

    Raises BackendUnavailable when NATS cannot be reached (nothing falls back
    silently: agents in other processes would never see the events).
    """
    if settings is None:
        settings = load_settings()
    bus_settings = settings.bus if isinstance(settings, Settings) else settings
    if bus_settings.backend == "nats":
        from conclave.bus.nats import NatsBus

        return await NatsBus.connect(bus_settings)
    return MemoryBus(bus_settings)


def __getattr__(name: str) -> object:
    # NatsBus imports nats-py: only load it when asked for
    if name == "NatsBus":
        from conclave.bus.nats import NatsBus

        return NatsBus
    raise AttributeError(f"module 'conclave.bus' has no attribute {name!r}")
