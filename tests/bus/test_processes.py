"""NATS across OS processes: a member killed with SIGKILL, and a request served elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from conclave.bus import Event

from .conftest import BusFactory, collect, nothing_more

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("_worker.py")


@pytest.fixture
def backend() -> str:
    return "nats"


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, within: float = 20.0) -> str:
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), within)
        except TimeoutError:
            raise AssertionError(f"worker said nothing for {within}s") from None
        if not raw:
            stderr = await self.proc.stderr.read() if self.proc.stderr else b""
            raise AssertionError(f"worker exited: {stderr.decode(errors='replace')[-2000:]}")
        return raw.decode().strip()


@pytest_asyncio.fixture
async def start_worker(prefix: str) -> AsyncIterator[Callable[[str], asyncio.Future[Worker]]]:
    started: list[asyncio.subprocess.Process] = []

    async def start(mode: str) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(WORKER), mode, prefix,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        started.append(proc)
        worker = Worker(proc)
        assert await worker.line() == "ready"
        return worker

    yield start  # type: ignore[misc]
    for proc in started:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def test_event_of_a_killed_consumer_goes_to_the_next_after_ack_wait(
    make_bus: BusFactory, start_worker: Callable[[str], asyncio.Future[Worker]]
) -> None:
    bus = await make_bus()
    worker = await start_worker("hang")
    sent = await bus.publish("jobs.build", {"n": 1})
    assert await worker.line() == f"received {sent.id} 1"

    # while the worker lives (its handler still running, heartbeating), nobody else gets it
    mine: asyncio.Queue[Event] = asyncio.Queue()

    async def handler(event: Event) -> None:
        mine.put_nowait(event)

    await bus.subscribe("jobs.*", handler, group="workers")
    await nothing_more(mine, 1.6)  # longer than ack_wait (1 s)

    os.kill(worker.proc.pid, signal.SIGKILL)
    assert await worker.proc.wait() == -signal.SIGKILL
    killed = time.monotonic()
    got = (await collect(mine, 1, within=5))[0]
    waited = time.monotonic() - killed
    assert got.id == sent.id and got.payload == {"n": 1}
    assert got.attempt == 2
    # redelivered by ack_wait expiry (the last heartbeat was at most 0.5 s before the kill)
    assert 0.3 < waited < 3.0, waited


async def test_request_served_by_another_process(
    make_bus: BusFactory, start_worker: Callable[[str], asyncio.Future[Worker]]
) -> None:
    bus = await make_bus()
    worker = await start_worker("serve")
    replies = await asyncio.gather(*(bus.request("jobs.double", {"n": n}, timeout=10)
                                     for n in (1, 21)))
    assert [r.payload["doubled"] for r in replies] == [2, 42]
    assert {r.payload["pid"] for r in replies} == {worker.proc.pid}
    assert worker.proc.pid != os.getpid()
