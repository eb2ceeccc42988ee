"""Metric label values that come from clients stay bounded.

Prometheus keeps every series for the life of the plugin server, so a label fed from client input
(a made-up model name, a caller identity from a header or an IP) would grow its memory and every
scrape without end. The model label is the price-table name when there is one, otherwise one of
the first MAX_UNPRICED_MODELS names, else "other"; consumers past `--metrics-max-consumers` are
counted under "other" and get no ai_quota_remaining gauge. Totals never lose a token.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from aigov import metrics
from aigov.demo.run import metric_sum, scrape
from aigov.devredis import free_port
from kongsim.gateway import aigov_entries
from kongsim.pytest_plugin import GatewayHandle, make_prefix, start_gateway

REPO = Path(__file__).resolve().parent.parent
MAX_CONSUMERS = 3
MAX_SERIES = 40


def test_vocabulary_keeps_the_first_values_then_answers_none() -> None:
    vocab = metrics.LabelVocabulary("t", cap=2)
    before = metric_sum(scrape_registry(), "ai_metrics_label_overflow_total", label="t")
    assert vocab("a") == "a" and vocab("b") == "b"
    assert vocab("c") is None
    assert vocab("a") == "a"  # a kept value stays kept
    assert vocab("x" * 1000) is None
    assert len(vocab) == 2
    assert metric_sum(scrape_registry(), "ai_metrics_label_overflow_total", label="t") - before == 2


def test_model_label_prefers_the_price_table_and_truncates() -> None:
    assert metrics.model_label("gpt-4o-mini-2024-07-18") == "gpt-4o-mini"   # shipped table name
    assert metrics.model_label("OpenAI/GPT-4o") == "gpt-4o"
    assert metrics.model_label("my-llama", priced_as="my-llama") == "my-llama"  # the config's table
    assert len(metrics.model_label("z" * 5000)) <= metrics.LABEL_MAX_CHARS
    assert metrics.model_label(["a", "list"]) == ""


def test_long_label_values_that_share_a_prefix_stay_apart() -> None:
    # Cut at 64 characters, two service accounts named ...-prod-A and ...-prod-B shared a series.
    a = "svc-platform-observability-ingestion-pipeline-europe-west-1-prod-A"
    b = a[:-1] + "B"
    assert metrics.bounded_label(a) != metrics.bounded_label(b)
    assert len(metrics.bounded_label(a)) == metrics.LABEL_MAX_CHARS
    assert metrics.bounded_label(a) == metrics.bounded_label(a)  # stable
    assert metrics.bounded_label("short") == "short"
    vocabulary = metrics.LabelVocabulary("consumer", 10)
    assert vocabulary(a) != vocabulary(b)


def test_series_budget_folds_client_labels_and_keeps_totals() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge

    registry = CollectorRegistry()
    tokens = Counter("t_tokens_total", "t", ["ai_model", "token_type", "consumer"], registry=registry)
    remaining = Gauge("t_remaining", "t", ["consumer", "limit"], registry=registry)
    budget = metrics.SeriesBudget(cap=50)
    for consumer in range(40):
        for model in ("a", "b", "c"):
            budget.child(tokens, model, "prompt_tokens", f"c{consumer}").inc(2)
        gauge = budget.child(remaining, f"c{consumer}", "day", gauge=True)
        if gauge is not None:
            gauge.set(consumer)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in registry.collect() for s in fam.samples if s.name == "t_tokens_total"}
    assert len(samples) == 50 + 1  # the cap, then one folded series (token_type is config-bound)
    assert sum(samples.values()) == 40 * 3 * 2
    assert samples[("t_tokens_total", (("ai_model", "other"), ("consumer", "other"), ("token_type", "prompt_tokens")))] > 0
    gauges = [s for fam in registry.collect() for s in fam.samples if s.name == "t_remaining"]
    assert len(gauges) == 40  # its own family: under the cap, every gauge set
    assert budget.child(tokens, "a", "prompt_tokens", "c0") is tokens.labels("a", "prompt_tokens", "c0")


def test_series_budget_folds_a_limit_label_naming_a_client_model() -> None:
    """A per-model limit's label names the model ("... for model X"), which may be made up."""
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    rejections = Counter("t_rejections_total", "t", ["consumer", "limit", "window"], registry=registry)
    budget = metrics.SeriesBudget(cap=10)
    for i in range(300):
        budget.child(rejections, "other", f"100 tokens per day for model made-up-{i}", "day").inc()
    series = [s for fam in registry.collect() for s in fam.samples if s.name == "t_rejections_total"]
    assert len(series) == 11 and sum(s.value for s in series) == 300


