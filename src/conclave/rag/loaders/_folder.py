"""Choosing a loader for a file, and walking a folder.

A file's format comes from its extension, else from its first bytes (``%PDF-``,
a DOCX zip, an HTML doctype, a shebang), else it is plain text unless it looks
binary.  A ``.gz`` file is read decompressed and judged by the rest of its name
(Debian ships its documentation as ``README.gz``, ``guide.html.gz``...).
Every failure, expected or not, becomes a ``(path, reason)`` entry: one bad
file never stops a batch and never prints a traceback.
"""

from __future__ import annotations

import gzip
import logging
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conclave.rag.loaders._base import (
    FileInfo,
    Loaded,
    LoadError,
    decode_text,
    file_mtime,
    looks_binary,
)
from conclave.rag.loaders._code import EXTENSIONS as CODE_EXTENSIONS
from conclave.rag.loaders._code import FILENAMES, SHEBANGS, load_code
from conclave.rag.loaders._data import load_csv, load_json, load_jsonl
from conclave.rag.loaders._markdown import load_markdown, load_text
from conclave.rag.types import Document

log = logging.getLogger(__name__)

#: directories never walked into (hidden directories are skipped too)
SKIP_DIRS = frozenset({
    "node_modules", "__pycache__", "site-packages", "venv", "env", "bower_components",
    "__pypackages__",
})
#: default per-file size limit for folder loading
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_MARKDOWN = {".md", ".markdown", ".mdown", ".mkd", ".mdx"}
_HTML = {".html", ".htm", ".xhtml"}
_TEXT = {".txt", ".text", ".rst", ".adoc", ".asciidoc", ".org", ".tex", ".log", ".nfo", ""}
_UNSUPPORTED = {
    ".doc": "legacy Word .doc format (save it as .docx)",
    ".xls": "spreadsheet format (export it as .csv)",
    ".xlsx": "spreadsheet format (export it as .csv)",
    ".ods": "spreadsheet format (export it as .csv)",
    ".ppt": "presentation format (export it as .pdf)",
    ".pptx": "presentation format (export it as .pdf)",
    ".odt": "OpenDocument text (save it as .docx)",
    ".rtf": "RTF format (save it as .docx)",
    ".epub": "e-book format (convert it to .html or .pdf)",
    ".ps": "PostScript (convert it to .pdf)",
    ".eps": "PostScript (convert it to .pdf)",
    ".dvi": "TeX DVI output (convert it to .pdf)",
}
_BINARY = {
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ico", ".svg", ".heic",
    ".zip", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".tar", ".whl", ".jar",
    ".exe", ".dll", ".so", ".dylib", ".o", ".a", ".class", ".pyc", ".pyo", ".wasm", ".bin",
    ".mp3", ".mp4", ".wav", ".flac", ".ogg", ".mkv", ".mov", ".avi", ".webm",
    ".ttf", ".otf", ".woff", ".woff2", ".sqlite", ".db", ".parquet", ".npy", ".pkl",
    ".safetensors", ".gguf", ".pt", ".onnx",
}

Kind = Literal["text", "markdown", "html", "pdf", "docx", "code", "csv", "json", "jsonl"]


@dataclass
class FileResult:
    """What loading one file gave: its documents, and what was skipped with the reason.

    ``failed`` means the file as a whole did not load (its ``skipped`` entry says
    why); a JSONL file can load and still skip some lines (``path#n`` entries).
    ``empty`` means the file loaded fine and holds no text (an empty
    ``__init__.py``): nothing to index, nothing to report.
    """

    rel: str
    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: bool = False
    empty: bool = False


@dataclass
class LoadReport:
    """A folder load: the documents, the files walked, and what was skipped and why."""

    documents: list[Document] = field(default_factory=list)
    #: ``(relative path, reason)``; ``path#n`` for a single bad JSONL line
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: every candidate file walked (relative POSIX paths), loaded or not
    files: list[str] = field(default_factory=list)
    #: files that did not load at all (a subset of ``files``): keep their old index entries
    failed: list[str] = field(default_factory=list)
    #: files without any text (a subset of ``files``, not reported as skipped)
    empty: list[str] = field(default_factory=list)


