"""``conclave local``: build, start, stop and inspect the tier-0 llama.cpp server.

Thin by design: each command calls :mod:`conclave.llm.local_build` or
:class:`conclave.llm.local.LocalRuntime` and prints the result.  Results go
to stdout (``--json`` for one JSON document); progress and errors go to
stderr, errors as one line with a non-zero exit and never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from conclave.config import Settings, load_settings
from conclave.errors import ConclaveError
from conclave.llm.local import LocalRuntime, LocalStatus
from conclave.llm.local_build import BuildEvent, build_server

local_app = typer.Typer(
    name="local",
    help="The tier-0 local model: a llama.cpp server Conclave builds and manages.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")
JsonOpt = typer.Option(False, "--json", help="print one JSON document on stdout")


def _fail(message: str, code: int = 1, *, hint: str | None = None) -> NoReturn:
    """Print the error as one ``error:`` line (the last on stderr) and exit non-zero.

    Details after the message's first line (a build log tail) are printed
    before it, indented, so the error itself stays one line.
    """
    first, *details = message.splitlines() or [""]
    for line in details:
        typer.echo(f"  | {line}", err=True)
    typer.echo(f"error: {first}" + (f" ({hint})" if hint else ""), err=True)
    raise typer.Exit(code)


def _run(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(factory())
    except ConclaveError as exc:
        _fail(exc.message, hint=exc.hint)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # the CLI boundary: a message, never a traceback
        _fail(f"unexpected {type(exc).__name__}: {exc}")


def _settings() -> Settings:
    try:
        return load_settings()
    except ConclaveError as exc:
        _fail(exc.message, hint=exc.hint)


def _print_json(model: BaseModel | dict[str, Any]) -> None:
    data = model.model_dump(mode="json") if isinstance(model, BaseModel) else model
    typer.echo(json.dumps(data, indent=2))


# --- build ----------------------------------------------------------------------------


class _PlainProgress:
    """A line per step, and compile progress every 10%: for logs, CI and --json."""

    def __init__(self) -> None:
        self._last = -10

    def __call__(self, event: BuildEvent) -> None:
        if event.percent is not None and event.step == "compile" and event.percent > 0:
            if event.percent >= self._last + 10 or event.percent == 100:
                self._last = event.percent
                typer.echo(f"[build] compile {event.percent:3d}%", err=True)
            return
        typer.echo(f"[build] {event.step}: {event.message}", err=True)


class _RichProgress:
    """A progress bar driven by CMake's ``[ NN%]`` lines."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task = progress.add_task("preparing", total=100)
        self._compiling = False

    def __call__(self, event: BuildEvent) -> None:
        if event.step == "compile":
            if not self._compiling:
                self._compiling = True
                self._progress.console.print(f"[bold]compile[/]: {event.message}")
            self._progress.update(self._task, description="compiling",
                                  completed=event.percent or 0)
            return
        self._progress.console.print(f"[bold]{event.step}[/]: {event.message}")
        done = 100 if event.step == "done" else None
        self._progress.update(self._task, description=event.step, completed=done)


@local_app.command()
def build(
    force: bool = typer.Option(False, "--force", help="rebuild even if a working binary exists"),
    jobs: int | None = typer.Option(None, "--jobs", "-j", help="parallel compile jobs"),
    as_json: bool = JsonOpt,
) -> None:
    """Build llama-server from the llama.cpp source vendored in llama-cpp-python's sdist."""
    settings = _settings()
    if as_json or not sys.stderr.isatty():
        result = _run(lambda: build_server(settings, force=force, jobs=jobs,
                                           progress=_PlainProgress()))
    else:
        columns = (SpinnerColumn(), TextColumn("{task.description:<12}"), BarColumn(),
                   TaskProgressColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
            reporter = _RichProgress(bar)
            result = _run(lambda: build_server(settings, force=force, jobs=jobs,
                                               progress=reporter))
    if as_json:
        _print_json(result)
    elif result.built:
        typer.echo(f"built {result.binary} in {result.seconds:.0f}s ({result.version})")
    else:
        typer.echo(f"already built: {result.binary} ({result.version})")


# --- start / stop / status ------------------------------------------------------------


def _describe(status: LocalStatus) -> str:
    if not status.running:
        where = f" at {status.url}" if status.url else ""
        why = "" if status.health == "not running" else f" ({status.health})"
        return f"not running{where}{why}"
    kind = "managed" if status.managed else "external"
    lines = [f"running ({kind}), health: {status.health}", f"url:     {status.url}"]
    if status.managed:
        lines += [
            f"pid:     {status.pid}",
            f"model:   {status.model}",
            f"binary:  {status.binary}",
            f"uptime:  {status.uptime_seconds:.0f}s" if status.uptime_seconds is not None
            else "uptime:  ?",
            f"log:     {status.log_path}",
        ]
    return "\n".join(lines)


@local_app.command()
def start(as_json: bool = JsonOpt) -> None:
    """Start the managed llama-server (or reuse the running one) and print its URL."""
    runtime = LocalRuntime(_settings())

    async def go() -> LocalStatus:
        await runtime.ensure_running()
        return await runtime.status()

    status = _run(go)
    if as_json:
        _print_json(status)
    else:
        typer.echo(status.url)


@local_app.command()
def stop(as_json: bool = JsonOpt) -> None:
    """Stop the managed llama-server."""
    runtime = LocalRuntime(_settings())
    stopped = _run(runtime.stop)
    if as_json:
        _print_json({"stopped": stopped})
    else:
        typer.echo("stopped" if stopped else "not running")


@local_app.command()
def status(as_json: bool = JsonOpt) -> None:
    """Show whether the tier-0 server runs, where, and whether it is healthy."""
    runtime = LocalRuntime(_settings())
    result = _run(runtime.status)
    if as_json:
        _print_json(result)
    else:
        typer.echo(_describe(result))


if __name__ == "__main__":
    local_app()
