"""The EventBus contract: every test runs on the in-process bus and on real NATS JetStream."""

from __future__ import annotations

import asyncio
import time

import pytest

from conclave.bus import (
    DLQ_ATTEMPTS,
    DLQ_ERROR_TYPE,
    DLQ_EVENT_ID,
    DLQ_GROUP,
    DLQ_REASON,
    DLQ_TOPIC,
    BusClosed,
    Event,
    EventBus,
    InvalidEvent,
    InvalidTopic,
    RejectEvent,
    RequestFailed,
    RequestTimeout,
)
from conclave.errors import ConclaveError, InvalidRequest

from .conftest import BusFactory, collect, nothing_more

Q = asyncio.Queue


def recorder(queue: asyncio.Queue[Event]):
    async def handler(event: Event) -> None:
        queue.put_nowait(event)

    return handler


# --- publish / subscribe --------------------------------------------------------------


async def test_fan_out_every_subscriber_gets_every_event(bus: EventBus) -> None:
    a: Q[Event] = Q()
    b: Q[Event] = Q()
    other: Q[Event] = Q()
    await bus.subscribe("agents.planner", recorder(a))
    await bus.subscribe("agents.planner", recorder(b))
    await bus.subscribe("agents.coder", recorder(other))

    sent = await bus.publish("agents.planner", {"step": 1, "text": "plan ü"}, type="plan",
                             headers={"run": "r1"})
    got_a, got_b = (await collect(a, 1))[0], (await collect(b, 1))[0]
    for got in (got_a, got_b):
        assert got.id == sent.id
        assert got.topic == "agents.planner"
        assert got.type == "plan"
        assert got.payload == {"step": 1, "text": "plan ü"}
        assert got.headers == {"run": "r1"}
        assert got.attempt == 1
        assert got.created_at == sent.created_at
    # each subscriber gets its own copy: one handler cannot change what another sees
    got_a.payload["step"] = 99
    assert got_b.payload["step"] == 1
    await nothing_more(other, 0.2)


async def test_publish_a_whole_event_keeps_its_fields(bus: EventBus) -> None:
    q: Q[Event] = Q()
    await bus.subscribe("x.y", recorder(q))
    event = Event(topic="ignored.topic", type="custom", payload={"a": [1, 2]},
                  correlation_id="c-1", headers={"h": "v"})
    sent = await bus.publish("x.y", event)
    got = (await collect(q, 1))[0]
    assert (got.id, got.topic, got.type, got.payload, got.correlation_id, got.headers) == (
        event.id, "x.y", "custom", {"a": [1, 2]}, "c-1", {"h": "v"})
    assert sent.topic == "x.y"


async def test_subscriber_only_sees_events_published_after_it_subscribed(bus: EventBus) -> None:
    await bus.publish("late.topic", {"n": 0})
    q: Q[Event] = Q()
    await bus.subscribe("late.topic", recorder(q))
    await bus.publish("late.topic", {"n": 1})
    assert [e.payload["n"] for e in await collect(q, 1)] == [1]
    await nothing_more(q, 0.2)


async def test_wildcards_follow_nats_rules(bus: EventBus) -> None:
    star: Q[Event] = Q()
    tail: Q[Event] = Q()
    middle: Q[Event] = Q()
    everything: Q[Event] = Q()
    await bus.subscribe("agents.*", recorder(star))
    await bus.subscribe("agents.>", recorder(tail))
    await bus.subscribe("*.steps.done", recorder(middle))
    await bus.subscribe(">", recorder(everything))

    for topic in ("agents", "agents.planner", "agents.planner.steps", "agents.steps.done",
                  "runs.steps.done", "runs.steps.done.late", "other"):
        await bus.publish(topic, {"topic": topic})

    async def topics(q: Q[Event], n: int) -> set[str]:
        got = {e.topic for e in await collect(q, n)}
        await nothing_more(q, 0.1)
        return got

    assert await topics(star, 1) == {"agents.planner"}
    assert await topics(tail, 3) == {"agents.planner", "agents.planner.steps",
                                     "agents.steps.done"}
    assert await topics(middle, 2) == {"agents.steps.done", "runs.steps.done"}
    assert len(await topics(everything, 7)) == 7