def relative_id(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def detect(path: Path, head: bytes) -> tuple[Kind, str | None]:
    """The loader kind (and language, for code) for ``path`` whose first bytes are ``head``.

    Raises :class:`LoadError` (with ``path.name`` as the source) for unsupported formats.
    """
    ext = path.suffix.lower()
    if ext in _MARKDOWN:
        return "markdown", None
    if ext in _HTML:
        return "html", None
    if ext == ".pdf":
        return "pdf", None
    if ext == ".docx":
        return "docx", None
    if ext in (".csv", ".tsv", ".tab"):
        return "csv", None
    if ext == ".json":
        return "json", None
    if ext in (".jsonl", ".ndjson"):
        return "jsonl", None
    if path.name in FILENAMES:
        return "code", FILENAMES[path.name]
    if ext in CODE_EXTENSIONS:
        return "code", CODE_EXTENSIONS[ext]
    if ext in _UNSUPPORTED:
        raise LoadError(path.name, f"unsupported format: {_UNSUPPORTED[ext]}")
    if ext in _BINARY:
        raise LoadError(path.name, f"unsupported binary format ({ext})")
    if head.startswith(b"%PDF-"):
        return "pdf", None
    if head.startswith(b"PK\x03\x04"):
        if _is_docx(path):
            return "docx", None
        raise LoadError(path.name, "unsupported format: a zip archive")
    if looks_binary(head):
        raise LoadError(path.name, "binary file (not a supported document format)")
    lowered = head[:512].lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "html", None
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].decode("latin-1").split()
        if words and words[0].endswith("/env"):
            words = [w for w in words[1:] if not w.startswith("-")]
        prog = os.path.basename(words[0]) if words else ""
        lang = SHEBANGS.get(prog) or SHEBANGS.get(prog.rstrip("0123456789."))
        if lang:
            return "code", lang
    return "text", None


