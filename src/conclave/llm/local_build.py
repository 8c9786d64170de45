"""Build ``llama-server`` from source, so tier 0 needs nothing but PyPI and a compiler.

Why from source: a prebuilt llama.cpp binary cannot be fetched on a machine
that only reaches package registries, and the one pip package that ships the
source is ``llama-cpp-python`` (MIT), whose sdist vendors llama.cpp (MIT).
So the route is: ``pip download`` that sdist, extract only
``vendor/llama.cpp``, and build the ``llama-server`` target with CMake.  The
web UI (prebuilt or built with npm), OpenSSL and curl are switched off: the
server only ever talks to loopback and pulls in no further dependency.

``GGML_NATIVE=ON`` tunes the binary for this CPU, so the install directory
carries a short hash of the CPU flags: a home directory shared between
machines never runs a binary built for another CPU.

The build is idempotent: when the binary for this tag exists and
``llama-server --version`` exits 0, nothing is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel

from conclave.config import Settings
from conclave.errors import LocalRuntimeError

#: the llama-cpp-python release whose sdist vendors the llama.cpp we build
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SERVER_TARGET = "llama-server"

CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_APP=OFF",
    # no web UI: neither the prebuilt one (a download) nor an npm build
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    # loopback only: no TLS, no model downloads
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DGGML_NATIVE=ON",
    # one self-contained binary that can be copied out of the build tree
    "-DBUILD_SHARED_LIBS=OFF",
)

_PERCENT = re.compile(r"^\[\s*(\d{1,3})%\]")
_LOG_TAIL_LINES = 25


class BuildEvent(BaseModel):
    """One progress report: a step starting, or the compile percentage moving."""

    step: str
    message: str
    #: 0-100 while compiling, else None
    percent: int | None = None


class BuildResult(BaseModel):
    binary: Path
    tag: str
    #: False when an existing working binary was found and nothing was built
    built: bool
    seconds: float
    log_path: Path
    manifest_path: Path
    version: str


ProgressCallback = Callable[[BuildEvent], None]


# --- where things go ------------------------------------------------------------------


def cpu_fingerprint() -> str:
    """Short hash of the CPU's feature flags (``GGML_NATIVE`` builds for exactly these)."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    basis = f"{platform.system()}|{platform.machine()}|{flags or platform.processor()}"
    return hashlib.sha256(basis.encode()).hexdigest()[:10]


def build_tag(settings: Settings) -> str:
    """Install directory name: source identity plus CPU fingerprint."""
    source = settings.local.llama_source
    if source is not None:
        ident = hashlib.sha256(str(source.expanduser().resolve()).encode()).hexdigest()[:8]
        return f"src-{ident}-cpu{cpu_fingerprint()}"
    return f"lcp-{LLAMA_CPP_PYTHON_VERSION}-cpu{cpu_fingerprint()}"


def install_dir(settings: Settings) -> Path:
    return settings.cache_dir / "llama.cpp" / build_tag(settings)


def default_binary(settings: Settings) -> Path:
    """Where ``conclave local build`` installs ``llama-server`` for this machine."""
    return install_dir(settings) / "bin" / SERVER_TARGET


def server_binary(settings: Settings) -> Path:
    """The binary to run: ``local.server_binary`` if set, else the built one.

    Raises LocalRuntimeError with the fix when it is missing.
    """
    configured = settings.local.server_binary
    if configured is not None:
        path = configured.expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise LocalRuntimeError(
                f"local.server_binary {path} is not an executable file",
                hint="fix CONCLAVE_LOCAL__SERVER_BINARY, or unset it and run "
                "`conclave local build`",
            )
        return path
    path = default_binary(settings)
    if not path.is_file():
        raise LocalRuntimeError(
            f"llama-server is not built yet (looked for {path})",
            hint="run `conclave local build` (about 15-20 minutes on 2 cores), or set "
            "local.server_binary to an existing llama-server",
        )
    return path


