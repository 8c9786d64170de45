"""Run untrusted Python (a model's code and the Reviewer's tests) in a child process.

Model-written code is never executed in this process.  Each run gets:

* a fresh temporary directory as its working directory, removed afterwards;
* ``python -I`` (no ``PYTHON*`` variables, no user site, no script dir on the path)
  and an environment holding only ``PATH`` and ``LANG``;
* resource limits set in the child before ``exec`` (``preexec_fn``): CPU seconds,
  address space, written-file size, open files, and no new processes;
* no network: a new (unprivileged) user and network namespace where the kernel
  allows it, so the child has only a loopback device that is down; where it does
  not, the child's socket constructors are replaced before any candidate code is
  imported (weaker, and reported as ``network="guard"``);
* a wall-clock limit: the whole process group is killed when it runs out;
* stdout and stderr written to files capped by the file-size limit, so a child
  printing forever cannot fill this process's memory.

``run_python`` is the primitive; :func:`run_tests` builds a runner script that
imports the candidate's module, evaluates each test expression with a per-test
alarm and reports one JSON line of results.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from conclave.errors import InvalidRequest

#: the marker line the runner prints before its JSON report
REPORT_MARKER = "@@conclave-review@@"
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_OUTPUT_CAP = 64_000


class SandboxLimits(BaseModel):
    """What a child may use; the defaults suit short test runs of small functions."""

    timeout_s: float = Field(10.0, gt=0, description="wall clock for the whole run")
    cpu_s: int = Field(10, ge=1, description="CPU seconds (RLIMIT_CPU)")
    memory_mb: int = Field(512, ge=64, description="address space (RLIMIT_AS)")
    file_mb: int = Field(16, ge=1, description="largest file the child may write (RLIMIT_FSIZE)")
    open_files: int = Field(64, ge=16, description="RLIMIT_NOFILE")
    #: seconds each test expression may run before its alarm fires (run_tests only)
    per_test_s: float = Field(3.0, gt=0)


class SandboxRun(BaseModel):
    """How a child process ended and what it printed (each stream capped)."""

    returncode: int | None
    timed_out: bool
    duration_ms: float
    stdout: str
    stderr: str
    #: how the network was cut off: a namespace, or the in-process socket guard
    network: Literal["namespace", "guard"]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class TestCase(BaseModel):
    """One check the Reviewer wrote: evaluate ``expr`` and compare it with ``expected``.

    ``setup`` runs first (statements from a doctest without output).  ``expected``
    is Python source; with ``expected=None`` the test only checks that ``expr``
    runs without raising (an ``assert`` statement, say).
    """

    __test__ = False  # not a pytest class

    id: str
    expr: str
    expected: str | None = None
    setup: str = ""
    #: where the test came from: "docstring", "statement" or "model"
    source: str = "docstring"


class TestOutcome(BaseModel):
    __test__ = False

    id: str
    passed: bool
    #: repr of the value ``expr`` gave, when it gave one
    actual: str | None = None
    error: str | None = None


class TestReport(BaseModel):
    """The result of one candidate against the Reviewer's tests."""

    __test__ = False

    outcomes: list[TestOutcome] = Field(default_factory=list)
    #: set when the module could not even be imported, or the run died
    error: str | None = None
    timed_out: bool = False
    duration_ms: float = 0.0
    network: Literal["namespace", "guard"] = "guard"
    stderr: str = ""

    @property
    def passed(self) -> int:
        return sum(o.passed for o in self.outcomes)

    def failures(self) -> list[TestOutcome]:
        return [o for o in self.outcomes if not o.passed]


# --- isolation ----------------------------------------------------------------------


_LIBC: ctypes.CDLL | None = None
_LIBC_LOOKED_UP = False


def _libc() -> ctypes.CDLL | None:
    """libc, looked up once in the parent: ``find_library`` may spawn ``ldconfig``, which
    must never happen in a child between fork and exec (limits are already set there)."""
    global _LIBC, _LIBC_LOOKED_UP
    if not _LIBC_LOOKED_UP:
        _LIBC_LOOKED_UP = True
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        _LIBC = ctypes.CDLL(name, use_errno=True) if name else None
    return _LIBC


