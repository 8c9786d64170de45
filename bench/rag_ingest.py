"""RAG ingestion throughput and query latency at 10k and 100k chunks.

    python bench/rag_ingest.py [--sizes 10000,100000] [--scale replicate|unique]
                               [--work DIR] [--json]

Corpus: real text from this machine's ``/usr/share/doc`` (Debian package
documentation: changelogs, READMEs, NEWS, copyright files, Markdown docs),
decompressed, byte-identical files dropped, binary/PostScript/HTML/JSON/log
files left out, in a fixed shuffled order (seed 7) so every size mixes many
packages.  Files are written to ``<work>/corpus`` as ``<package>/<name>.txt``
(``.md`` kept).  Chunk counts are the recursive chunker's (256 MiniLM
tokens, the ``Rag`` default), counted once per file and cached in
``<work>/chunk-counts.json``.

The sizes are cumulative steps on one index: the first size is indexed from
scratch, then the folder grows to the next size and is synced again
(incrementally), so each later step adds ``size - previous size`` chunks to an
index that already holds the previous ones.

* ``--scale unique``: every step brings new, distinct files.  Every chunk is
  embedded: on a 2-core CPU all-MiniLM-L6-v2 embeds about 5-10 chunks of 256
  tokens per second (about 5 GFLOP each), so 100k chunks take hours.
* ``--scale replicate`` (default): the first step is distinct files; later
  steps add copies of them under ``copy-NN/`` folders.  Copies are new
  documents and new chunks (new ids, new Qdrant points, new BM25 rows, their
  own metadata), but their texts are already in the embedding cache, so the
  later steps measure everything except the forward passes (walk, load,
  chunk, cache lookups, upserts, BM25 rebuild, manifest), and query latency
  is measured on the full-size index.

Ingestion is :meth:`conclave.rag.pipeline.Rag.sync` on the folder, end to
end (walk, load, chunk, embed with all-MiniLM-L6-v2 on the CPU, Qdrant
upserts in embedded local mode, BM25 side rebuilt, manifest committed); the
first step starts with an empty embedding cache and ``chunks_embedded`` says
how many forward passes each step really ran.  The model is loaded before the
clock starts (its load time is reported apart).  Per-stage seconds come from
the sync's progress reports (``embed`` includes the Qdrant upserts).

Queries: the 108 questions of the two dev sets, each run once after a
warm-up, top 10, hybrid (dense + BM25, fused) without reranking; BM25-only
and dense-only latencies are shown for context.  Queries bypass the embedding
cache, so every query pays its own forward pass.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

DOC_ROOT = Path("/usr/share/doc")
DEVSETS = ROOT / "bench" / "devsets"
SEED = 7
_SKIP_EXT = {".ps", ".json", ".sym", ".log", ".html", ".htm", ".pdf", ".png", ".svg", ".gif",
             ".jpg", ".css", ".js", ".xml", ".py", ".pl", ".sh", ".c", ".h", ".el", ".dtd",
             ".xsl", ".eps", ".dvi", ".tex", ".cfg", ".conf", ".yaml", ".yml", ".csv",
             ".tsv", ".diff", ".patch", ".ico", ".txz", ".tgz", ".zip", ".deb"}
_MAX_BYTES = 2_000_000


def _text_of(path: Path) -> str | None:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path) as f:
                data = f.read(_MAX_BYTES + 1)
        else:
            data = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if not data.strip() or len(data) > _MAX_BYTES or b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def candidates() -> list[tuple[str, str]]:
    """``(relative output name, text)`` of every usable, distinct document file."""
    seen: set[bytes] = set()
    out: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(DOC_ROOT):
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            if path.is_symlink() or not path.is_file():
                continue
            name = fname[:-3] if fname.endswith(".gz") else fname
            ext = Path(name).suffix.lower()
            if ext in _SKIP_EXT:
                continue
            text = _text_of(path)
            if text is None:
                continue
            digest = hashlib.sha256(text.encode()).digest()
            if digest in seen:
                continue
            seen.add(digest)
            rel = path.relative_to(DOC_ROOT).parent.as_posix().replace("/", "__")
            suffix = ".md" if ext in (".md", ".markdown") else ".txt"
            stem = name[: -len(ext)] if ext in (".md", ".markdown", ".txt") else name
            out.append((f"{rel}/{stem}{suffix}", text))
    random.Random(SEED).shuffle(out)
    return out


def count_chunks(files: list[tuple[str, str]], cache_path: Path, need: int) -> list[int]:
    """Chunks per file (the Rag default chunker), for files until ``need`` is reached."""
    from conclave.rag.chunkers import make_chunker
    from conclave.rag.loaders import load_file

    cache: dict[str, int] = {}
    if cache_path.exists():
        cache = json.loads(cache_path.read_text())
    chunker = make_chunker("recursive")
    tmp = cache_path.parent / ".count"
    tmp.mkdir(exist_ok=True)
    counts: list[int] = []
    total = 0
    for rel, text in files:
        key = hashlib.sha256(f"{rel}\0{text}".encode()).hexdigest()
        if key not in cache:
            p = tmp / Path(rel).name
            p.write_text(text)
            result = load_file(p, tmp)
            cache[key] = sum(len(chunker.chunk(d)) for d in result.documents)
            p.unlink()
        counts.append(cache[key])
        total += cache[key]
        if total >= need:
            break
    cache_path.write_text(json.dumps(cache))
    return counts


def plan(sizes: list[int], work: Path, scale: str = "unique") -> list[list[tuple[str, str]]]:
    """The files of each cumulative step (step i brings the total to about sizes[i])."""
    files = candidates()
    need = max(sizes) if scale == "unique" else min(sizes)
    counts = count_chunks(files, work / "chunk-counts.json", need)
    steps: list[list[tuple[str, str]]] = []
    i = total = 0
    for n, size in enumerate(sizes):
        step = []
        if scale == "replicate" and n > 0:
            base = steps[0]
            base_counts = counts[:len(base)]
            copy = 1
            while total < size:
                copy += 1
                for (rel, text), c in zip(base, base_counts, strict=True):
                    if total >= size:
                        break
                    step.append((f"copy-{copy:02d}/{rel}", text))
                    total += c
            steps.append(step)
            continue
        while i < len(counts) and total < size:
            step.append(files[i])
            total += counts[i]
            i += 1
        steps.append(step)
    if total < max(sizes):
        print(f"note: the corpus holds only {total} chunks (< {max(sizes)})", file=sys.stderr)
    return steps


def write_files(folder: Path, files: list[tuple[str, str]]) -> int:
    size = 0
    for rel, text in files:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        size += len(text.encode())
    return size


def pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stage_seconds(t0: float, last: dict[str, float]) -> dict[str, float]:
    """Stages run one after another: each took from the previous one's last report to its own."""
    out = {}
    prev = t0
    for stage, t in sorted(last.items(), key=lambda kv: kv[1]):
        out[stage] = round(t - prev, 1)
        prev = t
    return out


