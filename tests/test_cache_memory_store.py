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
