"""Fusion and reranking on both dev sets, through the real Retriever.

    python bench/rag_fusion_rerank.py [--data DIR] [--rerank-top N]

Indexes each dev set (one chunk per document, real MiniLM, Qdrant local
mode; ``--data`` keeps the index and embedding cache between runs) and
prints nDCG@10 / Recall@10 / MRR@10 for: bm25, dense, hybrid with RRF
(k=60), hybrid with confidence-weighted fusion (the default), and the
default hybrid followed by the offline reranker (and by RRF + reranker),
with per-query latency.  ``vs best side`` is a stage's nDCG@10 over the
better of bm25 and dense on that dev set.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from conclave.config import load_settings
from conclave.rag.index import HybridIndex
from conclave.rag.retrieval import Retriever
from rag_devsets import DEVSETS, evaluate, load_beir, whole_document

STAGES = [
    ("bm25", {"mode": "bm25"}),
    ("dense", {"mode": "dense"}),
    ("hybrid rrf", {"mode": "hybrid", "fusion": "rrf"}),
    ("hybrid weighted", {"mode": "hybrid", "fusion": "weighted"}),
    ("hybrid weighted+rerank", {"mode": "hybrid", "fusion": "weighted", "rerank": True}),
    ("hybrid rrf+rerank", {"mode": "hybrid", "fusion": "rrf", "rerank": True}),
]


async def run_set(name: str, data_dir: Path, top_n: int) -> list[tuple[str, dict, float]]:
    docs, queries, qrels = load_beir(DEVSETS / name)
    settings = load_settings(data_dir=data_dir, rag={"rerank_top_n": top_n})
    index = await HybridIndex.open(settings, name=name.replace("-", "_"))
    try:
        await index.sync(docs, whole_document)
        retriever = Retriever(index, settings=settings.rag)
        # warm the model once so the first query's latency is not the load time
        await retriever.search("warm up", k=1, mode="hybrid", rerank=True)
        rows = []
        for stage, kwargs in STAGES:
            runs, lat = {}, []
            for qid, text in queries.items():
                t = time.perf_counter()
                hits = await retriever.search(text, k=10, **kwargs)
                lat.append((time.perf_counter() - t) * 1000)
                runs[qid] = [h.chunk.doc_id for h in hits]
            rows.append((stage, evaluate(runs, qrels), statistics.median(lat)))
        return rows
    finally:
        await index.aclose()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--rerank-top", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data or Path(tmp)
        for name in ("manpages", "pydoc-paraphrase"):
            rows = await run_set(name, data_dir, args.rerank_top)
            best = max(m["ndcg@10"] for s, m, _ in rows if s in ("bm25", "dense"))
            print(f"\n{name}  (rerank top {args.rerank_top})")
            print(f"{'stage':<24} {'nDCG@10':>8} {'R@10':>6} {'MRR@10':>7} "
                  f"{'vs best side':>12} {'p50 ms':>8}")
            for stage, m, p50 in rows:
                print(f"{stage:<24} {m['ndcg@10']:>8.4f} {m['recall@10']:>6.3f} "
                      f"{m['mrr@10']:>7.4f} {m['ndcg@10'] / best:>11.3f}x {p50:>8.1f}")


if __name__ == "__main__":
    asyncio.run(main())
