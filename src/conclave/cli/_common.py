"""Shared CLI plumbing: one-line errors on stderr, JSON output, running coroutines, and the
accounting every command that calls a model opens (so the ledger and budgets see the CLI
exactly as they see the API server)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from conclave.errors import ConclaveError

if TYPE_CHECKING:
    from conclave.accounting import Accounting
    from conclave.config import Settings
    from conclave.gateway import Gateway

T = TypeVar("T")
log = logging.getLogger("conclave.cli")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` on stderr and exit non-zero, without a traceback."""
    err.print(f"[bold red]error:[/] {message}", markup=True)
    raise typer.Exit(code)


def _validation_message(exc: ValidationError) -> str:
    e = exc.errors()[0]
    where = ".".join(str(p) for p in e["loc"])
    msg = str(e["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


class Terminated(Exception):
    """The command was stopped by SIGTERM (after its clean-up ran)."""


def cli_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn project errors into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except ConclaveError as exc:
            fail(str(exc))
        except ValidationError as exc:
            fail(_validation_message(exc))
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except Terminated:
            fail("terminated", code=143)
        raise AssertionError("unreachable")

    return wrapper


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; SIGTERM stops it the way Ctrl-C does.

    Python's default for SIGTERM kills the process on the spot, so a command stopped by a
    supervisor (``timeout``, systemd, ``docker stop``) would lose the ledger records of
    the calls it made and leave their budget reservations held.  Here SIGTERM cancels the
    command instead: the gateway records the cancelled call, the accounting drains, and
    the process exits with 143.  A second SIGTERM during that clean-up is ignored
    (SIGKILL still stops it).
    """

    async def main() -> T:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        stopping = False

        def on_sigterm() -> None:
            nonlocal stopping
            if not stopping and task is not None:
                stopping = True
                task.cancel()

        try:
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        except (NotImplementedError, RuntimeError, ValueError):  # no signals here
            return await coro
        try:
            return await coro
        except asyncio.CancelledError:
            if stopping:
                raise Terminated from None
            raise
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(main())


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@asynccontextmanager
async def cli_accounting(settings: Settings) -> AsyncIterator[Accounting]:
    """The configured accounting (embedded SQLite, or PostgreSQL/Redis), drained on the way out.

    Opening fails with BackendUnavailable naming the backend when a configured one does not
    answer, before any model is called.  Closing drains the ledger, so the records of this
    command are durable (or spilled to disk) before the process exits.  When the command
    itself failed, that error is the one reported; a close failure on top is only logged.
    """
    from conclave.accounting import open_accounting

    acc = await open_accounting(settings)
    try:
        yield acc
    except BaseException:
        try:
            await acc.aclose()
        except Exception as exc:  # the command's own error matters more
            log.warning("closing the accounting after an error failed: %s", exc)
        raise
    await acc.aclose()


@asynccontextmanager
async def gateway_with_accounting(settings: Settings) -> AsyncIterator[Gateway]:
    """A :class:`~conclave.gateway.Gateway` on :func:`cli_accounting`: every call it makes
    is reserved against the budgets and written to the ledger.  The gateway closes first
    (its pending settlements still need the budget store), then the accounting."""
    from conclave.gateway import Gateway

    async with cli_accounting(settings) as acc, Gateway(settings, accounting=acc) as gw:
        yield gw
