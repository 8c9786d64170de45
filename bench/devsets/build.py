"""Build the corpora of the retrieval dev sets from real text on this machine.

    python bench/devsets/build.py manpages   # manpages/: corpus, queries and qrels
    python bench/devsets/build.py pydoc      # pydoc-paraphrase/corpus.jsonl only
    python bench/devsets/build.py pycode     # pycode/: corpus, queries and qrels

``manpages``: the queries are the man pages' own NAME lines, so the whole set
(corpus, queries, qrels) is derived here.  ``pydoc``: only the corpus is
derived; its queries and qrels were written by hand and are kept in the
repository (see that folder's README.md).  ``pycode``: the queries are the
first lines of standard-library docstrings, the documents the functions'
source code with the docstring cut out, so the whole set is derived here.
The files in the repository are the dev sets; rerunning this on another
machine (other packages, another Python) gives a different corpus, which is
why the output is committed.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# --- manpages ---------------------------------------------------------------------------

MAN_SECTIONS = ("man1", "man8")
MAN_DOCS = 400
MAN_QUERIES = 60
MAN_SEED = 4
MAX_BODY = 2400


def _render(page: Path) -> str:
    env = {**os.environ, "MANWIDTH": "100", "LC_ALL": "C.UTF-8"}
    env.pop("MAN_KEEP_FORMATTING", None)
    out = subprocess.run(["man", "--nh", "--nj", "-P", "cat", "-l", str(page)],
                         capture_output=True,
                         text=True, env=env, timeout=30, check=False)
    return out.stdout if out.returncode == 0 else ""


def _sections(text: str) -> dict[str, str]:
    """Top-level sections of a rendered page (headings start at column 0)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.upper() == line and len(line) < 40:
            current = line.strip()
            sections.setdefault(current, [])
        elif current is not None:
            sections[current].append(line.strip())
    return {k: re.sub(r"\s+", " ", " ".join(v)).strip() for k, v in sections.items()}


