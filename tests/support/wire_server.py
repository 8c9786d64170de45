"""A scriptable loopback HTTP/1.1 server that speaks raw bytes.

Provider tests replace cloud APIs with this server: each test scripts what the
"provider" answers (status, headers, body pieces with delays, chunked transfer,
a connection abort after N pieces) and then checks what the client sent and
whether it hung up early.  It is written on ``asyncio.start_server`` rather
than a web framework so that a test controls every byte and every timing,
including the broken ones (a stream cut mid-chunk, a client that goes away).

Usage::

    async with WireServer() as server:
        server.enqueue(ScriptedResponse.json({"ok": True}))
        ...  # point a client at server.url
        assert server.requests[0].json == {...}

Benchmarks use :meth:`WireServer.serve_fixed`: one response rendered to bytes
once and written for every request, with keep-alive, as fast as the event
loop allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

__all__ = [
    "Piece",
    "RecordedRequest",
    "ScriptedResponse",
    "WireServer",
    "ndjson_line",
    "sse_event",
    "wire_server",
]

_MAX_HEADER_BYTES = 64 * 1024


# --- payload helpers ------------------------------------------------------------------


def sse_event(data: Any, event: str | None = None) -> bytes:
    """One Server-Sent Event: ``event: <name>`` (if given) and ``data: <json>``.

    ``data`` that is already ``str``/``bytes`` is sent verbatim, so a test can
    send ``[DONE]`` or deliberately broken JSON.
    """
    if isinstance(data, bytes):
        payload = data.decode()
    elif isinstance(data, str):
        payload = data
    else:
        payload = json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def ndjson_line(obj: Any) -> bytes:
    """One newline-delimited JSON record (Ollama's streaming format)."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# --- scripting ------------------------------------------------------------------------


@dataclass
class Piece:
    """A body piece, written after waiting ``delay`` seconds."""

    data: bytes
    delay: float = 0.0


@dataclass
class ScriptedResponse:
    """What the server answers to one request.

    ``pieces`` are written in order (each one chunk when ``chunked``); with
    ``abort_after=N`` the TCP connection is reset after N pieces, without the
    terminating chunk, the way a crashed upstream looks to a client.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    pieces: list[Piece] = field(default_factory=list)
    chunked: bool = False
    abort_after: int | None = None
    #: send ``Connection: close`` and close after the response
    close: bool = False

    def __post_init__(self) -> None:
        self.pieces = [p if isinstance(p, Piece) else Piece(bytes(p)) for p in self.pieces]

    # -- constructors -----------------------------------------------------------------

    @classmethod
    def json(cls, body: Any, status: int = 200, headers: dict[str, str] | None = None,
             **kwargs: Any) -> ScriptedResponse:
        data = json.dumps(body).encode()
        hdrs = {"content-type": "application/json", **(headers or {})}
        return cls(status=status, headers=hdrs, pieces=[Piece(data)], **kwargs)

    @classmethod
    def text(cls, body: str, status: int = 200, headers: dict[str, str] | None = None,
             **kwargs: Any) -> ScriptedResponse:
        hdrs = {"content-type": "text/plain; charset=utf-8", **(headers or {})}
        return cls(status=status, headers=hdrs, pieces=[Piece(body.encode())], **kwargs)

    @classmethod
    def stream(cls, pieces: Iterable[bytes | Piece], *, content_type: str,
               delay: float = 0.0, status: int = 200, headers: dict[str, str] | None = None,
               **kwargs: Any) -> ScriptedResponse:
        """A chunked stream; ``delay`` applies to pieces given as plain bytes."""
        hdrs = {"content-type": content_type, **(headers or {})}
        items = [p if isinstance(p, Piece) else Piece(p, delay) for p in pieces]
        return cls(status=status, headers=hdrs, pieces=items, chunked=True, **kwargs)

    @classmethod
    def sse(cls, events: Iterable[bytes | Piece], **kwargs: Any) -> ScriptedResponse:
        """A Server-Sent Events stream; build the events with :func:`sse_event`."""
        hdrs = {"cache-control": "no-cache", **kwargs.pop("headers", {})}
        return cls.stream(events, content_type="text/event-stream", headers=hdrs, **kwargs)

    @classmethod
    def ndjson(cls, records: Iterable[Any], **kwargs: Any) -> ScriptedResponse:
        """An NDJSON stream of ``records`` (dicts are encoded, bytes/Piece sent as given)."""
        items = [r if isinstance(r, bytes | Piece) else ndjson_line(r) for r in records]
        return cls.stream(items, content_type="application/x-ndjson", **kwargs)

    # -- encoding ---------------------------------------------------------------------

    def head_bytes(self, *, keep_alive: bool) -> bytes:
        try:
            reason = HTTPStatus(self.status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {self.status} {reason}"]
        names = {k.lower() for k in self.headers}
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        if self.chunked:
            lines.append("transfer-encoding: chunked")
        elif "content-length" not in names:
            lines.append(f"content-length: {sum(len(p.data) for p in self.pieces)}")
        lines.append("connection: keep-alive" if keep_alive else "connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def frame(self, data: bytes) -> bytes:
        if not self.chunked:
            return data
        if not data:
            return b""  # an empty chunk would end the body early
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    def render(self, *, keep_alive: bool = True) -> bytes:
        """The whole response as bytes (for responses without delays or aborts)."""
        out = self.head_bytes(keep_alive=keep_alive) + b"".join(
            self.frame(p.data) for p in self.pieces
        )
        return out + (b"0\r\n\r\n" if self.chunked else b"")


@dataclass
class RecordedRequest:
    """One request as the server saw it, and how its response ended."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    #: the client closed the connection before the whole response was sent
    client_disconnected: bool = False
    #: the server aborted the connection as scripted
    aborted: bool = False
    #: number of body pieces written before the response ended
    pieces_sent: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    async def wait_done(self, within: float = 5.0) -> None:
        """Wait until the response finished, was aborted, or the client left."""
        await asyncio.wait_for(self.done.wait(), within)


Handler = Callable[[RecordedRequest], ScriptedResponse | Awaitable[ScriptedResponse]]


class _Disconnected(Exception):
    pass


# --- the server -----------------------------------------------------------------------


class WireServer:
    """Loopback HTTP/1.1 server on an ephemeral port; see the module docstring.

    Responses come, in order of precedence, from a ``handler`` callable, the
    queue filled by :meth:`enqueue`, or the fixed response of
    :meth:`serve_fixed`.  A request with nothing scripted gets a 599 with a
    JSON body saying so, which makes a test fail loudly instead of hanging.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, record: bool = True,
                 handler: Handler | None = None) -> None:
        self.host = host
        self.port = port
        self.record = record
        self.handler = handler
        self.requests: list[RecordedRequest] = []
        self.request_count = 0
        self.connections_opened = 0
        self._queue: deque[ScriptedResponse] = deque()
        self._fixed: ScriptedResponse | None = None
        self._fixed_bytes: dict[bool, bytes] = {}
        self._server: asyncio.Server | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._new_request = asyncio.Condition()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> WireServer:
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conn_tasks):
            task.cancel()
        if self._conn_tasks:
            await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> WireServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- scripting --------------------------------------------------------------------

    def enqueue(self, *responses: ScriptedResponse) -> None:
        """Answer the next requests with these responses, first in first out."""
        self._queue.extend(responses)

    def serve_fixed(self, response: ScriptedResponse) -> None:
        """Answer every request (once the queue is empty) with ``response``, pre-rendered."""
        if response.abort_after is not None or any(p.delay for p in response.pieces):
            raise ValueError("serve_fixed needs a response without delays or aborts")
        self._fixed = response
        self._fixed_bytes = {
            ka: response.render(keep_alive=ka and not response.close) for ka in (True, False)
        }

    async def wait_for_requests(self, n: int, within: float = 5.0) -> list[RecordedRequest]:
        """Wait until ``n`` requests have been recorded."""
        async with asyncio.timeout(within), self._new_request:
            await self._new_request.wait_for(lambda: len(self.requests) >= n)
        return self.requests[:n]

    # -- connection handling ----------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        self.connections_opened += 1
        buf = bytearray()
        try:
            while True:
                req = await self._read_request(reader, buf)
                if req is None:
                    break
                keep_alive = req.headers.get("connection", "").lower() != "close"
                self.request_count += 1
                if self.record:
                    self.requests.append(req)
                    async with self._new_request:
                        self._new_request.notify_all()
                if self.handler is None and not self._queue and self._fixed is not None:
                    writer.write(self._fixed_bytes[keep_alive])
                    await writer.drain()
                    req.pieces_sent = len(self._fixed.pieces)
                    req.done.set()
                    if not keep_alive or self._fixed.close:
                        break
                    continue
                response = await self._next_response(req)
                ok = await self._send(response, req, reader, writer, buf,
                                      keep_alive=keep_alive and not response.close)
                req.done.set()
                if not ok or not keep_alive or response.close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, _Disconnected):
            pass
        except asyncio.CancelledError:
            # Server shutdown: end quietly (asyncio's stream callback would otherwise log
            # the cancelled connection task as an error).
            pass
        finally:
            with contextlib.suppress(Exception):
                if not writer.transport.is_closing():
                    writer.close()
            self._conn_tasks.discard(task)

    async def _next_response(self, req: RecordedRequest) -> ScriptedResponse:
        if self.handler is not None:
            result = self.handler(req)
            return await result if inspect.isawaitable(result) else result
        if self._queue:
            return self._queue.popleft()
        if self._fixed is not None:
            return self._fixed
        return ScriptedResponse.json(
            {"error": {"message": f"wire server: nothing scripted for {req.method} {req.path}",
                       "type": "wire_server_error"}},
            status=599,
        )

    async def _read_request(self, reader: asyncio.StreamReader,
                            buf: bytearray) -> RecordedRequest | None:
        while b"\r\n\r\n" not in buf:
            if len(buf) > _MAX_HEADER_BYTES:
                raise _Disconnected("request head too large")
            data = await reader.read(65536)
            if not data:
                return None
            buf += data
        end = buf.index(b"\r\n\r\n")
        head = bytes(buf[:end]).decode("latin-1")
        del buf[: end + 4]
        request_line, *header_lines = head.split("\r\n")
        method, path, _version = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked(reader, buf)
        else:
            length = int(headers.get("content-length", "0") or 0)
            while len(buf) < length:
                data = await reader.read(65536)
                if not data:
                    return None
                buf += data
            body = bytes(buf[:length])
            del buf[:length]
        return RecordedRequest(method=method, path=path, headers=headers, body=body)

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader, buf: bytearray) -> bytes:
        async def fill_until(pred: Callable[[], bool]) -> None:
            while not pred():
                data = await reader.read(65536)
                if not data:
                    raise _Disconnected("client closed during a chunked body")
                buf.extend(data)

        body = bytearray()
        while True:
            await fill_until(lambda: b"\r\n" in buf)
            i = buf.index(b"\r\n")
            size = int(bytes(buf[:i]).split(b";", 1)[0], 16)
            del buf[: i + 2]
            if size == 0:
                await fill_until(lambda: b"\r\n" in buf)  # (no trailers supported)
                del buf[: buf.index(b"\r\n") + 2]
                return bytes(body)
            await fill_until(lambda: len(buf) >= size + 2)  # noqa: B023 - size is per-loop
            body += buf[:size]
            del buf[: size + 2]

    async def _send(self, resp: ScriptedResponse, req: RecordedRequest,
                    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    buf: bytearray, *, keep_alive: bool) -> bool:
        """Write ``resp``; return False when the connection must not be reused.

        While writing, a reader task watches for EOF: that is how a client
        hanging up mid-stream is noticed even while the script is waiting out
        a delay.  Bytes it reads early (a pipelined request) are kept in
        ``buf`` for the next request.
        """
        watch: asyncio.Task[bytes] = asyncio.ensure_future(reader.read(65536))
        gone = False

        async def pause(delay: float) -> None:
            nonlocal watch, gone
            deadline = asyncio.get_running_loop().time() + delay
            while not gone:
                remaining = deadline - asyncio.get_running_loop().time()
                await asyncio.wait({watch}, timeout=max(remaining, 0.0))
                if not watch.done():
                    return
                data = watch.result() if not watch.cancelled() else b""
                if not data:
                    gone = True
                    return
                buf.extend(data)
                watch = asyncio.ensure_future(reader.read(65536))
                if remaining <= 0:
                    return

        try:
            writer.write(resp.head_bytes(keep_alive=keep_alive))
            await writer.drain()
            for i, piece in enumerate(resp.pieces):
                if resp.abort_after is not None and i >= resp.abort_after:
                    req.aborted = True
                    writer.transport.abort()
                    return False
                await pause(piece.delay)
                if gone:
                    req.client_disconnected = True
                    return False
                framed = resp.frame(piece.data)
                if framed:
                    writer.write(framed)
                    await writer.drain()
                req.pieces_sent = i + 1
            if resp.abort_after is not None and resp.abort_after <= len(resp.pieces):
                req.aborted = True
                writer.transport.abort()
                return False
            if resp.chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            return True
        except (ConnectionError, OSError):
            req.client_disconnected = True
            return False
        finally:
            if not watch.done():
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await watch
            elif not watch.cancelled() and watch.exception() is None:
                data = watch.result()
                if data:
                    buf.extend(data)


async def wire_server(**kwargs: Any) -> AsyncIterator[WireServer]:
    """Body of a pytest fixture: ``fixture = pytest_asyncio.fixture(wire_server)``.

    Kept as a plain async generator so a test module (or a conftest) wraps it
    with the fixture scope it wants.
    """
    async with WireServer(**kwargs) as server:
        yield server
