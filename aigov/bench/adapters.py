"""Thin adapters from the benchmark's needs to our own modules (cache store, router, quota).

The benchmark drives the library pieces the plugins use, not copies of them; everything that
depends on another engineer's interface is here, so an interface change is fixed in one place.
A missing module raises SectionSkipped with the reason.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from aigov.bench.common import BenchContext, SectionSkipped, require_module


# ---------------------------------------------------------------- router
@dataclass
class RouterAdapter:
    model: Any
    description: dict[str, Any]

    def decide_vector(self, vec: np.ndarray) -> str:
        route, _conf, _best = self.model.decide(vec)
        return route if route is not None else "oos"


def router(split: dict[str, Any], table: Any) -> RouterAdapter:
    """Our routing model trained by its own code on the same references (+ train oos negatives)."""
    model_mod = require_module("aigov.routing.model", "the router model")
    names = list(split["intents"])
    texts = [t for i in names for t in split["refs"][i]]
    labels = np.array([k for k, i in enumerate(names) for _ in split["refs"][i]], dtype=np.int64)
    vectors = np.stack([table[t] for t in texts])
    negatives = [t for t, truth in split["calibration"] if truth == "oos"]
    neg_vectors = np.stack([table[t] for t in negatives]) if negatives else None
    model = model_mod.fit(names, vectors, labels, neg_vectors, model_id=getattr(table.embedder, "model_id", ""))
    return RouterAdapter(model, {"threshold": round(model.threshold, 4), "negatives": len(negatives),
                                 "calibration": "its own out-of-fold calibration"})


# ---------------------------------------------------------------- cache store
@dataclass
class CacheHit:
    meta: dict[str, Any]
    similarity: float


class CacheStoreAdapter:
    """aigov.cache.core.SemanticCache on the redis (HNSW) store, as the plugin builds it.

    The threshold is set to its lowest allowed value (0.5) so the top candidate that passes the
    verifier comes back with its similarity; the benchmark sweeps the threshold afterwards.
    """

    def __init__(self, ctx: BenchContext, embedder: Any, namespace: str) -> None:
        from urllib.parse import urlsplit

        core = require_module("aigov.cache.core", "the semantic cache core")
        key_mod = require_module("aigov.cache.key", "the cache key module")
        u = urlsplit(ctx.redis())
        # A day's TTL: filling 100k entries takes minutes, and the default 300 s would expire the
        # first ones before the last are in (the index would shrink while it is measured).
        conf = {"cache_ttl": 86400,
                "vectordb": {"strategy": "redis", "threshold": 0.5, "namespace": f"bench-{namespace}-{uuid.uuid4().hex[:8]}",
                             "redis": {"host": u.hostname or "127.0.0.1", "port": u.port or 6379,
                                       "timeout_ms": 2000}}}
        self.settings = core.CacheSettings.from_config(conf)
        self.default_threshold = float(core.CacheSettings.from_config({}).threshold)
        self.cache = core.SemanticCache(self.settings, embedder=embedder) if embedder is not None \
            else core.SemanticCache(self.settings)
        self.scope = key_mod.CacheScope(namespace=self.settings.namespace, consumer="bench", route="bench",
                                        model="gpt-4o-mini", context="", params="")
        self.description = (f"aigov.cache redis store (HNSW, COSINE), verifier "
                            f"{'on' if getattr(self.settings, 'verifier', False) else 'off'}")
        self._entry_of_key: dict[str, int] = {}

    def put(self, prompt: str, vector: np.ndarray, answer: str, meta: dict[str, Any]) -> None:
        key = f"bench-{meta['entry']}"
        self._entry_of_key[key] = int(meta["entry"])
        completion = {"id": key, "object": "chat.completion", "model": "gpt-4o-mini",
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                   "finish_reason": "stop"}]}
        self.cache.save(self.scope, key, prompt, np.asarray(vector, dtype=np.float32), completion, None, "gpt-4o-mini")

    def put_many_vectors(self, vectors: np.ndarray, start_id: int) -> None:
        for i, vec in enumerate(vectors, start=start_id):
            self.put(f"synthetic entry {i}", vec, "a", {"entry": i})

    def wait_indexed(self, count: int, timeout_s: float = 120.0) -> None:
        import time

        store = self.cache.store
        index = store.index_name(384)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fields = _ft_info(store.layer.client, index)
            docs = int(fields.get("num_docs", 0))
            pct = float(fields.get("percent_indexed", 1) or 1)
            if docs >= count and pct >= 1.0:
                return
            time.sleep(0.1)
        # Lookups against a half-built index would time something else: the level fails.
        raise RuntimeError(f"index {index} not built within {timeout_s:.0f} s ({docs} of {count} entries)")

    def memory_bytes(self) -> dict[str, int]:
        client = self.cache.store.layer.client
        out = {"used_memory": int(client.info("memory")["used_memory"])}
        try:
            fields = _ft_info(client, self.cache.store.index_name(384))
            out["vector_index"] = int(float(fields.get("vector_index_sz_mb", 0)) * 1024 * 1024)
            out["ft_total"] = int(float(fields.get("total_index_memory_sz_mb", 0) or 0) * 1024 * 1024)
        except Exception:  # noqa: BLE001 - no index yet: only INFO memory
            pass
        return out

    def _lookup(self, prompt: str, vector: np.ndarray | None) -> CacheHit | None:
        res = self.cache.lookup(self.scope, prompt, f"query-{uuid.uuid4().hex}", vector)
        if res.status != "Hit" or res.entry is None:
            return None
        return CacheHit({"entry": self._entry_of_key.get(res.entry.key)}, float(res.similarity or 1.0))

    def lookup_text(self, prompt: str) -> CacheHit | None:
        return self._lookup(prompt, None)

    def lookup_vector(self, vector: np.ndarray, prompt: str = "") -> CacheHit | None:
        """Lookup with the embedding given (the prompt still feeds the verifier)."""
        return self._lookup(prompt, np.asarray(vector, dtype=np.float32))

    def drop(self) -> None:
        self.cache.store.purge()


def _ft_info(client: Any, index: str) -> dict[str, Any]:
    """FT.INFO as a str-keyed dict (redis-py returns a flat list or a dict, by version)."""
    info = client.execute_command("FT.INFO", index)
    pairs = info.items() if isinstance(info, dict) else zip(info[::2], info[1::2])
    out = {}
    for k, v in pairs:
        out[k.decode() if isinstance(k, bytes) else str(k)] = v.decode() if isinstance(v, bytes) else v
    return out


def cache_store(ctx: BenchContext, embedder: Any, namespace: str) -> CacheStoreAdapter:
    """Our redis (HNSW) cache store on the run's Redis, in a namespace of its own."""
    return CacheStoreAdapter(ctx, embedder, namespace)


