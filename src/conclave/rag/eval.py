"""Retrieval evaluation on a BEIR-format folder, stage by stage.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``),
``queries.jsonl`` (``_id``, ``text``) and ``qrels/<split>.tsv`` (a header,
then ``query-id``, ``corpus-id``, ``score`` separated by tabs).  Each corpus
record becomes one :class:`~conclave.rag.types.Document` whose text is the
title and text joined (as BEIR's own evaluations embed them); it is one chunk
when it fits the embedder's window (256 word pieces for MiniLM) and is cut by
the recursive chunker only when it is longer, so the figures measure
retrieval, not chunking.

The corpus goes into an index of its own (``eval-<hash of the folder path>``)
that is synced incrementally like any other, so a second run re-embeds
nothing.  Each stage ranks chunks; the ranking is mapped to corpus ids by
keeping each document's best chunk (its first occurrence: rankings are best
first, and a reranked head is not comparable by score with the tail it was
cut from, so position is the one order that holds across the list), and
nDCG, Recall and MRR at ``k`` come from :mod:`conclave.rag.metrics`.
Each stage also reports its wall time and median per-query latency; query
embeddings go through the embedding cache like any search, so after the
first stage (or run) they are lookups: these are not cold-query latencies
(``bench/rag_ingest.py`` measures those).

Stages, all through :class:`~conclave.rag.retrieval.Retriever`:
``bm25`` and ``dense`` (one side each), ``hybrid`` (both, fused),
``hybrid+rerank`` (the configured reranker over the fused head) and
``hybrid+multiquery`` (rewrites through the gateway at the RAG LLM tier,
which offline is the local model; slow on a CPU, which is why stages can be
picked).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conclave.errors import InvalidRequest
from conclave.rag.metrics import evaluate
from conclave.rag.types import Chunk, DocMetadata, Document, Hit

if TYPE_CHECKING:
    from conclave.accounting import Accounting
    from conclave.config import Settings
    from conclave.rag.index import HybridIndex, SyncReport
    from conclave.rag.retrieval import Mode, MultiQuery, Retriever

__all__ = [
    "STAGES",
    "BeirDataset",
    "DatasetError",
    "EvalProgress",
    "doc_ranking",
    "index_dataset",
    "load_beir",
    "run_eval",
    "run_stage",
    "versus_best_side",
]

STAGES = ("bm25", "dense", "hybrid", "hybrid+rerank", "hybrid+multiquery")
#: ``progress(stage, done, total)``: ``index`` while the corpus syncs, then one per stage
EvalProgress = Callable[[str, int, int], None]


class DatasetError(InvalidRequest):
    code = "dataset_error"


@dataclass
class BeirDataset:
    folder: Path
    documents: list[Document]
    #: query id -> text, only queries with at least one relevant judgement
    queries: dict[str, str]
    #: query id -> corpus id -> graded relevance
    qrels: dict[str, dict[str, int]]
    #: judged corpus ids that are not in the corpus (a broken dataset if many)
    missing_docs: set[str] = field(default_factory=set)


def _jsonl(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DatasetError(f"{path} is missing",
                           hint="a BEIR folder holds corpus.jsonl, queries.jsonl and "
                           "qrels/test.tsv")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DatasetError(f"{path.name} line {n} is not valid JSON ({exc})",
                                   hint="each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path.name} line {n} is not a JSON object")
            for key in required:
                if not isinstance(row.get(key), str) and not isinstance(row.get(key), int):
                    raise DatasetError(f"{path.name} line {n} has no {key!r} field",
                                       hint=f"each record needs {', '.join(required)}")
            rows.append(row)
    return rows


def load_beir(folder: Path, *, split: str = "test") -> BeirDataset:
    """Read a BEIR folder; a malformed file is an error naming the file and line."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist",
                           hint="pass a BEIR folder with corpus.jsonl, queries.jsonl, "
                           "qrels/test.tsv")
    documents: list[Document] = []
    seen: set[str] = set()
    for row in _jsonl(folder / "corpus.jsonl", ("_id", "text")):
        cid = str(row["_id"])
        if cid in seen:
            raise DatasetError(f"corpus.jsonl has the id {cid!r} twice",
                               hint="corpus ids must be unique")
        seen.add(cid)
        title = str(row.get("title") or "").strip()
        text = f"{title}\n{row['text']}".strip() if title else str(row["text"]).strip()
        if not text:
            continue
        documents.append(Document(id=cid, text=text, metadata=DocMetadata(
            source=cid, title=title or None, content_type="text")))
    queries = {str(r["_id"]): str(r["text"]) for r in _jsonl(folder / "queries.jsonl",
                                                             ("_id", "text"))}
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise DatasetError(f"{qrels_path} is missing",
                           hint=f"put the judgements in qrels/{split}.tsv "
                           "(query-id, corpus-id, score)")
    qrels: dict[str, dict[str, int]] = {}
    lines = qrels_path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if n == 1 and parts[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(parts) != 3:
            raise DatasetError(f"qrels/{split}.tsv line {n} has {len(parts)} fields",
                               hint="each line is query-id, corpus-id, score separated by tabs")
        qid, cid, score = (p.strip() for p in parts)
        try:
            rel = int(float(score))
        except ValueError:
            raise DatasetError(f"qrels/{split}.tsv line {n}: score {score!r} is not a number"
                               ) from None
        qrels.setdefault(qid, {})[cid] = rel
    judged = {q: r for q, r in qrels.items() if q in queries and any(v > 0 for v in r.values())}
    if not judged:
        raise DatasetError(f"no query in {folder.name} has a relevant judgement",
                           hint="qrels query ids must match queries.jsonl ids, with score > 0")
    missing = {c for r in judged.values() for c, v in r.items() if v > 0} - seen
    return BeirDataset(folder=folder, documents=documents,
                       queries={q: queries[q] for q in judged}, qrels=judged,
                       missing_docs=missing)


def doc_ranking(hits: Sequence[Hit]) -> list[str]:
    """Corpus ids in the order of each one's best (first) chunk."""
    return list(dict.fromkeys(h.chunk.doc_id for h in hits))


class _FitOrSplit:
    """One chunk per document when it fits ``max_tokens``; the recursive chunker otherwise."""

    def __init__(self, max_tokens: int = 256) -> None:
        from conclave.rag.chunkers import default_tokenizer, make_chunker

        self.max_tokens = max_tokens
        self.tokenizer = default_tokenizer()
        self.recursive = make_chunker("recursive", max_tokens=max_tokens,
                                      tokenizer=self.tokenizer)

    def chunk(self, doc: Document) -> list[Chunk]:
        if len(self.tokenizer.offsets(doc.text)) <= self.max_tokens:
            return [Chunk(id=Chunk.make_id(doc.id, 0, len(doc.text), doc.text),
                          doc_id=doc.id, text=doc.text, start=0, end=len(doc.text),
                          metadata=doc.metadata)]
        return self.recursive.chunk(doc)


def eval_index_name(folder: Path) -> str:
    return "eval-" + hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]


