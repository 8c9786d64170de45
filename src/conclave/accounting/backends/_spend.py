"""The spend breakdown query, shared by the SQLite and PostgreSQL ledgers.

One SQL text for both engines so they compute the very same nearest-rank
percentiles (PostgreSQL's ``percentile_disc`` works in floating point and can
differ from SQLite at exact boundaries).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conclave.accounting.ledger import COLUMNS, SpendRow


def spend_sql(key: str, where: str, null_safe_eq: str) -> str:
    """Sums per group plus nearest-rank p50/p95 latency from a window function.

    Shared with PostgreSQL (``null_safe_eq`` is ``IS`` there ``IS NOT DISTINCT FROM``) so
    both backends compute the very same percentiles.
    """
    c = COLUMNS
    return f"""
    WITH f AS (
        SELECT {key} AS k, cost_micros, {c['input_tokens']} AS i, {c['output_tokens']} AS o,
               {c['cached_input_tokens']} AS cr, {c['cache_write_tokens']} AS cw, latency_ms
        FROM invocations{where}
    ),
    agg AS (
        SELECT k, COUNT(*) AS n, SUM(cost_micros) AS cost, SUM(i) AS i, SUM(o) AS o,
               SUM(cr) AS cr, SUM(cw) AS cw
        FROM f GROUP BY k
    ),
    ranked AS (
        SELECT k, latency_ms,
               ROW_NUMBER() OVER (PARTITION BY k ORDER BY latency_ms) AS rn,
               COUNT(*) OVER (PARTITION BY k) AS m
        FROM f WHERE latency_ms IS NOT NULL
    ),
    pct AS (
        SELECT k,
               MIN(CASE WHEN rn * 100 >= 50 * m THEN latency_ms END) AS p50,
               MIN(CASE WHEN rn * 100 >= 95 * m THEN latency_ms END) AS p95
        FROM ranked GROUP BY k
    )
    SELECT agg.k, agg.n, agg.cost, agg.i, agg.o, agg.cr, agg.cw, pct.p50, pct.p95
    FROM agg LEFT JOIN pct ON agg.k {null_safe_eq} pct.k
    """


def spend_row(row: Sequence[Any]) -> SpendRow:
    k, n, cost, i, o, cr, cw, p50, p95 = row
    return SpendRow(
        key=None if k is None else str(k), count=int(n), cost_micros=int(cost or 0),
        input_tokens=int(i or 0), output_tokens=int(o or 0), cached_input_tokens=int(cr or 0),
        cache_write_tokens=int(cw or 0),
        p50_latency_ms=None if p50 is None else int(p50),
        p95_latency_ms=None if p95 is None else int(p95),
    )
