"""Reranking: re-score the top fused hits with a costlier model, behind one interface.

* :class:`OfflineReranker` (the default): needs no weights beyond the MiniLM
  embedder.  See its docstring for what it computes and why; measured on
  both dev sets by ``bench/rag_fusion_rerank.py``.
* :class:`CrossEncoderReranker`: a sentence-transformers ``CrossEncoder`` from
  a local directory the user supplies (``settings.rag.cross_encoder_path``);
  nothing is downloaded, and without weights it is a clear configuration error.
* :class:`LlmReranker`: asks the routed model (through the gateway, so it is
  priced, budgeted and recorded) for a 0-10 relevance score per passage,
  constrained to a JSON object so even the local base model answers in form.

Every reranker returns the hits it was given, re-ordered, with its score in
``signals["rerank_score"]``; ties keep the incoming order.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from conclave.errors import ConclaveError, ConfigError
from conclave.rag.types import Hit

if TYPE_CHECKING:
    from conclave.gateway import Gateway
    from conclave.rag.embeddings import LocalEmbedder

__all__ = [
    "CrossEncoderReranker",
    "LlmReranker",
    "OfflineReranker",
    "Reranker",
    "build_reranker",
    "passage_windows",
]


@runtime_checkable
class Reranker(Protocol):
    async def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]: ...


def _reorder(hits: Sequence[Hit], scores: Sequence[float]) -> list[Hit]:
    order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))
    out = []
    for i in order:
        h = hits[i]
        out.append(h.model_copy(update={
            "score": float(scores[i]),
            "signals": {**h.signals, "rerank_score": float(scores[i]),
                        "fused_score": h.signals.get("fused_score", h.score)},
        }))
    return out


# --- offline ----------------------------------------------------------------------------

_SENTENCE = re.compile(r"(?<=[.!?;:])\s+|\n\s*\n|\n(?=\s*[-*\d#])")


def passage_windows(text: str, max_words: int = 48) -> list[str]:
    """Sentence-aligned windows of at most ``max_words`` words (long sentences overlap)."""
    sentences = [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]
    out: list[str] = []
    cur: list[str] = []
    for s in sentences:
        words = s.split()
        if cur and len(cur) + len(words) > max_words:
            out.append(" ".join(cur))
            cur = []
        cur += words
        while len(cur) > max_words:
            out.append(" ".join(cur[:max_words]))
            cur = cur[max_words // 2:]
    if cur:
        out.append(" ".join(cur))
    return out or [text]


class OfflineReranker:
    """Re-scores hits with the MiniLM bi-encoder three ways, without new weights.

    One vector per chunk is a blunt instrument: MiniLM reads at most 256 word
    pieces and was trained on short texts, so a long chunk is blurred into its
    opening lines and a short query is compared with an average.  The
    reranker's score is the mean of three cosines that each see more:

    * the whole chunk against the query (the dense retriever's own view);
    * the best sentence window (about 48 words) against the query, which finds
      the one passage of a long chunk that answers;
    * late interaction (ColBERT-style MaxSim): each query token's best match
      among the chunk's contextual token vectors, averaged over query tokens.

    Whole-chunk and window vectors go through the embedder's cache, so a passage
    costs a forward pass only the first time; token vectors are computed per call.

    Measured on the top 30 of the default hybrid list, one chunk per document
    (``bench/rag_fusion_rerank.py``, first session), nDCG@10: manpages 0.8987 ->
    0.9225, pydoc-paraphrase 0.4576 -> 0.4932.  Each feature alone helps less
    (offline, same candidates: window only 0.9019 / 0.4922, MaxSim only 0.8737 /
    0.4364, whole + window 0.9061 / 0.4796, whole + MaxSim 0.9046 / 0.5012).  With
    the CLI's chunking and the reranker's order alone the gain is smaller on the
    paraphrase set (0.4696 -> 0.4709) and negative on the code set (0.7755 ->
    0.7604), because the features are all MiniLM's and drop what BM25 knew; the
    retriever therefore adds the keyword side's evidence back (see
    :mod:`conclave.rag.fusion` for the table).  Cost: about one MiniLM forward pass
    over the candidates (MaxSim) plus the windows of passages not seen before; on 2
    cores shared with other work (load 8) that was 4-8 s for 30 candidates, so
    ``rerank_top_n`` is the knob to turn when latency matters more than the last
    few points.
    """

    def __init__(self, local: LocalEmbedder, *, embedder: Any = None, window_words: int = 48
                 ) -> None:
        self.local = local
        #: sentence vectors come from here (the same model, usually behind the cache)
        self.embedder = embedder if embedder is not None else local
        self.window_words = window_words

    def _maxsim(self, query: str, texts: list[str]) -> list[float]:
        vectors = self.local.token_embeddings([query, *texts])
        q = vectors[0]
        out = []
        for d in vectors[1:]:
            out.append(float((q @ d.T).max(axis=1).mean()) if len(q) and len(d) else 0.0)
        return out

    async def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
        if not hits:
            return []
        texts = [h.chunk.text for h in hits]
        windows = [passage_windows(t, self.window_words) for t in texts]
        flat = [w for ws in windows for w in ws]
        maxsim_task = asyncio.create_task(asyncio.to_thread(self._maxsim, query, texts))
        try:
            vectors = await self.embedder.embed([query, *texts, *flat])
        except BaseException:
            maxsim_task.cancel()
            raise
        maxsim = await maxsim_task
        q = vectors[0]
        whole = vectors[1:1 + len(texts)] @ q
        win = vectors[1 + len(texts):] @ q
        scores = []
        i = 0
        for j, ws in enumerate(windows):
            best = float(np.max(win[i:i + len(ws)]))
            i += len(ws)
            scores.append((float(whole[j]) + best + maxsim[j]) / 3.0)
        return _reorder(hits, scores)


# --- cross-encoder ------------------------------------------------------------------------


class CrossEncoderReranker:
    """A sentence-transformers CrossEncoder loaded from a local directory."""

    def __init__(self, model_path: Path | None, *, batch_size: int = 16,
                 device: str = "cpu") -> None:
        if model_path is None:
            raise ConfigError(
                "the cross-encoder reranker has no weights configured",
                hint="set CONCLAVE_RAG__CROSS_ENCODER_PATH to a local sentence-transformers "
                "CrossEncoder directory, or use the offline reranker "
                "(CONCLAVE_RAG__RERANKER=offline)",
            )
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"no cross-encoder model in {path} (config.json is missing)",
                hint="point CONCLAVE_RAG__CROSS_ENCODER_PATH at a directory holding the "
                "model's config.json and weights",
            )
        self.model_path = path
        self.batch_size = batch_size
        self.device = device
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            from conclave.rag.embeddings import _force_offline

            _force_offline()
            from sentence_transformers import CrossEncoder

            try:
                self._model = CrossEncoder(str(self.model_path), device=self.device,
                                           local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"could not load the cross-encoder from "
                                  f"{self.model_path}: {exc}") from None
        return self._model

    def _score(self, query: str, texts: list[str]) -> list[float]:
        model = self._load()
        scores = model.predict([(query, t) for t in texts], batch_size=self.batch_size,
                               show_progress_bar=False)
        return [float(s) for s in np.asarray(scores).reshape(-1)]

    async def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
        if not hits:
            return []
        scores = await asyncio.to_thread(self._score, query, [h.chunk.text for h in hits])
        return _reorder(hits, scores)


# --- LLM ----------------------------------------------------------------------------------

_SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 10}},
    "required": ["score"],
}
_NUMBER = re.compile(r"\b(10|[0-9])\b")


def parse_score(text: str) -> float | None:
    """The 0-10 score in a model's answer: the JSON field, else the first number."""
    text = text.strip()
    try:
        value = json.loads(text)
        if isinstance(value, dict) and isinstance(value.get("score"), int | float):
            return float(min(10, max(0, value["score"])))
    except ValueError:
        pass
    m = _NUMBER.search(text)
    return float(m.group(1)) if m else None


