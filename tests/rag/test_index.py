"""The hybrid index: incremental sync (add, change, delete, no-op), persistence, crash safety.

Real parts throughout: Qdrant in embedded local mode under a temporary data
directory, the real MiniLM embedder, bm25s.  Crash safety uses an
OpenAI-compatible embedding endpoint (the local ``jan`` provider pointed at a
loopback server, called through the gateway) that starts failing mid-sync, the
way a real endpoint goes down.
"""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from conclave.errors import BackendUnavailable, ConfigError, InvalidRequest, Overloaded
from conclave.gateway import Gateway
from conclave.rag.embeddings import GatewayEmbedder
from conclave.rag.index import HybridIndex, SyncProgress, point_id, qdrant_filter
from conclave.rag.types import Chunk, DocMetadata, Document, Filter
from tests.support.settings import make_settings
from tests.support.wire_server import RecordedRequest, ScriptedResponse, WireServer


def paragraphs(doc: Document) -> list[Chunk]:
    """A plain paragraph chunker (the index takes any callable)."""
    out, pos = [], 0
    for para in doc.text.split("\n\n"):
        if not para.strip():
            continue
        start = doc.text.index(para, pos)
        end = pos = start + len(para)
        out.append(Chunk(id=Chunk.make_id(doc.id, start, end, para), doc_id=doc.id, text=para,
                         start=start, end=end, metadata=doc.metadata))
    return out


def doc(doc_id: str, text: str, **meta) -> Document:
    meta.setdefault("source", f"{doc_id}.md")
    meta.setdefault("content_type", "markdown")
    return Document(id=doc_id, text=text, metadata=DocMetadata(**meta))


CORPUS = [
    doc("install", "Install the server package on every node.\n\n"
        "The installer refuses to run on unsupported kernels.", tags=["ops"]),
    doc("backup", "Nightly backups are written to object storage.\n\n"
        "Restore a backup with the restore command and a snapshot id.", tags=["ops", "db"]),
    doc("faq", "Error E4071 means the licence file is missing.", source="help/faq.md"),
]


@pytest.fixture
def settings(tmp_path: Path):
    return make_settings(tmp_path)


async def live_ids(index: HybridIndex) -> set[str]:
    records, _ = await index._run(index._client.scroll, index.collection, limit=10_000,
                                  with_payload=True)
    return {r.payload["chunk_id"] for r in records}


async def test_sync_add_noop_change_delete(settings) -> None:
    events: list[SyncProgress] = []
    async with await HybridIndex.open(settings) as index:
        first = await index.sync(CORPUS, paragraphs, progress=events.append)
        assert (first.added, first.updated, first.deleted, first.unchanged) == (3, 0, 0, 0)
        assert first.chunks_added == 5 and first.chunks_deleted == 0
        assert first.chunks_embedded == 5
        assert index.chunk_count == 5 and await index.point_count() == 5
        assert {e.stage for e in events} >= {"chunk", "embed", "keyword"}
        assert events[-1].done == events[-1].total

        noop = await index.sync(CORPUS, paragraphs)
        assert (noop.added, noop.updated, noop.deleted, noop.unchanged) == (0, 0, 0, 3)
        assert noop.chunks_added == noop.chunks_deleted == noop.chunks_embedded == 0
        assert await index.point_count() == 5  # no duplicates

        changed = [CORPUS[0],
                   doc("backup", "Nightly backups are written to object storage.\n\n"
                       "Backups older than 30 days are pruned.", tags=["ops", "db"]),
                   CORPUS[2]]
        upd = await index.sync(changed, paragraphs)
        assert (upd.added, upd.updated, upd.deleted, upd.unchanged) == (0, 1, 0, 2)
        # the unchanged first paragraph keeps its id and comes from the embedding cache
        assert upd.chunks_added == 1 and upd.chunks_deleted == 1 and upd.chunks_embedded == 1
        assert await index.point_count() == 5
        hits = index.keyword_search("restore snapshot", k=5)
        assert hits == []
        assert index.keyword_search("pruned", k=5)

        gone = await index.sync(changed[:2], paragraphs)
        assert (gone.added, gone.updated, gone.deleted, gone.unchanged) == (0, 0, 1, 2)
        assert gone.chunks_deleted == 1
        assert await index.point_count() == 4 == index.chunk_count
        assert index.keyword_search("E4071", k=5) == []
        assert await live_ids(index) == {c.id for d in changed[:2] for c in paragraphs(d)}


