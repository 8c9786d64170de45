"""Source code: the file text as is, spans per definition, ``language`` set.

Python is split with :mod:`ast` into top-level functions and classes, and a
class into its methods, so a span's heading path reads
``["module.py", "ClassName", "method"]``; decorators and the comment lines
right above a definition belong to it.  Other languages use a regex splitter
over top-level (column 0) definitions, which is what brace languages format
consistently; code between definitions (imports, constants) gets the file name
alone as its heading path.  A Python file that does not parse falls back to
the regex splitter rather than being dropped.
"""

from __future__ import annotations

import ast
import re

from conclave.rag.loaders._base import FileInfo
from conclave.rag.types import DocMetadata, Document, Span

#: extension -> language
EXTENSIONS: dict[str, str] = {
    ".py": "python", ".pyi": "python", ".pyw": "python",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".go": "go", ".rs": "rust", ".java": "java", ".kt": "kotlin", ".kts": "kotlin",
    ".scala": "scala", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp",
    ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp", ".cs": "csharp", ".rb": "ruby",
    ".sh": "shell", ".bash": "shell", ".zsh": "shell", ".php": "php", ".swift": "swift",
    ".lua": "lua", ".sql": "sql", ".r": "r", ".pl": "perl", ".pm": "perl",
    ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".ini": "ini", ".cfg": "ini",
    ".css": "css", ".scss": "scss", ".vue": "vue", ".svelte": "svelte", ".dart": "dart",
    ".ex": "elixir", ".exs": "elixir", ".erl": "erlang", ".hs": "haskell", ".ml": "ocaml",
    ".clj": "clojure", ".groovy": "groovy", ".gradle": "groovy", ".tf": "terraform",
    ".proto": "protobuf", ".graphql": "graphql", ".xml": "xml",
}

#: file names without a telling extension
FILENAMES: dict[str, str] = {
    "Makefile": "make", "makefile": "make", "GNUmakefile": "make", "Dockerfile": "dockerfile",
    "Containerfile": "dockerfile", "CMakeLists.txt": "cmake", "Rakefile": "ruby",
    "Gemfile": "ruby", "Justfile": "just", "justfile": "just", "Vagrantfile": "ruby",
}

#: shebang interpreter -> language
SHEBANGS: dict[str, str] = {
    "python": "python", "python3": "python", "sh": "shell", "bash": "shell", "zsh": "shell",
    "dash": "shell", "node": "javascript", "ruby": "ruby", "perl": "perl", "php": "php",
    "lua": "lua", "deno": "typescript",
}

_C_LIKE_COMMENTS = ("//", "/*", "*", "@", "#[", "[[")
_HASH_COMMENTS = ("#", "@")
_DASH_COMMENTS = ("--",)

_JS = [
    r"^(?:export\s+)?(?:default\s+)?(?:declare\s+)?(?:async\s+)?function\s*\*?\s*(?P<name>[\w$]+)",
    r"^(?:export\s+)?(?:default\s+)?(?:declare\s+)?(?:abstract\s+)?class\s+(?P<name>[\w$]+)",
    r"^(?:export\s+)?(?:declare\s+)?(?:const|let|var)\s+(?P<name>[\w$]+)\s*(?::[^=]+)?="
    r"\s*(?:async\s+)?(?:function\b|\([^)]*\)\s*(?::[^=]+)?=>|[\w$]+\s*=>|class\b)",
    r"^(?:export\s+)?(?:declare\s+)?(?:interface|type|enum|namespace)\s+(?P<name>[\w$]+)",
]
_JVM_TYPES = (r"^(?:(?:public|private|protected|internal|abstract|final|static|sealed|open|"
              r"data|partial|inline|value|enum|annotation)\s+)*"
              r"(?:class|interface|enum|record|object|trait|struct)\s+(?P<name>\w+)")

