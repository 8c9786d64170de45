"""Privacy mode: no connection leaves loopback/private networks, whatever is asked.

A process-wide audit hook records every ``socket.connect``; each test asserts
that no address outside loopback was even attempted.  The addresses used as
"cloud" are TEST-NET/documentation addresses that route nowhere, so even a
failure of the guard could not reach a real host.
"""

from __future__ import annotations

import sys

import pytest

from conclave.config import ModelSpec, Price, ProviderSpec
from conclave.errors import PrivacyViolation
from conclave.gateway import Gateway
from conclave.llm.net import httpx2_client, httpx_client, is_local_address
from conclave.llm.providers import build_provider
from conclave.llm.types import ChatRequest, Message
from tests.support.settings import make_settings
from tests.support.wire_server import ScriptedResponse, WireServer

_CONNECTS: list[object] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "socket.connect":
        _CONNECTS.append(args[1])


sys.addaudithook(_audit)


def outside_connects() -> list[object]:
    bad = []
    for addr in _CONNECTS:
        host = addr[0] if isinstance(addr, tuple) else None
        if host is not None and not is_local_address(str(host)):
            bad.append(addr)
    return bad


@pytest.fixture(autouse=True)
def _reset_connects():
    _CONNECTS.clear()
    yield
    assert outside_connects() == [], "a non-local connection was attempted"


def test_local_address_classification():
    for a in ("127.0.0.1", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "fd00::1",
              "169.254.1.1", "::ffff:127.0.0.1"):
        assert is_local_address(a), a
    for a in ("8.8.8.8", "192.0.2.10", "2001:db8::1", "172.32.0.1", "100.64.0.1", "bogus"):
        assert not is_local_address(a), a


@pytest.mark.parametrize("factory", [httpx2_client, httpx_client])
async def test_guarded_clients_refuse_public_addresses_before_connecting(factory):
    client = factory(privacy=True, timeout=5, connect_timeout=2)
    async with client:
        with pytest.raises(PrivacyViolation, match=r"192\.0\.2\.10"):
            await client.get("http://192.0.2.10:80/v1/models")
        with pytest.raises(PrivacyViolation):
            await client.get("https://[2001:db8::1]/")
    assert _CONNECTS == []


async def test_guarded_client_allows_loopback():
    async with WireServer() as server:
        server.serve_fixed(ScriptedResponse.json({"ok": True}))
        async with httpx2_client(privacy=True, timeout=5, connect_timeout=2) as client:
            r = await client.get(f"{server.url}/anything")
            assert r.status_code == 200
    assert any(isinstance(a, tuple) and a[0] == "127.0.0.1" for a in _CONNECTS)


async def test_cloud_model_by_name_fails_clearly_in_privacy_mode(tmp_path):
    settings = make_settings(tmp_path, openai_api_key="sk-test-not-a-real-key",
                             privacy_mode=True)
    async with Gateway(settings) as gw:
        with pytest.raises(PrivacyViolation, match="cloud model") as info:
            await gw.complete(ChatRequest(messages=[Message.user("hi")],
                                          model="openai/gpt-5.1"))
        assert "sk-test" not in str(info.value)
    assert _CONNECTS == []


async def test_per_request_privacy_refuses_cloud_model(tmp_path):
    settings = make_settings(tmp_path, anthropic_api_key="sk-ant-test")
    async with Gateway(settings) as gw:
        with pytest.raises(PrivacyViolation):
            await gw.complete(ChatRequest(messages=[Message.user("hi")], privacy=True,
                                          model="anthropic/claude-opus-4-5"))
    assert _CONNECTS == []


@pytest.mark.parametrize("ptype", ["openai", "anthropic", "ollama"])
async def test_local_provider_pointing_at_cloud_is_refused_at_the_socket(tmp_path, ptype):
    """A catalog that lies (local: true, but a public URL) still cannot leak a byte."""
    settings = make_settings(tmp_path, jan_api_key="k", anthropic_api_key="k")
    url = {"openai": "http://192.0.2.55/v1", "anthropic": "http://192.0.2.55",
           "ollama": "http://192.0.2.55:11434"}[ptype]
    spec = ProviderSpec(name="liar", type=ptype, base_url=url, local=True,
                        api_key_env="JAN_API_KEY")
    model = ModelSpec(name="liar/m", provider="liar", id="m", tier=0, local=True,
                      price=Price(input=0, output=0))
    provider = build_provider(spec, settings)
    req = ChatRequest(messages=[Message.user("secret data")], max_tokens=5)
    with pytest.raises(PrivacyViolation):
        await provider.complete(model, req, privacy=True)
    with pytest.raises(PrivacyViolation):
        async for _ in provider.stream(model, req, privacy=True):
            pass
    await provider.aclose()
    assert _CONNECTS == []