async def index_dataset(index: HybridIndex, dataset: BeirDataset,
                        progress: EvalProgress | None = None) -> SyncReport:
    """Sync the corpus into ``index`` (incremental: a second run embeds nothing)."""
    def tell(p: Any) -> None:
        if progress:
            progress(f"index:{p.stage}", p.done, p.total)

    return await index.sync(dataset.documents, _FitOrSplit(), progress=tell)


async def run_stage(stage: str, dataset: BeirDataset,
                    search: Callable[[str], Awaitable[list[Hit]]], *,
                    k: int = 10, concurrency: int = 1,
                    progress: EvalProgress | None = None) -> dict[str, float]:
    """Run ``search(query) -> hits`` for every query and score the document rankings."""
    run: dict[str, list[str]] = {}
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    done = 0
    total = len(dataset.queries)
    if progress:
        progress(stage, 0, total)

    async def one(qid: str, text: str) -> None:
        nonlocal done
        async with sem:
            t0 = time.perf_counter()
            hits = await search(text)
            latencies.append(time.perf_counter() - t0)
        run[qid] = doc_ranking(hits)
        done += 1
        if progress:
            progress(stage, done, total)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(q, t) for q, t in dataset.queries.items()))
    seconds = time.perf_counter() - t0
    scores: dict[str, float] = {
        name: round(v, 4) for name, v in evaluate(run, dataset.qrels, k).items()}
    scores["queries"] = int(scores["queries"])
    scores["seconds"] = round(seconds, 2)
    scores["p50_ms"] = round(statistics.median(latencies) * 1000, 1) if latencies else 0.0
    return scores


