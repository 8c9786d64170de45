"""The search workbench: the RAG index as tools an agent can call and cite from.

``SearchWorkbench(rag)`` (a :class:`~conclave.rag.pipeline.Rag` or a
:class:`~conclave.rag.retrieval.Retriever`) offers tools in the ``search``
namespace:

* ``hybrid`` -- dense and keyword (BM25) results fused, the default way to search;
* ``dense`` / ``keyword`` -- one side alone (meaning only, or exact words only);
* ``filtered`` -- any mode with a metadata filter (tags, content types,
  languages, path prefix, heading prefix, modified after/before), given as
  typed arguments so the schema tells the model what it may ask for; the
  filter is one :class:`~conclave.rag.types.Filter`, which the retriever applies
  natively on both sides (a Qdrant payload filter, a mask before BM25);
* ``rerank`` -- hybrid candidates re-scored by the configured reranker (left
  out when the settings say ``reranker: none``, so a model is never offered a
  tool that cannot work);
* ``read`` -- the whole text of one passage by its chunk id, since hits carry
  only a snippet.

Every search returns a :class:`SearchResults`: per hit its rank, chunk id,
source path, heading path, page, score and a snippet trimmed to
``snippet_chars`` around the query's words -- what an agent needs to cite --
and ``None`` fields are left out of the JSON the model reads.  Nothing found
(an empty index, a filter that excludes everything, a keyword search whose
words occur nowhere) is a normal, empty result with a ``note`` saying why and
what to try, not an error: it is an answer about the corpus.  Bad input (an
empty query, ``k`` out of range, a date that is not one) fails validation and
comes back to the model as an error result, per the registry's convention.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
)

from conclave.rag.types import Filter, Hit
from conclave.tools.errors import WorkbenchError
from conclave.tools.registry import ToolRegistry
from conclave.tools.tool import FunctionTool, Tool, mangle, tool

if TYPE_CHECKING:
    from conclave.rag.pipeline import Rag
    from conclave.rag.retrieval import Retriever

__all__ = ["ContentType", "PassageText", "SearchHit", "SearchResults", "SearchWorkbench"]

#: the content types loaders assign (see :class:`~conclave.rag.types.DocMetadata`)
ContentType = Literal["markdown", "html", "pdf", "docx", "text", "code", "csv", "json"]
SearchMode = Literal["hybrid", "dense", "keyword"]
_MODES: dict[str, Any] = {"hybrid": "hybrid", "dense": "dense", "keyword": "bm25"}

#: the most hits one call may ask for (more would crowd the context, not help)
MAX_K = 50
#: the most candidates ``rerank`` re-scores (the offline reranker costs ~0.2 s each on 2 cores)
MAX_CANDIDATES = 100
HEADING_SEP = " > "

Query = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000),
                  Field(description="What to search for: a question or keywords.")]
K = Annotated[int, Field(ge=1, le=MAX_K, description=f"How many passages to return "
                                                      f"(1-{MAX_K}).")]


class _Compact(BaseModel):
    """Drops ``None`` fields from the dump: the model pays for every token it reads."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class SearchHit(_Compact):
    """One retrieved passage, with what a citation needs."""

    rank: int
    chunk_id: str
    #: file path relative to the indexed folder (``#n`` appended for a JSONL record)
    source: str
    title: str | None = None
    #: the heading path, outermost first, joined with `` > ``
    heading: str | None = None
    page: int | None = None
    score: float
    #: ``rerank`` only: where the passage stood in the hybrid list, and its score there
    hybrid_rank: int | None = None
    hybrid_score: float | None = None
    #: the passage, whitespace collapsed, cut to the workbench's limit around the query's
    #: words; a cut is marked with an ellipsis (``search.read`` gives the whole text)
    text: str


class SearchResults(_Compact):
    """The hits of one search, best first, and a note when there are none."""

    query: str
    mode: str
    #: the filter applied, only the conditions given
    filter: dict[str, Any] | None = None
    #: ``rerank`` only: how many hybrid candidates the reranker re-scored
    candidates: int | None = None
    hits: list[SearchHit] = Field(default_factory=list)
    note: str | None = None


class PassageText(_Compact):
    """The whole text of one passage, where it sits, and its document's metadata."""

    chunk_id: str
    source: str
    title: str | None = None
    heading: str | None = None
    page: int | None = None
    #: character offsets of the passage in its document's text
    start: int
    end: int
    content_type: str
    tags: list[str] | None = None
    modified: str | None = None
    text: str
    truncated: bool | None = None


