"""Which keyword side for the hybrid index: bm25s, or Qdrant sparse vectors with IDF?

    python bench/rag_keyword_side.py [--scale 10]

Both score BM25 over the same tokens (Conclave's tokenizer: words, English
stop words out, Snowball stems, identifiers split):

* ``bm25s``: :class:`conclave.rag.store.keyword.KeywordSide` (a CSC score
  matrix, numpy scoring), exactly what the index uses.
* ``qdrant-sparse``: one sparse vector per chunk in a Qdrant collection in
  embedded local mode (the default deployment), ``Modifier.IDF`` so Qdrant
  supplies the IDF; the client stores the BM25 term-frequency part
  ``tf*(k1+1)/(tf + k1*(1-b+b*len/avglen))`` (token ids from crc32) and
  queries with weight 1 per distinct query token.

Quality: nDCG@10 on both dev sets.  Latency: per-query wall time (median
and 95th percentile) on each dev set and on a corpus ``--scale`` times the
larger dev set (copies of the pydoc corpus under new ids), since local-mode
cost grows with the number of points.  Indexing time is shown too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

from conclave.rag.store.keyword import KeywordSide, Tokenizer
from rag_devsets import DEVSETS, evaluate, load_beir, whole_document

K1, B = 1.2, 0.75


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


class Bm25sSide:
    name = "bm25s"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer

    def build(self, docs) -> None:
        chunks = [c for d in docs for c in whole_document(d)]
        self.doc_of = {c.id: c.doc_id for c in chunks}
        self.side = KeywordSide(tokenizer_name=self.tok.name, k1=K1, b=B).rebuilt(
            remove=(), add=chunks, tokenizer=self.tok)

    def search(self, query: str, k: int) -> list[str]:
        return [self.doc_of[c] for c, _ in self.side.search(self.tok(query), k)]

    def close(self) -> None:
        pass


class QdrantSparseSide:
    name = "qdrant-sparse"

    def __init__(self, tokenizer: Tokenizer, path: Path) -> None:
        from qdrant_client import QdrantClient
        from qdrant_client.http import models as qm

        self.tok = tokenizer
        self.qm = qm
        self.client = QdrantClient(path=str(path))
        self.client.create_collection(
            "kw", vectors_config={},
            sparse_vectors_config={"bm25": qm.SparseVectorParams(modifier=qm.Modifier.IDF)})

    @staticmethod
    def _id(token: str) -> int:
        return zlib.crc32(token.encode()) & 0x7FFFFFFF

    def build(self, docs) -> None:
        qm = self.qm
        toks = [self.tok(d.text) for d in docs]
        avg = sum(len(t) for t in toks) / max(1, len(toks))
        points = []
        for i, (d, t) in enumerate(zip(docs, toks, strict=True)):
            counts = Counter(self._id(w) for w in t)
            norm = K1 * (1 - B + B * len(t) / avg)
            idx = sorted(counts)
            vals = [counts[j] * (K1 + 1) / (counts[j] + norm) for j in idx]
            points.append(qm.PointStruct(id=i, vector={"bm25": qm.SparseVector(
                indices=idx, values=vals)}, payload={"doc_id": d.id}))
        for j in range(0, len(points), 500):
            self.client.upsert("kw", points=points[j:j + 500])

    def search(self, query: str, k: int) -> list[str]:
        qm = self.qm
        ids = sorted({self._id(w) for w in self.tok(query)})
        if not ids:
            return []
        res = self.client.query_points("kw", query=qm.SparseVector(indices=ids,
                                                                   values=[1.0] * len(ids)),
                                       using="bm25", limit=k, with_payload=True)
        return [p.payload["doc_id"] for p in res.points]

    def close(self) -> None:
        self.client.close()


def measure(side, docs, queries, qrels, k: int = 10) -> dict[str, float]:
    t0 = time.perf_counter()
    side.build(docs)
    build_s = time.perf_counter() - t0
    runs, lat = {}, []
    for qid, text in queries.items():
        t = time.perf_counter()
        runs[qid] = side.search(text, k)
        lat.append((time.perf_counter() - t) * 1000)
    out = {"build_s": build_s, "p50_ms": statistics.median(lat), "p95_ms": pct(lat, 0.95)}
    if qrels is not None:
        out["ndcg@10"] = evaluate(runs, qrels)["ndcg@10"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=10,
                    help="copies of the pydoc corpus for the latency-at-scale row")
    args = ap.parse_args()
    tok = Tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = {name: load_beir(DEVSETS / name) for name in ("manpages", "pydoc-paraphrase")}
        docs, queries, _ = sets["pydoc-paraphrase"]
        big = [d.model_copy(update={"id": f"{d.id}#{i}"}) for i in range(args.scale)
               for d in docs]
        cases = [*((n, d, q, r) for n, (d, q, r) in sets.items()),
                 (f"pydoc x{args.scale}", big, queries, None)]
        for name, d, q, r in cases:
            for make in (lambda: Bm25sSide(tok),
                         lambda n=name: QdrantSparseSide(tok, Path(tmp) / n.replace(" ", "_"))):
                side = make()
                try:
                    m = measure(side, d, q, r)
                finally:
                    side.close()
                rows.append((name, len(d), side.name, m))
                print(f"  done: {name} {side.name}", file=sys.stderr)
    print(f"\n{'corpus':<20} {'docs':>6} {'keyword side':<14} {'nDCG@10':>8} "
          f"{'p50 ms':>8} {'p95 ms':>8} {'build s':>8}")
    for name, n, side, m in rows:
        nd = f"{m['ndcg@10']:.4f}" if "ndcg@10" in m else "-"
        print(f"{name:<20} {n:>6} {side:<14} {nd:>8} {m['p50_ms']:>8.2f} "
              f"{m['p95_ms']:>8.2f} {m['build_s']:>8.2f}")


if __name__ == "__main__":
    main()
