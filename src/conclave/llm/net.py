"""HTTP clients for providers, with privacy enforced where sockets are opened.

Privacy mode must hold "whatever the catalog says": a model marked local
whose base URL points at a cloud host must still never reach it.  So the
check sits in the network backend of the HTTP client, the one place every
TCP connection passes through: the host is resolved, every address must be
loopback or private, and the socket is then opened to the checked address
itself (no second lookup that a DNS answer could change).  Proxies from the
environment are ignored for guarded clients, since a proxy would carry the
bytes elsewhere.

Written by hand because neither httpx nor httpcore has a hook that vets the
peer address before connecting; it plugs into httpcore's documented
``network_backend`` extension point.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.request
from collections.abc import Iterable
from typing import Any

import anyio
import httpcore
import httpcore2
import httpx
import httpx2

from conclave.errors import PrivacyViolation


def is_local_address(address: str) -> bool:
    """True for loopback and private-network addresses (RFC 1918, ULA, link-local)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_link_local:
        return True
    private_v4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
    if isinstance(ip, ipaddress.IPv4Address):
        return any(ip in ipaddress.ip_network(net) for net in private_v4)
    return ip in ipaddress.ip_network("fc00::/7")


async def resolve_local(host: str, port: int) -> str:
    """Resolve ``host`` and return an address to connect to, or raise PrivacyViolation.

    Every address the name resolves to must be local: a name that resolves to
    a mix is refused, since the resolver's order is not ours to trust.
    """
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        addresses = [host]
    except ValueError:
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise PrivacyViolation(
                f"privacy mode: cannot resolve {host!r} ({exc})",
                hint="use a loopback or private address for local providers",
            ) from None
        addresses = [str(info[4][0]) for info in infos]
    outside = [a for a in addresses if not is_local_address(a)]
    if outside or not addresses:
        raise PrivacyViolation(
            f"privacy mode refused a connection to {host}:{port} "
            f"({', '.join(outside) or 'no address'} is not on this machine or a private network)",
            hint="turn privacy mode off to use cloud providers, or point the provider at a "
            "local server",
        )
    return addresses[0]


class _GuardBackend:
    """Network backend that vets the peer before any socket is opened."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's backend interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> Any:
        address = await resolve_local(host, port)
        return await self._inner.connect_tcp(
            address, port, timeout=timeout, local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(self, path: str,
                                  timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[Any] | None = None) -> Any:
        return await self._inner.connect_unix_socket(path, timeout=timeout,
                                                     socket_options=socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardBackend2(_GuardBackend, httpcore2.AsyncNetworkBackend):
    def __init__(self) -> None:
        super().__init__(httpcore2.AnyIOBackend())


class GuardBackend1(_GuardBackend, httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        super().__init__(httpcore.AnyIOBackend())


def _limits() -> dict[str, Any]:
    return {"max_connections": 200, "max_keepalive_connections": 50, "keepalive_expiry": 30.0}


def stock_httpx2_transport(*, privacy: bool) -> httpx2.AsyncHTTPTransport:
    """httpx2's own transport (httpcore2), guarded in privacy mode: what
    :class:`conclave.llm.http1.Http1Transport` hands the requests it does not serve."""
    limits = httpx2.Limits(**_limits())
    transport = httpx2.AsyncHTTPTransport(limits=limits, trust_env=not privacy)
    if privacy:
        # Replace the pool with one whose backend vets addresses (documented extension point).
        transport._pool = httpcore2.AsyncConnectionPool(
            ssl_context=transport._pool._ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardBackend2(),
        )
    return transport


def _env_proxies() -> bool:
    return any(k in ("http", "https", "all") for k in urllib.request.getproxies())


def httpx2_client(*, privacy: bool, timeout: float, connect_timeout: float,
                  lean: bool = True) -> httpx2.AsyncClient:
    """Client for the official ``openai``/``anthropic`` SDKs (they are built on httpx2).

    Its transport is :class:`conclave.llm.http1.Http1Transport` (a lean HTTP/1.1
    pool that enforces the privacy guard itself), except when the environment
    names an HTTP proxy outside privacy mode (httpx2 honours proxies only with its
    own transports) or ``lean=False`` (``CONCLAVE_ROUTING__LEAN_HTTP=0``), which
    selects httpx2's stock transport, guarded the same way.
    """
    from conclave.llm.http1 import Http1Transport

    limits = _limits()
    to = httpx2.Timeout(timeout, connect=connect_timeout)
    if not privacy and _env_proxies():
        return httpx2.AsyncClient(timeout=to, limits=httpx2.Limits(**limits))
    if not lean:
        return httpx2.AsyncClient(timeout=to, transport=stock_httpx2_transport(privacy=privacy),
                                  trust_env=not privacy)
    transport = Http1Transport(privacy=privacy, trust_env=not privacy, **limits)
    return httpx2.AsyncClient(timeout=to, transport=transport, trust_env=not privacy)


def httpx_client(*, privacy: bool, timeout: float, connect_timeout: float,
                 **kwargs: Any) -> httpx.AsyncClient:
    """Client on httpx 0.x (the ``ollama`` SDK and Conclave's own health checks)."""
    limits = httpx.Limits(**_limits())
    to = httpx.Timeout(timeout, connect=connect_timeout)
    if not privacy:
        return httpx.AsyncClient(timeout=to, limits=limits, **kwargs)
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=transport._pool._ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=GuardBackend1(),
    )
    return httpx.AsyncClient(timeout=to, transport=transport, trust_env=False, **kwargs)


def httpx_transport(*, privacy: bool) -> httpx.AsyncHTTPTransport:
    """A bare httpx 0.x transport, guarded in privacy mode.

    For SDKs that build their own ``httpx.AsyncClient`` and only accept a
    ``transport=`` (the ``ollama`` SDK); pass ``trust_env=False`` alongside it
    in privacy mode, or environment proxies would bypass the guard.
    """
    limits = httpx.Limits(**_limits())
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=not privacy)
    if privacy:
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=transport._pool._ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardBackend1(),
        )
    return transport
