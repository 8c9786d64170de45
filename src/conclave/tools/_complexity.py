"""McCabe cyclomatic complexity per function, from the AST.

The complexity of a function is 1 plus one for each decision point in its
body -- each place where control can go two ways:

====================================  =====  =========================================
construct                             adds   why
====================================  =====  =========================================
``if`` / ``elif``                     +1     a branch (``elif`` is a nested ``if``)
conditional expression ``a if c else b``  +1  a branch inside an expression
``for`` / ``async for`` / ``while``   +1     loop again or leave
``else`` on a loop or ``try``         0      no new decision: it runs on the path that
                                             is already counted (no ``break``/no error)
``except`` clause                     +1     each handler is another way out of ``try``
``finally``, ``with``, ``try``        0      always run: nothing is decided
``and`` / ``or``                      +1 per extra operand: ``a and b or c`` is +2
                                             (short-circuiting decides per operand)
comprehension                         +1 per ``for``, +1 per ``if`` clause
``match``: each ``case``              +1     except a final irrefutable ``case _:`` /
                                             ``case x:``, which is the ``else``
``case ... if guard``                 +1     the guard is one more decision
``assert``                            +1     it raises or passes
``lambda`` body                       counted in the enclosing function
nested ``def`` / ``class``            0      reported as their own entries
====================================  =====  =========================================

This matches radon's ``cc`` except that radon adds one for an ``else`` on a
loop or ``try`` and does not count ``case`` guards.  Decorators and default
values run in the enclosing scope and are not part of the function.
"""

from __future__ import annotations

import ast

from pydantic import BaseModel

from conclave.tools._pyast import function_signature

_FuncNode = ast.FunctionDef | ast.AsyncFunctionDef


class FunctionComplexity(BaseModel):
    #: dotted path: ``Class.method``, ``outer.inner``
    name: str
    kind: str
    signature: str
    line: int
    end_line: int
    complexity: int
    #: radon's letter grade: A 1-5, B 6-10, C 11-20, D 21-30, E 31-40, F 41+
    rank: str


class ComplexityReport(BaseModel):
    path: str | None = None
    #: functions at or above ``min_complexity``, most complex first
    functions: list[FunctionComplexity]
    #: over all functions in the file, not just those listed
    function_count: int
    total: int
    average: float
    maximum: int


def rank(complexity: int) -> str:
    for limit, letter in ((5, "A"), (10, "B"), (20, "C"), (30, "D"), (40, "E")):
        if complexity <= limit:
            return letter
    return "F"


def function_complexity(node: _FuncNode) -> int:
    """The cyclomatic complexity of one function (its body only; see the module table)."""
    counter = _Counter()
    for stmt in node.body:
        counter.visit(stmt)
    return counter.count


class _Counter(ast.NodeVisitor):
    def __init__(self) -> None:
        self.count = 1

    # nested scopes are their own entries
    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        return

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        return

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        return

    def _plus_one(self, node: ast.AST) -> None:
        self.count += 1
        self.generic_visit(node)

    visit_If = visit_IfExp = visit_For = visit_AsyncFor = visit_While = _plus_one
    visit_ExceptHandler = visit_Assert = _plus_one

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        self.count += len(node.values) - 1
        self.generic_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self.count += 1 + len(node.ifs)
        self.generic_visit(node)

    def visit_Match(self, node: ast.Match) -> None:
        for i, case in enumerate(node.cases):
            last = i == len(node.cases) - 1
            if not (last and _irrefutable(case.pattern)):
                self.count += 1
            if case.guard is not None:
                self.count += 1
        self.generic_visit(node)


def _irrefutable(pattern: ast.pattern) -> bool:
    if isinstance(pattern, ast.MatchAs):
        return pattern.pattern is None or _irrefutable(pattern.pattern)
    if isinstance(pattern, ast.MatchOr):
        return any(_irrefutable(p) for p in pattern.patterns)
    return False


def complexity_report(tree: ast.Module, path: str | None, *,
                      min_complexity: int = 1) -> ComplexityReport:
    entries: list[FunctionComplexity] = []

    def walk(body: list[ast.stmt] | list[ast.AST], prefix: str, in_class: bool) -> None:
        for node in body:
            for child in _scopes(node):
                if isinstance(child, ast.ClassDef):
                    walk(child.body, f"{prefix}{child.name}.", True)
                    continue
                value = function_complexity(child)
                entries.append(FunctionComplexity(
                    name=f"{prefix}{child.name}", kind="method" if in_class else "function",
                    signature=function_signature(child), line=child.lineno,
                    end_line=child.end_lineno or child.lineno, complexity=value,
                    rank=rank(value)))
                walk(child.body, f"{prefix}{child.name}.", False)

    walk(tree.body, "", False)
    values = [e.complexity for e in entries]
    shown = sorted((e for e in entries if e.complexity >= min_complexity),
                   key=lambda e: (-e.complexity, e.line))
    return ComplexityReport(
        path=path, functions=shown, function_count=len(values), total=sum(values),
        average=round(sum(values) / len(values), 2) if values else 0.0,
        maximum=max(values, default=0))


def _scopes(node: ast.AST) -> list[_FuncNode | ast.ClassDef]:
    """The defs and classes at ``node`` or nested in its non-scope children."""
    if isinstance(node, _FuncNode | ast.ClassDef):
        return [node]
    found: list[_FuncNode | ast.ClassDef] = []
    for child in ast.iter_child_nodes(node):
        found.extend(_scopes(child))
    return found
