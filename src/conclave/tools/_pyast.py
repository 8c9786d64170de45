"""Python source analysis for the code workbench: summary, outline, syntax check.

Everything here reads source text with :mod:`ast` and :func:`compile`; no
code is ever imported or executed.  ``compile`` is used (on top of
``ast.parse``) because some errors only the compiler reports -- ``return``
outside a function, ``nonlocal`` at module level -- and it runs nothing.
"""

from __future__ import annotations

import ast
import warnings
from collections import Counter

from pydantic import BaseModel, Field


class TopLevelStatement(BaseModel):
    kind: str
    #: what it defines or imports, when that fits in a name
    name: str | None = None
    line: int
    end_line: int


class ParseSummary(BaseModel):
    language: str = "python"
    path: str | None = None
    lines: int
    total_nodes: int
    max_depth: int
    #: AST node type -> count, most frequent first
    node_counts: dict[str, int]
    top_level: list[TopLevelStatement]


class Symbol(BaseModel):
    #: "class", "function" or "method"
    kind: str
    name: str
    qualname: str
    line: int
    end_line: int
    signature: str
    decorators: list[str] = Field(default_factory=list)
    is_async: bool = False
    #: first line of the docstring
    docstring: str | None = None
    children: list[Symbol] = Field(default_factory=list)


class Outline(BaseModel):
    path: str | None = None
    module_docstring: str | None = None
    symbols: list[Symbol]


class SyntaxProblem(BaseModel):
    #: SyntaxError, IndentationError or TabError
    kind: str
    message: str
    #: 1-based line and column (columns count characters, not bytes)
    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None
    line_text: str
    caret: str


class SyntaxCheckWarning(BaseModel):
    category: str
    message: str
    line: int | None = None


class SyntaxCheck(BaseModel):
    valid: bool
    path: str | None = None
    lines: int
    error: SyntaxProblem | None = None
    #: the error as a compiler would print it: ``file:line:col: message``, the line, a caret
    rendered: str | None = None
    warnings: list[SyntaxCheckWarning] = Field(default_factory=list)


# --- summary ----------------------------------------------------------------------------


def summarize(tree: ast.Module, source: str, path: str | None) -> ParseSummary:
    counts: Counter[str] = Counter()
    max_depth = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        counts[type(node).__name__] += 1
        max_depth = max(max_depth, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    top = [TopLevelStatement(kind=_kind(stmt, i), name=_stmt_name(stmt), line=stmt.lineno,
                             end_line=stmt.end_lineno or stmt.lineno)
           for i, stmt in enumerate(tree.body)]
    return ParseSummary(path=path, lines=_line_count(source), total_nodes=sum(counts.values()),
                        max_depth=max_depth, node_counts=dict(counts.most_common()),
                        top_level=top)


def _kind(stmt: ast.stmt, index: int) -> str:
    if index == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
            and isinstance(stmt.value.value, str):
        return "Docstring"
    return type(stmt).__name__


def _stmt_name(stmt: ast.stmt) -> str | None:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return stmt.name
    if isinstance(stmt, ast.Import):
        return ", ".join(a.name for a in stmt.names)
    if isinstance(stmt, ast.ImportFrom):
        return "." * stmt.level + (stmt.module or "")
    if isinstance(stmt, ast.Assign):
        return _short(", ".join(ast.unparse(t) for t in stmt.targets))
    if isinstance(stmt, ast.AnnAssign | ast.AugAssign):
        return _short(ast.unparse(stmt.target))
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        return _short(ast.unparse(stmt.value.func))
    if isinstance(stmt, ast.If | ast.While):
        return _short(ast.unparse(stmt.test))
    return None


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _line_count(source: str) -> int:
    return len(source.splitlines())


# --- outline ----------------------------------------------------------------------------

_DefNode = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def outline(tree: ast.Module, path: str | None) -> Outline:
    return Outline(path=path, module_docstring=_first_line(ast.get_docstring(tree)),
                   symbols=_symbols(tree.body, prefix="", in_class=False))


def _symbols(body: list[ast.stmt], *, prefix: str, in_class: bool) -> list[Symbol]:
    out: list[Symbol] = []
    for node in _definitions(body):
        qualname = f"{prefix}{node.name}"
        if isinstance(node, ast.ClassDef):
            out.append(Symbol(
                kind="class", name=node.name, qualname=qualname, line=node.lineno,
                end_line=node.end_lineno or node.lineno, signature=_class_signature(node),
                decorators=[f"@{ast.unparse(d)}" for d in node.decorator_list],
                docstring=_first_line(ast.get_docstring(node)),
                children=_symbols(node.body, prefix=f"{qualname}.", in_class=True)))
        else:
            out.append(Symbol(
                kind="method" if in_class else "function", name=node.name, qualname=qualname,
                line=node.lineno, end_line=node.end_lineno or node.lineno,
                signature=function_signature(node),
                decorators=[f"@{ast.unparse(d)}" for d in node.decorator_list],
                is_async=isinstance(node, ast.AsyncFunctionDef),
                docstring=_first_line(ast.get_docstring(node)),
                children=_symbols(node.body, prefix=f"{qualname}.", in_class=False)))
    return out


def _definitions(body: list[ast.stmt]) -> list[_DefNode]:
    """Defs and classes in a block, including those under if/try/with/for/while/match.

    ``if TYPE_CHECKING:`` blocks and ``try: ... except ImportError:`` fallbacks
    define real symbols; the bodies of defs themselves are not entered here.
    """
    found: list[_DefNode] = []
    for stmt in body:
        if isinstance(stmt, _DefNode):
            found.append(stmt)
            continue
        blocks: list[list[ast.stmt]] = []
        if isinstance(stmt, ast.If | ast.For | ast.AsyncFor | ast.While):
            blocks = [stmt.body, stmt.orelse]
        elif isinstance(stmt, ast.With | ast.AsyncWith):
            blocks = [stmt.body]
        elif isinstance(stmt, ast.Try | ast.TryStar):
            blocks = [stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody]
        elif isinstance(stmt, ast.Match):
            blocks = [case.body for case in stmt.cases]
        for block in blocks:
            found.extend(_definitions(block))
    return found


def function_signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}"


