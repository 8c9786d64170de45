"""Routing, retries, fallbacks, cooldown and privacy planning (pure logic, scripted provider)."""

from __future__ import annotations

import pytest

from conclave.errors import (
    AuthenticationFailed,
    InvalidRequest,
    MissingCredentials,
    ModelNotFound,
    NoProviderAvailable,
    Overloaded,
    PrivacyViolation,
    RateLimited,
)
from conclave.llm.router import Router
from conclave.llm.types import ChatRequest, ChatResponse, Message, Usage
from tests.support.scripted import ScriptedProvider
from tests.support.settings import make_settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def req(**kw: object) -> ChatRequest:
    return ChatRequest(messages=[Message.user("hi")], **kw)


def build(tmp_path, **settings_kw):
    settings = make_settings(tmp_path, **settings_kw)
    providers = {n: ScriptedProvider(s, settings) for n, s in settings.catalog.providers.items()}
    clock = FakeClock()
    router = Router(settings, providers, clock=clock, sleep=clock.sleep, rng=lambda: 1.0)
    return router, providers, clock


async def test_no_cloud_configured_every_tier_is_tier0(tmp_path):
    router, _providers, _ = build(tmp_path)
    for tier in (1, 2, 3):
        resp = await router.complete(req(tier=tier))
        assert resp.model == "local/gemma-3-270m"
        assert resp.tier == 0
        assert resp.routing_note and f"tier {tier} served by tier 0" in resp.routing_note


async def test_tier_picks_configured_provider_by_priority(tmp_path):
    router, _providers, _ = build(tmp_path, openai_api_key="sk-test")
    resp = await router.complete(req(tier=2))
    assert resp.model == "openai/gpt-5-mini"
    assert resp.routing_note is None
    plan = router.plan(req(tier=2))
    # tier 0 comes last as the fallback of a cloud tier
    assert plan.candidates[-1].name == "local/gemma-3-270m"


async def test_retry_after_is_honoured_then_success(tmp_path):
    router, providers, clock = build(tmp_path, openai_api_key="sk-test")
    providers["openai"].add("openai/gpt-5-mini", RateLimited("slow down", retry_after=7.0))
    resp = await router.complete(req(tier=2))
    assert resp.model == "openai/gpt-5-mini"
    assert clock.sleeps == [7.0]


async def test_exponential_backoff_with_cap(tmp_path):
    router, providers, clock = build(tmp_path, openai_api_key="sk-test",
                                     routing={"max_retries": 3, "backoff_base": 0.5,
                                              "cooldown_failures": 10})
    providers["openai"].add("openai/gpt-5-mini", Overloaded("busy"), Overloaded("busy"),
                            Overloaded("busy"))
    await router.complete(req(tier=2))
    assert clock.sleeps == [0.5, 1.0, 2.0]  # rng pinned to 1.0: the full backoff


async def test_falls_back_within_tier_then_to_local(tmp_path):
    router, providers, _ = build(tmp_path, openai_api_key="sk-a", anthropic_api_key="sk-b",
                                 routing={"max_retries": 0})
    providers["openai"].add("openai/gpt-5-mini", Overloaded("busy"))
    providers["anthropic"].add("anthropic/claude-sonnet-4-5", AuthenticationFailed("bad key"))
    resp = await router.complete(req(tier=2))
    # together/fireworks are not configured; tier 0 is the last resort
    assert resp.model == "local/gemma-3-270m"
    assert [c[0] for c in providers["openai"].calls] == ["openai/gpt-5-mini"]


async def test_retry_after_too_long_moves_on(tmp_path):
    router, providers, clock = build(tmp_path, openai_api_key="sk-a", anthropic_api_key="sk-b")
    providers["openai"].add("openai/gpt-5-mini", RateLimited("later", retry_after=3600))
    resp = await router.complete(req(tier=2))
    assert resp.model == "anthropic/claude-sonnet-4-5"
    assert clock.sleeps == []


