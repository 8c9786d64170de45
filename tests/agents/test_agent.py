"""The base agent's loop with a scripted in-process model: tools, guards, budget, events."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from conclave.accounting import LedgerQuery, Outcome, ScopeRef, open_accounting
from conclave.agents import Agent, RunContext
from conclave.bus import MemoryBus
from conclave.llm.types import ChatRequest, Role, ToolCall
from conclave.tools import ToolRegistry
from tests.agents._scripted import (
    BASE,
    CHAT,
    Collector,
    answer,
    scripted_gateway,
    scripted_settings,
)


def calculator() -> tuple[ToolRegistry, list[tuple[int, int]]]:
    registry = ToolRegistry()
    calls: list[tuple[int, int]] = []

    @registry.tool(namespace="math")
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first number.
            b: the second number.
        """
        calls.append((a, b))
        return a + b

    return registry, calls


def action(**data: object) -> str:
    return json.dumps(data)


def prompt_text(request: ChatRequest) -> str:
    return "\n".join(m.content or "" for m in request.messages)


async def test_tool_call_result_then_final_answer_with_constrained_json(tmp_path):
    """A base model (no native tools) calls a tool through a JSON action under a schema."""
    def respond(model, request, i):
        if i == 0:
            return answer(action(action="tool", name="math__add", arguments={"a": 2, "b": 3}))
        assert "Tool result (math__add): 5" in prompt_text(request)
        return answer(action(action="final", answer="2 + 3 = 5"))

    settings = scripted_settings(tmp_path)
    gw, provider = scripted_gateway(settings, respond)
    registry, calls = calculator()
    ctx = RunContext(gw)
    agent = Agent("helper", ctx, model=BASE, tools=registry)
    result = await agent.run("What is 2 + 3?")
    assert result.stopped_by == "final" and result.ok
    assert result.answer == "2 + 3 = 5"
    assert result.tool_mode == "json"
    assert calls == [(2, 3)]
    assert len(result.steps) == 2
    assert result.steps[0].tool_calls[0].name == "math__add"
    assert result.steps[0].tool_calls[0].is_error is False
    # the request carried the action schema: one variant per tool plus the final answer
    first = provider.requests[0][1]
    assert first.tools == []
    fmt = first.response_format
    assert fmt is not None and fmt.type == "json_schema"
    variants = fmt.json_schema["anyOf"]
    assert {v["properties"]["action"]["const"] for v in variants} == {"tool", "final"}
    tool_variant = next(v for v in variants if v["properties"]["action"]["const"] == "tool")
    assert tool_variant["properties"]["name"] == {"const": "math__add"}
    assert tool_variant["properties"]["arguments"]["required"] == ["a", "b"]
    assert "math__add(a (integer, required), b (integer, required))" in prompt_text(first)
    # usage and cost are the sum of the steps, priced from the catalog ($1/M in, $2/M out)
    assert result.usage.input_tokens == 200 and result.usage.output_tokens == 100
    assert result.cost_micros == 2 * (100 * 1 + 50 * 2)
    assert ctx.cost_micros == result.cost_micros
    await ctx.aclose()


async def test_native_tool_calls_for_chat_models(tmp_path):
    def respond(model, request, i):
        if i == 0:
            return answer(tool_calls=[ToolCall(id="c1", name="math__add",
                                               arguments={"a": 20, "b": 22})])
        tool_msg = request.messages[-1]
        assert tool_msg.role is Role.TOOL and tool_msg.tool_call_id == "c1"
        assert tool_msg.content == "42"
        assert request.messages[-2].tool_calls[0].id == "c1"
        return answer("The answer is 42.")

    gw, provider = scripted_gateway(scripted_settings(tmp_path), respond)
    registry, calls = calculator()
    ctx = RunContext(gw)
    result = await Agent("helper", ctx, model=CHAT, tools=registry).run("20 + 22?")
    assert result.tool_mode == "native"
    assert result.answer == "The answer is 42."
    assert calls == [(20, 22)]
    first = provider.requests[0][1]
    assert [t.name for t in first.tools] == ["math__add"]
    assert first.response_format is None
    await ctx.aclose()


