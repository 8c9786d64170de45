"""Retrieval evaluation on a tiny hand-made BEIR folder whose BM25 ranking is known.

Corpus (one short record each, so one chunk each; each query word is in one or
two documents, so the BM25 order is clear without computing a score):

* q1 "aardvark termites": d1 holds both words, d3 only "aardvark" (which is in two
  documents, so worth less): ranking d1, d3; judged d1=2, d3=1, so
  nDCG = (2/log2 2 + 1/log2 3) / same = 1, Recall 1, MRR 1.
* q2 "glaciers carve ash": d5 holds two of the words, the relevant d4 one: ranking
  d5, d4; nDCG = (1/log2 3) / 1 = 0.6309, Recall 1, MRR 1/2.
* q3 "quantum chromodynamics": no document holds either word; BM25 returns nothing:
  0, 0, 0.
* q4 has only a zero judgement and q5 none: neither is scored (BEIR convention).

Means over the three scored queries: nDCG (1 + 0.63093 + 0) / 3, Recall 2/3, MRR 1/2.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conclave.config import load_settings
from conclave.rag.eval import STAGES, DatasetError, doc_ranking, load_beir, run_eval

CORPUS = [
    {"_id": "d1", "title": "", "text": "The aardvark eats termites at night."},
    {"_id": "d2", "title": "", "text": "Bananas are yellow fruit rich in potassium."},
    {"_id": "d3", "title": "", "text": "Aardvark burrows are dug in the savanna soil."},
    {"_id": "d4", "title": "", "text": "Volcanoes erupt lava and ash."},
    {"_id": "d5", "title": "", "text": "Glaciers carve valleys over thousands of years."},
    {"_id": "d6", "title": "Long", "text": " ".join(
        f"Paragraph {i} is about lighthouse keepers who log every passing ship." for i in
        range(60))},
]
QUERIES = [
    {"_id": "q1", "text": "aardvark termites"},
    {"_id": "q2", "text": "glaciers carve ash"},
    {"_id": "q3", "text": "quantum chromodynamics"},
    {"_id": "q4", "text": "bananas"},
    {"_id": "q5", "text": "unjudged question"},
]
QRELS = [("q1", "d1", 2), ("q1", "d3", 1), ("q2", "d4", 1), ("q3", "d2", 1), ("q4", "d2", 0)]

NDCG = (1 + 1 / math.log2(3) + 0) / 3
RECALL = 2 / 3
MRR = (1 + 0.5 + 0) / 3


def write_beir(folder: Path, corpus=CORPUS, queries=QUERIES, qrels=QRELS) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{c}\t{s}\n" for q, c, s in qrels))
    return folder


@pytest.fixture
def beir(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "tiny")


def test_load_beir(beir: Path):
    ds = load_beir(beir)
    assert [d.id for d in ds.documents] == ["d1", "d2", "d3", "d4", "d5", "d6"]
    assert ds.documents[0].text == "The aardvark eats termites at night."
    assert ds.documents[5].text.startswith("Long\nParagraph 0")
    assert set(ds.queries) == {"q1", "q2", "q3"}  # q4: zero judgement, q5: none
    assert ds.qrels["q1"] == {"d1": 2, "d3": 1}
    assert ds.missing_docs == set()


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda f: (f / "qrels" / "test.tsv").unlink(), "qrels/test.tsv is missing"),
    (lambda f: (f / "corpus.jsonl").write_text('{"_id": "d1", "text": "ok"}\n{broken\n'),
     "corpus.jsonl line 2 is not valid JSON"),
    (lambda f: (f / "queries.jsonl").write_text('{"text": "no id"}\n'),
     "queries.jsonl line 1 has no '_id' field"),
    (lambda f: (f / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1 d1 1\n"),
     "qrels/test.tsv line 2 has 1 fields"),
    (lambda f: (f / "qrels" / "test.tsv").write_text("q9\td1\t1\n"),
     "no query in tiny has a relevant judgement"),
])
def test_bad_dataset_is_a_clear_error(beir: Path, mutate, needle):
    mutate(beir)
    with pytest.raises(DatasetError, match=needle.replace("(", r"\(")):
        load_beir(beir)


def test_doc_ranking_keeps_each_documents_best_chunk():
    from conclave.rag.types import Chunk, DocMetadata, Hit

    def hit(doc: str, n: int, score: float) -> Hit:
        c = Chunk(id=f"{doc}-{n}", doc_id=doc, text="t", start=0, end=1,
                  metadata=DocMetadata(source=doc, content_type="text"))
        return Hit(chunk=c, score=score)

    hits = [hit("a", 1, 0.9), hit("b", 1, 0.8), hit("a", 2, 0.7), hit("c", 1, 0.6),
            hit("b", 2, 0.5)]
    assert doc_ranking(hits) == ["a", "b", "c"]
    assert doc_ranking([]) == []


def test_bm25_metrics_equal_the_hand_computed_values(beir: Path, tmp_path: Path):
    settings = load_settings(data_dir=tmp_path / "data")
    ds = load_beir(beir)
    stages = ("bm25", "dense", "hybrid", "hybrid+rerank")
    results = asyncio.run(run_eval(settings, ds, stages=stages))
    assert list(results) == list(stages)
    bm25 = results["bm25"]
    assert bm25["ndcg@10"] == pytest.approx(NDCG, abs=1e-4)
    assert bm25["recall@10"] == pytest.approx(RECALL, abs=1e-4)
    assert bm25["mrr@10"] == pytest.approx(MRR, abs=1e-4)
    assert bm25["queries"] == 3
    for r in results.values():
        for key in ("ndcg@10", "recall@10", "mrr@10"):
            assert 0.0 <= r[key] <= 1.0
    # dense finds the aardvark document for q1 too: it is a real embedding, not noise
    assert results["dense"]["mrr@10"] > 1 / 3
    best = max(results["bm25"]["ndcg@10"], results["dense"]["ndcg@10"])
    for r in results.values():
        assert r["vs_best_side"] == pytest.approx(r["ndcg@10"] / best, abs=1e-4)
    assert max(results["bm25"]["vs_best_side"], results["dense"]["vs_best_side"]) == 1.0

    # the long record was chunked, the short ones were not; a second run re-embeds nothing
    from conclave.rag.eval import eval_index_name
    from conclave.rag.index import HybridIndex

    async def chunks_per_doc() -> dict[str, int]:
        index = await HybridIndex.open(settings, name=eval_index_name(beir))
        try:
            return {d: len(e.chunks) for d, e in index._state.docs.items()}
        finally:
            await index.aclose()

    per_doc = asyncio.run(chunks_per_doc())
    assert per_doc["d6"] > 1
    assert all(per_doc[d] == 1 for d in ("d1", "d2", "d3", "d4", "d5"))
    seen: list[tuple[str, int, int]] = []
    asyncio.run(run_eval(settings, ds, stages=("bm25",), k=5,
                         progress=lambda s, d, t: seen.append((s, d, t))))
    assert ("bm25", 3, 3) in seen
    assert not any(s == "index:embed" for s, _, _ in seen)  # nothing changed, nothing embedded


def test_eval_cli_json_is_keyed_by_stage(beir: Path, tmp_path: Path):
    from conclave.cli import main

    if not any(c.name == "index" for c in main.app.registered_commands):
        main._mount_subcommands()
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CONCLAVE_")}
    env.update(CONCLAVE_DATA_DIR=str(tmp_path / "data"),
               CONCLAVE_CONFIG=str(tmp_path / "none.yaml"))
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(main.app, list(args), env=env, catch_exceptions=False)

    r = invoke("eval", "retrieval", "--dataset", str(beir), "--stages", "bm25,dense", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert list(data) == ["bm25", "dense"]
    assert set(data["bm25"]) >= {"ndcg@10", "recall@10", "mrr@10"}
    assert data["bm25"]["ndcg@10"] == pytest.approx(NDCG, abs=1e-4)

    assert data["dense"]["vs_best_side"] == pytest.approx(
        data["dense"]["ndcg@10"] / max(data["bm25"]["ndcg@10"], data["dense"]["ndcg@10"]),
        abs=1e-4)

    r = invoke("eval", "retrieval", "--dataset", str(beir), "--stages", "bm25", "--k", "1")
    assert r.exit_code == 0, r.stderr
    assert "nDCG@1" in r.stdout and "bm25" in r.stdout and "vs best side" not in r.stdout
    r = invoke("eval", "retrieval", "--dataset", str(beir), "--stages", "bm25,dense,hybrid")
    assert r.exit_code == 0, r.stderr
    assert "vs best side" in r.stdout and "1.000x" in r.stdout

    r = invoke("eval", "retrieval", "--dataset", str(beir), "--stages", "bm25,colbert")
    assert r.exit_code == 1 and "unknown stage 'colbert'" in r.stderr
    r = invoke("eval", "retrieval", "--dataset", str(tmp_path / "nothing"))
    assert r.exit_code == 1 and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.llama
async def test_multiquery_stage_goes_through_the_local_model(llama_server, beir: Path):
    ds = load_beir(beir)
    results = await run_eval(llama_server.settings, ds, stages=("hybrid", "hybrid+multiquery"))
    assert list(results) == ["hybrid", "hybrid+multiquery"]
    mq = results["hybrid+multiquery"]
    assert mq["queries"] == 3 and 0.0 <= mq["ndcg@10"] <= 1.0
    # the rewrites are extra retrievals fused with the original (counted double), so the
    # clearly answerable query q1 still ranks its best document first
    assert mq["mrr@10"] >= 1 / 3
    assert STAGES[-1] == "hybrid+multiquery"
