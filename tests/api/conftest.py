"""Real ``conclave serve`` processes in front of a loopback OpenAI-compatible upstream.

The upstream is the wire server in this test process: it answers chat
completions with fixed usage (10 prompt + 20 completion tokens), streaming
or not, so every call has an exactly known cost at the test catalog's prices.
Servers are separate OS processes (``conclave serve``) sharing the same
backends, as replicas would.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio

from tests.support.wire_server import (
    Piece,
    RecordedRequest,
    ScriptedResponse,
    WireServer,
    sse_event,
)

CONCLAVE = str(Path(sys.executable).with_name("conclave"))
PG_URL = os.environ.get("CONCLAVE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CONCLAVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

PROMPT_TOKENS, COMPLETION_TOKENS = 10, 20
#: $ per million tokens: a call costs (10 * 1000 + 20 * 2000) / 1e6 = $0.05 = 50,000 micros
PRICE_IN, PRICE_OUT = 1000, 2000
CALL_MICROS = PROMPT_TOKENS * PRICE_IN + COMPLETION_TOKENS * PRICE_OUT
MODEL = "up/model"
#: an embedding model of the same upstream: each input counts 4 tokens at $500 per million
EMBED_MODEL, EMBED_TOKENS, EMBED_PRICE = "up/embed", 4, 500


def embedding_of(text: str) -> list[float]:
    """The upstream's vector for ``text``: exact in float32, so base64 round-trips."""
    return [float(len(text)), 0.5, -2.0, float(ord(text[0]) if text else 0)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Upstream:
    """Answers like OpenAI.  ``token_delay`` slows streams so a client can cut them."""

    server: WireServer
    token_delay: float = 0.0
    stream_tokens: int = COMPLETION_TOKENS

    @property
    def url(self) -> str:
        return f"{self.server.url}/v1"

    def respond(self, req: RecordedRequest) -> ScriptedResponse:
        body = req.json or {}
        if req.path.endswith("/embeddings"):
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            return ScriptedResponse.json({
                "object": "list", "model": "e",
                "data": [{"object": "embedding", "index": i, "embedding": embedding_of(t)}
                         for i, t in enumerate(texts)],
                "usage": {"prompt_tokens": EMBED_TOKENS * len(texts),
                          "total_tokens": EMBED_TOKENS * len(texts)}})
        if body.get("stream"):
            events = [Piece(sse_event({
                "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"content": f"tok{i} "},
                             "finish_reason": None}]}), self.token_delay)
                for i in range(self.stream_tokens)]
            events.append(Piece(sse_event({
                "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})))
            events.append(Piece(sse_event({
                "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS,
                                         "completion_tokens": self.stream_tokens,
                                         "total_tokens": PROMPT_TOKENS + self.stream_tokens}})))
            events.append(Piece(sse_event("[DONE]")))
            return ScriptedResponse.sse(events)
        return ScriptedResponse.json({
            "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                      "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}})


@pytest_asyncio.fixture(loop_scope="session")
async def upstream() -> AsyncIterator[Upstream]:
    holder: list[Upstream] = []
    server = WireServer(record=False, handler=lambda req: holder[0].respond(req))
    up = Upstream(server)
    holder.append(up)
    async with server:
        yield up


def catalog_file(tmp: Path, upstream_url: str) -> Path:
    path = tmp / "catalog.yaml"
    path.write_text(
        "providers:\n  up:\n    type: openai\n"
        f"    base_url: {upstream_url}\n    api_key_env: UP_API_KEY\n"
        f"models:\n  - name: {MODEL}\n    provider: up\n    id: m\n    tier: 1\n"
        f"    max_output_tokens: 100\n    price: {{input: {PRICE_IN}, output: {PRICE_OUT}}}\n"
        f"  - name: {EMBED_MODEL}\n    provider: up\n    id: e\n    tier: 1\n"
        f"    kind: embedding\n"
        f"    price: {{input: {EMBED_PRICE}, output: 0}}\n")
    return path


@dataclass
class Backends:
    """Where the servers keep their state: embedded (SQLite) or scale-out (PG + Redis)."""

    kind: str
    env: dict[str, str] = field(default_factory=dict)
    schema: str | None = None
    prefix: str | None = None

    @classmethod
    def embedded(cls) -> Backends:
        return cls("sqlite")

    @classmethod
    def scale_out(cls, *, pg_url: str = PG_URL, redis_url: str = REDIS_URL) -> Backends:
        tag = uuid.uuid4().hex[:8]
        schema, prefix = f"t_api_{tag}", f"{{t_api_{tag}}}:"
        return cls("postgres+redis", {
            "CONCLAVE_ACCOUNTING__LEDGER_URL": pg_url,
            "CONCLAVE_ACCOUNTING__LEDGER_SCHEMA": schema,
            "CONCLAVE_ACCOUNTING__BUDGET_BACKEND": "redis",
            "CONCLAVE_ACCOUNTING__REDIS_URL": redis_url,
            "CONCLAVE_ACCOUNTING__REDIS_PREFIX": prefix,
            "CONCLAVE_ACCOUNTING__BACKEND_TIMEOUT_S": "2",
        }, schema, prefix)

    def cleanup(self) -> None:
        if self.schema:
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        if self.prefix:
            import redis

            r = redis.Redis.from_url(REDIS_URL)
            keys = list(r.scan_iter(match=f"{self.prefix}*", count=1000))
            if keys:
                r.delete(*keys)


def server_env(tmp: Path, upstream_url: str, backends: Backends, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONCLAVE_")
           and not k.endswith("_BASE_URL") and k != "OLLAMA_HOST"}
    env.update({
        "CONCLAVE_CONFIG": str(tmp / "none.yaml"),
        "CONCLAVE_DATA_DIR": str(tmp / "data"),
        "CONCLAVE_CATALOG_FILE": str(catalog_file(tmp, upstream_url)),
        "UP_API_KEY": "sk-upstream-secret-value",
        "CONCLAVE_ROUTING__MAX_RETRIES": "0",
        **backends.env, **extra,
    })
    return env


def conclave_cli(env: dict[str, str], *args: str) -> Any:
    r = subprocess.run([CONCLAVE, *args, "--json"], env=env, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, sig: int = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_servers(env: dict[str, str], n: int, tmp: Path, log_level: str = "warning"
                  ) -> list[Server]:
    servers = []
    for i in range(n):
        port = free_port()
        log = tmp / f"server-{i}.log"
        proc = subprocess.Popen(
            [CONCLAVE, "serve", "--port", str(port), "--log-level", log_level],
            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        servers.append(Server(proc, f"http://127.0.0.1:{port}", log))
    deadline = time.monotonic() + 60
    for s in servers:
        while True:
            if s.proc.poll() is not None:
                raise RuntimeError(f"server exited: {s.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{s.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {s.log.read_text()[-2000:]}")
            time.sleep(0.1)
    return servers


@pytest.fixture
def servers_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Server] = []
    backends_used: list[Backends] = []

    def make(upstream_url: str, backends: Backends, n: int = 1, log_level: str = "warning",
             **extra: str) -> tuple[list[Server], dict[str, str]]:
        env = server_env(tmp_path, upstream_url, backends, **extra)
        backends_used.append(backends)
        servers = start_servers(env, n, tmp_path, log_level)
        started.extend(servers)
        return servers, env

    yield make
    for s in started:
        s.stop()
    for b in backends_used:
        b.cleanup()


def chat_body(stream: bool = False, max_tokens: int = 20, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}],
            "max_tokens": max_tokens, "stream": stream, **extra}


async def wait_until(pred: Any, within: float = 10.0, every: float = 0.1) -> None:
    deadline = time.monotonic() + within
    while True:
        if await pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)
