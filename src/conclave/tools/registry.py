"""The tool registry: what an agent offers a model, and the one way a tool call runs.

``registry.specs(...)`` gives the tools to put in a request;
``await registry.call(tool_call)`` runs one call and always returns a
:class:`ToolResult`.  It never raises for anything the *model* got wrong (an
unknown name, broken JSON, bad arguments) or for a failing tool body: each
becomes an error result whose text tells the model what to fix, because a
raised exception would end the agent's run where a readable error lets the
model correct itself on the next step.

Limits, per tool: a timeout (async bodies are cancelled; a sync body runs in a
worker thread that cannot be killed, so its result is discarded and its
concurrency slot stays taken until the thread ends) and a maximum number of
simultaneous calls (an asyncio semaphore; calls beyond it wait their turn and
the wait does not count against the timeout).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, Field

from conclave.errors import ConclaveError
from conclave.llm.types import Message, Role, ToolCall, ToolSpec
from conclave.tools.errors import ToolDefinitionError, ToolNotFound
from conclave.tools.tool import (
    FunctionTool,
    InvalidArguments,
    Strict,
    Tool,
    check_name,
    tool,
    unmangle,
)

log = logging.getLogger("conclave.tools")

#: why a call failed, for agents and telemetry (the content says it for the model)
ToolErrorKind = Literal["unknown_tool", "invalid_json", "invalid_arguments", "timeout",
                        "exception"]


class ToolResult(BaseModel):
    """The outcome of one tool call: text for the model, and how it went."""

    call_id: str
    #: the wire name of the tool (what the model called), or the unknown name it used
    name: str
    content: str
    is_error: bool = False
    error_kind: ToolErrorKind | None = None
    duration_ms: float = 0.0
    #: the Python value the tool returned (not serialised; for callers in Python)
    value: Any = Field(default=None, exclude=True, repr=False)

    def to_message(self) -> Message:
        """The ``role=tool`` message answering the call, for the next model turn."""
        return Message(role=Role.TOOL, content=self.content, tool_call_id=self.call_id,
                       name=self.name)


class _TimedOut(Exception):
    """Internal: the tool did not finish in time (distinct from a TimeoutError it raises)."""


class ToolRegistry:
    """Tools by name, their specs for a request, and :meth:`call`.

    Args:
        default_timeout_s: the timeout of tools that set none (None: no limit).
        max_result_chars: longer results are cut to this many characters, with
            a note saying so (a huge tool output would crowd out the context).
        max_threads: worker threads for sync tool bodies; a registry has its
            own pool so a hung tool cannot starve the event loop's default
            executor (which DNS lookups use).
    """

    def __init__(self, *, default_timeout_s: float | None = 60.0,
                 max_result_chars: int = 50_000, max_threads: int = 8) -> None:
        if default_timeout_s is not None and not default_timeout_s > 0:
            raise ToolDefinitionError(f"default_timeout_s must be > 0, got {default_timeout_s}",
                                      hint="use None for no timeout")
        if max_result_chars < 100:
            raise ToolDefinitionError(f"max_result_chars must be >= 100, got {max_result_chars}")
        self.default_timeout_s = default_timeout_s
        self.max_result_chars = max_result_chars
        self._max_threads = max(1, max_threads)
        self._tools: dict[str, Tool] = {}
        self._pool: ThreadPoolExecutor | None = None

    # --- registration --------------------------------------------------------------

    def register(self, obj: Tool | Callable[..., Any], *, namespace: str | None = None,
                 replace: bool = False, **options: Any) -> Tool:
        """Add a tool (or a function, made into one with ``options`` as for :func:`tool`).

        ``namespace`` puts the tool (a copy, if it had another) under that
        namespace.  Registering a name twice is an error unless ``replace``.
        """
        if isinstance(obj, Tool):
            if options:
                raise ToolDefinitionError(
                    f"options {sorted(options)} given for {obj!r}, which is already a tool",
                    hint="pass options to @tool(...) when making it")
            t = obj
        elif callable(obj):
            t = tool(obj, **options)
        else:
            raise ToolDefinitionError(f"cannot register {obj!r}: not a tool or a function")
        if namespace is not None and t.namespace != namespace:
            t = t.with_namespace(namespace)
        key = t.qualified_name
        if key in self._tools and not replace and self._tools[key] is not t:
            raise ToolDefinitionError(f"a tool named {key!r} is already registered",
                                      hint="pick another name or namespace, or pass "
                                           "replace=True")
        self._tools[key] = t
        return t

    def tool(self, func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Decorator: ``@registry.tool`` or ``@registry.tool(name=..., namespace=...)``.

        Registers the tool and returns it (it stays callable as the function).
        """
        if func is not None:
            return self.register(func, **options)
        return lambda f: self.register(f, **options)

    def namespace(self, name: str) -> Namespace:
        """A view that registers and lists tools under ``name`` (e.g. ``"mcp.github"``)."""
        return Namespace(self, check_name(name, what="namespace"))

    def unregister(self, name: str) -> Tool:
        """Remove one tool (qualified or wire name); return it."""
        t = self.get(name)
        del self._tools[t.qualified_name]
        return t

    def remove_namespace(self, namespace: str) -> list[str]:
        """Remove every tool in ``namespace`` and below (an MCP server went away)."""
        gone = [t.qualified_name for t in self.tools(namespace)]
        for key in gone:
            del self._tools[key]
        return gone

    # --- lookup --------------------------------------------------------------------

    def tools(self, namespace: str | Sequence[str] | None = None, *,
              names: Iterable[str] | None = None) -> list[Tool]:
        """Registered tools in name order, optionally filtered.

        ``namespace`` keeps tools in it or below it (``"mcp"`` includes
        ``mcp.github``); ``names`` keeps tools with those qualified or wire names.
        """
        found = sorted(self._tools.values(), key=lambda t: t.qualified_name)
        if namespace is not None:
            spaces = [namespace] if isinstance(namespace, str) else list(namespace)
            found = [t for t in found if any(_within(t.namespace, ns) for ns in spaces)]
        if names is not None:
            wanted = set(names)
            found = [t for t in found if t.qualified_name in wanted or t.wire_name in wanted]
        return found

    def names(self, namespace: str | Sequence[str] | None = None) -> list[str]:
        """Qualified names of the registered tools (``code.outline``, ...)."""
        return [t.qualified_name for t in self.tools(namespace)]

    def lookup(self, name: str) -> Tool | None:
        """The tool a model meant by ``name``, or None.

        Accepts the wire name (``code__outline``), the qualified name
        (``code.outline``) and, when exactly one tool has it, the bare name
        (``outline``): weak models often drop the namespace.
        """
        t = self._tools.get(name) or self._tools.get(unmangle(name))
        if t is not None:
            return t
        bare = [t for t in self._tools.values() if t.name == name]
        return bare[0] if len(bare) == 1 else None

    def get(self, name: str) -> Tool:
        """Like :meth:`lookup`, but raises :class:`ToolNotFound` naming close matches."""
        t = self.lookup(name)
        if t is None:
            raise ToolNotFound(f"no tool named {name!r}", hint=self._suggest(name))
        return t

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.lookup(name) is not None

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self.tools())

    def _suggest(self, name: str) -> str:
        wires = [t.wire_name for t in self.tools()]
        if not wires:
            return "no tools are registered"
        by_key: dict[str, str] = {}
        for t in self._tools.values():
            for key in (t.wire_name, t.qualified_name, t.name):
                by_key.setdefault(key.lower(), t.wire_name)
        close = difflib.get_close_matches(name.lower(), list(by_key), n=6, cutoff=0.6)
        matches = list(dict.fromkeys(by_key[c] for c in close))[:3]
        shown = ", ".join(wires[:30]) + (f" (and {len(wires) - 30} more)" if len(wires) > 30
                                         else "")
        if matches:
            return f"did you mean {', '.join(matches)}? Available tools: {shown}"
        return f"available tools: {shown}"

    # --- specs ---------------------------------------------------------------------

    def specs(self, namespace: str | Sequence[str] | None = None, *,
              names: Iterable[str] | None = None, strict: Strict = False,
              inline_refs: bool = False) -> list[ToolSpec]:
        """:class:`~conclave.llm.types.ToolSpec` list for a ``ChatRequest.tools``.

        ``strict=True`` shapes every schema for OpenAI strict mode (raising
        :class:`~conclave.tools.StrictSchemaError` for one that cannot be);
        ``"auto"`` does so where possible.  ``inline_refs`` gives self-contained
        schemas (for llama.cpp grammars).
        """
        return [t.to_spec(strict=strict, inline_refs=inline_refs)
                for t in self.tools(namespace, names=names)]

    def openai_tools(self, namespace: str | Sequence[str] | None = None, *,
                     names: Iterable[str] | None = None, strict: Strict = False,
                     inline_refs: bool = False) -> list[dict[str, Any]]:
        """The ``tools`` array of an OpenAI Chat Completions request."""
        return [t.openai_schema(strict=strict, inline_refs=inline_refs)
                for t in self.tools(namespace, names=names)]

    def anthropic_tools(self, namespace: str | Sequence[str] | None = None, *,
                        names: Iterable[str] | None = None,
                        inline_refs: bool = False) -> list[dict[str, Any]]:
        """The ``tools`` array of an Anthropic Messages request."""
        return [t.anthropic_schema(inline_refs=inline_refs)
                for t in self.tools(namespace, names=names)]

    def tool_call_schema(self, namespace: str | Sequence[str] | None = None, *,
                         names: Iterable[str] | None = None) -> dict[str, Any]:
        """A JSON schema for *one tool call*: ``{"name": ..., "arguments": {...}}``.

        For constrained decoding (llama.cpp ``response_format``/grammar): a weak
        model decoding under this schema can only produce a call to a
        registered tool with arguments of the right shape.  Schemas are
        inlined; definitions that must stay (recursive models) are merged.
        """
        variants: list[dict[str, Any]] = []
        defs: dict[str, Any] = {}
        for t in self.tools(namespace, names=names):
            params = t.parameters_schema(inline_refs=True)
            for key, value in params.pop("$defs", {}).items():
                if key in defs and defs[key] != value:
                    raise ToolDefinitionError(
                        f"two tools define different recursive types named {key!r}",
                        hint="rename one of the models")
                defs[key] = value
            variants.append({"type": "object",
                             "properties": {"name": {"const": t.wire_name},
                                            "arguments": params},
                             "required": ["name", "arguments"],
                             "additionalProperties": False})
        if not variants:
            raise ToolDefinitionError("no tools match, so no tool call is possible",
                                      hint="register tools or widen the filter")
        schema: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
        if defs:
            schema = {**schema, "$defs": defs}
        return schema

    # --- calling -------------------------------------------------------------------

    async def call(self, call: ToolCall) -> ToolResult:
        """Run one tool call and return its result; never raises for the model's mistakes.

        Only cancellation of the caller propagates (the tool is cancelled too).
        """
        started = time.perf_counter()

        def done(content: str, name: str, *, kind: ToolErrorKind | None = None,
                 value: Any = None) -> ToolResult:
            return ToolResult(call_id=call.id, name=name, content=content,
                              is_error=kind is not None, error_kind=kind,
                              duration_ms=round((time.perf_counter() - started) * 1000, 3),
                              value=value)

        t = self.lookup(call.name)
        if t is None:
            return done(f"Unknown tool `{call.name}`: {self._suggest(call.name)}.", call.name,
                        kind="unknown_tool")
        name = t.wire_name
        if call.raw_arguments is not None and not call.arguments:
            raw = call.raw_arguments.strip()
            raw = raw if len(raw) <= 300 else raw[:297] + "..."
            return done(f"The arguments for `{name}` were not a valid JSON object: {raw}\n"
                        f"Send them as one JSON object. Expected arguments: "
                        f"{t.signature_text()}.", name, kind="invalid_json")
        try:
            prepared = t.prepare(call.arguments)
        except InvalidArguments as exc:
            return done(exc.message, name, kind="invalid_arguments")
        timeout = t.timeout_s if t.timeout_s is not None else self.default_timeout_s
        try:
            value = await self._run(t, prepared, timeout)
        except _TimedOut:
            stopped = "was cancelled" if t.is_async else "is abandoned (its result is discarded)"
            return done(f"Tool `{name}` timed out after {timeout:g} s and {stopped}. "
                        "Try a smaller input or another approach.", name, kind="timeout")
        except Exception as exc:
            if not isinstance(exc, ConclaveError):
                log.warning("tool %s raised %s", t.qualified_name, type(exc).__name__,
                            exc_info=exc)
            text = str(exc).strip() or "(no message)"
            return done(f"Tool `{name}` failed: {type(exc).__name__}: {text}", name,
                        kind="exception")
        return done(self._render(value), name, value=value)

    async def call_many(self, calls: Iterable[ToolCall]) -> list[ToolResult]:
        """Run several calls (one model turn's parallel calls) concurrently, in order."""
        return list(await asyncio.gather(*(self.call(c) for c in calls)))

    async def invoke(self, name: str, /, **arguments: Any) -> ToolResult:
        """Call a tool from Python: ``await registry.invoke("code.outline", path="a.py")``."""
        return await self.call(ToolCall(id=f"py-{time.monotonic_ns()}", name=name,
                                        arguments=arguments))

    async def _run(self, t: Tool, prepared: Any, limit_s: float | None) -> Any:
        """Run the body under the tool's concurrency limit and timeout.

        The slot is released when the body has really stopped, not when we
        stop waiting for it, so a timed-out thread still counts against the limit.
        """
        sem = t.limiter()
        if sem is not None:
            await sem.acquire()
        task = asyncio.ensure_future(t.invoke(prepared, self._executor()))

        def release(finished: asyncio.Future[Any]) -> None:
            if sem is not None:
                sem.release()
            if not finished.cancelled():
                finished.exception()  # retrieved: no "exception was never retrieved" noise

        try:
            await asyncio.wait({task}, timeout=limit_s)
        except asyncio.CancelledError:
            task.cancel()
            task.add_done_callback(release)
            raise
        if not task.done():
            if t.is_async:
                task.cancel()
            task.add_done_callback(release)
            raise _TimedOut
        release(task)
        return task.result()

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._max_threads,
                                            thread_name_prefix="conclave-tool")
        return self._pool

    def _render(self, value: Any) -> str:
        if isinstance(value, str):
            text = value
        elif isinstance(value, BaseModel):
            text = value.model_dump_json()
        else:
            text = pydantic_core.to_json(value, fallback=repr).decode()
        if len(text) > self.max_result_chars:
            keep = self.max_result_chars
            text = (f"{text[:keep]}\n...[truncated: {len(text):,} characters in total, "
                    f"showing the first {keep:,}]")
        return text

    # --- lifecycle -----------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the worker threads (running sync bodies finish on their own)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def __aenter__(self) -> ToolRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _within(namespace: str | None, ns: str) -> bool:
    if not ns:
        return namespace is None
    return namespace is not None and (namespace == ns or namespace.startswith(ns + "."))


