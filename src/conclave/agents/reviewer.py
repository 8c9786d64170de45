"""The Reviewer (tier 3): checks candidates, picks one, approves it or says what to fix.

The Reviewer only runs tests it writes itself, from the task statement:

1. examples in the statement (doctest ``>>>`` lines, ``f(x) == y``, ``f(x) ➞ y`` ...,
   see :mod:`conclave.agents.taskspec`);
2. when there are none, ``assert`` lines its own model writes for the entry point.

Each candidate is checked with the code workbench (syntax with line and column,
outline: does it define the entry point, cyclomatic complexity) and, when it
compiles, run against the tests in a sandboxed subprocess
(:mod:`conclave.agents.sandbox`: ``python -I``, temp dir, resource limits, no
network, wall-clock limit).  Nothing a model wrote runs in this process.

The pick: most tests passed, then the largest group of candidates that behaved
identically on the tests (independent samples agreeing is evidence, as in
CodeT/AlphaCode clustering), then the earliest (the greedy sample comes first).
A candidate is approved when it passes every test; with no tests at all, on the
static checks.  Reviewers backed by a chat model also read the code with the
workbench tools (the agent tool loop) and may ask for a revision.
"""

from __future__ import annotations

import ast
import asyncio
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from conclave.agents.agent import Agent
from conclave.agents.artifacts import (
    Candidate,
    CandidateScore,
    Plan,
    Review,
    module_name,
)
from conclave.agents.context import RunContext
from conclave.agents.sandbox import SandboxLimits, TestCase, run_tests
from conclave.agents.taskspec import TaskSpec, parse_task
from conclave.llm.types import Message
from conclave.tools import CodeWorkbench, ToolRegistry

TEST_SYSTEM = (
    "You are the Reviewer of a small coding team. Write Python assert statements that "
    "check the function the task asks for, with literal arguments and the exact expected "
    "results. Reply with the asserts in one ```python block."
)
REVIEW_SYSTEM = (
    "You are the Reviewer of a small coding team. Check the code against the task. You may "
    "use the code tools to inspect it. Finish with APPROVE if it is correct, or with "
    "REVISE: followed by what the Coder must change."
)


