"""The Coder (tier 1): writes the planned files, several candidates at a time.

A small model's single answer is usually wrong, but among a few samples one is
sometimes right, and the Reviewer can tell which by running its tests.  So each
round the Coder draws ``samples`` candidates in several prompt *shapes* (see
:class:`Coder`): in the first round the greedy answer of each shape plus
samples at ``temperature`` with distinct seeds, in later rounds only samples
(a greedy answer would repeat itself), with the Reviewer's feedback in the
prompt.  Identical candidates are dropped.

How the model is asked depends on its kind:

* base models (the tier-0 Gemma 3 270M) *continue code*: a task that is a
  Python stub is completed as it is (the body follows the docstring), other
  tasks get a comment header (task, plan, file name) to continue from;
* chat models get the task, the plan, the file's current content and the
  feedback, and answer the whole file in a fenced block.

Files are written one after another in plan order (step by step); candidate
*k* is the *k*-th sample of every file.  Output cut by the repetition guard (a
model looping on one line) is trimmed back to the longest prefix that parses.
"""

from __future__ import annotations

import ast
import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Literal

from conclave.agents.agent import Agent
from conclave.agents.artifacts import Candidate, Plan
from conclave.agents.context import RunContext, gather_all
from conclave.agents.taskspec import TaskSpec, parse_task
from conclave.llm.streaming import RepetitionGuard
from conclave.llm.types import Message

#: where a base model's continuation of a stub ends: the next top-level statement
STUB_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n```",
              "\n# Task", "\n# Test"]
FILE_STOPS = ["\nif __name__", "\n```", "\n# Task:", "\n\n\n\n"]
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)

#: short solved functions written for this purpose (not taken from any benchmark): shown
#: before a stub they teach a base model the shape of an answer (a direct body right after
#: the docstring); each "primed" sample sees a different three, which varies the prompt
#: (and so the answer) even when decoding greedily
PRIMER_POOL = (
    '''def add(a: int, b: int) -> int:
    """Return the sum of a and b.
    >>> add(2, 3)
    5
    """
    return a + b
''',
    '''def count_vowels(text: str) -> int:
    """Count the vowels (a, e, i, o, u) in text, ignoring case.
    >>> count_vowels("Hello")
    2
    """
    return sum(1 for c in text.lower() if c in "aeiou")
''',
    '''def evens(numbers: list) -> list:
    """Keep the even numbers, in order.
    >>> evens([1, 2, 3, 4])
    [2, 4]
    """
    return [n for n in numbers if n % 2 == 0]
''',
    '''def reverse_words(sentence: str) -> str:
    """Reverse the order of the words in a sentence.
    >>> reverse_words("hello big world")
    'world big hello'
    """
    return " ".join(reversed(sentence.split()))
''',
    '''def is_sorted(items: list) -> bool:
    """Tell whether items are in non-decreasing order.
    >>> is_sorted([1, 2, 2, 5])
    True
    """
    return all(a <= b for a, b in zip(items, items[1:]))
''',
    '''def char_counts(text: str) -> dict:
    """Count how often each character occurs in text.
    >>> char_counts("aba")
    {'a': 2, 'b': 1}
    """
    counts = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    return counts
''',
    '''def clamp(x: float, low: float, high: float) -> float:
    """Limit x to the range from low to high.
    >>> clamp(12, 0, 10)
    10
    """
    return max(low, min(x, high))
''',
    '''def first_repeated(items: list):
    """Return the first item that occurs twice, or None.
    >>> first_repeated([3, 1, 3, 1])
    3
    """
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None
''',
)


def primer(variant: int) -> str:
    """Three solved functions from the pool; ``variant`` picks which three."""
    n = len(PRIMER_POOL)
    return "\n\n".join(PRIMER_POOL[(3 * variant + i) % n] for i in range(3)) + "\n\n"


#: the first variant, kept for callers that want one fixed primer
PRIMER = primer(0)

SYSTEM = (
    "You are the Coder of a small coding team. Write correct, simple Python that does "
    "exactly what the task asks, following the plan. Reply with the complete content of "
    "the requested file in one ```python code block and nothing else."
)


Shape = Literal["free", "primed", "return"]


