"""Prometheus metrics of the three plugins, under Kong's names where Kong has one.

Kong's own AI metrics (prometheus plugin, ai_metrics=true) are ai_llm_requests_total,
ai_llm_tokens_total{token_type}, ai_llm_cost_total, ai_cache_fetch_latency and
ai_cache_embeddings_latency (milliseconds). We keep those names and label sets close to Kong's so
existing dashboards work; the rest are ours, prefixed ai_ as well. The plugin server exposes them
with `start_metrics_server` (default 127.0.0.1 only).
"""
from __future__ import annotations

import hashlib
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.exposition import generate_latest

# Kong's prometheus plugin exposes no `*_created` series; one per counter and histogram series
# would double what a scrape carries for nothing a dashboard reads.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

OTHER = "other"            # the label value of every value past a vocabulary's cap
LABEL_MAX_CHARS = 64       # longest label value kept (a client may send a 1 MB "model")
MAX_UNPRICED_MODELS = 100  # distinct model names outside every price table, per process
DEFAULT_MAX_CONSUMERS = 10_000
DEFAULT_MAX_SERIES = 20_000  # per metric family whose labels come from clients (~0.75 KB each)


def bounded_label(value: str) -> str:
    """`value` if it fits LABEL_MAX_CHARS, else its start and a digest of the whole: two long
    values that share their first 64 characters (two service accounts) stay two series."""
    if len(value) <= LABEL_MAX_CHARS:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{value[:LABEL_MAX_CHARS - 9]}~{digest}"


# The client-derived labels a full family folds; a quota's "limit" names the model of a
# per-model limit ("400 tokens per day for model X"), which may be the client's made-up one.
FOLDABLE_LABELS = ("consumer", "ai_model", "limit")

# Latency buckets in milliseconds, as Kong's AI latency histograms use ms.
MS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

LLM_REQUESTS = Counter("ai_llm_requests_total", "AI requests seen by the aigov plugins",
                       ["ai_model", "cache_status", "vector_db", "embeddings_model"], registry=REGISTRY)
CACHE_FETCH_LATENCY = Histogram("ai_cache_fetch_latency", "Semantic cache lookup latency (ms)",
                                ["cache_status", "vector_db", "embeddings_model"], buckets=MS_BUCKETS,
                                registry=REGISTRY)
CACHE_EMBEDDINGS_LATENCY = Histogram("ai_cache_embeddings_latency", "Embedding latency for cache lookups (ms)",
                                     ["embeddings_model"], buckets=MS_BUCKETS, registry=REGISTRY)
CACHE_COST_SAVED = Counter("ai_cache_cost_saved_total",
                           "USD not spent thanks to cache hits, at the shipped price table's list price",
                           ["ai_model"], registry=REGISTRY)
CACHE_TOKENS_SAVED = Counter("ai_cache_tokens_saved_total", "Provider tokens not spent thanks to cache hits",
                             ["ai_model", "token_type"], registry=REGISTRY)
LLM_TOKENS = Counter("ai_llm_tokens_total", "Tokens metered by llm-token-quota",
                     ["ai_model", "token_type", "consumer"], registry=REGISTRY)
LLM_COST = Counter("ai_llm_cost_total", "USD metered by llm-token-quota", ["ai_model", "consumer"],
                   registry=REGISTRY)
QUOTA_REJECTIONS = Counter("ai_quota_rejections_total", "Requests rejected by a quota",
                           ["consumer", "limit", "window"], registry=REGISTRY)
QUOTA_REMAINING = Gauge("ai_quota_remaining", "Remaining budget per consumer, limit and window",
                        ["consumer", "limit", "window"], registry=REGISTRY)
QUOTA_SETTLE_LATENCY = Histogram("ai_quota_settle_latency", "Latency of settling a reservation (ms)",
                                 buckets=MS_BUCKETS, registry=REGISTRY)
QUOTA_UNKNOWN_MODEL = Counter("ai_quota_unknown_model_total", "Requests for models missing from the price table",
                              ["ai_model", "action"], registry=REGISTRY)
QUOTA_STORE_FAILURES = Counter("ai_quota_store_failures_total", "Quota store failures by policy outcome",
                               ["outcome"], registry=REGISTRY)

ROUTER_DECISIONS = Counter("ai_router_decisions_total", "Semantic routing decisions", ["route", "reason"],
                           registry=REGISTRY)
ROUTER_DECISION_LATENCY = Histogram("ai_router_decision_latency", "Semantic routing decision latency (ms)",
                                    buckets=MS_BUCKETS, registry=REGISTRY)

