"""The Reviewer's test runner: a child process with limits, never this process."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from conclave.agents import SandboxLimits, TestCase, run_python, run_tests
from conclave.errors import InvalidRequest

SOLUTION = '''
def add(a, b):
    return a + b

def spin():
    while True:
        pass

def boom():
    raise KeyError("missing")
'''


async def test_passing_and_failing_tests_are_reported_with_values():
    tests = [TestCase(id="ok", expr="add(1, 2)", expected="3"),
             TestCase(id="wrong", expr="add(2, 2)", expected="5"),
             TestCase(id="float", expr="add(0.1, 0.2)", expected="0.3"),
             TestCase(id="raises", expr="boom()", expected="1"),
             TestCase(id="setup", setup="x = add(1, 1)", expr="add(x, 1)", expected="3")]
    report = await run_tests({"solution.py": SOLUTION}, "solution", tests)
    by_id = {o.id: o for o in report.outcomes}
    assert report.passed == 3 and report.error is None
    assert by_id["ok"].passed and by_id["ok"].actual == "3"
    assert not by_id["wrong"].passed
    assert by_id["wrong"].error == "expected 5, got 4" and by_id["wrong"].actual == "4"
    assert by_id["float"].passed  # compared with a tolerance, like HumanEval's own checks
    assert not by_id["raises"].passed and by_id["raises"].error == "KeyError: 'missing'"
    assert by_id["setup"].passed


async def test_an_infinite_loop_is_stopped_per_test_and_the_rest_still_run():
    tests = [TestCase(id="loop", expr="spin()", expected="None"),
             TestCase(id="after", expr="add(1, 1)", expected="2")]
    t0 = time.perf_counter()
    report = await run_tests({"solution.py": SOLUTION}, "solution", tests,
                             limits=SandboxLimits(per_test_s=0.5, timeout_s=10))
    assert time.perf_counter() - t0 < 5
    assert report.outcomes[0].error == "timed out after 0.5s"
    assert report.outcomes[1].passed


async def test_the_wall_clock_limit_kills_the_process():
    """A loop at import time (no test reached): the whole process group is killed."""
    t0 = time.perf_counter()
    report = await run_tests({"solution.py": "while True:\n    pass\n"}, "solution",
                             [TestCase(id="t", expr="1", expected="1")],
                             limits=SandboxLimits(timeout_s=1.0))
    assert time.perf_counter() - t0 < 4
    assert report.timed_out
    assert report.outcomes[0].passed is False
    assert "killed after 1s" in report.outcomes[0].error


async def test_import_errors_and_crashes_are_reported():
    report = await run_tests({"solution.py": "def f(:\n"}, "solution",
                             [TestCase(id="t", expr="f()", expected="1")])
    assert report.error and "importing solution failed" in report.error
    assert "SyntaxError" in report.error
    assert report.outcomes[0].passed is False
    # a hard exit of the child is a failure, not an exception here
    report = await run_tests({"solution.py": "import os\nos._exit(3)\n"}, "solution",
                             [TestCase(id="t", expr="1", expected="1")])
    assert report.outcomes[0].passed is False
    assert "exit code 3" in report.error


async def test_no_network_no_processes_and_a_clean_environment():
    os.environ["CONCLAVE_SANDBOX_SECRET"] = "do-not-leak"
    try:
        run = await run_python(
            "import os, socket\n"
            "print('env', sorted(k for k in os.environ if 'SECRET' in k))\n"
            "print('flags', sys.flags.isolated, sys.flags.ignore_environment)\n"
            "try:\n"
            "    socket.create_connection(('127.0.0.1', 6379), timeout=2)\n"
            "    print('net open')\n"
            "except OSError as e:\n"
            "    print('net blocked')\n"
            "try:\n"
            "    os.system('true')\n"
            "    print('spawned')\n"
            "except OSError:\n"
            "    print('no processes')\n"
            "import subprocess\n"
            "try:\n"
            "    subprocess.run(['true'])\n"
            "    print('spawned')\n"
            "except OSError:\n"
            "    print('no processes')\n"
            "print('cwd', os.getcwd())\n")
    finally:
        del os.environ["CONCLAVE_SANDBOX_SECRET"]
    assert run.ok, run.stderr
    lines = run.stdout.splitlines()
    assert "env []" in lines
    assert "flags 1 1" in lines
    assert "net blocked" in lines and "net open" not in lines
    assert lines.count("no processes") == 2 and "spawned" not in lines
    cwd = next(ln for ln in lines if ln.startswith("cwd "))[4:]
    assert "conclave-sandbox-" in cwd
    assert not await asyncio.to_thread(os.path.exists, cwd)  # removed afterwards


async def test_memory_and_output_limits():
    run = await run_python("x = bytearray(2 * 1024 ** 3)\n",
                           limits=SandboxLimits(memory_mb=256))
    assert not run.ok and "MemoryError" in run.stderr
    run = await run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                           limits=SandboxLimits(file_mb=1, timeout_s=10))
    assert not run.ok and not run.timed_out  # SIGXFSZ ended it, long before the clock
    assert len(run.stdout) < 70_000 and run.stdout.endswith("[output truncated]")


async def test_files_may_not_escape_the_sandbox():
    with pytest.raises(InvalidRequest, match="must be relative"):
        await run_python("pass", files={"../evil.py": "x = 1"})