#: language -> patterns for a top-level definition line; group ``name`` names it
_DEFINITIONS: dict[str, list[str]] = {
    "python": [r"^(?:async\s+)?def\s+(?P<name>\w+)", r"^class\s+(?P<name>\w+)"],
    "javascript": _JS,
    "typescript": _JS,
    "go": [r"^func\s+\(\s*(?:\w+\s+)?\*?(?P<recv>\w+)[^)]*\)\s*(?P<name>\w+)",
           r"^func\s+(?P<name>\w+)", r"^type\s+(?P<name>\w+)"],
    "rust": [r"^(?:pub(?:\([^)]*\))?\s+)?(?:(?:const|async|unsafe|extern\s+\"[^\"]*\")\s+)*"
             r"fn\s+(?P<name>\w+)",
             r"^(?:pub(?:\([^)]*\))?\s+)?(?:struct|enum|trait|union|mod|type|macro_rules!)\s*"
             r"(?P<name>\w+)",
             r"^(?:unsafe\s+)?(?P<impl>impl\b[^{]*)"],
    "java": [_JVM_TYPES], "csharp": [_JVM_TYPES], "scala": [_JVM_TYPES, r"^def\s+(?P<name>\w+)"],
    "kotlin": [_JVM_TYPES, r"^(?:(?:private|internal|public|suspend|inline|operator)\s+)*fun\s+"
               r"(?:<[^>]*>\s*)?(?:[\w.]+\.)?(?P<name>\w+)"],
    "swift": [r"^(?:(?:public|private|internal|open|final|fileprivate)\s+)*"
              r"(?:class|struct|enum|protocol|extension|func|actor)\s+(?P<name>\w+)"],
    "c": [r"^(?:typedef\s+)?(?:struct|union|enum)\s+(?P<name>\w+)[^;]*$",
          r"^(?!(?:if|for|while|switch|return|else|do|case|typedef)\b)[A-Za-z_][\w\s\*&]*?"
          r"\b(?P<name>[A-Za-z_]\w*)\s*\([^;]*$"],
    "cpp": [r"^(?:template\s*<[^>]*>\s*)?(?:class|struct|union|enum(?:\s+class)?|namespace)\s+"
            r"(?P<name>\w+)[^;]*$",
            r"^(?!(?:if|for|while|switch|return|else|do|case|typedef)\b)[A-Za-z_][\w\s\*&:<>,~]*?"
            r"\b(?P<name>[A-Za-z_~][\w:~]*)\s*\([^;]*$"],
    "ruby": [r"^(?:class|module)\s+(?P<name>[\w:]+)", r"^def\s+(?:self\.)?(?P<name>[\w?!=]+)"],
    "shell": [r"^function\s+(?P<name>[\w.:-]+)", r"^(?P<name>[\w.:-]+)\s*\(\)"],
    "php": [r"^(?:(?:abstract|final)\s+)?(?:class|interface|trait|enum)\s+(?P<name>\w+)",
            r"^function\s+(?P<name>\w+)"],
    "lua": [r"^(?:local\s+)?function\s+(?P<name>[\w.:]+)"],
    "perl": [r"^sub\s+(?P<name>\w+)", r"^package\s+(?P<name>[\w:]+)"],
    "r": [r"^(?P<name>[\w.]+)\s*(?:<-|=)\s*function\b"],
    "sql": [r"(?i)^create\s+(?:or\s+replace\s+)?(?:temporary\s+|temp\s+|unique\s+)?"
            r"(?:table|view|function|procedure|index|trigger|type|schema|materialized\s+view)\s+"
            r"(?:if\s+not\s+exists\s+)?(?P<name>[\w.\"]+)"],
    "elixir": [r"^\s{0,2}(?:defmodule|def|defp|defmacro)\s+(?P<name>[\w.?!]+)"],
    "dart": [r"^(?:abstract\s+)?(?:class|mixin|extension|enum)\s+(?P<name>\w+)"],
    "haskell": [r"^(?P<name>[a-z_][\w']*)\s*::"],
}
_COMPILED = {lang: [re.compile(p) for p in pats] for lang, pats in _DEFINITIONS.items()}


def _comment_prefixes(language: str) -> tuple[str, ...]:
    if language in ("python", "ruby", "shell", "perl", "r", "elixir", "yaml", "toml"):
        return _HASH_COMMENTS
    if language in ("sql", "lua", "haskell"):
        return _DASH_COMMENTS
    return _C_LIKE_COMMENTS