def queries() -> list[str]:
    out = []
    for name in ("manpages", "pydoc-paraphrase"):
        for line in (DEVSETS / name / "queries.jsonl").read_text().splitlines():
            out.append(json.loads(line)["text"])
    return out


async def measure_queries(rag: Any, qs: list[str], mode: str) -> dict[str, float]:
    cached = rag.index.embedder
    rag.index.embedder = getattr(cached, "inner", cached)  # every query embeds for real
    try:
        for q in qs[:5]:
            await rag.search(q, k=10, mode=mode)
        times = []
        for q in qs:
            t0 = time.perf_counter()
            await rag.search(q, k=10, mode=mode)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        rag.index.embedder = cached
    return {"p50_ms": round(pct(times, 0.5), 1), "p95_ms": round(pct(times, 0.95), 1),
            "mean_ms": round(statistics.fmean(times), 1), "n": len(times)}


async def run(sizes: list[int], work: Path, modes: list[str], scale: str) -> dict[str, Any]:
    import torch

    from conclave.config import RagSettings, load_settings
    from conclave.rag.pipeline import Rag

    torch.set_num_threads(os.cpu_count() or 1)
    steps = plan(sizes, work, scale)
    corpus = work / "corpus"
    data = work / "data"
    for d in (corpus, data):
        if d.exists():
            shutil.rmtree(d)
    corpus.mkdir(parents=True)
    settings = load_settings(data_dir=data, rag=RagSettings(embedding_cache=True))
    rag = await Rag.open(settings, folder=corpus)
    t0 = time.perf_counter()
    await rag.index.embedder.embed(["warm up the model"])
    model_load = time.perf_counter() - t0
    qs = queries()
    results: dict[str, Any] = {
        "corpus": "/usr/share/doc text files (see module docstring)", "scale": scale,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "model_load_s": round(model_load, 2),
        "load_average_start": os.getloadavg(), "steps": []}
    try:
        for size, files in zip(sizes, steps, strict=True):
            nbytes = write_files(corpus, files)
            last: dict[str, float] = {}

            def progress(stage: str, done: int, total: int,
                         last: dict[str, float] = last) -> None:
                last[stage] = time.perf_counter()

            load_before = os.getloadavg()[0]
            t0 = time.perf_counter()
            report = await rag.sync(progress)
            seconds = time.perf_counter() - t0
            step: dict[str, Any] = {
                "target_chunks": size, "files_added": len(files),
                "mbytes_added": round(nbytes / 1e6, 1), "chunks_added": report.chunks_added,
                "chunks_embedded": report.chunks_embedded, "chunks_total": report.chunks,
                "seconds": round(seconds, 1),
                "chunks_per_s": round(report.chunks_added / seconds, 1),
                "stage_seconds": stage_seconds(t0, last),
                "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "query": {}}
            print(f"[{size}] {report.chunks_added} chunks in {seconds:.1f} s "
                  f"({step['chunks_per_s']} chunks/s)", file=sys.stderr)
            for mode in modes:
                step["query"][mode] = await measure_queries(rag, qs, mode)
                print(f"[{size}] {mode}: {step['query'][mode]}", file=sys.stderr)
            results["steps"].append(step)
    finally:
        await rag.aclose()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000",
                    help="cumulative chunk counts to measure at")
    ap.add_argument("--work", type=Path, default=Path("/tmp/conclave-rag-ingest"))
    ap.add_argument("--modes", default="hybrid,bm25,dense")
    ap.add_argument("--scale", choices=("replicate", "unique"), default="replicate",
                    help="later steps: copies of the first step's files, or new files")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and index")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(sizes, args.work, args.modes.split(","), args.scale))
    if not args.keep:
        for d in ("corpus", "data"):
            shutil.rmtree(args.work / d, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"scale: {results['scale']}; model load {results['model_load_s']} s, "
          f"{results['cpus']} CPUs, "
          f"torch threads {results['torch_threads']}")
    print(f"{'chunks':>8} {'added':>7} {'embedded':>8} {'MB':>6} {'seconds':>8} {'chunks/s':>9}  "
          + "  ".join(f"{m + ' p50/p95 ms':>22}" for m in args.modes.split(",")))
    for s in results["steps"]:
        lat = "  ".join(f"{s['query'][m]['p50_ms']:>10.1f} / {s['query'][m]['p95_ms']:>8.1f}"
                        for m in args.modes.split(","))
        print(f"{s['chunks_total']:>8} {s['chunks_added']:>7} {s['chunks_embedded']:>8} "
              f"{s['mbytes_added']:>6} "
              f"{s['seconds']:>8} {s['chunks_per_s']:>9}  {lat}")
        print(f"{'':>8} stages: {s['stage_seconds']}  load avg {s['load_average_1m']}")


if __name__ == "__main__":
    main()
