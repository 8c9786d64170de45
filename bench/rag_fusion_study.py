"""How fusion rules compare on the dev sets, from full score matrices (no model in the loop).

    python bench/rag_fusion_study.py [--sets manpages,pydoc-paraphrase,pycode]
                                     [--data DIR] [--candidates 50] [--json]

Indexes each dev set exactly as ``conclave eval retrieval`` does (one chunk per
document when it fits 256 MiniLM tokens, the recursive chunker otherwise; real
MiniLM, embedded Qdrant, bm25s), then scores *every* query against *every*
chunk on both sides (the cosine of the MiniLM vectors, the BM25 score from the
index's own keyword side) and keeps the matrices (``--data`` keeps them and the
embedding cache between runs).  Each fusion rule is then a pure function of a
query's two candidate lists (the top ``--candidates`` of each side, as the
retriever sees them), evaluated like the CLI: chunk ranking -> each
document's first chunk -> nDCG@10.  ``x best`` is over the better of bm25 and
dense on that set; a rule is only worth having if it is >= 1.0 on every set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conclave.config import load_settings
from conclave.rag.eval import eval_index_name, index_dataset, load_beir
from conclave.rag.fusion import rrf, weighted
from conclave.rag.index import HybridIndex
from conclave.rag.metrics import evaluate

DEVSETS = Path(__file__).resolve().parent / "devsets"


class Matrices:
    """Every query against every chunk, both sides, for one dev set."""

    def __init__(self, path: Path) -> None:
        z = np.load(path, allow_pickle=False)
        self.dense = z["dense"]          # queries x chunks, cosine
        self.bm25 = z["bm25"]            # queries x chunks, BM25 (0 = no term matched)
        self.ceiling = z["ceiling"]      # per query: the most BM25 could score
        self.chunk_ids = [str(c) for c in z["chunk_ids"]]
        self.doc_of = [str(d) for d in z["doc_of"]]
        self.qids = [str(q) for q in z["qids"]]
        meta = json.loads(str(z["meta"]))
        self.qrels: dict[str, dict[str, int]] = meta["qrels"]
        self.queries: dict[str, str] = meta["queries"]


async def build(name: str, data: Path) -> Path:
    out = data / f"{name}.npz"
    if out.exists():
        return out
    ds = load_beir(DEVSETS / name)
    settings = load_settings(data_dir=data)
    index = await HybridIndex.open(settings, name=eval_index_name(ds.folder))
    try:
        await index_dataset(index, ds)
        side = index._keyword  # the study reads the keyword side's own BM25
        chunk_ids = list(side.chunk_ids)
        chunks = await index.chunks(chunk_ids)
        vecs = np.asarray(await index.embedder.embed([chunks[c].text for c in chunk_ids]))
        qids = list(ds.queries)
        qvecs = np.asarray(await index.embedder.embed([ds.queries[q] for q in qids]))
        vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        qvecs = qvecs / np.linalg.norm(qvecs, axis=1, keepdims=True)
        dense = (qvecs @ vecs.T).astype(np.float32)
        bm25 = np.zeros_like(dense)
        ceiling = np.zeros(len(qids), dtype=np.float32)
        for i, q in enumerate(qids):
            toks = index.tokenize(ds.queries[q])
            ids = [side.vocab[t] for t in dict.fromkeys(toks) if t in side.vocab]
            if ids:
                bm25[i] = side._bm25.get_scores(ids)
            ceiling[i] = index.keyword_max_score(ds.queries[q])
        meta = json.dumps({"qrels": ds.qrels, "queries": ds.queries})
        np.savez(out, dense=dense, bm25=bm25, ceiling=ceiling, chunk_ids=np.array(chunk_ids),
                 doc_of=np.array([chunks[c].doc_id for c in chunk_ids]),
                 qids=np.array(qids), meta=np.array(meta))
        return out
    finally:
        await index.aclose()


def top(scores: np.ndarray, k: int, positive: bool = False) -> list[int]:
    idx = np.flatnonzero(scores > 0) if positive else np.arange(len(scores))
    if len(idx) > k:
        idx = idx[np.argpartition(-scores[idx], k - 1)[:k]]
    return sorted(idx.tolist(), key=lambda i: -scores[i])


#: a rule: (matrices, query row, dense candidates, bm25 candidates) -> chunk ranking
Rule = Callable[[Matrices, int, list[int], list[int]], list[int]]


def ramp(conf: float, floor: float = 0.25, span: float = 0.2) -> float:
    return min(1.0, max(0.0, (conf - floor) / span))


def confidence(m: Matrices, i: int, bm: list[int]) -> float:
    return float(m.bm25[i, bm[0]] / m.ceiling[i]) if bm and m.ceiling[i] > 0 else 0.0


def rule_dense(m, i, de, bm):
    return de


def rule_bm25(m, i, de, bm):
    return bm


def rule_rrf(m, i, de, bm):
    return [int(c) for c, _ in rrf([[(str(c), 0) for c in de], [(str(c), 0) for c in bm]])]


def shared(m: Matrices, i: int, de: list[int], floor: float = 0.1) -> float:
    """The shared-vocabulary factor: the dense winner's BM25 fraction over ``floor``."""
    if not de or m.ceiling[i] <= 0:
        return 0.0
    return min(1.0, float(m.bm25[i, de[0]] / m.ceiling[i]) / floor)


