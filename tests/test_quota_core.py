"""Quota config validation, counter planning, charges, headers and the 429 body (library level)."""
from __future__ import annotations

import json

import pytest

from aigov.prices import Price, normalize_model
from aigov.metrics import OTHER
from aigov.quota.core import (QuotaConfig, QuotaConfigError, charge_from_usage, consumer_metric_name, identity_tag,
                              plan_counters, rate_limit_headers, rejection_body)

NOW = 1_800_000_030.0


def test_config_errors_are_reported_together_and_clearly() -> None:
    with pytest.raises(QuotaConfigError) as err:
        QuotaConfig.from_plugin_config({
            "limits": [{"window": "fortnight", "tokens": 5}, {"window": "day"}, {"window": "day", "tokens": -3}],
            "identifier_sources": ["header"], "unknown_model": "default_price",
            "default_price": {"input": None, "output": None},
            "prices": [{"model": "gpt-4o", "input": 0.0000025, "output": 10}]})
    msg = str(err.value)
    # array elements counted from 1, as in Kong's schema errors
    for fragment in ("limits[1].window", "limits[2] needs", "limits[3].tokens", "identifier_header is not set",
                     "default_price {input, output} is not set", "did you mean 2.5"):
        assert fragment in msg, fragment


def test_a_limit_listing_an_unpriced_model_under_block_is_refused() -> None:
    # A new user's typo ("gpt-4o-mnii") left the limit applying to nothing: with unknown_model
    # block that model is refused before any limit is looked at, so the limit is dead config.
    with pytest.raises(QuotaConfigError, match=r"limits\[2\].models: 'gpt-4o-mnii' is not in the price table"):
        QuotaConfig.from_plugin_config({"limits": [{"window": "day", "tokens": 5},
                                                   {"window": "day", "tokens": 5, "models": ["gpt-4o-mnii"]}]})
    for name in ("gpt-4o-mini-2024-07-18", "openai/gpt-4o", "GPT-4o"):  # family names resolve
        QuotaConfig.from_plugin_config({"limits": [{"window": "day", "tokens": 5, "models": [name]}]})
    QuotaConfig.from_plugin_config({"limits": [{"window": "day", "tokens": 5, "models": ["my-own-model"]}],
                                    "unknown_model": "default_price", "default_price": {"input": 1, "output": 2}})


def test_identity_tags_cannot_break_the_cluster_hash_tag() -> None:
    assert identity_tag("consumer", "4f1c-aa") == "consumer:4f1c-aa"
    weird = identity_tag("header", "evil}{tag value")
    assert "{" not in weird and "}" not in weird and weird.startswith("header:#")
    # A client cannot type a hashed tag: '#' is not kept in a raw value (it is hashed itself).
    assert identity_tag("header", weird.split(":", 1)[1]) != weird
    # A credential header's value is hashed even when it looks harmless.
    assert identity_tag("header", "sk-abc123", secret=True).startswith("header:#")
    assert "sk-abc123" not in identity_tag("header", "sk-abc123", secret=True)
    assert identity_tag("header", "evil}{tag value") == weird  # stable
    assert identity_tag("header", "x" * 500) != identity_tag("header", "x" * 501)


def test_consumer_names_never_take_a_label_the_quota_gives_other_callers() -> None:
    others = {"anonymous", "global", OTHER, identity_tag("header", "alice"), identity_tag("ip", "10.0.0.1"),
              identity_tag("credential", "c1"), identity_tag("consumer", "4f1c-aa")}
    others |= {"custom_id:cust-42"}  # a consumer with only a custom_id
    names = ["alice", "anonymous", "global", "other", "header:alice", "ip:10.0.0.1", "credential:c1",
             "consumer:4f1c-aa", "consumer:other", "Other", "team:ops", "a:b", "custom_id:cust-42", "cust-42"]
    labels = [consumer_metric_name(n) for n in names]
    assert not set(labels) & others
    assert len(set(labels)) == len(names)  # and no two names share one
    assert consumer_metric_name("alice") == "alice" and consumer_metric_name("team:ops") == "team:ops"


