"""The registry: calls, errors returned to the model, timeouts, concurrency, namespaces."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time

import pytest
from pydantic import BaseModel

from conclave.llm.types import Role, ToolCall
from conclave.tools import (
    SchemaTool,
    ToolDefinitionError,
    ToolNotFound,
    ToolRegistry,
    legal_name,
    mangle,
    tool,
    unmangle,
)


class Item(BaseModel):
    name: str
    qty: int = 1


class Order(BaseModel):
    customer: str
    items: list[Item]


@dataclasses.dataclass
class Receipt:
    total: int
    lines: list[str]


def ident(source: str) -> str:
    """Return the source."""
    return source


def call(name: str, **arguments: object) -> ToolCall:
    return ToolCall(id=f"call-{name}", name=name, arguments=dict(arguments))


# --- sync and async tools -------------------------------------------------------------------


async def test_sync_and_async_tools_run_and_serialise_results() -> None:
    threads: list[str] = []

    @tool
    def place(order: Order, express: bool = False) -> Receipt:
        """Place an order."""
        threads.append(threading.current_thread().name)
        return Receipt(total=sum(i.qty for i in order.items),
                       lines=[f"{i.qty}x {i.name}" for i in order.items])

    @tool
    async def lookup(customer: str) -> Order:
        """Look a customer's last order up."""
        await asyncio.sleep(0)
        return Order(customer=customer, items=[Item(name="tea")])

    registry = ToolRegistry()
    registry.register(place)
    registry.register(lookup)
    assert place.is_async is False and lookup.is_async is True

    result = await registry.call(call("place", order={
        "customer": "ana", "items": [{"name": "tea", "qty": "2"}, {"name": "cake"}]}))
    assert not result.is_error, result.content
    assert json.loads(result.content) == {"total": 3, "lines": ["2x tea", "1x cake"]}
    assert result.value == Receipt(3, ["2x tea", "1x cake"])
    assert result.call_id == "call-place" and result.name == "place"
    assert result.duration_ms > 0
    assert threads and threads[0].startswith("conclave-tool")  # a worker thread, not the loop

    result = await registry.call(call("lookup", customer="bo"))
    assert json.loads(result.content) == {"customer": "bo", "items": [{"name": "tea", "qty": 1}]}

    msg = result.to_message()
    assert msg.role is Role.TOOL
    assert msg.tool_call_id == "call-lookup" and msg.name == "lookup"
    assert msg.content == result.content
    # the decorated function is still an ordinary function
    assert place(Order(customer="c", items=[]), express=True) == Receipt(0, [])
    await registry.aclose()


async def test_plain_values_and_long_results() -> None:
    registry = ToolRegistry(max_result_chars=1_000)

    @registry.tool
    def text() -> str:
        """Some text."""
        return "plain text, not JSON-quoted"

    @registry.tool(name="numbers")
    def many(n: int) -> list[int]:
        """Numbers."""
        return list(range(n))

    assert (await registry.call(call("text"))).content == "plain text, not JSON-quoted"
    short = await registry.call(call("numbers", n=5))
    assert short.content == "[0,1,2,3,4]"
    long = await registry.call(call("numbers", n=2_000))
    assert not long.is_error
    assert long.content.startswith("[0,1,2,")
    full = json.dumps(list(range(2_000)), separators=(",", ":"))
    assert f"truncated: {len(full):,} characters in total, showing the first 1,000" in long.content
    assert len(long.content) < 1_100
    assert long.value == list(range(2_000))  # Python callers still get everything


# --- arguments the model got wrong: returned, never raised -------------------------------------


async def test_validation_errors_are_returned_to_the_model() -> None:
    ran: list[object] = []

    @tool
    def book(room: str, nights: int, order: Order | None = None) -> str:
        """Book a room.

        Args:
            room: the room's name.
            nights: how many nights.
        """
        ran.append(room)
        return "ok"

    registry = ToolRegistry()
    registry.register(book)
    result = await registry.call(call("book", room="blue", nights="three", pets=True))
    assert result.is_error and result.error_kind == "invalid_arguments"
    assert ran == []  # the body never ran
    content = result.content
    assert content.startswith("Invalid arguments for tool `book`:")
    assert "- `nights`: Input should be a valid integer" in content
    assert 'got "three"' in content
    assert "- `pets`: unexpected argument (this tool takes: room, nights, order)" in content
    assert "Expected arguments: room (string, required), nights (integer, required), " \
           "order (object Order or null, default null)" in content

    missing = await registry.call(call("book", room="blue"))
    assert "- `nights`: required argument is missing (expected integer)" in missing.content

    nested = await registry.call(call("book", room="r", nights=1,
                                      order={"customer": "c", "items": [{"qty": "x"}]}))
    assert "- `order.items[0].name`: required argument is missing (expected string)" \
        in nested.content
    assert "- `order.items[0].qty`: Input should be a valid integer" in nested.content

    # the model corrects itself and the call goes through
    fixed = await registry.call(call("book", room="blue", nights="3"))
    assert not fixed.is_error and fixed.content == "ok" and ran == ["blue"]


