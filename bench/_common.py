"""Shared helpers for benchmark scripts: a fast loopback upstream in its own process."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_UPSTREAM = """
import asyncio, json, sys
from tests.support.wire_server import ScriptedResponse, WireServer
async def main():
    server = WireServer(port=int(sys.argv[1]), record=False)
    server.serve_fixed(ScriptedResponse.json(json.loads(sys.argv[2])))
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

CHAT_COMPLETION = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def upstream(body: dict[str, object] = CHAT_COMPLETION) -> Iterator[str]:
    """A loopback server answering every request with ``body`` from memory, in a child process
    (so its CPU time is not charged to the client being measured)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _UPSTREAM, str(port), json.dumps(body)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "ready" not in line:
            raise RuntimeError("benchmark upstream failed to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(5)


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def now() -> float:
    return time.perf_counter()
