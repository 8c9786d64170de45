"""What both backends share: delivery semantics live here once, transports elsewhere.

A backend supplies a few primitives (store-and-route an event, send a reply,
receive the next delivery, ack / nak / term one) and this module decides what
happens to a delivery: call the handler, acknowledge on success, retry with
backoff on failure, dead-letter after ``max_deliver`` deliveries, answer
requests, keep long handlers alive with progress heartbeats, and drain on close.
Keeping the decisions in one place is what makes the two backends behave the
same under the one contract suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from conclave.bus.base import (
    DLQ_ATTEMPTS,
    DLQ_ERROR_TYPE,
    DLQ_EVENT_ID,
    DLQ_GROUP,
    DLQ_REASON,
    DLQ_TOPIC,
    ERROR_REPLY_TYPE,
    REPLY_ERROR,
    REPLY_TYPE,
    Event,
    Handler,
    RejectEvent,
    validate_group,
    validate_pattern,
    validate_topic,
)
from conclave.config import BusSettings
from conclave.errors import (
    BusClosed,
    ConfigError,
    InvalidEvent,
    InvalidRequest,
    InvalidTopic,
    RequestFailed,
    RequestTimeout,
)

log = logging.getLogger("conclave.bus")

#: the longest failure reason kept in a dead letter's headers
_MAX_REASON = 2000


def retry_delay(settings: BusSettings, attempt: int) -> float:
    """Exponential backoff before redelivering a failed attempt, capped."""
    delay = settings.retry_backoff_s * (2 ** max(attempt - 1, 0))
    return min(delay, settings.retry_backoff_max_s)


class Delivery(ABC):
    """One delivery of one event to one subscription, with the transport's verbs."""

    #: the event as the handler sees it, ``attempt`` set
    event: Event
    #: set when the message on the wire was not an Event: it is dead-lettered with this reason
    invalid: str | None = None
    #: seconds between progress heartbeats while the handler runs (None: not needed)
    heartbeat_interval: float | None = None

    @abstractmethod
    async def ack(self) -> None: ...

    @abstractmethod
    async def nak(self, delay: float) -> None:
        """Give the event back for redelivery after ``delay`` seconds."""

    @abstractmethod
    async def term(self) -> None:
        """Never deliver this event again (it was dead-lettered)."""

    async def in_progress(self) -> None:  # noqa: B027 - optional verb, most transports need none
        """Tell the transport the handler is still working (resets its ack timer)."""


