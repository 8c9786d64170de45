"""``conclave index``, ``search`` and ``ask`` on a real folder, through the real commands.

Most tests call the typer app in this process (``CliRunner``), so the MiniLM
model loads once for the whole file; each test has its own data directory, so
indexes never leak between tests.  ``ask`` end to end with the local model runs
the installed ``conclave`` executable as a user would, against the session's
llama.cpp server (same data directory, so the subprocess reuses it).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conclave.accounting import InvocationRecord, LedgerQuery, open_accounting
from conclave.config import load_settings
from conclave.rag.pipeline import Rag, index_name_for, parse_filters
from conclave.rag.types import Filter
from tests.cli.test_cli_accounting import priced_env

CONCLAVE = str(Path(sys.executable).with_name("conclave"))
QUERY = "energy revenue backups install server item config city notes onboarding"


@pytest.fixture(scope="session")
def app() -> Any:
    from conclave.cli import main

    if not any(c.name == "index" for c in main.app.registered_commands):
        main._mount_subcommands()
    return main.app


@pytest.fixture
def cli(app: Any, tmp_path: Path):
    """``cli(*args)`` runs ``conclave args`` in-process with a private data directory."""
    data = tmp_path / "data"
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CONCLAVE_")}
    env.update(CONCLAVE_DATA_DIR=str(data), CONCLAVE_CONFIG=str(tmp_path / "none.yaml"))
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True) -> Any:
        result = runner.invoke(app, list(args), env=env, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.stderr
        return result

    invoke.data_dir = data  # type: ignore[attr-defined]
    return invoke


def as_json(result: Any) -> dict[str, Any]:
    return json.loads(result.stdout)


def index_state(data_dir: Path, folder: Path) -> tuple[int, int, int]:
    """(live chunks, Qdrant points, distinct chunk ids) of the folder's index."""
    async def go() -> tuple[int, int, int]:
        rag = await Rag.open(load_settings(data_dir=data_dir), folder=folder)
        try:
            ids = [c for d in rag.index._state.docs.values() for c in d.chunks]
            return rag.index.chunk_count, await rag.index.point_count(), len(set(ids))
        finally:
            await rag.aclose()

    return asyncio.run(go())


# -- index ---------------------------------------------------------------------------------


def test_index_is_incremental(cli, doc_folder: Path):
    first = as_json(cli("index", str(doc_folder), "--json"))
    assert first["index"] == index_name_for(doc_folder)
    assert first["added"] >= 10 and first["updated"] == first["deleted"] == 0
    assert first["unchanged"] == 0 and first["chunks"] > first["added"]
    assert first["chunks_embedded"] == first["chunks_added"] == first["chunks"]
    skipped = {s["source"]: s["reason"] for s in first["skipped"]}
    assert "docs/broken.pdf" in skipped and "data/blob.dat" in skipped
    docs = first["added"]

    # no-op: nothing changes, nothing is embedded, nothing is duplicated
    again = as_json(cli("index", str(doc_folder), "--json"))
    assert (again["added"], again["updated"], again["deleted"]) == (0, 0, 0)
    assert again["unchanged"] == docs and again["chunks"] == first["chunks"]
    assert again["chunks_embedded"] == 0
    assert index_state(cli.data_dir, doc_folder) == (first["chunks"],) * 3

    # change one file, add one, delete one
    (doc_folder / "notes.txt").write_text("Meeting notes from Tuesday.\n\nThe beta slipped to "
                                          "next week because of the flaky installer.\n")
    (doc_folder / "docs" / "faq.md").write_text("# FAQ\n\nThe zebrafish mascot is named Zed.\n")
    (doc_folder / "src" / "app.js").unlink()
    changed = as_json(cli("index", str(doc_folder), "--json"))
    assert (changed["added"], changed["updated"], changed["deleted"]) == (1, 1, 1)
    assert changed["unchanged"] == docs - 2
    assert 0 < changed["chunks_embedded"] <= changed["chunks_added"]
    live, points, distinct = index_state(cli.data_dir, doc_folder)
    assert live == points == distinct == changed["chunks"]

    hits = as_json(cli("search", "zebrafish mascot", "--docs", str(doc_folder), "--no-sync",
                       "--mode", "bm25", "--json"))["hits"]
    assert [h["source"] for h in hits] == ["docs/faq.md"]
    gone = as_json(cli("search", "listening port constructor", "--docs", str(doc_folder),
                       "--no-sync", "--json"))["hits"]
    assert "src/app.js" not in {h["source"] for h in gone}
    old = as_json(cli("search", "Alice release checklist Monday", "--docs", str(doc_folder),
                      "--no-sync", "--mode", "bm25", "--json"))["hits"]
    assert all("Alice" not in h["text"] for h in old)

    # and the no-op again after the changes
    last = as_json(cli("index", str(doc_folder), "--json"))
    assert (last["added"], last["updated"], last["deleted"], last["chunks_embedded"]) == (
        0, 0, 0, 0)
    assert last["chunks"] == changed["chunks"]


