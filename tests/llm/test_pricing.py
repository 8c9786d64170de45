"""Exact costs from catalog prices; unpriced models are errors, never $0."""

from __future__ import annotations

from decimal import Decimal

import pytest

from conclave.config import ModelSpec, Price
from conclave.errors import PricingError
from conclave.llm.pricing import cost, price_of, to_micros, worst_case_cost
from conclave.llm.types import Usage
from tests.support.settings import make_settings


def test_cost_with_cached_and_cache_write_tokens():
    price = Price(input=Decimal("3"), output=Decimal("15"), cached_input=Decimal("0.30"),
                  cache_write=Decimal("3.75"))
    usage = Usage(input_tokens=1_000, cached_input_tokens=600, cache_write_tokens=100,
                  output_tokens=200)
    # 300 fresh * 3 + 600 * 0.30 + 100 * 3.75 + 200 * 15 = 900 + 180 + 375 + 3000
    assert cost(usage, price) == Decimal("4455") / Decimal(1_000_000)


def test_cached_price_falls_back_to_input_price():
    price = Price(input=Decimal("2"), output=Decimal("4"))
    assert cost(Usage(input_tokens=10, cached_input_tokens=10), price) == Decimal("0.00002")


def test_unpriced_model_is_an_error_unless_default_configured():
    model = ModelSpec(name="x/y", provider="openai", id="y", tier=1)
    with pytest.raises(PricingError, match="no price"):
        price_of(model)
    default = Price(input=Decimal("1"), output=Decimal("1"))
    assert price_of(model, default) is default


def test_worst_case_and_micros_round_up():
    price = Price(input=Decimal("0.05"), output=Decimal("0.40"))
    wc = worst_case_cost(100, 512, price)
    assert wc == Decimal("0.0002098")  # (100 * 0.05 + 512 * 0.40) / 1e6
    assert to_micros(wc) == 210
    assert to_micros(Decimal("0.0000001")) == 1  # never rounds spend down to zero


def test_default_catalog_prices_every_cloud_model(tmp_path):
    settings = make_settings(tmp_path)
    for model in settings.catalog.models.values():
        assert model.price is not None, model.name
        if not model.local:
            assert model.price.input > 0, model.name
            # embedding models produce no output tokens; everything else bills them
            assert (model.price.output == 0) == (model.kind == "embedding"), model.name
        assert 0 <= model.tier <= 3
    small = settings.catalog.model("openai/text-embedding-3-small")
    assert small.price.input == Decimal("0.02") and small.kind == "embedding"
    assert settings.catalog.model("openai/text-embedding-3-large").price.input == Decimal("0.13")
