"""Tools models can call: the registry, the ``@tool`` decorator, and workbenches.

Define a tool with a typed function::

    @tool(namespace="math", timeout_s=5)
    def add(a: int, b: int = 0) -> int:
        \"\"\"Add two numbers.

        Args:
            a: the first number.
            b: the second number.
        \"\"\"
        return a + b

    registry = ToolRegistry()
    registry.register(add)
    request.tools = registry.specs()                 # list[ToolSpec]
    result = await registry.call(tool_call)          # ToolResult, never raises
    messages.append(result.to_message())

The code workbench (:class:`CodeWorkbench`) registers read-only analysis
tools for Python source under the ``code`` namespace; the search workbench
(:class:`SearchWorkbench`) registers hybrid, dense, keyword, filtered and
reranked search over a RAG index under the ``search`` namespace.
"""

from conclave.tools.code import CodeWorkbench
from conclave.tools.errors import (
    StrictSchemaError,
    ToolDefinitionError,
    ToolNotFound,
    WorkbenchError,
)
from conclave.tools.registry import Namespace, ToolErrorKind, ToolRegistry, ToolResult
from conclave.tools.schema import inline_refs, parse_docstring, to_strict
from conclave.tools.search import SearchHit, SearchResults, SearchWorkbench
from conclave.tools.tool import (
    FunctionTool,
    SchemaTool,
    Tool,
    legal_name,
    mangle,
    tool,
    unmangle,
)

__all__ = [
    "CodeWorkbench",
    "FunctionTool",
    "Namespace",
    "SchemaTool",
    "SearchHit",
    "SearchResults",
    "SearchWorkbench",
    "StrictSchemaError",
    "Tool",
    "ToolDefinitionError",
    "ToolErrorKind",
    "ToolNotFound",
    "ToolRegistry",
    "ToolResult",
    "WorkbenchError",
    "inline_refs",
    "legal_name",
    "mangle",
    "parse_docstring",
    "to_strict",
    "tool",
    "unmangle",
]
