"""The in-process cache store's memory budget (vectordb.max_memory_mb)."""
from __future__ import annotations

import time

import numpy as np

from aigov.cache.policies.memory import MemoryStore



def test_memory_store_budget_covers_many_one_entry_scopes() -> None:
    """One entry per scope (per consumer, per system prompt): each scope's matrix is in the
    budget too, so 5,000 scopes under a 1 MB budget keep their vectors within it."""
    from aigov.cache.key import CacheScope
    from aigov.cache.policies import CacheEntry

    store = MemoryStore("scopes", max_entries=100000, max_bytes=1024 * 1024)
    vec = np.ones(384, dtype=np.float32) / np.sqrt(384)
    now = time.time()
    for i in range(5000):
        store.put(CacheScope("scopes", f"c{i}", "r", "m", "x", "p"), vec,
                  CacheEntry(f"k{i}", "hi", {"choices": []}, "m", None, now, now + 60))
    matrices = sum(b._matrix.nbytes for b in store._buckets.values())
    assert store.bytes <= 1024 * 1024 and 100 < len(store) < 5000
    assert matrices <= store.bytes // 2, (matrices, store.bytes)  # the estimate covers the rows


def test_memory_store_budget_counts_the_model_and_usage() -> None:
    from aigov.cache.key import CacheScope
    from aigov.cache.policies import CacheEntry

    store = MemoryStore("big-model", max_entries=1000, max_bytes=1024 * 1024)
    vec = np.ones(8, dtype=np.float32) / np.sqrt(8)
    now = time.time()
    for i in range(20):
        store.put(CacheScope("big-model", "c", "r", "m", "x", "p"), vec,
                  CacheEntry(f"k{i}", "hi", {"choices": []}, "m" * 200_000, {"note": "u" * 1000}, now, now + 60))
    assert store.bytes <= 1024 * 1024 and len(store) <= 5  # 200 KB of model name each


def test_exact_lookup_answers_only_within_the_entry_scope() -> None:
    # The exact key already hashes the scope; the store checks the bucket too, so a key that
    # reached another scope (a collision, a caller's bug) never serves another consumer's answer.
    from aigov.cache.key import CacheScope
    from aigov.cache.policies import CacheEntry

    store = MemoryStore("exact", max_entries=100, max_bytes=1024 * 1024)
    vec = np.ones(8, dtype=np.float32) / np.sqrt(8)
    now = time.time()
    alice = CacheScope("exact", "alice", "r", "m", "x", "p")
    store.put(alice, vec, CacheEntry("same-key", "hi", {"choices": []}, "m", None, now, now + 60))
    assert store.get_exact(alice, "same-key") is not None
    assert store.get_exact(CacheScope("exact", "bob", "r", "m", "x", "p"), "same-key") is None
    assert store.get_exact(CacheScope("exact", "alice", "r", "m", "x", "other-params"), "same-key") is None