class SearchWorkbench:
    """Search tools over one RAG index; see the module docstring.

    Args:
        source: a :class:`~conclave.rag.pipeline.Rag` (its retriever is used) or a
            :class:`~conclave.rag.retrieval.Retriever`.
        snippet_chars: the longest snippet per hit, in characters.
        max_read_chars: ``read`` cuts longer passages to this many characters.
        timeout_s: each tool call's timeout when registered (reranking on a
            loaded CPU takes seconds).
        max_concurrency: how many calls of each tool may run at once (None: no limit).
    """

    namespace = "search"

    def __init__(self, source: Rag | Retriever, *, snippet_chars: int = 400,
                 max_read_chars: int = 8_000, timeout_s: float = 120.0,
                 max_concurrency: int | None = None) -> None:
        retriever = getattr(source, "retriever", source)
        if not callable(getattr(retriever, "search", None)) or not hasattr(retriever, "index"):
            raise WorkbenchError(f"cannot search {type(source).__name__}: not a Rag or a "
                                 "Retriever", hint="pass Rag.open(...) or Retriever(index)")
        if snippet_chars < 40:
            raise WorkbenchError(f"snippet_chars must be at least 40, got {snippet_chars}",
                                 hint="a snippet shorter than a sentence cannot be cited")
        if max_read_chars < snippet_chars:
            raise WorkbenchError(f"max_read_chars ({max_read_chars}) is below snippet_chars "
                                 f"({snippet_chars})", hint="raise max_read_chars")
        self.retriever: Retriever = retriever
        self.snippet_chars = snippet_chars
        self.max_read_chars = max_read_chars
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency

    # --- registration --------------------------------------------------------------

    @property
    def can_rerank(self) -> bool:
        """False when the settings turn reranking off (``reranker: none``)."""
        return self.retriever.settings.reranker != "none"

    def tools(self, namespace: str = "search") -> list[FunctionTool]:
        """The tools, bound to this workbench, under ``namespace``."""
        self.namespace = namespace
        methods = [self.hybrid, self.dense, self.keyword, self.filtered, self.read]
        if self.can_rerank:
            methods.insert(4, self.rerank)
        return [tool(m, name=m.__name__, namespace=namespace, timeout_s=self.timeout_s,
                     max_concurrency=self.max_concurrency) for m in methods]

    def register(self, registry: ToolRegistry, namespace: str = "search", *,
                 replace: bool = False) -> list[Tool]:
        """Register the tools in ``registry`` (``search.hybrid`` is sent as ``search__hybrid``)."""
        return [registry.register(t, replace=replace) for t in self.tools(namespace)]

    def _wire(self, name: str) -> str:
        return mangle(f"{self.namespace}.{name}")

    # --- the tools -----------------------------------------------------------------

    async def hybrid(self, query: Query, k: K = 5) -> SearchResults:
        """Search the indexed documents by meaning and by exact words at once (the default).

        Dense (embedding) and keyword (BM25) results are fused, so both paraphrases
        and rare terms (error codes, names) are found. Each hit has its chunk_id,
        source file, heading path and page to cite, a score (higher is better) and a
        snippet of the passage; a snippet cut short ends with an ellipsis.
        """
        return await self._search(query, k, mode="hybrid")

    async def dense(self, query: Query, k: K = 5) -> SearchResults:
        """Search the indexed documents by meaning only (embedding similarity).

        Finds passages that say the same thing in other words; weak on exact terms
        such as identifiers or error codes. Hits as for hybrid search.
        """
        return await self._search(query, k, mode="dense")

    async def keyword(self, query: Query, k: K = 5) -> SearchResults:
        """Search the indexed documents for the query's words (BM25, stemmed).

        Best for exact terms: names, identifiers, error codes, rare words. Finds
        nothing when none of the words occurs. Hits as for hybrid search.
        """
        return await self._search(query, k, mode="keyword")

    async def filtered(
        self, query: Query, k: K = 5,
        tags: Annotated[list[str] | None, Field(description=(
            "Keep documents having any of these tags (from their front matter)."))] = None,
        content_types: Annotated[list[ContentType] | None, Field(description=(
            "Keep documents of any of these content types."))] = None,
        languages: Annotated[list[str] | None, Field(description=(
            "Keep source code in any of these programming languages, e.g. python."))] = None,
        path_prefix: Annotated[str | None, Field(description=(
            "Keep documents whose path (relative to the indexed folder) starts with this, "
            "e.g. docs/api/."))] = None,
        heading_prefix: Annotated[str | None, Field(description=(
            "Keep passages under this heading path, outermost first, joined with ' > ' "
            "as in the `heading` of a hit, e.g. 'Installation > Requirements'."))] = None,
        modified_after: Annotated[datetime | None, Field(description=(
            "Keep documents modified at or after this date (YYYY-MM-DD or an ISO 8601 "
            "time; UTC when no zone is given)."))] = None,
        modified_before: Annotated[datetime | None, Field(description=(
            "Keep documents modified before this date (exclusive), same format."))] = None,
        mode: Annotated[SearchMode, Field(description=(
            "hybrid (meaning and words), dense (meaning only) or keyword (words only)."
        ))] = "hybrid",
    ) -> SearchResults:
        """Search only the passages whose metadata passes a filter.

        Every condition given must hold; a list condition matches any of its values.
        The filter is applied before ranking on both the dense and the keyword side,
        so the k results are the best among the passages that pass. Hits as for
        hybrid search; no hit means nothing passing the filter matched.
        """
        flt = self._filter(tags=tags, content_types=content_types, languages=languages,
                           path_prefix=path_prefix, heading_prefix=heading_prefix,
                           modified_after=modified_after, modified_before=modified_before)
        return await self._search(query, k, mode=mode, flt=flt)

    async def rerank(
        self, query: Query, k: K = 5,
        candidates: Annotated[int, Field(ge=1, le=MAX_CANDIDATES, description=(
            "How many hybrid results the reranker re-scores before the best k are kept "
            f"(1-{MAX_CANDIDATES}; raised to k if smaller)."))] = 20,
    ) -> SearchResults:
        """Hybrid search, then re-score the top candidates with the reranker (slower, sharper).

        Use it when the order matters, e.g. to pick the single best passage. Each hit's
        score is the reranker's; hybrid_rank and hybrid_score say where it stood before.
        """
        reranker = self.retriever.reranker if self.can_rerank else None
        if reranker is None:
            raise WorkbenchError("no reranker is configured (rag.reranker is 'none')",
                                 hint=f"use {self._wire('hybrid')} instead")
        depth = max(candidates, k)
        hits = await self.retriever.search(query, k=depth, mode="hybrid")
        results = self._results(query, "rerank", hits, None)
        results.candidates = depth
        if not hits:
            return results
        before = {h.chunk.id: (rank, h.score) for rank, h in enumerate(hits, start=1)}
        reranked = (await reranker.rerank(query, hits))[:k]
        results.hits = [self._hit(rank, h, query, before=before[h.chunk.id])
                        for rank, h in enumerate(reranked, start=1)]
        return results

    async def read(self, chunk_id: Annotated[str, StringConstraints(
            strip_whitespace=True, min_length=1), Field(description=(
                "The chunk_id of a hit from a search."))]) -> PassageText:
        """Read the whole text of one passage found by a search (hits carry only a snippet).

        Returns the passage with its source, heading path, page, character offsets in
        its document, content type, tags and modification date.
        """
        found = await self.retriever.index.chunks([chunk_id])
        chunk = found.get(chunk_id)
        if chunk is None:
            raise WorkbenchError(f"no passage has chunk_id {chunk_id!r}",
                                 hint="use a chunk_id from a search result of this index; "
                                      "ids change when a document is edited and re-indexed")
        m = chunk.metadata
        text = chunk.text
        cut = len(text) > self.max_read_chars
        return PassageText(
            chunk_id=chunk.id, source=m.source, title=m.title,
            heading=HEADING_SEP.join(chunk.heading_path) or None, page=chunk.page,
            start=chunk.start, end=chunk.end, content_type=m.content_type,
            tags=m.tags or None, modified=m.modified.isoformat() if m.modified else None,
            text=text[: self.max_read_chars] if cut else text, truncated=cut or None)

    # --- helpers -------------------------------------------------------------------

    def _filter(self, *, tags: list[str] | None, content_types: list[str] | None,
                languages: list[str] | None, path_prefix: str | None,
                heading_prefix: str | None, modified_after: datetime | None,
                modified_before: datetime | None) -> Filter:
        """The :class:`Filter` the typed arguments describe, checked as the CLI checks it."""
        fields: dict[str, Any] = {}
        if tags:
            fields["tags_any"] = _distinct(t.strip() for t in tags if t.strip())
        if content_types:
            fields["content_types"] = _distinct(content_types)
        if languages:
            fields["languages"] = _distinct(x.strip().lower() for x in languages if x.strip())
        if path_prefix is not None and path_prefix.strip():
            prefix = path_prefix.strip().removeprefix("./")
            if prefix.startswith("/"):
                raise WorkbenchError(f"path_prefix {path_prefix!r} is absolute",
                                     hint="give it relative to the indexed folder, like "
                                          "docs/api/ (as in the `source` of a hit)")
            fields["path_prefix"] = prefix
        if heading_prefix is not None and heading_prefix.strip():
            parts = [p.strip() for p in heading_prefix.split(">")]
            if not all(parts):
                raise WorkbenchError(f"heading_prefix {heading_prefix!r} has an empty part",
                                     hint="separate headings with ' > ', like "
                                          "'Installation > Requirements'")
            fields["heading_prefix"] = parts
        after, before = _utc(modified_after), _utc(modified_before)
        if after is not None and before is not None and after >= before:
            raise WorkbenchError(f"modified_after ({after.date()}) is not earlier than "
                                 f"modified_before ({before.date()})",
                                 hint="swap them, or drop one to keep the range open")
        if after is not None:
            fields["modified_after"] = after
        if before is not None:
            fields["modified_before"] = before
        return Filter(**fields)

    async def _search(self, query: str, k: int, *, mode: str,
                      flt: Filter | None = None) -> SearchResults:
        use = flt if flt is not None and not flt.is_empty() else None
        hits = await self.retriever.search(query, k=k, filter=use, mode=_MODES[mode])
        return self._results(query, mode, hits, use)

    def _results(self, query: str, mode: str, hits: list[Hit],
                 flt: Filter | None) -> SearchResults:
        shown = flt.model_dump(mode="json", exclude_defaults=True) if flt is not None else None
        results = SearchResults(query=query, mode=mode, filter=shown or None,
                                hits=[self._hit(r, h, query) for r, h in
                                      enumerate(hits, start=1)])
        if not hits:
            results.note = self._why_empty(mode, flt)
        return results

    def _why_empty(self, mode: str, flt: Filter | None) -> str:
        if self.retriever.index.chunk_count == 0:
            return ("The index is empty: no documents have been indexed yet, so nothing can "
                    "be found. Index the documents first.")
        if flt is not None:
            return (f"No passage passes this filter and matches the query. Loosen or drop "
                    f"the filter (check tag names, path and heading spelling against the "
                    f"hits of {self._wire('hybrid')}).")
        if mode == "keyword":
            return (f"No indexed passage contains any of the query's words. Try other words, "
                    f"or {self._wire('hybrid')} / {self._wire('dense')}, which also match "
                    f"by meaning.")
        return "No passage matches the query."

    def _hit(self, rank: int, hit: Hit, query: str,
             before: tuple[int, float] | None = None) -> SearchHit:
        c = hit.chunk
        return SearchHit(
            rank=rank, chunk_id=c.id, source=c.metadata.source, title=c.metadata.title,
            heading=HEADING_SEP.join(c.heading_path) or None, page=c.page,
            score=round(hit.score, 4),
            hybrid_rank=before[0] if before else None,
            hybrid_score=round(before[1], 4) if before else None,
            text=snippet(c.text, query, self.snippet_chars))


