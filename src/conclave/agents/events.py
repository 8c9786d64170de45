"""Agent topics and the step record every model call becomes.

Topics (all under ``agents.<run_id>``)::

    agents.<run>.<agent>.step        one per model call: model, tokens, cost, tool calls, time
    agents.<run>.<agent>.delta       partial output while a call streams (coalesced)
    agents.<run>.<agent>.tool        one per tool call an agent ran, with its result
    agents.<run>.planner.plan        request/reply: task -> plan
    agents.<run>.coder.implement     request/reply: task, plan, feedback -> candidates
    agents.<run>.reviewer.review     request/reply: candidates -> verdict
    agents.<run>.team.round          after each review
    agents.<run>.team.done           the final result

Subscribe to ``agents.<run>.>`` to watch one run, ``agents.*.*.step`` to meter all.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from pydantic import BaseModel, Field

from conclave.errors import InvalidRequest

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_run_id() -> str:
    """A fresh run id: usable as a topic token, a budget scope id and a folder name."""
    return f"run-{uuid.uuid4().hex[:12]}"


def check_run_id(run_id: str) -> str:
    if not _ID.match(run_id):
        raise InvalidRequest(
            f"invalid run id {run_id!r}",
            hint="use 1-64 letters, digits, '_' or '-' (it becomes a bus topic token)")
    return run_id


def check_agent_name(name: str) -> str:
    if not _ID.match(name):
        raise InvalidRequest(f"invalid agent name {name!r}",
                             hint="use 1-64 letters, digits, '_' or '-', e.g. 'coder'")
    return name


def topic(run_id: str, *parts: str) -> str:
    """``agents.<run_id>.<parts...>``."""
    return ".".join(("agents", run_id, *parts))


class ToolCallRecord(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    #: filled once the call ran
    is_error: bool | None = None
    error_kind: str | None = None
    duration_ms: float | None = None


class StepRecord(BaseModel):
    """One model call of one agent: what the ``...step`` event carries.

    Cost is integer micro-dollars (the ledger's unit); ``cost_usd`` is the same
    amount as a decimal string, for display.
    """

    #: unique across processes, so a run can merge steps reported by remote agents
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    run_id: str
    agent: str
    #: position among all the run's steps (1-based), and among this agent's
    step: int
    agent_step: int
    operation: str
    model: str = ""
    provider: str = ""
    tier: int | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    tokens_estimated: bool = False
    cost_micros: int = 0
    cost_usd: str = "0"
    duration_ms: float = 0.0
    ttft_ms: float | None = None
    stop_reason: str | None = None
    #: a stream policy that cut the output (repetition, ...), if any
    stopped_by: str | None = None
    tool_calls: list[ToolCallRecord] = Field(default_factory=list)
    output_chars: int = 0
    #: ``code: message`` when the call failed (budget refused, provider error ...)
    error: str | None = None
