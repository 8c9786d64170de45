"""The event bus protocol, the event envelope and topic rules.

Both backends (in-process and NATS JetStream) implement :class:`EventBus` and
pass one contract test suite, so code written against the protocol runs on
either: agents in one process use the in-process default, agents in several
processes point ``settings.bus.backend`` at NATS and nothing else changes.

Topics are dot-separated tokens (``agents.planner.tasks``).  Subscription
patterns follow NATS: ``*`` matches exactly one token, ``>`` (last token only)
matches one or more.  The in-process backend implements the same rules rather
than something looser, so a pattern that works in tests works on NATS.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from conclave.errors import InvalidTopic

#: headers the bus writes on a dead-lettered event
DLQ_REASON = "conclave-dlq-reason"
DLQ_ERROR_TYPE = "conclave-dlq-error-type"
DLQ_ATTEMPTS = "conclave-dlq-attempts"
DLQ_TOPIC = "conclave-dlq-topic"
DLQ_GROUP = "conclave-dlq-group"
DLQ_EVENT_ID = "conclave-dlq-event-id"
#: header on an error reply: the request was dead-lettered (``request()`` raises RequestFailed)
REPLY_ERROR = "conclave-error"

#: ``type`` of replies built from a handler's return value or :meth:`EventBus.reply`
REPLY_TYPE = "reply"
ERROR_REPLY_TYPE = "error"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_GROUP = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOPIC_LENGTH = 255

_TOPIC_HINT = (
    "topics are dot-separated tokens of letters, digits, '_' or '-' "
    "(e.g. 'agents.planner.tasks'); '*' and '>' are wildcards for subscribe() only"
)


def _new_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """The envelope every message travels in, on both backends.

    ``id`` is also the idempotency key: publishing the same id again within
    ``dedupe_window_s`` delivers it once.  ``attempt`` is set by the bus on
    delivery (1 for the first, 2 for the first redelivery ...).  ``reply_to``
    is set on requests; a handler's return value is sent there.
    """

    model_config = ConfigDict(extra="ignore")

    id: str = Field(default_factory=_new_id)
    topic: str
    type: str = "event"
    payload: dict[str, Any] = Field(default_factory=dict)
    correlation_id: str | None = None
    reply_to: str | None = None
    created_at: datetime = Field(default_factory=_now)
    headers: dict[str, str] = Field(default_factory=dict)
    attempt: int = Field(1, ge=1)

    @property
    def is_request(self) -> bool:
        return self.reply_to is not None

    @property
    def error(self) -> str | None:
        """On a dead letter, why it failed (the last exception, or that nobody acknowledged it)."""
        return self.headers.get(DLQ_REASON)


#: what a handler may return: a reply payload, a whole reply Event, or nothing
HandlerResult = Mapping[str, Any] | Event | None
#: a handler receives the event; returning normally acknowledges it, raising asks for redelivery
Handler = Callable[[Event], Awaitable[HandlerResult] | HandlerResult]


class RejectEvent(Exception):
    """Raise from a handler for an event that can never succeed (malformed payload ...).

    The bus dead-letters it at once with this message as the reason instead of
    retrying ``max_deliver`` times.
    """


@runtime_checkable
class Subscription(Protocol):
    """A live subscription; ``aclose()`` stops it."""

    pattern: str
    group: str | None

    @property
    def closed(self) -> bool: ...

    async def aclose(self, *, drain: bool = True) -> None:
        """Stop receiving.  ``drain=True`` lets running handlers finish (and acknowledge);
        ``drain=False`` cancels them and their events are redelivered."""
        ...


@runtime_checkable
class EventBus(Protocol):
    """Publish/subscribe, request/reply, at-least-once delivery and dead letters."""

    async def publish(
        self,
        topic: str,
        message: Mapping[str, Any] | Event | None = None,
        *,
        type: str = "event",
        headers: Mapping[str, str] | None = None,
        correlation_id: str | None = None,
    ) -> Event:
        """Send an event to every subscription whose pattern matches ``topic``.

        ``message`` is the payload dict, or a whole :class:`Event` (its id, type,
        headers are kept; it is addressed to ``topic``).  Returns the event sent.
        """
        ...

    async def subscribe(
        self,
        pattern: str,
        handler: Handler,
        *,
        group: str | None = None,
        concurrency: int = 1,
    ) -> Subscription:
        """Call ``handler`` for every event matching ``pattern`` published from now on.

        Without ``group`` each subscription gets every event (fan-out).  With
        ``group`` the subscriptions sharing (group, pattern) share one durable
        queue: each event goes to one member, events wait while no member is
        alive, and an event whose member crashed goes to another member.
        ``concurrency`` handlers run at once per subscription; with 1 a
        subscription sees events in publish order.
        """
        ...

    async def request(
        self,
        topic: str,
        payload: Mapping[str, Any] | None = None,
        *,
        type: str = "request",
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a request's own deadline, with its error
    ) -> Event:
        """Publish a request and wait for the first reply (matched by correlation id).

        Raises :class:`~conclave.errors.RequestTimeout` when none arrives in
        ``timeout`` seconds (default ``settings.bus.request_timeout_s``) and
        :class:`~conclave.errors.RequestFailed` when the handler failed on every
        delivery and the request was dead-lettered.
        """
        ...

    async def reply(
        self, request: Event, payload: Mapping[str, Any] | Event, *, type: str = REPLY_TYPE
    ) -> Event:
        """Answer ``request`` explicitly (a handler may also just return the payload)."""
        ...

    async def aclose(self) -> None:
        """Stop every subscription, let running handlers finish, then disconnect."""
        ...


# --- topics ---------------------------------------------------------------------------


def validate_topic(topic: object, *, what: str = "topic") -> str:
    """A concrete topic (no wildcards), or InvalidTopic saying what is wrong with it."""
    text = _check_text(topic, what)
    for token in text.split("."):
        if token in ("*", ">"):
            raise InvalidTopic(
                f"invalid {what} {text!r}: wildcard {token!r} in a topic to publish to",
                hint="publish to a concrete topic; wildcards belong in subscribe() patterns",
            )
        _check_token(text, token, what)
    return text


def validate_pattern(pattern: object) -> str:
    """A subscription pattern with NATS wildcards, or InvalidTopic."""
    text = _check_text(pattern, "pattern")
    tokens = text.split(".")
    for i, token in enumerate(tokens):
        if token == ">":
            if i != len(tokens) - 1:
                raise InvalidTopic(
                    f"invalid pattern {text!r}: '>' must be the last token",
                    hint="'>' matches the rest of the topic, e.g. 'agents.>'",
                )
            continue
        if token == "*":
            continue
        _check_token(text, token, "pattern")
    return text


def validate_group(group: object) -> str:
    if not isinstance(group, str) or not _GROUP.match(group):
        raise InvalidTopic(
            f"invalid group name {group!r}",
            hint="a group name is 1-64 letters, digits, '_' or '-', e.g. 'coders'",
        )
    return group


def topic_matches(pattern: str, topic: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` is one or more."""
    p = pattern.split(".")
    t = topic.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t) or (token != "*" and token != t[i]):
            return False
    return len(p) == len(t)


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidTopic(f"{what} must be a string, got {type(value).__name__}", hint=_TOPIC_HINT)
    if not value:
        raise InvalidTopic(f"{what} is empty", hint=_TOPIC_HINT)
    if len(value) > MAX_TOPIC_LENGTH:
        raise InvalidTopic(
            f"{what} is {len(value)} characters long (at most {MAX_TOPIC_LENGTH})",
            hint="use shorter tokens; put data in the payload, not the topic",
        )
    return value


def _check_token(text: str, token: str, what: str) -> None:
    if not token:
        raise InvalidTopic(
            f"invalid {what} {text!r}: empty token (leading, trailing or double dot)",
            hint=_TOPIC_HINT,
        )
    if not _TOKEN.match(token):
        bad = sorted({c for c in token if not (c.isascii() and (c.isalnum() or c in "_-"))})
        raise InvalidTopic(
            f"invalid {what} {text!r}: token {token!r} contains {''.join(bad)!r}",
            hint=_TOPIC_HINT,
        )