async def test_broken_json_arguments() -> None:
    registry = ToolRegistry()

    @registry.tool
    def echo(text: str) -> str:
        """Echo."""
        return text

    result = await registry.call(ToolCall(id="1", name="echo", raw_arguments='{"text": "hi'))
    assert result.is_error and result.error_kind == "invalid_json"
    assert "not a valid JSON object: {\"text\": \"hi" in result.content
    assert "text (string, required)" in result.content


async def test_null_for_a_defaulted_argument_means_the_default() -> None:
    registry = ToolRegistry()

    @registry.tool
    def page(query: str, limit: int = 10, cursor: str | None = "start") -> str:
        """Page."""
        return f"{query}:{limit}:{cursor}"

    # what strict-mode models send for arguments they leave out
    result = await registry.call(call("page", query="q", limit=None, cursor=None))
    assert result.content == "q:10:None"  # limit falls back; cursor accepts None itself
    bad = await registry.call(call("page", query=None))
    assert bad.is_error and "`query`" in bad.content


async def test_unknown_tool_names_the_closest() -> None:
    registry = ToolRegistry()
    registry.namespace("code").register(tool(ident, name="outline"))
    registry.namespace("code").register(tool(ident, name="complexity"))
    result = await registry.call(call("code_outline", source="x"))
    assert result.is_error and result.error_kind == "unknown_tool"
    assert result.content.startswith("Unknown tool `code_outline`: did you mean code__outline?")
    assert "Available tools: code__complexity, code__outline" in result.content
    with pytest.raises(ToolNotFound, match="no tool named 'nope'"):
        registry.get("nope")


# --- failures inside the tool ----------------------------------------------------------------


async def test_exception_in_the_body_becomes_an_error_result() -> None:
    registry = ToolRegistry()

    @registry.tool
    def divide(a: int, b: int) -> float:
        """Divide."""
        return a / b

    @registry.tool
    async def explode(reason: str) -> str:
        """Raise."""
        raise RuntimeError(reason)

    result = await registry.call(call("divide", a=1, b=0))
    assert result.is_error and result.error_kind == "exception"
    assert result.content == "Tool `divide` failed: ZeroDivisionError: division by zero"
    result = await registry.call(call("explode", reason="disk on fire"))
    assert result.content == "Tool `explode` failed: RuntimeError: disk on fire"
    assert "Traceback" not in result.content and "File " not in result.content
    assert (await registry.call(call("divide", a=6, b=3))).content == "2.0"


async def test_async_timeout_cancels_the_tool() -> None:
    registry = ToolRegistry()
    state: dict[str, bool] = {}

    @registry.tool(timeout_s=0.2)
    async def slow(seconds: float) -> str:
        """Sleep."""
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        return "done"

    started = time.perf_counter()
    result = await registry.call(call("slow", seconds=5))
    elapsed = time.perf_counter() - started
    assert result.is_error and result.error_kind == "timeout"
    assert result.content.startswith("Tool `slow` timed out after 0.2 s and was cancelled.")
    assert 0.15 < elapsed < 1.5
    await asyncio.sleep(0.05)
    assert state == {"cancelled": True}
    assert (await registry.call(call("slow", seconds=0.01))).content == "done"


async def test_sync_timeout_keeps_the_slot_until_the_thread_ends() -> None:
    registry = ToolRegistry()
    release = threading.Event()
    finished = threading.Event()

    @registry.tool(timeout_s=0.2, max_concurrency=1)
    def block(wait: bool) -> str:
        """Block until released."""
        if wait:
            release.wait(10)
            finished.set()
        return "ran"

    result = await registry.call(call("block", wait=True))
    assert result.error_kind == "timeout"
    assert "is abandoned (its result is discarded)" in result.content
    # the thread still runs and holds the only slot: a second call has to wait for it
    second = asyncio.ensure_future(registry.call(call("block", wait=False)))
    await asyncio.sleep(0.3)
    assert not second.done()
    release.set()
    out = await asyncio.wait_for(second, 5)
    assert finished.is_set()
    assert out.content == "ran" and not out.is_error
    await registry.aclose()


