"""Gateway overhead: P50/P95 latency Conclave adds over a direct httpx call.

All paths hit the same loopback upstream (a child process answering an
OpenAI chat completion from memory), one request at a time, interleaved in
rounds so drift affects them alike:

* ``direct``: a plain ``httpx2.AsyncClient`` POST + JSON parse (the baseline);
* ``direct_lean``: the same POST through Conclave's own HTTP client
  (``conclave.llm.net.httpx2_client``, the lean HTTP/1.1 transport the
  providers use), so ``gateway - direct_lean`` is what Conclave's logic adds
  (routing, pricing, SDK request building, response normalisation);
* ``gateway``: ``Gateway.complete`` end to end.

Printed: per-path P50/P95 and the added latency against both baselines.

    python bench/gateway_overhead.py [--requests 2000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path

import httpx2

from _common import now, percentile, upstream
from conclave.config import Settings
from conclave.gateway import Gateway
from conclave.llm.net import httpx2_client
from conclave.llm.types import ChatRequest, Message

BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "Capital of France?"}],
        "max_tokens": 16}


async def run(n: int, url: str) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp())
    catalog = tmp / "catalog.yaml"
    catalog.write_text(
        "providers:\n  bench:\n    type: openai\n"
        f"    base_url: {url}/v1\n    api_key_env: BENCH_API_KEY\n"
        "models:\n  - name: bench/model\n    provider: bench\n    id: bench-model\n"
        "    tier: 1\n    price: {input: 1, output: 2}\n"
    )
    os.environ["BENCH_API_KEY"] = "sk-bench"
    settings = Settings(catalog_file=catalog, data_dir=tmp / "data")
    request = ChatRequest(messages=[Message.user("Capital of France?")], model="bench/model",
                          max_tokens=16)
    direct: list[float] = []
    lean: list[float] = []
    gated: list[float] = []
    lean_client = httpx2_client(privacy=False, timeout=30, connect_timeout=5)
    async with httpx2.AsyncClient() as client, lean_client, Gateway(settings) as gw:
        headers = {"Authorization": "Bearer sk-bench"}
        for _ in range(50):  # warm up every path
            await client.post(f"{url}/v1/chat/completions", json=BODY, headers=headers)
            await lean_client.post(f"{url}/v1/chat/completions", json=BODY, headers=headers)
            await gw.complete(request)
        for _ in range(n // 100):
            for _ in range(100):
                t = now()
                r = await client.post(f"{url}/v1/chat/completions", json=BODY, headers=headers)
                r.json()
                direct.append((now() - t) * 1000)
            for _ in range(100):
                t = now()
                r = await lean_client.post(f"{url}/v1/chat/completions", json=BODY,
                                           headers=headers)
                r.json()
                lean.append((now() - t) * 1000)
            for _ in range(100):
                t = now()
                resp = await gw.complete(request)
                gated.append((now() - t) * 1000)
                assert resp.text == "Paris."
    p = percentile
    return {
        "requests_per_path": len(direct),
        "direct_p50_ms": p(direct, 0.5), "direct_p95_ms": p(direct, 0.95),
        "direct_lean_p50_ms": p(lean, 0.5), "direct_lean_p95_ms": p(lean, 0.95),
        "gateway_p50_ms": p(gated, 0.5), "gateway_p95_ms": p(gated, 0.95),
        "added_p50_ms": p(gated, 0.5) - p(direct, 0.5),
        "added_p95_ms": p(gated, 0.95) - p(direct, 0.95),
        "added_vs_lean_p50_ms": p(gated, 0.5) - p(lean, 0.5),
        "added_vs_lean_p95_ms": p(gated, 0.95) - p(lean, 0.95),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with upstream() as url:
        res = asyncio.run(run(args.requests, url))
    if args.json:
        print(json.dumps(res))
        return
    print(f"requests per path: {res['requests_per_path']}")
    print(f"direct httpx : P50 {res['direct_p50_ms']:.3f} ms  P95 {res['direct_p95_ms']:.3f} ms")
    print(f"direct lean  : P50 {res['direct_lean_p50_ms']:.3f} ms  "
          f"P95 {res['direct_lean_p95_ms']:.3f} ms  (Conclave's HTTP client, no gateway)")
    print(f"gateway      : P50 {res['gateway_p50_ms']:.3f} ms  P95 {res['gateway_p95_ms']:.3f} ms")
    print(f"added vs httpx: P50 {res['added_p50_ms']:.3f} ms  P95 {res['added_p95_ms']:.3f} ms")
    print(f"added vs lean : P50 {res['added_vs_lean_p50_ms']:.3f} ms  "
          f"P95 {res['added_vs_lean_p95_ms']:.3f} ms  (Conclave's logic alone)")


if __name__ == "__main__":
    main()