def test_index_human_output_and_bad_folder(cli, doc_folder: Path, tmp_path: Path):
    r = cli("index", str(doc_folder))
    assert "added" in r.stdout and "unchanged 0" in r.stdout
    assert "docs/broken.pdf:" in r.stdout
    r = cli("index", str(tmp_path / "nope"), ok=False)
    assert r.exit_code == 1
    assert "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_two_folders_get_two_indexes(cli, doc_folder: Path, tmp_path: Path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.md").write_text("# Lighthouse\n\nThe lighthouse keeper logs every ship.\n")
    a = as_json(cli("index", str(doc_folder), "--json"))
    b = as_json(cli("index", str(other), "--json"))
    assert a["index"] != b["index"] and b["added"] == 1 and b["chunks"] == 1
    hits = as_json(cli("search", "lighthouse keeper", "--docs", str(doc_folder), "--no-sync",
                       "--json"))
    assert all(h["source"] != "a.md" for h in hits["hits"])
    # without --docs, search uses the folder synced last
    last = as_json(cli("search", "lighthouse keeper", "--json"))
    assert last["folder"] == str(other.resolve())
    assert [h["source"] for h in last["hits"]] == ["a.md"]


# -- filters -------------------------------------------------------------------------------


FILTER_CASES = [
    (["type=pdf"], lambda h: h["content_type"] == "pdf"),
    (["type=pdf,docx"], lambda h: h["content_type"] in ("pdf", "docx")),
    (["path=src/"], lambda h: h["source"].startswith("src/")),
    (["tag=ops"], lambda h: h["source"] == "docs/guide.md"),
    (["lang=python"], lambda h: h["source"] == "src/inventory.py"),
    (["heading=Installation > Requirements"],
     lambda h: (h["heading"] or "").startswith("Installation > Requirements")),
    (["after=2024-01-01", "before=2025-01-01"], lambda h: h["source"] == "docs/guide.md"),
    (["before=2021-01-01"], lambda h: h["source"] == "data/cities.csv"),
]


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_filters_reach_both_sides(cli, doc_folder: Path, mode: str):
    old = time.mktime((2020, 6, 1, 12, 0, 0, 0, 0, -1))
    os.utime(doc_folder / "data" / "cities.csv", (old, old))
    cli("index", str(doc_folder))
    base = ["search", QUERY + " requirements memory population Kyoto inventory", "--docs",
            str(doc_folder), "--no-sync", "--mode", mode, "-k", "50", "--json"]
    unfiltered = as_json(cli(*base))["hits"]
    for flt, ok in FILTER_CASES:
        assert not all(ok(h) for h in unfiltered), flt  # the filter has work to do
        args = [a for f in flt for a in ("--filter", f)]
        hits = as_json(cli(*base, *args))["hits"]
        assert hits, (mode, flt)
        assert all(ok(h) for h in hits), (mode, flt, [h["source"] for h in hits])


