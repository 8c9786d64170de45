"""Planner / Coder / Reviewer over the in-process bus, with scripted models."""

from __future__ import annotations

import json

from conclave.accounting import LedgerQuery, open_accounting
from conclave.agents import Coder, Planner, Reviewer, Team, serve_roles
from conclave.bus import MemoryBus
from conclave.llm.types import ChatRequest, ToolCall
from tests.agents._scripted import (
    BASE,
    CHAT,
    Collector,
    answer,
    scripted_gateway,
    scripted_settings,
)

TASK = '''def below_zero(operations: list[int]) -> bool:
    """Return True if the running balance ever falls below zero.
    >>> below_zero([1, 2, 3])
    False
    >>> below_zero([1, 2, -4, 5])
    True
    """
'''
WRONG = "    return False\n"
RIGHT = ("    balance = 0\n    for op in operations:\n        balance += op\n"
         "        if balance < 0:\n            return True\n    return False\n")
PLAN = {"summary": "Track the balance", "steps": ["Sum the operations", "Check for < 0"],
        "files": ["bank.py"]}


def roles(model: str = BASE, **reviewer: object) -> dict[str, object]:
    return {"planner": Planner(model=model),
            "coder": Coder(model=model, samples=3, shapes=("free",)),
            "reviewer": Reviewer(model=model, **reviewer)}  # type: ignore[arg-type]


def pipeline_responder(log: list[tuple[str, ChatRequest]]):
    """Plans; round 1 candidates are all wrong; in round 2 the sample with seed 2001 is right."""
    def respond(model: str, request: ChatRequest, i: int):
        agent = request.metadata["agent"]
        log.append((agent, request))
        if agent == "planner":
            return answer(json.dumps(PLAN))
        if agent == "coder":
            return answer(RIGHT if request.seed == 2001 else WRONG)
        raise AssertionError(f"unexpected call from {agent}")
    return respond


async def test_pipeline_approves_in_round_two_after_a_failing_self_written_test(tmp_path):
    settings = scripted_settings(tmp_path)
    acc = await open_accounting(settings)
    try:
        log: list[tuple[str, ChatRequest]] = []
        gw, _ = scripted_gateway(settings, pipeline_responder(log), accounting=acc)
        bus = MemoryBus(settings.bus)
        collector = Collector(lambda evs: any(e.topic.endswith("team.done") for e in evs))
        await bus.subscribe("agents.run-team.>", collector)
        team = Team(gw, bus, max_rounds=3, **roles())  # type: ignore[arg-type]
        result = await team.run(TASK, run_id="run-team")
        assert result.approved and result.stopped_by == "approved"
        assert result.rounds == 2
        assert result.plan is not None
        assert result.plan.files == ["bank.py"] and result.plan.summary == "Track the balance"
        assert result.files == {"bank.py": TASK + RIGHT}
        review = result.review
        assert review is not None and review.chosen == "r2c1"
        assert [(t.expr, t.expected) for t in review.tests] == [
            ("below_zero([1, 2, 3])", "False"), ("below_zero([1, 2, -4, 5])", "True")]
        assert result.history[0]["approved"] is False and result.history[0]["passed"] == 1
        assert result.history[1] == {"round": 2, "candidates": 2, "chosen": "r2c1",
                                     "passed": 2, "tests": 2, "approved": True}
        # round 1: greedy + 2 samples, all identical -> one candidate after de-duplication
        assert result.candidates == 1 + 2
        # the Coder's round-2 prompts carry the failing test the Reviewer wrote
        coder = [r for a, r in log if a == "coder"]
        assert len(coder) == 6
        assert coder[0].prompt == TASK and coder[0].temperature == 0.0
        round2 = [r for r in coder if r.seed and r.seed >= 2000]
        assert all("below_zero([1, 2, -4, 5]) == True failed: expected True, got False"
                   in r.prompt for r in round2)
        assert all(r.temperature == 0.8 and r.top_p == 0.95 for r in round2)
        # usage: 7 model calls of 100 in / 50 out at $1/M in, $2/M out
        assert result.steps == 7
        assert result.usage.input_tokens == 700 and result.usage.output_tokens == 350
        assert result.cost_micros == 7 * 200
        topics = [e.topic for e in await collector.wait()]
        for t in ("agents.run-team.planner.plan", "agents.run-team.coder.implement",
                  "agents.run-team.reviewer.review", "agents.run-team.team.round",
                  "agents.run-team.team.done", "agents.run-team.planner.step",
                  "agents.run-team.coder.step"):
            assert t in topics, t
        assert topics.count("agents.run-team.coder.implement") == 2
        assert topics.count("agents.run-team.coder.step") == 6
        await bus.aclose()
        await acc.ledger.flush()
        records = await acc.ledger.list_records(LedgerQuery(run_id="run-team", limit=100))
        assert len(records) == 7
        assert {r.workflow_id for r in records} == {"team"}
        assert sorted({r.operation for r in records}) == ["agent.coder.implement",
                                                         "agent.planner.plan"]
    finally:
        await acc.aclose()


