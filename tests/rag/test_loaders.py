"""Loaders on real files of every format, bad files reported and skipped."""

from __future__ import annotations

import gzip
import json
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conclave.errors import ConclaveError
from conclave.rag.loaders import LoadError, detect, iter_files, load_file, load_folder, load_path
from conclave.rag.types import Document
from tests.rag.conftest import CONFIG_JSON, PDF_PAGES, write_pdf

EXPECTED_IDS = {
    "notes.txt", "docs/guide.md", "docs/release.html", "docs/report.pdf", "docs/handbook.docx",
    "src/inventory.py", "src/app.js", "data/cities.csv", "data/config.json",
    "data/records.jsonl#1", "data/records.jsonl#2", "data/records.jsonl#5",
}


def by_id(docs: list[Document]) -> dict[str, Document]:
    return {d.id: d for d in docs}


def span_texts(doc: Document, kind: str | None = None) -> list[str]:
    return [doc.text[s.start:s.end] for s in doc.spans if kind is None or s.kind == kind]


def check_spans(doc: Document) -> None:
    """Spans are ordered, disjoint, inside the text and never blank."""
    end = 0
    for s in doc.spans:
        assert end <= s.start < s.end <= len(doc.text), (doc.id, s)
        assert doc.text[s.start:s.end].strip(), (doc.id, s)
        end = s.end


def test_folder_loads_every_format_and_skips_bad_files(doc_folder: Path) -> None:
    report = load_folder(doc_folder)
    docs = by_id(report.documents)
    assert set(docs) == EXPECTED_IDS
    skipped = dict(report.skipped)
    assert skipped["docs/broken.pdf"].startswith("not a valid PDF (")
    assert "binary" in skipped["data/blob.dat"]
    assert skipped["data/records.jsonl#3"].startswith("invalid JSON")
    assert set(skipped) == {"docs/broken.pdf", "data/blob.dat", "data/records.jsonl#3"}
    assert sorted(report.failed) == ["data/blob.dat", "docs/broken.pdf"]
    # hidden files and tool folders are never walked
    assert not [f for f in report.files if f.startswith((".", "node_modules"))]
    assert "data/records.jsonl" in report.files and len(report.files) == 12
    kinds = {d.id: d.metadata.content_type for d in report.documents}
    assert kinds["docs/report.pdf"] == "pdf" and kinds["docs/handbook.docx"] == "docx"
    assert kinds["src/app.js"] == "code" and kinds["data/records.jsonl#1"] == "json"
    for doc in report.documents:
        assert doc.metadata.source == doc.id
        assert doc.metadata.title
        assert doc.metadata.modified is not None and doc.metadata.modified.tzinfo is not None
        check_spans(doc)


def test_ids_and_hashes_are_stable_across_runs(doc_folder: Path) -> None:
    first = {d.id: d.content_hash for d in load_folder(doc_folder).documents}
    second = {d.id: d.content_hash for d in load_folder(doc_folder).documents}
    assert first == second
    (doc_folder / "notes.txt").write_text("Different notes.\n")
    third = {d.id: d.content_hash for d in load_folder(doc_folder).documents}
    assert third["notes.txt"] != first["notes.txt"]
    assert {k: v for k, v in third.items() if k != "notes.txt"} == {
        k: v for k, v in first.items() if k != "notes.txt"}


def test_markdown_front_matter_headings_and_code(doc_folder: Path) -> None:
    [doc] = load_path(doc_folder / "docs" / "guide.md", doc_folder)
    m = doc.metadata
    assert (m.title, m.tags, m.content_type) == ("Operations Guide", ["ops", "database"],
                                                  "markdown")
    assert m.modified == datetime(2024, 3, 5, tzinfo=UTC)
    assert m.extra == {"owner": "platform-team", "review": {"every": "90 days"}}
    assert not doc.text.startswith("---") and doc.text.startswith("# Installation")
    [code] = [s for s in doc.spans if s.kind == "code"]
    assert doc.text[code.start:code.end].startswith("```python\ndef check_memory")
    assert doc.text[code.start:code.end].endswith("2**30\n```")
    assert code.heading_path == ["Installation", "Requirements"]
    paths = {doc.text[s.start:s.end].split("\n")[0]: s.heading_path for s in doc.spans}
    assert paths["# Backups"] == ["Backups"]
    assert paths["| kind | retention |"] == ["Backups"]
    assert paths["- PostgreSQL 16 or newer"] == ["Installation", "Requirements"]
    assert [s.kind for s in doc.spans if s.kind in ("list", "table")] == ["list", "table"]


