"""The RAG data model shared by loaders, chunkers, the index, retrieval and answers.

A :class:`Document` is one loaded source (a file, or one record of a JSONL
file).  Its ``spans`` map character ranges of its text to structure (heading
path, page), so a chunker can cut anywhere and still know where a chunk sits;
a :class:`Chunk` keeps its character offsets so a citation can point at the
exact passage.  A :class:`Filter` is one description of a metadata filter
that both retrieval sides (dense and keyword) apply identically.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class DocMetadata(BaseModel):
    #: the file path (relative to the indexed folder), plus ``#n`` for a record in a JSONL file
    source: str
    title: str | None = None
    #: markdown, html, pdf, docx, text, code, csv, json
    content_type: str
    #: programming language, for code
    language: str | None = None
    modified: datetime | None = None
    tags: list[str] = Field(default_factory=list)
    #: anything else a loader found (front-matter fields, CSV columns...), JSON-able values
    extra: dict[str, Any] = Field(default_factory=dict)


class Span(BaseModel):
    """Characters ``[start, end)`` of the document text sit under ``heading_path`` on ``page``."""

    start: int
    end: int
    heading_path: list[str] = Field(default_factory=list)
    page: int | None = None
    #: structural kind of the span: heading, paragraph, code, table, row, ...
    kind: str = "text"


class Document(BaseModel):
    id: str
    text: str
    metadata: DocMetadata
    spans: list[Span] = Field(default_factory=list)

    @property
    def content_hash(self) -> str:
        """Hash of what would change the index: text, structure and metadata."""
        h = hashlib.sha256(self.text.encode())
        h.update(self.metadata.model_dump_json(exclude={"modified"}).encode())
        h.update(b"".join(s.model_dump_json().encode() for s in self.spans))
        return h.hexdigest()

    def span_at(self, offset: int) -> Span | None:
        """The span containing character ``offset`` (the last one starting at or before it)."""
        best = None
        for s in self.spans:
            if s.start <= offset:
                best = s
            else:
                break
        return best


class Chunk(BaseModel):
    id: str
    doc_id: str
    text: str
    #: character offsets in the document text
    start: int
    end: int
    heading_path: list[str] = Field(default_factory=list)
    page: int | None = None
    metadata: DocMetadata

    @staticmethod
    def make_id(doc_id: str, start: int, end: int, text: str) -> str:
        """Stable id: the same passage of the same document gets the same id."""
        digest = hashlib.sha256(f"{doc_id}\x00{start}\x00{end}\x00{text}".encode()).hexdigest()
        return digest[:32]


class Filter(BaseModel):
    """Metadata filter, applied identically to dense and keyword retrieval.

    Every given condition must hold (AND); list conditions match any of their values.
    """

    #: temporal: modified at or after / before (exclusive)
    modified_after: datetime | None = None
    modified_before: datetime | None = None
    #: categorical, any-of
    tags_any: list[str] = Field(default_factory=list)
    content_types: list[str] = Field(default_factory=list)
    languages: list[str] = Field(default_factory=list)
    #: hierarchical: source path prefix (``docs/api/``) and heading-path prefix
    path_prefix: str | None = None
    heading_prefix: list[str] = Field(default_factory=list)

    def is_empty(self) -> bool:
        return self == Filter()

    def matches(self, chunk: Chunk) -> bool:
        """The reference semantics; index backends translate the same conditions natively."""
        m = chunk.metadata
        if self.modified_after and (m.modified is None or m.modified < self.modified_after):
            return False
        if self.modified_before and (m.modified is None or m.modified >= self.modified_before):
            return False
        if self.tags_any and not set(self.tags_any) & set(m.tags):
            return False
        if self.content_types and m.content_type not in self.content_types:
            return False
        if self.languages and m.language not in self.languages:
            return False
        if self.path_prefix and not m.source.startswith(self.path_prefix):
            return False
        n = len(self.heading_prefix)
        return not (n and chunk.heading_path[:n] != self.heading_prefix)


class Hit(BaseModel):
    """A retrieved chunk with its fused score and what each retriever said about it."""

    chunk: Chunk
    score: float
    #: per-stage scores/ranks, e.g. {"bm25_rank": 1, "dense_score": 0.71}
    signals: dict[str, float] = Field(default_factory=dict)
