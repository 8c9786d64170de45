"""Shared CLI plumbing: one-line errors on stderr, JSON output, running coroutines."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from conclave.errors import ConclaveError

T = TypeVar("T")

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
        raise AssertionError("unreachable")

    return wrapper


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()