async def test_invalid_arguments_go_back_to_the_model_which_corrects_them(tmp_path):
    seen: list[str] = []

    def respond(model, request, i):
        if i == 0:
            return answer(action(action="tool", name="math__add",
                                 arguments={"a": "two", "b": 3}))
        text = prompt_text(request)
        seen.append(text)
        if i == 1:
            return answer(action(action="tool", name="math__add", arguments={"a": 2, "b": 3}))
        return answer(action(action="final", answer="5"))

    gw, _ = scripted_gateway(scripted_settings(tmp_path), respond)
    registry, calls = calculator()
    ctx = RunContext(gw)
    result = await Agent("helper", ctx, model=BASE, tools=registry).run("2 + 3?")
    assert result.answer == "5"
    assert calls == [(2, 3)]  # the invalid call never reached the function
    assert "Tool result (math__add)" in seen[0] and "a" in seen[0]
    assert "valid integer" in seen[0]  # pydantic's message, relayed to the model
    first = result.steps[0].tool_calls[0]
    assert first.is_error is True and first.error_kind == "invalid_arguments"
    assert result.steps[1].tool_calls[0].is_error is False
    await ctx.aclose()


async def test_a_reply_that_is_not_an_action_is_answered_with_an_error(tmp_path):
    def respond(model, request, i):
        if i == 0:
            return answer("I think the answer is 5")
        assert "not a valid action" in prompt_text(request)
        return answer(action(action="final", answer="5"))

    gw, _ = scripted_gateway(scripted_settings(tmp_path), respond)
    registry, _ = calculator()
    ctx = RunContext(gw)
    result = await Agent("helper", ctx, model=BASE, tools=registry).run("2 + 3?")
    assert result.answer == "5" and len(result.steps) == 2
    await ctx.aclose()


async def test_repeated_identical_call_stops_the_run(tmp_path):
    prompts: list[str] = []

    def respond(model, request, i):
        prompts.append(prompt_text(request))
        return answer(action(action="tool", name="math__add", arguments={"b": 1, "a": 1}))

    gw, _ = scripted_gateway(scripted_settings(tmp_path), respond)
    registry, calls = calculator()
    ctx = RunContext(gw)
    result = await Agent("looper", ctx, model=BASE, tools=registry, max_steps=20,
                         repeat_limit=3).run("1 + 1?")
    assert result.stopped_by == "repeated_call"
    assert "math__add was called 3 times with the same arguments" in result.reason
    assert calls == [(1, 1), (1, 1)]  # the third identical call was not run
    assert len(result.steps) == 3
    assert "already made this exact call" in prompts[2]
    await ctx.aclose()


async def test_step_limit(tmp_path):
    def respond(model, request, i):
        return answer(action(action="tool", name="math__add", arguments={"a": i, "b": 1}))

    gw, _ = scripted_gateway(scripted_settings(tmp_path), respond)
    registry, calls = calculator()
    ctx = RunContext(gw)
    result = await Agent("busy", ctx, model=BASE, tools=registry, max_steps=4).run("count")
    assert result.stopped_by == "max_steps"
    assert "after 4 steps" in result.reason
    assert len(result.steps) == 4 and len(calls) == 4
    await ctx.aclose()


async def test_budget_stops_the_run_through_accounting(tmp_path):
    """Real embedded accounting: the gateway's reservation refuses the step that would
    overrun the run budget; the run stops with stopped_by="budget" and spent <= limit."""
    settings = scripted_settings(tmp_path)
    acc = await open_accounting(settings)
    try:
        def respond(model, request, i):
            return answer(action(action="tool", name="math__add", arguments={"a": i, "b": 0}))

        gw, provider = scripted_gateway(settings, respond, accounting=acc)
        registry, _ = calculator()
        ctx = RunContext(gw, workflow="test-budget")
        await ctx.set_budget("0.002")
        agent = Agent("spender", ctx, model=BASE, tools=registry, max_steps=50, max_tokens=100)
        result = await agent.run("spend")
        assert result.stopped_by == "budget"
        assert "budget" in result.reason
        done = [s for s in result.steps if s.error is None]
        refused = [s for s in ctx.steps if s.error]
        assert len(done) == len(provider.requests) >= 3
        assert len(refused) == 1 and refused[0].error.startswith("budget_exceeded")
        (budget,) = await acc.budgets.list_budgets(ScopeRef(scope="run", id=ctx.run_id))
        usage = await acc.budgets.usage(budget.id)
        assert usage.spent_micros == sum(s.cost_micros for s in done) == result.cost_micros
        assert usage.spent_micros <= 2000 and usage.reserved_micros == 0
        await acc.ledger.flush()
        records = await acc.ledger.list_records(LedgerQuery(run_id=ctx.run_id, limit=1000))
        ok = [r for r in records if r.outcome is Outcome.SUCCESS]
        assert len(ok) == len(done)
        assert {r.workflow_id for r in records} == {"test-budget"}
        assert {r.operation for r in ok} == {"agent.spender.step"}
        assert any(r.error_type == "budget_exceeded" for r in records)
        assert sum(r.cost_micros for r in records) == usage.spent_micros
        # once stopped, the context refuses further steps without calling the model
        before = len(provider.requests)
        again = await agent.run("more")
        assert again.stopped_by == "budget" and len(provider.requests) == before
        await ctx.aclose()
    finally:
        await acc.aclose()


