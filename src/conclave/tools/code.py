"""The code workbench: read-only analysis of Python source, as tools.

``CodeWorkbench(root)`` offers five tools in the ``code`` namespace --
``parse_code``, ``outline``, ``complexity``, ``check_syntax`` and
``import_graph`` -- that work on a snippet (``source``) or a file under
``root`` (``path``).  Nothing is ever imported or executed: everything is
:mod:`ast` and :func:`compile`.

Paths are confined to the root: a path is resolved (``..`` collapsed,
symlinks followed) and refused unless the result is still inside the root,
so neither ``../../etc/passwd`` nor a symlink pointing out can be read.

Only Python is parsed.  A file or ``language`` naming another language gets
an error result saying so rather than an invented analysis.

The methods are ordinary Python methods returning pydantic models, usable
directly; :meth:`CodeWorkbench.register` puts them in a
:class:`~conclave.tools.ToolRegistry`, where they run in worker threads.
"""

from __future__ import annotations

import ast
import io
import os
import tokenize
from pathlib import Path
from typing import Annotated

from pydantic import Field

from conclave.tools._complexity import ComplexityReport, complexity_report
from conclave.tools._imports import ImportGraph, build_graph, module_name, python_files
from conclave.tools._pyast import Outline, ParseSummary, SyntaxCheck, check_syntax, outline
from conclave.tools._pyast import summarize as _summarize
from conclave.tools.errors import WorkbenchError
from conclave.tools.registry import ToolRegistry
from conclave.tools.tool import FunctionTool, Tool, mangle, tool

#: file suffixes of languages the workbench recognises but does not parse
_OTHER_LANGUAGES = {
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".go": "go", ".rs": "rust", ".java": "java",
    ".kt": "kotlin", ".c": "c", ".h": "c", ".cc": "c++", ".cpp": "c++", ".hpp": "c++",
    ".cs": "c#", ".rb": "ruby", ".php": "php", ".swift": "swift", ".scala": "scala",
    ".sh": "shell", ".bash": "shell", ".lua": "lua", ".r": "r", ".jl": "julia",
    ".sql": "sql", ".html": "html", ".css": "css", ".json": "json", ".yaml": "yaml",
    ".yml": "yaml", ".toml": "toml", ".md": "markdown",
}
_PYTHON_NAMES = {"python", "python3", "py"}

SourceArg = Annotated[str | None, Field(description="Python code to analyse. Give this or "
                                                    "`path`, not both.")]
PathArg = Annotated[str | None, Field(description="A file to analyse, relative to the "
                                                  "workbench root. Give this or `source`.")]


