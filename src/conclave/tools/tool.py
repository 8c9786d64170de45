"""One tool: its names, its schema in each provider's format, and argument checking.

:func:`tool` makes a :class:`FunctionTool` from a typed Python function.
:class:`SchemaTool` wraps a handler whose arguments are described by a JSON
schema someone else wrote (an MCP server's tool), so such tools can join a
registry next to Python ones.

Names.  A tool has a short ``name`` and an optional dotted ``namespace``
(``mcp.github``); its ``qualified_name`` joins them (``mcp.github.search``).
Providers only accept ``^[a-zA-Z0-9_-]{1,64}$``, so the name sent on the wire
replaces each dot with a double underscore (``mcp__github__search``).  Name
segments may not contain ``__`` or start or end with ``_``, which makes the
mapping reversible: :func:`unmangle` gives back the dotted name.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import functools
import inspect
import json
import re
import weakref
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Any, Literal, TypeVar, overload

import pydantic

from conclave.llm.types import ToolSpec
from conclave.tools.errors import StrictSchemaError, ToolDefinitionError
from conclave.tools.schema import (
    Arguments,
    build_arguments,
    check_json,
    clean_schema,
    describe_type,
    drop_null_defaults,
    inline_refs,
    parse_docstring,
    subschema,
    to_strict,
)

F = TypeVar("F", bound=Callable[..., Any])

_SEGMENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]|_(?!_))*(?<!_)")
_WIRE = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: what :meth:`Tool.parameters_schema` accepts for ``strict``
Strict = bool | Literal["auto"]


def mangle(qualified_name: str) -> str:
    """``mcp.github.search`` -> ``mcp__github__search`` (the provider-legal wire name)."""
    return qualified_name.replace(".", "__")


def unmangle(wire_name: str) -> str:
    """``mcp__github__search`` -> ``mcp.github.search``: the inverse of :func:`mangle`."""
    return wire_name.replace("__", ".")


def legal_name(text: str) -> str:
    """A valid name segment made from arbitrary text (an MCP server's tool name, say).

    Characters outside ``[A-Za-z0-9-]`` become single underscores, runs of
    underscores collapse, and leading/trailing underscores go.
    """
    out = re.sub(r"[^A-Za-z0-9-]+", "_", text).strip("_")
    out = re.sub(r"_{2,}", "_", out)
    return out or "tool"


def check_name(name: str, *, what: str = "tool name") -> str:
    """Validate a dotted name (a namespace, or a tool name); return it unchanged."""
    if not name or any(not _SEGMENT.fullmatch(seg) for seg in name.split(".")):
        raise ToolDefinitionError(
            f"{what} {name!r} is not valid: each dot-separated part must be letters, digits, "
            "'-' or single '_', not starting or ending with '_'",
            hint=f"pass a valid name, e.g. {legal_name(name.replace('.', '_'))!r} "
                 "(conclave.tools.legal_name makes one from any text)")
    return name


class InvalidArguments(Exception):
    """Raised by :meth:`Tool.prepare`: ``message`` is written for the model."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Tool:
    """Base class: names, limits and schemas.  Subclasses validate and invoke."""

    #: whether the body runs on the event loop (True) or in a worker thread (False)
    is_async: bool = True

    def __init__(self, *, name: str, description: str, parameters: dict[str, Any],
                 namespace: str | None = None, timeout_s: float | None = None,
                 max_concurrency: int | None = None) -> None:
        check_name(name)
        if "." in name:
            raise ToolDefinitionError(f"tool name {name!r} contains a dot",
                                      hint="put the dotted part in namespace=")
        if namespace is not None:
            check_name(namespace, what="namespace")
        if timeout_s is not None and not timeout_s > 0:
            raise ToolDefinitionError(f"tool {name!r}: timeout_s must be > 0, got {timeout_s}",
                                      hint="leave it None to use the registry's default")
        if max_concurrency is not None and max_concurrency < 1:
            raise ToolDefinitionError(
                f"tool {name!r}: max_concurrency must be >= 1, got {max_concurrency}",
                hint="leave it None for no limit")
        if parameters.get("type") != "object":
            raise ToolDefinitionError(f"tool {name!r}: its parameters schema must be an object "
                                      "schema ({'type': 'object', ...})")
        self.name = name
        self.namespace = namespace
        self.description = description
        self.parameters = parameters
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self._check_wire_length()
        self._schemas: dict[tuple[bool, bool], dict[str, Any]] = {}
        self._limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
        self._limiters = weakref.WeakKeyDictionary()

    def _check_wire_length(self) -> None:
        if not _WIRE.fullmatch(self.wire_name):
            raise ToolDefinitionError(
                f"tool {self.qualified_name!r} is sent as {self.wire_name!r}, "
                f"{len(self.wire_name)} characters: providers accept at most 64",
                hint="use a shorter tool name or namespace")

    # --- names ---------------------------------------------------------------------

    @property
    def qualified_name(self) -> str:
        """``namespace.name``, or just ``name`` without a namespace."""
        return f"{self.namespace}.{self.name}" if self.namespace else self.name

    @property
    def wire_name(self) -> str:
        """The provider-legal name the model sees and calls (see :func:`mangle`)."""
        return mangle(self.qualified_name)

    def with_namespace(self, namespace: str | None) -> Tool:
        """A copy of this tool under another namespace (its own concurrency limit)."""
        if namespace is not None:
            check_name(namespace, what="namespace")
        clone = copy.copy(self)
        clone.namespace = namespace
        clone._check_wire_length()
        clone._limiters = weakref.WeakKeyDictionary()
        return clone

    # --- schemas -------------------------------------------------------------------

    def parameters_schema(self, *, strict: bool = False,
                          inline_refs: bool = False) -> dict[str, Any]:
        """The arguments schema; ``strict`` for OpenAI strict mode, ``inline_refs`` self-contained.

        Raises :class:`StrictSchemaError` when ``strict`` is asked and the
        arguments cannot be expressed in the strict subset.
        """
        key = (strict, inline_refs)
        if key not in self._schemas:
            schema = self.parameters
            if strict:
                try:
                    schema = to_strict(schema)
                except StrictSchemaError as exc:
                    raise StrictSchemaError(f"tool {self.qualified_name!r}: {exc.message}",
                                            hint=exc.hint) from exc
            if inline_refs:
                schema = _inline(schema)
            self._schemas[key] = schema
        return copy.deepcopy(self._schemas[key])

    @property
    def strict_problem(self) -> str | None:
        """Why this tool cannot use OpenAI strict mode, or None when it can."""
        try:
            self.parameters_schema(strict=True)
        except StrictSchemaError as exc:
            return exc.message
        return None

    def _strict(self, strict: Strict) -> bool:
        if strict == "auto":
            return self.strict_problem is None
        return bool(strict)

    def openai_schema(self, *, strict: Strict = False,
                      inline_refs: bool = False) -> dict[str, Any]:
        """``{"type": "function", "function": {name, description, parameters[, strict]}}``.

        ``strict="auto"`` turns strict mode on only where the schema allows it.
        """
        use_strict = self._strict(strict)
        function: dict[str, Any] = {
            "name": self.wire_name,
            "description": self.description,
            "parameters": self.parameters_schema(strict=use_strict, inline_refs=inline_refs),
        }
        if use_strict:
            function["strict"] = True
        return {"type": "function", "function": function}

    def anthropic_schema(self, *, inline_refs: bool = False) -> dict[str, Any]:
        """``{"name", "description", "input_schema"}``, Anthropic's Messages API format."""
        return {"name": self.wire_name, "description": self.description,
                "input_schema": self.parameters_schema(inline_refs=inline_refs)}

    def to_spec(self, *, strict: Strict = False, inline_refs: bool = False) -> ToolSpec:
        """The provider-neutral :class:`~conclave.llm.types.ToolSpec` the gateway takes."""
        return ToolSpec(name=self.wire_name, description=self.description,
                        parameters=self.parameters_schema(strict=self._strict(strict),
                                                          inline_refs=inline_refs))

    def signature_text(self) -> str:
        """``query (string, required), limit (integer, default 10)``: for error messages."""
        props = self.parameters.get("properties", {})
        required = set(self.parameters.get("required", []))
        parts = []
        for key, sub in props.items():
            kind = describe_type(sub, self.parameters)
            if key in required:
                parts.append(f"{key} ({kind}, required)")
            elif isinstance(sub, dict) and "default" in sub:
                parts.append(f"{key} ({kind}, default {json.dumps(sub['default'])})")
            else:
                parts.append(f"{key} ({kind}, optional)")
        return ", ".join(parts) if parts else "no arguments"

    # --- calling -------------------------------------------------------------------

    def limiter(self) -> asyncio.Semaphore | None:
        """This tool's concurrency limit on the running loop (None: unlimited)."""
        if self.max_concurrency is None:
            return None
        loop = asyncio.get_running_loop()
        sem = self._limiters.get(loop)
        if sem is None:
            sem = self._limiters[loop] = asyncio.Semaphore(self.max_concurrency)
        return sem

    def prepare(self, arguments: Mapping[str, Any]) -> Any:
        """Check ``arguments``; return what :meth:`invoke` needs or raise InvalidArguments."""
        raise NotImplementedError

    async def invoke(self, prepared: Any, executor: Executor | None) -> Any:
        """Run the tool body with prepared arguments (sync bodies on ``executor``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.qualified_name}>"


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    return inline_refs(schema)


def _is_async(func: Callable[..., Any]) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None))  # noqa: B004 - an async __call__ counts too


class FunctionTool(Tool):
    """A tool made from a typed Python function; calling it calls the function."""

    def __init__(self, func: Callable[..., Any], *, name: str | None = None,
                 description: str | None = None, namespace: str | None = None,
                 timeout_s: float | None = None, max_concurrency: int | None = None) -> None:
        tool_name = name or getattr(func, "__name__", "")
        if not name and not _SEGMENT.fullmatch(tool_name or "-"):
            raise ToolDefinitionError(
                f"function {tool_name or func!r} cannot name a tool (names are letters, digits, "
                "'-' or single '_', not starting or ending with '_')",
                hint=f"pass name=, e.g. @tool(name={legal_name(tool_name or 'my_tool')!r})")
        check_name(tool_name)  # before the arguments: a bad name is the first thing to fix
        doc = parse_docstring(inspect.getdoc(func))
        arguments: Arguments = build_arguments(func, tool_name=tool_name, param_docs=doc.params)
        super().__init__(name=tool_name, description=(description or doc.description).strip(),
                         parameters=arguments.schema(), namespace=namespace,
                         timeout_s=timeout_s, max_concurrency=max_concurrency)
        self.func = func
        self.arguments = arguments
        self.is_async = _is_async(func)
        functools.update_wrapper(self, func, updated=())  # type: ignore[arg-type]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the underlying function directly, as if it were not a tool."""
        return self.func(*args, **kwargs)

    def prepare(self, arguments: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        cleaned = drop_null_defaults(dict(arguments), self.parameters)
        try:
            values = self.arguments.model.model_validate(cleaned)
        except pydantic.ValidationError as exc:
            raise InvalidArguments(validation_message(self, exc)) from exc
        except Exception as exc:  # a custom validator raising something pydantic does not wrap
            raise InvalidArguments(
                f"Invalid arguments for tool `{self.wire_name}`: {type(exc).__name__}: {exc}\n"
                f"Expected arguments: {self.signature_text()}.") from exc
        return self.arguments.bind(values)

    async def invoke(self, prepared: tuple[list[Any], dict[str, Any]],
                     executor: Executor | None) -> Any:
        args, kwargs = prepared
        if self.is_async:
            value = await self.func(*args, **kwargs)
        else:
            loop = asyncio.get_running_loop()
            ctx = contextvars.copy_context()
            call = functools.partial(ctx.run, self.func, *args, **kwargs)
            value = await loop.run_in_executor(executor, call)
        if inspect.isawaitable(value):
            value = await value
        return value


class SchemaTool(Tool):
    """A tool described by a ready-made JSON schema, run by ``handler(arguments)``.

    For tools defined elsewhere (MCP servers): the handler gets the arguments
    dict; a sync handler runs in a worker thread.  Arguments are checked
    against the schema's structure (types, required and unknown properties,
    enums, nested objects and arrays) before the handler runs; keywords beyond
    that (patterns, ranges) are left to the handler's own validation.
    """

    def __init__(self, *, name: str, description: str, parameters: dict[str, Any],
                 handler: Callable[[dict[str, Any]], Awaitable[Any] | Any],
                 namespace: str | None = None, timeout_s: float | None = None,
                 max_concurrency: int | None = None) -> None:
        schema = clean_schema(copy.deepcopy(parameters)) if parameters else {
            "type": "object", "properties": {}}
        super().__init__(name=name, description=description, parameters=schema,
                         namespace=namespace, timeout_s=timeout_s,
                         max_concurrency=max_concurrency)
        self.handler = handler
        self.is_async = _is_async(handler)

    def prepare(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        cleaned = drop_null_defaults(dict(arguments), self.parameters)
        problems = check_json(cleaned, self.parameters)
        if problems:
            lines = [f"Invalid arguments for tool `{self.wire_name}`:"]
            lines += [f"- {p}" for p in problems[:12]]
            lines.append(f"Expected arguments: {self.signature_text()}. "
                         f"Call `{self.wire_name}` again with corrected arguments.")
            raise InvalidArguments("\n".join(lines))
        return cleaned

    async def invoke(self, prepared: dict[str, Any], executor: Executor | None) -> Any:
        if self.is_async:
            value = await self.handler(prepared)  # type: ignore[misc]
        else:
            loop = asyncio.get_running_loop()
            ctx = contextvars.copy_context()
            value = await loop.run_in_executor(executor,
                                               functools.partial(ctx.run, self.handler, prepared))
        if inspect.isawaitable(value):
            value = await value
        return value


# --- the decorator ----------------------------------------------------------------------


@overload
def tool(func: Callable[..., Any], /, *, name: str | None = None,
         description: str | None = None, timeout_s: float | None = None,
         max_concurrency: int | None = None, namespace: str | None = None) -> FunctionTool: ...


@overload
def tool(func: None = None, /, *, name: str | None = None, description: str | None = None,
         timeout_s: float | None = None, max_concurrency: int | None = None,
         namespace: str | None = None) -> Callable[[Callable[..., Any]], FunctionTool]: ...


def tool(func: Callable[..., Any] | None = None, /, *, name: str | None = None,
         description: str | None = None, timeout_s: float | None = None,
         max_concurrency: int | None = None, namespace: str | None = None,
         ) -> FunctionTool | Callable[[Callable[..., Any]], FunctionTool]:
    """Make a tool from a typed function: ``@tool``, ``@tool(name=...)`` or ``tool(fn, ...)``.

    Args:
        func: the function (sync or async); its docstring gives the description
            and, from its Args section, each parameter's description.
        name: the tool's name (default: the function's name).
        description: overrides the docstring's description.
        timeout_s: seconds a call may take (default: the registry's default).
        max_concurrency: how many calls may run at once (default: no limit).
        namespace: dotted namespace, e.g. ``"code"`` or ``"mcp.github"``.
    """

    def make(f: Callable[..., Any]) -> FunctionTool:
        if isinstance(f, Tool):
            raise ToolDefinitionError(f"{f!r} is already a tool",
                                      hint="apply @tool once per function")
        return FunctionTool(f, name=name, description=description, namespace=namespace,
                            timeout_s=timeout_s, max_concurrency=max_concurrency)

    if func is not None:
        return make(func)
    return make


# --- the message a model reads when its arguments are wrong -------------------------------


def validation_message(t: Tool, exc: pydantic.ValidationError) -> str:
    """Which argument, what was expected, what was given; then the whole signature."""
    props = t.parameters.get("properties", {})
    lines = [f"Invalid arguments for tool `{t.wire_name}`:"]
    for err in exc.errors(include_url=False)[:12]:
        loc = _loc(err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "missing":
            node = subschema(t.parameters, tuple(err.get("loc", ())))
            expected = describe_type(node, t.parameters) if node is not None else "a value"
            lines.append(f"- `{loc}`: required argument is missing (expected {expected})")
        elif kind == "extra_forbidden":
            known = ", ".join(props) or "no arguments"
            lines.append(f"- `{loc}`: unexpected argument (this tool takes: {known})")
        else:
            msg = err.get("msg", "invalid value")
            lines.append(f"- `{loc}`: {msg}; got {_short(err.get('input'))}")
    if len(exc.errors()) > 12:
        lines.append(f"- ... and {len(exc.errors()) - 12} more")
    lines.append(f"Expected arguments: {t.signature_text()}. "
                 f"Call `{t.wire_name}` again with corrected arguments.")
    return "\n".join(lines)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "arguments"


def _short(value: Any, limit: int = 120) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
