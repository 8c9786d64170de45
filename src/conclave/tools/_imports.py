"""Import graph of Python files: modules, who imports whom, and cycles.

A file's module name follows Python's own rule: walk up from the file while
the directory holds an ``__init__.py`` (``src/conclave/llm/router.py`` is
``conclave.llm.router`` because ``src`` has none).  Relative imports are
resolved against the importing module's package.  ``from pkg import name``
points at ``pkg.name`` when that is a module, else at ``pkg``.

Imports are classed by where they run: ``module`` (at import time),
``function`` (inside a def or lambda, deferred) and ``type_checking``
(under ``if TYPE_CHECKING:``, never at run time).  Cycles are reported over
``module`` edges only: deferring an import into a function or a
``TYPE_CHECKING`` block is exactly how cycles are broken, so counting those
edges would report cycles that cannot bite.  Nothing is imported or run.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, Field

#: directories never scanned: environments, caches, VCS data, build output
SKIP_DIRS = {".git", ".hg", ".svn", ".venv", "venv", "env", "__pycache__", "node_modules",
             "site-packages", ".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache",
             "build", "dist", ".eggs"}


class ModuleNode(BaseModel):
    module: str
    path: str
    is_package: bool


class ImportEdge(BaseModel):
    source: str
    target: str
    #: "module", "function" or "type_checking"
    scope: str
    lines: list[int]


class UnresolvedImport(BaseModel):
    module: str
    line: int
    statement: str
    reason: str


class ScanError(BaseModel):
    path: str
    message: str


class ImportGraph(BaseModel):
    path: str
    modules: list[ModuleNode]
    #: imports of project modules: between the scanned files (for a single file: its
    #: imports of any module in its package tree)
    edges: list[ImportEdge]
    #: module -> modules it imports from outside the scanned set (stdlib, third party)
    external: dict[str, list[str]] = Field(default_factory=dict)
    unresolved: list[UnresolvedImport] = Field(default_factory=list)
    #: each cycle as a closed path ``[a, b, a]``, over module-scope imports
    cycles: list[list[str]] = Field(default_factory=list)
    errors: list[ScanError] = Field(default_factory=list)


def python_files(folder: Path, root: Path, limit: int) -> tuple[list[Path], list[ScanError]]:
    """``.py`` files under ``folder`` (skipping :data:`SKIP_DIRS` and hidden dirs).

    Symlinks that lead outside ``root`` are skipped and reported.
    """
    files: list[Path] = []
    errors: list[ScanError] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                             and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            p = Path(dirpath) / name
            real = p.resolve()
            if not real.is_relative_to(root):
                errors.append(ScanError(path=_rel(p, root),
                                        message="symlink leads outside the workbench root; "
                                                "skipped"))
                continue
            files.append(p)
            if len(files) > limit:
                raise ValueError(f"more than {limit} Python files under {_rel(folder, root)}")
    return files, errors


def module_name(file: Path, root: Path) -> str:
    """The dotted module name Python would give ``file`` (see the module docstring)."""
    parts = [] if file.name == "__init__.py" else [file.stem]
    d = file.parent
    while (d / "__init__.py").is_file() and (d == root or d.is_relative_to(root)):
        parts.insert(0, d.name)
        if d == root:
            break
        d = d.parent
    return ".".join(parts) or file.parent.name


def _rel(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix() or "."
    except ValueError:
        return p.as_posix()


def build_graph(files: list[Path], root: Path, display: str, *,
                read: Callable[[Path], str], known: dict[str, Path] | None = None,
                errors: list[ScanError] | None = None) -> ImportGraph:
    """Graph of ``files``; ``known`` adds modules that may be imported but are not scanned."""
    modules = {module_name(f, root): f for f in files}
    universe = {**(known or {}), **modules}
    errors = list(errors or [])
    edges: dict[tuple[str, str, str], list[int]] = {}
    external: dict[str, set[str]] = {}
    unresolved: list[UnresolvedImport] = []
    for name, file in sorted(modules.items()):
        try:
            tree = ast.parse(read(file), filename=str(file))
        except SyntaxError as exc:
            errors.append(ScanError(path=_rel(file, root),
                                    message=f"SyntaxError at line {exc.lineno}: {exc.msg}"))
            continue
        except (UnicodeDecodeError, OSError, ValueError) as exc:
            errors.append(ScanError(path=_rel(file, root), message=str(exc)))
            continue
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node, scope in _imports(tree):
            for target, problem in _targets(node, package, universe):
                stmt = ast.unparse(node)
                if problem:
                    unresolved.append(UnresolvedImport(module=name, line=node.lineno,
                                                       statement=stmt, reason=problem))
                elif target in universe:
                    if target != name:
                        edges.setdefault((name, target, scope), []).append(node.lineno)
                else:
                    external.setdefault(name, set()).add(target)
    edge_list = [ImportEdge(source=s, target=t, scope=sc, lines=sorted(set(ls)))
                 for (s, t, sc), ls in sorted(edges.items())]
    runtime = {(e.source, e.target) for e in edge_list if e.scope == "module"}
    return ImportGraph(
        path=display,
        modules=[ModuleNode(module=n, path=_rel(f, root), is_package=f.name == "__init__.py")
                 for n, f in sorted(modules.items())],
        edges=edge_list,
        external={k: sorted(v) for k, v in sorted(external.items())},
        unresolved=unresolved, cycles=find_cycles(runtime), errors=errors)


def _imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement with its scope: module, function or type_checking."""

    def visit(node: ast.AST, scope: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, scope
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            scope = "function" if scope == "module" else scope
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, "type_checking")
            for child in node.orelse:
                yield from visit(child, scope)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, scope)

    yield from visit(tree, "module")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, package: str,
             universe: dict[str, Path]) -> list[tuple[str, str | None]]:
    """``(target module, problem)`` pairs for one statement."""
    if isinstance(node, ast.Import):
        return [(_resolve_absolute(a.name, universe), None) for a in node.names]
    if node.level:
        parts = package.split(".") if package else []
        keep = len(parts) - (node.level - 1)
        if keep <= 0:
            return [("", f"relative import (level {node.level}) goes above the top-level "
                         f"package of {package or 'a module outside any package'}")]
        base = ".".join(parts[:keep])
        module = f"{base}.{node.module}" if node.module else base
    else:
        module = node.module or ""
    out: list[tuple[str, str | None]] = []
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        if alias.name != "*" and sub in universe:
            out.append((sub, None))
        elif module in universe:
            out.append((module, None))
        elif node.level:  # a relative import must land inside the scanned tree
            out.append(("", f"no module {module!r} in the scanned files"))
        else:
            out.append((_resolve_absolute(module, universe), None))
    return list(dict.fromkeys(out))


def _resolve_absolute(module: str, universe: dict[str, Path]) -> str:
    """``module`` itself when known; else its longest known parent package; else as given."""
    if module in universe:
        return module
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in universe:
            return prefix
    return module


def find_cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """One closed path per strongly connected component with a cycle (Tarjan's algorithm)."""
    graph: dict[str, list[str]] = {}
    for s, t in sorted(edges):
        graph.setdefault(s, []).append(t)
        graph.setdefault(t, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        # iterative Tarjan: (node, iterator over successors)
        work: list[tuple[str, Iterator[str]]] = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, succ = work[-1]
            advanced = False
            for nxt in succ:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1 or (node, node) in edges:
                    components.append(sorted(comp))
    return sorted(_cycle_path(comp, graph) for comp in components)


def _cycle_path(component: list[str], graph: dict[str, list[str]]) -> list[str]:
    """A shortest closed path through the component's first member (breadth-first)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    queue = [start]
    seen = {start}
    while queue:
        node = queue.pop(0)
        for nxt in graph[node]:
            if nxt not in members:
                continue
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if nxt not in seen:
                seen.add(nxt)
                previous[nxt] = node
                queue.append(nxt)
    return [*component, component[0]]