async def test_cooldown_skips_failing_provider_then_recovers(tmp_path):
    router, providers, clock = build(
        tmp_path, openai_api_key="sk-a", anthropic_api_key="sk-b",
        routing={"max_retries": 0, "cooldown_failures": 2, "cooldown_seconds": 30,
                 "fallback_to_local": False})
    providers["openai"].add("openai/gpt-5-mini", Overloaded("x"), Overloaded("x"))
    assert (await router.complete(req(tier=2))).model == "anthropic/claude-sonnet-4-5"
    assert (await router.complete(req(tier=2))).model == "anthropic/claude-sonnet-4-5"
    calls_before = len(providers["openai"].calls)
    assert (await router.complete(req(tier=2))).model == "anthropic/claude-sonnet-4-5"
    assert len(providers["openai"].calls) == calls_before  # skipped while cooling down
    clock.now += 31
    assert (await router.complete(req(tier=2))).model == "openai/gpt-5-mini"


async def test_named_model_is_not_swapped(tmp_path):
    router, providers, _ = build(tmp_path, openai_api_key="sk-a", anthropic_api_key="sk-b",
                                 routing={"max_retries": 1})
    providers["openai"].add("openai/gpt-5.1", Overloaded("x"), Overloaded("still"))
    with pytest.raises(Overloaded, match="still"):
        await router.complete(req(model="openai/gpt-5.1"))
    assert providers["anthropic"].calls == []


async def test_named_cloud_model_refused_in_privacy_mode(tmp_path):
    router, providers, _ = build(tmp_path, openai_api_key="sk-a", privacy_mode=True)
    with pytest.raises(PrivacyViolation, match="cloud model"):
        await router.complete(req(model="openai/gpt-5.1"))
    assert all(not p.calls for p in providers.values())


async def test_privacy_per_request_maps_tiers_to_local(tmp_path):
    router, providers, _ = build(tmp_path, openai_api_key="sk-a")
    resp = await router.complete(req(tier=3, privacy=True))
    assert resp.model == "local/gemma-3-270m"
    assert "privacy" in (resp.routing_note or "")
    assert providers["openai"].calls == []
    assert providers["llamacpp"].calls[0][2] is True  # guarded connection


async def test_missing_key_unknown_model_and_bad_input(tmp_path):
    router, _, _ = build(tmp_path)
    with pytest.raises(MissingCredentials, match="OPENAI_API_KEY"):
        router.plan(req(model="openai/gpt-5.1"))
    with pytest.raises(ModelNotFound, match="did you mean"):
        router.plan(req(model="openai/gpt-5.2"))
    with pytest.raises(InvalidRequest, match="not both"):
        router.plan(req(model="local/gemma-3-270m", tier=1))
    with pytest.raises(ValueError, match="tier must be"):
        req(tier=7)
    with pytest.raises(ValueError, match="empty"):
        ChatRequest(messages=[Message.user("   ")])


async def test_all_candidates_fail_reports_each(tmp_path):
    router, providers, _ = build(tmp_path, openai_api_key="sk-a",
                                 routing={"max_retries": 0})
    providers["openai"].add("openai/gpt-5-mini", Overloaded("a"))
    providers["llamacpp"].add("local/gemma-3-270m", Overloaded("b"))
    with pytest.raises(NoProviderAvailable, match="every candidate failed"):
        await router.complete(req(tier=2))


async def test_stream_retries_before_first_chunk_only(tmp_path):
    router, providers, clock = build(tmp_path, openai_api_key="sk-a")
    providers["openai"].add("openai/gpt-5-mini", Overloaded("x"),
                            ChatResponse(text="hello", usage=Usage(output_tokens=1)))
    routed = await router.stream(req(tier=2))
    text = "".join([c.delta async for c in routed.chunks])
    assert text == "hello"
    assert routed.model.name == "openai/gpt-5-mini"
    assert len(clock.sleeps) == 1