async def test_events_arrive_in_publish_order_for_a_single_consumer(bus: EventBus) -> None:
    q: Q[Event] = Q()
    await bus.subscribe("ordered.>", recorder(q))
    for i in range(60):
        await bus.publish(f"ordered.{'a' if i % 2 else 'b'}", {"i": i})
    assert [e.payload["i"] for e in await collect(q, 60)] == list(range(60))


async def test_same_event_id_published_twice_is_delivered_once(bus: EventBus) -> None:
    q: Q[Event] = Q()
    await bus.subscribe("dedupe.t", recorder(q))
    event = Event(topic="dedupe.t", payload={"n": 1})
    await bus.publish("dedupe.t", event)
    await bus.publish("dedupe.t", event)  # a retry after an unclear failure
    await bus.publish("dedupe.t", {"n": 2})
    assert [e.payload["n"] for e in await collect(q, 2)] == [1, 2]
    await nothing_more(q, 0.2)


# --- queue groups ---------------------------------------------------------------------


async def test_queue_group_members_share_events_and_groups_each_get_all(
    bus: EventBus,
) -> None:
    members: dict[str, list[int]] = {"m1": [], "m2": []}
    other_group: Q[Event] = Q()
    done: Q[int] = Q()

    def member(name: str):
        async def handler(event: Event) -> None:
            await asyncio.sleep(0.02)  # real work takes time, so both members get a share
            members[name].append(event.payload["n"])
            done.put_nowait(event.payload["n"])

        return handler

    await bus.subscribe("jobs.*", member("m1"), group="workers")
    await bus.subscribe("jobs.*", member("m2"), group="workers")
    await bus.subscribe("jobs.*", recorder(other_group), group="auditors")

    for n in range(20):
        await bus.publish(f"jobs.{n % 3}", {"n": n})
    await collect(done, 20)
    await nothing_more(done, 0.3)
    handled = members["m1"] + members["m2"]
    assert sorted(handled) == list(range(20)), "each event handled by exactly one member"
    assert members["m1"] and members["m2"], f"load not shared: {members}"
    assert sorted(e.payload["n"] for e in await collect(other_group, 20)) == list(range(20))


async def test_group_keeps_events_while_no_member_runs(bus: EventBus) -> None:
    first: Q[Event] = Q()
    sub = await bus.subscribe("durable.t", recorder(first), group="keepers")
    await bus.publish("durable.t", {"n": 1})
    assert (await collect(first, 1))[0].payload == {"n": 1}
    await sub.aclose()
    assert sub.closed

    await bus.publish("durable.t", {"n": 2})  # nobody in the group is listening
    await bus.publish("durable.t", {"n": 3})
    later: Q[Event] = Q()
    await bus.subscribe("durable.t", recorder(later), group="keepers")
    assert [e.payload["n"] for e in await collect(later, 2)] == [2, 3]


# --- request / reply ------------------------------------------------------------------


async def test_request_gets_the_handler_return_value(bus: EventBus) -> None:
    seen: list[Event] = []

    async def double(event: Event) -> dict[str, int]:
        seen.append(event)
        return {"doubled": event.payload["n"] * 2}

    await bus.subscribe("math.double", double, group="calculators")
    replies = await asyncio.gather(*(bus.request("math.double", {"n": n}) for n in range(5)))
    assert [r.payload["doubled"] for r in replies] == [0, 2, 4, 6, 8]
    by_corr = {e.correlation_id: e for e in seen}
    for reply in replies:
        assert reply.type == "reply"
        assert reply.correlation_id in by_corr
        assert by_corr[reply.correlation_id].reply_to is not None
        assert by_corr[reply.correlation_id].is_request