async def test_metadata_change_updates_payload_without_new_chunks(settings) -> None:
    async with await HybridIndex.open(settings) as index:
        await index.sync(CORPUS, paragraphs)
        retagged = [CORPUS[0].model_copy(update={"metadata": CORPUS[0].metadata.model_copy(
            update={"tags": ["infra"]})}), *CORPUS[1:]]
        rep = await index.sync(retagged, paragraphs)
        assert rep.updated == 1 and rep.chunks_added == 0 and rep.chunks_deleted == 0
        assert rep.chunks_embedded == 0
        ids = index.keyword_search("installer kernels", k=5, filter=Filter(tags_any=["infra"]))
        assert set((await index.chunks([i for i, _ in ids])).keys()) == {i for i, _ in ids}
        assert {c.doc_id for c in (await index.chunks([i for i, _ in ids])).values()} \
            == {"install"}
        assert index.keyword_search("installer kernels", k=5, filter=Filter(tags_any=["ops"])) \
            == []
        vec = (await index.embedder.embed(["installing on nodes"]))[0]
        dense = await index.dense_search(vec, k=10, filter=Filter(tags_any=["infra"]))
        assert {c.doc_id for c, _ in dense} == {"install"}
        assert all(c.metadata.tags == ["infra"] for c, _ in dense)


async def test_index_persists_and_reopens(settings) -> None:
    async with await HybridIndex.open(settings) as index:
        await index.sync(CORPUS, paragraphs)
        before = index.keyword_search("licence file", k=3)
        root = index.root
    assert (root / "state.json").is_file()
    async with await HybridIndex.open(settings) as index:
        assert index.chunk_count == 5 and await index.point_count() == 5
        assert index.keyword_search("licence file", k=3) == before
        rep = await index.sync(CORPUS, paragraphs)
        assert rep.unchanged == 3 and rep.chunks_embedded == 0
        chunks = await index.chunks([before[0][0]])
        c = chunks[before[0][0]]
        assert c.doc_id == "faq" and c.metadata.source == "help/faq.md"
        assert CORPUS[2].text[c.start:c.end] == c.text


async def test_keep_sources_protects_documents_that_failed_to_load(settings) -> None:
    jsonl = [doc(f"log#{i}", f"record {i} says the disk is full", source=f"logs/app.jsonl#{i}")
             for i in range(2)]
    async with await HybridIndex.open(settings) as index:
        await index.sync([*CORPUS, *jsonl], paragraphs)
        rep = await index.sync(CORPUS[:2], paragraphs,
                               keep_sources={"help/faq.md", "logs/app.jsonl"})
        assert rep.kept == 3 and rep.deleted == 0
        assert index.chunk_count == 7
        rep = await index.sync(CORPUS[:2], paragraphs)
        assert rep.deleted == 3 and index.chunk_count == 4


async def test_bad_input_is_refused_before_anything_changes(settings) -> None:
    async with await HybridIndex.open(settings) as index:
        await index.sync(CORPUS, paragraphs)
        with pytest.raises(InvalidRequest, match="share the id 'install'"):
            await index.sync([CORPUS[0], CORPUS[0]], paragraphs)

        def wrong(d: Document) -> list[Chunk]:
            return [c.model_copy(update={"doc_id": "other"}) for c in paragraphs(d)]

        with pytest.raises(InvalidRequest, match="chunk of 'other'"):
            await index.sync([doc("new", "fresh text")], wrong)
        assert index.chunk_count == 5 and await index.point_count() == 5


async def test_async_chunker_and_async_document_stream(settings) -> None:
    async def chunker(d: Document) -> list[Chunk]:
        return paragraphs(d)

    async def stream():
        for d in CORPUS:
            yield d

    async with await HybridIndex.open(settings) as index:
        rep = await index.sync(stream(), chunker)
        assert rep.added == 3 and index.chunk_count == 5


async def test_a_second_process_cannot_open_the_same_local_index(settings) -> None:
    async with await HybridIndex.open(settings):
        with pytest.raises(BackendUnavailable, match="open in another process"):
            await HybridIndex.open(settings)


async def test_an_index_refuses_another_embedder(settings) -> None:
    async with await HybridIndex.open(settings) as index:
        await index.sync(CORPUS[:1], paragraphs)
    async with WireServer() as server:
        gw = Gateway(make_settings(settings.data_dir.parent, jan_base_url=f"{server.url}/v1"))
        other = GatewayEmbedder(gw, "jan:other", owns_gateway=True)
        try:
            with pytest.raises(ConfigError, match="was built with embedder"):
                await HybridIndex.open(settings, embedder=other)
        finally:
            await other.aclose()
        assert server.requests == []  # refused on the name, before embedding anything


async def test_empty_index_and_reset(settings) -> None:
    async with await HybridIndex.open(settings) as index:
        assert index.keyword_search("anything", k=5) == []
        assert await index.dense_search(np.ones(384, dtype=np.float32), k=5) == []
        await index.sync(CORPUS, paragraphs)
        await index.reset()
        assert index.chunk_count == 0 and index.keyword_search("backup", k=5) == []
        rep = await index.sync(CORPUS, paragraphs)
        assert rep.added == 3 and await index.point_count() == 5


