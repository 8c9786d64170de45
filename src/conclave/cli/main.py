"""The ``conclave`` command: thin wrappers over the gateway and the runtimes.

Every command prints human output by default and one JSON object with
``--json``; errors go to stderr as one line with a non-zero exit.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from conclave.cli._common import cli_errors, err, gateway_with_accounting, out, print_json, run
from conclave.config import load_settings
from conclave.llm.types import ChatRequest, ChatResponse, Message

app = typer.Typer(
    name="conclave",
    help="Local-first, privacy-first LLM gateway, RAG and agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _mount_subcommands() -> None:
    from conclave.cli.admin import budget_app, keys_app, serve, spend
    from conclave.cli.local import local_app
    from conclave.cli.run import run_command

    app.add_typer(local_app, name="local", help="Manage the local llama.cpp runtime (tier 0).")
    app.command("serve")(serve)
    app.add_typer(keys_app, name="keys")
    app.add_typer(budget_app, name="budget")
    app.command("spend")(spend)
    app.command("run")(run_command)

    from conclave.cli.rag import ask, eval_app, index, search

    app.command("index")(index)
    app.command("search")(search)
    app.command("ask")(ask)
    app.add_typer(eval_app, name="eval")


def response_json(resp: ChatResponse) -> dict[str, Any]:
    return {
        "text": resp.text,
        "model": resp.model,
        "provider": resp.provider,
        "tier": resp.tier,
        "usage": resp.usage.model_dump(),
        "cost_usd": resp.cost_usd,
        "latency_ms": round(resp.latency_ms, 3),
        "ttft_ms": None if resp.ttft_ms is None else round(resp.ttft_ms, 3),
        "stop_reason": resp.stop_reason.value,
        "stopped_by": resp.stopped_by,
        "routing_note": resp.routing_note,
        "tool_calls": [c.model_dump() for c in resp.tool_calls],
    }


@app.command()
@cli_errors
def chat(
    prompt: Annotated[str, typer.Argument(help="What to ask. Use - to read it from stdin.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Catalog model name.")] = None,
    tier: Annotated[int | None, typer.Option("--tier", "-t", help="0 local, 1 cheap, 2 mid, "
                                             "3 premium.")] = None,
    privacy: Annotated[bool, typer.Option("--privacy", help="Local models only; nothing leaves "
                                          "this machine.")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they arrive.")] = False,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Output token cap.")
                          ] = None,
    system: Annotated[str | None, typer.Option("--system", help="System instruction.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Ask a model once. With no model or tier, the local model answers (offline).

    The call is held against the budgets and written to the ledger (`conclave spend`).
    """
    from conclave.errors import InvalidRequest

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise InvalidRequest("the prompt is empty", hint="pass the question as an argument")
    if model and tier is not None:
        raise InvalidRequest("give --model or --tier, not both")
    messages = ([Message.system(system)] if system else []) + [Message.user(prompt)]
    request = ChatRequest(messages=messages, model=model, tier=tier, max_tokens=max_tokens,
                          temperature=temperature, privacy=True if privacy else None)

    async def go() -> ChatResponse:
        async with gateway_with_accounting(load_settings()) as gw:
            if not stream:
                return await gw.complete(request)
            s = await gw.stream(request)
            async for chunk in s:
                if chunk.delta and not json_out:
                    out.print(chunk.delta, end="", markup=False)
            if not json_out:
                out.print()
            return s.response

    resp = run(go())
    if json_out:
        print_json(response_json(resp))
        return
    if not stream:
        out.print(resp.text.strip(), markup=False)
    note = f" · {resp.routing_note}" if resp.routing_note else ""
    est = " (estimated)" if resp.usage.estimated else ""
    ttft = f" · ttft {resp.ttft_ms:.0f} ms" if resp.ttft_ms is not None else ""
    err.print(
        f"[dim]{resp.model} (tier {resp.tier}) · {resp.usage.input_tokens} in / "
        f"{resp.usage.output_tokens} out{est} · ${resp.cost_usd:.6f} · "
        f"{resp.latency_ms:.0f} ms{ttft}{note}[/]"
    )


@app.command()
@cli_errors
def models(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the model catalog: tier, kind, prices, and whether each is usable now."""
    from rich.table import Table

    settings = load_settings()
    catalog = settings.catalog
    rows = []
    for m in sorted(catalog.models.values(), key=lambda m: (m.tier, m.priority, m.name)):
        p = catalog.provider_of(m)
        rows.append({
            "name": m.name, "provider": m.provider, "id": m.id, "tier": m.tier, "kind": m.kind,
            "local": m.local, "context_length": m.context_length,
            "price_input_per_mtok": None if m.price is None else str(m.price.input),
            "price_output_per_mtok": None if m.price is None else str(m.price.output),
            "price_cached_input_per_mtok": None if m.price is None or m.price.cached_input is None
            else str(m.price.cached_input),
            "enabled": settings.provider_enabled(p),
            "needs": None if settings.provider_enabled(p) else (p.api_key_env or p.base_url_env),
        })
    if json_out:
        print_json({"models": rows, "privacy_mode": settings.privacy_mode})
        return
    table = Table(title="Conclave model catalog")
    for col in ("name", "tier", "kind", "local", "context", "$/M in", "$/M out", "enabled"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"], str(r["tier"]), r["kind"], "yes" if r["local"] else "",
            f"{r['context_length']:,}", r["price_input_per_mtok"] or "-",
            r["price_output_per_mtok"] or "-",
            "yes" if r["enabled"] else f"[dim]set {r['needs']}[/]",
        )
    out.print(table)


def main() -> None:
    import os

    _mount_subcommands()
    try:
        app()
    except Exception as exc:  # a bug, not bad input: still one line unless debugging
        if os.environ.get("CONCLAVE_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
                  "(set CONCLAVE_DEBUG=1 for a traceback and please report it)")
        raise SystemExit(70) from None


if __name__ == "__main__":
    main()
