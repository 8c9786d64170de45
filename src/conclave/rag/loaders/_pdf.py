"""PDF through pypdf: one document per file, one span per page (1-based ``page``).

The outline (bookmarks), when the file has one, gives each page a heading path:
the section that starts on the page, else the one still open from earlier pages.
pypdf reports recoverable damage through the ``pypdf`` logger; those warnings are
silenced while a file loads, since a file that loads is not worth a console
warning and one that does not load is reported by the folder loader anyway.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from conclave.rag.loaders._base import FileInfo, LoadError, TextBuilder, squash
from conclave.rag.types import DocMetadata, Document

log = logging.getLogger(__name__)


@contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """Silence pypdf's warnings (its modules log under ``pypdf.*``) while one file loads."""
    logger = logging.getLogger("pypdf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_pdf(info: FileInfo) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError

    with _quiet_pypdf():
        try:
            reader = PdfReader(io.BytesIO(info.data) if info.data is not None else info.path)
            if reader.is_encrypted and not reader.decrypt(""):
                raise LoadError(info.rel, "encrypted PDF (a password is needed)",
                                hint="save an unencrypted copy to index it")
            page_paths = _outline_paths(reader)
            out = TextBuilder()
            for index, page in enumerate(reader.pages):
                text = page.extract_text() or ""
                out.add(text.strip(), heading_path=page_paths.get(index, []), page=index + 1,
                        kind="page")
            title = None
            if reader.metadata is not None and reader.metadata.title:
                title = squash(str(reader.metadata.title))
            pages = len(reader.pages)
        except LoadError:
            raise
        except FileNotDecryptedError as e:
            raise LoadError(info.rel, f"encrypted PDF ({e})") from e
        except PdfReadError as e:
            raise LoadError(info.rel, f"not a valid PDF ({e})") from e
    if not out.spans:
        raise LoadError(info.rel, f"no extractable text in {pages} page(s) (a scanned PDF?)",
                        hint="run OCR on it first, e.g. ocrmypdf")
    meta = DocMetadata(source=info.rel, title=title or info.path.name, content_type="pdf",
                       modified=info.modified, extra={"pages": pages})
    return Document(id=info.rel, text=out.text, metadata=meta, spans=out.spans)


def _outline_paths(reader: Any) -> dict[int, list[str]]:
    """Page index -> heading path from the outline; damaged outlines give none."""
    entries: list[tuple[int, list[str]]] = []

    def walk(items: list[Any], parents: list[str]) -> None:
        last: list[str] = parents
        for item in items:
            if isinstance(item, list):
                walk(item, last)
                continue
            title = squash(str(getattr(item, "title", "") or ""))
            if not title:
                continue
            last = [*parents, title]
            try:
                page = reader.get_destination_page_number(item)
            except Exception:  # a dangling bookmark is not worth failing the file
                continue
            if page is not None and page >= 0:
                entries.append((page, last))

    try:
        walk(list(reader.outline), [])
    except Exception as e:  # pypdf raises assorted errors on broken outlines
        log.debug("PDF outline unreadable: %s", e)
        return {}
    if not entries:
        return {}
    entries.sort(key=lambda e: e[0])  # stable: document order within a page
    paths: dict[int, list[str]] = {}
    current: list[str] = []
    k = 0
    for page in range(len(reader.pages)):
        first_here: list[str] | None = None
        while k < len(entries) and entries[k][0] <= page:
            if entries[k][0] == page and first_here is None:
                first_here = entries[k][1]
            current = entries[k][1]
            k += 1
        path = first_here if first_here is not None else current
        if path:
            paths[page] = path
    return paths