def scrape_registry() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def gateway(mock_llm: Any) -> Iterator[dict[str, Any]]:
    quota = {"name": "llm-token-quota", "config": {
        "identifier_sources": ["header"], "identifier_header": "X-Caller",
        "unknown_model": "default_price", "default_price": {"input": 1.0, "output": 2.0},
        "limits": [{"window": "day", "tokens": 1_000_000_000}]}}
    cache = {"name": "llm-semantic-cache", "config": {"vectordb": {"strategy": "memory"}}}
    decl = {"_format_version": "3.0", "services": [{"name": "llm", "url": mock_llm.url, "routes": [{
        "name": "chat", "paths": ["/v1/chat"], "strip_path": False, "plugins": [quota, cache]}]}]}
    prefix = make_prefix()
    port = free_port()
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    server = aigov_entries(("llm-token-quota", "llm-semantic-cache"), prefix, pythonpath=str(REPO),
                           extra_env=env, serve_args=["--metrics-listen", f"127.0.0.1:{port}",
                                                      "--metrics-max-consumers", str(MAX_CONSUMERS),
                                                      "--metrics-max-series", str(MAX_SERIES)])
    gw: GatewayHandle = start_gateway(decl, server=server, prefix=prefix)
    try:
        yield {"gw": gw, "url": f"http://127.0.0.1:{port}/metrics"}
    finally:
        gw.close()


def test_client_chosen_models_and_callers_stay_bounded(gateway: dict[str, Any]) -> None:
    gw = gateway["gw"]
    n_models = metrics.MAX_UNPRICED_MODELS + 20
    callers = [f"caller-{i}" for i in range(MAX_CONSUMERS + 5)]
    prompt_tokens = 0
    for i in range(n_models):
        model = f"made-up-{uuid.uuid4().hex}" + ("q" * 4000 if i == 0 else "")
        reply = gw.request("POST", "/v1/chat/completions", headers={"X-Caller": callers[i % len(callers)]},
                           json={"model": model, "max_tokens": 8,
                                 "messages": [{"role": "user", "content": f"question number {i} {uuid.uuid4()}"}]},
                           timeout=60)
        assert reply.status == 200, reply.body[:300]
        prompt_tokens += int(reply.header("X-AI-Tokens-Prompt"))
    assert gw.wait_logs(20)
    samples = scrape(gateway["url"])

    def values(name: str, label: str) -> set[str]:
        return {dict(lbls)[label] for (n, lbls) in samples if n == name and label in dict(lbls)}

    for name in ("ai_llm_tokens_total", "ai_quota_unknown_model_total", "ai_llm_requests_total"):
        models = values(name, "ai_model")
        assert "other" in models, name
        assert len(models) <= metrics.MAX_UNPRICED_MODELS + 1, (name, len(models))
        assert max(len(m) for m in models) <= metrics.LABEL_MAX_CHARS, name
    consumers = values("ai_llm_tokens_total", "consumer")
    assert len(consumers) == MAX_CONSUMERS + 1 and "other" in consumers, consumers
    gauged = values("ai_quota_remaining", "consumer")
    assert len(gauged) == MAX_CONSUMERS and "other" not in gauged, gauged
    # folding labels loses no accounting: every prompt token the quota reported is counted
    assert metric_sum(samples, "ai_llm_tokens_total", token_type="prompt_tokens") == prompt_tokens
    assert metric_sum(samples, "ai_quota_unknown_model_total") == n_models
    assert metric_sum(samples, "ai_llm_requests_total") == n_models
    assert metric_sum(samples, "ai_metrics_label_overflow_total", label="ai_model") > 0
    assert metric_sum(samples, "ai_metrics_label_overflow_total", label="consumer") > 0
    # and a family's series stay under --metrics-max-series, plus one folded set per token type
    token_series = [lbls for (n, lbls) in samples if n == "ai_llm_tokens_total"]
    assert len(token_series) <= MAX_SERIES + 3, len(token_series)
    assert metric_sum(samples, "ai_metrics_label_overflow_total", label="series") > 0


def test_exposition_has_no_created_series() -> None:
    # Kong's prometheus plugin has none; prometheus_client adds one per series unless told not to.
    from aigov import metrics

    metrics.QUOTA_REJECTIONS.labels("consumer:created-test", "1 tokens per day", "day").inc()
    text = metrics.generate_latest(metrics.REGISTRY).decode()
    assert "ai_quota_rejections_total{" in text
    assert "_created" not in text
