"""Document loaders: files of many formats to :class:`~conclave.rag.types.Document`.

``load_folder(root)`` walks a folder and returns a :class:`LoadReport` (documents,
files walked, and ``(path, reason)`` for every file or record skipped);
``iter_folder`` does the same file by file; ``load_path(path, root)`` loads one
file and raises :class:`LoadError` on failure.  Document ids are paths relative
to the folder (``path#n`` for JSONL records), so they are stable across runs.
"""

from conclave.rag.loaders._base import LoadError
from conclave.rag.loaders._data import pretty_json
from conclave.rag.loaders._folder import (
    DEFAULT_MAX_BYTES,
    SKIP_DIRS,
    FileResult,
    LoadReport,
    detect,
    iter_files,
    iter_folder,
    load_file,
    load_folder,
    load_path,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SKIP_DIRS",
    "FileResult",
    "LoadError",
    "LoadReport",
    "detect",
    "iter_files",
    "iter_folder",
    "load_file",
    "load_folder",
    "load_path",
    "pretty_json",
]
