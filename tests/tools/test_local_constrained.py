"""Tool calls from the real local model under JSON-schema constrained decoding.

The registry's ``tool_call_schema`` goes to llama.cpp as a ``json_schema``
response format (its grammar converter must accept the inlined schema), and
whatever the 270M model produces under it must be a call the registry
accepts: a known tool with arguments that validate.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path

import pytest

from conclave.gateway import Gateway
from conclave.llm.types import ChatRequest, Message, ResponseFormat, ToolCall
from conclave.tools import CodeWorkbench, ToolRegistry
from tests.conftest import LlamaServer

pytestmark = pytest.mark.llama


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def registry_for(root: Path) -> ToolRegistry:
    registry = ToolRegistry()
    CodeWorkbench(root).register(registry)

    @registry.tool(namespace="weather")
    def forecast(city: str, days: int = 1, unit: Unit = Unit.CELSIUS) -> str:
        """Weather forecast for a city.

        Args:
            city: the city's name.
            days: how many days ahead.
            unit: temperature unit.
        """
        return f"{city}: sunny for {days} day(s), 21 degrees {unit.value}"

    return registry


@pytest.mark.parametrize("prompt", [
    "What will the weather be in Paris tomorrow? Answer with a tool call.",
    "Check the syntax of this Python code: `x = (1,`. Answer with a tool call.",
])
async def test_constrained_tool_call_is_always_accepted(llama_server: LlamaServer,
                                                        tmp_path: Path, prompt: str) -> None:
    registry = registry_for(tmp_path)
    schema = registry.tool_call_schema()
    tools = ", ".join(f"{s.name}: {s.description.splitlines()[0]}" for s in registry.specs())
    request = ChatRequest(
        messages=[Message.system(f"You call tools. Tools: {tools}"), Message.user(prompt)],
        response_format=ResponseFormat(type="json_schema", schema=schema),
        max_tokens=160, temperature=0)
    async with Gateway(llama_server.settings) as gw:
        response = await gw.complete(request)
    data = json.loads(response.text)
    result = await registry.call(ToolCall(id="local-1", name=data["name"],
                                          arguments=data["arguments"]))
    # the body may still refuse (say, both source and path given) but the call itself is valid
    assert result.error_kind not in ("unknown_tool", "invalid_json", "invalid_arguments"), \
        (response.text, result.content)
    await registry.aclose()
