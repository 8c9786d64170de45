"""What the Planner, Coder and Reviewer hand each other over the bus.

Every message is a pydantic model sent as JSON, so the roles can run in one
process (in-process bus) or in several (NATS) without changing.  Replies carry
the step records of the work done, so the side that started the run can tally
usage and cost even when the work happened in another process.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, Field, field_validator

from conclave.agents.events import StepRecord
from conclave.agents.sandbox import TestCase, TestOutcome
from conclave.errors import InvalidRequest

_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,120}$")


def check_path(path: str) -> str:
    """A relative POSIX path that stays inside its root (no ``..``, no absolute paths)."""
    p = PurePosixPath(path)
    if not _PATH.match(path) or p.is_absolute() or ".." in p.parts or not p.parts:
        raise InvalidRequest(f"unsafe or invalid file path {path!r}",
                             hint="use a relative path like 'pkg/module.py' without '..'")
    return str(p)


def module_name(path: str) -> str:
    """``pkg/mod.py`` -> ``pkg.mod`` (``pkg/__init__.py`` -> ``pkg``)."""
    parts = list(PurePosixPath(path).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class Plan(BaseModel):
    summary: str
    steps: list[str] = Field(default_factory=list)
    #: the files to write, relative paths; the first holds the entry point
    files: list[str] = Field(default_factory=list)

    @field_validator("files")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        return [check_path(p) for p in v]


class Candidate(BaseModel):
    """One attempt at the files of the plan."""

    id: str
    round: int
    sample: int
    files: dict[str, str]
    temperature: float | None = None
    seed: int | None = None
    #: why generation was cut early (a stream policy), if it was
    cut: str | None = None
    #: trailing lines were dropped so the code parses
    salvaged: bool = False


class CandidateScore(BaseModel):
    id: str
    syntax_ok: bool
    syntax_error: str | None = None
    #: whether some file defines the task's entry point (True when there is none)
    defines_entry: bool = True
    passed: int = 0
    total: int = 0
    outcomes: list[TestOutcome] = Field(default_factory=list)
    error: str | None = None
    #: how many candidates behaved the same way on the tests (itself included)
    agreement: int = 0
    max_complexity: int | None = None


class Review(BaseModel):
    approved: bool
    #: id of the candidate the Reviewer picked (None when none was usable)
    chosen: str | None = None
    summary: str
    tests: list[TestCase] = Field(default_factory=list)
    scores: list[CandidateScore] = Field(default_factory=list)
    #: what the Coder should fix next round
    feedback: str = ""
    #: the model's own comment, when the Reviewer's model wrote one
    comment: str | None = None
    #: outline and complexity of the chosen candidate (code workbench output)
    checks: dict[str, Any] = Field(default_factory=dict)


class RoleReply(BaseModel):
    """The envelope of every role's reply: a result or an error, and the steps it took."""

    ok: bool = True
    result: dict[str, Any] = Field(default_factory=dict)
    error_type: str | None = None
    error: str | None = None
    stopped_by: str | None = None
    steps: list[StepRecord] = Field(default_factory=list)
