"""The tier-0 runtime against the real llama-server and the real Gemma 3 270M model.

No mocks: servers are real processes, pids are real pids, HTTP goes over
loopback.  The session's shared server (``llama_server``) is never stopped
here; the lifecycle test starts and stops a second one of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from conclave.cli.local import local_app
from conclave.config import Settings
from conclave.errors import LocalRuntimeError
from conclave.llm.local import MODEL_ALIAS, MODEL_FILE, LocalRuntime, ServerState
from conclave.llm.local_build import (
    build_server,
    cpu_fingerprint,
    default_binary,
    parse_percent,
)
from conclave.llm.prompts import BASE_STOPS
from tests.conftest import LlamaServer, llama_settings


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_state(settings: Settings, pid: int, port: int = 9, binary: str = "llama-server") -> Path:
    path = settings.data_dir / "run" / "llama-server.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = ServerState(
        pid=pid, host="127.0.0.1", port=port, model="m.gguf", binary=binary,
        log_path=str(settings.data_dir / "logs" / "llama-server.log"),
        started_at=datetime.now(UTC),
    )
    path.write_text(state.model_dump_json())
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return stat_line.rsplit(")", 1)[-1].split()[0] != "Z"


async def _complete(base_url: str, prompt: str, **extra: object) -> dict:
    async with httpx.AsyncClient(timeout=120) as client:
        resp = await client.post(f"{base_url}/completions", json={
            "model": MODEL_ALIAS, "prompt": prompt, "max_tokens": 24, "temperature": 0,
            "stop": BASE_STOPS, **extra,
        })
    assert resp.status_code == 200, resp.text
    return resp.json()


# --- the shared server ------------------------------------------------------------------


@pytest.mark.llama
async def test_shared_server_is_healthy_and_answers(llama_server: LlamaServer) -> None:
    status = await LocalRuntime(llama_server.settings).status()
    assert status.running and status.healthy and status.managed
    assert status.url == llama_server.base_url
    assert status.pid is not None and _pid_alive(status.pid)
    assert status.model == str(llama_server.settings.data_dir / "models" / MODEL_FILE)
    assert status.log_path == str(llama_server.settings.data_dir / "logs" / "llama-server.log")

    body = await _complete(llama_server.base_url,
                           "Question: What is the capital of France?\nAnswer:")
    choice = body["choices"][0]
    assert "Paris" in choice["text"]
    assert choice["finish_reason"] == "stop"
    assert body["model"] == MODEL_ALIAS
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0


@pytest.mark.llama
async def test_json_schema_constrains_the_output(llama_server: LlamaServer) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
    }
    body = await _complete(
        llama_server.base_url,
        "Question: What is the capital of France? Reply in JSON.\nAnswer:",
        json_schema=schema, stop=[], max_tokens=60,
    )
    data = json.loads(body["choices"][0]["text"])
    assert set(data) == {"city", "country"}
    assert all(isinstance(v, str) for v in data.values())


@pytest.mark.llama
async def test_anthropic_messages_endpoint_is_served(llama_server: LlamaServer) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        resp = await client.post(f"{llama_server.base_url}/messages", json={
            "model": MODEL_ALIAS, "max_tokens": 8,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        })
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["content"][0]["type"] == "text"
    assert body["usage"]["input_tokens"] > 0
    assert body["stop_reason"] in {"end_turn", "max_tokens", "stop_sequence"}


# --- lifecycle of a server of our own -----------------------------------------------------


@pytest.mark.llama
async def test_start_reuse_complete_stop(llama_server: LlamaServer, tmp_path: Path) -> None:
    model = llama_server.settings.data_dir / "models" / MODEL_FILE
    settings = llama_settings(tmp_path, model_path=model, parallel=1, ctx_size=1024)
    state_path = _write_state(settings, _dead_pid())

    # Two runtimes racing to start: the file lock leaves one server, the stale file is replaced.
    first, second = LocalRuntime(settings), LocalRuntime(settings)
    url_a, url_b = await asyncio.gather(first.ensure_running(), second.ensure_running())
    assert url_a == url_b and url_a.startswith("http://127.0.0.1:") and url_a.endswith("/v1")
    assert url_a != llama_server.base_url
    pid = json.loads(state_path.read_text())["pid"]
    assert _pid_alive(pid)

    status = await first.status()
    assert status.running and status.healthy and status.pid == pid
    assert status.uptime_seconds is not None and status.uptime_seconds >= 0

    # Reuse: a later call (any process) finds the same server.
    assert await LocalRuntime(settings).ensure_running() == url_a
    assert (await first.status()).pid == pid

    body = await _complete(url_a, "Question: What is the capital of France?\nAnswer:")
    assert body["choices"][0]["text"].strip()

    # Configured for another model: the running server is not silently reused.
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    with pytest.raises(LocalRuntimeError, match="conclave local stop"):
        await LocalRuntime(settings.model_copy(update={
            "local": settings.local.model_copy(update={"model_path": other})
        })).ensure_running()
    assert _pid_alive(pid)

    # Stopped by another instance: `first` must not hand out the dead URL it verified.
    assert await LocalRuntime(settings).stop() is True
    assert not _pid_alive(pid)
    assert not state_path.exists()
    with pytest.raises(httpx.ConnectError):
        await _complete(url_a, "Question: hello?\nAnswer:")
    url_c = await first.ensure_running()
    new_pid = json.loads(state_path.read_text())["pid"]
    assert new_pid != pid and _pid_alive(new_pid)
    assert (await first.status()).healthy

    assert await first.stop() is True
    assert not _pid_alive(new_pid)
    after = await first.status()
    assert not after.running and not after.healthy and after.pid is None
    assert await first.stop() is False
    with pytest.raises(httpx.ConnectError):
        await _complete(url_c, "Question: hello?\nAnswer:")


# --- state files that lie -----------------------------------------------------------------


async def test_stale_state_file_is_cleaned_up(tmp_path: Path) -> None:
    settings = llama_settings(tmp_path)
    path = _write_state(settings, _dead_pid())
    status = await LocalRuntime(settings).status()
    assert not status.running and status.health == "not running"
    assert not path.exists()


async def test_recycled_pid_is_never_signalled(tmp_path: Path) -> None:
    # The state names a live pid that is not a llama-server (this test process).
    settings = llama_settings(tmp_path)
    path = _write_state(settings, os.getpid())
    runtime = LocalRuntime(settings)
    assert not (await runtime.status()).running
    assert not path.exists()
    _write_state(settings, os.getpid())
    assert await runtime.stop() is False  # and we are still here to assert it
    assert not path.exists()


async def test_corrupt_state_file_is_discarded(tmp_path: Path) -> None:
    settings = llama_settings(tmp_path)
    path = settings.data_dir / "run" / "llama-server.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert not (await LocalRuntime(settings).status()).running
    assert not path.exists()


# --- errors that tell the user what to do ----------------------------------------------


async def test_missing_default_binary_says_to_build(tmp_path: Path) -> None:
    settings = llama_settings(tmp_path / "data", server_binary=None)
    settings = settings.model_copy(update={"cache_dir": tmp_path / "empty-cache"})
    with pytest.raises(LocalRuntimeError) as err:
        await LocalRuntime(settings).ensure_running()
    assert "conclave local build" in str(err.value)
    assert str(default_binary(settings)) in str(err.value)


async def test_missing_configured_binary_names_the_setting(tmp_path: Path) -> None:
    settings = llama_settings(tmp_path, server_binary=tmp_path / "no-such-llama-server")
    with pytest.raises(LocalRuntimeError) as err:
        await LocalRuntime(settings).ensure_running()
    assert "local.server_binary" in str(err.value)
    assert "conclave local build" in str(err.value)


async def test_missing_model_path_is_reported(tmp_path: Path) -> None:
    settings = llama_settings(tmp_path, server_binary=Path("/bin/true"),
                              model_path=tmp_path / "absent.gguf")
    with pytest.raises(LocalRuntimeError, match=r"local\.model_path .*absent\.gguf"):
        await LocalRuntime(settings).ensure_running()


async def test_server_that_exits_at_startup_shows_its_log(tmp_path: Path) -> None:
    script = _script(tmp_path, "echo 'fatal: cannot load this model' >&2; exit 3")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    settings = llama_settings(tmp_path, server_binary=script, model_path=model)
    with pytest.raises(LocalRuntimeError) as err:
        await LocalRuntime(settings).ensure_running()
    msg = str(err.value)
    assert "exited with code 3" in msg and "fatal: cannot load this model" in msg
    assert "llama-server.log" in msg
    assert not (settings.data_dir / "run" / "llama-server.json").exists()


async def test_server_that_never_gets_healthy_times_out_and_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = _script(tmp_path, f"echo $$ > {pid_file}; exec sleep 60")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    settings = llama_settings(tmp_path, server_binary=script, model_path=model,
                              startup_timeout=1.0)
    with pytest.raises(LocalRuntimeError, match="did not become healthy within 1s"):
        await LocalRuntime(settings).ensure_running()
    assert not _pid_alive(int(pid_file.read_text()))


def _script(folder: Path, body: str) -> Path:
    """A stand-in executable named like the server, to drive the failure paths for real."""
    path = folder / "llama-server"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# --- external endpoint -----------------------------------------------------------------


@pytest.mark.llama
async def test_external_endpoint_is_health_checked_not_managed(
    llama_server: LlamaServer, tmp_path: Path
) -> None:
    settings = llama_settings(tmp_path, endpoint=llama_server.base_url + "/")
    runtime = LocalRuntime(settings)
    assert await runtime.ensure_running() == llama_server.base_url
    status = await runtime.status()
    assert status.running and status.healthy and not status.managed and status.pid is None
    with pytest.raises(LocalRuntimeError, match="does not stop servers it did not start"):
        await runtime.stop()
    assert not (settings.data_dir / "run" / "llama-server.json").exists()


async def test_unreachable_external_endpoint_is_an_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    runtime = LocalRuntime(llama_settings(tmp_path, endpoint=url))
    with pytest.raises(LocalRuntimeError, match="not healthy: unreachable") as err:
        await runtime.ensure_running()
    assert "CONCLAVE_LOCAL__ENDPOINT" in str(err.value)
    status = await runtime.status()
    assert not status.running and status.health.startswith("unreachable")


# --- build ------------------------------------------------------------------------------


def test_parse_percent_reads_cmake_progress() -> None:
    assert parse_percent("[  6%] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o") == 6
    assert parse_percent("[100%] Built target llama-server") == 100
    assert parse_percent("-- Configuring done") is None
    assert parse_percent("warning: [ 5%] not at the start") is None


def test_cpu_fingerprint_is_stable_and_short() -> None:
    fp = cpu_fingerprint()
    assert fp == cpu_fingerprint() and len(fp) == 10 and int(fp, 16) >= 0


async def test_build_rejects_a_source_tree_that_is_not_llama_cpp(tmp_path: Path) -> None:
    settings = llama_settings(tmp_path / "data", llama_source=tmp_path / "src")
    settings = settings.model_copy(update={"cache_dir": tmp_path / "cache"})
    (tmp_path / "src").mkdir()
    with pytest.raises(LocalRuntimeError, match=r"not a llama\.cpp source tree"):
        await build_server(settings)
    assert default_binary(settings).parent.parent.name.startswith("src-")


def _failing_tree(root: Path) -> Path:
    """A source tree shaped like llama.cpp whose CMake configure fails for real."""
    (root / "tools" / "server").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.14)\nproject(fake NONE)\n"
        'message(FATAL_ERROR "deliberate configure failure")\n'
    )
    return root


async def test_build_failure_reports_the_log_tail_and_path(tmp_path: Path) -> None:
    settings = llama_settings(tmp_path / "data", llama_source=_failing_tree(tmp_path / "src"))
    settings = settings.model_copy(update={"cache_dir": tmp_path / "cache"})
    events = []
    with pytest.raises(LocalRuntimeError) as err:
        await build_server(settings, progress=events.append)
    log_path = default_binary(settings).parent.parent / "build.log"
    assert "failed at the configure step" in err.value.message
    assert "deliberate configure failure" in err.value.message
    assert err.value.hint == f"full log: {log_path}"
    assert "deliberate configure failure" in log_path.read_text()
    assert [e.step for e in events] == ["source", "configure"]
    assert not default_binary(settings).exists()


def test_cli_build_failure_ends_with_one_error_line(tmp_path: Path) -> None:
    settings = llama_settings(tmp_path / "data")
    settings = settings.model_copy(update={"cache_dir": tmp_path / "cache"})
    result = _cli(["build", "--json"], settings,
                  CONCLAVE_LLAMA_SOURCE=str(_failing_tree(tmp_path / "src")))
    assert result.exit_code == 1 and result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: llama-server build failed at the configure step")
    assert last.endswith("build.log)")
    assert "  | " in result.stderr and "deliberate configure failure" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.llama
async def test_build_is_a_quick_no_op_when_the_binary_works(llama_server: LlamaServer) -> None:
    settings = llama_server.settings
    if not default_binary(settings).is_file():
        pytest.skip("this run uses CONCLAVE_LOCAL__SERVER_BINARY; no cached build to check")
    result = await build_server(settings)
    assert result.built is False and result.seconds < 10
    assert result.binary == default_binary(settings)
    assert result.version.startswith("version")
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["llama_cpp_python_version"] == "0.3.36"
    assert "-DGGML_NATIVE=ON" in manifest["cmake_flags"]


# --- CLI ----------------------------------------------------------------------------------


def _cli(args: list[str], settings: Settings, **env: str):  # type: ignore[no-untyped-def]
    base = {"CONCLAVE_DATA_DIR": str(settings.data_dir),
            "CONCLAVE_CACHE_DIR": str(settings.cache_dir),
            "CONCLAVE_LOCAL__ENDPOINT": ""}
    base.update(env)
    return CliRunner().invoke(local_app, args, env={k: v or None for k, v in base.items()})


@pytest.mark.llama
def test_cli_status_and_start_report_the_running_server(llama_server: LlamaServer) -> None:
    result = _cli(["status", "--json"], llama_server.settings)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["running"] and data["healthy"] and data["url"] == llama_server.base_url

    result = _cli(["start"], llama_server.settings)
    assert result.exit_code == 0 and result.stdout.strip() == llama_server.base_url

    result = _cli(["status"], llama_server.settings)
    assert result.exit_code == 0 and "health: ok" in result.stdout


def test_cli_errors_are_one_line_on_stderr(tmp_path: Path) -> None:
    settings = llama_settings(tmp_path)
    result = _cli(["start", "--json"], settings,
                  CONCLAVE_LOCAL__SERVER_BINARY=str(tmp_path / "missing"))
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "conclave local build" in lines[0] and "Traceback" not in result.stderr


def test_cli_stop_when_nothing_runs(tmp_path: Path) -> None:
    result = _cli(["stop", "--json"], llama_settings(tmp_path))
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"stopped": False}