def _unshare(flags: int) -> bool:
    libc = _LIBC
    if libc is None:
        return False
    return libc.unshare(ctypes.c_int(flags)) == 0


_NAMESPACES: bool | None = None


def namespaces_available() -> bool:
    """Whether this kernel lets an unprivileged process open a new network namespace.

    Probed once in a throwaway child, so this process's own namespaces never change.
    """
    global _NAMESPACES
    _libc()
    if _NAMESPACES is None:
        try:
            pid = os.fork()
        except OSError:
            _NAMESPACES = False
            return False
        if pid == 0:  # pragma: no cover - the child exits at once
            os._exit(0 if _unshare(_CLONE_NEWUSER | _CLONE_NEWNET) else 1)
        _, status = os.waitpid(pid, 0)
        _NAMESPACES = os.waitstatus_to_exitcode(status) == 0
    return _NAMESPACES


def _preexec(limits: SandboxLimits, namespace: bool) -> None:
    """Runs in the child between fork and exec: limits first, then the namespace."""
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Unprivileged user namespace plus a network namespace without interfaces.
    if namespace and not _unshare(_CLONE_NEWUSER | _CLONE_NEWNET):
        os._exit(125)
    # No new processes (the count is per user, so 0 refuses every fork).
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


_NET_GUARD = '''
import socket as _s
def _no_network(*a, **k):
    raise OSError("network access is disabled in the Conclave sandbox")
for _n in ("socket", "create_connection", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_s, _n, _no_network)
del _s, _n
'''

# RLIMIT_NPROC does not bind root (the kernel exempts uid 0 even in a user namespace),
# so the child's process-starting functions are replaced too: defence in depth, not a wall.
_PROCESS_GUARD = '''
import os as _os, _posixsubprocess as _ps
def _no_process(*a, **k):
    raise OSError("starting processes is disabled in the Conclave sandbox")
for _n in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv",
           "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv",
           "spawnve", "spawnl", "spawnle", "spawnlp", "spawnvp"):
    if hasattr(_os, _n):
        setattr(_os, _n, _no_process)
_ps.fork_exec = _no_process
del _os, _ps, _n
'''