async def test_request_answered_with_explicit_reply_and_sync_handler(bus: EventBus) -> None:
    async def answer(event: Event) -> None:
        await bus.reply(event, {"ok": True, "echo": event.payload["q"]}, type="answer")

    def sync_answer(event: Event) -> Event:
        return Event(topic="any", type="sync", payload={"sync": event.payload["q"]})

    await bus.subscribe("ask.explicit", answer)
    await bus.subscribe("ask.sync", sync_answer)
    reply = await bus.request("ask.explicit", {"q": "hi"})
    assert (reply.type, reply.payload) == ("answer", {"ok": True, "echo": "hi"})
    reply = await bus.request("ask.sync", {"q": "yo"})
    assert (reply.type, reply.payload) == ("sync", {"sync": "yo"})

    with pytest.raises(InvalidRequest, match="not a request"):
        await bus.reply(Event(topic="x"), {"no": "reply_to"})


async def test_request_without_responder_times_out_clearly(bus: EventBus) -> None:
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as info:
        await bus.request("nobody.home", {"q": 1}, timeout=0.4)
    assert 0.35 < time.monotonic() - started < 2.0
    assert isinstance(info.value, ConclaveError)
    assert "nobody.home" in str(info.value) and "0.4s" in str(info.value)
    assert "subscriber" in str(info.value)


async def test_request_whose_handler_always_fails_raises_request_failed(
    bus: EventBus,
) -> None:
    async def broken(event: Event) -> dict[str, str]:
        raise RuntimeError("tool crashed: disk full")

    await bus.subscribe("fragile.op", broken)
    with pytest.raises(RequestFailed, match="disk full") as info:
        await bus.request("fragile.op", {}, timeout=5)
    assert "delivery 3" in str(info.value)


async def test_request_whose_handler_returns_garbage_fails_at_once(bus: EventBus) -> None:
    calls: list[int] = []

    async def wrong(event: Event) -> str:
        calls.append(event.attempt)
        return "a string is not a reply"

    await bus.subscribe("wrong.reply", wrong)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(RequestFailed, match="cannot be sent as a reply"):
        await bus.request("wrong.reply", {}, timeout=5)
    assert time.monotonic() - started < 2
    assert calls == [1]


# --- acknowledgements, redelivery, dead letters -----------------------------------------


async def test_failed_handler_is_redelivered_with_backoff_until_it_succeeds(
    bus: EventBus,
) -> None:
    attempts: list[tuple[int, float]] = []
    done: Q[Event] = Q()
    dlq: Q[Event] = Q()
    await bus.subscribe("dlq.>", recorder(dlq))

    async def flaky(event: Event) -> None:
        attempts.append((event.attempt, time.monotonic()))
        if event.attempt < 3:
            raise ConnectionError(f"transient failure #{event.attempt}")
        done.put_nowait(event)

    await bus.subscribe("flaky.op", flaky)
    sent = await bus.publish("flaky.op", {"n": 1})
    got = (await collect(done, 1))[0]
    assert got.id == sent.id and got.attempt == 3
    assert [a for a, _ in attempts] == [1, 2, 3]
    # backoff 0.05 s then 0.1 s between attempts
    assert attempts[1][1] - attempts[0][1] >= 0.04
    assert attempts[2][1] - attempts[1][1] >= 0.09
    await nothing_more(done, 0.3)
    assert dlq.empty()