def load_code(info: FileInfo, text: str, language: str) -> Document:
    name = info.path.name
    spans: list[Span] = []
    if language == "python":
        try:
            spans = _python_spans(text, name)
        except (SyntaxError, ValueError, RecursionError):
            spans = _regex_spans(text, name, language)
    elif language in _COMPILED:
        spans = _regex_spans(text, name, language)
    if not spans and text.strip():
        spans = [Span(start=0, end=len(text.rstrip()), heading_path=[name], kind="code")]
    meta = DocMetadata(source=info.rel, title=name, content_type="code", language=language,
                       modified=info.modified)
    return Document(id=info.rel, text=text, metadata=meta, spans=spans)


class _Lines:
    """Line-number <-> offset arithmetic for one text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def span(self, first: int, last: int, path: list[str]) -> Span | None:
        """Span over 0-based lines ``first..last`` trimmed of blank edges; None if blank."""
        start, end = self.starts[first], self.starts[min(last + 1, len(self.lines))]
        chunk = self.text[start:end]
        if not chunk.strip():
            return None
        lead = len(chunk) - len(chunk.lstrip("\r\n"))
        return Span(start=start + lead, end=start + len(chunk.rstrip()), heading_path=path,
                    kind="code")

    def attach_comments(self, first: int, floor: int, prefixes: tuple[str, ...]) -> int:
        """Move ``first`` up over comment/decorator lines directly above it (not past ``floor``)."""
        while first - 1 >= floor:
            above = self.lines[first - 1].strip()
            if not above or not above.startswith(prefixes):
                break
            first -= 1
        return first


def _python_spans(text: str, name: str) -> list[Span]:
    tree = ast.parse(text)
    lines = _Lines(text)
    spans: list[Span] = []
    cursor = 0  # first 0-based line not yet covered

    def definition_start(node: ast.AST, floor: int) -> int:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
        return lines.attach_comments(first, floor, _HASH_COMMENTS)

    def emit(first: int, last: int, path: list[str]) -> None:
        if last >= first and (span := lines.span(first, last, path)) is not None:
            spans.append(span)

    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in tree.body:
        if not isinstance(node, defs):
            continue
        first = definition_start(node, cursor)
        last = (node.end_lineno or node.lineno) - 1
        emit(cursor, first - 1, [name])
        path = [name, node.name]
        if isinstance(node, ast.ClassDef):
            inner = first
            for member in node.body:
                if not isinstance(member, defs):
                    continue
                m_first = definition_start(member, inner)
                m_last = (member.end_lineno or member.lineno) - 1
                emit(inner, m_first - 1, path)
                emit(m_first, m_last, [*path, member.name])
                inner = m_last + 1
            emit(inner, last, path)
        else:
            emit(first, last, path)
        cursor = last + 1
    emit(cursor, len(lines.lines) - 1, [name])
    return spans


def _regex_spans(text: str, name: str, language: str) -> list[Span]:
    patterns = _COMPILED.get(language, [])
    lines = _Lines(text)
    prefixes = _comment_prefixes(language)
    starts: list[tuple[int, str]] = []  # (0-based line, definition name)
    floor = 0
    for i, raw in enumerate(lines.lines):
        indented_ok = language in ("sql", "elixir") and raw.strip()
        if (not raw or raw[0] in " \t\r\n}#)]") and not indented_ok:
            continue
        for pattern in patterns:
            m = pattern.match(raw.rstrip("\r\n"))
            if m:
                groups = m.groupdict()
                label = ".".join(g for g in (groups.get("recv"), groups.get("name")) if g)
                label = label or (groups.get("impl") or "").strip()
                first = lines.attach_comments(i, floor, prefixes)
                starts.append((first, label or raw.strip()[:60]))
                floor = i + 1
                break
    spans: list[Span] = []
    bounds = [s for s, _ in starts] + [len(lines.lines)]
    if not starts:
        return []
    if (head := lines.span(0, bounds[0] - 1, [name])) is not None:
        spans.append(head)
    for k, (first, label) in enumerate(starts):
        span = lines.span(first, bounds[k + 1] - 1, [name, label])
        if span is not None:
            spans.append(span)
    return spans

