"""Shared fixtures: the real llama.cpp server with the real Gemma 3 270M model.

Tests that need it take the ``llama_server`` fixture and are marked
``@pytest.mark.llama``.  The server is started once per test session by
:class:`conclave.llm.local.LocalRuntime` in an isolated data directory (its
own state file, log and model copy) while the build cache is the shared one,
so ``conclave local build`` runs once per machine, not per test run.

When llama tests are selected and ``llama-server`` is not built yet (a fresh
CI machine), it is built before the first test runs, in a collection hook
where the per-test timeout does not apply; set ``CONCLAVE_LOCAL__SERVER_BINARY``
to use a binary you already have.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import pytest_asyncio

from conclave.config import Settings, load_settings
from conclave.errors import LocalRuntimeError
from conclave.llm.local import LocalRuntime
from conclave.llm.local_build import BuildEvent, build_server, server_binary


class LlamaServer(NamedTuple):
    """What ``llama_server`` yields: unpack as ``base_url, settings`` or use the names."""

    #: OpenAI-compatible base URL, ``http://127.0.0.1:PORT/v1``
    base_url: str
    settings: Settings


def llama_settings(data_dir: Path, **local: Any) -> Settings:
    """Settings for a managed server in ``data_dir``, with the machine's build cache.

    Endpoint and model path are pinned so a user's config cannot turn the tests
    into tests of some other server; ``server_binary`` from the environment is kept.
    """
    pinned: dict[str, Any] = {"endpoint": None, "model_path": None, "port": 0,
                              "parallel": 2, "ctx_size": 4096}
    pinned.update(local)
    return load_settings(data_dir=data_dir, local=pinned)


def pytest_collection_finish(session: pytest.Session) -> None:
    if not any(item.get_closest_marker("llama") for item in session.items):
        return
    settings = load_settings()
    try:
        server_binary(settings)
        return
    except LocalRuntimeError as exc:
        if settings.local.server_binary is not None:
            # a configured binary that is missing: say so, do not build around it
            pytest.exit(f"llama tests cannot run: {exc}", returncode=1)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def say(event: BuildEvent) -> None:
        if event.step == "compile" and event.percent not in (0, 100) and (
            event.percent is None or event.percent % 10
        ):
            return
        line = f"[llama-server build] {event.step}: {event.message}"
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line, file=sys.stderr)

    say(BuildEvent(step="start", message="llama-server is not built; building it once "
                   "for this machine (15-20 minutes on 2 cores)"))
    try:
        asyncio.run(build_server(settings, progress=say))
    except LocalRuntimeError as exc:
        pytest.exit(f"llama tests cannot run: {exc}", returncode=1)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def llama_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LlamaServer]:
    settings = llama_settings(tmp_path_factory.mktemp("llama-data"))
    runtime = LocalRuntime(settings)
    url = await runtime.ensure_running()
    try:
        yield LlamaServer(base_url=url, settings=settings)
    finally:
        await runtime.stop()