def test_filter_matching_nothing_is_a_clean_empty_result(cli, doc_folder: Path):
    cli("index", str(doc_folder))
    for mode in ("bm25", "dense", "hybrid"):
        r = cli("search", QUERY, "--docs", str(doc_folder), "--mode", mode,
                "--filter", "tag=no-such-tag", "--json")
        assert as_json(r)["hits"] == []
    r = cli("search", QUERY, "--docs", str(doc_folder), "--filter", "after=2100-01-01")
    assert "No passage matches the query and the filter." in r.stdout
    r = cli("search", QUERY, "--docs", str(doc_folder), "--filter", "path=nowhere/")
    assert "No passage matches" in r.stdout
    # ask with nothing to answer from does not call a model at all
    r = cli("ask", "When do backups run?", "--docs", str(doc_folder), "--filter",
            "type=pdf", "--filter", "tag=ops", "--json")
    data = as_json(r)
    assert data["citations"] == [] and "No indexed passage matches" in data["answer"]
    assert data["usage"]["input_tokens"] == 0 and data["cost_usd"] == 0


@pytest.mark.parametrize(("flt", "needle"), [
    ("tag", "expected KEY=VALUE"),
    ("colour=red", "unknown filter key 'colour'"),
    ("type=xls", "unknown content type 'xls'"),
    ("after=yesterday", "'yesterday' is not a date"),
    ("tag=", "no value after tag="),
    ("heading=Install > ", "empty part in the heading path"),
    ("path=/etc/", "the path prefix is absolute"),
])
def test_bad_filter_is_one_clear_line(cli, doc_folder: Path, flt: str, needle: str):
    r = cli("search", "x", "--docs", str(doc_folder), "--filter", flt, ok=False)
    assert r.exit_code == 1
    assert needle in r.stderr and "--filter" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # rejected before anything was indexed
    assert not (cli.data_dir / "rag" / index_name_for(doc_folder)).exists()


def test_bad_mode_and_conflicting_options(cli, doc_folder: Path):
    r = cli("search", "x", "--docs", str(doc_folder), "--mode", "fuzzy", ok=False)
    assert r.exit_code == 1 and "unknown search mode 'fuzzy'" in r.stderr
    r = cli("ask", "x", "--docs", str(doc_folder), "--model", "local/gemma-3-270m",
            "--tier", "1", ok=False)
    assert r.exit_code == 1 and "not both" in r.stderr
    r = cli("search", "x", ok=False)
    assert r.exit_code == 1 and "no folder has been indexed yet" in r.stderr


def test_ask_privacy_refuses_a_cloud_model_before_any_request(app, tmp_path: Path):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "a.md").write_text("# Tides\n\nTides are caused by the moon.\n")
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CONCLAVE_")}
    env.update(CONCLAVE_DATA_DIR=str(tmp_path / "data"),
               CONCLAVE_CONFIG=str(tmp_path / "none.yaml"), OPENAI_API_KEY="sk-secret-value")
    r = CliRunner().invoke(app, ["ask", "What causes tides?", "--docs", str(folder),
                                 "--privacy", "--model", "openai/gpt-5.1"], env=env)
    assert r.exit_code == 1
    assert "privacy" in r.stderr and "sk-secret-value" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_ask_refused_by_a_spent_budget_is_one_line_and_a_record(app, tmp_path: Path):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "a.md").write_text("# Tides\n\nTides are caused by the moon.\n")
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CONCLAVE_")}
    # a priced model whose upstream does not exist: only the budget may stop the call
    env.update(priced_env(tmp_path, "http://127.0.0.1:9/v1"),
               CONCLAVE_DATA_DIR=str(tmp_path / "data"),
               CONCLAVE_CONFIG=str(tmp_path / "none.yaml"))
    runner = CliRunner()
    r = runner.invoke(app, ["budget", "set", "--limit", "0.000001", "--period", "lifetime"],
                      env=env)
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["ask", "What causes tides?", "--docs", str(folder),
                            "--model", "up/model"], env=env)
    assert r.exit_code == 1
    assert "budget global (lifetime" in r.stderr and "would be exceeded" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and "sk-upstream-secret-value" not in r.stderr
    (rec,) = ledger_records(tmp_path / "data")
    assert rec.operation == "rag_answer" and rec.error_type == "budget_exceeded"
    assert rec.request_model == "up/model" and rec.input_tokens == 0


def ledger_records(data_dir: Path, since: datetime | None = None) -> list[InvocationRecord]:
    """The invocation records in the data directory's embedded ledger, newest first."""
    async def go() -> list[InvocationRecord]:
        acc = await open_accounting(load_settings(data_dir=data_dir))
        try:
            return await acc.ledger.list_records(LedgerQuery(since=since))
        finally:
            await acc.aclose()

    return asyncio.run(go())