async def test_budget_needs_accounting_and_a_positive_amount(tmp_path):
    gw, _ = scripted_gateway(scripted_settings(tmp_path), lambda m, r, i: answer("x"))
    ctx = RunContext(gw)
    with pytest.raises(Exception, match="needs accounting"):
        await ctx.set_budget(Decimal("1"))
    with pytest.raises(Exception, match="must be positive"):
        await ctx.set_budget("0")
    await ctx.aclose()


async def test_steps_and_deltas_are_published_on_the_bus(tmp_path):
    def respond(model, request, i):
        if i == 0:
            return answer(action(action="tool", name="math__add", arguments={"a": 1, "b": 2}))
        return answer(action(action="final", answer="three"))

    gw, _ = scripted_gateway(scripted_settings(tmp_path), respond)
    bus = MemoryBus(gw.settings.bus)
    collector = Collector(lambda evs: sum(e.topic.endswith(".step") for e in evs) == 2)
    deltas: list[tuple[str, int, str]] = []
    ctx = RunContext(gw, bus, run_id="run-events", on_delta=lambda a, s, d: deltas.append(
        (a, s, d)), delta_interval_s=0.0)
    sub = await bus.subscribe("agents.run-events.>", collector)
    registry, _ = calculator()
    result = await Agent("watcher", ctx, model=BASE, tools=registry).run("1 + 2?")
    received = await collector.wait()
    await sub.aclose(drain=True)
    await bus.aclose()
    steps = [e for e in received if e.topic == "agents.run-events.watcher.step"]
    assert [e.payload["step"] for e in steps] == [1, 2]
    first = steps[0].payload
    assert first["model"] == BASE and first["provider"] == "scripted"
    assert first["input_tokens"] == 100 and first["output_tokens"] == 50
    assert first["cost_micros"] == 200 and first["cost_usd"] == "0.0002"
    assert first["duration_ms"] > 0
    assert first["tool_calls"] == [{"name": "math__add", "arguments": {"a": 1, "b": 2},
                                    "is_error": False, "error_kind": None,
                                    "duration_ms": first["tool_calls"][0]["duration_ms"]}]
    tools = [e for e in received if e.topic == "agents.run-events.watcher.tool"]
    assert tools[0].payload["content"] == "3"
    streamed = "".join(e.payload["delta"] for e in received
                       if e.topic == "agents.run-events.watcher.delta" and e.payload["step"] == 2)
    assert streamed == action(action="final", answer="three")
    assert "".join(d for a, s, d in deltas if s == 2) == streamed
    assert result.answer == "three"


async def test_agent_without_tools_answers_in_one_step(tmp_path):
    gw, provider = scripted_gateway(scripted_settings(tmp_path),
                                    lambda m, r, i: answer(" Paris. "))
    ctx = RunContext(gw)
    result = await Agent("plain", ctx, model=BASE, system="Be brief.").run("Capital of France?")
    assert result.tool_mode == "none" and result.answer == "Paris."
    req = provider.requests[0][1]
    assert req.metadata["run_id"] == ctx.run_id and req.metadata["agent"] == "plain"
    assert req.metadata["operation"] == "agent.plain.step"
    await ctx.aclose()
