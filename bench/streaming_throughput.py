"""Streaming throughput: tokens/s through Conclave versus direct to the same llama.cpp server.

Both paths stream the same greedy completion (same prompt, stops and token
cap) from the managed llama-server with the real Gemma 3 270M model, in
alternating rounds.  Tokens/s is counted from the first to the last token
as the client sees them; the figure of merit is the ratio gateway/direct.

    python bench/streaming_throughput.py [--rounds 6] [--max-tokens 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics

import httpx2

from _common import now
from conclave.config import load_settings
from conclave.gateway import Gateway
from conclave.llm.local import LocalRuntime
from conclave.llm.types import ChatRequest, Message

#: a raw completion prompt with no stop sequences, so both paths generate the full token cap
PROMPT = "Chapter 1. The dragon who learned to bake bread.\n\nOnce upon a time,"


async def direct(client: httpx2.AsyncClient, url: str, max_tokens: int) -> tuple[int, float]:
    body = {"model": "gemma-3-270m", "prompt": PROMPT, "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    tokens, first, last = 0, 0.0, 0.0
    async with client.stream("POST", f"{url}/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = json.loads(line[6:])["choices"][0].get("text")
            if text:
                tokens += 1
                last = now()
                first = first or last
    return tokens, last - first


async def gateway(gw: Gateway, max_tokens: int) -> tuple[int, float]:
    req = ChatRequest(messages=[Message.user(PROMPT)], prompt=PROMPT, model="local/gemma-3-270m",
                      max_tokens=max_tokens, temperature=0)
    tokens, first, last = 0, 0.0, 0.0
    stream = await gw.stream(req)
    async for chunk in stream:
        if chunk.delta:
            tokens += 1
            last = now()
            first = first or last
    return tokens, last - first


async def run(rounds: int, max_tokens: int) -> dict[str, float]:
    settings = load_settings()
    runtime = LocalRuntime(settings)
    url = await runtime.ensure_running()
    d_rates, g_rates, d_tok, g_tok = [], [], [], []
    async with httpx2.AsyncClient(timeout=300) as client, Gateway(settings, runtime=runtime) as gw:
        await direct(client, url, 16)  # warm up
        await gateway(gw, 16)
        for _ in range(rounds):
            t, s = await direct(client, url, max_tokens)
            d_rates.append(t / s)
            d_tok.append(t)
            t, s = await gateway(gw, max_tokens)
            g_rates.append(t / s)
            g_tok.append(t)
    d, g = statistics.median(d_rates), statistics.median(g_rates)
    return {"rounds": rounds, "tokens_direct": statistics.median(d_tok),
            "tokens_gateway": statistics.median(g_tok), "direct_tokens_per_s": d,
            "gateway_tokens_per_s": g, "ratio": g / d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = asyncio.run(run(args.rounds, args.max_tokens))
    if args.json:
        print(json.dumps(res))
        return
    print(f"tokens per stream: direct {res['tokens_direct']:.0f}, "
          f"gateway {res['tokens_gateway']:.0f} (median of {res['rounds']} rounds)")
    print(f"direct  : {res['direct_tokens_per_s']:.1f} tokens/s")
    print(f"gateway : {res['gateway_tokens_per_s']:.1f} tokens/s")
    print(f"ratio   : {res['ratio']:.3f} (target >= 0.98)")


if __name__ == "__main__":
    main()
