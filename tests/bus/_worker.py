"""A bus member in its own OS process, for the cross-process NATS tests.

``python tests/bus/_worker.py MODE PREFIX`` joins group ``workers`` on
``jobs.*`` and prints one line per step on stdout, which the test reads:

* ``hang``: print ``received <event id> <attempt>`` and never acknowledge
  (the test then kills the process with SIGKILL);
* ``serve``: answer each request with ``{"doubled": n * 2, "pid": <pid>}``.
"""

from __future__ import annotations

import asyncio
import os
import sys

from conclave.bus import Event, open_bus
from conclave.config import BusSettings


async def main(mode: str, prefix: str) -> None:
    bus = await open_bus(BusSettings(backend="nats", prefix=prefix, ack_wait_s=1.0,
                                     max_deliver=3, retry_backoff_s=0.05))

    async def hang(event: Event) -> None:
        print(f"received {event.id} {event.attempt}", flush=True)
        await asyncio.Event().wait()

    async def serve(event: Event) -> dict[str, int]:
        return {"doubled": event.payload["n"] * 2, "pid": os.getpid()}

    await bus.subscribe("jobs.*", hang if mode == "hang" else serve, group="workers")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