def _is_docx(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return "word/document.xml" in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def load_file(path: Path, root: Path, *, max_bytes: int | None = None) -> FileResult:
    """Load one file; never raises for a bad file (the result says what went wrong)."""
    rel = relative_id(path, root)
    result = FileResult(rel=rel)
    try:
        loaded = _load(path, rel, max_bytes)
    except LoadError as e:
        result.skipped.append((rel, e.reason if not e.hint else f"{e.reason} ({e.hint})"))
        result.failed = True
        return result
    except Exception as e:  # a parser bug on a hostile file must not stop the batch
        log.debug("loader crashed on %s", rel, exc_info=True)
        result.skipped.append((rel, f"could not be read ({type(e).__name__}: {e})"))
        result.failed = True
        return result
    result.documents = [doc for doc in loaded.documents if doc.text.strip()]
    result.skipped.extend(loaded.skipped)
    result.empty = not result.documents and not result.skipped
    result.failed = not result.documents and bool(result.skipped)
    return result


def _load(path: Path, rel: str, max_bytes: int | None) -> Loaded:
    try:
        st = path.stat()
    except FileNotFoundError as e:
        reason = "broken symbolic link" if path.is_symlink() else "file not found"
        raise LoadError(rel, reason) from e
    except OSError as e:
        raise LoadError(rel, f"cannot read file ({e.strerror or e})") from e
    if not path.is_file():
        raise LoadError(rel, "not a regular file", hint="use load_folder for a directory")
    if max_bytes is not None and st.st_size > max_bytes:
        raise LoadError(rel, f"file too large ({st.st_size / 1e6:.1f} MB > "
                             f"{max_bytes / 1e6:.1f} MB limit)")
    if st.st_size == 0:
        return Loaded()
    data: bytes | None = None
    name = path
    try:
        if path.suffix.lower() == ".gz" and len(path.name) > 3:
            data = _gunzip(path, rel, max_bytes)
            name = path.with_name(path.name[:-3])
            head = data[:8192]
        else:
            with path.open("rb") as f:
                head = f.read(8192)
    except OSError as e:
        raise LoadError(rel, f"cannot read file ({e.strerror or e})") from e
    if data is not None and not data:
        return Loaded()
    try:
        kind, language = detect(name, head)
    except LoadError as e:
        raise LoadError(rel, e.reason, hint=e.hint) from None

    info = FileInfo(path=name, rel=rel, modified=file_mtime(path), data=data)
    if kind == "pdf":
        from conclave.rag.loaders._pdf import load_pdf

        return Loaded(documents=[load_pdf(info)])
    if kind == "docx":
        from conclave.rag.loaders._docx import load_docx

        return Loaded(documents=[load_docx(info)])

    text = decode_text(data if data is not None else path.read_bytes(), rel)
    if kind == "jsonl":
        return load_jsonl(info, text)
    if kind == "markdown":
        doc = load_markdown(info, text)
    elif kind == "html":
        from conclave.rag.loaders._html import load_html

        doc = load_html(info, text)
    elif kind == "code":
        doc = load_code(info, text, language or "text")
    elif kind == "csv":
        doc = load_csv(info, text)
    elif kind == "json":
        doc = load_json(info, text)
    else:
        doc = load_text(info, text)
    return Loaded(documents=[doc])


def _gunzip(path: Path, rel: str, max_bytes: int | None) -> bytes:
    """The decompressed bytes of a ``.gz`` file, refusing more than ``max_bytes`` of them."""
    limit = max_bytes if max_bytes is not None else DEFAULT_MAX_BYTES * 4
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(limit + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise LoadError(rel, f"not a valid gzip file ({e})") from e
    if len(data) > limit:
        raise LoadError(rel, f"decompresses to more than {limit / 1e6:.1f} MB")
    return data


def load_path(path: Path, root: Path | None = None) -> list[Document]:
    """Load one file; raise :class:`LoadError` if it (or any JSONL record in it) fails.

    ``root`` is the indexed folder the document ids are relative to (default: the
    file's directory, so the id is the file name).
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    result = load_file(path, root)
    if result.skipped:
        source, reason = result.skipped[0]
        more = len(result.skipped) - 1
        raise LoadError(source, reason + (f" (and {more} more skipped)" if more else ""))
    return result.documents


def iter_files(root: Path) -> Iterator[Path]:
    """Candidate files under ``root`` in a stable order, skipping hidden and tool folders.

    Hidden files and directories, ``.git``, ``node_modules``, virtualenvs and
    caches are not walked; symbolic links to directories are not followed (no loops).
    """
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and d not in SKIP_DIRS
            and not (here / d / "pyvenv.cfg").exists()
        )
        for name in sorted(filenames):
            if not name.startswith("."):
                yield here / name


def iter_folder(
    root: Path, *, max_bytes: int | None = DEFAULT_MAX_BYTES
) -> Iterator[FileResult]:
    """Load the folder file by file (for progress bars and bounded memory)."""
    root = Path(root)
    if not root.is_dir():
        raise LoadError(str(root), "not a directory", hint="pass the folder to index")
    for path in iter_files(root):
        yield load_file(path, root, max_bytes=max_bytes)


def load_folder(
    root: Path,
    *,
    on_error: Literal["skip", "raise"] = "skip",
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    progress: Callable[[FileResult], None] | None = None,
) -> LoadReport:
    """Load every supported file under ``root``.

    With ``on_error="skip"`` (the default) a bad file is recorded in
    ``report.skipped`` and the rest load; with ``"raise"`` the first one raises
    :class:`LoadError`.  ``progress`` is called once per file walked.
    """
    report = LoadReport()
    for result in iter_folder(root, max_bytes=max_bytes):
        if result.skipped and on_error == "raise":
            source, reason = result.skipped[0]
            raise LoadError(source, reason)
        report.files.append(result.rel)
        report.documents.extend(result.documents)
        report.skipped.extend(result.skipped)
        if result.failed:
            report.failed.append(result.rel)
        if result.empty:
            report.empty.append(result.rel)
        if progress is not None:
            progress(result)
    return report
