"""Retrieval quality metrics over graded relevance judgements (BEIR/TREC conventions).

Pure functions so they can be checked against hand-computed values:

* nDCG@k with gain ``rel`` (not ``2**rel - 1``, as in BEIR's pytrec_eval default)
  and log2 discount, normalised by the ideal ranking of the judged documents;
* Recall@k: judged-relevant documents (rel > 0) found in the top k over all of them;
* MRR@k: reciprocal rank of the first relevant document in the top k, else 0.

Queries with no relevant judgement are skipped, as pytrec_eval does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Sequence[str]]


def ndcg_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    dcg = sum(judged.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted((r for r in judged.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    relevant = {d for d, r in judged.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant & set(ranked[:k])) / len(relevant)


def mrr_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    for i, doc in enumerate(ranked[:k]):
        if judged.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def evaluate(run: Run, qrels: Qrels, k: int = 10) -> dict[str, float]:
    """Mean of each metric over the queries that have a relevant judgement."""
    scored = [q for q, judged in qrels.items() if any(r > 0 for r in judged.values())]
    if not scored:
        return {f"ndcg@{k}": 0.0, f"recall@{k}": 0.0, f"mrr@{k}": 0.0, "queries": 0}
    totals = {"ndcg": 0.0, "recall": 0.0, "mrr": 0.0}
    for q in scored:
        ranked = run.get(q, [])
        totals["ndcg"] += ndcg_at_k(ranked, qrels[q], k)
        totals["recall"] += recall_at_k(ranked, qrels[q], k)
        totals["mrr"] += mrr_at_k(ranked, qrels[q], k)
    n = len(scored)
    return {f"ndcg@{k}": totals["ndcg"] / n, f"recall@{k}": totals["recall"] / n,
            f"mrr@{k}": totals["mrr"] / n, "queries": n}
