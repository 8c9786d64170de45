"""Retrieval: filters identical on both sides, fusion in the Retriever, rerankers, multi-query.

The filter tests are property tests: a corpus with random metadata, many random
filters, and for each one the dense side (a Qdrant payload filter), the keyword
side (a mask before BM25 ranking) and the whole Retriever must return exactly
the chunks :meth:`Filter.matches` (the reference semantics) admits.

The LLM reranker and the multi-query rewriter go through the real Gateway to an
OpenAI-compatible provider on a loopback server speaking the chat wire format.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conclave.errors import ConfigError, InvalidRequest
from conclave.gateway import Gateway
from conclave.rag.index import HybridIndex
from conclave.rag.rerank import (
    CrossEncoderReranker,
    LlmReranker,
    OfflineReranker,
    parse_score,
    passage_windows,
)
from conclave.rag.retrieval import MultiQuery, Retriever, parse_rewrites
from conclave.rag.types import Chunk, DocMetadata, Document, Filter
from tests.support.settings import make_settings
from tests.support.wire_server import RecordedRequest, ScriptedResponse, WireServer

DIRS = ["docs", "docs/api", "docs/api/v2", "docsx", "src", "src/lib"]
HEADINGS = [[], ["Guide"], ["Guide", "Install"], ["Guide", "Install", "Linux"],
            ["Reference"], ["Reference", "API"], ["Guide / Install"]]
TAGS = ["ops", "db", "api", "security"]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima"]
BASE = datetime(2024, 1, 1, tzinfo=UTC)


def random_corpus(seed: int = 3, n: int = 24) -> tuple[list[Document], dict[str, list[Chunk]]]:
    rng = random.Random(seed)
    docs, chunks = [], {}
    for i in range(n):
        ctype = rng.choice(["markdown", "code", "pdf", "text"])
        meta = DocMetadata(
            source=f"{rng.choice(DIRS)}/file{i}.{'py' if ctype == 'code' else 'md'}",
            title=f"File {i}", content_type=ctype,
            language=rng.choice(["python", "go"]) if ctype == "code" else None,
            modified=None if rng.random() < 0.2 else BASE + timedelta(days=rng.randint(0, 700)),
            tags=rng.sample(TAGS, rng.randint(0, 2)),
        )
        parts = [f"common {' '.join(rng.sample(WORDS, 4))} part {j} of file {i}"
                 for j in range(2)]
        text = "\n\n".join(parts)
        d = Document(id=f"doc{i}", text=text, metadata=meta)
        out, pos = [], 0
        for p in parts:
            start = text.index(p, pos)
            pos = start + len(p)
            out.append(Chunk(id=Chunk.make_id(d.id, start, pos, p), doc_id=d.id, text=p,
                             start=start, end=pos, heading_path=rng.choice(HEADINGS),
                             page=1 if ctype == "pdf" else None, metadata=meta))
        docs.append(d)
        chunks[d.id] = out
    return docs, chunks


def random_filter(rng: random.Random) -> Filter:
    f: dict = {}
    if rng.random() < 0.3:
        f["modified_after"] = BASE + timedelta(days=rng.randint(0, 700))
    if rng.random() < 0.3:
        f["modified_before"] = BASE + timedelta(days=rng.randint(0, 700))
    if rng.random() < 0.3:
        f["tags_any"] = rng.sample([*TAGS, "none"], rng.randint(1, 2))
    if rng.random() < 0.3:
        f["content_types"] = rng.sample(["markdown", "code", "pdf", "text", "html"],
                                        rng.randint(1, 2))
    if rng.random() < 0.2:
        f["languages"] = rng.sample(["python", "go", "rust"], rng.randint(1, 2))
    if rng.random() < 0.35:
        f["path_prefix"] = rng.choice(["docs", "docs/", "docs/api", "docs/api/", "src/l",
                                       "nomatch/", "d", "src/lib/file1"])
    if rng.random() < 0.35:
        f["heading_prefix"] = rng.choice([["Guide"], ["Guide", "Install"], ["Reference", "API"],
                                          ["Guide", "Install", "Linux"], ["Nope"], ["Guide /"]])
    return Filter(**f)


@pytest.fixture(scope="module")
async def corpus_index(tmp_path_factory: pytest.TempPathFactory):
    docs, chunks = random_corpus()
    settings = make_settings(tmp_path_factory.mktemp("rag"))
    index = await HybridIndex.open(settings)
    await index.sync(docs, lambda d: chunks[d.id])
    yield index, [c for cs in chunks.values() for c in cs]
    await index.aclose()


async def test_filters_mean_the_same_on_both_sides_and_in_the_retriever(corpus_index) -> None:
    index, chunks = corpus_index
    retriever = Retriever(index)
    vector = (await index.embedder.embed(["common"]))[0]
    rng = random.Random(11)
    nonempty = empty = 0
    for _ in range(120):
        f = random_filter(rng)
        expected = {c.id for c in chunks if f.matches(c)}
        dense = {c.id for c, _ in await index.dense_search(vector, k=1000, filter=f)}
        keyword = {cid for cid, _ in index.keyword_search("common", k=1000, filter=f)}
        assert dense == expected, f
        assert keyword == expected, f
        for mode in ("hybrid", "dense", "bm25"):
            hits = await retriever.search("common", k=100, filter=f, mode=mode)
            assert {h.chunk.id for h in hits} == expected, (mode, f)
            assert all(f.matches(h.chunk) for h in hits)
        nonempty += bool(expected)
        empty += not expected
    # the random filters exercised both outcomes
    assert nonempty > 20 and empty > 10


async def test_keyword_side_is_masked_before_ranking_not_after(corpus_index) -> None:
    index, chunks = corpus_index
    # k=1: post-filtering the global top hit would usually return nothing
    for c in chunks[:10]:
        f = Filter(path_prefix=c.metadata.source, heading_prefix=c.heading_path)
        top = index.keyword_search("common", k=1, filter=f)
        assert len(top) == 1
        got = (await index.chunks([top[0][0]]))[top[0][0]]
        assert f.matches(got)


async def test_empty_results_are_an_empty_list(corpus_index) -> None:
    index, _ = corpus_index
    retriever = Retriever(index)
    nothing = Filter(path_prefix="no/such/dir/")
    for mode in ("hybrid", "dense", "bm25"):
        assert await retriever.search("common alpha", filter=nothing, mode=mode) == []
        assert await retriever.search("common alpha", filter=nothing, mode=mode,
                                      rerank=True) == []
    assert await retriever.search("zzzqqq", mode="bm25") == []
    assert await retriever.search("common", filter=Filter(tags_any=["none"])) == []


async def test_bad_search_arguments_are_refused(corpus_index) -> None:
    retriever = Retriever(corpus_index[0])
    with pytest.raises(InvalidRequest, match="empty"):
        await retriever.search("   ")
    with pytest.raises(InvalidRequest, match="k must be"):
        await retriever.search("common", k=0)
    with pytest.raises(InvalidRequest, match="unknown search mode"):
        await retriever.search("common", mode="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="unknown fusion"):
        await retriever.search("common", fusion="max")  # type: ignore[arg-type]


# --- ranking behaviour on real prose -------------------------------------------------------

PROSE = {
    "licence": "Error E4071 means the licence file could not be found at start-up.",
    "backup": "Nightly backups are copied to object storage and kept for thirty days.",
    "restore": "To bring a database back from a snapshot, run the restore command with its id.",
    "install": "Install the server package on every node before joining the cluster.",
    "tls": "Certificates are renewed automatically ten days before they expire.",
    "memory": "Each node needs at least four gigabytes of memory.",
}


@pytest.fixture(scope="module")
async def prose(tmp_path_factory: pytest.TempPathFactory):
    settings = make_settings(tmp_path_factory.mktemp("prose"))
    index = await HybridIndex.open(settings)
    docs = [Document(id=k, text=v, metadata=DocMetadata(source=f"{k}.md",
                                                         content_type="markdown"))
            for k, v in PROSE.items()]

    def whole(d: Document) -> list[Chunk]:
        return [Chunk(id=Chunk.make_id(d.id, 0, len(d.text), d.text), doc_id=d.id,
                      text=d.text, start=0, end=len(d.text), metadata=d.metadata)]

    await index.sync(docs, whole)
    yield index, settings
    await index.aclose()


async def test_hybrid_finds_exact_codes_and_paraphrases(prose) -> None:
    index, settings = prose
    retriever = Retriever(index, settings=settings.rag)
    code = await retriever.search("E4071", k=3)
    assert code[0].chunk.doc_id == "licence"
    assert code[0].signals["bm25_rank"] == 1 and code[0].signals["bm25_weight"] > 0
    para = await retriever.search("how do I recover my data from an earlier copy", k=3)
    assert para[0].chunk.doc_id in {"restore", "backup"}
    # the keyword side matched incidental words at best: it is given little or no weight
    assert para[0].signals.get("bm25_weight", 0.0) < 0.5
    for h in para:
        assert {"dense_rank", "dense_score", "fused_score"} <= h.signals.keys()
    rrf_hits = await retriever.search("E4071", k=3, fusion="rrf")
    assert rrf_hits[0].chunk.doc_id == "licence"
    assert [h.score for h in rrf_hits] == sorted((h.score for h in rrf_hits), reverse=True)


def _whole_id(doc_id: str) -> str:
    text = PROSE[doc_id]
    return Chunk.make_id(doc_id, 0, len(text), text)


async def test_keyword_weight_needs_the_query_words_in_the_dense_winner(prose) -> None:
    index, settings = prose
    retriever = Retriever(index, settings=settings.rag)
    query = "nightly backups kept in object storage"
    keyword = index.keyword_search(query, k=10)
    assert keyword[0][0] == _whole_id("backup")
    # the dense side agrees: the keyword side is confident and counts fully
    assert retriever.keyword_weight(query, keyword, [(_whole_id("backup"), 0.8)]) == 1.0
    # the dense side's best holds none of the query's words (a paraphrase match):
    # the keyword side's confidence is about an incidental match, so it stays out
    assert _whole_id("install") not in dict(keyword)
    assert retriever.keyword_weight(query, keyword, [(_whole_id("install"), 0.8)]) == 0.0
    # in between: scaled by the dense winner's share of the query's BM25 mass
    partial = "nightly backups copied to object storage restore"
    kw = index.keyword_search(partial, k=10)
    alone = retriever.keyword_weight(partial, kw)
    share = (index.keyword_scores(partial, [_whole_id("restore")])[0]
             / index.keyword_max_score(partial))
    floor = settings.rag.keyword_shared_floor
    gated = retriever.keyword_weight(partial, kw, [(_whole_id("restore"), 0.8)])
    assert alone > 0 and share > 0
    assert share < floor
    assert gated == pytest.approx(alone * share / floor)
    # the check can be turned off
    off = Retriever(index, settings=settings.rag.model_copy(update={"keyword_shared_floor": 0}))
    assert off.keyword_weight(query, keyword, [(_whole_id("install"), 0.8)]) == 1.0


async def test_hybrid_gives_a_document_the_best_of_its_chunks(tmp_path: Path) -> None:
    """One document, two chunks: one the dense side's best, one the keyword side's."""
    settings = make_settings(tmp_path)
    index = await HybridIndex.open(settings)
    try:
        first = "When the database will not start, look in the server log for the reason."
        second = "Codes: E4071, E4073, E4075."
        other = "Nightly backups are copied to object storage and kept for thirty days."
        text = f"{first}\n\n{second}"
        doc = Document(id="guide", text=text,
                       metadata=DocMetadata(source="guide.md", content_type="text"))
        single = Document(id="faq", text=other,
                          metadata=DocMetadata(source="faq.md", content_type="text"))

        def two(d: Document) -> list[Chunk]:
            if d.id == "faq":
                return [Chunk(id=Chunk.make_id(d.id, 0, len(d.text), d.text), doc_id=d.id,
                              text=d.text, start=0, end=len(d.text), metadata=d.metadata)]
            cut = len(first)
            return [Chunk(id=Chunk.make_id(d.id, a, b, d.text[a:b]), doc_id=d.id,
                          text=d.text[a:b], start=a, end=b, metadata=d.metadata)
                    for a, b in ((0, cut), (cut + 2, len(d.text)))]

        await index.sync([doc, single], two)
        # the keyword side counts fully here: this test is about the grouping
        retriever = Retriever(index, settings=settings.rag.model_copy(update={
            "keyword_confidence_floor": 0.0, "keyword_confidence_span": 0.01,
            "keyword_shared_floor": 0.0}))
        hits = await retriever.search("my postgres instance refuses to boot E4071",
                                      k=10)
        assert len(hits) == 3
        by_doc: dict[str, list] = {}
        for h in hits:
            by_doc.setdefault(h.chunk.doc_id, []).append(h)
        w = hits[0].signals["bm25_weight"]
        assert w > 0
        def norm(signal: str) -> dict[str, float]:
            """Min-max over the chunks that side returned; 0 for the others."""
            side = {h.chunk.id: h.signals[signal] for h in hits if signal in h.signals}
            lo, hi = min(side.values()), max(side.values())
            return {h.chunk.id: ((side[h.chunk.id] - lo) / (hi - lo) if hi > lo else 1.0)
                    if h.chunk.id in side else 0.0 for h in hits}

        nd, nb = norm("dense_score"), norm("bm25_score")
        leader, sibling = by_doc["guide"]
        # the guide's leading chunk carries the best of both of its chunks on each side
        assert leader.score == pytest.approx(
            max(nd[h.chunk.id] for h in by_doc["guide"])
            + w * max(nb[h.chunk.id] for h in by_doc["guide"]))
        # its other chunk keeps its own evidence and ranks below it
        assert sibling.score == pytest.approx(nd[sibling.chunk.id] + w * nb[sibling.chunk.id])
        assert sibling.score <= leader.score
        # and the sibling's evidence is what lifted the leader above its own score
        assert leader.score > nd[leader.chunk.id] + w * nb[leader.chunk.id] + 0.05
    finally:
        await index.aclose()


async def test_offline_reranker_reorders_the_top_and_records_scores(prose) -> None:
    index, settings = prose
    retriever = Retriever(index, settings=settings.rag.model_copy(update={"rerank_top_n": 4}))
    assert isinstance(retriever.reranker, OfflineReranker)
    plain = await retriever.search("when do certificates get replaced", k=6)
    ranked = await retriever.search("when do certificates get replaced", k=6, rerank=True)
    assert {h.chunk.id for h in ranked[:4]} == {h.chunk.id for h in plain[:4]}
    assert [h.chunk.id for h in ranked[4:]] == [h.chunk.id for h in plain[4:]]
    scores = [h.signals["rerank_score"] for h in ranked[:4]]
    assert scores == sorted(scores, reverse=True)
    assert ranked[0].chunk.doc_id == "tls"
    assert all("fused_score" in h.signals for h in ranked)


async def test_reranking_keeps_the_keyword_sides_evidence(prose) -> None:
    index, settings = prose
    retriever = Retriever(index, settings=settings.rag.model_copy(update={"rerank_top_n": 6}))
    query = "error E4071 licence file"
    hits = await retriever.search(query, k=6, rerank=True)
    w = hits[0].signals["bm25_weight"]
    assert w > 0
    rr = {h.chunk.id: h.signals["rerank_score"] for h in hits}
    kw = {h.chunk.id: h.signals["bm25_score"] for h in hits if "bm25_score" in h.signals}
    lo, hi = min(rr.values()), max(rr.values())
    klo, khi = min(kw.values()), max(kw.values())
    for h in hits:
        k = (kw[h.chunk.id] - klo) / (khi - klo) if h.chunk.id in kw and khi > klo else (
            1.0 if h.chunk.id in kw else 0.0)
        assert h.score == pytest.approx((rr[h.chunk.id] - lo) / (hi - lo) + w * k)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].chunk.doc_id == "licence"
    # a paraphrase gives the keyword side no weight: the reranker's order stands
    para = await retriever.search("when do certificates get replaced", k=6, rerank=True)
    assert para[0].signals["bm25_weight"] == 0.0
    assert [h.signals["rerank_score"] for h in para] == sorted(
        (h.signals["rerank_score"] for h in para), reverse=True)


def test_passage_windows_cover_the_text() -> None:
    text = " ".join(f"Sentence number {i} says something." for i in range(40))
    windows = passage_windows(text, max_words=20)
    assert all(len(w.split()) <= 20 for w in windows)
    assert "Sentence number 0" in windows[0] and "Sentence number 39" in windows[-1]
    assert passage_windows("") == [""]


def test_cross_encoder_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no weights configured"):
        CrossEncoderReranker(None)
    with pytest.raises(ConfigError, match=r"config\.json is missing"):
        CrossEncoderReranker(tmp_path)


# --- through the gateway --------------------------------------------------------------------


def chat_reply(text: str) -> ScriptedResponse:
    return ScriptedResponse.json({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48},
    })


class ScriptedModel:
    """The 'provider': scores passages about backups high, and rewrites queries."""

    def __call__(self, req: RecordedRequest) -> ScriptedResponse:
        prompt = req.json["messages"][-1]["content"]
        if prompt.startswith("Rate how well"):
            passage = prompt.split("Passage:", 1)[1]
            return chat_reply(json.dumps({"score": 9 if "backup" in passage else 2}))
        if prompt.startswith("Write"):
            return chat_reply(json.dumps({"queries": ["snapshot restore command",
                                                      "bring a database back", "E4071"]}))
        return chat_reply("?")


@pytest.fixture
async def gateway(tmp_path: Path):
    model = ScriptedModel()
    async with WireServer(handler=model) as server:
        catalog = tmp_path / "catalog.yaml"
        catalog.write_text(
            "providers:\n  up:\n    type: openai\n    local: true\n"
            f"    base_url: {server.url}/v1\n"
            "models:\n  - name: up/model\n    provider: up\n    id: m\n    tier: 1\n"
            "    price: {input: 1, output: 2}\n")
        settings = make_settings(tmp_path, catalog_file=catalog)
        async with Gateway(settings) as gw:
            yield gw, server


async def test_llm_reranker_scores_each_passage_through_the_gateway(prose, gateway) -> None:
    index, _ = prose
    gw, server = gateway
    retriever = Retriever(index)
    hits = await retriever.search("what happens every night", k=4)
    ranked = await LlmReranker(gw, model="up/model").rerank("what happens every night", hits)
    assert ranked[0].chunk.doc_id == "backup"
    assert ranked[0].signals["rerank_score"] == 9.0
    assert {h.chunk.id for h in ranked} == {h.chunk.id for h in hits}
    bodies = [r.json for r in server.requests]
    assert len(bodies) == 4
    assert all(b["response_format"]["type"] == "json_schema" for b in bodies)


async def test_multi_query_fuses_the_rewrites(prose, gateway) -> None:
    index, settings = prose
    gw, server = gateway
    mq = MultiQuery(Retriever(index, settings=settings.rag), gw, n=3, model="up/model")
    assert await mq.rewrite("how do I recover lost data") == [
        "snapshot restore command", "bring a database back", "E4071"]
    hits = await mq.search("how do I recover lost data", k=3)
    assert hits[0].chunk.doc_id == "restore"
    # "E4071" (cosine 0.11 with the question) is dropped as drift; the paraphrases stay
    assert hits[0].signals["query_variants"] == 2.0
    assert hits[0].signals["query_variants_dropped"] == 1.0
    assert len(server.requests) == 2
    assert "how do I recover lost data" in server.requests[0].json["messages"][-1]["content"]


async def test_multi_query_drops_rewrites_that_drift(prose, gateway) -> None:
    index, settings = prose
    gw, _ = gateway
    mq = MultiQuery(Retriever(index, settings=settings.rag), gw, n=3, model="up/model")
    kept = await mq.on_topic("how do I recover lost data", [
        "recover deleted files from a backup", "the weather in Paris is nice"])
    assert kept == ["recover deleted files from a backup"]
    off = MultiQuery(Retriever(index, settings=settings.rag.model_copy(
        update={"multi_query_min_similarity": 0.0})), gw, n=3, model="up/model")
    assert await off.on_topic("q", ["a", "b"]) == ["a", "b"]


def test_parsers_of_model_answers() -> None:
    assert parse_score('{"score": 7}') == 7.0
    assert parse_score('{"score": 42}') == 10.0
    assert parse_score("I'd say 4 out of 10") == 4.0
    assert parse_score("no idea") is None
    assert parse_rewrites('{"queries": ["a b c", "A B C", "orig q", "x", "d e f"]}',
                          "orig q", 3) == ["a b c", "d e f"]
    assert parse_rewrites("1. first rewrite\n- second rewrite\n", "q", 5) == [
        "first rewrite", "second rewrite"]
    assert parse_rewrites("", "q", 3) == []