class Reviewer:
    """Reviews candidates; ``tier`` 3 by default.

    Args:
        limits: sandbox limits for each test run.
        model_tests: "auto" lets the model write asserts only when the statement has
            no examples; "never" never; "always" adds them to the statement's.
        llm_review: "auto" runs the model review (tool loop) only for chat models.
        concurrency: candidates tested at once.
    """

    name = "reviewer"

    def __init__(self, *, tier: int | None = 3, model: str | None = None,
                 limits: SandboxLimits | None = None,
                 model_tests: Literal["auto", "never", "always"] = "auto",
                 llm_review: Literal["auto", "never", "always"] = "auto",
                 max_model_tests: int = 5, concurrency: int = 2) -> None:
        self.tier, self.model = tier, model
        self.limits = limits or SandboxLimits()
        self.model_tests = model_tests
        self.llm_review = llm_review
        self.max_model_tests = max_model_tests
        self.concurrency = max(1, concurrency)

    def _agent(self, ctx: RunContext, **kwargs: object) -> Agent:
        return Agent(self.name, ctx, tier=self.tier, model=self.model, **kwargs)  # type: ignore[arg-type]

    # -- tests ------------------------------------------------------------------------

    async def write_tests(self, ctx: RunContext, task: str) -> list[TestCase]:
        """The tests for ``task``: its examples, and model-written asserts per ``model_tests``."""
        spec = parse_task(task)
        tests = list(spec.tests)
        wanted = self.model_tests == "always" or (self.model_tests == "auto" and not tests)
        if wanted and spec.entry_point:
            tests += await self._model_tests(ctx, spec)
        return tests

    async def _model_tests(self, ctx: RunContext, spec: TaskSpec) -> list[TestCase]:
        assert spec.entry_point
        agent = self._agent(ctx, max_tokens=120, temperature=0.0)
        entry = spec.entry_point
        if agent.is_base_model():
            head = spec.stub or f"{spec.signature or f'def {entry}(*args):'}\n    ...\n"
            lead = f"assert {entry}("
            prompt = f"{head.rstrip()}\n\n\n# Tests\n{lead}"
            response = await agent.complete(prompt=prompt, operation="write_tests",
                                            stop=["\n\n", "\ndef ", "\n# "])
            text = lead + response.text
        else:
            response = await agent.complete(
                [Message.system(TEST_SYSTEM),
                 Message.user(f"Task:\n{spec.text.strip()}\n\nWrite up to "
                              f"{self.max_model_tests} asserts for `{entry}`.")],
                operation="write_tests")
            text = response.text
        helpers = _defined_names(spec.stub) - {entry}
        return parse_asserts(text, entry, helpers=helpers)[: self.max_model_tests]

    # -- review -----------------------------------------------------------------------

    async def review(self, ctx: RunContext, task: str, plan: Plan,
                     candidates: Sequence[Candidate], *, tests: Sequence[TestCase] | None = None,
                     repo: Path | None = None) -> Review:
        spec = parse_task(task)
        tests = list(tests) if tests is not None else await self.write_tests(ctx, task)
        with tempfile.TemporaryDirectory(prefix="conclave-review-") as tmp:
            registry = ToolRegistry(default_timeout_s=30)
            CodeWorkbench(tmp).register(registry)
            try:
                scores = await self._score(candidates, spec, tests, registry, repo)
                chosen = _choose(scores)
                checks: dict[str, object] = {}
                if chosen is not None:
                    cand = next(c for c in candidates if c.id == chosen.id)
                    checks = await self._workbench(registry, cand)
                    chosen.max_complexity = checks.get("max_complexity")  # type: ignore[assignment]
            finally:
                await registry.aclose()
        comment = None
        verdict_ok = True
        if chosen is not None and self._wants_llm_review(ctx):
            cand = next(c for c in candidates if c.id == chosen.id)
            comment, verdict_ok = await self._llm_review(ctx, spec, plan, cand, chosen)
        passed_all = chosen is not None and chosen.syntax_ok and chosen.defines_entry and (
            chosen.passed == chosen.total)
        approved = bool(passed_all and verdict_ok)
        return Review(
            approved=approved, chosen=chosen.id if chosen else None,
            summary=_summary(scores, chosen, tests, approved, comment),
            tests=tests, scores=scores,
            feedback=_feedback(chosen, spec, tests, comment, verdict_ok),
            comment=comment, checks=checks)

    async def _score(self, candidates: Sequence[Candidate], spec: TaskSpec,
                     tests: Sequence[TestCase], registry: ToolRegistry,
                     repo: Path | None) -> list[CandidateScore]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(cand: Candidate) -> CandidateScore:
            score = CandidateScore(id=cand.id, syntax_ok=True, total=len(tests))
            for path, code in cand.files.items():
                check = (await registry.invoke("code.check_syntax", source=code)).value
                if check is None or not check.valid:
                    score.syntax_ok = False
                    score.syntax_error = f"{path}: " + (
                        check.rendered or (check.error.message if check.error else "invalid")
                        if check is not None else "could not be checked")
                    return score
            owner = _owner(cand, spec.entry_point)
            score.defines_entry = spec.entry_point is None or owner is not None
            if not score.defines_entry:
                score.error = f"no file defines {spec.entry_point}()"
                return score
            if tests and owner is not None:
                async with gate:
                    report = await run_tests(cand.files, module_name(owner), tests,
                                             limits=self.limits,
                                             extra_path=[repo] if repo else [])
                score.outcomes, score.error = report.outcomes, report.error
                score.passed = report.passed
            return score

        scores = list(await asyncio.gather(*(one(c) for c in candidates)))
        behaviour = {s.id: tuple(o.actual if o.actual is not None else f"!{o.error}"
                                 for o in s.outcomes) for s in scores if s.syntax_ok}
        counts = Counter(behaviour.values())
        for s in scores:
            if s.id in behaviour:
                s.agreement = counts[behaviour[s.id]]
        return scores

    async def _workbench(self, registry: ToolRegistry, cand: Candidate) -> dict[str, object]:
        """Outline and complexity of the chosen candidate, through the code tools."""
        symbols: list[str] = []
        worst = 0
        functions: list[dict[str, object]] = []
        for path, code in cand.files.items():
            outline = (await registry.invoke("code.outline", source=code)).value
            if outline is not None:
                symbols += [f"{path}:{s.qualname} (lines {s.line}-{s.end_line})"
                            for s in outline.symbols]
            report = (await registry.invoke("code.complexity", source=code)).value
            if report is not None:
                worst = max(worst, report.maximum)
                functions += [{"file": path, "name": f.name, "complexity": f.complexity,
                               "rank": f.rank} for f in report.functions]
        return {"symbols": symbols, "functions": functions, "max_complexity": worst}

    def _wants_llm_review(self, ctx: RunContext) -> bool:
        if self.llm_review == "never":
            return False
        if self.llm_review == "always":
            return True
        return not self._agent(ctx).is_base_model()

    async def _llm_review(self, ctx: RunContext, spec: TaskSpec, plan: Plan, cand: Candidate,
                          score: CandidateScore) -> tuple[str | None, bool]:
        with tempfile.TemporaryDirectory(prefix="conclave-review-") as tmp:
            for path, code in cand.files.items():
                target = Path(tmp) / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(code)
            registry = ToolRegistry(default_timeout_s=30)
            CodeWorkbench(tmp).register(registry)
            agent = self._agent(ctx, system=REVIEW_SYSTEM, tools=registry, max_steps=4,
                                temperature=0.0, max_tokens=400)
            files = "\n\n".join(f"File {p}:\n```python\n{c}\n```" for p, c in cand.files.items())
            results = "\n".join(
                f"- {o.id}: {'pass' if o.passed else 'FAIL ' + (o.error or '')}"
                for o in score.outcomes) or "- no tests"
            try:
                result = await agent.run(f"Task:\n{spec.text.strip()}\n\nPlan: {plan.summary}\n\n"
                                         f"{files}\n\nTest results:\n{results}")
            finally:
                await registry.aclose()
        if result.answer is None:
            return f"(no verdict: {result.reason})", True
        answer = result.answer.strip()
        return answer, not answer.upper().startswith("REVISE")


