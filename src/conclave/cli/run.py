"""``conclave run TASK``: the Planner / Coder / Reviewer team on one task.

Writes the chosen files to ``--out`` (default ``./conclave-run-<id>/``), or with
``--repo`` a ``git diff``-style patch against that repository (the repository
is not touched), and prints the plan and the review.  The embedded accounting
is opened, so every step is in the ledger (``conclave spend --by model``) and
``--budget`` is a real run-scope budget the gateway enforces.
"""

from __future__ import annotations

import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any

import typer

from conclave.cli._common import cli_errors, err, gateway_with_accounting, out, print_json, run
from conclave.config import load_settings
from conclave.errors import InvalidRequest


def _budget(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        value = Decimal(text.strip().lstrip("$"))
    except InvalidOperation:
        raise InvalidRequest(f"--budget {text!r} is not an amount in dollars",
                             hint="e.g. --budget 0.50") from None
    if not value.is_finite() or value <= 0:
        raise InvalidRequest(f"--budget must be a positive amount, got {text!r}",
                             hint="e.g. --budget 0.50")
    return value


@cli_errors
def run_command(
    task: Annotated[str, typer.Argument(help="What to build. Use - to read it from stdin, "
                                        "@FILE to read it from a file.")],
    repo: Annotated[Path | None, typer.Option("--repo", help="Write a patch against this "
                                              "repository instead of new files.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to write the files "
                                                 "(default ./conclave-run-<id>/).")] = None,
    max_rounds: Annotated[int, typer.Option("--max-rounds", min=1, max=20,
                                            help="Implement/review rounds at most.")] = 3,
    samples: Annotated[int, typer.Option("--samples", min=1, max=32,
                                         help="Candidates the Coder writes per round.")] = 4,
    budget: Annotated[str | None, typer.Option("--budget", help="Spending limit of this run "
                                               "in USD, e.g. 0.50.")] = None,
    privacy: Annotated[bool, typer.Option("--privacy", help="Local models only; every tier "
                                          "maps to tier 0.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")
                     ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Plan, implement and review TASK with the agent team; write files or a patch."""
    from conclave.agents import Coder, Team, make_patch, new_run_id, write_files

    if task == "-":
        task = sys.stdin.read()
    elif task.startswith("@"):
        path = Path(task[1:])
        if not path.is_file():
            raise InvalidRequest(f"task file {path} does not exist")
        task = path.read_text()
    if not task.strip():
        raise InvalidRequest("the task is empty", hint="describe what to build")
    limit = _budget(budget)
    if repo is not None and not repo.is_dir():
        raise InvalidRequest(f"--repo {repo} is not a directory")
    settings = load_settings()
    run_id = new_run_id()
    target = out_dir or Path.cwd() / f"conclave-run-{run_id.removeprefix('run-')}"

    def progress(suffix: str, payload: Any) -> None:
        if quiet or json_out:
            return
        kind = suffix.rsplit(".", 1)[-1]
        if kind == "step":
            cost = f" ${payload['cost_usd']}" if payload["cost_micros"] else ""
            error = f" [red]{payload['error']}[/]" if payload.get("error") else ""
            err.print(f"[dim]{payload['agent']} step {payload['step']}: {payload['model'] or '-'}"
                      f" {payload['input_tokens']} in / {payload['output_tokens']} out"
                      f"{cost} {payload['duration_ms'] / 1000:.1f}s[/]{error}")
        elif suffix == "team.round":
            err.print(f"round {payload['round']}: {payload['candidates']} candidate(s), chose "
                      f"{payload['chosen']} ({payload['passed']}/{payload['tests']} tests)"
                      + (" - approved" if payload["approved"] else ""))

    async def go() -> Any:
        from conclave.bus import open_bus

        async with gateway_with_accounting(settings) as gw:
            bus = await open_bus(settings)
            try:
                team = Team(gw, bus, max_rounds=max_rounds, privacy=True if privacy else None,
                            coder=Coder(samples=samples,
                                        concurrency=max(1, settings.local.parallel)),
                            on_event=progress)
                return await team.run(task, repo=repo, run_id=run_id, budget_usd=limit)
            finally:
                await bus.aclose()

    result = run(go())
    data = result.to_json()
    patch_path = None
    written: list[Path] = []
    if result.files:
        target.mkdir(parents=True, exist_ok=True)
        if repo is not None:
            patch_path = target / "changes.patch"
            patch_path.write_text(make_patch(result.files, repo))
        else:
            written = write_files(result.files, target)
    data["out_dir"] = str(target) if result.files else None
    data["patch"] = str(patch_path) if patch_path else None
    data["written"] = [str(p) for p in written]
    if json_out:
        print_json(data)
    else:
        _print_human(result, written, patch_path)
    if result.stopped_by in ("budget", "error") and not result.files:
        raise typer.Exit(1)


def _print_human(result: Any, written: list[Path], patch_path: Path | None) -> None:
    if result.plan is not None:
        out.print("[bold]Plan[/]")
        out.print(f"  {result.plan.summary}", markup=False)
        for i, step in enumerate(result.plan.steps, 1):
            out.print(f"  {i}. {step}", markup=False)
        out.print(f"  files: {', '.join(result.plan.files)}", markup=False)
    if result.review is not None:
        out.print("[bold]Review[/]")
        for line in result.review.summary.splitlines():
            out.print(f"  {line}", markup=False)
    status = "approved" if result.approved else f"not approved ({result.stopped_by})"
    out.print(f"[bold]Result[/]: {status} after {result.rounds} round(s): {result.reason}",
              markup=True)
    if patch_path is not None:
        out.print(f"patch: {patch_path}", markup=False)
    for path in written:
        out.print(f"wrote {path}", markup=False)
    if not result.files:
        out.print("no files were produced", markup=False)
    err.print(f"[dim]run {result.run_id} · {result.steps} steps · "
              f"{result.usage.input_tokens} in / {result.usage.output_tokens} out · "
              f"${result.cost_usd} · {result.duration_s:.1f}s[/]")
