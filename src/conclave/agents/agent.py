"""The base agent: a model and its tools in a loop, with the guards runs need.

:meth:`Agent.run` asks the model for its next action until it gives a final
answer, and stops cleanly with a reason instead of looping forever:

* ``max_steps``: the step limit was reached;
* ``repeated_call``: the model asked for the same tool with the same arguments
  ``repeat_limit`` times (the second time the result carries a note saying so);
* ``budget``: the gateway refused a step because the run's budget (accounting,
  ``run`` scope) could not cover its worst case;
* ``stopped``: another agent of the run already stopped it (budget spent).

How tool calls are asked for depends on the model that will serve the step:

* ``native``: chat models with tool support get ``tools=registry.specs()``;
* ``json``: every other model (the tier-0 Gemma 3 270M is a *base* model, no
  chat template, no tool calling) answers one JSON object
  ``{"action": "tool", "name": ..., "arguments": {...}}`` or
  ``{"action": "final", "answer": ...}`` under JSON-schema constrained
  decoding (llama.cpp turns the schema into a grammar), so every tool call it
  makes is well-formed JSON naming a registered tool with arguments of the
  right shape.  What the grammar cannot check (a value out of range ...) comes
  back from the registry as an error result the model sees on its next step.

Every model call is one *step*: streamed through :meth:`Gateway.stream` (deltas
go to the callback and, coalesced, to ``agents.<run>.<agent>.delta``), recorded
by the gateway in the ledger when accounting is on, and published as
``agents.<run>.<agent>.step`` with model, tokens, cost, tool calls and duration.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from conclave.agents.context import RunContext, RunStopped
from conclave.agents.events import StepRecord, ToolCallRecord, check_agent_name
from conclave.config import ModelSpec
from conclave.errors import BudgetExceeded, ConclaveError, InvalidRequest
from conclave.llm.pricing import to_micros
from conclave.llm.streaming import StreamPolicy
from conclave.llm.types import (
    ChatRequest,
    ChatResponse,
    Message,
    ResponseFormat,
    Role,
    ToolCall,
    ToolSpec,
    Usage,
)
from conclave.tools import ToolRegistry, ToolResult

ToolMode = Literal["auto", "native", "json"]
StopKind = Literal["final", "max_steps", "repeated_call", "budget", "stopped", "error"]

_UNSET: Any = object()
_REPEAT_NOTE = ("\n[note: you already made this exact call; the result is the same. "
                "Use it to answer, or try something different.]")


class AgentResult(BaseModel):
    """How a run of one agent ended."""

    agent: str
    run_id: str
    #: the final answer, when the model gave one
    answer: str | None = None
    stopped_by: StopKind
    reason: str
    tool_mode: Literal["native", "json", "none"]
    steps: list[StepRecord] = Field(default_factory=list)
    messages: list[Message] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    cost_micros: int = 0

    @property
    def ok(self) -> bool:
        return self.stopped_by == "final"


class Agent:
    """One role: a model (by tier or name), a system prompt, optional tools.

    Args:
        name: the agent's name in topics, ledger attributes and step records.
        ctx: the run it belongs to (budget, bus, step tally).
        tier / model: which model serves it; a named model wins.
        system: the system prompt.
        tools: the tools it may call (None: it only answers).
        tool_mode: "auto" picks native tool calls when every model the router
            may use supports them, JSON-schema constrained actions otherwise.
        max_steps: model calls per :meth:`run` before it stops.
        repeat_limit: identical tool calls (same name and arguments) that stop it.
        max_tokens / temperature / top_p: defaults for each call.
        policies: stream policies applied to every call (e.g. a repetition guard).
    """

    def __init__(
        self,
        name: str,
        ctx: RunContext,
        *,
        tier: int | None = None,
        model: str | None = None,
        system: str | None = None,
        tools: ToolRegistry | None = None,
        tool_mode: ToolMode = "auto",
        max_steps: int = 8,
        repeat_limit: int = 3,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        policies: Sequence[StreamPolicy] = (),
    ) -> None:
        if max_steps < 1:
            raise InvalidRequest(f"max_steps must be at least 1, got {max_steps}")
        if repeat_limit < 2:
            raise InvalidRequest(f"repeat_limit must be at least 2, got {repeat_limit}",
                                 hint="2 stops at the first repetition")
        self.name = check_agent_name(name)
        self.ctx = ctx
        self.gateway = ctx.gateway
        self.tier = tier
        self.model = model
        self.system = system
        self.tools = tools
        self.tool_mode = tool_mode
        self.max_steps = max_steps
        self.repeat_limit = repeat_limit
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.policies = list(policies)

    # -- which model ------------------------------------------------------------------

    def candidates(self) -> list[ModelSpec]:
        """The models the router would try for this agent's calls, in order."""
        probe = ChatRequest(messages=[Message.user("?")], model=self.model,
                            tier=None if self.model else self.tier, privacy=self.ctx.privacy)
        return self.gateway.router.plan(probe).candidates

    def is_base_model(self) -> bool:
        """Whether the first model to serve this agent is a base (completion) model."""
        return self.candidates()[0].kind == "base"

    def resolved_tool_mode(self) -> Literal["native", "json", "none"]:
        if self.tools is None or len(self.tools) == 0:
            return "none"
        if self.tool_mode != "auto":
            return self.tool_mode
        models = self.candidates()
        if all(m.supports_tools and m.kind == "chat" for m in models):
            return "native"
        return "json"

    # -- one step ---------------------------------------------------------------------

    async def complete(
        self,
        messages: Sequence[Message] | None = None,
        *,
        prompt: str | None = None,
        operation: str = "step",
        response_format: ResponseFormat | None = None,
        tools: Sequence[ToolSpec] = (),
        temperature: float | None = _UNSET,
        seed: int | None = None,
        stop: Sequence[str] = (),
        max_tokens: int | None = None,
        policies: Sequence[StreamPolicy] | None = None,
    ) -> ChatResponse:
        """One model call, recorded and published as a step.

        ``prompt`` sends a raw completion prompt (base models continue it as is).
        Raises :class:`BudgetExceeded` when the run's budget refuses the step (the
        run is then stopped) and :class:`RunStopped` once the run was stopped.
        """
        response, record = await self._call(
            messages, prompt=prompt, operation=operation, response_format=response_format,
            tools=tools, temperature=temperature, seed=seed, stop=stop,
            max_tokens=max_tokens, policies=policies)
        await self.ctx.record(record)
        return response

    async def _call(
        self,
        messages: Sequence[Message] | None,
        *,
        prompt: str | None,
        operation: str,
        response_format: ResponseFormat | None,
        tools: Sequence[ToolSpec],
        temperature: float | None,
        seed: int | None,
        stop: Sequence[str],
        max_tokens: int | None,
        policies: Sequence[StreamPolicy] | None,
    ) -> tuple[ChatResponse, StepRecord]:
        self.ctx.check()
        step, agent_step = self.ctx.next_step(self.name)
        op = f"agent.{self.name}.{operation}"
        msgs = list(messages) if messages else [Message.user(prompt or "")]
        request = ChatRequest(
            messages=msgs, prompt=prompt, model=self.model,
            tier=None if self.model else self.tier,
            max_tokens=max_tokens or self.max_tokens,
            temperature=self.temperature if temperature is _UNSET else temperature,
            top_p=self.top_p, seed=seed, stop=list(stop), tools=list(tools),
            response_format=response_format, privacy=self.ctx.privacy,
            metadata=self.ctx.metadata(self.name, op, step=str(step)),
        )
        record = StepRecord(run_id=self.ctx.run_id, agent=self.name, step=step,
                            agent_step=agent_step, operation=op)
        t0 = time.perf_counter()
        try:
            stream = await self.gateway.stream(
                request, policies=self.policies if policies is None else policies)
        except ConclaveError as exc:
            if isinstance(exc, BudgetExceeded):
                self.ctx.stop("budget", str(exc))
            record.error = f"{exc.code}: {exc}"
            record.duration_ms = round((time.perf_counter() - t0) * 1000, 3)
            await self.ctx.record(record)
            raise
        pending: list[str] = []
        flushed = time.perf_counter()
        try:
            async for chunk in stream:
                if not chunk.delta:
                    continue
                await self.ctx.delta(self.name, step, chunk.delta)
                if self.ctx.publish_deltas:
                    pending.append(chunk.delta)
                    if time.perf_counter() - flushed >= self.ctx.delta_interval_s:
                        await self._flush(step, pending)
                        flushed = time.perf_counter()
        except ConclaveError as exc:
            record.error = f"{exc.code}: {exc}"
            raise
        finally:
            if pending:
                await self._flush(step, pending)
            if record.error is not None:
                self._fill(record, stream.response, t0)
                await self.ctx.record(record)
        response = stream.response
        self._fill(record, response, t0)
        return response, record

    async def _flush(self, step: int, pending: list[str]) -> None:
        text = "".join(pending)
        pending.clear()
        await self.ctx.publish(f"{self.name}.delta", {"step": step, "delta": text})

    def _fill(self, record: StepRecord, response: ChatResponse, t0: float) -> None:
        record.duration_ms = round((time.perf_counter() - t0) * 1000, 3)
        record.model, record.provider = response.model, response.provider
        record.tier = response.tier if response.model else None
        record.input_tokens = response.usage.input_tokens
        record.output_tokens = response.usage.output_tokens
        record.tokens_estimated = response.usage.estimated
        if response.model:
            cost = self.gateway.cost_of(response)
            record.cost_micros = to_micros(cost)
            record.cost_usd = format(cost.normalize(), "f") if cost else "0"
        record.ttft_ms = None if response.ttft_ms is None else round(response.ttft_ms, 3)
        record.stop_reason = response.stop_reason.value
        record.stopped_by = response.stopped_by
        record.output_chars = len(response.text)
        record.tool_calls = [ToolCallRecord(name=c.name, arguments=c.arguments)
                             for c in response.tool_calls]

    # -- the loop ---------------------------------------------------------------------

    def action_schema(self) -> dict[str, Any]:
        """The JSON schema of one action: a call of a registered tool, or the final answer."""
        assert self.tools is not None
        call = self.tools.tool_call_schema()
        defs = call.pop("$defs", None)
        variants = call.get("anyOf", [call])
        actions: list[dict[str, Any]] = []
        for v in variants:
            props = {"action": {"const": "tool"}, **v["properties"]}
            actions.append({**v, "properties": props, "required": ["action", *v["required"]]})
        actions.append({"type": "object",
                        "properties": {"action": {"const": "final"},
                                       "answer": {"type": "string"}},
                        "required": ["action", "answer"], "additionalProperties": False})
        schema: dict[str, Any] = {"anyOf": actions}
        if defs:
            schema["$defs"] = defs
        return schema

    def json_instructions(self) -> str:
        assert self.tools is not None
        lines = [
            "Reply with exactly one JSON object and nothing else.",
            'To call a tool: {"action": "tool", "name": "<tool name>", "arguments": {...}}',
            'When you are done: {"action": "final", "answer": "<your answer>"}',
            "Tools:",
        ]
        tools = self.tools.tools()
        for t in tools:
            summary = (t.description or "").strip().splitlines()
            lines.append(f"- {t.wire_name}({t.signature_text()})"
                         + (f": {summary[0]}" if summary else ""))
        first = tools[0]
        example = {"action": "tool", "name": first.wire_name,
                   "arguments": _example_arguments(first.parameters_schema(inline_refs=True))}
        lines.append(f"For example: {json.dumps(example)}")
        return "\n".join(lines)

    async def run(self, task: str | Sequence[Message]) -> AgentResult:
        """Run the tool loop on ``task`` until a final answer or a stop (never loops forever).

        Never raises for budget or run stops (they become ``stopped_by``); provider
        errors become ``stopped_by="error"`` with the message as the reason.
        """
        mode = self.resolved_tool_mode()
        messages: list[Message] = []
        system = self.system or ""
        if mode == "json":
            system = f"{system}\n\n{self.json_instructions()}".strip()
        if system:
            messages.append(Message.system(system))
        if isinstance(task, str):
            messages.append(Message.user(task))
        else:
            messages.extend(task)
        steps_before = len(self.ctx.steps)
        seen: Counter[str] = Counter()
        fmt = None
        if mode == "json":
            json_ok = all(m.supports_json_schema for m in self.candidates())
            fmt = ResponseFormat(type="json_schema", name="action",
                                 schema=self.action_schema()) if json_ok else None
        specs = self.tools.specs() if mode == "native" and self.tools else []

        def done(kind: StopKind, reason: str, answer: str | None = None) -> AgentResult:
            mine = [s for s in self.ctx.steps[steps_before:] if s.agent == self.name]
            usage = Usage()
            for s in mine:
                usage.input_tokens += s.input_tokens
                usage.output_tokens += s.output_tokens
                usage.estimated = usage.estimated or s.tokens_estimated
            return AgentResult(agent=self.name, run_id=self.ctx.run_id, answer=answer,
                               stopped_by=kind, reason=reason, tool_mode=mode, steps=mine,
                               messages=messages, usage=usage,
                               cost_micros=sum(s.cost_micros for s in mine))

        for _ in range(self.max_steps):
            try:
                response, record = await self._call(
                    messages, prompt=None, operation="step", response_format=fmt,
                    tools=specs, temperature=_UNSET, seed=None, stop=(), max_tokens=None,
                    policies=None)
            except BudgetExceeded as exc:
                return done("budget", f"the run budget refused the next step: {exc}")
            except RunStopped as exc:
                return done("budget" if exc.stopped_by == "budget" else "stopped", str(exc))
            except ConclaveError as exc:
                return done("error", str(exc))
            if mode == "native":
                calls, answer, problem = response.tool_calls, (
                    response.text if not response.tool_calls else None), None
            elif mode == "json":
                calls, answer, problem = _parse_action(response.text)
            else:
                calls, answer, problem = [], response.text, None
            record.tool_calls = [ToolCallRecord(name=c.name, arguments=c.arguments)
                                 for c in calls]
            if answer is not None and not calls:
                await self.ctx.record(record)
                return done("final", "the model gave its final answer", answer.strip())
            if mode == "native":
                messages.append(Message(role=Role.ASSISTANT, content=response.text or None,
                                        tool_calls=calls))
            else:
                messages.append(Message.assistant(response.text))
            if problem is not None:
                await self.ctx.record(record)
                messages.append(Message.user(
                    f"That reply was not a valid action: {problem}. Reply with one JSON object "
                    'with "action" set to "tool" or "final".'))
                continue
            for call, rec in zip(calls, record.tool_calls, strict=True):
                key = f"{call.name}:{json.dumps(call.arguments, sort_keys=True, default=str)}"
                if call.raw_arguments is not None:
                    key += call.raw_arguments
                seen[key] += 1
                if seen[key] >= self.repeat_limit:
                    await self.ctx.record(record)
                    return done("repeated_call",
                                f"tool {call.name} was called {seen[key]} times with the same "
                                f"arguments {_short(json.dumps(call.arguments, default=str))}; "
                                "stopped instead of looping")
                result = await self.tools.call(call) if self.tools else None
                assert result is not None
                if seen[key] > 1:
                    result.content += _REPEAT_NOTE
                rec.is_error, rec.error_kind = result.is_error, result.error_kind
                rec.duration_ms = result.duration_ms
                await self._publish_tool(record.step, call, result)
                messages.append(result.to_message() if mode == "native" else Message.user(
                    f"Tool result ({result.name}): {result.content}"))
            await self.ctx.record(record)
        return done("max_steps", f"no final answer after {self.max_steps} steps (the limit)")

    async def _publish_tool(self, step: int, call: ToolCall, result: ToolResult) -> None:
        await self.ctx.publish(f"{self.name}.tool", {
            "step": step, "name": call.name, "arguments": call.arguments,
            "is_error": result.is_error, "error_kind": result.error_kind,
            "duration_ms": result.duration_ms, "content": _short(result.content, 2000),
        })


