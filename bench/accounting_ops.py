"""Atomic budget operations on Redis, as a ratio to raw Redis INCR, in one run.

Both loads use the same client (redis-py asyncio, the same bounded pool the
budget store uses) at the same concurrency against the same Redis:

* ``INCR``: one counter, the cheapest write Redis has - the ceiling for one
  round trip per operation from this client.
* ``reserve+settle``: what the gateway does per call - ``reserve`` (Lua: read
  the scope indexes, prune expired reservations, check every budget, record
  the reservation) then ``settle`` (Lua: drop the reservation, add the spend,
  decide alerts, mark the request settled).  One round trip each.  The call
  is charged to a team and an API key that both have budgets, plus a global
  one: three budgets checked and written per operation.

The loads alternate for ``--rounds`` rounds so drift hits both alike; the
median round of each is reported.  Printed: INCR/s, reserve+settle pairs/s,
script calls/s, the ratios, and P50/P95 latency of reserve and settle.

    python bench/accounting_ops.py [--concurrency 64] [--ops 20000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from conclave.accounting.backends._redis import make_client  # noqa: E402
from conclave.accounting.backends.redis import RedisBudgetStore  # noqa: E402
from conclave.accounting.budgets import BudgetSpec, ScopeRef  # noqa: E402

SCOPES = [ScopeRef(scope="team", id="bench"), ScopeRef(scope="api_key", id="key_bench")]


def pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def incr_round(url: str, key: str, ops: int, concurrency: int) -> float:
    r = make_client(url, max_connections=concurrency)
    left = ops

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await r.incr(key)

    await r.ping()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await r.aclose()
    return ops / elapsed


async def budget_round(
    store: RedisBudgetStore, ops: int, concurrency: int, lat_r: list[float], lat_s: list[float]
) -> float:
    left = ops
    tag = uuid.uuid4().hex[:8]

    async def worker(w: int) -> None:
        nonlocal left
        i = 0
        while left > 0:
            left -= 1
            i += 1
            t0 = time.perf_counter()
            res = await store.reserve(SCOPES, 2_000, request_id=f"{tag}-{w}-{i}")
            t1 = time.perf_counter()
            await store.settle(res, 1_500)
            t2 = time.perf_counter()
            lat_r.append(t1 - t0)
            lat_s.append(t2 - t1)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return ops / (time.perf_counter() - t0)


async def main(args: argparse.Namespace) -> dict[str, float | int | str]:
    prefix = "{" + f"bench_{uuid.uuid4().hex[:10]}" + "}:"
    store = await RedisBudgetStore.open(args.url, prefix=prefix,
                                        max_connections=args.concurrency)
    try:
        for spec in (
            BudgetSpec(scope="global", period="monthly", limit_micros=2**52),
            BudgetSpec(scope="team", scope_id="bench", period="daily", limit_micros=2**52),
            BudgetSpec(scope="api_key", scope_id="key_bench", period="lifetime",
                       limit_micros=2**52),
        ):
            await store.create(spec)
        # warm up both paths (script load, connections)
        await incr_round(args.url, f"{prefix}incr", 500, args.concurrency)
        await budget_round(store, 500, args.concurrency, [], [])

        incr, pairs, lat_r, lat_s = [], [], [], []
        for _ in range(args.rounds):
            incr.append(await incr_round(args.url, f"{prefix}incr", args.ops, args.concurrency))
            pairs.append(await budget_round(store, args.ops // 2, args.concurrency, lat_r, lat_s))
        # sanity: every pair settled, nothing left reserved
        budget = (await store.list_budgets(SCOPES[0]))[0]
        usage = await store.usage(budget.id)
        assert usage.reserved_micros == 0, "reservations left behind"
    finally:
        await store.clear()
        await store.aclose()

    incr_s, pairs_s = statistics.median(incr), statistics.median(pairs)
    return {
        "concurrency": args.concurrency,
        "ops_per_round": args.ops,
        "rounds": args.rounds,
        "budgets_per_op": 3,
        "incr_ops_per_s": round(incr_s),
        "reserve_settle_pairs_per_s": round(pairs_s),
        "script_calls_per_s": round(2 * pairs_s),
        "ratio_pairs_to_incr": round(pairs_s / incr_s, 3),
        "ratio_script_calls_to_incr": round(2 * pairs_s / incr_s, 3),
        "reserve_p50_ms": round(pct(lat_r, 0.5) * 1000, 3),
        "reserve_p95_ms": round(pct(lat_r, 0.95) * 1000, 3),
        "settle_p50_ms": round(pct(lat_s, 0.5) * 1000, 3),
        "settle_p95_ms": round(pct(lat_s, 0.95) * 1000, 3),
        "redis": args.url.split("@")[-1],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--ops", type=int, default=20_000, help="INCRs per round; pairs = ops/2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    result = asyncio.run(main(parser.parse_args()))
    if parser.parse_args().json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for k, v in result.items():
            print(f"{k:<{width}}  {v}")
