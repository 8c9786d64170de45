"""`conclave run`: bad input fails in one line; with the local model it writes files or a
patch, prints the JSON scripts rely on, and every step lands in the ledger."""

from __future__ import annotations

import json
import subprocess

import pytest

from conclave.agents import make_patch, write_files
from tests.cli.test_cli_errors import conclave

TASK = '''def double(x: int) -> int:
    """Return twice x.
    >>> double(4)
    8
    """
'''


@pytest.mark.parametrize(("args", "needle"), [
    (["run", "   "], "the task is empty"),
    (["run", "make a thing", "--budget", "lots"], "--budget 'lots' is not an amount"),
    (["run", "make a thing", "--budget", "-1"], "--budget must be a positive amount"),
    (["run", "make a thing", "--repo", "/nonexistent/repo"], "is not a directory"),
    (["run", "@/nonexistent/task.txt"], "task file /nonexistent/task.txt does not exist"),
])
def test_bad_input_is_one_line_on_stderr(tmp_path, args, needle):
    r = conclave(tmp_path, *args)
    assert r.returncode == 1
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def git(repo, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True)


def test_patch_applies_with_git(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "util.py").write_text("def one():\n    return 1\n")
    (repo / "keep.py").write_text("x = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    files = {"pkg/util.py": "def one():\n    return 1\n\n\ndef two():\n    return 2\n",
             "pkg/new.py": "VALUE = 3", "keep.py": "x = 1\n"}
    patch = make_patch(files, repo)
    assert "diff --git a/pkg/new.py b/pkg/new.py\nnew file mode 100644\n--- /dev/null" in patch
    assert "+def two():" in patch and "keep.py" not in patch
    (tmp_path / "p.patch").write_text(patch)
    git(repo, "apply", "--check", str(tmp_path / "p.patch"))
    git(repo, "apply", str(tmp_path / "p.patch"))
    assert (repo / "pkg" / "new.py").read_text() == "VALUE = 3"
    assert "def two" in (repo / "pkg" / "util.py").read_text()
    out = tmp_path / "out"
    assert [p.name for p in write_files({"a/b.py": "1\n"}, out)] == ["b.py"]
    with pytest.raises(Exception, match="unsafe or invalid file path"):
        write_files({"../escape.py": "x"}, out)


@pytest.mark.llama
def test_run_writes_files_and_a_patch_and_the_ledger_has_every_step(tmp_path):
    try:
        out = tmp_path / "result"
        r = conclave(tmp_path, "run", TASK, "--privacy", "--max-rounds", "1", "--samples", "1",
                     "--json", "--out", str(out))
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        for key in ("plan", "files", "review", "approved", "rounds", "usage", "cost_usd",
                    "run_id", "stopped_by"):
            assert key in data, key
        assert data["rounds"] == 1 and data["cost_usd"] == 0.0
        (entry,) = data["files"]
        assert (out / entry["path"]).read_text() == entry["content"]
        assert entry["content"].startswith(TASK)
        assert data["review"]["tests"][0]["expr"] == "double(4)"
        spend = json.loads(conclave(tmp_path, "spend", "--by", "model", "--json").stdout)
        (row,) = spend["rows"]
        assert row["key"] == "local/gemma-3-270m" and row["count"] == data["steps"] >= 2

        repo = tmp_path / "repo"
        repo.mkdir()
        (repo / "other.py").write_text("y = 2\n")
        git(repo, "init", "-q")
        before = sorted(p.name for p in repo.iterdir())
        r = conclave(tmp_path, "run", TASK, "--privacy", "--max-rounds", "1", "--samples", "1",
                     "--repo", str(repo), "--out", str(tmp_path / "patch-out"))
        assert r.returncode == 0, r.stderr
        assert "Plan" in r.stdout and "Review" in r.stdout
        patch = tmp_path / "patch-out" / "changes.patch"
        assert f"patch: {patch}" in r.stdout
        git(repo, "apply", "--check", str(patch))
        assert sorted(p.name for p in repo.iterdir()) == before  # the repo is untouched
        assert "+def double(x: int) -> int:" in patch.read_text()
    finally:
        conclave(tmp_path, "local", "stop")
