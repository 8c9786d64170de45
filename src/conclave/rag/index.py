"""The hybrid index: dense vectors in Qdrant, BM25 beside them, one manifest.

Layout of an index named ``N`` under ``settings.rag`` index dir::

    N/state.json      the manifest: format, embedder, per-document content hash and
                      chunk ids, the current keyword generation, pending point ids
    N/kw-<gen>/       the keyword side (see :mod:`conclave.rag.store.keyword`)
    N/qdrant/         Qdrant's embedded local storage (absent with ``qdrant_url``)

Dense side: Qdrant through ``qdrant-client``; ``QdrantClient(path=...)`` in
embedded local mode by default, ``QdrantClient(url=...)`` for a server, and
the same calls either way.  The client is synchronous and every call runs in
one worker thread per index, so the event loop never waits on it and the
local-mode storage (which has no locking of its own) is never used from two
threads.  A point's id is ``uuid5(chunk id)``, so writing the same chunk twice
overwrites it: re-running a sync can never duplicate a chunk.

Keyword side: BM25 with ``bm25s`` rather than Qdrant sparse vectors with
``Modifier.IDF``.  Measured by ``bench/rag_keyword_side.py`` (same tokens on
both, Qdrant in embedded local mode, 2 shared CPU cores)::

    corpus             docs  keyword side   nDCG@10  p50 ms  p95 ms  build s
    manpages            400  bm25s           0.8247    0.09    0.14     0.12
    manpages            400  qdrant-sparse   0.8247   11.84   13.12     0.48
    pydoc-paraphrase    797  bm25s           0.0598    0.09    0.14     0.16
    pydoc-paraphrase    797  qdrant-sparse   0.0598   11.93   13.05     0.86
    pydoc x10          7970  bm25s                -    0.11    0.18     0.75
    pydoc x10          7970  qdrant-sparse        -  114.33  156.51     9.92

Quality is identical (both are BM25 over the same tokens), but local-mode
Qdrant scores a sparse query with a Python loop over every point, so its
latency grows linearly with the corpus (114 ms at 8k chunks, seconds at
100k), while bm25s multiplies a CSC matrix.  The sparse variant is therefore
not kept in the code; the measurement stays in the bench.  (With a Qdrant
server, sparse search is fast, but the embedded default is what most users run.)

Incremental sync, keyed by document id and ``Document.content_hash``:
unchanged documents are skipped before chunking, changed ones are re-chunked
and re-embedded (the embedding cache makes unchanged passages free), and
documents no longer present are deleted from both sides.  Crash safety: the
manifest is the only truth of what is live and is replaced atomically
(temp file, fsync, rename); a sync first records the point ids it is about to
write as *pending*, writes them, saves the new keyword side under a new
generation directory, then commits the manifest (live set, keyword
generation, and the now-stale point ids as pending), and only then deletes
stale points and the old keyword directory.  A run that dies anywhere leaves
the previous manifest and keyword side intact; dense results are checked
against the live set, and pending points that never became live are deleted
the next time the index opens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, Field

from conclave.errors import BackendUnavailable, ConclaveError, ConfigError, InvalidRequest
from conclave.rag.store.keyword import KeywordSide, Tokenizer, epoch, heading_key
from conclave.rag.types import Chunk, DocMetadata, Document, Filter

if TYPE_CHECKING:
    from qdrant_client import QdrantClient
    from qdrant_client.http import models as qm

    from conclave.config import Settings
    from conclave.gateway import Gateway
    from conclave.rag.embeddings import Embedder

__all__ = [
    "Chunker",
    "HybridIndex",
    "IndexCorrupt",
    "SyncProgress",
    "SyncReport",
    "point_id",
    "qdrant_filter",
]

log = logging.getLogger("conclave.rag.index")

STATE_FORMAT = 1
_NS = uuid.UUID("5b0c2a52-7f0e-4c8e-9f3e-1d7c0c9e4a11")
DENSE = "dense"
T = TypeVar("T")


class IndexCorrupt(ConclaveError):
    code = "index_corrupt"
    http_status = 500


class ChunkFn(Protocol):
    def __call__(self, document: Document) -> Sequence[Chunk] | Awaitable[Sequence[Chunk]]: ...


class ChunkerObject(Protocol):
    def chunk(self, document: Document) -> Sequence[Chunk] | Awaitable[Sequence[Chunk]]: ...


#: a chunker is a callable ``(document) -> chunks`` or an object with ``.chunk(document)``;
#: either may be async
Chunker = ChunkFn | ChunkerObject


class SyncReport(BaseModel):
    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    #: documents absent from this run but kept because their source failed to load
    kept: int = 0
    chunks_added: int = 0
    chunks_deleted: int = 0
    #: texts the embedder computed (the rest came from the cache)
    chunks_embedded: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class SyncProgress:
    """``stage`` is chunk, embed, keyword or delete; ``done`` of ``total`` items."""

    stage: str
    done: int
    total: int


ProgressCallback = Callable[[SyncProgress], None]


def point_id(chunk_id: str) -> str:
    """The Qdrant point id of a chunk: stable, so writing a chunk twice overwrites it."""
    return str(uuid.uuid5(_NS, chunk_id))


class _DocEntry(BaseModel):
    hash: str
    source: str
    chunks: list[str] = Field(default_factory=list)


class _State(BaseModel):
    format: int = STATE_FORMAT
    embedder: str
    dim: int
    tokenizer: str
    keyword_generation: int = 0
    docs: dict[str, _DocEntry] = Field(default_factory=dict)
    #: point ids that may exist in Qdrant without being live (a sync in flight or a crash)
    pending: list[str] = Field(default_factory=list)


# --- filters --------------------------------------------------------------------------


def qdrant_filter(f: Filter | None, sources: Iterable[str] | None = None) -> qm.Filter | None:
    """The Qdrant payload filter that means what ``Filter.matches`` means.

    ``sources`` are the indexed source paths the path prefix expands to (exactly the
    ones that ``startswith`` it); pass None to have none.  Returns None for no filter.
    """
    from qdrant_client.http import models as qm

    if f is None or f.is_empty():
        return None
    must: list[Any] = []
    if f.modified_after is not None or f.modified_before is not None:
        must.append(qm.FieldCondition(key="modified", range=qm.Range(
            gte=epoch(f.modified_after), lt=epoch(f.modified_before))))
    if f.tags_any:
        must.append(qm.FieldCondition(key="tags", match=qm.MatchAny(any=list(f.tags_any))))
    if f.content_types:
        must.append(qm.FieldCondition(key="content_type",
                                      match=qm.MatchAny(any=list(f.content_types))))
    if f.languages:
        must.append(qm.FieldCondition(key="language", match=qm.MatchAny(any=list(f.languages))))
    if f.path_prefix:
        allowed = sorted(s for s in (sources or ()) if s.startswith(f.path_prefix))
        # An empty MatchAny matches nothing, which is what an unmatched prefix means.
        must.append(qm.FieldCondition(key="source", match=qm.MatchAny(any=allowed)))
    if f.heading_prefix:
        must.append(qm.FieldCondition(key="heading_prefixes",
                                      match=qm.MatchValue(value=heading_key(f.heading_prefix))))
    return qm.Filter(must=must)


def payload_of(chunk: Chunk) -> dict[str, Any]:
    m = chunk.metadata
    payload: dict[str, Any] = {
        "chunk_id": chunk.id, "doc_id": chunk.doc_id, "text": chunk.text,
        "start": chunk.start, "end": chunk.end, "heading_path": list(chunk.heading_path),
        "heading_prefixes": [heading_key(chunk.heading_path[:n])
                             for n in range(1, len(chunk.heading_path) + 1)],
        "page": chunk.page, "source": m.source, "title": m.title,
        "content_type": m.content_type, "language": m.language, "tags": list(m.tags),
        "metadata": m.model_dump(mode="json"),
    }
    ts = epoch(m.modified)
    if ts is not None:
        payload["modified"] = ts
    return payload


def chunk_of(payload: dict[str, Any]) -> Chunk:
    return Chunk(
        id=payload["chunk_id"], doc_id=payload["doc_id"], text=payload["text"],
        start=payload["start"], end=payload["end"], heading_path=payload["heading_path"],
        page=payload.get("page"), metadata=DocMetadata.model_validate(payload["metadata"]),
    )


# --- the index ------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def _chunk(chunker: Chunker, document: Document) -> list[Chunk]:
    fn = chunker.chunk if hasattr(chunker, "chunk") else chunker
    out = fn(document)  # type: ignore[operator]
    if asyncio.iscoroutine(out) or isinstance(out, Awaitable):
        out = await out
    return list(out)


class HybridIndex:
    """Dense (Qdrant) plus keyword (bm25s) retrieval over the same live chunks.

    Open with :meth:`open`; close with :meth:`aclose` (or ``async with``).
    """

    def __init__(self, *, root: Path, name: str, client: QdrantClient, collection: str,
                 embedder: Embedder, local: bool, executor: ThreadPoolExecutor) -> None:
        self.root = root
        self.name = name
        self.collection = collection
        self.embedder = embedder
        self.local = local
        self._client = client
        self._executor = executor
        self._tokenizer = Tokenizer()
        self._state: _State | None = None
        self._keyword = KeywordSide(tokenizer_name=self._tokenizer.name)
        self._live: set[str] = set()
        self._sources: set[str] = set()
        self._write_lock = asyncio.Lock()
        self._closed = False
        #: the embedder was built by :meth:`open` (not passed in), so closing is ours
        self._owns_embedder = False

    # -- opening and closing ---------------------------------------------------------------

    @classmethod
    async def open(cls, settings: Settings | None = None, *, name: str | None = None,
                   embedder: Embedder | None = None, root: Path | None = None,
                   gateway: Gateway | None = None) -> HybridIndex:
        """Open (or create) the index ``name`` (default ``settings.rag.collection``).

        Without an ``embedder``, the one ``settings.rag.embedder`` names is built (and
        closed with the index); a remote one calls models through ``gateway``, whose
        accounting then records and budgets the embedding spend.
        """
        from conclave.config import load_settings
        from conclave.rag.embeddings import build_embedder

        settings = settings or load_settings()
        rag = settings.rag
        name = name or rag.collection
        if not name.replace("-", "").replace("_", "").isalnum():
            raise InvalidRequest(f"index name {name!r} may hold only letters, digits, - and _")
        base = root or rag.resolved_index_dir(settings.data_dir)
        path = base / name
        path.mkdir(parents=True, exist_ok=True)
        owns = embedder is None
        embedder = embedder or build_embedder(settings, gateway=gateway)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"qdrant-{name}")
        loop = asyncio.get_running_loop()
        try:
            client = await loop.run_in_executor(executor, cls._connect, rag, path)
        except BaseException:
            executor.shutdown(wait=False)
            if owns:
                await embedder.aclose()
            raise
        index = cls(root=path, name=name, client=client, collection=name, embedder=embedder,
                    local=rag.qdrant_url is None, executor=executor)
        index._owns_embedder = owns
        try:
            await index._load()
        except BaseException:
            await index.aclose()
            raise
        return index

    @staticmethod
    def _connect(rag: Any, path: Path) -> QdrantClient:
        from qdrant_client import QdrantClient

        if rag.qdrant_url is None:
            try:
                return QdrantClient(path=str(path / "qdrant"))
            except RuntimeError as exc:
                raise BackendUnavailable(
                    f"the index at {path} is open in another process ({exc})",
                    backend="qdrant-local", url=str(path / "qdrant"),
                    hint="close the other conclave process, or set CONCLAVE_RAG__QDRANT_URL "
                    "to share one Qdrant server between processes",
                ) from None
        key = rag.qdrant_api_key.get_secret_value() if rag.qdrant_api_key else None
        client = QdrantClient(url=rag.qdrant_url, api_key=key, timeout=30)
        try:
            client.get_collections()
        except Exception as exc:
            client.close()
            raise BackendUnavailable(
                f"cannot reach the Qdrant server ({type(exc).__name__})",
                backend="qdrant", url=rag.qdrant_url.split("@")[-1],
                hint="check CONCLAVE_RAG__QDRANT_URL and that the server is running",
            ) from None
        return client

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise InvalidRequest(f"index {self.name!r} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def _load(self) -> None:
        state_path = self.root / "state.json"
        if state_path.exists():
            try:
                state = _State.model_validate_json(state_path.read_bytes())
            except ValueError as exc:
                raise IndexCorrupt(
                    f"the manifest of index {self.name!r} cannot be read: {exc}",
                    hint=f"delete {self.root} to rebuild the index from the documents",
                ) from None
            if state.format != STATE_FORMAT:
                raise IndexCorrupt(f"index {self.name!r} has format {state.format}, "
                                   f"this version reads {STATE_FORMAT}",
                                   hint=f"delete {self.root} to rebuild it")
            if state.embedder != self.embedder.name:
                raise ConfigError(
                    f"index {self.name!r} was built with embedder {state.embedder!r}, "
                    f"not {self.embedder.name!r}",
                    hint="use the same embedder, another index name, or reset the index "
                    "(its vectors cannot be mixed with another model's)",
                )
            self._state = state
            exists = await self._run(self._client.collection_exists, self.collection)
            if not exists and state.docs:
                log.warning("index %s: its Qdrant collection is gone; re-indexing from scratch",
                            self.name)
                state = self._state = _State(embedder=state.embedder, dim=state.dim,
                                             tokenizer=self._tokenizer.name)
                await self._save_state()
            if not exists:
                await self._create_collection(state.dim)
            self._keyword = await self._load_keyword(state)
        self._refresh_live()
        if self._state is not None and self._state.pending:
            await self._collect_pending()
        self._remove_stray_generations()

    async def _create_collection(self, dim: int) -> None:
        from qdrant_client.http import models as qm

        def create() -> None:
            if self._client.collection_exists(self.collection):
                return
            self._client.create_collection(
                self.collection,
                vectors_config={DENSE: qm.VectorParams(size=dim, distance=qm.Distance.COSINE)},
            )
            if not self.local:
                for key in ("doc_id", "source", "content_type", "language", "tags",
                            "heading_prefixes"):
                    self._client.create_payload_index(self.collection, key,
                                                      qm.PayloadSchemaType.KEYWORD)
                self._client.create_payload_index(self.collection, "modified",
                                                  qm.PayloadSchemaType.FLOAT)

        await self._run(create)

    async def _ensure_state(self) -> _State:
        if self._state is None:
            dim = self.embedder.dim
            if dim is None:
                dim = int((await self.embedder.embed(["dimension probe"])).shape[1])
            self._state = _State(embedder=self.embedder.name, dim=dim,
                                 tokenizer=self._tokenizer.name)
            await self._create_collection(dim)
            await self._save_state()
        return self._state

    def _kw_dir(self, generation: int) -> Path:
        return self.root / f"kw-{generation}"

    async def _load_keyword(self, state: _State) -> KeywordSide:
        live = sum(len(d.chunks) for d in state.docs.values())
        if state.keyword_generation and state.tokenizer == self._tokenizer.name:
            try:
                side = await asyncio.to_thread(KeywordSide.load,
                                               self._kw_dir(state.keyword_generation))
                if len(side) == live:
                    return side
                log.warning("index %s: keyword side holds %d chunks, manifest %d; rebuilding",
                            self.name, len(side), live)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("index %s: keyword side unreadable (%s); rebuilding", self.name, exc)
        elif not live:
            return KeywordSide(tokenizer_name=self._tokenizer.name)
        return await self._rebuild_keyword(state)

    async def _rebuild_keyword(self, state: _State) -> KeywordSide:
        """Re-tokenise every live chunk from the texts stored in Qdrant, and commit it."""
        ids = [cid for d in state.docs.values() for cid in d.chunks]
        chunks = await self._fetch(ids)
        missing = [cid for cid in ids if cid not in chunks]
        if missing:
            raise IndexCorrupt(
                f"index {self.name!r}: {len(missing)} live chunks are missing from Qdrant",
                hint=f"delete {self.root} to rebuild the index from the documents")
        side = await asyncio.to_thread(
            KeywordSide(tokenizer_name=self._tokenizer.name).rebuilt,
            remove=(), add=[chunks[c] for c in ids], tokenizer=self._tokenizer)
        generation = state.keyword_generation + 1
        await asyncio.to_thread(self._write_keyword, side, generation)
        state.keyword_generation = generation
        state.tokenizer = self._tokenizer.name
        await self._save_state()
        return side

    def _write_keyword(self, side: KeywordSide, generation: int) -> None:
        final = self._kw_dir(generation)
        tmp = self.root / f".kw-{generation}.tmp"
        side.save(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def _remove_stray_generations(self) -> None:
        current = self._state.keyword_generation if self._state else 0
        for p in self.root.iterdir():
            stray = (p.name.startswith(".kw-") or
                     (p.name.startswith("kw-") and p.name != f"kw-{current}"))
            if stray and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    async def _save_state(self) -> None:
        assert self._state is not None
        data = self._state.model_dump_json().encode()
        await asyncio.to_thread(_atomic_write, self.root / "state.json", data)

    def _refresh_live(self) -> None:
        docs = self._state.docs if self._state else {}
        self._live = {cid for d in docs.values() for cid in d.chunks}
        self._sources = {d.source for d in docs.values()}

    async def _collect_pending(self) -> None:
        assert self._state is not None
        live_points = {point_id(c) for c in self._live}
        garbage = [p for p in self._state.pending if p not in live_points]
        if garbage:
            await self._delete_points(garbage)
        self._state.pending = []
        await self._save_state()

    async def aclose(self) -> None:
        if self._closed:
            return
        try:
            await self._run(self._client.close)
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)
            if self._owns_embedder:
                await self.embedder.aclose()

    async def __aenter__(self) -> HybridIndex:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- reading -----------------------------------------------------------------------

    @property
    def documents(self) -> dict[str, str]:
        """Live document ids and their content hashes."""
        return {k: v.hash for k, v in (self._state.docs if self._state else {}).items()}

    @property
    def chunk_count(self) -> int:
        return len(self._live)

    @property
    def sources(self) -> set[str]:
        return set(self._sources)

    async def point_count(self) -> int:
        """Points in the Qdrant collection (equals :attr:`chunk_count` between syncs)."""
        if self._state is None:
            return 0
        res = await self._run(self._client.count, self.collection, exact=True)
        return int(res.count)

    async def _fetch(self, chunk_ids: Sequence[str]) -> dict[str, Chunk]:
        if not chunk_ids or self._state is None:
            return {}
        out: dict[str, Chunk] = {}
        for i in range(0, len(chunk_ids), 1000):
            part = [point_id(c) for c in chunk_ids[i:i + 1000]]
            records = await self._run(self._client.retrieve, self.collection, part,
                                      with_payload=True, with_vectors=False)
            for r in records:
                c = chunk_of(r.payload or {})
                out[c.id] = c
        return out

    async def chunks(self, chunk_ids: Sequence[str]) -> dict[str, Chunk]:
        """Live chunks by id (ids that are not live are left out)."""
        return await self._fetch([c for c in chunk_ids if c in self._live])

    async def dense_search(self, vector: np.ndarray, *, k: int,
                           filter: Filter | None = None) -> list[tuple[Chunk, float]]:
        """Top ``k`` live chunks by cosine similarity that pass ``filter``."""
        if self._state is None or not self._live or k <= 0:
            return []
        qfilter = qdrant_filter(filter, self._sources)
        res = await self._run(
            self._client.query_points, self.collection, query=np.asarray(vector).tolist(),
            using=DENSE, query_filter=qfilter, limit=k, with_payload=True,
        )
        out = []
        for p in res.points:
            payload = p.payload or {}
            if payload.get("chunk_id") in self._live:
                out.append((chunk_of(payload), float(p.score)))
        out.sort(key=lambda cs: (-cs[1], cs[0].id))
        return out

    def keyword_search(self, query: str, *, k: int,
                       filter: Filter | None = None) -> list[tuple[str, float]]:
        """Top ``k`` live chunk ids by BM25 among those passing ``filter`` (masked first)."""
        side = self._keyword
        if not len(side):
            return []
        sources = None
        if filter is not None and filter.path_prefix:
            sources = {s for s in self._sources if s.startswith(filter.path_prefix)}
        mask = side.mask(filter, sources)
        return side.search(self._tokenizer(query), k, mask)

    def keyword_scores(self, query: str, chunk_ids: Sequence[str]) -> list[float]:
        """BM25 scores of particular chunks for ``query`` (0 for chunks that are not live)."""
        return self._keyword.scores(self._tokenizer(query), chunk_ids)

    def keyword_max_score(self, query: str) -> float:
        """The highest BM25 score any chunk could reach for ``query`` (0 for no terms)."""
        return self._keyword.max_score(self._tokenizer(query))

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer(text)

    # -- writing -----------------------------------------------------------------------

    async def sync(self, documents: Iterable[Document] | AsyncIterable[Document],
                   chunker: Chunker, *, progress: ProgressCallback | None = None,
                   keep_sources: Iterable[str] = (), prune: bool = True,
                   batch_size: int = 256) -> SyncReport:
        """Make the index hold exactly ``documents`` (see the module docstring).

        ``keep_sources``: source paths that failed to load this time; their documents
        (and, for a JSONL source, its ``path#n`` records) stay as they are instead of
        being deleted.  ``prune=False`` adds and updates without deleting anything.
        """
        t0 = time.perf_counter()
        async with self._write_lock:
            report = await self._sync(documents, chunker, progress, set(keep_sources), prune,
                                      batch_size)
        report.seconds = round(time.perf_counter() - t0, 3)
        return report

    async def _sync(self, documents: Any, chunker: Chunker, progress: ProgressCallback | None,
                    keep_sources: set[str], prune: bool, batch_size: int) -> SyncReport:
        def tell(stage: str, done: int, total: int) -> None:
            if progress is not None:
                progress(SyncProgress(stage, done, total))

        docs: dict[str, Document] = {}
        if isinstance(documents, AsyncIterable):
            async for d in documents:
                self._add_doc(docs, d)
        else:
            for d in documents:
                self._add_doc(docs, d)
        state = await self._ensure_state()
        old = state.docs
        report = SyncReport()
        changed: list[Document] = []
        for doc_id, d in docs.items():
            entry = old.get(doc_id)
            if entry is None:
                report.added += 1
                changed.append(d)
            elif entry.hash != d.content_hash:
                report.updated += 1
                changed.append(d)
            else:
                report.unchanged += 1

        def kept(entry: _DocEntry) -> bool:
            s = entry.source
            return s in keep_sources or s.split("#", 1)[0] in keep_sources

        removed = []
        for doc_id, entry in old.items():
            if doc_id in docs:
                continue
            if not prune or kept(entry):
                report.kept += 1
            else:
                removed.append(doc_id)
        report.deleted = len(removed)
        if not changed and not removed:
            return report

        # Chunk the changed documents.
        new_chunks: list[Chunk] = []
        new_entries: dict[str, _DocEntry] = {}
        for i, d in enumerate(changed):
            chunks = await _chunk(chunker, d)
            seen: set[str] = set()
            for c in chunks:
                if c.doc_id != d.id:
                    raise InvalidRequest(f"the chunker returned a chunk of {c.doc_id!r} "
                                         f"for document {d.id!r}")
                if c.id not in seen:
                    seen.add(c.id)
                    new_chunks.append(c)
            new_entries[d.id] = _DocEntry(hash=d.content_hash, source=d.metadata.source,
                                          chunks=list(dict.fromkeys(c.id for c in chunks)))
            tell("chunk", i + 1, len(changed))
        new_ids = {c.id for c in new_chunks}
        old_ids = {cid for doc_id in [*new_entries, *removed] if doc_id in old
                   for cid in old[doc_id].chunks}
        stale = old_ids - new_ids
        report.chunks_added = len(new_ids - old_ids)
        report.chunks_deleted = len(stale)

        # 1. Record the points about to be written, so a crash cannot orphan them.
        live_points = {point_id(c) for c in self._live}
        state.pending = sorted(set(state.pending) |
                               {point_id(c) for c in new_ids} - live_points)
        await self._save_state()

        # 2. Embed and write the dense side in batches.
        computed_before = getattr(self.embedder, "computed", None)
        total = len(new_chunks)
        for i in range(0, total, batch_size):
            batch = new_chunks[i:i + batch_size]
            vectors = await self.embedder.embed([c.text for c in batch])
            if vectors.shape != (len(batch), state.dim):
                raise ConfigError(
                    f"embedder {self.embedder.name!r} returned vectors of shape "
                    f"{vectors.shape}, the index expects dimension {state.dim}")
            await self._upsert(batch, vectors)
            tell("embed", min(i + batch_size, total), total)
        computed_after = getattr(self.embedder, "computed", None)
        report.chunks_embedded = (computed_after - computed_before
                                  if computed_before is not None and computed_after is not None
                                  else total)

        # 3. The next keyword side, saved under a new generation.
        tell("keyword", 0, 1)
        keyword = await asyncio.to_thread(self._keyword.rebuilt, remove=stale | new_ids,
                                          add=new_chunks, tokenizer=self._tokenizer)
        generation = state.keyword_generation + 1
        await asyncio.to_thread(self._write_keyword, keyword, generation)
        tell("keyword", 1, 1)

        # 4. Commit: the manifest names the new live set and generation.
        previous_generation = state.keyword_generation
        docs_after = dict(old)
        for doc_id in removed:
            docs_after.pop(doc_id, None)
        docs_after.update(new_entries)
        state.docs = docs_after
        state.keyword_generation = generation
        state.pending = sorted(point_id(c) for c in stale)
        await self._save_state()
        self._keyword = keyword
        self._refresh_live()

        # 5. Garbage: stale points and the previous keyword generation.
        if stale:
            tell("delete", 0, len(stale))
            await self._delete_points(state.pending)
            tell("delete", len(stale), len(stale))
        state.pending = []
        await self._save_state()
        if previous_generation and previous_generation != generation:
            await asyncio.to_thread(shutil.rmtree, self._kw_dir(previous_generation), True)
        return report

    @staticmethod
    def _add_doc(docs: dict[str, Document], d: Document) -> None:
        if d.id in docs:
            raise InvalidRequest(f"two documents share the id {d.id!r}",
                                 hint="document ids must be unique within one sync")
        docs[d.id] = d

    async def _upsert(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        from qdrant_client.http import models as qm

        points = [qm.PointStruct(id=point_id(c.id), vector={DENSE: v.tolist()},
                                 payload=payload_of(c))
                  for c, v in zip(chunks, vectors, strict=True)]
        await self._run(self._client.upsert, self.collection, points=points, wait=True)

    async def _delete_points(self, ids: Sequence[str]) -> None:
        from qdrant_client.http import models as qm

        for i in range(0, len(ids), 1000):
            await self._run(self._client.delete, self.collection,
                            points_selector=qm.PointIdsList(points=list(ids[i:i + 1000])),
                            wait=True)

    async def reset(self) -> None:
        """Drop everything this index holds (the embedding cache is kept)."""
        async with self._write_lock:
            if self._state is not None:
                await self._run(self._client.delete_collection, self.collection)
            self._state = None
            self._keyword = KeywordSide(tokenizer_name=self._tokenizer.name)
            self._refresh_live()
            state_path = self.root / "state.json"
            if state_path.exists():
                state_path.unlink()
            self._remove_stray_generations()
