"""The NATS JetStream backend: the same bus across processes and machines.

One stream (``settings.bus.stream``, default the prefix upper-cased) stores
every subject under ``<prefix>.>``, with a time limit (``stream_max_age_s``)
rather than work-queue retention, so any number of consumers can read the same
subjects.  Each subscription is a *pull* consumer with explicit acks:

* no group: an ephemeral consumer owned by the subscription (deleted on close,
  reaped by the server if the process dies);
* a group: a durable consumer named after (group, pattern), shared by every
  member in every process; pull requests from the members load-balance it,
  and an event a dead member never acknowledged goes to another after ``ack_wait``.

The server's ``max_deliver`` is one more than ours, so the delivery after the
last permitted one still reaches a handler loop, which dead-letters it instead
of letting the server drop it silently.  Publishes carry ``Nats-Msg-Id`` = the
event id, so JetStream's duplicate window makes a retried publish harmless.
Replies travel over core NATS to the requester's inbox: nobody needs them
stored once the requester has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import uuid
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as CoreSubscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from pydantic import ValidationError

from conclave.bus._core import BaseBus, BaseSubscription, Delivery
from conclave.bus.base import Event, Handler
from conclave.config import BusSettings
from conclave.errors import BackendUnavailable, BusError, ConfigError, InvalidEvent

log = logging.getLogger("conclave.bus")

#: how long one pull request waits on the server before the loop asks again
_FETCH_WAIT_S = 5.0
#: the server sends an idle heartbeat this often during a pull request; silence means trouble
_FETCH_HEARTBEAT_S = 2.0
#: the server deletes a subscription's ephemeral consumer this long after its process died
_EPHEMERAL_IDLE_S = 3600.0
#: JetStream API error codes
_STREAM_NAME_IN_USE = 10058
_SUBJECTS_OVERLAP = 10065
_STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


def stream_name_for(settings: BusSettings) -> str:
    """The JetStream stream this bus uses: ``settings.stream`` or the prefix, upper-cased."""
    if settings.stream is not None:
        if not _STREAM_NAME.match(settings.stream):
            raise ConfigError(
                f"invalid bus stream name {settings.stream!r}",
                hint="a stream name is letters, digits, '_' or '-' (no dots or wildcards)",
            )
        return settings.stream
    return re.sub(r"[^A-Za-z0-9_-]", "_", settings.prefix).upper()


def consumer_name_for(group: str, pattern: str) -> str:
    """Durable consumer name for (group, pattern): the group plus a digest of the pattern.

    The pattern is part of the identity because a consumer has one filter
    subject; the digest keeps the name legal (no dots or wildcards) and short.
    """
    return f"{group}-{hashlib.sha256(pattern.encode()).hexdigest()[:12]}"


def _redact(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class _NatsDelivery(Delivery):
    def __init__(self, bus: NatsBus, msg: Msg) -> None:
        self._msg = msg
        self.heartbeat_interval = max(bus.settings.ack_wait_s / 2, 0.05)
        attempt = msg.metadata.num_delivered
        try:
            self.event = Event.model_validate_json(msg.data)
            self.event.attempt = attempt
        except ValidationError as exc:
            err = exc.errors()[0]
            self.invalid = (f"not a Conclave event envelope "
                            f"({'.'.join(str(p) for p in err['loc'])}: {err['msg']})")
            self.event = Event(
                topic=bus._topic_of(msg.subject), type="invalid", attempt=attempt,
                payload={"raw": msg.data[:10_000].decode("utf-8", "replace")},
            )

    async def ack(self) -> None:
        await self._msg.ack()

    async def nak(self, delay: float) -> None:
        await self._msg.nak(delay=delay if delay > 0 else None)

    async def term(self) -> None:
        await self._msg.term()

    async def in_progress(self) -> None:
        await self._msg.in_progress()


class NatsSubscription(BaseSubscription):
    def __init__(self, bus: NatsBus, pattern: str, handler: Handler, group: str | None,
                 concurrency: int, consumer: str, config: ConsumerConfig,
                 psub: JetStreamContext.PullSubscription) -> None:
        super().__init__(bus, pattern, handler, group, concurrency)
        #: the JetStream consumer this subscription pulls from
        self.consumer = consumer
        self._nats_bus = bus
        self._config = config
        self._psub = psub

    async def _receive(self) -> Delivery | None:
        try:
            msgs = await self._psub.fetch(1, timeout=_FETCH_WAIT_S, heartbeat=_FETCH_HEARTBEAT_S)
        except nats.js.errors.FetchTimeoutError:
            return None  # the server kept the pull request alive: simply nothing to do
        except nats.errors.TimeoutError:
            # not even a heartbeat: the consumer may be gone (stream deleted by an
            # operator, ephemeral consumer reaped while disconnected)
            await self._check_consumer()
            return None
        except nats.js.errors.APIError:
            await self._recreate()
            return None
        return _NatsDelivery(self._nats_bus, msgs[0])

    async def _check_consumer(self) -> None:
        bus = self._nats_bus
        try:
            await bus._js.consumer_info(bus.stream_name, self.consumer,
                                        timeout=bus.settings.op_timeout_s)
        except nats.js.errors.NotFoundError:
            await self._recreate()

    async def _recreate(self) -> None:
        bus = self._nats_bus
        log.warning("bus: consumer %r of stream %r is missing; recreating it (events published "
                    "while it was gone are not delivered to it)", self.consumer, bus.stream_name)
        await bus._ensure_stream()
        await bus._js.add_consumer(bus.stream_name, self._config,
                                   timeout=bus.settings.op_timeout_s)

    async def _detach(self) -> None:
        with contextlib.suppress(Exception):
            await self._psub.unsubscribe()
        if self.group is None and not self._nats_bus._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nats_bus._js.delete_consumer(self._nats_bus.stream_name, self.consumer)


class NatsBus(BaseBus):
    """Open with ``await NatsBus.connect(settings)`` (or ``open_bus``), close with ``aclose()``."""

    def __init__(self, settings: BusSettings, nc: Client) -> None:
        super().__init__(settings)
        self.stream_name = stream_name_for(settings)
        self._nc = nc
        self._js = nc.jetstream(timeout=settings.op_timeout_s)
        self._prefix = settings.prefix
        self._reply_sub: CoreSubscription | None = None
        self._transport_limit = nc.max_payload or None

    @classmethod
    async def connect(cls, settings: BusSettings) -> NatsBus:
        cls._check_settings(settings)
        stream_name_for(settings)
        url = _redact(settings.nats_url)
        nc = Client()
        opened: list[NatsBus] = []

        async def on_error(exc: Exception) -> None:
            log.debug("nats: %s: %s", type(exc).__name__, exc)

        async def on_disconnect() -> None:
            if opened and not opened[0]._closing:
                log.warning("bus: disconnected from NATS at %s; reconnecting", url)

        async def on_reconnect() -> None:
            log.warning("bus: reconnected to NATS at %s", url)

        try:
            await asyncio.wait_for(
                nc.connect(
                    settings.nats_url, name="conclave", error_cb=on_error,
                    disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
                    connect_timeout=max(1, round(settings.connect_timeout_s)),
                    max_reconnect_attempts=-1, reconnect_time_wait=1,
                ),
                settings.connect_timeout_s,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            detail = f" ({type(exc).__name__}: {exc})" if str(exc) else ""
            raise BackendUnavailable(
                f"cannot connect to NATS at {url} within {settings.connect_timeout_s:g}s{detail}",
                backend="nats", url=url,
                hint="start nats-server with JetStream (`nats-server -js`), fix "
                     "CONCLAVE_BUS__NATS_URL, or use CONCLAVE_BUS__BACKEND=memory",
            ) from None
        bus = cls(settings, nc)
        opened.append(bus)
        try:
            await bus._ensure_stream()
        except BaseException:
            await nc.close()
            raise
        return bus

    # -- transport -----------------------------------------------------------------------

    def _subject(self, topic: str) -> str:
        return f"{self._prefix}.{topic}"

    def _topic_of(self, subject: str) -> str:
        head = f"{self._prefix}."
        return subject[len(head):] if subject.startswith(head) else subject

    async def _ensure_stream(self) -> None:
        subjects = f"{self._prefix}.>"
        config = StreamConfig(
            name=self.stream_name, subjects=[subjects], retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE, max_age=self.settings.stream_max_age_s,
            duplicate_window=min(self.settings.dedupe_window_s, self.settings.stream_max_age_s),
            description="Conclave event bus",
        )
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == _STREAM_NAME_IN_USE:
                # exists with other limits (an operator's choice): use it if it holds our subjects
                info = await self._js.stream_info(self.stream_name)
                if subjects not in (info.config.subjects or []):
                    raise ConfigError(
                        f"NATS stream {self.stream_name!r} exists but does not store {subjects!r}",
                        hint="set bus.stream to an unused name, or bus.prefix to match the stream",
                    ) from None
                return
            if exc.err_code == _SUBJECTS_OVERLAP:
                raise ConfigError(
                    f"NATS subjects {subjects!r} already belong to another stream",
                    hint="choose another bus.prefix, or set bus.stream to that stream's name",
                ) from None
            raise BusError(f"NATS refused to create stream {self.stream_name!r}: "
                           f"{exc.description}") from None
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
            raise BackendUnavailable(
                "the NATS server does not have JetStream enabled", backend="nats",
                url=_redact(self.settings.nats_url), hint="start nats-server with -js",
            ) from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise self._unavailable("create the stream", exc) from None

    async def _send(self, event: Event, data: bytes) -> None:
        subject = self._subject(event.topic)
        headers = {"Nats-Msg-Id": event.id}
        for attempt in (1, 2):
            try:
                await self._js.publish(subject, data, headers=headers)
                return
            except nats.errors.MaxPayloadError:
                raise InvalidEvent(
                    f"event for {event.topic!r} is {len(data)} bytes, over the NATS server's "
                    f"max_payload", hint="send a reference to large content instead",
                ) from None
            except nats.js.errors.NoStreamResponseError:
                # the stream was deleted under us: recreate it once and try again
                if attempt == 2:
                    raise BusError(
                        f"no JetStream stream stores {subject!r}",
                        hint="check the stream on the NATS server (nats stream ls)",
                    ) from None
                await self._ensure_stream()
            except nats.js.errors.APIError as exc:
                raise BusError(f"NATS refused the event for {event.topic!r}: "
                               f"{exc.description}") from None
            except (TimeoutError, nats.errors.Error) as exc:
                raise self._unavailable(f"publish to {event.topic!r}", exc) from None

    async def _send_reply(self, address: str, reply: Event, data: bytes) -> None:
        try:
            await self._nc.publish(address, data)
        except (TimeoutError, nats.errors.Error) as exc:
            raise self._unavailable("send a reply", exc) from None

    async def _open_reply_address(self) -> str:
        inbox = self._nc.new_inbox()

        async def on_reply(msg: Msg) -> None:
            self._on_reply(msg.data)

        self._reply_sub = await self._nc.subscribe(inbox, cb=on_reply)
        return inbox

    async def _create_subscription(
        self, pattern: str, handler: Handler, group: str | None, concurrency: int
    ) -> BaseSubscription:
        if group is None:
            name = f"eph-{uuid.uuid4().hex[:20]}"
        else:
            name = consumer_name_for(group, pattern)
        config = ConsumerConfig(
            name=name,
            durable_name=name if group is not None else None,
            description=f"conclave bus: {pattern}" + (f" group {group}" if group else ""),
            filter_subject=self._subject(pattern),
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait_s,
            max_deliver=self.settings.max_deliver + 1,
            inactive_threshold=None if group is not None else _EPHEMERAL_IDLE_S,
        )
        try:
            await self._js.add_consumer(self.stream_name, config,
                                        timeout=self.settings.op_timeout_s)
            psub = await self._js.pull_subscribe_bind(consumer=name, stream=self.stream_name)
        except nats.js.errors.APIError as exc:
            raise BusError(
                f"NATS refused the consumer for {pattern!r}"
                + (f" (group {group!r})" if group else "") + f": {exc.description}",
                hint="a durable group's settings changed incompatibly? delete the consumer "
                     f"with `nats consumer rm {self.stream_name} {name}`",
            ) from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise self._unavailable(f"subscribe to {pattern!r}", exc) from None
        return NatsSubscription(self, pattern, handler, group, concurrency, name, config, psub)

    async def _close_transport(self) -> None:
        if self._nc.is_closed:
            return
        if self._reply_sub is not None:
            with contextlib.suppress(Exception):
                await self._reply_sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._nc.flush(timeout=max(1, round(self.settings.op_timeout_s)))
        await self._nc.close()

    def _unavailable(self, action: str, exc: BaseException) -> BackendUnavailable:
        url = _redact(self.settings.nats_url)
        return BackendUnavailable(
            f"could not {action} on NATS at {url} ({type(exc).__name__}: {exc})",
            backend="nats", url=url,
            hint="check that nats-server is running with JetStream; the client reconnects "
                 "on its own, so retry in a moment",
        )
