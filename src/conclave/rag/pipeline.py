"""One folder of documents, end to end: load, sync the index, search, answer.

:class:`Rag` is the facade the CLI (and anything else that wants "point at a
folder, ask questions") uses, so the commands stay thin:

* every docs folder gets its own index, named after a hash of the folder's
  absolute path (``folder-<16 hex>``), so two folders never mix and the same
  folder always finds its index again; a small registry
  (``<index dir>/folders.json``) remembers which folder each index holds and
  when it was last synced, which is how ``conclave search`` without
  ``--docs`` finds the folder indexed last;
* :meth:`Rag.sync` walks the folder, loads every file (a file that fails to
  load is reported by name with the reason, and its previous chunks are kept
  rather than deleted), and syncs the index incrementally: unchanged files
  cost a hash comparison, nothing is duplicated;
* :meth:`Rag.search` and :meth:`Rag.ask` retrieve (hybrid by default, with
  the same filter on both sides) and answer through the gateway with
  numbered citations.

:func:`parse_filters` turns the command line's ``--filter key=value`` strings
into one :class:`~conclave.rag.types.Filter`, with an error that names the bad
part and the fix.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from conclave.errors import InvalidRequest
from conclave.rag.types import Filter, Hit

if TYPE_CHECKING:
    from conclave.accounting import Accounting
    from conclave.config import Settings
    from conclave.gateway import Gateway
    from conclave.rag.answer import Answer
    from conclave.rag.index import HybridIndex, SyncProgress
    from conclave.rag.retrieval import Mode, Retriever

__all__ = [
    "FILTER_HELP",
    "FolderReport",
    "Progress",
    "Rag",
    "SkippedFile",
    "index_name_for",
    "last_folder",
    "parse_filters",
]

#: ``progress(stage, done, total)``; stages: load, chunk, embed, keyword, delete
Progress = Callable[[str, int, int], None]

# --- filters --------------------------------------------------------------------------

FILTER_HELP = (
    "Filter passages by metadata, KEY=VALUE, repeatable; all given filters must hold. "
    "tag=a,b (any of the tags); type=pdf,markdown (content type: markdown, html, pdf, docx, "
    "text, code, csv, json); lang=python (source language); path=docs/api/ (path prefix, "
    "relative to the folder); heading=\"Install > Debian\" (heading-path prefix); "
    "after=2024-01-01 (modified at or after); before=2025-01-01 (modified before)."
)
_KEYS = {
    "tag": "tag", "tags": "tag", "type": "type", "content_type": "type",
    "lang": "lang", "language": "lang", "path": "path", "heading": "heading",
    "after": "after", "since": "after", "before": "before", "until": "before",
}
_TYPES = {"markdown", "html", "pdf", "docx", "text", "code", "csv", "json"}
_TYPE_ALIASES = {"md": "markdown", "txt": "text", "htm": "html", "jsonl": "json",
                 "plain": "text", "source": "code"}
_EXAMPLE = "e.g. --filter tag=ops,db or --filter path=docs/api/"


def _bad(item: str, problem: str, fix: str = _EXAMPLE) -> InvalidRequest:
    return InvalidRequest(f"--filter {item!r}: {problem}", hint=fix)


def _date(item: str, value: str) -> datetime:
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise _bad(item, f"{value!r} is not a date",
                   "use YYYY-MM-DD or an ISO 8601 time like 2024-01-01T12:00:00+00:00"
                   ) from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def parse_filters(items: Sequence[str] | None) -> Filter | None:
    """``["tag=a,b", "path=docs/"]`` to a :class:`Filter` (None when no item is given).

    List keys (tag, type, lang) may repeat and add values (any of them matches);
    the others (path, heading, after, before) may be given once.
    """
    if not items:
        return None
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not key:
            raise _bad(item, "expected KEY=VALUE")
        name = _KEYS.get(key)
        if name is None:
            raise _bad(item, f"unknown filter key {key!r}",
                       "use one of tag, type, lang, path, heading, after, before")
        if not value:
            raise _bad(item, f"no value after {key}=")
        if name in ("tag", "type", "lang"):
            values = [v.strip() for v in value.split(",") if v.strip()]
            if not values:
                raise _bad(item, f"no value after {key}=")
            if name == "type":
                values = [_TYPE_ALIASES.get(v.lower(), v.lower()) for v in values]
                unknown = [v for v in values if v not in _TYPES]
                if unknown:
                    raise _bad(item, f"unknown content type {unknown[0]!r}",
                               f"use any of {', '.join(sorted(_TYPES))}")
                target = "content_types"
            elif name == "lang":
                values = [v.lower() for v in values]
                target = "languages"
            else:
                target = "tags_any"
            fields.setdefault(target, [])
            fields[target] += [v for v in values if v not in fields[target]]
            continue
        if name in seen:
            raise _bad(item, f"{key} is given twice", f"give {key}= once")
        seen.add(name)
        if name == "path":
            prefix = value.removeprefix("./")
            if prefix.startswith("/"):
                raise _bad(item, "the path prefix is absolute",
                           "give it relative to the docs folder, like docs/api/")
            fields["path_prefix"] = prefix
        elif name == "heading":
            parts = [p.strip() for p in value.split(">")]
            if not all(parts):
                raise _bad(item, "empty part in the heading path",
                           'separate headings with >, like heading="Install > Debian"')
            fields["heading_prefix"] = parts
        elif name == "after":
            fields["modified_after"] = _date(item, value)
        else:
            fields["modified_before"] = _date(item, value)
    after, before = fields.get("modified_after"), fields.get("modified_before")
    if after is not None and before is not None and after >= before:
        raise InvalidRequest(f"--filter after={after.date()} is not earlier than "
                             f"before={before.date()}",
                             hint="swap them, or drop one to keep an open range")
    return Filter(**fields)


# --- where a folder's index lives -----------------------------------------------------


def index_name_for(folder: Path) -> str:
    """The index name of a docs folder: a hash of its absolute, resolved path."""
    resolved = str(Path(folder).expanduser().resolve())
    return "folder-" + hashlib.sha256(resolved.encode()).hexdigest()[:16]


def _registry_path(settings: Settings) -> Path:
    return settings.rag.resolved_index_dir(settings.data_dir) / "folders.json"


def _read_registry(settings: Settings) -> dict[str, dict[str, str]]:
    path = _registry_path(settings)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_folder(settings: Settings, name: str, folder: Path) -> None:
    path = _registry_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_registry(settings)
    data[name] = {"folder": str(folder), "synced_at": datetime.now(UTC).isoformat()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def last_folder(settings: Settings) -> Path | None:
    """The docs folder synced most recently (that still exists), if any."""
    entries = sorted(_read_registry(settings).values(),
                     key=lambda e: e.get("synced_at", ""), reverse=True)
    for e in entries:
        folder = Path(e.get("folder", ""))
        if e.get("folder") and folder.is_dir():
            return folder
    return None


def _check_folder(folder: Path) -> Path:
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise InvalidRequest(f"{folder} {what}", hint="pass the folder of documents")
    return folder


# --- reports --------------------------------------------------------------------------


class SkippedFile(BaseModel):
    source: str
    reason: str


class FolderReport(BaseModel):
    """What one sync of a docs folder did."""

    folder: str
    index: str
    files: int = 0
    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    #: documents kept from an earlier run because their file failed to load this time
    kept: int = 0
    #: live chunks in the index after the sync
    chunks: int = 0
    chunks_added: int = 0
    chunks_deleted: int = 0
    chunks_embedded: int = 0
    skipped: list[SkippedFile] = Field(default_factory=list)
    seconds: float = 0.0


# --- the facade -----------------------------------------------------------------------


class Rag:
    """A docs folder's index plus retrieval and answers; open with :meth:`open`."""

    def __init__(self, settings: Settings, index: HybridIndex, folder: Path | None, *,
                 gateway: Gateway | None = None, owns_gateway: bool = True,
                 accounting: Accounting | None = None) -> None:
        self.settings = settings
        self.index = index
        self.folder = folder
        self._gateway: Gateway | None = gateway
        self._owns_gateway = owns_gateway
        self._accounting = accounting
        self._retriever: Retriever | None = None

    @classmethod
    async def open(cls, settings: Settings | None = None, *, folder: Path | None = None,
                   name: str | None = None, gateway: Gateway | None = None,
                   accounting: Accounting | None = None) -> Rag:
        """Open the index of ``folder`` (or the index ``name``); creates it when new.

        ``gateway`` answers questions and, with a remote embedder, embeds (so its
        accounting records both); without one, the Rag makes its own when it first
        needs one, on ``accounting`` (the ledger and budgets its calls go to), and
        closes it.  A gateway is not built before it is needed: indexing with a local
        embedder never imports the provider SDKs.
        """
        from conclave.config import load_settings
        from conclave.rag.embeddings import is_remote
        from conclave.rag.index import HybridIndex

        settings = settings or load_settings()
        if folder is not None:
            folder = _check_folder(folder)
            name = name or index_name_for(folder)
        if name is None:
            raise InvalidRequest("no docs folder and no index name given",
                                 hint="pass --docs DIR")
        owns = gateway is None
        if gateway is None and is_remote(settings):
            from conclave.gateway import Gateway

            gateway = Gateway(settings, accounting=accounting)
        try:
            index = await HybridIndex.open(settings, name=name, gateway=gateway)
        except BaseException:
            if owns and gateway is not None:
                await gateway.aclose()
            raise
        return cls(settings, index, folder, gateway=gateway, owns_gateway=owns,
                   accounting=accounting)

    async def aclose(self) -> None:
        try:
            await self.index.aclose()
        finally:
            if self._gateway is not None and self._owns_gateway:
                await self._gateway.aclose()

    async def __aenter__(self) -> Rag:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            from conclave.gateway import Gateway

            self._gateway = Gateway(self.settings, accounting=self._accounting)
        return self._gateway

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            from conclave.rag.retrieval import Retriever

            self._retriever = Retriever(self.index, settings=self.settings.rag,
                                        gateway=self.gateway)
        return self._retriever

    # -- indexing ------------------------------------------------------------------------

    async def sync(self, progress: Progress | None = None) -> FolderReport:
        """Load the folder and make the index hold exactly its documents."""
        from conclave.rag.chunkers import make_chunker
        from conclave.rag.loaders import LoadReport, iter_files, load_file

        if self.folder is None:
            raise InvalidRequest("this index was opened without a docs folder",
                                 hint="open it with folder=...")
        t0 = time.perf_counter()
        root = self.folder

        def load() -> LoadReport:
            paths = list(iter_files(root))
            report = LoadReport()
            if progress:
                progress("load", 0, len(paths))
            for i, path in enumerate(paths, 1):
                result = load_file(path, root)
                report.files.append(result.rel)
                report.documents.extend(result.documents)
                report.skipped.extend(result.skipped)
                if result.failed:
                    report.failed.append(result.rel)
                if progress:
                    progress("load", i, len(paths))
            return report

        loaded = await asyncio.to_thread(load)

        def tell(p: SyncProgress) -> None:
            if progress:
                progress(p.stage, p.done, p.total)

        chunker = make_chunker("recursive")
        sync = await self.index.sync(loaded.documents, chunker, progress=tell,
                                     keep_sources=loaded.failed)
        _record_folder(self.settings, self.index.name, root)
        return FolderReport(
            folder=str(root), index=self.index.name, files=len(loaded.files),
            added=sync.added, updated=sync.updated, deleted=sync.deleted,
            unchanged=sync.unchanged, kept=sync.kept, chunks=self.index.chunk_count,
            chunks_added=sync.chunks_added, chunks_deleted=sync.chunks_deleted,
            chunks_embedded=sync.chunks_embedded,
            skipped=[SkippedFile(source=s, reason=r) for s, r in loaded.skipped],
            seconds=round(time.perf_counter() - t0, 3))

    # -- retrieval and answers -------------------------------------------------------------

    async def search(self, query: str, *, k: int = 10, filter: Filter | None = None,
                     mode: Mode = "hybrid", rerank: bool = False,
                     multi_query: bool = False) -> list[Hit]:
        """The ``k`` best passages for ``query`` (an empty list when nothing matches)."""
        if multi_query:
            from conclave.rag.retrieval import MultiQuery

            return await MultiQuery(self.retriever, self.gateway).search(
                query, k=k, filter=filter, mode=mode, rerank=rerank)
        return await self.retriever.search(query, k=k, filter=filter, mode=mode, rerank=rerank)

    async def ask(self, question: str, *, k: int = 5, filter: Filter | None = None,
                  mode: Mode = "hybrid", rerank: bool = True, model: str | None = None,
                  tier: int | None = None, privacy: bool | None = None,
                  max_tokens: int = 256) -> tuple[Answer, list[Hit]]:
        """Retrieve for ``question`` and answer it from the passages, citing them."""
        from conclave.rag.answer import answer

        question = (question or "").strip()
        if not question:
            raise InvalidRequest("the question is empty", hint="pass the question to ask")
        if model and tier is not None:
            raise InvalidRequest("give --model or --tier, not both")
        hits = await self.search(question, k=k, filter=filter, mode=mode, rerank=rerank)
        if model is None and tier is None:
            tier = 0
        result = await answer(self.gateway, question, hits, model=model, tier=tier,
                              privacy=privacy, max_tokens=max_tokens)
        return result, hits
