"""The lean HTTP/1.1 transport under the SDKs: framing, keep-alive, limits, TLS, privacy.

Servers here are raw asyncio sockets that write exact bytes, so each framing case
(content-length, chunked, close-delimited, 1xx, a server that drops idle
connections) is what the transport really meets on the wire.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx2
import pytest

from conclave.errors import PrivacyViolation
from conclave.llm.http1 import Http1Transport
from conclave.llm.net import httpx2_client

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head, body


class Server:
    def __init__(self, handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl = ssl_ctx
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=self.ssl)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"


async def _keepalive_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        _, body = await _read_request(reader)
        payload = b'{"echo": %d}' % len(body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        await writer.drain()


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    c = httpx2_client(privacy=False, timeout=5, connect_timeout=2)
    assert isinstance(c._transport, Http1Transport)
    yield c
    await c.aclose()


async def test_keep_alive_reuses_one_connection(client: httpx2.AsyncClient) -> None:
    async with Server(_keepalive_json) as srv:
        for i in range(20):
            r = await client.post(srv.url() + "/v1/x", content=b"a" * i)
            assert r.status_code == 200 and r.json() == {"echo": i}
        assert srv.connections == 1


async def test_chunked_and_close_delimited_bodies(client: httpx2.AsyncClient) -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # informational, to be skipped
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: one\n\n", b"data: two\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await _read_request(reader)  # the connection was kept for another request

    async with Server(chunked) as srv:
        async with client.stream("GET", srv.url()) as r:
            parts = [p async for p in r.aiter_raw()]
        assert b"".join(parts) == b"data: one\n\ndata: two\n\n"
        assert len(parts) == 2, "streamed as it arrived"

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async with Server(until_close) as srv:
        for _ in range(2):
            r = await client.get(srv.url())
            assert r.text == "all of it"
        assert srv.connections == 2, "a connection: close response is never reused"


async def test_idle_connection_closed_by_the_server_is_not_reused(
        client: httpx2.AsyncClient) -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # keep-alive promised, then dropped while idle

    async with Server(one_then_close) as srv:
        assert (await client.get(srv.url())).text == "ok"
        await asyncio.sleep(0.2)
        assert (await client.get(srv.url())).text == "ok"
        assert srv.connections == 2


async def test_cut_body_and_silence_raise_httpx_errors(client: httpx2.AsyncClient) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()

    async with Server(cut) as srv:
        with pytest.raises((httpx2.ReadError, httpx2.RemoteProtocolError)):
            await client.get(srv.url())

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await reader.read()  # says nothing until the client gives up and closes

    async with Server(silent) as srv:
        with pytest.raises(httpx2.ReadTimeout):
            await client.get(srv.url(), timeout=0.2)


async def test_pool_limit_waits_then_times_out() -> None:
    started = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        started.set()
        await asyncio.sleep(0.5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    transport = Http1Transport(max_connections=1)
    async with httpx2.AsyncClient(transport=transport, timeout=5) as c, Server(slow) as srv:
        first = asyncio.create_task(c.get(srv.url()))
        await started.wait()
        with pytest.raises(httpx2.PoolTimeout):
            await c.get(srv.url(), timeout=httpx2.Timeout(5, pool=0.1))
        assert (await first).status_code == 200


async def test_cancelled_request_closes_its_connection(client: httpx2.AsyncClient) -> None:
    closed = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await reader.read()  # returns at EOF: the client went away
        closed.set()

    async with Server(hang) as srv:
        task = asyncio.create_task(client.get(srv.url()))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 2)


async def test_privacy_refuses_a_public_address_before_connecting() -> None:
    c = httpx2_client(privacy=True, timeout=5, connect_timeout=2)
    try:
        with pytest.raises(PrivacyViolation):
            await c.get("http://93.184.215.14/")  # a public address: never contacted
    finally:
        await c.aclose()


def _self_signed(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A certificate for 127.0.0.1, made with the openssl command line tool."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line tool")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


async def test_tls(tmp_path: Path) -> None:
    server_ctx, client_ctx = _self_signed(tmp_path)
    transport = Http1Transport(ssl_context=client_ctx)
    async with httpx2.AsyncClient(transport=transport) as c, \
            Server(_keepalive_json, ssl_ctx=server_ctx) as srv:
        for _ in range(3):
            r = await c.post(srv.url("https") + "/x", content=b"abc")
            assert r.json() == {"echo": 3}
        assert srv.connections == 1
    # an unknown certificate is refused (the default context trusts the system CAs only)
    async with httpx2.AsyncClient(transport=Http1Transport()) as c, \
            Server(_keepalive_json, ssl_ctx=server_ctx) as srv:
        with pytest.raises(httpx2.ConnectError):
            await c.get(srv.url("https"))


async def test_head_goes_to_the_stock_transport(client: httpx2.AsyncClient) -> None:
    """A HEAD response has a Content-Length but no body: httpcore2 frames it correctly."""
    async def head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with Server(head) as srv:
        r = await client.head(srv.url())
        assert r.status_code == 200 and r.headers["content-length"] == "1234"
        assert r.content == b""