async def test_event_goes_to_dead_letter_topic_after_max_deliveries(bus: EventBus) -> None:
    calls: list[int] = []
    dlq: Q[Event] = Q()
    await bus.subscribe("dlq.>", recorder(dlq))

    async def always_fails(event: Event) -> None:
        calls.append(event.attempt)
        raise ValueError(f"cannot parse order {event.payload['order']}")

    await bus.subscribe("orders.new", always_fails, group="billing")
    sent = await bus.publish("orders.new", {"order": 42}, type="order",
                             headers={"tenant": "acme"})
    letter = (await collect(dlq, 1))[0]
    assert letter.topic == "dlq.orders.new"
    assert letter.id != sent.id
    assert letter.payload == {"order": 42} and letter.type == "order"
    assert letter.headers["tenant"] == "acme"
    assert letter.headers[DLQ_REASON] == "ValueError: cannot parse order 42"
    assert letter.error == "ValueError: cannot parse order 42"
    assert letter.headers[DLQ_ERROR_TYPE] == "ValueError"
    assert letter.headers[DLQ_ATTEMPTS] == "3"
    assert letter.headers[DLQ_TOPIC] == "orders.new"
    assert letter.headers[DLQ_EVENT_ID] == sent.id
    assert letter.headers[DLQ_GROUP] == "billing"
    await nothing_more(dlq, 1.3)  # longer than ack_wait: no further delivery anywhere
    assert calls == [1, 2, 3]


async def test_rejected_event_is_dead_lettered_at_once(make_bus: BusFactory) -> None:
    bus = await make_bus(dead_letter_topic="deadletters")
    calls: list[int] = []
    dlq: Q[Event] = Q()
    await bus.subscribe("deadletters", recorder(dlq))

    async def strict(event: Event) -> None:
        calls.append(event.attempt)
        raise RejectEvent("payload has no 'task' field")

    await bus.subscribe("tasks.new", strict)
    await bus.publish("tasks.new", {"wrong": 1})
    letter = (await collect(dlq, 1))[0]
    assert letter.topic == "deadletters"
    assert letter.headers[DLQ_REASON] == "RejectEvent: payload has no 'task' field"
    assert letter.headers[DLQ_ATTEMPTS] == "1"
    await nothing_more(dlq, 0.3)
    assert calls == [1]


async def test_cancelled_handler_event_is_redelivered_to_another_member(
    bus: EventBus,
) -> None:
    """The in-process analogue of a crash: the handler task dies before acknowledging."""
    started: Q[Event] = Q()
    done: Q[Event] = Q()

    async def hangs(event: Event) -> None:
        started.put_nowait(event)
        await asyncio.Event().wait()

    first = await bus.subscribe("work.item", hangs, group="crew")
    sent = await bus.publish("work.item", {"n": 7})
    assert (await collect(started, 1))[0].id == sent.id
    await first.aclose(drain=False)  # kill the member mid-handler

    await bus.subscribe("work.item", recorder(done), group="crew")
    again = (await collect(done, 1, within=5))[0]
    assert again.id == sent.id and again.attempt == 2 and again.payload == {"n": 7}


async def test_slow_handler_keeps_its_event_beyond_ack_wait(bus: EventBus) -> None:
    calls: list[int] = []
    done: Q[Event] = Q()

    async def slow(event: Event) -> None:
        calls.append(event.attempt)
        await asyncio.sleep(2.2)  # more than twice ack_wait (1 s)
        done.put_nowait(event)

    await bus.subscribe("slow.op", slow, group="slowpokes", concurrency=2)
    await bus.publish("slow.op", {})
    await collect(done, 1, within=6)
    await nothing_more(done, 1.2)
    assert calls == [1], "a handler still running must not have its event redelivered"


async def test_aclose_drains_running_handlers_and_acknowledges(bus: EventBus) -> None:
    finished: list[int] = []
    started: Q[Event] = Q()

    async def work(event: Event) -> None:
        started.put_nowait(event)
        await asyncio.sleep(0.3)
        finished.append(event.payload["n"])

    sub = await bus.subscribe("drain.t", work, group="drainers", concurrency=3)
    for n in range(3):
        await bus.publish("drain.t", {"n": n})
    await collect(started, 3)
    await sub.aclose()  # waits for the three handlers
    assert sorted(finished) == [0, 1, 2]

    # they were acknowledged: a new member of the group gets nothing back
    again: Q[Event] = Q()
    await bus.subscribe("drain.t", recorder(again), group="drainers")
    await nothing_more(again, 1.5)