# --- snippets --------------------------------------------------------------------------------

_WORD = re.compile(r"\w{3,}")
ELLIPSIS = "…"


def snippet(text: str, query: str, limit: int) -> str:
    """``text`` with whitespace collapsed, cut to ``limit`` characters around the query.

    A passage that fits is returned whole.  Otherwise the window (starting at a
    word) holding the most distinct query words wins, the earliest on a tie, so
    the part of a long chunk that answers is the part the model sees; each cut
    side is marked with an ellipsis.
    """
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    room = limit - 2  # an ellipsis on each side at most
    low = flat.lower()
    terms = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    occurrences: list[int] = []
    for t in terms:
        occurrences += [m.start() for m in re.finditer(re.escape(t), low)][:20]
    best, best_count = 0, _count(low, terms, 0, room)
    for pos in sorted(occurrences):
        start = max(0, pos - room // 4)
        if start > 0:  # begin at a word
            space = low.find(" ", start, pos + 1)
            start = space + 1 if space != -1 else pos
        count = _count(low, terms, start, start + room)
        if count > best_count:
            best, best_count = start, count
    end = min(len(flat), best + room)
    if end < len(flat):  # end at a word
        space = flat.rfind(" ", best + room // 2, end + 1)
        end = space if space != -1 else end
    out = flat[best:end].strip()
    return (ELLIPSIS if best > 0 else "") + out + (ELLIPSIS if end < len(flat) else "")


def _count(low: str, terms: list[str], start: int, end: int) -> int:
    window = low[start:end]
    return sum(1 for t in terms if t in window)


def _distinct(values: Any) -> list[Any]:
    return list(dict.fromkeys(values))


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
