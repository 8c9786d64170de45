"""DOCX through python-docx: paragraphs and tables in body order.

``Heading N`` styles (and ``Title``) build the heading path; a paragraph whose
style is not a heading but carries an outline level (how some templates mark
headings) counts as one too.  Tables become one line per row, cells joined by
`` | ``; a merged cell repeats in python-docx and is written once.
"""

from __future__ import annotations

import io
import re
import zipfile
from typing import Any

from conclave.rag.loaders._base import FileInfo, HeadingStack, LoadError, TextBuilder, squash
from conclave.rag.types import DocMetadata, Document

_HEADING_STYLE = re.compile(r"^heading\s*(\d)$", re.I)
_LIST_STYLE = re.compile(r"^list", re.I)


def load_docx(info: FileInfo) -> Document:
    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        source = io.BytesIO(info.data) if info.data is not None else str(info.path)
        document = docx.Document(source)
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as e:
        raise LoadError(info.rel, f"not a valid DOCX file ({e or type(e).__name__})",
                        hint="legacy .doc files must be saved as .docx first") from e

    out = TextBuilder()
    headings = HeadingStack()
    title_para: str | None = None
    first_heading: str | None = None
    for block in document.iter_inner_content():
        if isinstance(block, Paragraph):
            text = block.text.strip()
            if not text:
                continue
            style = _style_name(block)
            level = _heading_level(block, style)
            if style.lower() == "title":
                title_para = title_para or squash(text)
                headings.push(0, squash(text))
                out.add(text, heading_path=headings.path, kind="heading")
            elif level is not None:
                heading = squash(text)
                headings.push(level, heading)
                first_heading = first_heading or heading
                out.add(text, heading_path=headings.path, kind="heading")
            elif _LIST_STYLE.match(style):
                out.add(f"- {text}", heading_path=headings.path, kind="list")
            else:
                out.add(text, heading_path=headings.path, kind="paragraph")
        elif isinstance(block, Table):
            out.add("\n".join(_table_lines(block)), heading_path=headings.path, kind="table")

    core_title = squash(document.core_properties.title or "")
    extra: dict[str, Any] = {}
    if document.core_properties.author:
        extra["author"] = document.core_properties.author
    tags = [t.strip() for t in re.split(r"[,;]", document.core_properties.keywords or "")
            if t.strip()]
    meta = DocMetadata(
        source=info.rel,
        title=core_title or title_para or first_heading or info.path.name,
        content_type="docx",
        modified=info.modified,
        tags=tags,
        extra=extra,
    )
    return Document(id=info.rel, text=out.text, metadata=meta, spans=out.spans)


def _style_name(paragraph: Any) -> str:
    try:
        return str(paragraph.style.name or "") if paragraph.style is not None else ""
    except (KeyError, AttributeError):  # a style id the styles part does not define
        return ""


def _heading_level(paragraph: Any, style: str) -> int | None:
    m = _HEADING_STYLE.match(style)
    if m:
        return int(m.group(1))
    ppr = paragraph._p.pPr
    if ppr is not None:
        for el in ppr.iterchildren():
            if el.tag.endswith("}outlineLvl"):
                val = next((v for k, v in el.attrib.items() if k.endswith("}val")), None)
                if val is not None and val.isdigit() and int(val) < 9:
                    return int(val) + 1
    return None


def _table_lines(table: Any) -> list[str]:
    lines: list[str] = []
    for row in table.rows:
        cells: list[str] = []
        previous = None
        for cell in row.cells:
            if previous is not None and cell._tc is previous:
                continue  # a horizontally merged cell appears once per grid column
            previous = cell._tc
            cells.append(squash(cell.text))
        if any(cells):
            lines.append(" | ".join(cells))
    return lines