def test_markdown_without_front_matter_and_setext(tmp_path: Path) -> None:
    p = tmp_path / "plain.md"
    p.write_text("Project Title\n=============\n\nIntro text.\n\nDetails\n-------\n\nMore.\n")
    [doc] = load_path(p, tmp_path)
    assert doc.metadata.title == "Project Title"
    assert doc.metadata.modified == datetime.fromtimestamp(p.stat().st_mtime, tz=UTC)
    assert [s.heading_path for s in doc.spans] == [
        ["Project Title"], ["Project Title"], ["Project Title", "Details"],
        ["Project Title", "Details"]]


def test_markdown_bad_front_matter_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.md").write_text("---\ntitle: [unclosed\n---\n# Body\n")
    (tmp_path / "ok.md").write_text("# Fine\n")
    with pytest.raises(LoadError) as err:
        load_path(tmp_path / "bad.md", tmp_path)
    assert str(err.value).startswith("bad.md: invalid YAML front-matter")
    assert isinstance(err.value, ConclaveError)
    report = load_folder(tmp_path)
    assert [d.id for d in report.documents] == ["ok.md"]
    assert report.skipped[0][0] == "bad.md"


def test_html_text_title_and_heading_paths(doc_folder: Path) -> None:
    [doc] = load_path(doc_folder / "docs" / "release.html", doc_folder)
    assert doc.metadata.title == "Release Notes"
    assert doc.metadata.extra == {"description": "What changed in 2.0"}
    for gone in ("SECRET-TRACKER", "never indexed", "color: red", "navigation link"):
        assert gone not in doc.text
    spans = {doc.text[s.start:s.end]: s for s in doc.spans}
    assert spans["Version 2.0"].kind == "heading"
    assert spans["Loose text in a div with emphasis"].heading_path == ["Version 2.0"]
    lst = spans["- The --fast flag is gone\n  - use --workers instead\n"
                "- Config files must be UTF-8"]
    assert lst.kind == "list" and lst.heading_path == ["Version 2.0", "Breaking changes"]
    table = spans["benchmark | 1.9 | 2.0\nstartup | 120 ms | 45 ms"]
    assert table.kind == "table" and table.heading_path == ["Version 2.0", "Performance"]
    pre = spans["$ server --workers 8\n  listening on :8080"]
    assert pre.kind == "code"


def test_pdf_pages_outline_and_title(doc_folder: Path) -> None:
    [doc] = load_path(doc_folder / "docs" / "report.pdf", doc_folder)
    assert doc.metadata.title == "Quarterly Report"
    assert doc.metadata.extra == {"pages": 3}
    assert [s.page for s in doc.spans] == [1, 2, 3]
    assert [s.heading_path for s in doc.spans] == [["Summary"], ["Costs"], ["Outlook"]]
    for span, (heading, body) in zip(doc.spans, PDF_PAGES, strict=True):
        page_text = " ".join(doc.text[span.start:span.end].split())
        assert page_text.startswith(heading)
        assert body.split(".")[0] in page_text
    assert "Energy detail text." in doc.text[doc.spans[1].start:doc.spans[1].end]


def test_pdf_without_text_and_corrupt_pdf(tmp_path: Path) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.rect(20, 20, 50, 50)
    pdf.output(str(tmp_path / "scan.pdf"))
    with pytest.raises(LoadError, match=r"scan\.pdf: no extractable text in 1 page"):
        load_path(tmp_path / "scan.pdf", tmp_path)
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\n")
    with pytest.raises(LoadError, match=r"^report\.pdf: not a valid PDF \(.+\)"):
        load_path(tmp_path / "report.pdf", tmp_path)


def test_docx_headings_lists_and_tables(doc_folder: Path) -> None:
    [doc] = load_path(doc_folder / "docs" / "handbook.docx", doc_folder)
    assert doc.metadata.title == "Onboarding Handbook"
    assert doc.metadata.tags == ["hr", "onboarding"]
    spans = {doc.text[s.start:s.end]: s for s in doc.spans}
    assert spans["Welcome"].kind == "heading" and spans["Welcome"].heading_path == ["Welcome"]
    assert spans["- Ask IT for a laptop and a badge."].heading_path == ["Welcome", "Accounts"]
    table = spans["system | owner\nemail | IT desk\npayroll | HR"]
    assert table.kind == "table" and table.heading_path == ["Welcome", "Accounts"]
    assert spans["Health insurance starts on day one."].heading_path == ["Benefits"]


def test_corrupt_and_legacy_office_files(tmp_path: Path) -> None:
    (tmp_path / "a.docx").write_bytes(b"this is not a zip archive")
    with zipfile.ZipFile(tmp_path / "b.docx", "w") as z:
        z.writestr("hello.txt", "no word document inside")
    (tmp_path / "c.xlsx").write_bytes(b"PK\x03\x04....")
    (tmp_path / "d.doc").write_bytes(b"\xd0\xcf\x11\xe0legacy")
    report = load_folder(tmp_path)
    reasons = dict(report.skipped)
    assert reasons["a.docx"].startswith("not a valid DOCX file")
    assert reasons["b.docx"].startswith("not a valid DOCX file")
    assert "export it as .csv" in reasons["c.xlsx"]
    assert "save it as .docx" in reasons["d.doc"]
    assert report.documents == []


def test_python_spans_follow_classes_and_methods(doc_folder: Path) -> None:
    [doc] = load_path(doc_folder / "src" / "inventory.py", doc_folder)
    assert (doc.metadata.content_type, doc.metadata.language) == ("code", "python")
    got = [(s.heading_path, doc.text[s.start:s.end].split("\n")[0]) for s in doc.spans]
    assert got == [
        (["inventory.py"], '"""Inventory helpers."""'),
        (["inventory.py", "Item"], "# A warehouse item."),
        (["inventory.py", "Item", "restock"], "    def restock(self, n: int) -> None:"),
        (["inventory.py", "Item", "empty"], "    @property"),
        (["inventory.py", "fetch"], "async def fetch(name: str) -> Item:"),
        (["inventory.py", "total"], "def total(items: list[Item]) -> int:"),
    ]
    assert doc.text[doc.spans[0].start:doc.spans[0].end].endswith("LIMIT = 10")


def test_python_syntax_error_falls_back_to_regex(tmp_path: Path) -> None:
    p = tmp_path / "broken.py"
    p.write_text("import os\n\ndef ok():\n    return 1\n\ndef broken(:\n    pass\n")
    [doc] = load_path(p, tmp_path)
    assert [s.heading_path for s in doc.spans] == [
        ["broken.py"], ["broken.py", "ok"], ["broken.py", "broken"]]


def test_javascript_and_other_languages(doc_folder: Path, tmp_path: Path) -> None:
    [js] = load_path(doc_folder / "src" / "app.js", doc_folder)
    assert js.metadata.language == "javascript"
    assert [s.heading_path[-1] for s in js.spans] == ["app.js", "loadConfig", "double", "Server"]
    assert js.text[js.spans[1].start:js.spans[1].end].startswith("// Parse the configuration")
    (tmp_path / "server.go").write_text(
        "package main\n\nimport \"fmt\"\n\ntype Server struct {\n\tport int\n}\n\n"
        "// Start runs it.\nfunc (s *Server) Start() error {\n\treturn nil\n}\n\n"
        "func main() {\n\tfmt.Println(\"hi\")\n}\n")
    (tmp_path / "lib.rs").write_text(
        "use std::fmt;\n\npub struct Point { x: i32 }\n\n#[derive(Debug)]\nenum Kind { A }\n\n"
        "impl fmt::Display for Point {\n    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result"
        " { Ok(()) }\n}\n\npub fn origin() -> Point { Point { x: 0 } }\n")
    (tmp_path / "deploy").write_text("#!/usr/bin/env bash\nset -e\n\ndeploy() {\n  echo hi\n}\n")
    [go] = load_path(tmp_path / "server.go", tmp_path)
    assert [s.heading_path[-1] for s in go.spans] == ["server.go", "Server", "Server.Start", "main"]
    [rs] = load_path(tmp_path / "lib.rs", tmp_path)
    assert [s.heading_path[-1] for s in rs.spans] == [
        "lib.rs", "Point", "Kind", "impl fmt::Display for Point", "origin"]
    assert rs.text[rs.spans[2].start:rs.spans[2].end].startswith("#[derive(Debug)]")
    [sh] = load_path(tmp_path / "deploy", tmp_path)
    assert sh.metadata.language == "shell"
    assert sh.spans[-1].heading_path == ["deploy", "deploy"]


def test_csv_rows_as_column_value_lines(doc_folder: Path, tmp_path: Path) -> None:
    [doc] = load_path(doc_folder / "data" / "cities.csv", doc_folder)
    assert doc.metadata.extra == {"columns": ["city", "country", "population"], "rows": 3,
                                  "delimiter": ","}
    assert span_texts(doc, "header") == ["columns: city, country, population"]
    rows = span_texts(doc, "row")
    assert rows[1] == "city: Washington, D.C.\ncountry: United States\npopulation: 689545"
    assert len(rows) == 3
    (tmp_path / "semi.csv").write_text("name;score\nann;3\nbob;\n\n")
    [semi] = load_path(tmp_path / "semi.csv", tmp_path)
    assert span_texts(semi, "row") == ["name: ann\nscore: 3", "name: bob"]


def test_json_pretty_text_with_key_spans(doc_folder: Path) -> None:
    [doc] = load_path(doc_folder / "data" / "config.json", doc_folder)
    assert doc.text == json.dumps(CONFIG_JSON, indent=2, ensure_ascii=False)
    assert doc.metadata.title == "Service config"
    assert [s.heading_path for s in doc.spans] == [["title"], ["retries"], ["endpoints"],
                                                   ["notes"]]
    assert span_texts(doc)[3] == '"notes": "Ünïcode is kept"'


def test_jsonl_one_document_per_line(doc_folder: Path) -> None:
    result = load_file(doc_folder / "data" / "records.jsonl", doc_folder)
    assert [d.id for d in result.documents] == ["data/records.jsonl#1", "data/records.jsonl#2",
                                                "data/records.jsonl#5"]
    first = result.documents[0]
    assert first.text == "_id: d1\ntitle: Tides\ntext: Tides are caused by the moon."
    assert first.metadata.title == "Tides" and first.metadata.extra["line"] == 1
    assert result.documents[1].metadata.title == "records.jsonl#2"
    assert result.skipped == [("data/records.jsonl#3",
                               "invalid JSON (Expecting value at column 23)")]
    assert not result.failed
    with pytest.raises(LoadError, match=r"records\.jsonl#3: invalid JSON"):
        load_path(doc_folder / "data" / "records.jsonl", doc_folder)


def test_text_encodings_and_empty_files(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes("Caf\u00e9 cr\u00e8me \u2013 na\u00efve".encode("cp1252"))
    (tmp_path / "wide.txt").write_bytes("Grüße aus UTF-16".encode("utf-16"))
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "blank.md").write_text("\n\n   \n")
    report = load_folder(tmp_path)
    docs = by_id(report.documents)
    assert docs["latin.txt"].text == "Café crème – naïve"
    assert docs["wide.txt"].text == "Grüße aus UTF-16"
    assert sorted(report.empty) == ["blank.md", "empty.py"]
    assert report.skipped == [] and report.failed == []
    assert load_path(tmp_path / "empty.py", tmp_path) == []


def test_limits_errors_and_raise_mode(doc_folder: Path, tmp_path: Path) -> None:
    report = load_folder(doc_folder, max_bytes=200)
    assert dict(report.skipped)["docs/report.pdf"].startswith("file too large")
    with pytest.raises(LoadError, match=r"^data/blob\.dat: binary file"):  # walked first
        load_folder(doc_folder, on_error="raise")
    with pytest.raises(LoadError, match="not a directory"):
        load_folder(tmp_path / "missing")
    with pytest.raises(LoadError, match="file not found"):
        load_path(tmp_path / "nope.txt", tmp_path)
    seen: list[str] = []
    load_folder(doc_folder, progress=lambda r: seen.append(r.rel))
    assert seen == [str(p.relative_to(doc_folder)) for p in iter_files(doc_folder)]


def test_detection_by_content(tmp_path: Path) -> None:
    write_pdf(tmp_path / "scan0001", PDF_PAGES[:1])
    (tmp_path / "page").write_text("<!doctype html><html><body><p>Hi there</p></body></html>")
    (tmp_path / "README").write_text("Plain readme text.\n")
    docs = by_id(load_folder(tmp_path).documents)
    assert docs["scan0001"].metadata.content_type == "pdf"
    assert docs["page"].metadata.content_type == "html" and docs["page"].text == "Hi there"
    assert docs["README"].metadata.content_type == "text"
    assert detect(Path("x.tsv"), b"") == ("csv", None)
    assert detect(Path("Dockerfile"), b"FROM debian") == ("code", "dockerfile")


def test_gzip_compressed_documents(doc_folder: Path, tmp_path: Path) -> None:
    """Debian ships docs as README.gz, manual.pdf.gz...: judged by the name inside."""
    (tmp_path / "README.md.gz").write_bytes(gzip.compress(b"# Read me\n\nFirst steps.\n"))
    (tmp_path / "report.pdf.gz").write_bytes(
        gzip.compress((doc_folder / "docs" / "report.pdf").read_bytes()))
    (tmp_path / "changelog.gz").write_bytes(gzip.compress(b"pkg (1.0) unstable; urgency=low\n"))
    (tmp_path / "manual.ps.gz").write_bytes(gzip.compress(b"%!PS-Adobe-3.0\n"))
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(b"some text " * 50)[:20])
    report = load_folder(tmp_path)
    docs = by_id(report.documents)
    assert docs["README.md.gz"].metadata.content_type == "markdown"
    assert docs["README.md.gz"].metadata.title == "Read me"
    assert [s.page for s in docs["report.pdf.gz"].spans] == [1, 2, 3]
    assert docs["changelog.gz"].metadata.content_type == "text"
    assert docs["changelog.gz"].metadata.title == "changelog"
    reasons = dict(report.skipped)
    assert reasons["manual.ps.gz"] == "unsupported format: PostScript (convert it to .pdf)"
    assert reasons["cut.txt.gz"].startswith("not a valid gzip file")
