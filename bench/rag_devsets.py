"""Shared pieces of the retrieval benchmarks: BEIR dev sets in, metrics out.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``),
``queries.jsonl`` (``_id``, ``text``) and ``qrels/test.tsv`` (query-id,
corpus-id, score).  Each corpus entry becomes one Document and one chunk
(title and text joined, as BEIR evaluations do), so the numbers measure
retrieval, not chunking.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from conclave.rag.types import Chunk, DocMetadata, Document  # noqa: E402

DEVSETS = ROOT / "devsets"


def load_beir(folder: Path) -> tuple[list[Document], dict[str, str], dict[str, dict[str, int]]]:
    docs = []
    for line in (folder / "corpus.jsonl").read_text().splitlines():
        row = json.loads(line)
        text = f"{row.get('title') or ''}\n{row['text']}".strip()
        docs.append(Document(id=row["_id"], text=text, metadata=DocMetadata(
            source=row["_id"], title=row.get("title"), content_type="text")))
    queries = {}
    for line in (folder / "queries.jsonl").read_text().splitlines():
        row = json.loads(line)
        queries[row["_id"]] = row["text"]
    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, cid, score = line.split("\t")
        if int(score) > 0:
            qrels.setdefault(qid, {})[cid] = int(score)
    queries = {q: t for q, t in queries.items() if q in qrels}
    return docs, queries, qrels


def whole_document(doc: Document) -> list[Chunk]:
    """The identity chunker: one chunk per document."""
    return [Chunk(id=Chunk.make_id(doc.id, 0, len(doc.text), doc.text), doc_id=doc.id,
                  text=doc.text, start=0, end=len(doc.text), metadata=doc.metadata)]


def ndcg_at(ranked: Sequence[str], rels: dict[str, int], k: int = 10) -> float:
    dcg = sum((2 ** rels.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(rels.values(), reverse=True)[:k]
    idcg = sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranked: Sequence[str], rels: dict[str, int], k: int = 10) -> float:
    return len(set(ranked[:k]) & set(rels)) / len(rels) if rels else 0.0


def mrr_at(ranked: Sequence[str], rels: dict[str, int], k: int = 10) -> float:
    for i, d in enumerate(ranked[:k]):
        if d in rels:
            return 1.0 / (i + 1)
    return 0.0


def evaluate(runs: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    n = len(qrels)
    return {
        "ndcg@10": sum(ndcg_at(runs.get(q, []), r) for q, r in qrels.items()) / n,
        "recall@10": sum(recall_at(runs.get(q, []), r) for q, r in qrels.items()) / n,
        "mrr@10": sum(mrr_at(runs.get(q, []), r) for q, r in qrels.items()) / n,
    }


def per_query_ndcg(runs: dict[str, list[str]], qrels: dict[str, dict[str, int]]
                   ) -> dict[str, float]:
    return {q: ndcg_at(runs.get(q, []), r) for q, r in qrels.items()}
