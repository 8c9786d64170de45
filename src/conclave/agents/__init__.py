"""Agents: the tool loop, and a Planner / Coder / Reviewer team that talks over the bus.

The base agent::

    ctx = RunContext(gateway, bus, run_id="run-1")      # accounting on the gateway: ledger
    await ctx.set_budget("0.50")                          # a run-scope budget, enforced atomically
    agent = Agent("helper", ctx, tier=1, tools=registry, max_steps=8, repeat_limit=3)
    result = await agent.run("What does src/x.py define?")
    result.answer, result.stopped_by   # "final", "max_steps", "repeated_call", "budget" ...

The team::

    team = Team(gateway, max_rounds=3, coder=Coder(samples=4))
    result = await team.run(task, budget_usd="0.50")
    result.files, result.review, result.approved

Every model call is a step: a ledger record (through the gateway) and an
``agents.<run>.<agent>.step`` event with model, tokens, cost, tool calls and
duration; partial output streams as ``...delta`` events and to ``on_delta``.
"""

from conclave.agents.agent import Agent, AgentResult, StopKind, ToolMode
from conclave.agents.artifacts import (
    Candidate,
    CandidateScore,
    Plan,
    Review,
    RoleReply,
    check_path,
    module_name,
)
from conclave.agents.coder import Coder, extract_code, salvage
from conclave.agents.context import DeltaCallback, EventCallback, RunContext, RunStopped
from conclave.agents.events import StepRecord, ToolCallRecord, new_run_id, topic
from conclave.agents.output import make_patch, write_files
from conclave.agents.planner import PLAN_SCHEMA, Planner, repair_plan
from conclave.agents.reviewer import Reviewer, parse_asserts
from conclave.agents.sandbox import (
    SandboxLimits,
    SandboxRun,
    TestCase,
    TestOutcome,
    TestReport,
    namespaces_available,
    run_python,
    run_tests,
)
from conclave.agents.taskspec import TaskSpec, parse_task
from conclave.agents.team import Team, TeamResult, serve_roles

__all__ = [
    "PLAN_SCHEMA",
    "Agent",
    "AgentResult",
    "Candidate",
    "CandidateScore",
    "Coder",
    "DeltaCallback",
    "EventCallback",
    "Plan",
    "Planner",
    "Review",
    "Reviewer",
    "RoleReply",
    "RunContext",
    "RunStopped",
    "SandboxLimits",
    "SandboxRun",
    "StepRecord",
    "StopKind",
    "TaskSpec",
    "Team",
    "TeamResult",
    "TestCase",
    "TestOutcome",
    "TestReport",
    "ToolCallRecord",
    "ToolMode",
    "check_path",
    "extract_code",
    "make_patch",
    "module_name",
    "namespaces_available",
    "new_run_id",
    "parse_asserts",
    "parse_task",
    "repair_plan",
    "run_python",
    "run_tests",
    "salvage",
    "serve_roles",
    "topic",
    "write_files",
]
