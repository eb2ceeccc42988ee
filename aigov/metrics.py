"""Prometheus metrics of the three plugins, under Kong's names where Kong has one.

Kong's own AI metrics (prometheus plugin, ai_metrics=true) are ai_llm_requests_total,
ai_llm_tokens_total{token_type}, ai_llm_cost_total, ai_cache_fetch_latency and
ai_cache_embeddings_latency (milliseconds). We keep those names and label sets close to Kong's so
existing dashboards work; the rest are ours, prefixed ai_ as well. The plugin server exposes them
with `start_metrics_server` (default 127.0.0.1 only).
"""
from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

# Latency buckets in milliseconds, as Kong's AI latency histograms use ms.
MS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

LLM_REQUESTS = Counter("ai_llm_requests_total", "AI requests seen by the aigov plugins",
                       ["ai_model", "cache_status", "vector_db", "embeddings_model"], registry=REGISTRY)
CACHE_FETCH_LATENCY = Histogram("ai_cache_fetch_latency", "Semantic cache lookup latency (ms)",
                                ["cache_status", "vector_db", "embeddings_model"], buckets=MS_BUCKETS,
                                registry=REGISTRY)
CACHE_EMBEDDINGS_LATENCY = Histogram("ai_cache_embeddings_latency", "Embedding latency for cache lookups (ms)",
                                     ["embeddings_model"], buckets=MS_BUCKETS, registry=REGISTRY)
CACHE_TOKENS_SAVED = Counter("ai_cache_tokens_saved_total", "Provider tokens not spent thanks to cache hits",
                             ["ai_model", "token_type"], registry=REGISTRY)
CACHE_COST_SAVED = Counter("ai_cache_cost_saved_total", "USD not spent thanks to cache hits",
                           ["ai_model"], registry=REGISTRY)

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
