"""A team's result on disk: the files in a folder, or a patch against a repository.

The patch is a ``git diff``-style unified diff (``diff --git a/x b/x``, ``---``
and ``+++`` headers, ``/dev/null`` for new files), so ``git apply`` or
``patch -p1`` take it.  The repository itself is never modified.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path

from conclave.agents.artifacts import check_path
from conclave.errors import InvalidRequest


def write_files(files: Mapping[str, str], out_dir: Path) -> list[Path]:
    """Write ``files`` (relative path -> content) under ``out_dir``; return the paths."""
    written = []
    root = out_dir.resolve()
    for rel, content in files.items():
        target = (root / check_path(rel)).resolve()
        if not target.is_relative_to(root):
            raise InvalidRequest(f"{rel!r} would be written outside {out_dir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        written.append(target)
    return written


def make_patch(files: Mapping[str, str], repo: Path) -> str:
    """A unified diff turning ``repo``'s current files into ``files`` (new files included)."""
    root = repo.resolve()
    chunks: list[str] = []
    for rel in sorted(files):
        path = check_path(rel)
        target = (root / path).resolve()
        if not target.is_relative_to(root):
            raise InvalidRequest(f"{rel!r} points outside the repository {repo}")
        new = files[rel]
        old = target.read_text() if target.is_file() else None
        if old == new:
            continue
        old_lines = (old or "").splitlines(keepends=True)
        new_lines = new.splitlines(keepends=True)
        for lines in (old_lines, new_lines):
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n\\ No newline at end of file\n"
        chunks.append(f"diff --git a/{path} b/{path}\n")
        if old is None:
            chunks.append("new file mode 100644\n")
        diff = difflib.unified_diff(old_lines, new_lines,
                                    fromfile="/dev/null" if old is None else f"a/{path}",
                                    tofile=f"b/{path}", n=3)
        chunks.extend(diff)
    return "".join(chunks)