async def test_pipeline_stops_at_max_rounds_with_the_best_candidate(tmp_path):
    def respond(model, request, i):
        agent = request.metadata["agent"]
        if agent == "planner":
            return answer("not json at all")  # the plan is repaired from the task
        return answer(WRONG)

    gw, _ = scripted_gateway(scripted_settings(tmp_path), respond)
    team = Team(gw, max_rounds=2, **roles())  # type: ignore[arg-type]
    result = await team.run(TASK)
    assert not result.approved and result.stopped_by == "max_rounds"
    assert result.rounds == 2
    assert result.plan is not None and result.plan.files == ["below_zero.py"]
    assert result.files == {"below_zero.py": TASK + WRONG}
    assert "not approved" in result.review.summary


async def test_pipeline_stopped_by_the_run_budget(tmp_path):
    settings = scripted_settings(tmp_path)
    acc = await open_accounting(settings)
    try:
        log: list[tuple[str, ChatRequest]] = []
        gw, _ = scripted_gateway(settings, pipeline_responder(log), accounting=acc)
        team = Team(gw, max_rounds=3, planner=Planner(model=BASE, max_tokens=64),
                    coder=Coder(model=BASE, samples=3, max_tokens=400),
                    reviewer=Reviewer(model=BASE))
        # enough for the plan's worst case, not for three coder calls at 400 tokens
        result = await team.run(TASK, budget_usd="0.0025")
        assert result.stopped_by == "budget"
        assert "budget" in result.reason
        assert result.plan is not None and not result.approved
        assert result.cost_micros <= 2500
        assert result.steps > len(log)  # the refused step is counted, it reached no model
        assert len([a for a, _ in log if a == "coder"]) < 9  # 3 samples x 3 rounds
    finally:
        await acc.aclose()


async def test_chat_reviewer_reads_code_with_tools_and_can_ask_for_a_revision(tmp_path):
    """A reviewer backed by a chat model runs the agent tool loop over the code workbench."""
    verdicts = iter(["REVISE: handle the empty list explicitly", "APPROVE"])
    outlines: list[str] = []

    def respond(model, request, i):
        agent = request.metadata["agent"]
        if agent == "planner":
            return answer(json.dumps(PLAN))
        if agent == "coder":
            return answer(f"```python\n{TASK}{RIGHT}```")
        last = request.messages[-1]
        if last.role == "tool":
            outlines.append(last.content or "")
            return answer(next(verdicts))
        assert [t.name for t in request.tools][:2] == ["code__check_syntax", "code__complexity"]
        return answer(tool_calls=[ToolCall(id=f"o{i}", name="code__outline",
                                           arguments={"path": "bank.py"})])

    gw, _ = scripted_gateway(scripted_settings(tmp_path), respond)
    team = Team(gw, max_rounds=3, **roles(CHAT))  # type: ignore[arg-type]
    result = await team.run(TASK)
    assert result.approved and result.rounds == 2
    assert result.review.comment == "APPROVE"
    assert all("below_zero" in o for o in outlines) and len(outlines) == 2
    assert result.history[0]["approved"] is False  # tests passed, the model asked to revise
    assert result.review.checks["max_complexity"] == 3


async def test_roles_served_by_workers_with_their_own_contexts(tmp_path):
    """serve_roles: the roles answer for any run from queue groups (as in other processes)."""
    log: list[tuple[str, ChatRequest]] = []
    settings = scripted_settings(tmp_path)
    gw, _ = scripted_gateway(settings, pipeline_responder(log))
    bus = MemoryBus(settings.bus)
    subs = await serve_roles(gw, bus, **roles())  # type: ignore[arg-type]
    team = Team(gw, bus, max_rounds=3, serve_locally=False)
    result = await team.run(TASK, run_id="run-remote")
    assert result.approved and result.rounds == 2
    # the steps came back in the replies and were merged into the run's tally
    assert result.steps == 7 and result.cost_micros == 7 * 200
    assert {r.metadata["run_id"] for _, r in log} == {"run-remote"}
    for sub in subs:
        await sub.aclose()
    await bus.aclose()


async def test_privacy_mode_maps_every_tier_to_tier_0(tmp_path):
    """With a cloud provider configured, tiers 3/1/3 go to the cloud; with privacy, all to 0."""
    seen: list[tuple[str, str, bool | None]] = []

    def respond(model, request, i):
        agent = request.metadata["agent"]
        seen.append((agent, model, request.privacy))
        if agent == "planner":
            return answer(json.dumps(PLAN))
        return answer(f"```python\n{TASK}{RIGHT}```" if not model.startswith("scripted")
                      else RIGHT)

    settings = scripted_settings(tmp_path, openai_api_key="sk-test")
    gw, _ = scripted_gateway(settings, respond)
    result = await Team(gw, max_rounds=1, coder=Coder(samples=1),
                        reviewer=Reviewer(llm_review="never")).run(TASK)
    assert result.approved
    cloud = {agent: model for agent, model, _ in seen}
    assert cloud["planner"].startswith(("openai/", "anthropic/"))
    assert settings.catalog.model(cloud["planner"]).tier == 3
    assert settings.catalog.model(cloud["coder"]).tier == 1
    seen.clear()
    result = await Team(gw, max_rounds=1, privacy=True, coder=Coder(samples=1)).run(TASK)
    assert result.approved
    assert {(agent, model, privacy) for agent, model, privacy in seen} == {
        ("planner", BASE, True), ("coder", BASE, True)}
