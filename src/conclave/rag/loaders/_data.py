"""CSV, JSON and JSONL.

CSV: one document per file; the column names, then one ``row`` span per row
written as ``column: value`` lines, so every chunk of rows still says what each
value means.  JSON: the pretty-printed text, one span per top-level key (heading
path ``[key]``) or list item.  JSONL: one document per line, id ``path#line``,
an object record written as ``key: value`` lines (string values unescaped, so a
corpus record reads as prose); a line that is not JSON is skipped and reported
by itself while the other records load.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from conclave.rag.loaders._base import FileInfo, Loaded, LoadError, TextBuilder
from conclave.rag.types import DocMetadata, Document, Span

csv.field_size_limit(16 * 1024 * 1024)


def load_csv(info: FileInfo, text: str) -> Document:
    tab = info.path.suffix.lower() in (".tsv", ".tab")
    dialect: Any = csv.excel_tab if tab else csv.excel
    if not tab:
        try:
            dialect = csv.Sniffer().sniff(text[:16384], delimiters=",;\t|")
        except csv.Error:
            dialect = csv.excel
    out = TextBuilder()
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    columns: list[str] = []
    rows = 0
    try:
        for record in reader:
            if not columns:
                if not any(c.strip() for c in record):
                    continue
                columns = _column_names(record)
                out.add("columns: " + ", ".join(columns), kind="header")
                continue
            lines = []
            for k, value in enumerate(record):
                value = value.strip()
                if value:
                    col = columns[k] if k < len(columns) else f"column {k + 1}"
                    lines.append(f"{col}: {value}")
            if lines:
                rows += 1
                out.add("\n".join(lines), kind="row")
    except csv.Error as e:
        raise LoadError(info.rel, f"not a valid CSV file (line {reader.line_num}: {e})") from e
    meta = DocMetadata(
        source=info.rel, title=info.path.name, content_type="csv", modified=info.modified,
        extra={"columns": columns, "rows": rows, "delimiter": dialect.delimiter},
    )
    return Document(id=info.rel, text=out.text, metadata=meta, spans=out.spans)


def _column_names(header: list[str]) -> list[str]:
    names: list[str] = []
    for k, raw in enumerate(header):
        name = raw.strip() or f"column {k + 1}"
        if name in names:
            name = f"{name} ({k + 1})"
        names.append(name)
    return names


def load_json(info: FileInfo, text: str) -> Document:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoadError(info.rel, f"not valid JSON (line {e.lineno} column {e.colno}: {e.msg})"
                        ) from e
    body, spans = pretty_json(value)
    meta = DocMetadata(source=info.rel, title=_title_of(value) or info.path.name,
                       content_type="json", modified=info.modified)
    return Document(id=info.rel, text=body, metadata=meta, spans=spans)


def load_jsonl(info: FileInfo, text: str) -> Loaded:
    result = Loaded()
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{info.rel}#{n}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            result.skipped.append((source, f"invalid JSON ({e.msg} at column {e.colno})"))
            continue
        body, spans = _record_text(value)
        if not body.strip():
            result.skipped.append((source, "empty record"))
            continue
        meta = DocMetadata(source=source, title=_title_of(value) or f"{info.path.name}#{n}",
                           content_type="json", modified=info.modified,
                           extra={"line": n, "format": "jsonl"})
        result.documents.append(Document(id=source, text=body, metadata=meta, spans=spans))
    return result


def _title_of(value: Any) -> str | None:
    if isinstance(value, dict):
        for key in ("title", "name", "subject"):
            if isinstance(value.get(key), str) and value[key].strip():
                return " ".join(value[key].split())[:200]
    return None


def pretty_json(value: Any) -> tuple[str, list[Span]]:
    """``json.dumps(value, indent=2)`` built piece by piece, with a span per member."""
    if isinstance(value, dict) and value:
        parts, spans, pos = ["{\n"], [], 2
        for i, (key, item) in enumerate(value.items()):
            if i:
                parts.append(",\n")
                pos += 2
            member = f"  {json.dumps(key, ensure_ascii=False)}: {_dumps_nested(item)}"
            spans.append(Span(start=pos + 2, end=pos + len(member), heading_path=[str(key)],
                              kind="field"))
            parts.append(member)
            pos += len(member)
        parts.append("\n}")
        return "".join(parts), spans
    if isinstance(value, list) and value:
        parts, spans, pos = ["[\n"], [], 2
        for i, item in enumerate(value):
            if i:
                parts.append(",\n")
                pos += 2
            member = f"  {_dumps_nested(item)}"
            spans.append(Span(start=pos + 2, end=pos + len(member), kind="item"))
            parts.append(member)
            pos += len(member)
        parts.append("\n]")
        return "".join(parts), spans
    body = json.dumps(value, indent=2, ensure_ascii=False)
    return body, [Span(start=0, end=len(body), kind="text")]


def _dumps_nested(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n  ")


def _record_text(value: Any) -> tuple[str, list[Span]]:
    """A JSONL record as ``key: value`` lines, one span per field."""
    if isinstance(value, str):
        return value, [Span(start=0, end=len(value), kind="text")] if value.strip() else []
    if not isinstance(value, dict):
        body = json.dumps(value, indent=2, ensure_ascii=False)
        return body, [Span(start=0, end=len(body), kind="text")]
    out = TextBuilder(sep="\n")
    for key, item in value.items():
        rendered = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
        if rendered.strip():
            out.add(f"{key}: {rendered.strip()}", kind="field")
    return out.text, out.spans
