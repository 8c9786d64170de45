"""A lean HTTP/1.1 transport for ``httpx2``, the HTTP client of the openai and anthropic SDKs.

Why: the SDKs stay the clients (their request building, auth, error types and
SSE parsing are kept), but ``httpx2``'s default transport (``httpcore2`` over
anyio, with the pure-Python ``h11`` parser) spent more CPU per call than
everything else Conclave does around a model call - on a server relaying
hundreds of calls a second to an upstream that answers in microseconds, that
was the ceiling.  This transport is an asyncio ``Protocol`` per connection, the
``httptools`` (llhttp) parser that uvicorn uses, and a keep-alive pool: a
request is one ``write`` and the answer is parsed as it arrives.

Plugged in through ``httpx2``'s documented ``transport=`` argument
(:func:`conclave.llm.net.httpx2_client`).  What it keeps from ``httpcore2``:

* limits: ``max_connections`` in use at once (waiting at most the pool timeout),
  at most ``max_keepalive_connections`` idle ones, each for ``keepalive_expiry``;
* timeouts from the request (connect, read per wait for data, write while the
  socket is backed up, pool) raised as ``httpx2``'s own timeout exceptions, and
  connection failures as ``ConnectError``/``ReadError``/``RemoteProtocolError``,
  so the SDKs and :mod:`conclave.llm.providers._errors` map them as before;
* the privacy guard: with ``privacy=True`` the host is resolved by
  :func:`conclave.llm.net.resolve_local` and the socket opened to the checked
  address itself, exactly as the guarded ``httpcore`` backend did;
* TLS with ``httpx2``'s default SSL context (ALPN ``http/1.1``);
* streaming bodies (SSE) with flow control; a response closed before its end
  (a cancelled stream) closes its connection, which the upstream sees at once.

Anything else (``HEAD``, ``CONNECT``, ``Upgrade``, schemes other than http and
https) goes to a stock ``httpx2.AsyncHTTPTransport``.  A connection is reused
only after a complete response that allows keep-alive, and an idle one that
the server closed (or sent anything on) is dropped, never written to.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator

import httptools
import httpx2

__all__ = ["Http1Transport"]

#: body bytes buffered from the socket before reading pauses (the consumer is slower)
_HIGH_WATER = 1 << 20
_DEFAULT_PORTS = {"http": 80, "https": 443}
_Origin = tuple[str, str, int]


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the response being parsed on it."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._new_response()

    def _new_response(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self._informational = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx2.RemoteProtocolError("the server switched protocols unasked"))
        except httptools.HttpParserError as exc:
            self._fail(httpx2.RemoteProtocolError(f"malformed HTTP response: {exc}"))
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and self._until_close():
            # a body without length or chunking ends when the connection does
            self.complete = True
            self.keep_alive = False
        elif not self.complete and self.error is None:
            what = "sending the response body" if self.headers_done else "sending a response"
            self.error = (httpx2.ReadError(str(exc)) if exc is not None else
                          httpx2.RemoteProtocolError(f"the server disconnected without {what}"))
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- httptools callbacks ------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # informational (101 Upgrade raises in feed_data)
            self._informational = True
            self.headers, self.reason = [], b""
            return
        self.status = status
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._reading_paused and self.transport:
            self.transport.pause_reading()
            self._reading_paused = True

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()

    # -- helpers ------------------------------------------------------------------------

    def _until_close(self) -> bool:
        names = {k.lower() for k, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, within: float | None, request: httpx2.Request) -> None:
        """Until more of the response (or its end, or an error) has arrived."""
        loop = asyncio.get_running_loop()
        fut = self._waiter = loop.create_future()
        handle = None
        if within is not None:
            handle = loop.call_later(within, _expire, fut, httpx2.ReadTimeout(
                f"no data from the server in {within:g} s", request=request))
        try:
            await fut
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    async def send(self, data: bytes, within: float | None, request: httpx2.Request) -> None:
        if self.closed or self.transport is None:
            raise httpx2.WriteError("the connection is closed", request=request)
        self.transport.write(data)
        writable = self._writable
        if writable is not None and not writable.done():
            try:
                await asyncio.wait_for(asyncio.shield(writable), within)
            except TimeoutError:
                raise httpx2.WriteTimeout(f"could not send within {within:g} s",
                                          request=request) from None

    def take_body(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        if self._reading_paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self._reading_paused = False
        return data

    def reusable(self) -> bool:
        return (self.complete and self.keep_alive and not self.closed and not self.chunks
                and self.error is None)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class _Body(httpx2.AsyncByteStream):
    """The response body as it arrives; closing it returns or closes the connection."""

    def __init__(self, pool: Http1Transport, conn: _Connection, request: httpx2.Request,
                 read_timeout: float | None) -> None:
        self._pool = pool
        self._conn = conn
        self._request = request
        self._timeout = read_timeout
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take_body()
                continue
            if conn.complete:
                return
            if conn.error is not None:
                raise _with_request(conn.error, self._request)
            if conn.closed:
                raise httpx2.ReadError("the connection closed mid-body", request=self._request)
            await conn.wait(self._timeout, self._request)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool._release(self._conn)


def _with_request(exc: BaseException, request: httpx2.Request) -> BaseException:
    if isinstance(exc, httpx2.RequestError):
        exc.request = request
    return exc


class Http1Transport(httpx2.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections over asyncio; see the module docstring."""

    def __init__(self, *, privacy: bool = False, max_connections: int = 200,
                 max_keepalive_connections: int = 50, keepalive_expiry: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None, trust_env: bool = True) -> None:
        self._privacy = privacy
        self._max = max_connections
        self._max_idle = max_keepalive_connections
        self._expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._trust_env = trust_env
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._slots: asyncio.Semaphore | None = None
        self._fallback: httpx2.AsyncHTTPTransport | None = None
        self._closed = False

    # -- httpx2 interface ---------------------------------------------------------------

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        scheme = url.scheme
        method = request.method
        if (scheme not in _DEFAULT_PORTS or method in ("HEAD", "CONNECT")
                or "upgrade" in request.headers):
            return await self._fallback_transport().handle_async_request(request)
        if self._closed:
            raise httpx2.ConnectError("the transport is closed", request=request)
        timeouts = request.extensions.get("timeout") or {}
        origin = (scheme, url.host, url.port or _DEFAULT_PORTS[scheme])

        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self._max)
        if slots.locked():
            try:
                await asyncio.wait_for(slots.acquire(), timeouts.get("pool"))
            except TimeoutError:
                raise httpx2.PoolTimeout("no free connection in time", request=request) from None
        else:
            await slots.acquire()

        conn: _Connection | None = None
        try:
            conn = self._checkout(origin)
            if conn is None:
                conn = await self._connect(origin, timeouts.get("connect"), request)
            head = _request_head(request)
            body = await _request_body(request)
            write_timeout = timeouts.get("write")
            if body is None:
                await conn.send(head, write_timeout, request)
            elif isinstance(body, bytes):
                await conn.send(head + body, write_timeout, request)
            else:
                await conn.send(head, write_timeout, request)
                async for chunk in body:
                    if chunk:
                        await conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk), write_timeout,
                                        request)
                await conn.send(b"0\r\n\r\n", write_timeout, request)
            read_timeout = timeouts.get("read")
            while not conn.headers_done:
                if conn.error is not None:
                    raise _with_request(conn.error, request)
                await conn.wait(read_timeout, request)
        except BaseException:
            # Cancelled or failed mid-exchange: the connection's state is unknown.
            if conn is not None:
                conn.close()
            slots.release()
            raise
        return httpx2.Response(
            conn.status, headers=conn.headers,
            stream=_Body(self, conn, request, read_timeout),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": conn.reason.strip()},
            request=request,
        )

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._idle_count = 0
        if self._fallback is not None:
            await self._fallback.aclose()

    # -- pool ---------------------------------------------------------------------------

    def _checkout(self, origin: _Origin) -> _Connection | None:
        conns = self._idle.get(origin)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            self._idle_count -= 1
            # anything received while idle (or a close) makes it unusable
            if conn.closed or conn.chunks or conn.error is not None or conn.headers_done \
                    or now - conn.idle_since > self._expiry:
                conn.close()
                continue
            return conn
        return None

    def _release(self, conn: _Connection) -> None:
        """The response is over (read or abandoned): keep the connection or close it."""
        assert self._slots is not None
        self._slots.release()
        if not conn.reusable() or self._closed or self._idle_count >= self._max_idle:
            conn.close()
            return
        conn._new_response()
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.origin, []).append(conn)
        self._idle_count += 1

    async def _connect(self, origin: _Origin, within: float | None,
                       request: httpx2.Request) -> _Connection:
        scheme, host, port = origin
        address = host
        if self._privacy:
            from conclave.llm.net import resolve_local

            address = await resolve_local(host, port)
        ssl_ctx = self._ssl() if scheme == "https" else None
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(origin), address, port, ssl=ssl_ctx,
                server_hostname=host if ssl_ctx is not None else None), within)
        except TimeoutError:
            raise httpx2.ConnectTimeout(f"could not connect to {host}:{port} in {within:g} s",
                                        request=request) from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx2.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        return conn

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            ctx = httpx2.create_ssl_context(trust_env=self._trust_env)
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl_context = ctx
        return self._ssl_context

    def _fallback_transport(self) -> httpx2.AsyncHTTPTransport:
        if self._fallback is None:
            from conclave.llm import net

            self._fallback = net.stock_httpx2_transport(privacy=self._privacy)
        return self._fallback


def _request_head(request: httpx2.Request) -> bytes:
    url = request.url
    parts = [request.method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


async def _request_body(request: httpx2.Request) -> bytes | AsyncIterator[bytes] | None:
    """The body as bytes when it has a length (the SDKs' JSON), else a chunk iterator."""
    if "transfer-encoding" in request.headers:
        return aiter(request.stream)  # type: ignore[arg-type]
    if "content-length" not in request.headers:
        return None
    parts = [chunk async for chunk in request.stream]  # type: ignore[union-attr]
    return parts[0] if len(parts) == 1 else b"".join(parts)