# ---------------------------------------------------------------- quota
class QuotaAdapter:
    """Check-and-reserve then settle through our quota store, as the plugin does per request."""

    def __init__(self, policy: str, redis_url: str | None, key_prefix: str) -> None:
        core = require_module("aigov.quota.core", "the quota core")
        self._core = core
        self.config = core.QuotaConfig.from_plugin_config({
            "limits": [{"window": "minute", "tokens": 10_000_000}, {"window": "day", "cost_usd": 1000.0}],
            "policy": policy, "key_prefix": key_prefix,
        })
        if policy == "redis":
            from aigov.quota.policies.redis import RedisQuotaStore
            from aigov.redis_client import RedisLayer

            self._layer = RedisLayer(url=redis_url, timeout_ms=2000)
            self.store = RedisQuotaStore(self._layer, key_prefix)
        else:
            from aigov.quota.policies.memory import MemoryQuotaStore

            self._layer = None
            self.store = MemoryQuotaStore()

    def check(self, consumer: str, now: float, amount: int = 600) -> tuple[str, list[Any]]:
        """The access-path work: plan the caller's counters and reserve atomically."""
        tag = self._core.identity_tag("consumer", consumer)
        counters = self._core.plan_counters(self.config, tag, "gpt-4o-mini", None, now)
        rid = uuid.uuid4().hex
        result = self.store.reserve(tag, rid, counters, [amount] * len(counters), now,
                                    self.config.reservation_ttl_s)
        if not result.admitted:
            raise RuntimeError(f"quota bench: consumer {consumer} unexpectedly blocked")
        return rid, counters

    def settle(self, consumer: str, rid: str, counters: list[Any], now: float, amount: int = 400) -> None:
        tag = self._core.identity_tag("consumer", consumer)
        self.store.settle(tag, rid, counters, [amount] * len(counters), now, self.config.reservation_ttl_s)

    def close(self) -> None:
        if self._layer is not None:
            self._layer.client.close()
