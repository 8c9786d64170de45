"""What a task statement says, read without a model: stubs, the function to write, examples.

The Reviewer's tests come from here.  A task is either Python (a stub: a
function whose body is only a docstring, as in HumanEval), prose with a fenced
Python block, or plain prose.  Examples are taken from two forms:

* doctest lines in a docstring (``>>> f(1)`` followed by its output);
* statement lines that show a call and its result with an arrow or equality:
  ``f(1) == 2``, ``f(1) ➞ 2``, ``f(1) => 2``, ``f(1) -> 2``, ``f(1) = 2``,
  ``f(1) returns 2``, ``f(1) should return 2``, ``f(1) # => 2``.

Only calls whose arguments are Python literals and whose result is a literal
become tests (a guessed-at test that is wrong would reject correct code).  The
tests are derived from the statement alone: nothing hidden is ever consulted.
"""

from __future__ import annotations

import ast
import doctest
import inspect
import io
import re
import tokenize
from typing import Any

from pydantic import BaseModel, Field

from conclave.agents.sandbox import TestCase

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_ARROWS = re.compile(
    r"^\s*(?:#\s*)?(?:==>|=>|==|➞|->|→|=|returns?|should\s+return|is)\s*(?:#\s*)?", re.IGNORECASE)
_LOWER_BOOL = re.compile(r"\b(true|false|none)\b")


class TaskSpec(BaseModel):
    """A task statement as the agents use it."""

    text: str
    #: Python source of the stub the Coder completes, when the task holds one
    stub: str | None = None
    #: the function the task asks for (the last stub, or the function the examples call)
    entry_point: str | None = None
    #: its ``def`` line, e.g. ``def add(a: int, b: int) -> int:``
    signature: str | None = None
    #: the docstring of the entry point, if any
    docstring: str | None = None
    tests: list[TestCase] = Field(default_factory=list)


