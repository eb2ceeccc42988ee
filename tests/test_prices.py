"""The price table: shipped data, model resolution, cost arithmetic, implausible prices."""
from __future__ import annotations

import datetime as dt

import pytest

from aigov.plugins.token_quota.schema import SCHEMA
from aigov.prices import Price, PriceError, check_price, default_prices, load_price_file
from kongsim import metaschema

REQUIRED = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o1", "o3", "o3-mini",
            "o4-mini", "gpt-4-turbo", "gpt-4", "gpt-3.5-turbo")


def test_shipped_table_has_date_source_and_current_models() -> None:
    table = default_prices()
    assert dt.date.fromisoformat(table.as_of) >= dt.date(2025, 1, 1)
    assert "openai" in table.source.lower()
    for model in REQUIRED:
        price = table.lookup(model)
        assert price is not None, model
        assert price.output >= price.input > 0
        assert price.cached_input is None or price.cached_input <= price.input
    # spot checks against OpenAI's published per-1M prices
    assert table.lookup("gpt-4o") == Price(input=2.5, output=10.0, cached_input=1.25)
    assert table.lookup("gpt-4o-mini").input == 0.15


@pytest.mark.parametrize("asked, family", [
    ("gpt-4o-2024-08-06", "gpt-4o"), ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"), ("GPT-4.1", "gpt-4.1"),
    ("openai/gpt-4.1-nano", "gpt-4.1-nano"), ("o3-mini-2025-01-31", "o3-mini"), ("gpt-4-0613", "gpt-4"),
    ("gpt-3.5-turbo-1106", "gpt-3.5-turbo"), ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
    ("gpt-4-1106-preview", "gpt-4-turbo"), ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
])
def test_dated_variants_and_aliases_resolve_to_their_family(asked: str, family: str) -> None:
    assert default_prices().resolve(asked) == family


@pytest.mark.parametrize("asked", ["llama-3-70b", "", None, "gpt-4o-mini-tts-nonsense"])
def test_unknown_models_resolve_to_none(asked: object) -> None:
    assert default_prices().lookup(asked) is None  # type: ignore[arg-type]


def test_a_fine_tune_is_not_billed_at_its_base_price_but_by_an_entry_of_its_own() -> None:
    """OpenAI bills fine-tuned inference above the base model's price: charging a fine-tune as its
    base overruns USD budgets. It is unpriced (unknown_model decides) until the config prices it,
    by its own name or for the whole family of a base."""
    asked = "ft:gpt-4o-mini-2024-07-18:acme::abc123"
    assert default_prices().lookup(asked) is None
    family = default_prices().with_overrides([{"model": "ft:gpt-4o-mini", "input": 0.3, "output": 1.2}])
    assert family.lookup(asked) == Price(input=0.3, output=1.2)
    assert family.lookup("gpt-4o-mini") == default_prices().lookup("gpt-4o-mini")  # the base keeps its own
    own = family.with_overrides([{"model": asked, "input": 0.5, "output": 2.0}])
    assert own.lookup(asked) == Price(input=0.5, output=2.0)  # the exact name beats the family
    assert own.lookup("ft:gpt-4o-mini-2024-07-18:acme::other") == Price(input=0.3, output=1.2)


def test_cost_uses_cached_and_output_rates() -> None:
    gpt4o = default_prices().lookup("gpt-4o")
    # 800 uncached * 2.5 + 200 cached * 1.25 + 500 * 10 = 7250 USD per 1M -> 0.00725 USD
    assert gpt4o.cost_nano(1000, 500, cached_tokens=200) == 7_250_000


def test_hidden_reasoning_in_provider_total_is_billed_as_output() -> None:
    price = Price(input=1.0, output=4.0)
    # total 298 with 3 prompt + 7 completion: 288 hidden tokens billed at the output rate
    assert price.cost_nano(3, 7, total_tokens=298) == round((3 * 1.0 + (7 + 288) * 4.0) * 1000)
    priced_reasoning = Price(input=1.0, output=4.0, reasoning=2.0)
    assert priced_reasoning.cost_nano(10, 100, reasoning_tokens=60) == round((10 + 40 * 4 + 60 * 2) * 1000)


@pytest.mark.parametrize("bad, fragment", [
    (0.0000025, "did you mean 2.5"), (20000, "over the plausible maximum"), (-1, "negative"),
    (True, "must be a number"), ("2.5", "must be a number"), (float("nan"), "must be a number"),
])
def test_implausible_prices_are_rejected_with_a_clear_message(bad: object, fragment: str) -> None:
    with pytest.raises(PriceError, match=fragment):
        check_price("gpt-4o", "input", bad)


def test_overrides_replace_and_report_every_problem() -> None:
    table = default_prices().with_overrides([{"model": "gpt-4o", "input": 3, "output": 12},
                                             {"model": "my-local-llm", "input": 0.2, "output": 0.2}])
    assert table.lookup("gpt-4o-2024-11-20") == Price(input=3.0, output=12.0)
    assert table.lookup("my-local-llm").output == 0.2
    assert default_prices().lookup("gpt-4o").input == 2.5  # the shipped table is untouched
    with pytest.raises(PriceError) as err:
        default_prices().with_overrides([{"model": "a", "input": 0.000002, "output": 1},
                                         {"model": "b", "input": 1}])
    assert "prices[0]" in str(err.value) and "per token" in str(err.value)
    assert "prices[1]" in str(err.value) and "lacks output" in str(err.value)


def test_plugin_schema_rejects_a_per_token_price_at_config_time() -> None:
    with pytest.raises(metaschema.ConfigError) as err:
        metaschema.process_config(SCHEMA, {"prices": [{"model": "gpt-4o", "input": 0.0000025, "output": 10}]})
    assert "config.prices[1].input" in str(err.value)
    ok = metaschema.process_config(SCHEMA, {"prices": [{"model": "gpt-4o", "input": 2.5, "output": 10}]})
    assert ok["prices"][0]["input"] == 2.5


def test_broken_price_file_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"models": {"x": {"input": 0.000001, "output": 1}}}')
    with pytest.raises(PriceError, match="per token"):
        load_price_file(path)
    path.write_text("not json")
    with pytest.raises(PriceError, match="cannot read"):
        load_price_file(path)


@pytest.mark.parametrize(("usd", "nano"), [(1.001, 1_001_000_000), (0.000000001, 1), (2.675, 2_675_000_000),
                                          (0.1 + 0.2, 300_000_000)])
def test_usd_to_nano_rounds_to_the_nearest_nano(usd: float, nano: int) -> None:
    from aigov.prices import usd_to_nano
    assert usd_to_nano(usd) == nano
