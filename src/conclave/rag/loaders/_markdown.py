"""Plain text and Markdown.

Markdown keeps its source text (minus the front-matter) as the document text,
so a citation quotes what the author wrote; a light line scanner marks headings,
fenced code, lists, tables and paragraphs as spans.  A full CommonMark parser
would add a dependency for little gain: retrieval needs block boundaries and
the heading path, not rendered HTML.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from conclave.rag.loaders._base import (
    FileInfo,
    HeadingStack,
    LoadError,
    as_tags,
    jsonable,
    to_datetime,
)
from conclave.rag.types import DocMetadata, Document, Span

_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?\r?\n)?---[ \t]*(?:\r?\n|\Z)", re.S)
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_LIST = re.compile(r"^ {0,3}(?:[-*+]|\d{1,9}[.)])(?:[ \t]|$)")
_TABLE = re.compile(r"^ {0,3}\|")
_PARA = re.compile(r"\S(?:.*?\S)?(?=\s*\n[ \t]*\n|\s*\Z)", re.S)

#: front-matter keys that become ``modified`` (first one present wins)
_DATE_KEYS = ("modified", "updated", "lastmod", "last_modified", "date")


def load_text(info: FileInfo, text: str) -> Document:
    """Plain text: one paragraph span per blank-line-separated block."""
    spans = [Span(start=m.start(), end=m.end(), kind="paragraph") for m in _PARA.finditer(text)]
    meta = DocMetadata(source=info.rel, title=info.path.name, content_type="text",
                       modified=info.modified)
    return Document(id=info.rel, text=text, metadata=meta, spans=spans)


def load_markdown(info: FileInfo, raw: str) -> Document:
    front, text = _split_front_matter(raw, info.rel)
    spans, first_heading, first_h1 = _scan(text)
    meta: dict[str, Any] = dict(front)
    title = meta.pop("title", None)
    tags = as_tags(meta.pop("tags", None))
    modified = info.modified
    for key in _DATE_KEYS:
        if key in meta and (dt := to_datetime(meta[key])) is not None:
            modified = dt
            meta.pop(key)
            break
    metadata = DocMetadata(
        source=info.rel,
        title=str(title).strip() if title else (first_h1 or first_heading or info.path.name),
        content_type="markdown",
        modified=modified,
        tags=tags,
        extra=jsonable(meta),
    )
    return Document(id=info.rel, text=text, metadata=metadata, spans=spans)


def _split_front_matter(raw: str, rel: str) -> tuple[dict[str, Any], str]:
    m = _FRONT.match(raw)
    if not m:
        return {}, raw
    try:
        data = yaml.safe_load(m.group(1) or "") or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 2}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise LoadError(rel, f"invalid YAML front-matter{where} ({problem})",
                        hint="fix the block between the leading '---' lines") from e
    if not isinstance(data, dict):
        raise LoadError(rel, "front-matter is not a mapping of keys to values",
                        hint="write 'key: value' lines between the leading '---' lines")
    return {str(k): v for k, v in data.items()}, raw[m.end():]


def clean_heading(text: str) -> str:
    """Heading text without inline markup: links, code ticks, emphasis."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"(`+)(.+?)\1", r"\2", text)
    text = re.sub(r"(\*\*|__|\*|_)(\S(?:.*?\S)?)\1", r"\2", text)
    return text.strip()


def _scan(text: str) -> tuple[list[Span], str | None, str | None]:
    """Block spans of Markdown ``text``; also the first heading and first level-1 heading."""
    spans: list[Span] = []
    headings = HeadingStack()
    first_heading: str | None = None
    first_h1: str | None = None

    lines = text.splitlines(keepends=True)
    starts: list[int] = []
    pos = 0
    for line in lines:
        starts.append(pos)
        pos += len(line)

    def end_of(i: int) -> int:
        """Offset just past line ``i`` without its line break."""
        return starts[i] + len(lines[i].rstrip("\r\n"))

    block_start: int | None = None  # line index where the open block began
    block_kind = "paragraph"

    def close(last: int) -> None:
        nonlocal block_start
        if block_start is not None and last >= block_start:
            spans.append(Span(start=starts[block_start], end=end_of(last),
                              heading_path=headings.path, kind=block_kind))
        block_start = None

    i = 0
    n = len(lines)
    while i < n:
        line = lines[i].rstrip("\r\n")
        fence = _FENCE.match(line)
        if fence:
            close(i - 1)
            char, size = fence.group(1)[0], len(fence.group(1))
            closing = re.compile(rf"^ {{0,3}}{re.escape(char)}{{{size},}}[ \t]*$")
            j = i + 1
            while j < n and not closing.match(lines[j].rstrip("\r\n")):
                j += 1
            last = min(j, n - 1)
            spans.append(Span(start=starts[i], end=end_of(last),
                              heading_path=headings.path, kind="code"))
            i = last + 1
            continue
        if not line.strip():
            close(i - 1)
            i += 1
            continue
        atx = _ATX.match(line)
        if atx:
            close(i - 1)
            title = clean_heading(atx.group(2) or "")
            if title:
                level = len(atx.group(1))
                headings.push(level, title)
                first_heading = first_heading or title
                if level == 1 and first_h1 is None:
                    first_h1 = title
            spans.append(Span(start=starts[i], end=end_of(i),
                              heading_path=headings.path, kind="heading"))
            i += 1
            continue
        setext = _SETEXT.match(line)
        if setext and block_start is not None and block_kind == "paragraph":
            title = clean_heading(" ".join(
                lines[k].strip() for k in range(block_start, i)))
            level = 1 if setext.group(1).startswith("=") else 2
            headings.push(level, title)
            first_heading = first_heading or title
            if level == 1 and first_h1 is None:
                first_h1 = title
            spans.append(Span(start=starts[block_start], end=end_of(i),
                              heading_path=headings.path, kind="heading"))
            block_start = None
            i += 1
            continue
        if block_start is None:
            block_start = i
            if _TABLE.match(line):
                block_kind = "table"
            elif _LIST.match(line):
                block_kind = "list"
            else:
                block_kind = "paragraph"
        i += 1
    close(n - 1)
    return spans, first_heading, first_h1