def parse_task(text: str) -> TaskSpec:
    """Find the stub, the entry point and the examples of a task statement."""
    stub = _python_source(text)
    entry = signature = docstring = None
    if stub is not None:
        tree = ast.parse(stub)
        stubs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                 and _is_stub(n)]
        funcs = stubs or [n for n in tree.body
                          if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        if funcs:
            target = funcs[-1]
            entry = target.name
            docstring = _raw_docstring(stub, target)
            signature = _def_line(stub, target)
        if not stubs:
            stub = None  # complete code, not something to fill in
    tests: list[TestCase] = []
    if docstring:
        tests += doctest_tests(docstring)
    tests += statement_tests(text, entry)
    if entry is None and tests:
        entry = _callee(tests[0].expr)
    return TaskSpec(text=text, stub=stub, entry_point=entry, signature=signature,
                    docstring=docstring, tests=_dedupe(tests))


def _python_source(text: str) -> str | None:
    """The task itself if it is Python, else its first fenced block that parses."""
    if _parses(text) and re.search(r"^\s*(def|async def|class)\s", text, re.MULTILINE):
        return text
    for block in _FENCE.findall(text):
        if _parses(block) and re.search(r"^\s*(def|async def)\s", block, re.MULTILINE):
            return block
    return None


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def _is_stub(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A body of only a docstring, ``pass`` or ``...``: something to implement."""
    for stmt in fn.body:
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and (
                isinstance(stmt.value.value, str) or stmt.value.value is Ellipsis):
            continue
        return False
    return True


def _raw_docstring(source: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The docstring as written (escapes kept), so ``>>> f("a\\nb")`` stays one line."""
    if not fn.body or not isinstance(fn.body[0], ast.Expr):
        return None
    node = fn.body[0].value
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        return None
    segment = ast.get_source_segment(source, node)
    if segment is None:
        return ast.get_docstring(fn)
    body = re.sub(r"^[rRuUbBfF]*('\'\'|\"\"\"|'|\")", "", segment)
    body = re.sub(r"('\'\'|\"\"\"|'|\")$", "", body)
    return inspect.cleandoc(body)


def _def_line(source: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    lines = source.splitlines()
    end = fn.body[0].lineno - 1 if fn.body else fn.lineno
    header = "\n".join(lines[fn.lineno - 1:end]).strip()
    return header or lines[fn.lineno - 1].strip()


# --- examples -----------------------------------------------------------------------


def doctest_tests(docstring: str) -> list[TestCase]:
    """Tests from ``>>>`` examples; statements without output become setup for later ones."""
    try:
        examples = doctest.DocTestParser().get_examples(docstring)
    except ValueError:
        return []
    tests: list[TestCase] = []
    setup: list[str] = []
    for ex in examples:
        source = ex.source.strip()
        want = ex.want.strip()
        if not want:
            compared = _compared_call(source)
            if compared is not None:
                # ">>> f(1) == 2" with no output line: the comparison is the example
                tests.append(TestCase(id=f"doc{len(tests) + 1}", expr=compared[0],
                                      expected=compared[1], setup="\n".join(setup),
                                      source="docstring"))
            elif _parses(source):
                setup.append(source)
            continue
        if want.startswith("Traceback") or not _is_expression(source):
            continue
        expected = _literal_source(want)
        if expected is None:
            continue
        tests.append(TestCase(id=f"doc{len(tests) + 1}", expr=source, expected=expected,
                              setup="\n".join(setup), source="docstring"))
    return tests


def _compared_call(source: str) -> tuple[str, str] | None:
    """``f(1) == 2`` as ``("f(1)", "2")`` when the right side is a literal."""
    try:
        node = ast.parse(source, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1
            and isinstance(node.ops[0], ast.Eq) and isinstance(node.left, ast.Call)):
        return None
    expected = ast.get_source_segment(source, node.comparators[0])
    call = ast.get_source_segment(source, node.left)
    if expected is None or call is None or _literal_source(expected) is None:
        return None
    return call, expected


def statement_tests(text: str, entry: str | None = None) -> list[TestCase]:
    """Tests from lines like ``f(1, 2) ➞ 3`` (see the module docstring for the forms).

    With ``entry`` only calls of that function count; without, any call does.
    """
    tests: list[TestCase] = []
    name = re.escape(entry) if entry else r"[A-Za-z_]\w*"
    for match in re.finditer(rf"(?<![\w.>])({name})\(", text):
        call = _balanced_call(text, match.start(1), match.end(1))
        if call is None:
            continue
        expr, end = call
        line_start = text.rfind("\n", 0, match.start()) + 1
        before = text[line_start:match.start()].strip()
        if before.startswith(("def ", ">>>", "async def")) or before.endswith(("def", ".")):
            continue
        rest = text[end:text.find("\n", end) if "\n" in text[end:] else len(text)]
        arrow = _ARROWS.match(rest)
        if arrow is None or not _literal_args(expr):
            continue
        remainder = rest[arrow.end():]
        if re.search(r"(?<![=<>!])=(?!=)", remainder):
            # "f(x) -> 19 - 5 - 6 = 8": the value is what follows the last "="
            remainder = re.split(r"(?<![=<>!])=(?!=)", remainder)[-1]
        expected = _leading_literal(remainder)
        if expected is None:
            continue
        tests.append(TestCase(id=f"st{len(tests) + 1}", expr=expr, expected=expected,
                              source="statement"))
    return tests


def _balanced_call(text: str, start: int, paren: int) -> tuple[str, int] | None:
    """``name(...)`` from ``start`` with balanced brackets (outside strings), and its end."""
    depth = 0
    quote: str | None = None
    i = paren
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                expr = " ".join(text[start:i + 1].split())
                return (expr, i + 1) if _is_expression(expr) else None
        elif c == "\n" and depth == 0:
            return None
        i += 1
    return None


def _is_expression(source: str) -> bool:
    try:
        ast.parse(source, mode="eval")
    except (SyntaxError, ValueError):
        return False
    return True


def _literal_args(expr: str) -> bool:
    """Every argument of the call is a literal (``f(a)`` with an undefined ``a`` is not a test)."""
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return False
    if not isinstance(node, ast.Call):
        return False
    try:
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            ast.literal_eval(arg)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _literal_source(text: str) -> str | None:
    """``text`` as the source of a literal value, or None (``true`` is read as ``True``)."""
    for candidate in (text, _LOWER_BOOL.sub(lambda m: m.group(1).capitalize(), text)):
        try:
            value: Any = ast.literal_eval(candidate)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        del value
        return candidate
    return None


def _leading_literal(text: str) -> str | None:
    """The longest literal at the start of ``text``, ending where words or punctuation do.

    ``'No' (the name should ...)`` gives ``'No'``; ``""aaa"`` gives nothing, since a
    literal glued to more text is a typo in the statement, not an example.
    """
    text = text.strip()
    if not text:
        return None
    ends: list[int] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER,
                            tokenize.COMMENT):
                break
            ends.append(tok.end[1])
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    for end in sorted(set(ends), reverse=True):
        after = text[end:end + 1]
        if after and not (after.isspace() or after in ".,;#"):
            continue
        found = _literal_source(text[:end].strip().rstrip(".,;").strip())
        if found is not None:
            return found
    return None


def _callee(expr: str) -> str | None:
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None
    return node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
        else None


def _dedupe(tests: list[TestCase]) -> list[TestCase]:
    seen: set[tuple[str, str | None, str]] = set()
    out: list[TestCase] = []
    for t in tests:
        key = (t.expr.replace(" ", ""), (t.expected or "").replace(" ", ""), t.setup)
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
    return out
