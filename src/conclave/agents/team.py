"""The Planner / Coder / Reviewer pipeline, coordinated over the event bus.

:meth:`Team.run` is the orchestrator: it asks the Planner for a plan, then each
round asks the Coder for candidates and the Reviewer for a verdict, feeding the
Reviewer's failing tests back to the Coder, until the Reviewer approves or
``max_rounds`` is reached.  Every ask is a bus request on a per-run topic::

    agents.<run>.planner.plan      {task, repo_files}            -> {plan}
    agents.<run>.coder.implement   {task, plan, round, feedback} -> {candidates}
    agents.<run>.reviewer.review   {task, plan, candidates, tests} -> {review}

By default the Team serves those topics itself (in-process bus, one process).
With a shared bus (NATS) the roles can run elsewhere: :func:`serve_roles`
subscribes a role to ``agents.*.<role>.<verb>`` in a queue group, and the
Team is built with ``serve_locally=False``.  Replies carry the step records of
the work, so usage and cost add up wherever the work ran; the run's budget is
in the accounting store, which every process shares.

The best candidate is carried from round to round (the Reviewer sees it next
to the new ones), so a later, worse round never replaces a better answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from conclave.accounting._common import usd
from conclave.agents.artifacts import Candidate, Plan, Review, RoleReply
from conclave.agents.coder import Coder
from conclave.agents.context import DeltaCallback, EventCallback, RunContext, RunStopped
from conclave.agents.planner import Planner
from conclave.agents.reviewer import Reviewer
from conclave.agents.sandbox import TestCase
from conclave.bus import Event, EventBus, Subscription
from conclave.errors import BudgetExceeded, ConclaveError, InvalidRequest
from conclave.gateway import Gateway
from conclave.llm.types import Usage

log = logging.getLogger("conclave.agents")

TeamStop = Literal["approved", "max_rounds", "budget", "error"]


class TeamResult(BaseModel):
    run_id: str
    task: str
    plan: Plan | None = None
    #: the chosen candidate's files (path -> content); empty when nothing usable was made
    files: dict[str, str] = Field(default_factory=dict)
    review: Review | None = None
    approved: bool = False
    rounds: int = 0
    stopped_by: TeamStop
    reason: str
    usage: Usage = Field(default_factory=Usage)
    cost_micros: int = 0
    steps: int = 0
    candidates: int = 0
    duration_s: float = 0.0
    #: one line per round: candidates made, the pick, its score, approved or not
    history: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def cost_usd(self) -> Decimal:
        return Decimal(self.cost_micros) / 1_000_000

    def to_json(self) -> dict[str, Any]:
        """The ``conclave run --json`` shape."""
        return {
            "run_id": self.run_id, "approved": self.approved, "rounds": self.rounds,
            "stopped_by": self.stopped_by, "reason": self.reason,
            "plan": self.plan.model_dump() if self.plan else None,
            "files": [{"path": p, "content": c} for p, c in self.files.items()],
            "review": self.review.model_dump(mode="json", exclude={"scores"})
            if self.review else None,
            "usage": self.usage.model_dump(), "cost_usd": float(self.cost_usd),
            "cost": usd(self.cost_micros), "cost_micros": self.cost_micros,
            "steps": self.steps, "candidates": self.candidates,
            "duration_s": round(self.duration_s, 3), "history": self.history,
        }


# -- the roles' bus side -------------------------------------------------------------------

Work = Callable[[RunContext, Mapping[str, Any]], Awaitable[dict[str, Any]]]


def planner_work(planner: Planner) -> Work:
    async def work(ctx: RunContext, p: Mapping[str, Any]) -> dict[str, Any]:
        plan = await planner.plan(ctx, p["task"], repo_files=p.get("repo_files") or [])
        return {"plan": plan.model_dump()}
    return work


def coder_work(coder: Coder) -> Work:
    async def work(ctx: RunContext, p: Mapping[str, Any]) -> dict[str, Any]:
        cands = await coder.implement(ctx, p["task"], Plan.model_validate(p["plan"]),
                                      round=int(p.get("round", 1)),
                                      feedback=p.get("feedback") or "",
                                      existing=p.get("existing") or {})
        return {"candidates": [c.model_dump() for c in cands]}
    return work


def reviewer_work(reviewer: Reviewer) -> Work:
    async def work(ctx: RunContext, p: Mapping[str, Any]) -> dict[str, Any]:
        tests = p.get("tests")
        review = await reviewer.review(
            ctx, p["task"], Plan.model_validate(p["plan"]),
            [Candidate.model_validate(c) for c in p["candidates"]],
            tests=[TestCase.model_validate(t) for t in tests] if tests is not None else None,
            repo=Path(p["repo"]) if p.get("repo") else None)
        return {"review": review.model_dump(mode="json")}
    return work


async def handle(ctx: RunContext, agent: str, work: Work, payload: Mapping[str, Any]
                 ) -> dict[str, Any]:
    """Run one role's work and wrap it in a :class:`RoleReply` (errors become replies).

    A failure is a reply, not an exception: the bus would redeliver an exception,
    and repeating a model call that failed for budget or bad input only costs more.
    """
    before = {s.id for s in ctx.steps}
    try:
        result = await work(ctx, payload)
        reply = RoleReply(result=result)
    except (BudgetExceeded, RunStopped) as exc:
        reply = RoleReply(ok=False, error_type=exc.code, error=str(exc), stopped_by="budget"
                          if isinstance(exc, BudgetExceeded) or ctx.stopped_by == "budget"
                          else "error")
    except ConclaveError as exc:
        reply = RoleReply(ok=False, error_type=exc.code, error=str(exc))
    except Exception as exc:  # a bug in a role: report it to the orchestrator, once
        log.exception("agents: %s failed", agent)
        reply = RoleReply(ok=False, error_type=type(exc).__name__, error=str(exc) or repr(exc))
    reply.steps = [s for s in ctx.steps if s.id not in before and s.agent == agent]
    return reply.model_dump(mode="json")


async def serve_roles(gateway: Gateway, bus: EventBus, *, planner: Planner | None = None,
                      coder: Coder | None = None, reviewer: Reviewer | None = None,
                      group: str = "conclave-agents") -> list[Subscription]:
    """Serve roles for every run on ``bus`` (``agents.*.<role>.<verb>``), in queue groups.

    For agents in separate processes: start this in a worker with a NATS bus and
    the same accounting store, and run the Team with ``serve_locally=False``.
    Each request gets its own :class:`RunContext` with the run id, privacy and
    workflow of the payload, so its steps are billed to the right run.
    """
    subs: list[Subscription] = []
    roles: list[tuple[str, str, Work]] = []
    if planner is not None:
        roles.append(("planner", "plan", planner_work(planner)))
    if coder is not None:
        roles.append(("coder", "implement", coder_work(coder)))
    if reviewer is not None:
        roles.append(("reviewer", "review", reviewer_work(reviewer)))
    for role, verb, work in roles:
        async def handler(event: Event, role: str = role, work: Work = work) -> dict[str, Any]:
            p = event.payload
            ctx = RunContext(gateway, bus, run_id=p["run_id"], workflow=p.get("workflow", "team"),
                             privacy=p.get("privacy"))
            return await handle(ctx, role, work, p)
        subs.append(await bus.subscribe(f"agents.*.{role}.{verb}", handler,
                                        group=f"{group}-{role}"))
    return subs


# -- the orchestrator ----------------------------------------------------------------------


class Team:
    """Planner, Coder and Reviewer working on one task at a time.

    Args:
        gateway: the one door to models; give it accounting for ledger records and budgets.
        bus: the event bus (default: a new in-process bus per run).
        max_rounds: implement/review rounds before giving up (>= 1).
        privacy: True maps every tier to tier 0 (local models only).
        serve_locally: serve the role topics in this process (False when workers
            started with :func:`serve_roles` do it).
        request_timeout_s: how long to wait for a role's reply.
    """

    def __init__(self, gateway: Gateway, bus: EventBus | None = None, *,
                 planner: Planner | None = None, coder: Coder | None = None,
                 reviewer: Reviewer | None = None, max_rounds: int = 3,
                 privacy: bool | None = None, workflow: str = "team",
                 serve_locally: bool = True, request_timeout_s: float = 1800.0,
                 on_delta: DeltaCallback | None = None,
                 on_event: EventCallback | None = None) -> None:
        if max_rounds < 1:
            raise InvalidRequest(f"max_rounds must be at least 1, got {max_rounds}")
        self.gateway, self.bus = gateway, bus
        self.planner = planner or Planner()
        self.coder = coder or Coder()
        self.reviewer = reviewer or Reviewer()
        self.max_rounds = max_rounds
        self.privacy = privacy
        self.workflow = workflow
        self.serve_locally = serve_locally
        self.request_timeout_s = request_timeout_s
        self.on_delta, self.on_event = on_delta, on_event

    async def run(self, task: str, *, repo: Path | None = None, run_id: str | None = None,
                  budget_usd: Decimal | str | None = None) -> TeamResult:
        """Plan, implement and review ``task``; never raises for budget or model failures.

        ``repo``: an existing project the files go into (its Python files are listed
        for the Planner, planned files that exist are given to the Coder, and the
        Reviewer's tests can import it).  ``budget_usd``: the run's spending limit.
        """
        if not task.strip():
            raise InvalidRequest("the task is empty", hint="describe what to build")
        if repo is not None and not await asyncio.to_thread(repo.is_dir):
            raise InvalidRequest(f"--repo {repo} is not a directory")
        ctx = RunContext(self.gateway, self.bus, run_id=run_id, workflow=self.workflow,
                         privacy=self.privacy, on_delta=self.on_delta, on_event=self.on_event)
        try:
            if budget_usd is not None:
                await ctx.set_budget(budget_usd)
            subs = await self._serve(ctx) if self.serve_locally else []
            try:
                result = await self._run(ctx, task, repo)
            finally:
                for sub in subs:
                    await sub.aclose()
            await ctx.publish("team.done", {k: v for k, v in result.to_json().items()
                                            if k not in ("files", "review")})
            return result
        finally:
            await ctx.aclose()

    async def _serve(self, ctx: RunContext) -> list[Subscription]:
        subs = []
        for role, verb, work in (("planner", "plan", planner_work(self.planner)),
                                 ("coder", "implement", coder_work(self.coder)),
                                 ("reviewer", "review", reviewer_work(self.reviewer))):
            async def handler(event: Event, role: str = role, work: Work = work
                              ) -> dict[str, Any]:
                return await handle(ctx, role, work, event.payload)
            subs.append(await ctx.bus.subscribe(ctx.topic(role, verb), handler))
        return subs

    async def _ask(self, ctx: RunContext, role: str, verb: str,
                   payload: dict[str, Any]) -> RoleReply:
        body = {"run_id": ctx.run_id, "workflow": ctx.workflow, "privacy": ctx.privacy,
                **payload}
        event = await ctx.bus.request(ctx.topic(role, verb), body,
                                      timeout=self.request_timeout_s)
        reply = RoleReply.model_validate(event.payload)
        ctx.merge(reply.steps)
        if reply.stopped_by == "budget":
            ctx.stop("budget", reply.error or "the run budget is spent")
        return reply

    async def _run(self, ctx: RunContext, task: str, repo: Path | None) -> TeamResult:
        t0 = time.perf_counter()
        result = TeamResult(run_id=ctx.run_id, task=task, stopped_by="error", reason="")

        def finish(by: TeamStop, reason: str) -> TeamResult:
            result.stopped_by, result.reason = by, reason
            result.usage, result.cost_micros = ctx.usage, ctx.cost_micros
            result.steps = len(ctx.steps)
            result.duration_s = time.perf_counter() - t0
            return result

        def failed(reply: RoleReply, role: str) -> TeamResult:
            if reply.stopped_by == "budget":
                return finish("budget", f"the {role} was stopped by the run budget: "
                                        f"{reply.error}")
            return finish("error", f"the {role} failed: {reply.error}")

        repo_files = await asyncio.to_thread(_python_files, repo) if repo else []
        reply = await self._ask(ctx, "planner", "plan", {"task": task, "repo_files": repo_files})
        if not reply.ok:
            return failed(reply, "planner")
        plan = result.plan = Plan.model_validate(reply.result["plan"])
        await ctx.publish("team.plan", {"plan": plan.model_dump()})
        existing = await asyncio.to_thread(_existing, repo, plan.files) if repo else {}
        tests: list[dict[str, Any]] | None = None
        best: Candidate | None = None
        feedback = ""
        for round_no in range(1, self.max_rounds + 1):
            result.rounds = round_no
            reply = await self._ask(ctx, "coder", "implement", {
                "task": task, "plan": plan.model_dump(), "round": round_no,
                "feedback": feedback, "existing": existing})
            if not reply.ok:
                return failed(reply, "coder")
            cands = [Candidate.model_validate(c) for c in reply.result["candidates"]]
            result.candidates += len(cands)
            pool = ([best] if best is not None else []) + cands
            reply = await self._ask(ctx, "reviewer", "review", {
                "task": task, "plan": plan.model_dump(),
                "candidates": [c.model_dump() for c in pool], "tests": tests,
                "repo": str(repo) if repo else None})
            if not reply.ok:
                return failed(reply, "reviewer")
            review = result.review = Review.model_validate(reply.result["review"])
            tests = [t.model_dump() for t in review.tests]
            chosen = next((c for c in pool if c.id == review.chosen), None)
            if chosen is not None:
                best = chosen
                result.files = dict(chosen.files)
            score = next((s for s in review.scores if s.id == review.chosen), None)
            entry = {"round": round_no, "candidates": len(cands), "chosen": review.chosen,
                     "passed": score.passed if score else 0,
                     "tests": score.total if score else len(review.tests),
                     "approved": review.approved}
            result.history.append(entry)
            await ctx.publish("team.round", entry)
            if review.approved:
                result.approved = True
                return finish("approved", f"the reviewer approved {review.chosen} in round "
                                          f"{round_no}")
            feedback = review.feedback
        return finish("max_rounds", f"not approved after {self.max_rounds} round(s); the "
                                    "best candidate so far is returned")


def _existing(repo: Path, files: list[str]) -> dict[str, str]:
    return {f: (repo / f).read_text() for f in files if (repo / f).is_file()}


def _python_files(repo: Path, limit: int = 500) -> list[str]:
    skip = {".git", ".venv", "venv", "node_modules", "__pycache__", ".tox", "build", "dist"}
    found: list[str] = []
    for path in sorted(repo.rglob("*.py")):
        rel = path.relative_to(repo)
        if any(part in skip or part.startswith(".") for part in rel.parts[:-1]):
            continue
        found.append(rel.as_posix())
        if len(found) >= limit:
            break
    return found