def weighted_rule(*, gate: bool, groups: bool) -> Rule:
    """Min-max fusion, keyword side weighted by its confidence; the two options shipped."""
    def rule(m: Matrices, i: int, de: list[int], bm: list[int]) -> list[int]:
        w = ramp(confidence(m, i, bm))
        if gate and w > 0:
            w *= shared(m, i, de)
        fused = weighted([[(str(c), float(m.dense[i, c])) for c in de],
                          [(str(c), float(m.bm25[i, c])) for c in bm]], weights=[1.0, w],
                         groups={str(c): m.doc_of[c] for c in de + bm} if groups else None)
        return [int(c) for c, _ in fused]
    return rule


def oracle(m: Matrices, i: int, de: list[int], bm: list[int]) -> list[int]:
    """Not a rule: per query, whichever side ranks the relevant documents better."""
    rel = m.qrels[m.qids[i]]
    def ndcg(r: list[int]) -> float:
        docs = list(dict.fromkeys(m.doc_of[c] for c in r))
        return evaluate({"q": docs}, {"q": rel}, 10)["ndcg@10"]
    return de if ndcg(de) >= ndcg(bm) else bm


RULES: dict[str, Rule] = {
    "bm25": rule_bm25,
    "dense": rule_dense,
    "rrf k=60": rule_rrf,
    "weighted per chunk (before)": weighted_rule(gate=False, groups=False),
    "+ shared-vocabulary gate": weighted_rule(gate=True, groups=False),
    "+ document evidence": weighted_rule(gate=False, groups=True),
    "both (shipped)": weighted_rule(gate=True, groups=True),
    "oracle: better side per query": oracle,
}


def score(m: Matrices, rule: Rule, candidates: int, k: int = 10) -> dict[str, float]:
    run: dict[str, list[str]] = {}
    for i, q in enumerate(m.qids):
        de = top(m.dense[i], candidates)
        bm = top(m.bm25[i], candidates, positive=True)
        ranking = rule(m, i, de, bm)
        run[q] = list(dict.fromkeys(m.doc_of[c] for c in ranking))
    return evaluate(run, m.qrels, k)


def per_query(m: Matrices, rule: Rule, candidates: int, k: int = 10) -> dict[str, float]:
    out = {}
    for i, q in enumerate(m.qids):
        de = top(m.dense[i], candidates)
        bm = top(m.bm25[i], candidates, positive=True)
        docs = list(dict.fromkeys(m.doc_of[c] for c in rule(m, i, de, bm)))
        out[q] = evaluate({q: docs}, {q: m.qrels[q]}, k)["ndcg@10"]
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="manpages,pydoc-paraphrase,pycode")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data = args.data or Path(tempfile.mkdtemp(prefix="fusion-study-"))
    data.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    sets = args.sets.split(",")
    for name in sets:
        m = Matrices(await build(name, data))
        for rule_name, rule in RULES.items():
            results.setdefault(rule_name, {})[name] = score(m, rule, args.candidates)["ndcg@10"]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    best = {s: max(results["bm25"][s], results["dense"][s]) for s in sets}
    print(f"{'rule':32}" + "".join(f"{s:>26}" for s in sets) + f"{'worst x':>10}")
    for rule_name, row in results.items():
        worst = min(row[s] / best[s] if best[s] else math.nan for s in sets)
        print(f"{rule_name:32}" + "".join(
            f"{row[s]:>16.4f} {row[s] / best[s]:>7.3f}x  " for s in sets) + f"{worst:>9.3f}x")


if __name__ == "__main__":
    asyncio.run(main())
