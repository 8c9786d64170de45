"""Pieces every loader shares: the error, the text builder, decoding and file facts.

Loaders build a document's text block by block through :class:`TextBuilder`,
which records a :class:`Span` per block as it goes, so offsets are right by
construction instead of being searched for afterwards.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

from conclave.errors import ConclaveError
from conclave.rag.types import Document, Span


class LoadError(ConclaveError):
    """A file could not be loaded: ``source`` names it, ``reason`` says why.

    Folder loading turns this into a ``(source, reason)`` entry of the report and
    goes on with the next file; loading a single path raises it.
    """

    code = "load_error"
    http_status = 422

    def __init__(self, source: str, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"{source}: {reason}", hint=hint)
        self.source = source
        self.reason = reason


@dataclass
class FileInfo:
    """What a loader gets: where the file is and what to call it.

    For a gzip-compressed file (``README.md.gz``) ``path`` is the name without
    ``.gz`` (what decides the format and the fallback title) and ``data`` holds
    the decompressed bytes; otherwise ``data`` is None and loaders read ``path``.
    """

    path: Path
    #: POSIX path relative to the indexed folder: the document id and ``source``
    rel: str
    modified: datetime
    data: bytes | None = None


@dataclass
class Loaded:
    """A loader's result: documents, plus records it skipped inside the file (JSONL lines)."""

    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


class TextBuilder:
    """Appends blocks separated by a blank line and records one span per block."""

    def __init__(self, sep: str = "\n\n") -> None:
        self._parts: list[str] = []
        self._len = 0
        self._sep = sep
        self.spans: list[Span] = []

    def add(
        self,
        text: str,
        *,
        heading_path: list[str] | None = None,
        page: int | None = None,
        kind: str = "text",
    ) -> None:
        text = text.strip("\n")
        if not text.strip():
            return
        if self._parts:
            self._parts.append(self._sep)
            self._len += len(self._sep)
        start = self._len
        self._parts.append(text)
        self._len += len(text)
        self.spans.append(
            Span(start=start, end=self._len, heading_path=list(heading_path or []),
                 page=page, kind=kind)
        )

    @property
    def text(self) -> str:
        return "".join(self._parts)


class HeadingStack:
    """Heading levels to a heading path: a level-2 heading closes earlier 2s and deeper."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, str]] = []

    def push(self, level: int, title: str) -> list[str]:
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, title))
        return self.path

    @property
    def path(self) -> list[str]:
        return [t for _, t in self._stack]


_WS = re.compile(r"\s+")


def squash(text: str) -> str:
    """Collapse runs of whitespace (HTML/DOCX text) to single spaces."""
    return _WS.sub(" ", text).strip()


def decode_text(data: bytes, rel: str) -> str:
    """Bytes to text: UTF-8 (with or without BOM), UTF-16 with a BOM, else cp1252.

    cp1252 is the one legacy encoding still common in real folders (old Windows
    notes); it rejects a few bytes, so truly binary data still fails here.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise LoadError(rel, f"not valid UTF-16 text ({e.reason} at byte {e.start})") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as first:
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            raise LoadError(
                rel,
                f"not valid UTF-8 text ({first.reason} at byte {first.start})",
                hint="convert the file to UTF-8",
            ) from first


def looks_binary(head: bytes) -> bool:
    """NUL bytes or many control characters in the first block mean binary data."""
    if not head:
        return False
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return False
    if b"\x00" in head:
        return True
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13, 27))
    return controls / len(head) > 0.05


def file_mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)


def to_datetime(value: Any) -> datetime | None:
    """A front-matter date (YAML date, datetime or ISO string) as an aware UTC datetime."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime.combine(value, time.min)
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def jsonable(value: Any) -> Any:
    """Front-matter values (dates, sets...) into plain JSON values for ``extra``."""
    return json.loads(json.dumps(value, default=str))


def as_tags(value: Any) -> list[str]:
    """Tags given as a YAML list or a comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, list | tuple | set):
        items = list(value)
    else:
        items = [value]
    out: list[str] = []
    for item in items:
        tag = str(item).strip()
        if tag and tag not in out:
            out.append(tag)
    return out