async def binary_version(binary: Path) -> str | None:
    """``llama-server --version`` output, or None when the binary does not run."""
    try:
        proc = await asyncio.create_subprocess_exec(
            str(binary), "--version",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
    except OSError:
        return None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return None
    if proc.returncode != 0:
        return None
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    versions = [ln for ln in lines if ln.startswith("version")]
    return (versions or lines or ["unknown"])[0].strip()


def parse_percent(line: str) -> int | None:
    """The ``NN`` of a CMake/make ``[ NN%] ...`` progress line, else None."""
    m = _PERCENT.match(line.strip())
    return min(int(m.group(1)), 100) if m else None


# --- the build ------------------------------------------------------------------------


async def build_server(
    settings: Settings,
    *,
    force: bool = False,
    progress: ProgressCallback | None = None,
    jobs: int | None = None,
) -> BuildResult:
    """Build and install ``llama-server`` for this machine; a no-op when it already works."""
    emit = progress or (lambda _e: None)
    target_dir = install_dir(settings)
    binary = target_dir / "bin" / SERVER_TARGET
    log_path = target_dir / "build.log"
    manifest_path = target_dir / "manifest.json"
    started = time.monotonic()

    if not force and binary.is_file():
        version = await binary_version(binary)
        if version is not None:
            emit(BuildEvent(step="done", message=f"already built: {binary} ({version})"))
            return BuildResult(
                binary=binary, tag=target_dir.name, built=False,
                seconds=round(time.monotonic() - started, 3), log_path=log_path,
                manifest_path=manifest_path, version=version,
            )

    _check_tools()
    target_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(target_dir), log_path.open("w") as log:
        log.write(f"# conclave local build, {datetime.now(UTC).isoformat()}\n")
        log.flush()
        try:
            version = await _build(settings, target_dir, binary, log, emit, jobs)
        except LocalRuntimeError:
            raise
        except (OSError, tarfile.TarError) as exc:
            raise LocalRuntimeError(
                f"llama-server build failed: {exc}", hint=f"full log: {log_path}"
            ) from None
    seconds = round(time.monotonic() - started, 1)
    manifest = {
        "source": (
            str(settings.local.llama_source)
            if settings.local.llama_source
            else f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (sdist, vendor/llama.cpp)"
        ),
        "llama_cpp_python_version": (
            None if settings.local.llama_source else LLAMA_CPP_PYTHON_VERSION
        ),
        "server_version": version,
        "cmake_flags": list(CMAKE_FLAGS),
        "cpu_fingerprint": cpu_fingerprint(),
        "machine": platform.machine(),
        "build_seconds": seconds,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    emit(BuildEvent(step="done", message=f"built {binary} in {seconds:.0f}s ({version})"))
    return BuildResult(
        binary=binary, tag=target_dir.name, built=True, seconds=seconds,
        log_path=log_path, manifest_path=manifest_path, version=version,
    )


async def _build(
    settings: Settings,
    target_dir: Path,
    binary: Path,
    log: TextIO,
    emit: ProgressCallback,
    jobs: int | None,
) -> str:
    # The work tree survives a failed build, so a retry compiles incrementally;
    # it is removed once the binary is installed.
    work = target_dir / "work"
    build_dir = work / "build"
    source = settings.local.llama_source
    if source is not None:
        src_dir = source.expanduser().resolve()
        if not _is_llama_tree(src_dir):
            raise LocalRuntimeError(
                f"llama_source {src_dir} is not a llama.cpp source tree "
                "(no CMakeLists.txt or tools/server)",
                hint="point CONCLAVE_LLAMA_SOURCE at the root of a llama.cpp checkout",
            )
        emit(BuildEvent(step="source", message=f"using llama.cpp source at {src_dir}"))
    else:
        src_dir = work / "llama.cpp"
        if not (src_dir / "CMakeLists.txt").is_file():
            await _fetch_source(work, src_dir, log, emit)
        else:
            emit(BuildEvent(step="source", message=f"reusing extracted source {src_dir}"))

    emit(BuildEvent(step="configure", message="cmake configure"))
    await _run(
        ["cmake", "-S", str(src_dir), "-B", str(build_dir), *CMAKE_FLAGS],
        log, step="configure",
    )

    n = jobs or _cpu_count()
    emit(BuildEvent(step="compile", message=f"compiling {SERVER_TARGET} with {n} jobs",
                    percent=0))

    def on_line(line: str) -> None:
        pct = parse_percent(line)
        if pct is not None:
            emit(BuildEvent(step="compile", message=line.strip(), percent=pct))

    await _run(
        ["cmake", "--build", str(build_dir), "--target", SERVER_TARGET, "-j", str(n)],
        log, step="compile", on_line=on_line,
    )

    built = build_dir / "bin" / SERVER_TARGET
    if not built.is_file():
        raise LocalRuntimeError(
            f"the build finished but {built} is missing",
            hint=f"see {target_dir / 'build.log'}",
        )
    emit(BuildEvent(step="install", message=f"installing to {binary}"))
    _install(built, binary)
    version = await binary_version(binary)
    if version is None:
        _install(None, binary)
        raise LocalRuntimeError(
            f"the freshly built {binary.name} does not run (`--version` failed)",
            hint=f"see {target_dir / 'build.log'}",
        )
    log.write(f"# installed {binary}: {version}\n")
    shutil.rmtree(work, ignore_errors=True)
    return version


async def _fetch_source(work: Path, src_dir: Path, log: TextIO, emit: ProgressCallback) -> None:
    spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    emit(BuildEvent(step="download", message=f"pip download {spec} (sdist, ~76 MB)"))
    os.makedirs(work, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix="dl-") as dl:
        await _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", spec, "-d", dl],
            log, step="download",
        )
        tarballs = _sdists(Path(dl))
        if not tarballs:
            raise LocalRuntimeError(
                f"pip download of {spec} produced no sdist",
                hint=f"see {log.name}; check that PyPI is reachable",
            )
        emit(BuildEvent(step="extract", message=f"extracting vendor/llama.cpp from "
                        f"{tarballs[0].name}"))
        await asyncio.to_thread(_extract_vendor, tarballs[0], src_dir)


def _sdists(folder: Path) -> list[Path]:
    return sorted(folder.glob("llama_cpp_python-*.tar.gz"))


def _is_llama_tree(src: Path) -> bool:
    return (src / "CMakeLists.txt").is_file() and (src / "tools" / "server").is_dir()


def _install(built: Path | None, binary: Path) -> None:
    """Copy the built binary into place atomically (``None`` removes a broken one)."""
    if built is None:
        binary.unlink(missing_ok=True)
        return
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(binary.name + ".tmp")
    shutil.copy2(built, tmp)
    os.replace(tmp, binary)


def _extract_vendor(tarball: Path, dest: Path) -> None:
    """Extract only ``<top>/vendor/llama.cpp/`` from the sdist into ``dest``."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(tarball, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/", 3)
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                continue
            member.name = parts[3]
            members.append(member)
        if not members:
            raise LocalRuntimeError(
                f"{tarball.name} holds no vendor/llama.cpp directory",
                hint=f"the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist layout changed",
            )
        tar.extractall(partial, members=members, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(partial, dest)


async def _run(
    cmd: list[str],
    log: TextIO,
    *,
    step: str,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Run ``cmd`` with its output streamed to the log; raise with the log tail on failure."""
    log_path = Path(log.name)
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        async for raw in proc.stdout:
            line = raw.decode(errors="replace")
            log.write(line)
            if on_line is not None:
                on_line(line)
        rc = await proc.wait()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        log.flush()
    if rc != 0:
        raise LocalRuntimeError(
            f"llama-server build failed at the {step} step (exit {rc}); last lines:\n"
            + log_tail(log_path),
            hint=f"full log: {log_path}",
        )


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(log unreadable)"
    return "\n".join(text.splitlines()[-lines:])


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _check_tools() -> None:
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (c++/g++/clang++)")
    if missing:
        raise LocalRuntimeError(
            f"cannot build llama-server: missing {', '.join(missing)}",
            hint="install them, e.g. `apt-get install cmake g++` (or build-essential)",
        )


@contextlib.contextmanager
def _build_lock(target_dir: Path) -> Iterator[None]:
    lock_path = target_dir / ".build.lock"
    with lock_path.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LocalRuntimeError(
                f"another llama-server build is running for {target_dir.name}",
                hint="wait for it to finish, then run `conclave local build` again",
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
