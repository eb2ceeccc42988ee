"""The in-process store: one numpy matrix per scope, bounded size, absolute TTL, LRU eviction.

Single-node only (each plugin-server process has its own). Stores are shared per namespace and
dimension at module level, so a Kong config change (which rebuilds plugin instances, reference
§2.6) keeps the cached entries.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

import numpy as np

from aigov.cache.key import CacheScope
from aigov.cache.policies import CacheEntry


class _Bucket:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.keys: list[str] = []
        self.matrix = np.zeros((0, dim), dtype=np.float32)

    def add(self, key: str, vector: np.ndarray) -> None:
        if key in self.keys:
            self.matrix[self.keys.index(key)] = vector
            return
        self.keys.append(key)
        self.matrix = np.vstack([self.matrix, vector.reshape(1, -1).astype(np.float32)])

    def remove(self, key: str) -> None:
        if key in self.keys:
            i = self.keys.index(key)
            self.keys.pop(i)
            self.matrix = np.delete(self.matrix, i, axis=0)


class MemoryStore:
    name = "memory"

    def __init__(self, namespace: str, max_entries: int = 10000) -> None:
        self.namespace = namespace
        self.max_entries = max(1, int(max_entries))
        self._lock = threading.Lock()
        self._entries: "OrderedDict[str, tuple[str, CacheEntry]]" = OrderedDict()  # key -> (bucket, entry), LRU order
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: str) -> None:
        bucket_id, _ = self._entries.pop(key)
        bucket = self._buckets.get(bucket_id)
        if bucket is not None:
            bucket.remove(key)
            if not bucket.keys:
                del self._buckets[bucket_id]

    def _live(self, key: str, now: float) -> CacheEntry | None:
        item = self._entries.get(key)
        if item is None:
            return None
        if item[1].expires_at <= now:
            self._drop(key)
            return None
        return item[1]

    def get_exact(self, scope: CacheScope, key: str) -> CacheEntry | None:
        with self._lock:
            entry = self._live(key, time.time())
            if entry is not None and self._entries[key][0] == scope.bucket:
                self._entries.move_to_end(key)
                return entry
            return None

    def search(self, scope: CacheScope, vector: np.ndarray, k: int,
               min_similarity: float) -> list[tuple[CacheEntry, float]]:
        now = time.time()
        with self._lock:
            bucket = self._buckets.get(scope.bucket)
            if bucket is None or not bucket.keys:
                return []
            if bucket.dim != vector.shape[-1]:
                return []
            sims = bucket.matrix @ vector.astype(np.float32)
            order = np.argsort(-sims)[: max(1, k) * 2]
            out: list[tuple[CacheEntry, float]] = []
            keys = list(bucket.keys)
            for i in order:
                sim = float(sims[i])
                if not sim >= min_similarity or len(out) >= k:  # NaN is never a hit
                    break
                entry = self._live(keys[i], now)
                if entry is not None:
                    out.append((entry, sim))
            for entry, _ in out:
                self._entries.move_to_end(entry.key)
            return out

    def get_exact_and_search(self, scope: CacheScope, key: str, vector: np.ndarray, k: int,
                             min_similarity: float
                             ) -> tuple[CacheEntry | None, list[tuple[CacheEntry, float]]]:
        """The exact probe, then the KNN search only on an exact miss (both in process)."""
        entry = self.get_exact(scope, key)
        if entry is not None:
            return entry, []
        return None, self.search(scope, vector, k, min_similarity)

    def put(self, scope: CacheScope, vector: np.ndarray, entry: CacheEntry) -> None:
        with self._lock:
            if entry.key in self._entries:
                self._drop(entry.key)
            bucket = self._buckets.get(scope.bucket)
            if bucket is None or bucket.dim != vector.shape[-1]:
                bucket = self._buckets[scope.bucket] = _Bucket(int(vector.shape[-1]))
            bucket.add(entry.key, vector)
            self._entries[entry.key] = (scope.bucket, entry)
            now = time.time()
            while len(self._entries) > self.max_entries:
                oldest = next(iter(self._entries))
                self._drop(oldest)  # least recently used (hits move entries to the end)
            # expired entries are also dropped lazily on read; sweep a few here to bound memory
            for key in list(self._entries)[:8]:
                self._live(key, now)

    def purge(self) -> int:
        with self._lock:
            n = len(self._entries)
            self._entries.clear()
            self._buckets.clear()
            return n


_STORES: dict[str, MemoryStore] = {}
_STORES_LOCK = threading.Lock()


def shared_memory_store(namespace: str, max_entries: int = 10000) -> MemoryStore:
    """The process-wide memory store of a namespace (its size bound follows the latest config)."""
    with _STORES_LOCK:
        store = _STORES.get(namespace)
        if store is None:
            store = _STORES[namespace] = MemoryStore(namespace, max_entries)
        store.max_entries = max(1, int(max_entries))
        return store
