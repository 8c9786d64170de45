"""The Planner (tier 3): a task in, a short plan and the files to write out.

The plan is one JSON object decoded under a schema (constrained decoding where
the model supports it), so even the tier-0 base model returns a well-formed
plan; file names are constrained to safe relative Python paths by a pattern.
What a weak model still gets wrong is repaired from the task itself: a task
that is a Python stub is written to one file, and a plan without usable
files gets ``<entry point>.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from conclave.agents.agent import Agent
from conclave.agents.artifacts import Plan, check_path
from conclave.agents.context import RunContext
from conclave.agents.taskspec import TaskSpec, parse_task
from conclave.errors import InvalidRequest
from conclave.llm.types import Message, ResponseFormat

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "minLength": 8, "maxLength": 120},
        "steps": {"type": "array", "minItems": 1, "maxItems": 4,
                  "items": {"type": "string", "minLength": 8, "maxLength": 100}},
        "files": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": {"type": "string", "pattern": "^[a-z_][a-z0-9_]{0,40}\\.py$"}},
    },
    "required": ["summary", "steps", "files"],
    "additionalProperties": False,
}

EXAMPLE_TASK = ("Write a function largest(a, b, c) that returns the largest of three "
                "numbers.")
EXAMPLE_PLAN: dict[str, Any] = {
    "summary": "Return the largest of three numbers",
    "steps": ["Compare a with b and keep the larger", "Compare it with c and return the larger"],
    "files": ["largest.py"],
}

SYSTEM = (
    "You are the Planner of a small coding team. Read the task and plan the work for the "
    "Coder: a one-line summary, one to four short concrete steps, and the Python files to "
    "write. Answer with one JSON object with the keys summary, steps and files.\n\n"
    # One worked example: small base models follow a shown pattern far better than an
    # instruction (without it Gemma 3 270M fills the schema with "1").
    f"Example task: {EXAMPLE_TASK}\n"
    f"Example plan: {json.dumps(EXAMPLE_PLAN)}"
)


class Planner:
    """Plans a task; ``tier`` 3 by default (privacy mode maps it to tier 0)."""

    name = "planner"

    def __init__(self, *, tier: int | None = 3, model: str | None = None,
                 max_tokens: int = 256) -> None:
        self.tier, self.model, self.max_tokens = tier, model, max_tokens

    async def plan(self, ctx: RunContext, task: str, *,
                   repo_files: Sequence[str] = ()) -> Plan:
        spec = parse_task(task)
        agent = Agent(self.name, ctx, tier=self.tier, model=self.model,
                      max_tokens=self.max_tokens, temperature=0.0)
        constrained = all(m.supports_json_schema for m in agent.candidates())
        listing = ""
        if repo_files:
            shown = "\n".join(f"- {f}" for f in list(repo_files)[:100])
            listing = f"\n\nPython files already in the repository:\n{shown}"
        messages = [Message.system(SYSTEM), Message.user(f"Task:\n{task.strip()}{listing}\n\n"
                                                         "Plan as JSON:")]
        response = await agent.complete(
            messages, operation="plan",
            response_format=ResponseFormat(type="json_schema", name="plan", schema=PLAN_SCHEMA)
            if constrained else None)
        return repair_plan(_parse(response.text), spec, repo_files)


def _parse(text: str) -> dict[str, Any]:
    raw = text.strip()
    for candidate in (raw, raw[raw.find("{"):raw.rfind("}") + 1]):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return {}


def repair_plan(data: dict[str, Any], spec: TaskSpec, repo_files: Sequence[str] = ()) -> Plan:
    """A usable plan from whatever the model returned, never an invented one.

    Keeps the model's summary, steps and safe ``.py`` paths; fills only what is
    missing or unusable from the task statement itself.
    """
    data = _without_echo(data, spec)
    summary = data.get("summary") if isinstance(data.get("summary"), str) else ""
    summary = " ".join(summary.split()) or _task_summary(spec)
    steps = [" ".join(s.split()) for s in data.get("steps") or [] if isinstance(s, str)]
    steps = [s for s in steps if s][:5]
    files: list[str] = []
    for f in data.get("files") or []:
        if not isinstance(f, str) or not f.endswith(".py"):
            continue
        try:
            path = check_path(f)
        except InvalidRequest:
            continue
        if path not in files:
            files.append(path)
    if spec.entry_point:
        # The entry point must be in the first file; a file the repo already has that
        # defines it is the natural place, else the model's first, else <entry>.py.
        owner = next((f for f in repo_files if f in files), None)
        files = [owner or (files[0] if files else f"{spec.entry_point}.py")]
        if not steps:
            steps = [f"Implement {spec.signature or spec.entry_point} in {files[0]}"]
    elif not files:
        files = ["solution.py"]
    if not steps:
        steps = [f"Write {f}" for f in files]
    return Plan(summary=summary, steps=steps, files=files)


def _norm(text: object) -> str:
    return " ".join(str(text).lower().split()).strip(" .")


def _without_echo(data: dict[str, Any], spec: TaskSpec) -> dict[str, Any]:
    """``data`` without what the model copied from the prompt's worked example.

    A small base model often answers with the example plan itself (Gemma 3 270M
    planned "Return the largest of three numbers" for most HumanEval stubs); a
    copied summary, step or file name says nothing about this task and would
    mislead the Coder and the reader, so it is dropped and rebuilt from the task.
    Parts that merely share words with the example stay.  When the task *is* the
    example, nothing is dropped.
    """
    if _norm(EXAMPLE_TASK) in _norm(spec.text):
        return data
    example = {_norm(EXAMPLE_PLAN["summary"]), *map(_norm, EXAMPLE_PLAN["steps"])}
    out = dict(data)
    if _norm(out.get("summary", "")) in example:
        out.pop("summary")
    if isinstance(out.get("steps"), list):
        out["steps"] = [s for s in out["steps"] if _norm(s) not in example]
    if isinstance(out.get("files"), list):
        out["files"] = [f for f in out["files"] if f not in EXAMPLE_PLAN["files"]]
    return out


def _task_summary(spec: TaskSpec) -> str:
    """The task's own first sentence: its docstring's for a stub, else its first line."""
    if spec.docstring:
        text = " ".join(spec.docstring.split(">>>")[0].split())
        first = text.split(". ")[0].strip().rstrip(".")
        if first:
            return first[:200]
    return next((ln.strip() for ln in spec.text.splitlines() if ln.strip()), "the task")[:200]