class Coder:
    """Writes candidates; ``tier`` 1 by default.

    Args:
        samples: candidates per round (>= 1).
        temperature / top_p: sampling for the candidates that are not greedy.
        concurrency: model calls at once (the local server serves 2 by default).
        feedback_in_prompt: put the Reviewer's failing tests into base-model prompts
            in later rounds (chat models always get the feedback).
        shapes: how a base model is asked to complete a stub, cycled over the samples
            (see :meth:`sampling` for which are greedy):
            ``free`` the stub as it is; ``primed`` three short solved functions
            before it (a base model continues the style it was shown), another three
            for each primed sample; ``return`` the body started as ``return`` and
            ended at the line break (a one-expression answer: cheap, cannot ramble,
            but Gemma 3 270M mostly returns a constant that way, so it is off by
            default).  Other tasks and chat models always get ``free``.
    """

    name = "coder"

    def __init__(self, *, tier: int | None = 1, model: str | None = None, samples: int = 4,
                 temperature: float = 0.8, top_p: float = 0.95, concurrency: int = 2,
                 max_tokens: int = 384, feedback_in_prompt: bool = True,
                 shapes: Sequence[Shape] = ("free", "primed"),
                 repetition_guard: bool = True) -> None:
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        if not shapes or any(sh not in ("free", "primed", "return") for sh in shapes):
            raise ValueError(f"shapes must be some of free, primed, return; got {shapes!r}")
        self.tier, self.model = tier, model
        self.samples, self.temperature, self.top_p = samples, temperature, top_p
        self.concurrency = max(1, concurrency)
        self.max_tokens = max_tokens
        self.feedback_in_prompt = feedback_in_prompt
        self.shapes: tuple[Shape, ...] = tuple(shapes)
        self.repetition_guard = repetition_guard

    def sampling(self, round: int) -> list[tuple[Shape, float, int | None, int]]:
        """(shape, temperature, seed, primer variant) of each sample of a round.

        Shapes take turns.  In the first round ``free`` and ``return`` samples are
        greedy the first time and sampled after; ``primed`` samples stay greedy, each
        with another primer (the prompt varies, not the dice).  Later rounds sample.
        """
        plan: list[tuple[Shape, float, int | None, int]] = []
        counts: dict[str, int] = {}
        for k in range(self.samples):
            shape = self.shapes[k % len(self.shapes)]
            nth = counts.get(shape, 0)
            counts[shape] = nth + 1
            variant = (round - 1) * self.samples + nth
            greedy = round == 1 and (nth == 0 or shape == "primed")
            if greedy:
                plan.append((shape, 0.0, None, variant))
            else:
                plan.append((shape, self.temperature, round * 1000 + k, variant))
        return plan

    async def implement(self, ctx: RunContext, task: str, plan: Plan, *, round: int = 1,
                        feedback: str = "", existing: Mapping[str, str] | None = None,
                        ) -> list[Candidate]:
        spec = parse_task(task)
        existing = existing or {}
        agent = Agent(self.name, ctx, tier=self.tier, model=self.model,
                      max_tokens=self.max_tokens, top_p=self.top_p,
                      policies=[RepetitionGuard(span=48, repeats=3)]
                      if self.repetition_guard else [])
        base = agent.is_base_model()
        gate = asyncio.Semaphore(self.concurrency)
        settings = self.sampling(round)
        per_file: dict[str, list[tuple[str, str | None, bool]]] = {}
        for index, path in enumerate(plan.files):  # step by step, in plan order
            async def one(k: int, path: str = path, first: bool = index == 0
                          ) -> tuple[str, str | None, bool]:
                shape, temperature, seed, variant = settings[k]
                async with gate:
                    return await self._write(agent, spec, plan, path, base=base,
                                             entry_file=first, feedback=feedback,
                                             current=existing.get(path), shape=shape,
                                             variant=variant, temperature=temperature,
                                             seed=seed)
            per_file[path] = await gather_all(one(k) for k in range(self.samples))
        candidates: list[Candidate] = []
        seen: set[tuple[str, ...]] = set()
        for k in range(self.samples):
            files = {p: per_file[p][k][0] for p in plan.files}
            key = tuple(_normalise(files[p]) for p in plan.files)
            if key in seen:
                continue
            seen.add(key)
            cut = next((per_file[p][k][1] for p in plan.files if per_file[p][k][1]), None)
            candidates.append(Candidate(
                id=f"r{round}c{k}", round=round, sample=k, files=files,
                temperature=settings[k][1], seed=settings[k][2], cut=cut,
                salvaged=any(per_file[p][k][2] for p in plan.files)))
        return candidates

    async def _write(self, agent: Agent, spec: TaskSpec, plan: Plan, path: str, *, base: bool,
                     entry_file: bool, feedback: str, current: str | None, shape: Shape,
                     temperature: float, seed: int | None, variant: int = 0,
                     ) -> tuple[str, str | None, bool]:
        """One sample of one file: (content, why it was cut, whether it was salvaged)."""
        if base:
            lead, body, stops = self._base_prompt(spec, plan, path, entry_file=entry_file,
                                                  feedback=feedback, current=current,
                                                  shape=shape, variant=variant)
            one_line = stops == ["\n"]  # the "return" shape: one expression
            response = await agent.complete(prompt=lead + body, operation="implement",
                                            stop=stops, temperature=temperature, seed=seed,
                                            max_tokens=64 if one_line else None)
            code = body + response.text
        else:
            messages = [Message.system(SYSTEM),
                        Message.user(self._chat_prompt(spec, plan, path, feedback, current))]
            response = await agent.complete(messages, operation="implement",
                                            temperature=temperature, seed=seed)
            code = extract_code(response.text)
        code, salvaged = salvage(code.rstrip() + "\n")
        return code, response.stopped_by, salvaged

    def _feedback_block(self, feedback: str) -> str:
        lines = [ln for ln in feedback.strip().splitlines() if ln.strip()][:8]
        body = "\n".join(f"# {ln}" for ln in lines)
        return f"# A previous attempt was rejected by the reviewer:\n{body}\n\n"

    def _base_prompt(self, spec: TaskSpec, plan: Plan, path: str, *, entry_file: bool,
                     feedback: str, current: str | None, shape: Shape = "free",
                     variant: int = 0) -> tuple[str, str, list[str]]:
        """(lead, body, stops): the model sees lead + body; the file is body + its answer."""
        stub = entry_file and spec.stub is not None and current is None
        lead = primer(variant) if stub and shape == "primed" else ""
        if feedback and self.feedback_in_prompt:
            lead += self._feedback_block(feedback)
        if stub:
            assert spec.stub is not None
            if shape == "return":
                return lead, f"{spec.stub.rstrip()}\n{_body_indent(spec.stub)}return ", ["\n"]
            return lead, spec.stub.rstrip() + "\n", list(STUB_STOPS)
        header = _comment("Task: " + spec.text.strip())
        if plan.steps:
            header += "\n" + _comment("Plan:\n" + "\n".join(f"- {s}" for s in plan.steps))
        header += f"\n# File: {path}\n"
        if current is not None:
            return lead, current.rstrip() + "\n\n" + header + "\n", list(FILE_STOPS)
        return lead, header + "\n", list(FILE_STOPS)

    def _chat_prompt(self, spec: TaskSpec, plan: Plan, path: str, feedback: str,
                     current: str | None) -> str:
        parts = [f"Task:\n{spec.text.strip()}", "Plan:\n" + "\n".join(
            f"{i}. {s}" for i, s in enumerate(plan.steps, 1)),
            f"Write the file `{path}`" + (f" (the other files: {', '.join(plan.files)})"
                                          if len(plan.files) > 1 else "") + "."]
        if current is not None:
            parts.append(f"Its current content:\n```python\n{current}\n```")
        if feedback:
            parts.append(f"The reviewer rejected the previous attempt:\n{feedback.strip()}")
        return "\n\n".join(parts)


def _body_indent(stub: str) -> str:
    """The indentation of the stub's last function body (its docstring's), default 4 spaces."""
    for line in reversed(stub.rstrip().splitlines()):
        if line.strip() and line[0] in " \t":
            return line[: len(line) - len(line.lstrip())]
    return "    "


def _comment(text: str) -> str:
    return "\n".join(f"# {ln}".rstrip() for ln in text.splitlines())


def _normalise(code: str) -> str:
    return "\n".join(ln.rstrip() for ln in code.strip().splitlines() if ln.strip())


def extract_code(text: str) -> str:
    """The first fenced code block of a chat answer, or the whole answer."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def salvage(code: str) -> tuple[str, bool]:
    """``code`` if it parses, else its longest prefix (by lines) that does."""
    if _parses(code):
        return code, False
    lines = code.splitlines()
    for end in range(len(lines) - 1, 0, -1):
        prefix = "\n".join(lines[:end]).rstrip() + "\n"
        if _parses(prefix):
            return prefix, True
    return code, False


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True
