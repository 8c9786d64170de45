"""End to end with the real tier-0 model (Gemma 3 270M base on llama.cpp): constrained JSON
actions through the agent loop, and a tiny task through the whole team."""

from __future__ import annotations

import json

import pytest

from conclave.agents import Agent, Coder, Planner, Reviewer, RunContext, Team
from conclave.gateway import Gateway
from conclave.tools import ToolRegistry

pytestmark = pytest.mark.llama

TASK = '''def add(a: int, b: int) -> int:
    """Return the sum of a and b.
    >>> add(2, 3)
    5
    >>> add(-1, 1)
    0
    """
'''


async def test_base_model_actions_are_always_valid_json(llama_server):
    registry = ToolRegistry()

    @registry.tool(namespace="math")
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    async with Gateway(llama_server.settings) as gw:
        ctx = RunContext(gw, privacy=True)
        agent = Agent("helper", ctx, tools=registry, max_steps=2, max_tokens=48)
        result = await agent.run("What is 2 + 3? Call math__add.")
        await ctx.aclose()
    assert result.tool_mode == "json"
    assert result.stopped_by in ("final", "max_steps", "repeated_call")
    assistant = [m.content for m in result.messages if m.role == "assistant"]
    for text in assistant:  # the grammar made every reply a well-formed action
        data = json.loads(text or "")
        assert data["action"] in ("tool", "final")
        if data["action"] == "tool":
            assert data["name"] == "math__add"
            assert isinstance(data["arguments"]["a"], int)
    assert all(s.model == "local/gemma-3-270m" and s.output_tokens > 0 for s in result.steps)


async def test_tiny_task_through_the_team_produces_a_file(llama_server):
    async with Gateway(llama_server.settings) as gw:
        team = Team(gw, max_rounds=2, privacy=True, planner=Planner(max_tokens=96),
                    coder=Coder(samples=2, max_tokens=48), reviewer=Reviewer())
        result = await team.run(TASK)
    assert result.plan is not None and result.plan.files
    (path, content), = result.files.items()
    assert path == result.plan.files[0] and path.endswith(".py")
    assert content.startswith(TASK) and "def add" in content
    assert 1 <= result.rounds <= 2
    assert result.review is not None and len(result.review.tests) == 2
    assert result.steps >= 3 and result.usage.output_tokens > 0
    assert result.cost_micros == 0  # local model: free, and still counted