def _class_signature(node: ast.ClassDef) -> str:
    parts = [ast.unparse(b) for b in node.bases]
    parts += [ast.unparse(k) for k in node.keywords]
    return f"class {node.name}({', '.join(parts)})" if parts else f"class {node.name}"


def _first_line(doc: str | None) -> str | None:
    if not doc:
        return None
    for line in doc.strip().splitlines():
        if line.strip():
            return line.strip()
    return None


# --- syntax check -----------------------------------------------------------------------


def check_syntax(source: str, filename: str, path: str | None) -> SyntaxCheck:
    """Parse and compile ``source`` (nothing runs); report the first error precisely."""
    lines = _line_count(source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tree = compile(source, filename, "exec", ast.PyCF_ONLY_AST, dont_inherit=True)
            compile(tree, filename, "exec", dont_inherit=True)
        except SyntaxError as exc:
            problem = _problem(exc, source)
            rendered = (f"{filename}:{problem.line}:{problem.column}: {problem.kind}: "
                        f"{problem.message}\n    {problem.line_text}\n    {problem.caret}")
            return SyntaxCheck(valid=False, path=path, lines=lines, error=problem,
                               rendered=rendered, warnings=_warnings(caught))
        except (ValueError, RecursionError, MemoryError) as exc:
            problem = _problem(SyntaxError(str(exc)), source)
            return SyntaxCheck(valid=False, path=path, lines=lines, error=problem,
                               rendered=f"{filename}:{problem.line}:{problem.column}: "
                                        f"{problem.message}")
    return SyntaxCheck(valid=True, path=path, lines=lines, warnings=_warnings(caught))


def _problem(exc: SyntaxError, source: str) -> SyntaxProblem:
    src_lines = source.splitlines()
    line, column = exc.lineno, exc.offset
    if line is None:  # null bytes and the like carry no position: find it ourselves
        idx = source.find("\x00")
        idx = max(idx, 0)
        line = source.count("\n", 0, idx) + 1
        column = idx - (source.rfind("\n", 0, idx) + 1) + 1
    column = column or 1
    text = src_lines[line - 1] if 0 < line <= len(src_lines) else (exc.text or "").rstrip("\n")
    end_line, end_column = exc.end_lineno, exc.end_offset
    width = 1
    if end_line == line and end_column and end_column > column:
        width = end_column - column
    pad = "".join(ch if ch == "\t" else " " for ch in text[: column - 1])
    return SyntaxProblem(kind=type(exc).__name__, message=exc.msg or str(exc), line=line,
                         column=column, end_line=end_line,
                         end_column=end_column if end_column else None,
                         line_text=text.replace("\x00", "\\x00"), caret=pad + "^" * width)


def _warnings(caught: list[warnings.WarningMessage]) -> list[SyntaxCheckWarning]:
    return [SyntaxCheckWarning(category=w.category.__name__, message=str(w.message),
                               line=w.lineno or None) for w in caught]