def build_manpages(out: Path) -> None:
    # gcloud's ~16k generated pages would swamp the sample with one template: left out
    pages = sorted(p for s in MAN_SECTIONS for p in (Path("/usr/share/man") / s).glob("*")
                   if p.is_file() and not p.is_symlink() and not p.name.startswith("gcloud"))
    rng = random.Random(MAN_SEED)
    rng.shuffle(pages)
    docs: list[dict[str, str]] = []
    seen_desc: set[str] = set()
    seen_body: set[str] = set()
    for page in pages:
        if len(docs) >= MAN_DOCS:
            break
        secs = _sections(_render(page))
        name, body = secs.get("NAME", ""), secs.get("DESCRIPTION", "")
        m = re.match(r"^(.+?)\s+(?:-|\\-|—)\s+(.+)$", name)
        if not m or len(body) < 300:
            continue
        command, summary = m.group(1).strip(), m.group(2).strip().rstrip(".")
        key = summary.lower()
        if len(summary.split()) < 3 or key in seen_desc or body[:200] in seen_body:
            continue
        seen_desc.add(key)
        seen_body.add(body[:200])
        docs.append({"_id": page.name.removesuffix(".gz"),
                     "title": command, "text": body[:MAX_BODY], "summary": summary})
    rng.shuffle(docs)
    queries = docs[:MAN_QUERIES]
    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    with (out / "corpus.jsonl").open("w") as f:
        for d in sorted(docs, key=lambda d: d["_id"]):
            f.write(json.dumps({"_id": d["_id"], "title": d["title"], "text": d["text"]}) + "\n")
    with (out / "queries.jsonl").open("w") as f:
        for i, d in enumerate(queries):
            f.write(json.dumps({"_id": f"q{i + 1}", "text": d["summary"]}) + "\n")
    with (out / "qrels" / "test.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i, d in enumerate(queries):
            f.write(f"q{i + 1}\t{d['_id']}\t1\n")
    print(f"manpages: {len(docs)} documents, {len(queries)} queries -> {out}")


# --- pydoc ------------------------------------------------------------------------------

PYDOC_MODULES = (
    "os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp",
    "itertools", "functools", "operator", "collections", "heapq", "bisect", "copy",
    "math", "statistics", "random", "secrets", "hashlib", "base64", "binascii", "zlib",
    "json", "csv", "re", "string", "textwrap", "difflib", "unicodedata",
    "datetime", "time", "calendar", "subprocess", "signal", "threading", "queue",
    "urllib.parse", "socket", "uuid", "gzip", "zipfile", "tarfile", "shlex", "struct",
    "contextlib", "inspect", "traceback", "warnings", "locale", "getpass", "platform",
)
PYDOC_MIN_CHARS = 80


def _members(mod: object, modname: str):
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_"):
            continue
        if getattr(obj, "__module__", modname) not in (modname, modname.split(".")[0],
                                                      "posix", "_" + modname):
            continue
        if inspect.isclass(obj):
            yield f"{modname}.{name}", obj
            for mname, meth in sorted(vars(obj).items()):
                if not mname.startswith("_") and callable(meth):
                    yield f"{modname}.{name}.{mname}", meth
        elif callable(obj):
            yield f"{modname}.{name}", obj


def build_pydoc(out: Path) -> None:
    docs: dict[str, dict[str, str]] = {}
    seen: set[str] = set()
    for modname in PYDOC_MODULES:
        mod = importlib.import_module(modname)
        for qual, obj in _members(mod, modname):
            doc = inspect.getdoc(obj) or ""
            doc = doc.strip()
            if len(doc) < PYDOC_MIN_CHARS or doc in seen:
                continue
            seen.add(doc)
            docs[qual] = {"_id": qual, "title": qual, "text": doc[:MAX_BODY]}
    out.mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w") as f:
        for qual in sorted(docs):
            f.write(json.dumps(docs[qual]) + "\n")
    print(f"pydoc: {len(docs)} documents (Python {sys.version.split()[0]}) -> {out}")


# --- pycode -----------------------------------------------------------------------------

#: pure-Python standard-library modules, none of them in PYDOC_MODULES (a held-out set)
PYCODE_MODULES = (
    "argparse", "ast", "cmd", "codeop", "colorsys", "configparser", "dis",
    "email.utils", "email.message", "email.header", "ftplib", "fractions", "getopt",
    "gettext", "html", "http.cookiejar", "http.client", "imaplib", "ipaddress", "logging",
    "mailbox", "mimetypes", "netrc", "optparse", "pickletools", "plistlib", "poplib",
    "pprint", "quopri", "sched", "smtplib", "sysconfig", "tabnanny", "tokenize", "trace",
    "urllib.request", "wave", "webbrowser", "xml.dom.minidom", "zipapp", "pstats",
    "dataclasses", "enum", "typing", "numbers", "selectors", "asyncio.tasks",
    "asyncio.streams", "concurrent.futures._base", "importlib.metadata", "json.decoder",
)
PYCODE_QUERIES = 60
PYCODE_SEED = 7
PYCODE_MIN_SOURCE = 200


def _without_docstring(source: str) -> str | None:
    """The function's source with its docstring lines cut out (None if it has none)."""
    import ast
    import textwrap as tw

    source = tw.dedent(source)
    try:
        node = ast.parse(source).body[0]
    except (SyntaxError, IndexError):
        return None
    body = getattr(node, "body", None)
    if not body or not isinstance(body[0], ast.Expr) or not isinstance(
            getattr(body[0], "value", None), ast.Constant) or not isinstance(
            body[0].value.value, str):
        return None
    lines = source.splitlines()
    first, last = body[0].lineno - 1, body[0].end_lineno
    return "\n".join(lines[:first] + lines[last:]).strip()


def _summary(doc: str) -> str:
    """The docstring's first sentence (its first paragraph, cut at the first full stop)."""
    para = re.sub(r"\s+", " ", doc.strip().split("\n\n")[0]).strip()
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    return (m.group(1) if m else para).strip()


def build_pycode(out: Path) -> None:
    docs: dict[str, dict[str, str]] = {}
    summaries: dict[str, str] = {}
    seen: set[str] = set()
    for modname in PYCODE_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for qual, obj in _members(mod, modname):
            if not (inspect.isfunction(obj) or inspect.ismethod(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            try:
                code = _without_docstring(inspect.getsource(obj))
            except (OSError, TypeError):
                continue
            summary = _summary(doc)
            if (code is None or len(code) < PYCODE_MIN_SOURCE or len(summary.split()) < 4
                    or "deprecated" in summary.lower()
                    or summary.lower() in seen or code in seen):
                continue
            seen.update((summary.lower(), code))
            docs[qual] = {"_id": qual, "title": qual, "text": code[:MAX_BODY]}
            summaries[qual] = summary
    ids = sorted(docs)
    picked = sorted(random.Random(PYCODE_SEED).sample(ids, PYCODE_QUERIES))
    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    with (out / "corpus.jsonl").open("w") as f:
        for qual in ids:
            f.write(json.dumps(docs[qual]) + "\n")
    with (out / "queries.jsonl").open("w") as f, (out / "qrels" / "test.tsv").open("w") as q:
        q.write("query-id\tcorpus-id\tscore\n")
        for n, qual in enumerate(picked, 1):
            f.write(json.dumps({"_id": f"q{n}", "text": summaries[qual]}) + "\n")
            q.write(f"q{n}\t{qual}\t1\n")
    print(f"pycode: {len(ids)} documents, {len(picked)} queries "
          f"(Python {sys.version.split()[0]}) -> {out}")


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("manpages", "all"):
        build_manpages(HERE / "manpages")
    if which in ("pydoc", "all"):
        build_pydoc(HERE / "pydoc-paraphrase")
    if which in ("pycode", "all"):
        build_pycode(HERE / "pycode")
