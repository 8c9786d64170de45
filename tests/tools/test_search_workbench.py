"""The search workbench over a real index: schemas, results, filters, rerank, errors, an agent.

Real parts throughout: a small folder of Markdown, text and Python files in a
temporary directory, loaded and chunked by the real loaders, embedded by the
real MiniLM model, stored in embedded Qdrant plus the BM25 keyword side, and
searched through the registry the way a model's tool calls are.  The agent
test runs the base agent loop against a scripted in-process model
(``tests/agents/_scripted.py``) that calls ``search__hybrid``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from conclave.config import RagSettings
from conclave.llm.types import ToolCall
from conclave.rag.index import HybridIndex
from conclave.rag.pipeline import Rag
from conclave.rag.retrieval import Retriever
from conclave.tools import SearchWorkbench, ToolRegistry, WorkbenchError
from conclave.tools.search import snippet
from tests.support.settings import make_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BACKUP = """\
---
title: Backup Runbook
tags: [ops, db]
date: 2024-03-05
---
# Backups

Nightly backups of the PostgreSQL cluster run at 02:00 and are written to object
storage. Each backup is kept for thirty days.

## Restore

To restore a backup, stop the application servers, run pgctl restore with the
snapshot id from the backup log, and start the servers again.
"""

INSTALL = """\
---
title: Installation Guide
tags: [ops]
date: 2025-02-01
---
# Installation

Install the server package on every node. The installer checks the kernel version
and refuses to run on unsupported releases.

## Requirements

Each node needs 4 GB of memory and PostgreSQL 16 or newer.
"""

AUTH = """\
---
title: API Authentication
tags: [api, security]
date: 2025-06-10
---
# Authentication

## Tokens

API clients authenticate with bearer tokens. A token expires after one hour;
refresh it with the /auth/refresh endpoint before it runs out.

## Errors

Error E4071 means the licence file is missing or unreadable.
"""

STANDUP = """\
Standup notes.

The team agreed to move the beta launch to Friday because the payment provider's
sandbox was down all week.
"""

ROTATE = '''\
"""Log maintenance."""


def rotate_logs(path: str, keep: int = 7) -> None:
    """Compress yesterday's log file and delete archives older than keep days."""
    raise NotImplementedError