# --- crash safety -------------------------------------------------------------------------


class FlakyEndpoint:
    """An embeddings endpoint that answers ``ok_calls`` requests, then fails with 503."""

    def __init__(self) -> None:
        self.ok_calls = 10**9

    def __call__(self, req: RecordedRequest) -> ScriptedResponse:
        if self.ok_calls <= 0:
            return ScriptedResponse.json({"error": {"message": "overloaded"}}, status=503)
        self.ok_calls -= 1
        inputs = req.json["input"]
        data = [{"index": i, "embedding": np.random.default_rng(zlib.crc32(t.encode()))
                 .normal(size=16).tolist()} for i, t in enumerate(inputs)]
        return ScriptedResponse.json({"object": "list", "data": data, "model": "m"})


async def test_a_sync_that_dies_midway_leaves_the_index_as_it_was(tmp_path: Path) -> None:
    endpoint = FlakyEndpoint()
    docs = [doc(f"d{i}", f"document {i} talks about subject {i}\n\nsecond part {i}")
            for i in range(6)]
    async with WireServer(handler=endpoint) as server:
        # no retries: the endpoint stays down, and the sync must fail on the first 503
        settings = make_settings(tmp_path, rag={"embedding_cache": False},
                                 jan_base_url=f"{server.url}/v1", routing={"max_retries": 0})
        gateway = Gateway(settings)

        def embedder() -> GatewayEmbedder:
            return GatewayEmbedder(gateway, "jan:m", batch_size=4)

        index = await HybridIndex.open(settings, embedder=embedder())
        try:
            await index.sync(docs[:3], paragraphs, batch_size=2)
            before_kw = index.keyword_search("subject", k=10)
            before_state = (index.root / "state.json").read_bytes()
            # the next sync replaces d0, deletes d1 and d2, adds d3..d5; the endpoint dies
            # after one more batch has been embedded and written
            endpoint.ok_calls = 1
            changed = [doc("d0", "document 0 was rewritten\n\nentirely new words"), *docs[3:]]
            with pytest.raises(Overloaded):
                await index.sync(changed, paragraphs, batch_size=2)
            # nothing visible changed: same manifest, same keyword answers, same dense answers

            state = json.loads((index.root / "state.json").read_bytes())
            assert state["pending"], "the points written before the failure are recorded"
            assert json.loads(before_state)["docs"] == state["docs"]
            assert index.documents.keys() == {"d0", "d1", "d2"}
            assert index.keyword_search("subject", k=10) == before_kw
            assert index.keyword_search("rewritten", k=10) == []
            endpoint.ok_calls = 10**9
            vec = (await index.embedder.embed(["document"]))[0]
            dense = await index.dense_search(vec, k=50)
            assert {c.doc_id for c, _ in dense} == {"d0", "d1", "d2"}
            assert len(dense) == 6
        finally:
            await index.aclose()

        # reopening collects the points the failed run had written
        index = await HybridIndex.open(settings, embedder=embedder())
        try:
            assert await index.point_count() == 6 == index.chunk_count
            assert not (index.root / ".kw-2.tmp").exists()
            rep = await index.sync(changed, paragraphs, batch_size=2)
            assert (rep.added, rep.updated, rep.deleted) == (3, 1, 2)
            assert await index.point_count() == index.chunk_count == 8
            assert await live_ids(index) == {c.id for d in changed for c in paragraphs(d)}
            assert index.keyword_search("rewritten", k=10)
        finally:
            await index.aclose()
            await gateway.aclose()


# --- payload filter translation -------------------------------------------------------------


def test_qdrant_filter_translation_shape() -> None:
    f = Filter(modified_after=datetime(2024, 1, 1, tzinfo=UTC), tags_any=["a", "b"],
               content_types=["pdf"], languages=["python"], path_prefix="docs/",
               heading_prefix=["Guide", "Install"])
    q = qdrant_filter(f, {"docs/a.md", "docs/b/c.md", "src/x.py"})
    keys = [c.key for c in q.must]
    assert keys == ["modified", "tags", "content_type", "language", "source", "heading_prefixes"]
    assert q.must[0].range.gte == datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    assert q.must[0].range.lt is None
    assert q.must[4].match.any == ["docs/a.md", "docs/b/c.md"]
    assert q.must[5].match.value == '["Guide","Install"]'
    assert qdrant_filter(None) is None and qdrant_filter(Filter()) is None


def test_point_ids_are_stable_uuids() -> None:
    assert point_id("abc") == point_id("abc") != point_id("abd")
    assert len(point_id("abc")) == 36