def test_counters_are_scoped_by_model_route_and_filtered_by_model() -> None:
    cfg = QuotaConfig.from_plugin_config({"limits": [
        {"window": "day", "tokens": 1000, "per_model": True},
        {"window": "month", "cost_usd": 20, "per_route": True},
        {"window": "minute", "tokens": 50, "models": ["gpt-4o"]}]})
    mini = plan_counters(cfg, "consumer:a", "gpt-4o-mini", "chat", NOW)
    assert [c.header for c in mini] == ["Day", "Cost-Month"]
    assert ":gpt-4o-mini:" in mini[0].key and ":chat:" in mini[1].key
    assert mini[1].limit == 20_000_000_000  # nano-USD
    full = plan_counters(cfg, "consumer:a", "gpt-4o", "chat", NOW)
    assert [c.header for c in full] == ["Day", "Cost-Month", "Minute"]
    assert full[0].key != mini[0].key and full[1].key == mini[1].key


def test_a_limit_on_a_base_model_covers_its_fine_tunes_and_snapshots() -> None:
    # A breaker's finding: once fine-tunes were priced apart, "models: [gpt-4o-mini]" no longer
    # applied to ft:gpt-4o-mini-..., which then ran unlimited.
    cfg = QuotaConfig.from_plugin_config({
        "prices": [{"model": "ft:gpt-4o-mini", "input": 0.3, "output": 1.2}],
        "limits": [{"window": "day", "tokens": 100, "models": ["gpt-4o-mini"]},
                   {"window": "minute", "tokens": 50, "models": ["gpt-4o"]}]})
    asked = "ft:gpt-4o-mini-2024-07-18:acme::abc"
    for model in (cfg.prices.resolve(asked), normalize_model(asked)):  # priced by its family, or not at all
        assert [c.header for c in plan_counters(cfg, "consumer:a", model, None, NOW)] == ["Day"], model
    assert plan_counters(cfg, "consumer:a", "ft:gpt-4o-2024-08-06:acme::x", None, NOW)[0].header == "Minute"
    assert plan_counters(cfg, "consumer:a", "ft:gpt-3.5-turbo:acme::x", None, NOW) == []
    assert plan_counters(cfg, "consumer:a", "gpt-4o-mini-ft", None, NOW) == []  # only ft: names are fine-tunes
    # A dated snapshot with a price of its own (a breaker's: gpt-4o-2024-05-13 ran past a gpt-4o limit).
    snapshot = cfg.prices.resolve("gpt-4o-2024-05-13")
    assert snapshot == "gpt-4o-2024-05-13"  # priced apart in the table
    assert plan_counters(cfg, "consumer:a", snapshot, None, NOW)[0].header == "Minute"


def test_charge_meters_the_provider_total() -> None:
    c = charge_from_usage(Price(input=1, output=2), 3, 7, total=298)
    assert (c.prompt_tokens, c.completion_tokens, c.total_tokens) == (3, 7, 298)
    assert c.cost_nano == (3 * 1 + 295 * 2) * 1000


def test_headers_and_rejection_body_agree_with_the_counter() -> None:
    cfg = QuotaConfig.from_plugin_config({"limits": [{"window": "minute", "tokens": 400},
                                                     {"window": "day", "cost_usd": 0.01}]})
    counters = plan_counters(cfg, "consumer:a", "gpt-4o", None, NOW)
    headers = rate_limit_headers(counters, [350, 9_000_000], NOW)
    assert headers["X-AI-RateLimit-Remaining-Minute"] == "50"
    assert headers["X-AI-RateLimit-Reset-Minute"] == "30"
    assert headers["X-AI-RateLimit-Remaining-Cost-Day"] == "0.001000000"
    body, retry_after = rejection_body(counters[0], 350, 120, NOW)
    err = json.loads(body)["error"]
    assert retry_after == 30 and err["retry_after"] == 30
    assert err["type"] == "rate_limit_exceeded" and err["window"] == "minute"
    assert "400 tokens per minute" in err["message"] and "120 tokens, 50 tokens left" in err["message"]
    # A request larger than the limit itself: waiting cannot help, so no Retry-After.
    body, retry_after = rejection_body(counters[0], 0, 500, NOW)
    err = json.loads(body)["error"]
    assert retry_after is None and err["retry_after"] is None
    assert "larger than the limit" in err["message"] and "lower max_tokens" in err["message"]


def test_a_limit_naming_a_dated_or_prefixed_model_applies_to_that_family() -> None:
    from aigov.quota.core import QuotaConfig

    q = QuotaConfig.from_plugin_config({"limits": [
        {"window": "minute", "tokens": 100, "models": ["gpt-4o-mini-2024-07-18", "openai/gpt-4o"]}]})
    (limit,) = q.limits
    assert limit.applies_to(q.prices.resolve("gpt-4o-mini"))
    assert limit.applies_to(q.prices.resolve("gpt-4o-2024-08-06"))
    assert not limit.applies_to(q.prices.resolve("o3-mini"))


