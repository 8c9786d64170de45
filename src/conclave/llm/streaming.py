"""Token streams with time to first token, stop policies and honest usage.

:class:`ManagedStream` wraps a provider stream.  After every chunk it asks each
:class:`StreamPolicy` whether to stop; the first that says yes ends the
stream, and closing the upstream generator cancels the HTTP request, so the
provider stops generating (and billing).  The final :class:`ChatResponse`
reports the tokens actually consumed: the provider's own counts when it sent
them, otherwise counts computed here and marked ``estimated``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal

import anyio

from conclave.config import Price
from conclave.errors import ConnectionLost
from conclave.llm.pricing import cost
from conclave.llm.types import ChatResponse, StopReason, StreamChunk, ToolCall, Usage


def estimate_tokens(text: str) -> int:
    """Rough token count for text nobody counted: ~4 characters a token for English."""
    return math.ceil(len(text) / 4) if text else 0


@dataclass
class StreamState:
    """What a policy can look at after each chunk."""

    text: str = ""
    chunks: int = 0
    #: output tokens so far: the provider's count when it reports one, else chunks seen
    output_tokens: int = 0
    input_tokens: int = 0
    elapsed_s: float = 0.0
    cost_usd: Decimal = Decimal(0)
    last_delta: str = ""


class StreamPolicy:
    """Decides after each chunk whether to stop; returns a reason, or None to go on."""

    name = "policy"

    def check(self, state: StreamState) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError


class MaxCost(StreamPolicy):
    """Stop once the running cost reaches ``max_usd``."""

    name = "max_cost"

    def __init__(self, max_usd: Decimal | float | str) -> None:
        self.max_usd = Decimal(str(max_usd))

    def check(self, state: StreamState) -> str | None:
        if state.cost_usd >= self.max_usd:
            return f"cost ${state.cost_usd:.6f} reached the limit ${self.max_usd}"
        return None


class RepetitionGuard(StreamPolicy):
    """Stop a model that loops: the last ``span`` characters already occurred ``repeats`` times.

    Looks at the tail of the text, so it costs O(window) per chunk, not O(text).
    """

    name = "repetition"

    def __init__(self, span: int = 24, repeats: int = 3, window: int = 2000) -> None:
        self.span, self.repeats, self.window = span, repeats, window

    def check(self, state: StreamState) -> str | None:
        tail = state.text[-self.window:]
        if len(tail) < self.span * self.repeats:
            return None
        needle = tail[-self.span:]
        if not needle.strip():
            return None
        if tail.count(needle) >= self.repeats:
            return f"the text repeats itself ({needle.strip()[:40]!r} {self.repeats}+ times)"
        return None


class StopWhen(StreamPolicy):
    """Stop when a predicate on the text so far holds (e.g. a closing tag arrived)."""

    name = "stop_predicate"

    def __init__(self, predicate: Callable[[str], bool], reason: str = "stop predicate") -> None:
        self.predicate, self.reason = predicate, reason

    def check(self, state: StreamState) -> str | None:
        return self.reason if self.predicate(state.text) else None


class QualityGate(StreamPolicy):
    """Stop when a scorer rates the text so far below ``threshold``.

    Scoring starts after ``min_chars`` and runs every ``every`` chunks, since a
    scorer may be costly and early text says little.
    """

    name = "quality"

    def __init__(self, scorer: Callable[[str], float], threshold: float,
                 min_chars: int = 80, every: int = 8) -> None:
        self.scorer, self.threshold = scorer, threshold
        self.min_chars, self.every = min_chars, every

    def check(self, state: StreamState) -> str | None:
        if len(state.text) < self.min_chars or state.chunks % self.every:
            return None
        score = self.scorer(state.text)
        if score < self.threshold:
            return f"quality score {score:.2f} below {self.threshold}"
        return None


@dataclass
class ManagedStream:
    """Iterate to receive chunks; read :attr:`response` afterwards."""

    source: AsyncIterator[StreamChunk]
    price: Price
    prompt_text: str = ""
    policies: list[StreamPolicy] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    response: ChatResponse = field(default_factory=ChatResponse)
    _state: StreamState = field(default_factory=StreamState)
    _usage: Usage | None = None
    _tool_calls: list[ToolCall] = field(default_factory=list)
    _done: bool = False
    #: True when the consumer stopped iterating (or was cancelled) before the end
    cut: bool = False
    _reported: bool = False
    #: awaited once the response is final, shielded from cancellation (accounting uses it)
    on_finish: Callable[[ChatResponse, BaseException | None], Awaitable[None]] | None = None

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self._run()

    async def _run(self) -> AsyncIterator[StreamChunk]:
        stop = StopReason.STOP
        error: BaseException | None = None
        s = self._state
        try:
            async for chunk in self.source:
                now = time.perf_counter()
                if chunk.delta:
                    if self.response.ttft_ms is None:
                        self.response.ttft_ms = (now - self.started) * 1000
                    s.text += chunk.delta
                    s.chunks += 1
                    s.last_delta = chunk.delta
                if chunk.tool_calls:
                    self._tool_calls.extend(chunk.tool_calls)
                if chunk.usage is not None:
                    self._usage = chunk.usage
                if chunk.stop_reason is not None:
                    stop = chunk.stop_reason
                s.elapsed_s = now - self.started
                s.input_tokens, s.output_tokens = self._counts()
                s.cost_usd = cost(Usage(input_tokens=s.input_tokens,
                                        output_tokens=s.output_tokens), self.price)
                yield chunk
                for policy in self.policies:
                    reason = policy.check(s)
                    if reason:
                        self.response.stopped_by = f"{policy.name}: {reason}"
                        stop = StopReason.CANCELLED
                        return
        except ConnectionLost as exc:
            exc.partial_text = exc.partial_text or s.text
            stop, error = StopReason.ERROR, exc
            raise
        except (GeneratorExit, asyncio.CancelledError):
            # The consumer went away (client disconnect, break, task cancelled).
            self.cut, stop = True, StopReason.CANCELLED
            raise
        except BaseException as exc:
            stop, error = StopReason.ERROR, exc
            raise
        finally:
            # Shielded: a cancelled consumer must still close upstream and settle the bill.
            with anyio.CancelScope(shield=True):
                # Closing the upstream generator cancels the HTTP request.
                close = getattr(self.source, "aclose", None)
                if close is not None:
                    await close()
                self._finish(stop)
                if self.on_finish is not None and not self._reported:
                    self._reported = True
                    await self.on_finish(self.response, error)

    def _counts(self) -> tuple[int, int]:
        u = self._usage
        inp = u.input_tokens if u and u.input_tokens else 0
        out = u.output_tokens if u and u.output_tokens else 0
        return inp, max(out, self._state.chunks)

    def _finish(self, stop: StopReason) -> None:
        if self._done:
            return
        self._done = True
        s, u = self._state, self._usage
        complete = u is not None and stop not in (StopReason.CANCELLED, StopReason.ERROR)
        if complete and u is not None and u.output_tokens >= s.chunks:
            usage = u
        else:
            # Cut or uncounted stream: trust reported parts, compute the rest.
            inp = u.input_tokens if u and u.input_tokens else estimate_tokens(self.prompt_text)
            out = max(u.output_tokens if u else 0, s.chunks, estimate_tokens(s.text)
                      if not s.chunks else 0)
            usage = Usage(
                input_tokens=inp, output_tokens=out,
                cached_input_tokens=u.cached_input_tokens if u else 0,
                cache_write_tokens=u.cache_write_tokens if u else 0,
                estimated=True,
            )
        r = self.response
        r.text, r.usage, r.stop_reason = s.text, usage, stop
        r.tool_calls = self._tool_calls
        r.latency_ms = (time.perf_counter() - self.started) * 1000
        r.cost_usd = float(cost(usage, self.price))
