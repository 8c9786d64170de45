"""Fusing ranked lists from several retrievers into one (pure functions).

A ranking is a sequence of ``(id, score)`` pairs, best first.  Every function
here is deterministic: duplicates within one ranking keep their first (best)
occurrence, and equal fused scores are ordered by id, so the same inputs
always give the same order (a reranker or a cache downstream can rely on it).

* :func:`rrf`: reciprocal rank fusion, ``sum_i w_i / (k + rank_i)``; uses ranks
  only, so it needs no calibration between a cosine and a BM25 score.
* :func:`weighted`: per-side min-max normalised scores, summed with weights.
  A side whose scores are all equal carries no ordering information: it
  contributes 1 for each of its members when the common score is positive (a
  lone hit, or ties that all matched) and 0 when it is zero (nothing matched).

Which default, measured (``bench/rag_fusion_rerank.py``, real MiniLM + bm25s,
nDCG@10, ``x`` = over the better single side of that dev set)::

    stage                         manpages          pydoc-paraphrase
    bm25                          0.8247  0.946x    0.0598  0.129x
    dense                         0.8721  1.000x    0.4655  1.000x
    hybrid, RRF k=60              0.8972  1.029x    0.2595  0.558x
    hybrid, confidence-weighted   0.8987  1.030x    0.4576  0.983x   <- default
    hybrid weighted + rerank      0.9225  1.058x    0.4932  1.059x
    hybrid RRF + rerank           0.9225  1.058x    0.4948  1.063x

Plain RRF gives a side that knows nothing the same say as one that knows a
lot: on the paraphrase set, where BM25 matches only incidental words, it
halves nDCG.  No fixed weight helps both sets (0.7/0.3 RRF: 0.896 / 0.331),
so the retriever weights the keyword side per query by its own confidence,
measured without any model: the best BM25 score as a fraction of the most
the query could score (every term matched, term frequency saturated).
Paraphrased questions reach 9-20% of that ceiling (90% of queries), questions
sharing the passage's words 35-77%; the weight ramps from 0 at 25% to 1 at
45% (:meth:`conclave.rag.retrieval.Retriever.keyword_weight`).  The cost is
1.7% below dense on the paraphrase set, within one query's worth of nDCG
(48 queries).  Other schemes tried on the same runs (per-query gates on term
coverage or on the cosine of BM25's top hit, per-passage coverage weights,
z-score fusion, cosine plus a scaled BM25 score) either lost as much on the
paraphrase set or gave up most of the gain on manpages; none reached dense
there.  The reranker then lifts both sets above 1.05x the better side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["Ranking", "dedupe", "minmax", "rrf", "weighted"]

Ranking = Sequence[tuple[str, float]]


def dedupe(ranking: Ranking) -> list[tuple[str, float]]:
    """The ranking with repeated ids dropped (the first, best-ranked one stays)."""
    seen: set[str] = set()
    out: list[tuple[str, float]] = []
    for item_id, score in ranking:
        if item_id not in seen:
            seen.add(item_id)
            out.append((item_id, float(score)))
    return out


def _ordered(scores: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} rankings")
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")
    return [float(w) for w in weights]


def rrf(rankings: Sequence[Ranking], *, k: int = 60,
        weights: Sequence[float] | None = None) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: each list gives ``w / (k + rank)`` (rank from 1) to its ids."""
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    ws = _weights(len(rankings), weights)
    fused: dict[str, float] = {}
    for ranking, w in zip(rankings, ws, strict=True):
        for rank, (item_id, _) in enumerate(dedupe(ranking), start=1):
            fused[item_id] = fused.get(item_id, 0.0) + w / (k + rank)
    return _ordered(fused)


def minmax(ranking: Ranking) -> dict[str, float]:
    """Scores scaled to [0, 1] within one ranking (see the module docstring for ties)."""
    items = dedupe(ranking)
    if not items:
        return {}
    values = [s for _, s in items if math.isfinite(s)]
    lo, hi = (min(values), max(values)) if values else (0.0, 0.0)
    out: dict[str, float] = {}
    for item_id, s in items:
        if not math.isfinite(s):
            out[item_id] = 1.0 if s > 0 else 0.0
        elif hi > lo:
            out[item_id] = (s - lo) / (hi - lo)
        else:
            out[item_id] = 1.0 if hi > 0 else 0.0
    return out


def weighted(rankings: Sequence[Ranking], *,
             weights: Sequence[float] | None = None,
             groups: Mapping[str, str] | None = None) -> list[tuple[str, float]]:
    """Weighted sum of per-ranking min-max normalised scores (missing counts as 0).

    ``groups`` maps an item to the group it belongs to (a chunk to its document).
    With it, each group's best item (by its own fused score) carries the group's
    evidence: on every ranking, the best normalised score of any item in the group.
    A document whose first chunk is the dense side's best and whose second chunk
    is the keyword side's best then ranks as a document both sides put first,
    instead of as two chunks each only one side knows.  The group's other items
    keep their own score, which is never above the group's, so they rank on their
    own merit below it.  Items missing from ``groups`` are groups of one.
    """
    ws = _weights(len(rankings), weights)
    sides = [minmax(ranking) for ranking in rankings]
    fused: dict[str, float] = {}
    for side, w in zip(sides, ws, strict=True):
        for item_id, s in side.items():
            fused[item_id] = fused.get(item_id, 0.0) + w * s
    if groups:
        group_score: dict[str, float] = {}
        for side, w in zip(sides, ws, strict=True):
            best: dict[str, float] = {}
            for item_id, s in side.items():
                g = groups.get(item_id, item_id)
                best[g] = max(best.get(g, 0.0), s)
            for g, s in best.items():
                group_score[g] = group_score.get(g, 0.0) + w * s
        leaders: dict[str, str] = {}
        for item_id, _ in _ordered(fused):
            leaders.setdefault(groups.get(item_id, item_id), item_id)
        for g, item_id in leaders.items():
            fused[item_id] = group_score[g]
    return _ordered(fused)