class Namespace:
    """Tools of one namespace in a registry: ``registry.namespace("mcp.github")``."""

    def __init__(self, registry: ToolRegistry, name: str) -> None:
        self.registry = registry
        self.name = name

    def register(self, obj: Tool | Callable[..., Any], *, replace: bool = False,
                 **options: Any) -> Tool:
        """Register ``obj`` under this namespace (a tool with another namespace is copied)."""
        return self.registry.register(obj, namespace=self.name, replace=replace, **options)

    def tool(self, func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Decorator registering a function as a tool of this namespace."""
        if func is not None:
            return self.register(func, **options)
        return lambda f: self.register(f, **options)

    def namespace(self, name: str) -> Namespace:
        """A nested namespace: ``registry.namespace("mcp").namespace("github")``."""
        return self.registry.namespace(f"{self.name}.{name}")

    def tools(self) -> list[Tool]:
        return self.registry.tools(self.name)

    def names(self) -> list[str]:
        return self.registry.names(self.name)

    def specs(self, **kwargs: Any) -> list[ToolSpec]:
        return self.registry.specs(self.name, **kwargs)

    def remove(self) -> list[str]:
        """Remove every tool of this namespace from the registry."""
        return self.registry.remove_namespace(self.name)

    def __repr__(self) -> str:
        return f"<Namespace {self.name} ({len(self.tools())} tools)>"


__all__ = ["FunctionTool", "Namespace", "ToolErrorKind", "ToolRegistry", "ToolResult"]