class BaseSubscription(ABC):
    """Receive loop, bounded concurrency and draining, common to both backends."""

    def __init__(
        self, bus: BaseBus, pattern: str, handler: Handler, group: str | None, concurrency: int
    ) -> None:
        self.pattern = pattern
        self.group = group
        self._bus = bus
        self._handler = handler
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        group = f" group={self.group!r}" if self.group else ""
        return f"<{type(self).__name__} {self.pattern!r}{group}{' closed' if self._closed else ''}>"

    # -- backend hooks -------------------------------------------------------------------

    @abstractmethod
    async def _receive(self) -> Delivery | None:
        """The next delivery, or None when a poll ended empty (the loop asks again)."""

    @abstractmethod
    async def _detach(self) -> None:
        """Release transport resources once nothing runs any more."""

    # -- loop ----------------------------------------------------------------------------

    def _start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name=f"bus-sub {self.pattern}")

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._slots.acquire()
            try:
                delivery = await self._receive()
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception as exc:
                # the transport is unhappy (NATS reconnecting ...): wait and ask again
                self._slots.release()
                failures += 1
                log.warning("bus subscription %r: receive failed (%s: %s); retrying",
                            self.pattern, type(exc).__name__, exc)
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                continue
            failures = 0
            if delivery is None:
                self._slots.release()
                continue
            task = asyncio.create_task(self._bus._handle(delivery, self._handler, self.group))
            self._inflight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("bus: delivery handling crashed on %r", self.pattern,
                      exc_info=task.exception())

    async def aclose(self, *, drain: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._inflight:
            pending = set(self._inflight)
            if drain:
                _done, pending = await asyncio.wait(
                    pending, timeout=self._bus.settings.drain_timeout_s
                )
                if pending:
                    log.warning("bus: %d handler(s) on %r still running after %gs; cancelling "
                                "(their events will be redelivered)", len(pending), self.pattern,
                                self._bus.settings.drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            await self._detach()
        finally:
            self._bus._subscriptions.discard(self)


class BaseBus(ABC):
    """Public API and delivery semantics; subclasses add a transport."""

    #: the transport's own largest message (NATS ``max_payload``); None means no limit
    _transport_limit: int | None = None

    def __init__(self, settings: BusSettings) -> None:
        self.settings = settings
        self._check_settings(settings)
        self._subscriptions: set[BaseSubscription] = set()
        self._waiters: dict[str, asyncio.Future[Event]] = {}
        self._reply_address: str | None = None
        self._reply_lock = asyncio.Lock()
        self._closing = False
        self._closed = False

    @staticmethod
    def _check_settings(settings: BusSettings) -> None:
        try:
            validate_topic(settings.prefix, what="bus prefix")
            validate_topic(settings.dead_letter_topic.replace("{topic}", "x"),
                           what="dead-letter topic")
        except InvalidTopic as exc:
            raise ConfigError(f"invalid bus setting: {exc.message}", hint=exc.hint) from None

    # -- transport hooks -----------------------------------------------------------------

    @abstractmethod
    async def _send(self, event: Event, data: bytes) -> None:
        """Store and route a validated event (``data`` is its JSON)."""

    @abstractmethod
    async def _send_reply(self, address: str, reply: Event, data: bytes) -> None:
        """Send a reply to a requester's reply address (fire and forget)."""

    @abstractmethod
    async def _open_reply_address(self) -> str:
        """Start receiving replies (each passed to ``_on_reply``); return the address."""

    @abstractmethod
    async def _create_subscription(
        self, pattern: str, handler: Handler, group: str | None, concurrency: int
    ) -> BaseSubscription: ...

    @abstractmethod
    async def _close_transport(self) -> None: ...

    # -- public API ----------------------------------------------------------------------

    async def __aenter__(self) -> BaseBus:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    async def publish(
        self,
        topic: str,
        message: Mapping[str, Any] | Event | None = None,
        *,
        type: str = "event",
        headers: Mapping[str, str] | None = None,
        correlation_id: str | None = None,
    ) -> Event:
        self._check_open(allow_closing=True)
        topic = validate_topic(topic)
        if isinstance(message, Event):
            update: dict[str, Any] = {"topic": topic, "attempt": 1}
            if headers:
                update["headers"] = {**message.headers, **headers}
            if correlation_id is not None:
                update["correlation_id"] = correlation_id
            event = message.model_copy(update=update)
        else:
            event = self._build(topic, message, type=type, headers=headers,
                                correlation_id=correlation_id)
        await self._send(event, self._encode(event))
        return event

    async def subscribe(
        self,
        pattern: str,
        handler: Handler,
        *,
        group: str | None = None,
        concurrency: int = 1,
    ) -> BaseSubscription:
        self._check_open()
        pattern = validate_pattern(pattern)
        if group is not None:
            group = validate_group(group)
        if not callable(handler):
            raise InvalidRequest(
                f"handler for {pattern!r} is not callable ({type(handler).__name__})",
                hint="pass a function (async or not) that takes one Event",
            )
        if not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidRequest(f"concurrency must be a positive integer, got {concurrency!r}")
        sub = await self._create_subscription(pattern, handler, group, concurrency)
        self._subscriptions.add(sub)
        sub._start()
        return sub

    async def request(
        self,
        topic: str,
        payload: Mapping[str, Any] | None = None,
        *,
        type: str = "request",
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a request's own deadline, with its error
    ) -> Event:
        self._check_open()
        topic = validate_topic(topic)
        wait = self.settings.request_timeout_s if timeout is None else timeout
        if wait <= 0:
            raise InvalidRequest(f"request timeout must be positive, got {wait!r}")
        async with self._reply_lock:
            if self._reply_address is None:
                self._reply_address = await self._open_reply_address()
        event = self._build(topic, payload, type=type, headers=headers, correlation_id=None)
        event.correlation_id = event.id
        event.reply_to = self._reply_address
        data = self._encode(event)
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiters[event.id] = future
        try:
            await self._send(event, data)
            try:
                return await asyncio.wait_for(future, wait)
            except TimeoutError:
                raise RequestTimeout(
                    f"no reply to {type!r} request on topic {topic!r} within {wait:g}s",
                    hint="check that a subscriber handles this topic and returns a value "
                         "(or calls bus.reply()); pass a longer timeout= for slow handlers",
                ) from None
        finally:
            self._waiters.pop(event.id, None)

    async def reply(
        self, request: Event, payload: Mapping[str, Any] | Event, *, type: str = REPLY_TYPE
    ) -> Event:
        if request.reply_to is None:
            raise InvalidRequest(
                f"event {request.id} on {request.topic!r} is not a request (no reply_to)",
                hint="only events sent with bus.request() can be answered",
            )
        if isinstance(payload, Event):
            reply = payload.model_copy(update={
                "topic": request.topic, "correlation_id": request.correlation_id or request.id,
                "reply_to": None, "attempt": 1,
            })
        else:
            reply = self._build(request.topic, payload, type=type, headers=None,
                                correlation_id=request.correlation_id or request.id)
        await self._send_reply(request.reply_to, reply, self._encode(reply))
        return reply

    async def aclose(self) -> None:
        """Stop receiving, wait up to ``drain_timeout_s`` for running handlers, disconnect."""
        if self._closing:
            return
        self._closing = True
        try:
            await asyncio.gather(*(s.aclose() for s in list(self._subscriptions)),
                                 return_exceptions=True)
            for future in self._waiters.values():
                if not future.done():
                    future.set_exception(BusClosed("the event bus closed while a request waited"))
        finally:
            self._closed = True
            await self._close_transport()

    # -- delivery semantics --------------------------------------------------------------

    async def _handle(self, delivery: Delivery, handler: Handler, group: str | None) -> None:
        event = delivery.event
        max_deliver = self.settings.max_deliver
        if delivery.invalid is not None:
            await self._dead_letter(delivery, group, delivery.invalid, "InvalidEvent")
            return
        if event.attempt > max_deliver:
            await self._dead_letter(
                delivery, group,
                f"not acknowledged after {max_deliver} deliveries: the consumer crashed, was "
                f"cancelled or ran longer than ack_wait ({self.settings.ack_wait_s:g}s)",
                "Unacknowledged",
            )
            return
        heartbeat = None
        if delivery.heartbeat_interval:
            heartbeat = asyncio.create_task(self._heartbeat(delivery))
        try:
            result = handler(event)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            # the handler was stopped before it finished: give the event back at once
            with contextlib.suppress(Exception):
                await asyncio.shield(delivery.nak(0.0))
            raise
        except RejectEvent as exc:
            await self._dead_letter(delivery, group, _reason(exc), type(exc).__name__)
            return
        except Exception as exc:
            if event.attempt >= max_deliver:
                await self._dead_letter(delivery, group, _reason(exc), type(exc).__name__)
            else:
                delay = retry_delay(self.settings, event.attempt)
                log.info("bus: handler for %r failed on attempt %d/%d (%s: %s); retry in %gs",
                         event.topic, event.attempt, max_deliver, type(exc).__name__, exc, delay)
                await _quietly(delivery.nak(delay), "nak")
            return
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
        if result is not None and event.reply_to is not None:
            try:
                await self.reply(event, result)  # type: ignore[arg-type]
            except InvalidEvent as exc:
                # a bug in the handler, not a transient failure: tell the requester now
                log.warning("bus: handler for %r returned an unusable reply: %s", event.topic, exc)
                await self._send_error_reply(
                    event, f"the handler's return value cannot be sent as a reply: {exc}",
                    type(exc).__name__,
                )
            except Exception as exc:
                log.warning("bus: could not send the reply to %r (%s: %s)",
                            event.topic, type(exc).__name__, exc)
        await _quietly(delivery.ack(), "ack")

    async def _heartbeat(self, delivery: Delivery) -> None:
        assert delivery.heartbeat_interval
        while True:
            await asyncio.sleep(delivery.heartbeat_interval)
            await _quietly(delivery.in_progress(), "progress heartbeat")

    async def _dead_letter(
        self, delivery: Delivery, group: str | None, reason: str, error_type: str
    ) -> None:
        event = delivery.event
        dlq_topic = self.settings.dead_letter_topic.replace("{topic}", event.topic)
        headers = {
            **event.headers,
            DLQ_REASON: reason[:_MAX_REASON],
            DLQ_ERROR_TYPE: error_type,
            DLQ_ATTEMPTS: str(event.attempt),
            DLQ_TOPIC: event.topic,
            DLQ_EVENT_ID: event.id,
        }
        if group is not None:
            headers[DLQ_GROUP] = group
        letter = Event(
            topic=dlq_topic, type=event.type, payload=event.payload,
            correlation_id=event.correlation_id, created_at=event.created_at, headers=headers,
        )
        try:
            await self._send(letter, self._encode(letter, check_size=False))
        except Exception as exc:
            # not stored anywhere yet: keep the original and try again later
            log.error("bus: could not dead-letter event %s from %r (%s: %s); will retry",
                      event.id, event.topic, type(exc).__name__, exc)
            await _quietly(delivery.nak(retry_delay(self.settings, event.attempt)), "nak")
            return
        log.warning("bus: event %s on %r dead-lettered to %r after %d deliveries: %s",
                    event.id, event.topic, dlq_topic, event.attempt, reason[:200])
        await self._send_error_reply(event, reason, error_type)
        await _quietly(delivery.term(), "term")

    async def _send_error_reply(self, event: Event, reason: str, error_type: str) -> None:
        """Tell a waiting requester its request failed for good, so it need not time out."""
        if event.reply_to is None:
            return
        error = Event(
            topic=event.topic, type=ERROR_REPLY_TYPE,
            payload={"error": reason[:_MAX_REASON], "error_type": error_type},
            correlation_id=event.correlation_id or event.id,
            headers={REPLY_ERROR: reason[:_MAX_REASON], DLQ_ATTEMPTS: str(event.attempt)},
        )
        try:
            await self._send_reply(event.reply_to, error, self._encode(error, check_size=False))
        except Exception as exc:
            log.warning("bus: could not send the error reply (%s: %s)", type(exc).__name__, exc)

    def _on_reply(self, data: bytes) -> None:
        try:
            reply = Event.model_validate_json(data)
        except ValidationError:
            log.warning("bus: ignored a reply that is not an Event")
            return
        future = self._waiters.get(reply.correlation_id or "")
        if future is None or future.done():
            return  # the requester gave up, or another responder answered first
        if REPLY_ERROR in reply.headers:
            future.set_exception(RequestFailed(
                f"request on {reply.topic!r} failed (delivery "
                f"{reply.headers.get(DLQ_ATTEMPTS, '?')}): {reply.headers[REPLY_ERROR]}",
                hint="see the handler's error; a request that failed on every delivery is "
                     "in the dead-letter topic",
            ))
        else:
            future.set_result(reply)

    # -- helpers -------------------------------------------------------------------------

    def _check_open(self, *, allow_closing: bool = False) -> None:
        if self._closed or (self._closing and not allow_closing):
            raise BusClosed("the event bus is closed", hint="open a new one with open_bus()")

    @staticmethod
    def _build(
        topic: str,
        payload: Mapping[str, Any] | None,
        *,
        type: str,
        headers: Mapping[str, str] | None,
        correlation_id: str | None,
    ) -> Event:
        if payload is not None and not isinstance(payload, Mapping):
            raise InvalidEvent(
                f"event payload for {topic!r} must be a mapping, got {builtin_type(payload)}",
                hint="wrap the value, e.g. {'value': ...}",
            )
        try:
            return Event(topic=topic, type=type, payload=dict(payload or {}),
                         headers=dict(headers or {}), correlation_id=correlation_id)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise InvalidEvent(f"invalid event for {topic!r}: {loc}: {err['msg']}") from None

    def _encode(self, event: Event, *, check_size: bool = True) -> bytes:
        try:
            data = event.model_dump_json().encode()
        except PydanticSerializationError as exc:
            raise InvalidEvent(
                f"event payload for {event.topic!r} is not JSON-serializable: {exc}",
                hint="send plain data (str, int, float, bool, None, lists, dicts); "
                     "convert objects with .model_dump() or str()",
            ) from None
        limit = self.settings.max_event_bytes
        if self._transport_limit is not None:
            limit = min(limit, self._transport_limit - 512)
        if check_size and len(data) > limit:
            raise InvalidEvent(
                f"event for {event.topic!r} is {len(data)} bytes, over the {limit}-byte limit",
                hint="put large content somewhere shared (a file, the RAG index) and send "
                     "a reference; or raise bus.max_event_bytes (and NATS max_payload)",
            )
        return data


class Deduper:
    """Remembers event ids for ``window`` seconds: an id seen again is a duplicate.

    The in-process twin of JetStream's duplicate window (``Nats-Msg-Id``), so a
    publisher that retries after an unclear failure does not deliver twice.
    """

    def __init__(self, window: float) -> None:
        self._window = window
        self._seen: OrderedDict[str, float] = OrderedDict()

    def seen(self, event_id: str) -> bool:
        if self._window <= 0:
            return False
        now = time.monotonic()
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at < self._window:
                break
            del self._seen[oldest]
        if event_id in self._seen:
            return True
        self._seen[event_id] = now
        return False


def builtin_type(value: object) -> str:
    return type(value).__name__


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _quietly(step: Any, what: str) -> None:
    """Run a transport verb whose failure only delays redelivery: log, do not raise."""
    try:
        await step
    except Exception as exc:
        log.warning("bus: %s failed (%s: %s); the transport will redeliver after ack_wait",
                    what, type(exc).__name__, exc)