def _example_arguments(schema: dict[str, Any]) -> dict[str, Any]:
    """Arguments of the right shape for an example call (small models copy examples well)."""
    samples = {"integer": 1, "number": 1.5, "string": "text", "boolean": True, "array": [],
               "object": {}}
    out: dict[str, Any] = {}
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        sub = props.get(name, {})
        if "default" in sub:
            out[name] = sub["default"]
        elif sub.get("enum"):
            out[name] = sub["enum"][0]
        else:
            kind = sub.get("type")
            if kind is None:
                kind = next((v.get("type") for v in sub.get("anyOf", [])
                             if v.get("type") not in (None, "null")), "string")
            out[name] = samples.get(kind if isinstance(kind, str) else "string", "text")
    return out


def _parse_action(text: str) -> tuple[list[ToolCall], str | None, str | None]:
    """(tool calls, final answer, problem) from a JSON action."""
    raw = text.strip()
    try:
        data = json.loads(raw)
    except ValueError:
        start, end = raw.find("{"), raw.rfind("}")
        try:
            data = json.loads(raw[start:end + 1]) if 0 <= start < end else None
        except ValueError:
            data = None
        if data is None:
            return [], None, f"not a JSON object ({_short(raw, 120)!r})"
    if not isinstance(data, dict):
        return [], None, "a JSON value that is not an object"
    action = data.get("action")
    if action == "final":
        answer = data.get("answer")
        return [], answer if isinstance(answer, str) else json.dumps(answer), None
    if action == "tool":
        name = data.get("name")
        if not isinstance(name, str) or not name:
            return [], None, 'a tool action without a "name"'
        args = data.get("arguments", {})
        call_id = f"call_{uuid.uuid4().hex[:12]}"
        if isinstance(args, dict):
            return [ToolCall(id=call_id, name=name, arguments=args)], None, None
        return [ToolCall(id=call_id, name=name, raw_arguments=json.dumps(args))], None, None
    return [], None, f'"action" must be "tool" or "final", got {action!r}'


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