def parse_asserts(text: str, entry: str, *, helpers: frozenset[str] | set[str] = frozenset()
                  ) -> list[TestCase]:
    """Tests from ``assert`` lines that call ``entry`` with literal arguments.

    An argument may also call one of ``helpers`` (functions the task itself defines,
    e.g. ``decode(encode("abc")) == "abc"``), with literal arguments in turn.
    """
    tests: list[TestCase] = []
    block = re.search(r"```(?:python|py)?\s*\n(.*?)(?:```|\Z)", text, re.DOTALL)
    body = block.group(1) if block else text
    for line in body.splitlines():
        line = line.strip()
        if not line.startswith("assert "):
            continue
        try:
            node = ast.parse(line).body[0]
        except (SyntaxError, IndexError, ValueError):
            continue
        if not isinstance(node, ast.Assert):
            continue
        test = node.test
        calls = [n for n in ast.walk(test) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id == entry]
        if not calls or not all(_safe_arg(a, helpers) for c in calls for a in c.args):
            continue
        names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
        if not names <= {entry, *helpers, *_SAFE_BUILTINS}:
            continue  # a free variable: the assert could never run
        n = len(tests) + 1
        if (isinstance(test, ast.Compare) and len(test.ops) == 1
                and isinstance(test.ops[0], ast.Eq) and _literal(test.comparators[0])):
            tests.append(TestCase(id=f"model{n}", expr=ast.unparse(test.left),
                                  expected=ast.unparse(test.comparators[0]), source="model"))
        else:
            tests.append(TestCase(id=f"model{n}", expr=f"bool({ast.unparse(test)})",
                                  expected="True", source="model"))
    return tests


def _literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


_SAFE_BUILTINS = frozenset({"abs", "bool", "float", "int", "len", "list", "max", "min",
                            "round", "set", "sorted", "str", "sum", "tuple"})


def _safe_arg(node: ast.expr, helpers: frozenset[str] | set[str]) -> bool:
    if _literal(node):
        return True
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in helpers and not node.keywords
            and all(_safe_arg(a, helpers) for a in node.args))


def _defined_names(source: str | None) -> set[str]:
    if not source:
        return set()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    return {n.name for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}


def _owner(cand: Candidate, entry: str | None) -> str | None:
    """The file of ``cand`` that defines ``entry`` at top level (the first file if no entry)."""
    if entry is None:
        return next(iter(cand.files), None)
    for path, code in cand.files.items():
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError):
            continue
        if any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
               and n.name == entry for n in tree.body):
            return path
    return None


def _choose(scores: Sequence[CandidateScore]) -> CandidateScore | None:
    usable = [(i, s) for i, s in enumerate(scores) if s.syntax_ok and s.defines_entry]
    if not usable:
        return None
    return max(usable, key=lambda p: (p[1].passed, p[1].agreement, -p[0]))[1]


def _summary(scores: Sequence[CandidateScore], chosen: CandidateScore | None,
             tests: Sequence[TestCase], approved: bool, comment: str | None) -> str:
    sources = Counter(t.source for t in tests)
    made = ", ".join(f"{n} from the {src}" for src, n in sources.items()) or "none"
    compiled = sum(s.syntax_ok for s in scores)
    lines = [f"{len(scores)} candidate(s), {compiled} compile; tests written: {made}."]
    for s in scores:
        status = (f"syntax error ({s.syntax_error.splitlines()[0]})" if not s.syntax_ok and
                  s.syntax_error else s.error if not s.defines_entry else
                  f"{s.passed}/{s.total} tests" + (f", {s.agreement} agree" if s.total else ""))
        lines.append(f"- {s.id}: {status}")
    if chosen is None:
        lines.append("No candidate is usable.")
    else:
        verdict = "approved" if approved else "not approved"
        lines.append(f"Chosen: {chosen.id} ({chosen.passed}/{chosen.total} tests); {verdict}.")
    if comment:
        lines.append(f"Reviewer's comment: {comment}")
    return "\n".join(lines)


def _feedback(chosen: CandidateScore | None, spec: TaskSpec, tests: Sequence[TestCase],
              comment: str | None, verdict_ok: bool) -> str:
    """What the Coder should fix: the failing tests of the best candidate, as code."""
    if chosen is None:
        return ("No candidate compiled" + (f" and defined {spec.entry_point}()"
                                           if spec.entry_point else "") + ".")
    by_id = {t.id: t for t in tests}
    lines = []
    for o in [o for o in chosen.outcomes if not o.passed][:5]:
        t = by_id.get(o.id)
        if t is None:
            continue
        want = f" == {t.expected}" if t.expected is not None else ""
        lines.append(f"{t.expr}{want} failed: {o.error or 'wrong result'}")
    if chosen.error and not chosen.outcomes:
        lines.append(chosen.error)
    if not verdict_ok and comment:
        lines.append(comment)
    return "\n".join(lines)