class LlmReranker:
    """Scores each passage 0-10 with the routed model; falls back to the fused order.

    A passage whose answer carries no score keeps its place below the scored
    ones of equal rank (its score is 0, ties keep the incoming order).
    """

    def __init__(self, gateway: Gateway, *, tier: int = 1, model: str | None = None,
                 concurrency: int = 4, max_passage_chars: int = 1500) -> None:
        self.gateway = gateway
        self.tier = tier
        self.model = model
        self.concurrency = concurrency
        self.max_passage_chars = max_passage_chars

    async def _score(self, query: str, hit: Hit, sem: asyncio.Semaphore) -> float:
        from conclave.llm.types import ChatRequest, Message, ResponseFormat

        passage = hit.chunk.text[: self.max_passage_chars]
        prompt = (
            "Rate how well the passage answers the search query, from 0 (unrelated) to 10 "
            "(answers it fully). Reply with JSON like {\"score\": 7}.\n\n"
            f"Query: {query}\n\nPassage: {passage}"
        )
        request = ChatRequest(
            messages=[Message.user(prompt)], tier=None if self.model else self.tier,
            model=self.model, max_tokens=12, temperature=0.0,
            response_format=ResponseFormat(type="json_schema", name="relevance",
                                           schema=_SCORE_SCHEMA),
            metadata={"operation": "rerank"},
        )
        async with sem:
            response = await self.gateway.complete(request)
        score = parse_score(response.text)
        return score if score is not None else 0.0

    async def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
        if not hits:
            return []
        sem = asyncio.Semaphore(self.concurrency)
        scores = await asyncio.gather(*(self._score(query, h, sem) for h in hits))
        return _reorder(hits, list(scores))


def build_reranker(kind: str, *, settings: Any, embedder: Any = None,
                   gateway: Gateway | None = None) -> Reranker | None:
    """The reranker ``kind`` names (``settings.rag.reranker`` by default); None for ``none``."""
    rag = settings.rag
    if kind == "none":
        return None
    if kind == "offline":
        from conclave.rag.embeddings import CachedEmbedder, LocalEmbedder

        inner = embedder.inner if isinstance(embedder, CachedEmbedder) else embedder
        if isinstance(inner, LocalEmbedder):
            return OfflineReranker(inner, embedder=embedder)
        # A remote index embedder would send every window over the network: the offline
        # reranker always runs the local model.
        return OfflineReranker(LocalEmbedder(rag.embedding_model_path,
                                             batch_size=rag.embed_batch_size))
    if kind == "cross-encoder":
        return CrossEncoderReranker(rag.cross_encoder_path)
    if kind == "llm":
        if gateway is None:
            raise ConclaveError("the LLM reranker needs a gateway",
                                hint="pass gateway= to the Retriever")
        return LlmReranker(gateway, tier=rag.llm_tier)
    raise ConfigError(f"unknown reranker {kind!r}",
                      hint="choose offline, cross-encoder, llm or none")