def test_parse_filters_builds_one_filter():
    f = parse_filters(["tag=a,b", "tags=c", "type=md,PDF", "lang=Python", "path=./docs/api/",
                       "heading=Install > Debian", "after=2024-01-01",
                       "before=2025-01-01T00:00:00+02:00"])
    assert f is not None
    assert f.tags_any == ["a", "b", "c"]
    assert f.content_types == ["markdown", "pdf"]
    assert f.languages == ["python"]
    assert f.path_prefix == "docs/api/"
    assert f.heading_prefix == ["Install", "Debian"]
    assert f.modified_after is not None and f.modified_after.isoformat() == (
        "2024-01-01T00:00:00+00:00")
    assert f.modified_before is not None and f.modified_before.utcoffset().total_seconds() == 7200
    assert parse_filters([]) is None and parse_filters(None) is None
    assert parse_filters(["path=docs/"]) == Filter(path_prefix="docs/")
    with pytest.raises(Exception, match="given twice"):
        parse_filters(["path=a/", "path=b/"])
    with pytest.raises(Exception, match="not earlier than"):
        parse_filters(["after=2025-01-01", "before=2024-01-01"])


# -- ask, end to end with the local model ----------------------------------------------------


def _env(data_dir: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONCLAVE_")
           and not k.endswith("_BASE_URL") and k != "OLLAMA_HOST"}
    env.update(CONCLAVE_CONFIG=str(tmp_path / "none.yaml"), CONCLAVE_DATA_DIR=str(data_dir))
    return env


@pytest.mark.llama
def test_ask_end_to_end_with_the_local_model(llama_server, doc_folder: Path, tmp_path: Path):
    env = _env(llama_server.settings.data_dir, tmp_path)
    since = datetime.now(UTC)
    r = subprocess.run([CONCLAVE, "ask", "How much did revenue grow in the quarter?",
                        "--docs", str(doc_folder), "--filter", "type=pdf", "--json"],
                       capture_output=True, text=True, timeout=280, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert isinstance(data["answer"], str) and data["answer"].strip()
    assert data["model"] == "local/gemma-3-270m" and data["tier"] == 0
    assert data["usage"]["input_tokens"] > 50 and data["usage"]["output_tokens"] > 0
    assert data["cost_usd"] == 0
    assert data["indexed"]["added"] >= 10
    pages = {"Summary": 1, "Costs": 2, "Outlook": 3}
    assert data["citations"]
    for c in data["citations"]:
        assert set(c) >= {"source", "heading", "page", "score", "n"}
        assert c["source"] == "docs/report.pdf" and (doc_folder / c["source"]).is_file()
        top = c["heading"].split(" > ")[0]
        assert pages[top] == c["page"], c
        assert 1 <= c["n"] <= 5
    # the revenue passage is among the ones given to the model
    assert any("Revenue grew eleven percent" in c["snippet"] for c in data["citations"])

    # the answer is one invocation record in the ledger, flushed before the command exited
    r = subprocess.run([CONCLAVE, "spend", "--since", since.isoformat(), "--json"],
                       capture_output=True, text=True, timeout=120, env=env,
                       stdin=subprocess.DEVNULL)
    (row,) = json.loads(r.stdout)["rows"]
    assert row["key"] == "local/gemma-3-270m" and row["count"] == 1
    assert (row["input_tokens"], row["output_tokens"]) == (
        data["usage"]["input_tokens"], data["usage"]["output_tokens"])
    (rec,) = ledger_records(llama_server.settings.data_dir, since)
    assert rec.operation == "rag_answer" and rec.outcome.value == "success"
    assert rec.response_model == "local/gemma-3-270m" and rec.tier == 0

    # human output: the answer, numbered sources, and the model line on stderr
    r = subprocess.run([CONCLAVE, "ask", "When do backups run?", "--docs", str(doc_folder)],
                       capture_output=True, text=True, timeout=280, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "Sources" in r.stdout and "[1] docs/guide.md · Backups" in r.stdout
    assert "local/gemma-3-270m (tier 0)" in r.stderr
    assert "Traceback" not in r.stderr