class CodeWorkbench:
    """Read-only Python analysis tools over the files under ``root``.

    Args:
        root: the folder paths are resolved in; nothing outside it is read.
        max_file_bytes: larger files are refused (a model does not need a 2 MB outline).
        max_files: ``import_graph`` refuses folders with more Python files.
        timeout_s: the timeout of each tool call when registered.
    """

    namespace = "code"

    def __init__(self, root: str | Path, *, max_file_bytes: int = 2_000_000,
                 max_files: int = 5_000, timeout_s: float = 30.0) -> None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise WorkbenchError(f"workbench root {str(path)!r} is not a directory",
                                 hint="pass an existing folder as root")
        self.root = path.resolve()
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.timeout_s = timeout_s

    # --- registration --------------------------------------------------------------

    def tools(self, namespace: str = "code") -> list[FunctionTool]:
        """The five tools, bound to this workbench, under ``namespace``."""
        methods = (self.parse_code, self.outline, self.complexity, self.check_syntax,
                   self.import_graph)
        return [tool(m, name=m.__name__, namespace=namespace, timeout_s=self.timeout_s)
                for m in methods]

    def register(self, registry: ToolRegistry, namespace: str = "code", *,
                 replace: bool = False) -> list[Tool]:
        """Register the tools in ``registry`` (``code.outline`` is sent as ``code__outline``)."""
        return [registry.register(t, replace=replace) for t in self.tools(namespace)]

    # --- the tools -----------------------------------------------------------------

    def parse_code(self, source: SourceArg = None, path: PathArg = None,
                   language: str | None = None) -> ParseSummary:
        """Parse Python code into its syntax tree and summarise it (nothing is run).

        Returns node counts by type, the tree depth, and the top-level
        statements with their line ranges. Only Python is parsed.

        Args:
            language: the source language; inferred from the file suffix when omitted.
                Only "python" is supported.
        """
        text, display, filename = self._load(source, path, language)
        return _summarize(self._parse(text, filename, display), text, display)

    def outline(self, source: SourceArg = None, path: PathArg = None) -> Outline:
        """List the classes, functions and methods of Python code.

        Each symbol has its line range, signature, decorators and the first
        line of its docstring; methods and nested functions are children of
        their class or function.
        """
        text, display, filename = self._load(source, path)
        return outline(self._parse(text, filename, display), display)

    def complexity(self, source: SourceArg = None, path: PathArg = None,
                   min_complexity: Annotated[int, Field(ge=1)] = 1) -> ComplexityReport:
        """Cyclomatic (McCabe) complexity of each function in Python code, most complex first.

        Counts 1 plus one per if/elif, conditional expression, loop, except
        clause, extra and/or operand, comprehension for/if, match case (not a
        final wildcard), case guard and assert. Rank A is 1-5, B 6-10,
        C 11-20, D 21-30, E 31-40, F above.

        Args:
            min_complexity: list only functions at least this complex.
        """
        text, display, filename = self._load(source, path)
        return complexity_report(self._parse(text, filename, display), display,
                                 min_complexity=min_complexity)

    def check_syntax(self, source: SourceArg = None, path: PathArg = None) -> SyntaxCheck:
        """Check that Python code compiles, without running it.

        Returns valid=true, or the first error with its 1-based line and
        column, the message, the offending line and a caret under the error.
        Compiler warnings (invalid escape sequences, `is` with a literal) are
        listed too.
        """
        text, display, filename = self._load(source, path)
        return check_syntax(text, filename, display)

    def import_graph(self, path: Annotated[str, Field(description=(
            "A folder or a .py file, relative to the workbench root."))] = ".") -> ImportGraph:
        """Map which modules import which, for a folder of Python files or one file.

        Module names follow Python's package rules (folders with __init__.py);
        relative imports are resolved. Edges carry the import lines and a scope
        (module, function, type_checking); cycles are reported over
        module-scope imports; imports from outside the scanned files are listed
        as external.
        """
        target = self.resolve(path)
        display = self._display(target)
        if target.is_file():
            if target.suffix != ".py":
                raise WorkbenchError(f"{display} is not a .py file",
                                     hint="give a folder or a Python file")
            import_root = target.parent
            while (import_root / "__init__.py").is_file() and import_root != self.root:
                import_root = import_root.parent
            try:
                pool, errors = python_files(import_root, self.root, self.max_files)
            except ValueError:
                pool, errors = [target], []
            known = {module_name(f, self.root): f for f in pool}
            return build_graph([target], self.root, display, read=self._read_file,
                               known=known, errors=errors)
        try:
            files, errors = python_files(target, self.root, self.max_files)
        except ValueError as exc:
            raise WorkbenchError(str(exc), hint="point import_graph at a smaller folder") \
                from exc
        return build_graph(files, self.root, display, read=self._read_file, errors=errors)

    # --- paths and reading ---------------------------------------------------------

    def resolve(self, path: str) -> Path:
        """The absolute path of ``path`` inside the root, or WorkbenchError if it escapes."""
        if not isinstance(path, str) or not path.strip():
            raise WorkbenchError("path is empty", hint="give a path relative to the "
                                                       "workbench root, e.g. 'src/app.py'")
        if "\x00" in path:
            raise WorkbenchError("path contains a NUL character")
        raw = Path(path.strip()).expanduser()
        candidate = raw if raw.is_absolute() else self.root / raw
        try:
            real = candidate.resolve()
        except (OSError, RuntimeError) as exc:  # symlink loops
            raise WorkbenchError(f"cannot resolve path {path!r}: {exc}") from exc
        if not real.is_relative_to(self.root):
            why = ("goes through a symlink that points outside the workbench root"
                   if _lexically_inside(candidate, self.root)
                   else "leads outside the workbench root")
            raise WorkbenchError(
                f"path {path!r} {why}",
                hint="give a path inside the root, without '..' leading out of it")
        if not real.exists():
            raise WorkbenchError(f"{self._display(real)} does not exist",
                                 hint=f"paths are relative to the workbench root; list the "
                                      f"folder or use `{mangle('code.import_graph')}` to see "
                                      f"the Python files")
        return real

    def _display(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix() or "."

    def _load(self, source: str | None, path: str | None,
              language: str | None = None) -> tuple[str, str | None, str]:
        """``(text, display path, filename for messages)`` from a snippet or a file."""
        if (source is None) == (path is None):
            raise WorkbenchError("give exactly one of `source` (the code itself) or `path` "
                                 "(a file under the workbench root)")
        lang = language.strip().lower() if language else None
        if path is not None:
            file = self.resolve(path)
            display = self._display(file)
            if file.is_dir():
                raise WorkbenchError(f"{display} is a folder, not a file",
                                     hint="give a file, or use import_graph for a folder")
            lang = lang or _OTHER_LANGUAGES.get(file.suffix.lower(), "python")
            _require_python(lang, display)
            return self._read_file(file), display, display
        _require_python(lang or "python", None)
        assert source is not None
        return source, None, "<source>"

    def _read_file(self, file: Path) -> str:
        size = file.stat().st_size
        if size > self.max_file_bytes:
            raise WorkbenchError(f"{self._display(file)} is {size:,} bytes, over the "
                                 f"{self.max_file_bytes:,}-byte limit")
        data = file.read_bytes()
        try:
            encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
            return data.decode(encoding)
        except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
            raise WorkbenchError(f"{self._display(file)} is not readable Python text: {exc}",
                                 hint="the file must be UTF-8 or declare its encoding") from exc

    def _parse(self, text: str, filename: str, display: str | None) -> ast.Module:
        try:
            return ast.parse(text, filename=filename)
        except SyntaxError as exc:
            where = display or "the source"
            raise WorkbenchError(
                f"{where} has a syntax error at line {exc.lineno}, column {exc.offset}: "
                f"{exc.msg}", hint=f"use {mangle(self.namespace + '.check_syntax')} "
                                   "for the details") from exc
        except (ValueError, RecursionError, MemoryError) as exc:
            raise WorkbenchError(f"{display or 'the source'} cannot be parsed: {exc}") from exc


def _require_python(language: str, display: str | None) -> None:
    if language not in _PYTHON_NAMES:
        what = f"{display} looks like {language}" if display else f"language {language!r}"
        raise WorkbenchError(f"{what}: the code workbench parses Python only",
                             hint="no parser for other languages is available here; "
                                  "read the file as text instead")


def _lexically_inside(candidate: Path, root: Path) -> bool:
    """True when the path, with ``..`` collapsed but symlinks not followed, is in root."""
    return Path(os.path.normpath(candidate)).is_relative_to(root)


__all__ = ["CodeWorkbench"]
