"""Bad input at the command line: one clear line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONCLAVE = str(Path(sys.executable).with_name("conclave"))


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONCLAVE_")
           and not k.endswith("_BASE_URL") and k != "OLLAMA_HOST"}
    env.update(CONCLAVE_CONFIG=str(tmp_path / "none.yaml"),
               CONCLAVE_DATA_DIR=str(tmp_path / "data"))
    env.update(extra)
    return env


def conclave(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CONCLAVE, *args], capture_output=True, text=True, timeout=120,
                          env=cli_env(tmp_path, **env), stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["chat", "hi", "--model", "openai/gpt-9"], "unknown model 'openai/gpt-9'"),
        (["chat", "hi", "--model", "openai/gpt-5.1"], "needs OPENAI_API_KEY"),
        (["chat", "hi", "--tier", "7"], "tier must be 0, 1, 2 or 3"),
        (["chat", "   "], "the prompt is empty"),
        (["chat", "hi", "--model", "local/gemma-3-270m", "--tier", "1"], "not both"),
        (["chat", "hi", "--max-tokens", "0"], "max_tokens must be at least 1"),
        (["chat", "hi", "--privacy", "--model", "anthropic/claude-opus-4-5"], "privacy mode"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, needle):
    env = {"ANTHROPIC_API_KEY": "sk-ant-secret-value"} if "--privacy" in args else {}
    r = conclave(tmp_path, *args, **env)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "sk-ant-secret-value" not in r.stderr


def test_models_json_lists_catalog(tmp_path):
    r = conclave(tmp_path, "models", "--json", OPENAI_API_KEY="sk-x")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    by_name = {m["name"]: m for m in data["models"]}
    assert by_name["local/gemma-3-270m"]["tier"] == 0
    assert by_name["local/gemma-3-270m"]["kind"] == "base"
    assert by_name["openai/gpt-5.1"]["enabled"] is True
    assert by_name["anthropic/claude-opus-4-5"]["enabled"] is False
    assert by_name["anthropic/claude-opus-4-5"]["needs"] == "ANTHROPIC_API_KEY"
    assert {m["tier"] for m in data["models"]} == {0, 1, 2, 3}
    embed = by_name["openai/text-embedding-3-small"]
    assert embed["kind"] == "embedding" and embed["enabled"] is True
    assert embed["price_input_per_mtok"] == "0.02" and embed["price_output_per_mtok"] == "0"


def test_bad_config_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing:\n  max_retries: lots\n")
    r = conclave(tmp_path, "models", CONCLAVE_CONFIG=str(bad))
    assert r.returncode != 0
    assert "routing.max_retries" in r.stderr and "Traceback" not in r.stderr


def test_serve_with_a_broken_catalog_is_one_clear_line(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("providers:\n  up:\n    type: openai\n    base_url: http://127.0.0.1:1\n"
                       "models:\n  - name: up/x\n    provider: up\n    id: x\n")
    r = conclave(tmp_path, "serve", "--port", "1", CONCLAVE_CATALOG_FILE=str(catalog))
    assert r.returncode == 1
    assert "invalid model catalog" in r.stderr and "tier" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
