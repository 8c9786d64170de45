"""Planner repair, Coder prompts and salvage, Reviewer's pick and model-written asserts."""

from __future__ import annotations

import json

from conclave.agents import (
    Candidate,
    Coder,
    Plan,
    Planner,
    Reviewer,
    RunContext,
    extract_code,
    parse_asserts,
    parse_task,
    repair_plan,
    salvage,
)
from conclave.agents.coder import primer
from conclave.agents.planner import PLAN_SCHEMA
from tests.agents._scripted import BASE, CHAT, answer, scripted_gateway, scripted_settings

STUB = 'def inc(x: int) -> int:\n    """Add one.\n    >>> inc(1)\n    2\n    """\n'


def test_plan_repair_keeps_the_models_words_and_fixes_the_rest():
    spec = parse_task(STUB)
    plan = repair_plan({"summary": "  Add   one ", "steps": ["", "Return x + 1", 3],
                        "files": ["../evil.py", "inc_impl.py", "notes.txt"]}, spec)
    assert plan == Plan(summary="Add one", steps=["Return x + 1"], files=["inc_impl.py"])
    plan = repair_plan({}, spec)
    assert plan.files == ["inc.py"] and plan.summary == "Add one"
    assert plan.steps == ["Implement def inc(x: int) -> int: in inc.py"]
    prose = repair_plan({"files": ["a.py", "b.py", "a.py"]}, parse_task("Build a tool"))
    assert prose.files == ["a.py", "b.py"] and prose.steps == ["Write a.py", "Write b.py"]


def test_plan_repair_drops_a_copy_of_the_worked_example():
    """Gemma 3 270M answered HumanEval stubs with the system prompt's example plan."""
    from conclave.agents.planner import EXAMPLE_PLAN, EXAMPLE_TASK

    spec = parse_task(STUB)
    copied = repair_plan({**EXAMPLE_PLAN, "steps": [*EXAMPLE_PLAN["steps"], "Return x + 1"]},
                         spec)
    assert copied == Plan(summary="Add one", steps=["Return x + 1"], files=["inc.py"])
    # the task that *is* the example keeps its plan
    same = repair_plan(dict(EXAMPLE_PLAN), parse_task(EXAMPLE_TASK))
    assert same.summary == EXAMPLE_PLAN["summary"] and same.files == ["largest.py"]


async def test_planner_asks_for_schema_constrained_json(tmp_path):
    def respond(model, request, i):
        return answer(json.dumps({"summary": "Increment", "steps": ["Return x + 1"],
                                  "files": ["inc.py"]}))

    gw, provider = scripted_gateway(scripted_settings(tmp_path), respond)
    ctx = RunContext(gw)
    plan = await Planner(model=BASE).plan(ctx, STUB, repo_files=["inc.py", "other.py"])
    assert plan.files == ["inc.py"] and plan.summary == "Increment"
    request = provider.requests[0][1]
    assert request.response_format.json_schema == PLAN_SCHEMA
    assert request.temperature == 0.0
    assert "- other.py" in request.messages[-1].content  # the repo listing
    await ctx.aclose()


async def test_coder_cycles_prompt_shapes_and_keeps_the_primer_out_of_the_file(tmp_path):
    def respond(model, request, i):
        if request.prompt.endswith("    return "):
            assert request.stop == ["\n"] and request.max_tokens == 64
            return answer("x + 1")
        if not request.prompt.startswith(STUB):  # a primer comes first
            return answer("    return x + 1\n")
        return answer("    return x + 2\n")

    gw, provider = scripted_gateway(scripted_settings(tmp_path), respond)
    ctx = RunContext(gw)
    plan = Plan(summary="s", steps=["x"], files=["inc.py"])
    coder = Coder(model=BASE, samples=6, shapes=("free", "primed", "return"))
    assert coder.sampling(1) == [("free", 0.0, None, 0), ("primed", 0.0, None, 0),
                                 ("return", 0.0, None, 0), ("free", 0.8, 1003, 1),
                                 ("primed", 0.0, None, 1), ("return", 0.8, 1005, 1)]
    assert all(t == 0.8 for _, t, _, _ in coder.sampling(2))
    cands = await coder.implement(ctx, STUB, plan)
    prompts = [r.prompt for _, r in provider.requests]
    assert len(prompts) == 6
    primed = sorted(p for p in prompts if not p.startswith(STUB))
    assert primed == sorted([primer(0) + STUB, primer(1) + STUB]) and primer(0) != primer(1)
    assert [c.files["inc.py"] for c in cands] == [
        STUB + "    return x + 2\n", STUB + "    return x + 1\n"]
    assert [c.id for c in cands] == ["r1c0", "r1c1"]  # identical candidates dropped
    await ctx.aclose()


