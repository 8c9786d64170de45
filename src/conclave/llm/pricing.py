"""Cost of a call from catalog prices, in exact decimal dollars.

Prices are USD per million tokens.  Cached input is billed at the cached
price (falling back to the input price when the catalog gives none), cache
writes at the cache-write price.  A model without a price is an error unless
``Settings.default_price`` is configured explicitly: a silent $0 would let
spend escape every budget.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

from conclave.config import ModelSpec, Price
from conclave.errors import PricingError
from conclave.llm.types import Usage

_MILLION = Decimal(1_000_000)
MICROS_PER_USD = 1_000_000


def price_of(model: ModelSpec, default: Price | None = None) -> Price:
    if model.price is not None:
        return model.price
    if default is not None:
        return default
    raise PricingError(
        f"model {model.name!r} has no price in the catalog",
        hint="add `price: {input: ..., output: ...}` to its catalog entry, or set "
        "CONCLAVE_DEFAULT_PRICE__INPUT and CONCLAVE_DEFAULT_PRICE__OUTPUT",
    )


def cost(usage: Usage, price: Price) -> Decimal:
    """Exact cost in USD of ``usage`` at ``price``.

    ``usage.input_tokens`` is the whole prompt; its cached and cache-write parts
    are billed at their own prices and the rest at the input price.
    """
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    written = min(usage.cache_write_tokens, usage.input_tokens - cached)
    fresh = usage.input_tokens - cached - written
    total = (
        fresh * price.input
        + cached * (price.cached_input if price.cached_input is not None else price.input)
        + written * (price.cache_write if price.cache_write is not None else price.input)
        + usage.output_tokens * price.output
    )
    return total / _MILLION


def worst_case_cost(input_tokens: int, max_output_tokens: int, price: Price) -> Decimal:
    """What a call may cost at most: every input token fresh, every output token used."""
    return (input_tokens * price.input + max_output_tokens * price.output) / _MILLION


def to_micros(usd: Decimal) -> int:
    """Dollars to integer micro-dollars, rounding up so budgets never under-count."""
    return int((usd * MICROS_PER_USD).to_integral_value(rounding=ROUND_CEILING))