async def test_registry_default_timeout_applies() -> None:
    registry = ToolRegistry(default_timeout_s=0.1)

    @registry.tool
    async def wait(seconds: float) -> str:
        """Wait."""
        await asyncio.sleep(seconds)
        return "ok"

    assert (await registry.call(call("wait", seconds=2))).error_kind == "timeout"
    assert (await registry.call(call("wait", seconds=0))).content == "ok"


# --- concurrency ---------------------------------------------------------------------------


class Gauge:
    """Counts bodies running at once; the highest count is what the limit must cap."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


async def test_concurrency_limit_caps_simultaneous_async_calls() -> None:
    registry = ToolRegistry()
    limited, free = Gauge(), Gauge()

    @registry.tool(max_concurrency=2)
    async def capped(i: int) -> int:
        """Capped."""
        limited.enter()
        await asyncio.sleep(0.05)
        limited.leave()
        return i

    @registry.tool
    async def uncapped(i: int) -> int:
        """Uncapped."""
        free.enter()
        await asyncio.sleep(0.05)
        free.leave()
        return i

    started = time.perf_counter()
    results = await registry.call_many([call("capped", i=i) for i in range(6)])
    elapsed = time.perf_counter() - started
    assert [r.content for r in results] == [str(i) for i in range(6)]  # order kept
    assert limited.peak == 2
    assert elapsed >= 0.14  # three waves of two
    await registry.call_many([call("uncapped", i=i) for i in range(6)])
    assert free.peak == 6  # the gauge can see more than two at once


async def test_concurrency_limit_caps_sync_calls_in_threads() -> None:
    registry = ToolRegistry(max_threads=8)
    gauge = Gauge()

    @registry.tool(max_concurrency=3)
    def work(i: int) -> int:
        """Work."""
        gauge.enter()
        time.sleep(0.05)
        gauge.leave()
        return i

    results = await registry.call_many([call("work", i=i) for i in range(9)])
    assert all(not r.is_error for r in results)
    assert gauge.peak == 3
    await registry.aclose()


async def test_caller_cancellation_cancels_the_tool() -> None:
    registry = ToolRegistry()
    state: dict[str, bool] = {}

    @registry.tool
    async def long(seconds: float) -> str:
        """Long."""
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        return "done"

    task = asyncio.ensure_future(registry.call(call("long", seconds=5)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert state == {"cancelled": True}


# --- namespaces and names ------------------------------------------------------------------


async def test_namespaces_and_name_mangling_round_trip() -> None:
    registry = ToolRegistry()
    github = registry.namespace("mcp.github")

    @github.tool
    def search(query: str) -> str:
        """Search GitHub."""
        return f"found {query}"

    @registry.tool(namespace="code")
    def outline(source: str) -> str:
        """Outline."""
        return source

    t = registry.get("mcp.github.search")
    assert t.qualified_name == "mcp.github.search"
    assert t.wire_name == "mcp__github__search"
    assert unmangle(t.wire_name) == t.qualified_name
    assert registry.names() == ["code.outline", "mcp.github.search"]
    assert [s.name for s in registry.specs(namespace="mcp")] == ["mcp__github__search"]
    assert [s.name for s in registry.specs(namespace="mcp.github")] == ["mcp__github__search"]
    assert [s.name for s in registry.specs(namespace=["code", "mcp"])] == [
        "code__outline", "mcp__github__search"]
    assert registry.specs(namespace="mc") == []  # segments, not string prefixes
    assert [s.name for s in registry.specs(names=["code__outline"])] == ["code__outline"]
    assert [a["name"] for a in registry.anthropic_tools()] == ["code__outline",
                                                               "mcp__github__search"]
    assert [o["function"]["name"] for o in registry.openai_tools(strict=True)] == [
        "code__outline", "mcp__github__search"]

    # the model calls with the wire name; the qualified and (unique) bare names work too
    for name in ("mcp__github__search", "mcp.github.search", "search"):
        result = await registry.call(call(name, query="x"))
        assert result.content == "found x" and result.name == "mcp__github__search"

    # a nested namespace view, and removing a whole namespace (an MCP server leaving)
    registry.namespace("mcp").namespace("linear").register(tool(search.func, name="search"))
    assert "search" not in registry  # now ambiguous as a bare name
    assert len(registry) == 3
    assert registry.remove_namespace("mcp") == ["mcp.github.search", "mcp.linear.search"]
    assert registry.names() == ["code.outline"]


def test_mangling_is_reversible_and_names_are_checked() -> None:
    for qualified in ("a", "code.outline", "mcp.git-hub.search_issues", "x1.y2.z3"):
        assert unmangle(mangle(qualified)) == qualified
    registry = ToolRegistry()
    for bad in ("bad__name", "_private", "trailing_", "has space", "dot.", ""):
        with pytest.raises(ToolDefinitionError):
            registry.namespace(bad)
    assert legal_name("GitHub: search issues!") == "GitHub_search_issues"
    assert legal_name("__x__y__") == "x_y"
    registry.namespace(legal_name("weird//server name")).register(
        tool(ident, name=legal_name("list.all")))
    assert registry.names() == ["weird_server_name.list_all"]


def test_duplicates_are_refused_unless_replaced() -> None:
    registry = ToolRegistry()

    @registry.tool
    def ping(x: int) -> int:
        """Ping."""
        return x

    with pytest.raises(ToolDefinitionError, match="already registered"):
        registry.register(tool(ping.func, name="ping"))
    again = registry.register(tool(ping.func, name="ping"), replace=True)
    registry.register(again)  # the same object again is harmless
    assert len(registry) == 1
    removed = registry.unregister("ping")
    assert removed.name == "ping" and len(registry) == 0


# --- tools from a foreign JSON schema (MCP) ------------------------------------------------


async def test_schema_tool_checks_structure_and_runs_the_handler() -> None:
    seen: list[dict[str, object]] = []

    async def handler(arguments: dict[str, object]) -> dict[str, object]:
        seen.append(arguments)
        return {"issues": [arguments["query"]]}

    remote = SchemaTool(
        name="search_issues", namespace="mcp.github", description="Search issues.",
        handler=handler,
        parameters={"type": "object", "title": "Args",
                    "properties": {"query": {"type": "string"},
                                   "state": {"type": "string", "enum": ["open", "closed"]},
                                   "labels": {"type": "array", "items": {"type": "string"}},
                                   "limit": {"type": "integer", "default": 10}},
                    "required": ["query"], "additionalProperties": False})
    registry = ToolRegistry()
    registry.register(remote)
    assert "title" not in remote.parameters
    ok = await registry.call(call("mcp__github__search_issues", query="bug", limit=None))
    assert json.loads(ok.content) == {"issues": ["bug"]}
    assert seen == [{"query": "bug"}]  # the null for a defaulted argument was dropped
    bad = await registry.call(call("mcp__github__search_issues", state="stale",
                                   labels=["a", 3], extra=1))
    assert bad.is_error and bad.error_kind == "invalid_arguments"
    assert "- `query`: required argument is missing" in bad.content
    assert '- `state`: must be one of "open", "closed"; got "stale"' in bad.content
    assert "- `labels[1]`: expected string; got 3" in bad.content
    assert "- `extra`: unexpected argument" in bad.content
    assert len(seen) == 1


async def test_tool_call_schema_for_constrained_decoding() -> None:
    from conclave.tools.schema import check_json

    registry = ToolRegistry()

    @registry.tool(namespace="shop")
    def place(order: Order) -> str:
        """Place."""
        return order.customer

    @registry.tool
    def ping() -> str:
        """Ping."""
        return "pong"

    schema = registry.tool_call_schema()
    assert "$ref" not in json.dumps(schema)
    assert [v["properties"]["name"] for v in schema["anyOf"]] == [{"const": "ping"},
                                                                  {"const": "shop__place"}]
    good = {"name": "shop__place",
            "arguments": {"order": {"customer": "c", "items": [{"name": "tea", "qty": 2}]}}}
    assert check_json(good, schema) == []
    assert check_json({"name": "ping", "arguments": {}}, schema) == []
    assert check_json({"name": "shop__drop", "arguments": {}}, schema) != []
    wrong = check_json({"name": "shop__place", "arguments": {"order": {"customer": "c"}}},
                       schema)
    assert len(wrong) == 1 and "closest: `arguments.order.items`: required argument is " \
        "missing" in wrong[0]
    # what decodes under the schema runs
    result = await registry.call(ToolCall(id="1", name=good["name"], arguments=good["arguments"]))
    assert result.content == "c"
    only = registry.tool_call_schema("shop")
    assert only["properties"]["name"] == {"const": "shop__place"}
    with pytest.raises(ToolDefinitionError, match="no tools match"):
        registry.tool_call_schema("nothing")