def test_two_limits_on_one_window_show_the_binding_one_in_the_headers() -> None:
    cfg = QuotaConfig.from_plugin_config({"limits": [{"window": "minute", "tokens": 200, "per_model": True},
                                                     {"window": "minute", "tokens": 1000}]})
    counters = plan_counters(cfg, "consumer:a", "gpt-4o", None, NOW)
    assert len(counters) == 2 and counters[0].header == counters[1].header
    headers = rate_limit_headers(counters, [190, 190], NOW)
    assert headers["X-AI-RateLimit-Limit-Minute"] == "200"      # the per-model limit binds
    assert headers["X-AI-RateLimit-Remaining-Minute"] == "10"
    headers = rate_limit_headers(list(reversed(counters)), [190, 190], NOW)
    assert headers["X-AI-RateLimit-Remaining-Minute"] == "10"   # whatever the order


def test_outage_log_throttle_logs_the_first_line_then_one_per_interval_with_the_count(monkeypatch) -> None:
    from aigov import pdk

    clock = [100.0]
    monkeypatch.setattr(pdk.time, "monotonic", lambda: clock[0])
    throttle = pdk.LogThrottle(interval_s=5.0)
    logged: list[str] = []
    for _ in range(7):
        throttle.log(logged.append, "quota:fail_open", "store down")
    throttle.log(logged.append, "cache:store", "cache down")   # another kind is not held back
    assert logged == ["store down", "cache down"]
    clock[0] += 5.0
    throttle.log(logged.append, "quota:fail_open", "store down")
    assert logged[-1] == "store down (6 more like this in the last 5 s not logged)"
    clock[0] += 5.0
    throttle.log(logged.append, "quota:fail_open", "store down")
    assert logged[-1] == "store down"   # nothing was held back in between


def test_two_limits_on_the_same_counter_keep_the_tighter_one() -> None:
    # Same window, metric and scope: one Redis key, so one counter, and the stricter budget binds.
    cfg = QuotaConfig.from_plugin_config({"limits": [
        {"window": "minute", "tokens": 1000}, {"window": "minute", "tokens": 200},
        {"window": "minute", "tokens": 500}]})
    counters = plan_counters(cfg, "consumer:a", "gpt-4o", None, NOW)
    assert [c.limit for c in counters] == [200]


def test_unpriced_model_names_share_one_per_model_counter() -> None:
    # Client-chosen names: rotating them must not open a fresh budget each.
    cfg = QuotaConfig.from_plugin_config({"unknown_model": "default_price",
                                          "default_price": {"input": 1, "output": 2},
                                          "limits": [{"window": "day", "cost_usd": 0.001, "per_model": True}]})
    keys = {plan_counters(cfg, "consumer:a", name, None, NOW, priced=False)[0].key
            for name in ("mystery-0", "mystery-1", "openai/mystery-x")}
    assert len(keys) == 1 and ":unpriced:" in keys.pop()
    priced = {plan_counters(cfg, "consumer:a", name, None, NOW)[0].key for name in ("gpt-4o", "gpt-4o-mini")}
    assert len(priced) == 2  # priced models keep a counter each
    # A limit that names an unpriced model keeps that model apart.
    named = QuotaConfig.from_plugin_config({"unknown_model": "default_price",
                                            "default_price": {"input": 1, "output": 2},
                                            "limits": [{"window": "day", "tokens": 100, "per_model": True,
                                                        "models": ["llama-local", "mistral-local"]}]})
    own = {plan_counters(named, "consumer:a", name, None, NOW, priced=False)[0].key
           for name in ("llama-local", "mistral-local")}
    assert len(own) == 2


def test_usage_figures_written_as_decimal_strings_are_counted_and_junk_is_not() -> None:
    """Some OpenAI-compatible servers send "completion_tokens": "50": charging only the prompt
    would lose the answer's tokens. Anything that is not a plain count still reads as 0."""
    from aigov.llm_response import parse_upstream_response, token_count

    body = json.dumps({"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": "10", "completion_tokens": " 50 ", "total_tokens": 60}}).encode()
    usage = parse_upstream_response(200, {}, body).usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.metered_total) == (10, 50, 60)
    for junk in ("-5", "5.5", "1e3", "²", "", "9" * 40, True, float("nan"), -3, None, [7]):
        assert token_count(junk) == 0, junk
    assert token_count(7.9) == 7 and token_count("0012") == 12