async def test_coder_with_a_chat_model_extracts_the_fenced_file(tmp_path):
    def respond(model, request, i):
        assert "Write the file `inc.py`" in request.messages[-1].content
        assert "Reviewer rejected" not in request.messages[-1].content or "inc(1)" in \
            request.messages[-1].content
        return answer(f"Here you go:\n```python\n{STUB}    return x + 1\n```\nDone.")

    gw, _ = scripted_gateway(scripted_settings(tmp_path), respond)
    ctx = RunContext(gw)
    plan = Plan(summary="s", steps=["x"], files=["inc.py"])
    (cand,) = await Coder(model=CHAT, samples=1).implement(ctx, STUB, plan, round=2,
                                                          feedback="inc(1) == 2 failed")
    assert cand.files == {"inc.py": STUB + "    return x + 1\n"}
    await ctx.aclose()


def test_salvage_and_extract():
    code, cut = salvage("def f():\n    return 1\n\ndef g(:\n")
    assert code == "def f():\n    return 1\n" and cut
    assert salvage("x = 1\n") == ("x = 1\n", False)
    assert extract_code("no fence here") == "no fence here"
    assert extract_code("```py\nx = 1\n") == "x = 1\n"  # an unclosed fence still counts


def test_model_written_asserts_are_parsed_safely():
    text = ("assert inc(1) == 2\nassert inc(inc(1)) == 3\nassert inc(y) == 3\n"
            "assert inc(0) > -1\nassert other(1) == 2\nassert inc(1) == x\nprint(inc(2))")
    tests = parse_asserts(text, "inc", helpers={"inc"})
    assert [(t.expr, t.expected) for t in tests] == [
        ("inc(1)", "2"), ("inc(inc(1))", "3"), ("bool(inc(0) > -1)", "True")]
    assert {t.source for t in tests} == {"model"}


async def test_reviewer_picks_the_passing_candidate_that_others_agree_with(tmp_path):
    gw, _ = scripted_gateway(scripted_settings(tmp_path), lambda m, r, i: answer(""))
    ctx = RunContext(gw)
    plan = Plan(summary="s", steps=["x"], files=["inc.py"])
    task = STUB.replace('    """\n', '    >>> inc(5)\n    6\n    """\n')

    def cand(i: int, body: str) -> Candidate:
        return Candidate(id=f"c{i}", round=1, sample=i, files={"inc.py": task + body})

    cands = [cand(0, "    return 2\n"), cand(1, "    return x + 1\n"),
             cand(2, "    return (x + 1\n"), cand(3, "    return 1 + x\n"),
             Candidate(id="c4", round=1, sample=4, files={"inc.py": "def other():\n    pass\n"})]
    review = await Reviewer(model=BASE).review(ctx, task, plan, cands)
    assert review.approved and review.chosen == "c1"
    scores = {s.id: s for s in review.scores}
    assert scores["c0"].passed == 1 and scores["c1"].passed == 2
    assert scores["c1"].agreement == 2  # c1 and c3 behave the same
    assert not scores["c2"].syntax_ok and ":8:12: SyntaxError" in scores["c2"].syntax_error
    assert not scores["c4"].defines_entry
    assert review.checks["symbols"] == ["inc.py:inc (lines 1-8)"]
    assert review.checks["max_complexity"] == 1
    assert "c2: syntax error" in review.summary
    # a failing pick explains itself in the feedback for the Coder
    review = await Reviewer(model=BASE).review(ctx, task, plan, cands[:1])
    assert not review.approved
    assert review.feedback == "inc(5) == 6 failed: expected 6, got 2"
    await ctx.aclose()


async def test_reviewer_writes_asserts_with_its_model_when_the_task_has_no_examples(tmp_path):
    def respond(model, request, i):
        assert request.prompt.endswith("# Tests\nassert twice(")
        return answer("2) == 4\nassert twice(0) == 0\n")

    gw, _ = scripted_gateway(scripted_settings(tmp_path), respond)
    ctx = RunContext(gw)
    task = 'def twice(x):\n    """Double x."""\n'
    tests = await Reviewer(model=BASE).write_tests(ctx, task)
    assert [(t.expr, t.expected, t.source) for t in tests] == [
        ("twice(2)", "4", "model"), ("twice(0)", "0", "model")]
    assert await Reviewer(model=BASE, model_tests="never").write_tests(ctx, task) == []
    await ctx.aclose()
