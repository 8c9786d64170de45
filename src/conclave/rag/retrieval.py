"""Retrieval: dense, keyword or hybrid search with filters, fusion, reranking, multi-query.

:class:`Retriever` asks both sides of a :class:`~conclave.rag.index.HybridIndex`
for ``candidates`` hits each, with the same :class:`~conclave.rag.types.Filter`
applied natively on each side (a Qdrant payload filter on the dense side, a
mask before ranking on the keyword side), fuses them, optionally reranks the
top of the fused list, and returns :class:`~conclave.rag.types.Hit` objects
whose ``signals`` say what each stage thought (``dense_rank``,
``dense_score``, ``bm25_rank``, ``bm25_score``, ``bm25_weight``,
``fused_score``, ``rerank_score``).

Fusion default (``weighted``: min-max scores, the keyword side weighted per
query by its own confidence and by whether the dense side's best chunk shares
the query's words, a document's best chunk carrying the best of its chunks on
each side) and the measurements behind it are in the module docstring of
:mod:`conclave.rag.fusion`.  A reranker takes the dense side's place: its
scores replace the fused head's order, plus the keyword side's evidence at the
weight fusion gave it.

:class:`MultiQuery` rewrites the question into variants through the gateway
(tier 1 by default, which offline resolves to the local model), retrieves
each, and fuses the lists with reciprocal rank fusion, the original query
counting double.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from conclave.errors import InvalidRequest
from conclave.rag.fusion import best_per_group, minmax, rrf, weighted
from conclave.rag.types import Chunk, Filter, Hit

if TYPE_CHECKING:
    from conclave.config import RagSettings
    from conclave.gateway import Gateway
    from conclave.rag.index import HybridIndex
    from conclave.rag.rerank import Reranker

__all__ = ["Mode", "MultiQuery", "Retriever"]

Mode = Literal["hybrid", "dense", "bm25"]
FusionName = Literal["rrf", "weighted"]
MODES = ("hybrid", "dense", "bm25")
FUSIONS = ("rrf", "weighted")


class Retriever:
    """Search one index; see the module docstring."""

    def __init__(self, index: HybridIndex, *, settings: RagSettings | None = None,
                 reranker: Reranker | None = None, gateway: Gateway | None = None) -> None:
        from conclave.config import RagSettings

        self.index = index
        self.settings = settings or RagSettings()
        self.gateway = gateway
        self._reranker = reranker

    @property
    def reranker(self) -> Reranker | None:
        """The configured reranker, built on first use (None when ``reranker: none``)."""
        if self._reranker is None and self.settings.reranker != "none":
            from types import SimpleNamespace

            from conclave.rag.rerank import build_reranker

            self._reranker = build_reranker(
                self.settings.reranker, settings=SimpleNamespace(rag=self.settings),
                embedder=self.index.embedder, gateway=self.gateway)
        return self._reranker

    async def search(self, query: str, *, k: int = 10, filter: Filter | None = None,
                     mode: Mode = "hybrid", fusion: FusionName | None = None,
                     rerank: bool = False, candidates: int | None = None) -> list[Hit]:
        """The ``k`` best chunks for ``query`` that pass ``filter`` (an empty list if none)."""
        query = (query or "").strip()
        if not query:
            raise InvalidRequest("the search query is empty", hint="give some words to search for")
        if k < 1:
            raise InvalidRequest(f"k must be at least 1, got {k}")
        if mode not in MODES:
            raise InvalidRequest(f"unknown search mode {mode!r}",
                                 hint=f"choose one of {', '.join(MODES)}")
        fusion = fusion or self.settings.fusion
        if fusion not in FUSIONS:
            raise InvalidRequest(f"unknown fusion {fusion!r}",
                                 hint=f"choose one of {', '.join(FUSIONS)}")
        top_n = self.settings.rerank_top_n if rerank else 0
        depth = max(candidates or self.settings.candidates, k, top_n)

        dense: list[tuple[Chunk, float]] = []
        keyword: list[tuple[str, float]] = []
        if mode in ("hybrid", "dense"):
            vector = (await self.index.embedder.embed([query]))[0]
            dense = await self.index.dense_search(vector, k=depth, filter=filter)
        if mode in ("hybrid", "bm25"):
            keyword = self.index.keyword_search(query, k=depth, filter=filter)
        if not dense and not keyword:
            return []

        chunks = {c.id: c for c, _ in dense}
        missing = [cid for cid, _ in keyword if cid not in chunks]
        if missing:
            chunks.update(await self.index.chunks(missing))
        signals: dict[str, dict[str, float]] = {}
        for rank, (c, s) in enumerate(dense, start=1):
            signals.setdefault(c.id, {}).update(dense_rank=rank, dense_score=s)
        for rank, (cid, s) in enumerate(keyword, start=1):
            signals.setdefault(cid, {}).update(bm25_rank=rank, bm25_score=s)

        dense_ranking = [(c.id, s) for c, s in dense]
        extra: dict[str, float] = {}
        groups: dict[str, str] = {}
        if mode == "dense":
            fused = dense_ranking
        elif mode == "bm25":
            fused = keyword
        elif fusion == "weighted":
            w = extra["bm25_weight"] = self.keyword_weight(query, keyword, dense_ranking)
            groups = {cid: c.doc_id for cid, c in chunks.items()}
            fused = weighted([dense_ranking, keyword], weights=[1.0, w], groups=groups)
        else:
            fused = rrf([dense_ranking, keyword], k=self.settings.rrf_k)
        hits = [Hit(chunk=chunks[cid], score=s,
                    signals={**signals.get(cid, {}), "fused_score": s, **extra})
                for cid, s in fused if cid in chunks]
        if rerank and hits and self.reranker is not None:
            head = await self.reranker.rerank(query, hits[:top_n])
            if extra.get("bm25_weight", 0.0) > 0:
                head = _keep_keyword_evidence(head, keyword, extra["bm25_weight"], groups)
            hits = head + hits[top_n:]
        return hits[:k]

    def keyword_weight(self, query: str, keyword: Sequence[tuple[str, float]],
                       dense: Sequence[tuple[str, float]] = ()) -> float:
        """How much the keyword side counts in weighted fusion, from two signals.

        *Confidence*: the best BM25 score as a fraction of the most the query could
        score (every term matched, saturated).  The weight ramps from 0 at
        ``keyword_confidence_floor`` to 1 a ``keyword_confidence_span`` above it: a
        question whose words a passage holds scores high and counts fully.

        *Shared vocabulary*: the same fraction for the dense side's best chunk.  A
        paraphrased question ("how many processors does this machine have") shares no
        word with the passage that answers it (``os.cpu_count``), so when BM25 is
        confident there it is confident about an incidental match
        (``platform.processor``).  The weight is scaled by that fraction over
        ``keyword_shared_floor`` (capped at 1): when what the dense side ranks first
        holds none of the query's words, the keyword side stays out.  Measured in
        :mod:`conclave.rag.fusion`.
        """
        if not keyword:
            return 0.0
        ceiling = self.index.keyword_max_score(query)
        if ceiling <= 0:
            return 0.0
        floor = self.settings.keyword_confidence_floor
        span = self.settings.keyword_confidence_span
        weight = min(1.0, max(0.0, (keyword[0][1] / ceiling - floor) / span))
        shared_floor = self.settings.keyword_shared_floor
        if weight > 0 and dense and shared_floor > 0:
            top = dense[0][0]
            bm25 = dict(keyword).get(top)
            if bm25 is None:  # not among the keyword candidates: score it alone
                bm25 = self.index.keyword_scores(query, [top])[0]
            weight *= min(1.0, bm25 / ceiling / shared_floor)
        return float(weight)


def _keep_keyword_evidence(head: list[Hit], keyword: Sequence[tuple[str, float]],
                           weight: float, groups: dict[str, str]) -> list[Hit]:
    """Reranked hits re-ordered by the reranker's score plus the keyword side's evidence.

    A reranker re-reads passages against the question; the offline one does so with
    the same MiniLM as the dense side, so on its own it would throw away what the
    keyword side knew (an exact identifier, a rare term) and undo the fusion: on the
    pycode dev set reranking alone fell below plain hybrid (nDCG@10 0.760 against
    0.776).  So the reranker takes the dense side's place and the keyword side keeps
    the weight fusion gave it for this query, with the same document evidence (a
    chunk counts its document's best keyword score): min-max of the rerank scores
    plus ``weight`` times that.  With weight 0 (a paraphrased question) the
    reranker's order stands.  Measured in :mod:`conclave.rag.fusion`.
    """
    doc_best = best_per_group(minmax(keyword), groups)
    reranked = minmax([(h.chunk.id, h.signals.get("rerank_score", h.score)) for h in head])
    scored = [(reranked.get(h.chunk.id, 0.0) + weight * doc_best.get(h.chunk.doc_id, 0.0), i)
              for i, h in enumerate(head)]
    scored.sort(key=lambda si: (-si[0], si[1]))
    return [head[i].model_copy(update={"score": s}) for s, i in scored]


# --- multi-query ---------------------------------------------------------------------------

_REWRITE_SCHEMA = {
    "type": "object",
    "properties": {"queries": {"type": "array", "items": {"type": "string"},
                               "minItems": 1, "maxItems": 10}},
    "required": ["queries"],
}


_EXAMPLE_QUESTION = "how can I get rid of a folder and everything in it"
_EXAMPLE_REWRITES = ["remove a directory recursively", "delete a non-empty directory",
                     "rm -r command", "recursive folder deletion", "erase directory tree",
                     "remove all files in a directory", "delete folder contents",
                     "directory removal options", "force delete directory",
                     "clean up a directory"]


def parse_rewrites(text: str, original: str, n: int) -> list[str]:
    """Up to ``n`` distinct rewrites from a model's answer (JSON, else one per line)."""
    items: list[Any] = []
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            items = value.get("queries") or []
        elif isinstance(value, list):
            items = value
    except ValueError:
        items = [re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line) for line in text.splitlines()]
    seen = {original.strip().lower()}
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            continue
        q = " ".join(item.split()).strip(" \"'")
        if len(q) < 3 or q.lower() in seen:
            continue
        seen.add(q.lower())
        out.append(q[:300])
        if len(out) >= n:
            break
    return out