'''

#: one long paragraph whose answer sits at the end, to see the snippet follow the query
HISTORY = ("The project started as a weekend experiment in a shared office. " * 8
           + "Much later, the observatory's telescope mirror was recoated with aluminium "
             "in the spring, which restored its reflectivity.\n")

SOURCES = {"docs/ops/backup.md": BACKUP, "docs/ops/install.md": INSTALL,
           "docs/api/auth.md": AUTH, "notes/standup.txt": STANDUP,
           "src/rotate.py": ROTATE, "notes/history.txt": HISTORY}


def write_corpus(root: Path) -> Path:
    for rel, text in SOURCES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
async def rag(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rag]:
    base = tmp_path_factory.mktemp("search-wb")
    folder = write_corpus(base / "corpus")
    opened = await Rag.open(make_settings(base), folder=folder)
    try:
        report = await opened.sync()
        assert report.files == len(SOURCES) and not report.skipped
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
async def registry(rag: Rag) -> AsyncIterator[ToolRegistry]:
    reg = ToolRegistry(default_timeout_s=120)
    SearchWorkbench(rag).register(reg)
    yield reg
    await reg.aclose()


async def call(registry: ToolRegistry, name: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool as a model would and return the JSON it reads (failing on an error)."""
    result = await registry.invoke(name, **arguments)
    assert not result.is_error, result.content
    return json.loads(result.content)


def contains_a_word(source: str, query: str) -> bool:
    """Whether the file holds a word of the query (ignoring short, stop-listed words)."""
    return any(re.search(rf"\b{re.escape(w)}", SOURCES[source], re.I)
               for w in query.split() if len(w) >= 4)


def sources(out: dict[str, Any]) -> list[str]:
    return [h["source"] for h in out["hits"]]


# --- schemas -------------------------------------------------------------------------------


async def test_schemas_in_openai_and_anthropic_formats(registry: ToolRegistry) -> None:
    names = ["search__dense", "search__filtered", "search__hybrid", "search__keyword",
             "search__read", "search__rerank"]
    openai = registry.openai_tools("search", strict="auto")
    assert [t["function"]["name"] for t in openai] == names
    assert all(t["type"] == "function" and t["function"]["strict"] is True for t in openai)
    by_name = {t["function"]["name"]: t["function"] for t in openai}
    filtered = by_name["search__filtered"]["parameters"]
    assert filtered["additionalProperties"] is False
    assert set(filtered["required"]) == set(filtered["properties"])  # strict: all required
    types = filtered["properties"]["content_types"]["anyOf"][0]
    assert types == {"type": "array", "items": {"type": "string", "enum": [
        "markdown", "html", "pdf", "docx", "text", "code", "csv", "json"]}}
    assert filtered["properties"]["modified_after"]["anyOf"][0]["format"] == "date-time"
    assert filtered["properties"]["mode"]["anyOf"][0]["enum"] == ["hybrid", "dense", "keyword"]
    assert "Default: 5." in filtered["properties"]["k"]["description"]

    anthropic = registry.anthropic_tools("search")
    assert [t["name"] for t in anthropic] == names
    hybrid = next(t for t in anthropic if t["name"] == "search__hybrid")
    assert hybrid["description"].startswith("Search the indexed documents by meaning and by "
                                            "exact words at once")
    schema = hybrid["input_schema"]
    assert schema["required"] == ["query"]
    assert schema["properties"]["query"]["minLength"] == 1
    assert (schema["properties"]["k"]["minimum"], schema["properties"]["k"]["maximum"],
            schema["properties"]["k"]["default"]) == (1, 50, 5)
    rerank = next(t for t in anthropic if t["name"] == "search__rerank")["input_schema"]
    assert rerank["properties"]["candidates"]["maximum"] == 100
    # the provider-neutral specs the gateway takes carry the same schemas
    specs = {s.name: s for s in registry.specs("search")}
    assert specs["search__hybrid"].parameters == schema


def test_rerank_is_not_offered_when_no_reranker_is_configured(rag: Rag) -> None:
    plain = Retriever(rag.index, settings=RagSettings(reranker="none"))
    wb = SearchWorkbench(plain)
    assert [t.name for t in wb.tools()] == ["hybrid", "dense", "keyword", "filtered", "read"]
    with pytest.raises(WorkbenchError, match="not a Rag or a Retriever"):
        SearchWorkbench(rag.index)  # type: ignore[arg-type]
    with pytest.raises(WorkbenchError, match="snippet_chars must be at least 40"):
        SearchWorkbench(rag, snippet_chars=10)


# --- each tool finds the right document ------------------------------------------------------


@pytest.mark.parametrize(("tool", "query", "source", "heading"), [
    ("search__hybrid", "How long are backups kept?", "docs/ops/backup.md", "Backups"),
    ("search__hybrid", "E4071", "docs/api/auth.md", "Authentication > Errors"),
    ("search__dense", "when does my access credential stop being valid",
     "docs/api/auth.md", "Authentication > Tokens"),
    ("search__keyword", "kernel version installer", "docs/ops/install.md", "Installation"),
    ("search__rerank", "bring the database back from a snapshot", "docs/ops/backup.md",
     "Backups > Restore"),
])
async def test_each_tool_returns_the_right_passage(registry: ToolRegistry, tool: str,
                                                   query: str, source: str,
                                                   heading: str) -> None:
    out = await call(registry, tool, query=f"  {query} ", k=3)
    assert out["query"] == query  # stripped
    assert 1 <= len(out["hits"]) <= 3 and "note" not in out
    top = out["hits"][0]
    assert (top["rank"], top["source"], top["heading"]) == (1, source, heading)
    assert len(top["chunk_id"]) == 32 and isinstance(top["score"], float)
    assert [h["rank"] for h in out["hits"]] == list(range(1, len(out["hits"]) + 1))
    scores = [h["score"] for h in out["hits"]]
    assert scores == sorted(scores, reverse=True)
    # None fields are left out of what the model reads: text files have no page
    assert all("page" not in h and "hybrid_rank" not in h for h in out["hits"]) \
        or tool == "search__rerank"
    # the snippet is the passage's own text and read gives the whole of it
    full = await call(registry, "search__read", chunk_id=top["chunk_id"])
    assert full["source"] == source and full["heading"] == heading
    assert " ".join(full["text"].split()).startswith(top["text"].rstrip("…"))


async def test_read_gives_offsets_into_the_document_and_metadata(registry: ToolRegistry,
                                                                 rag: Rag) -> None:
    out = await call(registry, "search__keyword", query="payment provider sandbox", k=1)
    hit = out["hits"][0]
    assert hit["source"] == "notes/standup.txt" and hit["title"] == "standup.txt"
    full = await call(registry, "search__read", chunk_id=hit["chunk_id"])
    original = (rag.folder / "notes/standup.txt").read_text()
    assert original[full["start"]:full["end"]] == full["text"]
    assert full["content_type"] == "text" and "tags" not in full
    backup = (await call(registry, "search__hybrid", query="nightly backups", k=1))["hits"][0]
    meta = await call(registry, "search__read", chunk_id=backup["chunk_id"])
    assert meta["tags"] == ["ops", "db"] and meta["modified"].startswith("2024-03-05")
    assert meta["title"] == "Backup Runbook"


async def test_long_passages_are_cut_around_the_query(registry: ToolRegistry) -> None:
    out = await call(registry, "search__keyword", query="telescope mirror aluminium", k=1)
    hit = out["hits"][0]
    assert hit["source"] == "notes/history.txt"
    assert len(HISTORY) > 600 and len(hit["text"]) <= 400 + 2
    assert hit["text"].startswith("…") and "telescope mirror was recoated" in hit["text"]
    full = await call(registry, "search__read", chunk_id=hit["chunk_id"])
    assert full["text"] == HISTORY.strip()
    # the snippet function itself: whole when it fits, head when the query is not in it
    assert snippet("a  short\n text", "x", 40) == "a short text"
    head = snippet("word " * 100, "absent", 60)
    assert head.startswith("word") and head.endswith("…") and len(head) <= 60


# --- filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hybrid", "dense", "keyword"])
@pytest.mark.parametrize(("query", "args", "allowed", "excluded"), [
    # PostgreSQL occurs in backup.md (tag db, 2024) and install.md (2025)
    ("PostgreSQL", {"tags": ["db"]}, {"docs/ops/backup.md"}, "docs/ops/install.md"),
    # files without a date in front matter carry their mtime (now)
    ("PostgreSQL", {"modified_after": "2025-01-01"}, set(SOURCES) - {"docs/ops/backup.md"},
     "docs/ops/backup.md"),
    ("PostgreSQL", {"modified_before": "2025-01-01T00:00:00Z", "path_prefix": "./docs/"},
     {"docs/ops/backup.md"}, "docs/ops/install.md"),
    ("token expires refresh", {"path_prefix": "docs/ops/"},
     {"docs/ops/backup.md", "docs/ops/install.md"}, "docs/api/auth.md"),
    ("token error licence", {"heading_prefix": "Authentication > Errors"},
     {"docs/api/auth.md"}, None),
    ("logs archives days", {"content_types": ["code"], "languages": ["Python"]},
     {"src/rotate.py"}, None),
    ("beta launch moved to Friday", {"content_types": ["markdown"]},
     {"docs/ops/backup.md", "docs/ops/install.md", "docs/api/auth.md"}, "notes/standup.txt"),
])
async def test_filters_exclude_documents_on_every_side(registry: ToolRegistry, mode: str,
                                                       query: str, args: dict[str, Any],
                                                       allowed: set[str],
                                                       excluded: str | None) -> None:
    unfiltered = await call(registry, "search__filtered", query=query, k=10, mode=mode)
    assert "filter" not in unfiltered  # no condition given: no filter
    if excluded is not None and (mode != "keyword" or contains_a_word(excluded, query)):
        assert excluded in sources(unfiltered)  # the filter below is what removes it
    out = await call(registry, "search__filtered", query=query, k=10, mode=mode, **args)
    assert out["mode"] == mode and out["filter"]
    got = sources(out)
    assert set(got) <= allowed, (mode, args, got)
    if mode != "keyword" or any(contains_a_word(src, query) for src in allowed):
        assert got, (mode, args)  # something passes and matches, so something comes back
    if "heading_prefix" in args:
        assert all(h["heading"].startswith(args["heading_prefix"]) for h in out["hits"])
    if got:
        assert "note" not in out


async def test_filter_arguments_are_recorded_normalised(registry: ToolRegistry) -> None:
    out = await call(registry, "search__filtered", query="PostgreSQL", tags=["db", "db"],
                     modified_after="2024-01-01", heading_prefix=" Backups >Restore ",
                     languages=[" Go "], path_prefix="")
    assert out["filter"] == {"modified_after": "2024-01-01T00:00:00Z", "tags_any": ["db"],
                             "languages": ["go"], "heading_prefix": ["Backups", "Restore"]}
    assert out["hits"] == [] and "No passage passes this filter" in out["note"]


# --- nothing found is an answer, not an error ------------------------------------------------


async def test_no_match_is_an_empty_result_with_a_note(registry: ToolRegistry) -> None:
    out = await call(registry, "search__filtered", query="backups", tags=["no-such-tag"])
    assert out["hits"] == [] and out["filter"] == {"tags_any": ["no-such-tag"]}
    assert "Loosen or drop the filter" in out["note"] and "search__hybrid" in out["note"]
    words = await call(registry, "search__keyword", query="zyzzyva quux")
    assert words["hits"] == []
    assert "No indexed passage contains any of the query's words" in words["note"]
    assert "search__dense" in words["note"]


async def test_an_empty_index_gives_empty_results_with_a_note(tmp_path: Path) -> None:
    async with await HybridIndex.open(make_settings(tmp_path), name="empty") as index:
        reg = ToolRegistry()
        SearchWorkbench(Retriever(index)).register(reg)
        for name in ("search__hybrid", "search__dense", "search__keyword", "search__rerank"):
            out = await call(reg, name, query="anything at all")
            assert out["hits"] == [], name
            assert out["note"].startswith("The index is empty"), name
        filtered = await call(reg, "search__filtered", query="x", tags=["ops"])
        assert filtered["hits"] == [] and filtered["note"].startswith("The index is empty")
        await reg.aclose()


# --- rerank ----------------------------------------------------------------------------------


async def test_rerank_reorders_the_same_candidates_with_scores(registry: ToolRegistry,
                                                               rag: Rag) -> None:
    query = "what happens to old files after some days"
    hybrid = await call(registry, "search__hybrid", query=query, k=8)
    reranked = await call(registry, "search__rerank", query=query, k=8, candidates=8)
    assert reranked["mode"] == "rerank" and reranked["candidates"] == 8
    before = {h["chunk_id"]: h for h in hybrid["hits"]}
    after = reranked["hits"]
    assert len(after) == len(before) == 8
    assert {h["chunk_id"] for h in after} == set(before)  # the same set
    for h in after:  # each says where it stood and with which score
        assert h["hybrid_rank"] == before[h["chunk_id"]]["rank"]
        assert h["hybrid_score"] == before[h["chunk_id"]]["score"]
    scores = [h["score"] for h in after]
    assert scores == sorted(scores, reverse=True)
    assert [h["hybrid_rank"] for h in after] != list(range(1, 9))  # reordered
    # the scores are the configured reranker's own
    hits = await rag.retriever.search(query, k=8)
    direct = await rag.retriever.reranker.rerank(query, hits)
    assert [h.chunk.id for h in direct] == [h["chunk_id"] for h in after]
    assert [round(h.signals["rerank_score"], 4) for h in direct] == scores
    # k below candidates keeps the best k of the reranked list
    top = await call(registry, "search__rerank", query=query, k=2, candidates=8)
    assert [h["chunk_id"] for h in top["hits"]] == [h["chunk_id"] for h in after[:2]]
    # candidates below k are raised to k
    raised = await call(registry, "search__rerank", query=query, k=3, candidates=1)
    assert raised["candidates"] == 3 and len(raised["hits"]) == 3


# --- bad input comes back to the model -------------------------------------------------------


@pytest.mark.parametrize(("name", "args", "kind", "says"), [
    ("search__hybrid", {"query": "   "}, "invalid_arguments", "`query`"),
    ("search__hybrid", {}, "invalid_arguments", "`query`: required argument is missing"),
    ("search__dense", {"query": "x", "k": 0}, "invalid_arguments", "`k`"),
    ("search__keyword", {"query": "x", "k": 51}, "invalid_arguments", "`k`"),
    ("search__hybrid", {"query": "x", "limit": 3}, "invalid_arguments",
     "`limit`: unexpected argument"),
    ("search__filtered", {"query": "x", "modified_after": "2024-13-45"}, "invalid_arguments",
     "`modified_after`"),
    ("search__filtered", {"query": "x", "modified_before": "last week"}, "invalid_arguments",
     "`modified_before`"),
    ("search__filtered", {"query": "x", "content_types": ["spreadsheet"]},
     "invalid_arguments", "`content_types[0]`"),
    ("search__filtered", {"query": "x", "mode": "fuzzy"}, "invalid_arguments", "`mode`"),
    ("search__rerank", {"query": "x", "candidates": 500}, "invalid_arguments",
     "`candidates`"),
    ("search__filtered", {"query": "x", "modified_after": "2025-01-01",
                          "modified_before": "2024-01-01"}, "exception",
     "modified_after (2025-01-01) is not earlier than modified_before (2024-01-01)"),
    ("search__filtered", {"query": "x", "path_prefix": "/etc/"}, "exception",
     "path_prefix '/etc/' is absolute"),
    ("search__filtered", {"query": "x", "heading_prefix": "Install >  > Debian"},
     "exception", "has an empty part"),
    ("search__read", {"chunk_id": "0" * 32}, "exception",
     "WorkbenchError: no passage has chunk_id"),
])
async def test_bad_input_comes_back_to_the_model(registry: ToolRegistry, name: str,
                                                 args: dict[str, Any], kind: str,
                                                 says: str) -> None:
    result = await registry.call(ToolCall(id="c1", name=name, arguments=args))
    assert result.is_error and result.error_kind == kind, result.content
    assert says in result.content
    if kind == "invalid_arguments":
        assert f"Call `{name}` again with corrected arguments." in result.content
    message = result.to_message()
    assert message.tool_call_id == "c1" and message.content == result.content


# --- an agent uses it ------------------------------------------------------------------------


async def test_an_agent_calls_search_hybrid_and_cites_the_result(registry: ToolRegistry,
                                                                 tmp_path: Path) -> None:
    from conclave.agents import Agent, RunContext
    from conclave.llm.types import Role
    from tests.agents._scripted import CHAT, answer, scripted_gateway, scripted_settings

    seen: dict[str, Any] = {}

    def respond(model: str, request: Any, i: int) -> Any:
        if i == 0:
            assert "search__hybrid" in [t.name for t in request.tools]
            return answer(tool_calls=[ToolCall(id="s1", name="search__hybrid",
                                               arguments={"query": "How long are backups "
                                                                   "kept?", "k": 2})])
        tool_msg = request.messages[-1]
        assert tool_msg.role is Role.TOOL and tool_msg.tool_call_id == "s1"
        seen.update(json.loads(tool_msg.content))
        top = seen["hits"][0]
        return answer(f"Backups are kept for thirty days [{top['source']} > {top['heading']}].")

    gw, provider = scripted_gateway(scripted_settings(tmp_path), respond)
    ctx = RunContext(gw)
    try:
        result = await Agent("researcher", ctx, model=CHAT, tools=registry).run(
            "How long do we keep backups?")
    finally:
        await ctx.aclose()
    assert result.ok and result.tool_mode == "native"
    assert result.answer == ("Backups are kept for thirty days "
                             "[docs/ops/backup.md > Backups].")
    step = result.steps[0].tool_calls[0]
    assert step.name == "search__hybrid" and step.is_error is False
    assert seen["hits"][0]["source"] == "docs/ops/backup.md"
    assert "thirty days" in seen["hits"][0]["text"]
    assert len(provider.requests) == 2


def test_dates_without_a_zone_are_utc() -> None:
    from conclave.tools.search import _utc

    assert _utc(datetime(2024, 1, 1)) == datetime(2024, 1, 1, tzinfo=UTC)
    assert _utc(None) is None