async def run_python(
    script: str,
    *,
    files: Mapping[str, str] | None = None,
    limits: SandboxLimits | None = None,
    stdin: str = "",
    extra_path: Sequence[Path] = (),
) -> SandboxRun:
    """Run ``script`` with ``python -I`` in a fresh temp dir holding ``files``.

    ``files`` maps relative paths to contents (the candidate's modules); the temp
    dir and then ``extra_path`` are put on ``sys.path`` by a small prelude.
    """
    limits = limits or SandboxLimits()
    namespace = namespaces_available()
    tmp = Path(tempfile.mkdtemp(prefix="conclave-sandbox-"))
    try:
        for rel, content in (files or {}).items():
            target = _inside(tmp, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        paths = [str(tmp), *(str(p) for p in extra_path)]
        prelude = f"import sys\nsys.path[:0] = {paths!r}\n" + _PROCESS_GUARD
        if not namespace:
            prelude += _NET_GUARD
        runner = tmp / "_conclave_run.py"
        runner.write_text(prelude + script)
        out_path, err_path = tmp / "_stdout.txt", tmp / "_stderr.txt"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        t0 = time.perf_counter()
        timed_out = False
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        out, err = os.open(out_path, flags, 0o600), os.open(err_path, flags, 0o600)
        _libc()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-B", str(runner),
                stdin=asyncio.subprocess.PIPE, stdout=out, stderr=err, cwd=tmp, env=env,
                start_new_session=True,
                preexec_fn=lambda: _preexec(limits, namespace),
            )
            try:
                await asyncio.wait_for(proc.communicate(stdin.encode()), limits.timeout_s)
            except TimeoutError:
                timed_out = True
            finally:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
        finally:
            os.close(out)
            os.close(err)
        return SandboxRun(
            returncode=None if timed_out else proc.returncode,
            timed_out=timed_out,
            duration_ms=round((time.perf_counter() - t0) * 1000, 3),
            stdout=_read_capped(out_path), stderr=_read_capped(err_path),
            network="namespace" if namespace else "guard",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _inside(root: Path, rel: str) -> Path:
    path = Path(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise InvalidRequest(f"file path {rel!r} must be relative and stay inside the sandbox",
                             hint="use a path like 'pkg/module.py'")
    return root / path


def _read_capped(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(_OUTPUT_CAP + 1)
    except OSError:
        return ""
    text = data[:_OUTPUT_CAP].decode(errors="replace")
    return text + "\n...[output truncated]" if len(data) > _OUTPUT_CAP else text


# --- tests ----------------------------------------------------------------------------

# The runner: import the module, then evaluate each test under an alarm.  It compares
# values, not their printed form (so 2 == 2.0 and [1, 2] == [1,2]), floats with a
# tolerance, and reports repr(actual) so the Reviewer can group candidates by behaviour.
_RUNNER = r'''
import importlib, json, math, signal, sys, traceback

spec = json.loads(sys.stdin.read())
REPORT_MARKER = spec["marker"]

class _Alarm(BaseException):
    pass

def _on_alarm(signum, frame):
    raise _Alarm()

signal.signal(signal.SIGALRM, _on_alarm)

def same(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) or isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b

def short(text, limit=300):
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."

def last_line(exc):
    return short("".join(traceback.format_exception_only(type(exc), exc)).strip())

report = {"outcomes": [], "error": None}
try:
    module = importlib.import_module(spec["module"])
except BaseException as exc:
    report["error"] = "importing %s failed: %s" % (spec["module"], last_line(exc))
    print(REPORT_MARKER + json.dumps(report), flush=True)
    sys.exit(0)

for test in spec["tests"]:
    ns = dict(vars(module))
    outcome = {"id": test["id"], "passed": False, "actual": None, "error": None}
    signal.setitimer(signal.ITIMER_REAL, spec["per_test_s"])
    try:
        if test["setup"]:
            exec(test["setup"], ns)
        actual = eval(test["expr"], ns)
        outcome["actual"] = short(repr(actual))
        if test["expected"] is None:
            outcome["passed"] = True
        else:
            expected = eval(test["expected"], ns)
            outcome["passed"] = bool(same(actual, expected))
            if not outcome["passed"]:
                outcome["error"] = "expected %s, got %s" % (short(repr(expected)),
                                                             outcome["actual"])
    except _Alarm:
        outcome["error"] = "timed out after %gs" % spec["per_test_s"]
    except BaseException as exc:
        outcome["error"] = last_line(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    report["outcomes"].append(outcome)
print(REPORT_MARKER + json.dumps(report), flush=True)
'''


async def run_tests(
    files: Mapping[str, str],
    module: str,
    tests: Sequence[TestCase],
    *,
    limits: SandboxLimits | None = None,
    extra_path: Sequence[Path] = (),
) -> TestReport:
    """Import ``module`` from ``files`` in a sandbox and run ``tests`` against it.

    Never raises for what the code does: a crash, an import error or a timeout
    becomes :attr:`TestReport.error` (tests not reached count as failed).
    """
    limits = limits or SandboxLimits()
    spec = {"module": module, "per_test_s": limits.per_test_s, "marker": REPORT_MARKER,
            "tests": [t.model_dump(include={"id", "expr", "expected", "setup"}) for t in tests]}
    run = await run_python(_RUNNER, files=files, limits=limits, stdin=json.dumps(spec),
                           extra_path=extra_path)
    report = TestReport(timed_out=run.timed_out, duration_ms=run.duration_ms,
                        network=run.network, stderr=run.stderr[-2000:])
    data = None
    for line in run.stdout.splitlines():
        if line.startswith(REPORT_MARKER):
            with contextlib.suppress(ValueError):
                data = json.loads(line[len(REPORT_MARKER):])
    if data is not None:
        report.outcomes = [TestOutcome.model_validate(o) for o in data["outcomes"]]
        report.error = data["error"]
    if data is None or len(report.outcomes) < len(tests):
        if run.timed_out:
            why = f"the run was killed after {limits.timeout_s:g}s (wall-clock limit)"
        elif data is None:
            tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
            why = f"the test process died (exit code {run.returncode}): {tail}"
        else:
            why = report.error or "tests were not reached"
        report.error = report.error or why
        done = {o.id for o in report.outcomes}
        report.outcomes += [TestOutcome(id=t.id, passed=False, error=why)
                            for t in tests if t.id not in done]
    return report