class MultiQuery:
    """Retrieve with several phrasings of one question and fuse the results (RRF)."""

    def __init__(self, retriever: Retriever, gateway: Gateway, *, n: int | None = None,
                 tier: int | None = None, model: str | None = None) -> None:
        self.retriever = retriever
        self.gateway = gateway
        self.n = n or retriever.settings.multi_query_n
        self.tier = retriever.settings.llm_tier if tier is None else tier
        self.model = model

    async def rewrite(self, query: str) -> list[str]:
        """Up to ``n`` rewrites of ``query`` (possibly fewer: duplicates are dropped)."""
        from conclave.llm.types import ChatRequest, Message, ResponseFormat

        # A worked example, not a "..." template: the local base model copied the
        # template's "..." literally as its only rewrite.
        prompt = (
            f"Write {self.n} different search queries that would find documents answering "
            "the question. Use other words than the question where you can (synonyms, "
            "the technical terms a manual would use). Reply with JSON.\n\n"
            f"Question: {_EXAMPLE_QUESTION}\n"
            f"JSON: {json.dumps({'queries': _EXAMPLE_REWRITES[:self.n]})}\n\n"
            f"Question: {query}\nJSON:"
        )
        request = ChatRequest(
            messages=[Message.user(prompt)], tier=None if self.model else self.tier,
            model=self.model, max_tokens=64 * self.n, temperature=0.0,
            response_format=ResponseFormat(type="json_schema", name="rewrites",
                                           schema=_REWRITE_SCHEMA),
            metadata={"operation": "rewrite"},
        )
        response = await self.gateway.complete(request)
        rewrites = parse_rewrites(response.text, query, self.n)
        # a weak model may answer with the example's own rewrites: they are not about this
        # question (unless it is the example's)
        echoed = {r.lower() for r in _EXAMPLE_REWRITES}
        if query.strip().lower() != _EXAMPLE_QUESTION:
            rewrites = [r for r in rewrites if r.lower() not in echoed]
        return rewrites

    async def on_topic(self, query: str, variants: Sequence[str]) -> list[str]:
        """The rewrites whose embedding stays close to the question's (drift guard).

        A weak model (the local 270M base model offline) often answers the rewrite
        prompt with text about something else; fused as equals, such variants pulled
        ``hybrid+multiquery`` on the manpages dev set from nDCG@10 0.877 to 0.548.
        A rewrite is kept when its cosine with the question is at least
        ``multi_query_min_similarity``: paraphrases stay, drift goes.
        """
        floor = self.retriever.settings.multi_query_min_similarity
        if not variants or floor <= 0:
            return list(variants)
        vectors = await self.retriever.index.embedder.embed([query, *variants])
        sims = vectors[1:] @ vectors[0]
        return [v for v, s in zip(variants, sims, strict=True) if float(s) >= floor]

    async def search(self, query: str, *, k: int = 10, filter: Filter | None = None,
                     mode: Mode = "hybrid", fusion: FusionName | None = None,
                     rerank: bool = False) -> list[Hit]:
        written = await self.rewrite(query)
        variants = await self.on_topic(query, written)
        depth = max(self.retriever.settings.candidates, k)
        lists = await asyncio.gather(*(
            self.retriever.search(q, k=depth, filter=filter, mode=mode, fusion=fusion)
            for q in [query, *variants]))
        # The original question holds at least half the say: rewrites may reorder and add
        # what it missed, but agreeing rewrites cannot outvote it on their own.
        weights = [max(2.0, float(len(variants)))] + [1.0] * len(variants)
        by_id: dict[str, Hit] = {}
        for hits in lists:
            for h in hits:
                by_id.setdefault(h.chunk.id, h)
        fused = rrf([[(h.chunk.id, h.score) for h in hits] for hits in lists],
                    k=self.retriever.settings.rrf_k, weights=weights)
        out = [by_id[cid].model_copy(update={
            "score": s, "signals": {**by_id[cid].signals, "fused_score": s,
                                    "query_variants": float(len(variants)),
                                    "query_variants_dropped":
                                        float(len(written) - len(variants))}})
               for cid, s in fused]
        reranker = self.retriever.reranker if rerank else None
        if reranker is not None and out:
            top_n = self.retriever.settings.rerank_top_n
            out = await reranker.rerank(query, out[:top_n]) + out[top_n:]
        return out[:k]