async def test_bus_aclose_drains_then_refuses_work(make_bus: BusFactory) -> None:
    bus = await make_bus()
    finished: list[str] = []
    started: Q[Event] = Q()

    async def work(event: Event) -> None:
        started.put_nowait(event)
        await asyncio.sleep(0.3)
        # a draining handler may still publish (agents report their last step)
        await bus.publish("report.done", {"id": event.id})
        finished.append(event.id)

    await bus.subscribe("closing.t", work)
    sent = await bus.publish("closing.t", {})
    await collect(started, 1)
    await bus.aclose()
    assert finished == [sent.id]
    with pytest.raises(BusClosed):
        await bus.publish("closing.t", {})
    with pytest.raises(BusClosed):
        await bus.subscribe("closing.t", work)
    with pytest.raises(BusClosed):
        await bus.request("closing.t", {})


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["", "agents..planner", ".agents", "agents.", "agents.*",
                                   "agents.>", "a b", "agents.plan!", "ü.x", "x" * 300])
async def test_invalid_topic_is_refused_with_a_clear_error(bus: EventBus, topic: str) -> None:
    with pytest.raises(InvalidTopic) as info:
        await bus.publish(topic, {})
    message = str(info.value)
    assert isinstance(info.value, ConclaveError) and info.value.http_status == 400
    assert "topic" in message
    assert info.value.hint


@pytest.mark.parametrize("pattern", ["agents.>.x", "a..b", "", "agents.pl*", "a b.>"])
async def test_invalid_pattern_is_refused(bus: EventBus, pattern: str) -> None:
    with pytest.raises(InvalidTopic, match="pattern"):
        await bus.subscribe(pattern, recorder(Q()))


async def test_other_bad_input_is_refused(bus: EventBus) -> None:
    with pytest.raises(InvalidTopic, match="group"):
        await bus.subscribe("a.b", recorder(Q()), group="has.dot")
    with pytest.raises(InvalidRequest, match="not callable"):
        await bus.subscribe("a.b", "not a function")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="concurrency"):
        await bus.subscribe("a.b", recorder(Q()), concurrency=0)
    with pytest.raises(InvalidEvent, match="not JSON-serializable"):
        await bus.publish("a.b", {"obj": object()})
    with pytest.raises(InvalidEvent, match="must be a mapping"):
        await bus.publish("a.b", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent, match="over the"):
        await bus.publish("a.b", {"blob": "x" * 1_100_000})
    with pytest.raises(InvalidTopic):
        await bus.request("a.*", {})


async def test_event_never_acknowledged_is_dead_lettered_not_dropped(bus: EventBus) -> None:
    """Members that die mid-handler use up deliveries too; the last one is not lost."""
    started: Q[Event] = Q()
    dlq: Q[Event] = Q()
    await bus.subscribe("dlq.>", recorder(dlq))

    async def hangs(event: Event) -> None:
        started.put_nowait(event)
        await asyncio.Event().wait()

    member = await bus.subscribe("doomed.job", hangs, group="doomed")
    sent = await bus.publish("doomed.job", {"n": 1})
    for attempt in (1, 2, 3):  # max_deliver is 3
        if attempt > 1:
            member = await bus.subscribe("doomed.job", hangs, group="doomed")
        got = (await collect(started, 1))[0]
        assert (got.id, got.attempt) == (sent.id, attempt)
        await member.aclose(drain=False)
    await bus.subscribe("doomed.job", hangs, group="doomed")
    letter = (await collect(dlq, 1))[0]
    assert letter.headers[DLQ_EVENT_ID] == sent.id
    assert letter.headers[DLQ_ERROR_TYPE] == "Unacknowledged"
    assert "not acknowledged after 3 deliveries" in letter.headers[DLQ_REASON]
    assert letter.headers[DLQ_ATTEMPTS] == "4"
    assert started.empty(), "the handler is not called past max_deliver"