LABEL_OVERFLOW = Counter("ai_metrics_label_overflow_total",
                         "Observations reported under 'other' because the label's vocabulary was full",
                         ["label"], registry=REGISTRY)


class LabelVocabulary:
    """The values one label may take when they come from outside the config (client-chosen model
    names, caller identities): Prometheus keeps every series for the life of the process, so a
    label fed from client input grows memory and every scrape without end. The first `cap`
    distinct values are kept; later new ones are reported as "other" and counted in
    ai_metrics_label_overflow_total{label}."""

    def __init__(self, label: str, cap: int) -> None:
        self.label = label
        self.cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, raw_value: Any) -> str | None:
        """The label value for `raw_value`, or None when it is past the cap (a caller that sets a
        gauge skips it: "other" would hold whichever caller came last)."""
        label_value = bounded_label(raw_value) if isinstance(raw_value, str) else ""
        if label_value in self._seen:
            return label_value
        with self._lock:
            if len(self._seen) < self.cap or label_value in self._seen:
                self._seen.add(label_value)
                return label_value
        LABEL_OVERFLOW.labels(self.label).inc()
        return None

    def __len__(self) -> int:
        return len(self._seen)


UNPRICED_MODELS = LabelVocabulary("ai_model", MAX_UNPRICED_MODELS)
CONSUMERS = LabelVocabulary("consumer", DEFAULT_MAX_CONSUMERS)


def model_label(model: Any, priced_as: str | None = None) -> str:
    """The ai_model label of a model name: its price-table name when it has one (the table is
    config, so bounded), else the name itself among the first MAX_UNPRICED_MODELS such names,
    else "other"."""
    if priced_as:
        return bounded_label(priced_as)
    from aigov.prices import default_prices  # lazy: only the plugins load the price file
    table_name = default_prices().resolve(model) if isinstance(model, str) else None
    if table_name:
        return bounded_label(table_name)
    kept = UNPRICED_MODELS(model.strip().lower() if isinstance(model, str) else "")
    return OTHER if kept is None else kept


def consumer_label(tag: Any) -> str:
    """The consumer label of a caller for counters: "other" past the cap (see LabelVocabulary).
    A gauge calls CONSUMERS(tag) itself and skips None."""
    kept = CONSUMERS(tag)
    return OTHER if kept is None else kept


class SeriesBudget:
    """At most `cap` label sets per metric family. Each vocabulary bounds one label, but a
    family's series are their product (10,000 consumers x 22 priced models x 7 token types is
    1.5 million series, gigabytes): past the cap, a new label set is counted with its consumer and
    model as "other" (the totals stay exact), and a gauge is not set."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._seen: dict[str, set[tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def child(self, metric: Any, *values: str, gauge: bool = False) -> Any:
        """metric.labels(*values), or its folded form past the cap (None for a gauge)."""
        seen = self._seen.get(metric._name)
        if seen is not None and values in seen:
            return metric.labels(*values)
        with self._lock:
            seen = self._seen.setdefault(metric._name, set())
            if values in seen or len(seen) < self.cap:
                seen.add(values)
                return metric.labels(*values)
        LABEL_OVERFLOW.labels("series").inc()
        if gauge:
            return None
        folded = tuple(OTHER if name in FOLDABLE_LABELS else v for name, v in zip(metric._labelnames, values))
        return metric.labels(*folded)  # few: only the config-bound labels still vary


SERIES = SeriesBudget(DEFAULT_MAX_SERIES)


def set_max_series(cap: int) -> None:
    """`aigov serve --metrics-max-series`: label sets per metric family (see SeriesBudget)."""
    SERIES.cap = max(1, int(cap))


def set_max_consumers(cap: int) -> None:
    """`aigov serve --metrics-max-consumers`: how many distinct consumers get their own series."""
    CONSUMERS.cap = max(0, int(cap))


_server_lock = threading.Lock()
_server_started: dict[str, Any] = {}


def start_metrics_server(address: str = "127.0.0.1:9542") -> tuple[str, int]:
    """Serve /metrics on host:port once per process; returns the bound (host, port)."""
    host, _, port = address.rpartition(":")
    host = host or "127.0.0.1"
    with _server_lock:
        if address in _server_started:
            return _server_started[address]
        server, _thread = start_http_server(int(port), addr=host, registry=REGISTRY)
        bound = (host, server.server_address[1])
        _server_started[address] = bound
        return bound


def exposition() -> bytes:
    """The current metrics in Prometheus text format."""
    return generate_latest(REGISTRY)
