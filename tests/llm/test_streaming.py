"""Stream policies, time to first token and honest usage for cut streams (scripted provider)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from conclave.config import Price
from conclave.errors import ConnectionLost
from conclave.llm.streaming import (
    ManagedStream,
    MaxCost,
    QualityGate,
    RepetitionGuard,
    StopWhen,
    estimate_tokens,
)
from conclave.llm.types import StopReason, StreamChunk, Usage

PRICE = Price(input=Decimal("1"), output=Decimal("2"))  # $ per million tokens


class Source:
    """An async generator over chunks that records whether it was closed early."""

    def __init__(self, chunks: list[object]) -> None:
        self.chunks = chunks
        self.sent = 0
        self.closed_early = False

    async def gen(self):
        try:
            for c in self.chunks:
                if isinstance(c, BaseException):
                    raise c
                self.sent += 1
                yield c
        except GeneratorExit:
            self.closed_early = True
            raise


async def drain(stream: ManagedStream) -> list[StreamChunk]:
    return [c async for c in stream]


async def test_complete_stream_uses_provider_usage():
    src = Source([StreamChunk(delta="a"), StreamChunk(delta="b"),
                  StreamChunk(usage=Usage(input_tokens=10, output_tokens=2),
                              stop_reason=StopReason.STOP)])
    ms = ManagedStream(src.gen(), price=PRICE, prompt_text="x" * 40)
    await drain(ms)
    r = ms.response
    assert r.text == "ab"
    assert r.usage == Usage(input_tokens=10, output_tokens=2)
    assert r.ttft_ms is not None and r.ttft_ms <= r.latency_ms
    assert r.cost_usd == pytest.approx((10 * 1 + 2 * 2) / 1e6)
    assert not src.closed_early


async def test_stop_predicate_cancels_upstream_and_estimates():
    chunks = [StreamChunk(delta=w) for w in ["one ", "two ", "STOP ", "three ", "four "]]
    src = Source(chunks)
    ms = ManagedStream(src.gen(), price=PRICE, prompt_text="p" * 80,
                       policies=[StopWhen(lambda t: "STOP" in t, "saw STOP")])
    got = await drain(ms)
    assert len(got) == 3 and src.sent == 3
    assert src.closed_early, "upstream generator must be closed"
    r = ms.response
    assert r.stop_reason is StopReason.CANCELLED
    assert r.stopped_by == "stop_predicate: saw STOP"
    assert r.usage.estimated
    assert r.usage.output_tokens == 3  # one token per chunk
    assert r.usage.input_tokens == estimate_tokens("p" * 80) == 20


async def test_cut_stream_keeps_reported_input_tokens():
    # Anthropic-style: input tokens known from message_start, output cut short.
    chunks = [StreamChunk(usage=Usage(input_tokens=50, cached_input_tokens=40)),
              *[StreamChunk(delta="la ") for _ in range(30)]]
    src = Source(chunks)
    ms = ManagedStream(src.gen(), price=PRICE, policies=[RepetitionGuard(span=6, repeats=3)])
    await drain(ms)
    r = ms.response
    assert r.stopped_by and r.stopped_by.startswith("repetition")
    assert r.usage.input_tokens == 50 and r.usage.cached_input_tokens == 40
    assert r.usage.estimated and r.usage.output_tokens < 30
    assert src.closed_early


async def test_max_cost_stops_at_limit():
    price = Price(input=Decimal(0), output=Decimal(1_000_000))  # $1 per token
    src = Source([StreamChunk(delta=f"t{i} ") for i in range(10)])
    ms = ManagedStream(src.gen(), price=price, policies=[MaxCost("3")])
    await drain(ms)
    assert ms.response.usage.output_tokens == 3
    assert ms.response.cost_usd == pytest.approx(3.0)


async def test_quality_gate_scores_periodically():
    scored: list[int] = []

    def scorer(text: str) -> float:
        scored.append(len(text))
        return 0.0 if "garbage" in text else 1.0

    parts = ["good text " * 3] * 8 + ["garbage "] * 8 + ["more "] * 20
    src = Source([StreamChunk(delta=p) for p in parts])
    ms = ManagedStream(src.gen(), price=PRICE,
                       policies=[QualityGate(scorer, threshold=0.5, min_chars=10, every=8)])
    await drain(ms)
    assert ms.response.stopped_by and ms.response.stopped_by.startswith("quality")
    assert len(scored) == 2  # at chunk 8 and chunk 16 only
    assert src.sent == 16


async def test_connection_lost_midstream_reports_partial_and_estimates():
    src = Source([StreamChunk(delta="partial "), StreamChunk(delta="answer"),
                  ConnectionLost("dropped", provider="x")])
    ms = ManagedStream(src.gen(), price=PRICE, prompt_text="abcd")
    with pytest.raises(ConnectionLost) as info:
        await drain(ms)
    assert info.value.partial_text == "partial answer"
    r = ms.response
    assert r.stop_reason is StopReason.ERROR
    assert r.usage.estimated and r.usage.output_tokens == 2 and r.usage.input_tokens == 1


async def test_caller_breaking_out_closes_upstream():
    src = Source([StreamChunk(delta=str(i)) for i in range(100)])
    ms = ManagedStream(src.gen(), price=PRICE)
    it = aiter(ms)
    await anext(it)
    await it.aclose()
    assert src.closed_early
    assert ms.response.usage.output_tokens == 1
