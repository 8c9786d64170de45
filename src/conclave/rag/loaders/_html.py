"""HTML: visible text as blocks, h1-h6 as the heading path.

The page is walked in document order.  Block elements (paragraphs, list items,
tables, preformatted text) become blocks; inline content sitting directly in a
container (``<div>text <b>more</b></div>``) is gathered into a paragraph, so no
visible text is lost.  Script, style, navigation and other chrome are dropped.
"""

from __future__ import annotations

import warnings

from bs4 import BeautifulSoup, Comment, NavigableString, Tag

from conclave.rag.loaders._base import FileInfo, HeadingStack, TextBuilder, squash
from conclave.rag.types import DocMetadata, Document

_DROP = {"script", "style", "nav", "noscript", "template", "svg", "iframe", "head",
         "object", "canvas", "button", "select", "form"}
_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_PARAGRAPH = {"p", "blockquote", "figcaption", "caption", "dt", "dd", "address", "summary",
              "label", "legend"}
_LISTS = {"ul", "ol", "menu"}
_INLINE = {"a", "abbr", "b", "bdi", "bdo", "br", "cite", "code", "data", "del", "dfn", "em",
           "font", "i", "img", "ins", "kbd", "mark", "q", "s", "samp", "small", "span",
           "strong", "sub", "sup", "time", "tt", "u", "var", "wbr"}


def _parser() -> str:
    try:
        import lxml  # noqa: F401
    except ImportError:  # pragma: no cover - lxml ships with the RAG extra
        return "html.parser"
    return "lxml"


def load_html(info: FileInfo, raw: str) -> Document:
    with warnings.catch_warnings():
        # XHTML pages and short snippets make bs4 warn; the text comes out right anyway
        warnings.simplefilter("ignore")
        soup = BeautifulSoup(raw, _parser())
    # <title> and <meta> live in <head>: searching only there keeps a 5 MB page fast
    head = soup.head if soup.head is not None else soup
    title_tag = head.find("title")
    page_title = squash(title_tag.get_text(" ")) if title_tag else ""
    walker = _Walker()
    walker.walk(soup.body or soup)
    meta = DocMetadata(
        source=info.rel,
        title=page_title or walker.first_h1 or walker.first_heading or info.path.name,
        content_type="html",
        modified=info.modified,
    )
    extra: dict[str, str] = {}
    for name in ("description", "author", "keywords"):
        tag = head.find("meta", attrs={"name": name})
        if isinstance(tag, Tag) and isinstance(tag.get("content"), str):
            extra[name] = squash(str(tag["content"]))
    meta.extra = extra
    if "keywords" in extra:
        meta.tags = [t.strip() for t in extra["keywords"].split(",") if t.strip()]
    return Document(id=info.rel, text=walker.out.text, metadata=meta, spans=walker.out.spans)


class _Walker:
    def __init__(self) -> None:
        self.out = TextBuilder()
        self.headings = HeadingStack()
        self.first_heading: str | None = None
        self.first_h1: str | None = None
        self._inline: list[str] = []

    def _emit(self, text: str, kind: str) -> None:
        self.out.add(text, heading_path=self.headings.path, kind=kind)

    def _flush(self) -> None:
        if self._inline:
            self._emit(squash(" ".join(self._inline)), "paragraph")
            self._inline = []

    def walk(self, node: Tag) -> None:
        for child in node.children:
            if isinstance(child, Comment):
                continue
            if isinstance(child, NavigableString):
                if child.strip():
                    self._inline.append(str(child))
                continue
            if not isinstance(child, Tag):
                continue
            name = child.name.lower()
            if name in _DROP or child.get("hidden") is not None:
                continue
            if name in _INLINE:
                self._inline.append(child.get_text(" "))
                continue
            self._flush()
            if name in _HEADINGS:
                title = squash(child.get_text(" "))
                if title:
                    self.headings.push(_HEADINGS[name], title)
                    self.first_heading = self.first_heading or title
                    if name == "h1" and self.first_h1 is None:
                        self.first_h1 = title
                    self._emit(title, "heading")
            elif name == "pre":
                self._emit(child.get_text(), "code")
            elif name in _PARAGRAPH:
                self._emit(squash(child.get_text(" ")), "paragraph")
            elif name in _LISTS:
                self._emit("\n".join(_list_lines(child, 0)), "list")
            elif name == "table":
                self._emit("\n".join(_table_lines(child)), "table")
            elif name == "hr":
                continue
            else:  # div, section, article, main, li outside a list, ...
                self.walk(child)
                self._flush()
        self._flush()


def _list_lines(lst: Tag, depth: int) -> list[str]:
    lines: list[str] = []
    ordered = lst.name == "ol"
    for n, item in enumerate(lst.find_all("li", recursive=False), start=1):
        nested = list(item.find_all(list(_LISTS), recursive=False))
        for sub in nested:
            sub.extract()
        text = squash(item.get_text(" "))
        marker = f"{n}." if ordered else "-"
        if text:
            lines.append(f"{'  ' * depth}{marker} {text}")
        for sub in nested:
            lines.extend(_list_lines(sub, depth + 1))
    return lines


def _table_lines(table: Tag) -> list[str]:
    """One line per row, cells joined by `` | ``; nested tables are flattened into cells."""
    lines: list[str] = []
    for row in table.find_all("tr"):
        if row.find_parent("table") is not table:
            continue
        cells = [squash(c.get_text(" ")) for c in row.find_all(["th", "td"], recursive=False)]
        if any(cells):
            lines.append(" | ".join(cells))
    return lines
