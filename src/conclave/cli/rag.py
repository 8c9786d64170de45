"""``conclave index``, ``search``, ``ask`` and ``eval retrieval``: thin wrappers over
:class:`conclave.rag.pipeline.Rag` and :mod:`conclave.rag.eval`.

Each docs folder has its own index under the data directory (keyed by a hash
of its absolute path), kept in step with the folder incrementally: only
changed files are re-embedded, removed files leave the index.  Progress goes to
stderr as a rich progress bar when stderr is a terminal; results go to stdout,
as one JSON object with ``--json``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from conclave.cli._common import cli_accounting, cli_errors, err, out, print_json, run
from conclave.config import Settings, load_settings
from conclave.errors import InvalidRequest
from conclave.rag.pipeline import FILTER_HELP, FolderReport, parse_filters

T = TypeVar("T")

eval_app = typer.Typer(help="Measure quality: retrieval on a BEIR-format dataset.",
                       no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
FilterOpt = Annotated[list[str] | None, typer.Option("--filter", "-f", help=FILTER_HELP,
                                                     metavar="KEY=VALUE")]
MODES = ("hybrid", "dense", "bm25")
_STAGE_LABELS = {"load": "Loading files", "chunk": "Chunking", "embed": "Embedding",
                 "keyword": "Keyword index", "delete": "Removing stale chunks"}


@contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback drawing bars on stderr (a TTY only)."""
    if not err.is_terminal:
        yield lambda stage, done, total: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    bars = Progress(SpinnerColumn(), TextColumn("{task.description:<22}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            base = stage.split(":", 1)[-1]
            label = _STAGE_LABELS.get(base, stage)
            tasks[stage] = bars.add_task(label, total=total or None)
        bars.update(tasks[stage], completed=done, total=total or None)

    with bars:
        yield update


def _quiet_model_loading() -> None:
    # transformers draws a tqdm bar on stderr while it loads weights; the CLI has its own.
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _settings(privacy: bool = False) -> Settings:
    return load_settings(privacy_mode=True) if privacy else load_settings()


def _with_rag(folder: Path | None, fn: Callable[[Any], Awaitable[T]], *,
              settings: Settings | None = None) -> T:
    """Run ``fn(rag)`` on the folder's index, with the configured accounting open: answers,
    rewrites, an LLM reranker and a remote embedder all go to the ledger and budgets."""
    _quiet_model_loading()
    config = settings or load_settings()

    async def go() -> T:
        from conclave.rag.pipeline import Rag

        async with cli_accounting(config) as acc:
            rag = await Rag.open(config, folder=folder, accounting=acc)
            try:
                return await fn(rag)
            finally:
                await rag.aclose()

    return run(go())


def _report_line(r: FolderReport) -> str:
    parts = [f"added {r.added}", f"updated {r.updated}", f"deleted {r.deleted}",
             f"unchanged {r.unchanged}"]
    if r.kept:
        parts.append(f"kept {r.kept} (file failed to load)")
    return (f"{', '.join(parts)} · {r.chunks} chunks (+{r.chunks_added} "
            f"-{r.chunks_deleted}, {r.chunks_embedded} embedded) · {r.seconds:.1f} s")


def _print_skipped(r: FolderReport, *, to_err: bool = False) -> None:
    console = err if to_err else out
    if r.skipped:
        console.print(f"[yellow]skipped {len(r.skipped)}:[/]")
        for s in r.skipped:
            console.print(f"  {s.source}: {s.reason}", markup=False)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InvalidRequest(f"unknown search mode {mode!r}",
                             hint=f"use --mode {', '.join(MODES)}")


def _hit_json(rank: int, hit: Any) -> dict[str, Any]:
    c = hit.chunk
    return {
        "rank": rank, "source": c.metadata.source,
        "heading": " > ".join(c.heading_path) or c.metadata.title, "page": c.page,
        "score": hit.score, "chunk_id": c.id, "start": c.start, "end": c.end,
        "content_type": c.metadata.content_type, "text": c.text, "signals": hit.signals,
    }


# -- index -------------------------------------------------------------------------------


@cli_errors
def index(
    folder: Annotated[Path, typer.Argument(help="The folder of documents to index.")],
    json_out: JsonOpt = False,
) -> None:
    """Index a folder incrementally: only new and changed files are embedded."""
    with progress_bar() as tell:
        report = _with_rag(folder, lambda rag: rag.sync(tell))
    if json_out:
        print_json(report.model_dump(mode="json"))
        return
    out.print(f"[bold]{report.folder}[/] ({report.files} files)")
    out.print(_report_line(report))
    _print_skipped(report)


# -- search ------------------------------------------------------------------------------


@cli_errors
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    docs: Annotated[Path | None, typer.Option(
        "--docs", "-d", help="Docs folder (synced first). Default: the folder indexed last, "
        "as it is.")] = None,
    filters: FilterOpt = None,
    k: Annotated[int, typer.Option("-k", "--top", help="How many passages.")] = 10,
    mode: Annotated[str, typer.Option("--mode", help="hybrid, dense or bm25.")] = "hybrid",
    rerank: Annotated[bool, typer.Option("--rerank", help="Rerank the fused head "
                                         "(settings.rag.reranker).")] = False,
    no_sync: Annotated[bool, typer.Option("--no-sync", help="Search the index as it is, "
                                          "without syncing --docs first.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Search a docs folder's index: the best passages with source, heading and page."""
    from conclave.rag.pipeline import last_folder

    flt = parse_filters(filters)
    _check_mode(mode)
    if k < 1:
        raise InvalidRequest(f"-k must be at least 1, got {k}")
    settings = _settings()
    sync = docs is not None and not no_sync
    if docs is None:
        docs = last_folder(settings)
        if docs is None:
            raise InvalidRequest("no folder has been indexed yet",
                                 hint="run `conclave index DIR` or pass --docs DIR")
        if not json_out:
            err.print(f"[dim]searching the index of {docs}[/]")

    async def go(rag: Any) -> tuple[FolderReport | None, list[Any]]:
        report = None
        if sync:
            with progress_bar() as tell:
                report = await rag.sync(tell)
        hits = await rag.search(query, k=k, filter=flt, mode=mode, rerank=rerank)
        return report, hits

    report, hits = _with_rag(docs, go, settings=settings)
    if json_out:
        print_json({"query": query, "folder": str(Path(docs).resolve()), "mode": mode,
                    "rerank": rerank, "filter": flt.model_dump(mode="json", exclude_defaults=True)
                    if flt else None,
                    "indexed": report.model_dump(mode="json") if report else None,
                    "hits": [_hit_json(i, h) for i, h in enumerate(hits, 1)]})
        return
    if report is not None and (report.added or report.updated or report.deleted):
        err.print(f"[dim]{_report_line(report)}[/]")
    if not hits:
        out.print("No passage matches the query" + (" and the filter." if flt else "."))
        return
    for i, h in enumerate(hits, 1):
        c = h.chunk
        head = " > ".join(c.heading_path) or c.metadata.title or ""
        page = f", p. {c.page}" if c.page else ""
        out.print(f"[bold]{i:>2}.[/] {h.score:.4f}  [cyan]{c.metadata.source}[/]"
                  + (f" · {head}" if head else "") + page, markup=True, highlight=False)
        snippet = " ".join(c.text.split())
        out.print(f"     [dim]{snippet[:200]}{'…' if len(snippet) > 200 else ''}[/]")


# -- ask ---------------------------------------------------------------------------------


@cli_errors
def ask(
    question: Annotated[str, typer.Argument(help="The question. Use - to read it from stdin.")],
    docs: Annotated[Path, typer.Option("--docs", "-d", help="Folder of documents to answer "
                                       "from (indexed incrementally first).")],
    filters: FilterOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Catalog model name.")
                     ] = None,
    tier: Annotated[int | None, typer.Option("--tier", "-t", help="0 local (default), 1 cheap, "
                                             "2 mid, 3 premium.")] = None,
    privacy: Annotated[bool, typer.Option("--privacy", help="Local models and embeddings "
                                          "only; nothing leaves this machine.")] = False,
    k: Annotated[int, typer.Option("-k", "--top", help="Passages given to the model.")] = 5,
    mode: Annotated[str, typer.Option("--mode", help="hybrid, dense or bm25.")] = "hybrid",
    rerank: Annotated[bool, typer.Option("--rerank/--no-rerank", help="Rerank the fused "
                                         "passages before answering.")] = True,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Answer token cap.")] = 256,
    json_out: JsonOpt = False,
) -> None:
    """Answer a question from a folder of documents, with numbered citations."""
    import sys

    if question == "-":
        question = sys.stdin.read()
    if not question.strip():
        raise InvalidRequest("the question is empty", hint="pass the question as an argument")
    if model and tier is not None:
        raise InvalidRequest("give --model or --tier, not both")
    if k < 1:
        raise InvalidRequest(f"-k must be at least 1, got {k}")
    flt = parse_filters(filters)
    _check_mode(mode)
    settings = _settings(privacy)

    async def go(rag: Any) -> tuple[FolderReport, Any]:
        with progress_bar() as tell:
            report = await rag.sync(tell)
        result, _ = await rag.ask(question, k=k, filter=flt, mode=mode, rerank=rerank,
                                  model=model, tier=tier, privacy=True if privacy else None,
                                  max_tokens=max_tokens)
        return report, result

    report, result = _with_rag(docs, go, settings=settings)
    if json_out:
        print_json(result.model_dump(mode="json") | {
            "question": question, "indexed": report.model_dump(mode="json")})
        return
    if report.added or report.updated or report.deleted:
        err.print(f"[dim]{_report_line(report)}[/]")
        _print_skipped(report, to_err=True)
    out.print(result.answer, markup=False)
    if result.citations:
        label = "Sources" if result.citations[0].cited else "Sources given (none cited)"
        out.print(f"\n[bold]{label}:[/]")
        for c in result.citations:
            where = c.source + (f" · {c.heading}" if c.heading else "")
            where += f", p. {c.page}" if c.page else ""
            out.print(f"  [{c.n}] {where}  [dim](score {c.score:.3f})[/]", highlight=False)
    if result.model:
        note = f" · {result.routing_note}" if result.routing_note else ""
        est = " (estimated)" if result.usage.estimated else ""
        err.print(f"[dim]{result.model} (tier {result.tier}) · {result.usage.input_tokens} in / "
                  f"{result.usage.output_tokens} out{est} · ${result.cost_usd:.6f} · "
                  f"{result.latency_ms:.0f} ms{note}[/]")


# -- eval --------------------------------------------------------------------------------


@eval_app.command("retrieval")
@cli_errors
def eval_retrieval(
    dataset: Annotated[Path, typer.Option("--dataset", help="BEIR folder: corpus.jsonl, "
                                          "queries.jsonl, qrels/test.tsv.")],
    k: Annotated[int, typer.Option("--k", help="Cut-off for nDCG, Recall and MRR.")] = 10,
    stages: Annotated[str | None, typer.Option(
        "--stages", help="Comma-separated subset of bm25, dense, hybrid, hybrid+rerank, "
        "hybrid+multiquery (default: all; multiquery calls the tier-1 model per query).")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="qrels file to use.")] = "test",
    fresh: Annotated[bool, typer.Option("--fresh", help="Rebuild the dataset's index "
                                        "(embeddings stay cached).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """nDCG, Recall and MRR at k for each retrieval stage on a BEIR-format dataset."""
    from conclave.rag.eval import STAGES, check_stages, load_beir, run_eval

    chosen = tuple(s.strip() for s in stages.split(",") if s.strip()) if stages else STAGES
    check_stages(chosen, k)
    data = load_beir(dataset, split=split)
    if data.missing_docs and not json_out:
        err.print(f"[yellow]{len(data.missing_docs)} judged document(s) are not in the "
                  f"corpus[/]")
    settings = load_settings()
    _quiet_model_loading()

    async def go(tell: Callable[[str, int, int], None]) -> dict[str, dict[str, float]]:
        async with cli_accounting(settings) as acc:
            return await run_eval(settings, data, stages=chosen, k=k, fresh=fresh,
                                  progress=tell, accounting=acc)

    with progress_bar() as tell:
        results = run(go(tell))
    if json_out:
        print_json(results)
        return
    from rich.table import Table

    table = Table(title=f"{data.folder.name}: {len(data.documents)} documents, "
                  f"{len(data.queries)} queries")
    relative = all("vs_best_side" in r for r in results.values())
    columns = ["stage", f"nDCG@{k}", *(["vs best side"] if relative else []),
               f"Recall@{k}", f"MRR@{k}", "seconds"]
    for col in columns:
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, r in results.items():
        ratio = [f"{r['vs_best_side']:.3f}x"] if relative else []
        table.add_row(stage, f"{r[f'ndcg@{k}']:.4f}", *ratio, f"{r[f'recall@{k}']:.4f}",
                      f"{r[f'mrr@{k}']:.4f}", f"{r['seconds']:.1f}")
    out.print(table)


__all__ = ["ask", "eval_app", "eval_retrieval", "index", "progress_bar", "search"]