def _searcher(stage: str, retriever: Retriever, multi: MultiQuery | None,
              depth: int) -> Callable[[str], Awaitable[list[Hit]]]:
    """The search function of one stage: ``query -> hits`` (``depth`` chunks)."""
    if stage == "hybrid+multiquery":
        assert multi is not None
        return lambda q: multi.search(q, k=depth)
    if stage == "hybrid+rerank":
        return lambda q: retriever.search(q, k=depth, rerank=True)
    mode: Mode = "hybrid" if stage == "hybrid" else ("bm25" if stage == "bm25" else "dense")
    return lambda q: retriever.search(q, k=depth, mode=mode)


def versus_best_side(results: dict[str, dict[str, float]], k: int = 10
                     ) -> dict[str, dict[str, float]]:
    """Add ``vs_best_side`` to every stage: its nDCG over the better of bm25 and dense.

    Only when both single sides ran (and one scored above 0).  A hybrid stage below
    1.0 is worse than simply using the better side on this corpus.
    """
    key = f"ndcg@{k}"
    if "bm25" not in results or "dense" not in results:
        return results
    best = max(results["bm25"][key], results["dense"][key])
    if best <= 0:
        return results
    for r in results.values():
        r["vs_best_side"] = round(r[key] / best, 4)
    return results


def check_stages(stages: Sequence[str], k: int) -> None:
    """Refuse an empty or unknown stage list or a cut-off below 1, before any work."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise InvalidRequest(f"unknown stage {unknown[0]!r}" if unknown else "no stage given",
                             hint=f"choose from {', '.join(STAGES)}")
    if k < 1:
        raise InvalidRequest(f"k must be at least 1, got {k}")


async def run_eval(settings: Settings, dataset: BeirDataset, *,
                   stages: Sequence[str] = STAGES, k: int = 10, depth: int | None = None,
                   fresh: bool = False, multiquery_concurrency: int = 2,
                   progress: EvalProgress | None = None,
                   accounting: Accounting | None = None) -> dict[str, dict[str, float]]:
    """Index the corpus and score each stage; one result per stage, keyed by its name.

    ``accounting`` is where the model calls (rewrites, an LLM reranker, a remote
    embedder) are budgeted and recorded; without it they are not accounted.

    ``depth`` is how many chunks each query retrieves before they are mapped to
    documents (default ``max(5 * k, settings.rag.candidates)``), so a document
    with several chunks still leaves room for ``k`` distinct documents.
    """
    from conclave.rag.embeddings import is_remote
    from conclave.rag.index import HybridIndex
    from conclave.rag.retrieval import MultiQuery, Retriever

    check_stages(stages, k)
    depth = depth or max(5 * k, settings.rag.candidates)
    gateway = None
    needs_llm = "hybrid+multiquery" in stages or settings.rag.reranker == "llm"
    if needs_llm or is_remote(settings):
        # one gateway for the rewriter, the LLM reranker and a remote embedder
        from conclave.gateway import Gateway

        gateway = Gateway(settings, accounting=accounting)
    try:
        index = await HybridIndex.open(settings, name=eval_index_name(dataset.folder),
                                       gateway=gateway)
    except BaseException:
        if gateway is not None:
            await gateway.aclose()
        raise
    try:
        if fresh:
            await index.reset()
        await index_dataset(index, dataset, progress)
        retriever = Retriever(index, settings=settings.rag, gateway=gateway)
        results: dict[str, dict[str, float]] = {}
        multi = MultiQuery(retriever, gateway) if gateway is not None else None
        for stage in STAGES:
            if stage not in stages:
                continue
            concurrency = multiquery_concurrency if stage == "hybrid+multiquery" else 1
            results[stage] = await run_stage(
                stage, dataset, _searcher(stage, retriever, multi, depth), k=k,
                concurrency=concurrency, progress=progress)
        return versus_best_side(results, k)
    finally:
        try:
            await index.aclose()
        finally:
            if gateway is not None:
                await gateway.aclose()
