"""Settings for tests: isolated from the developer's environment and config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conclave.config import Settings

_KEYS = ("openai_api_key", "anthropic_api_key", "together_api_key", "fireworks_api_key",
         "jan_api_key", "openai_base_url", "anthropic_base_url", "together_base_url",
         "fireworks_base_url", "jan_base_url", "ollama_host")


def make_settings(tmp: Path, **overrides: Any) -> Settings:
    """Settings with no provider key or URL unless given, data under ``tmp``."""
    values: dict[str, Any] = dict.fromkeys(_KEYS)
    values.update(data_dir=tmp / "data", privacy_mode=False)
    values.update(overrides)
    return Settings(**values)
