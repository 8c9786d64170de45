"""`conclave chat` end to end: a fresh data dir, the local server started on demand,
the real model answering, and the JSON the scripts rely on."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli_errors import conclave

pytestmark = pytest.mark.llama


def test_chat_starts_local_runtime_on_demand_and_prints_json(tmp_path):
    try:
        r = conclave(tmp_path, "chat", "What is the capital of France?", "--json",
                     "--max-tokens", "16")
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        for key in ("text", "model", "provider", "tier", "usage", "cost_usd", "latency_ms",
                    "ttft_ms"):
            assert key in data
        assert "Paris" in data["text"]
        assert data["model"] == "local/gemma-3-270m" and data["tier"] == 0
        assert data["usage"]["input_tokens"] > 0 and data["usage"]["output_tokens"] > 0
        assert data["cost_usd"] == 0.0

        # The server it started is reused by the next call, with streaming and a tier.
        r = conclave(tmp_path, "chat", "What is the capital of Italy?", "--json", "--stream",
                     "--tier", "3", "--privacy", "--max-tokens", "16")
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["ttft_ms"] is not None and data["ttft_ms"] > 0
        assert "privacy" in data["routing_note"]

        status = json.loads(conclave(tmp_path, "local", "status", "--json").stdout)
        assert status["running"] and status["healthy"]
    finally:
        conclave(tmp_path, "local", "stop")
    status = json.loads(conclave(tmp_path, "local", "status", "--json").stdout)
    assert not status["running"]


def test_plain_output_is_the_answer_with_a_footer_on_stderr(tmp_path):
    try:
        r = conclave(tmp_path, "chat", "What is the capital of France?", "--max-tokens", "16")
        assert r.returncode == 0, r.stderr
        assert "Paris" in r.stdout
        assert "local/gemma-3-270m (tier 0)" in r.stderr
    finally:
        conclave(tmp_path, "local", "stop")
