"""The in-process store: one numpy matrix per scope, bounded size, absolute TTL, LRU eviction.

Single-node only (each plugin-server process has its own). Stores are shared per namespace and
dimension at module level, so a Kong config change (which rebuilds plugin instances, reference
§2.6) keeps the cached entries.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from collections import OrderedDict
from itertools import islice

import numpy as np

from aigov.cache.key import CacheScope
from aigov.cache.policies import CacheEntry

DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # vectordb.max_memory_mb's default


class _Bucket:
    """One scope's vectors: rows [0, n) of a matrix that grows by doubling, a key -> row map, and
    removal by moving the last row into the hole. A put or an eviction never copies the whole
    scope (re-stacking the matrix made 10,000 puts into one scope take 14 s, each under the
    store's lock)."""

    MIN_ROWS = 1  # a scope of one entry (per consumer, per system prompt) holds one row, not 16

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.keys: list[str] = []          # row -> key
        self._rows: dict[str, int] = {}    # key -> row
        self._matrix = np.zeros((0, dim), dtype=np.float32)

    @property
    def matrix(self) -> np.ndarray:
        return self._matrix[: len(self.keys)]

    def add(self, key: str, vector: np.ndarray) -> None:
        row = self._rows.get(key)
        if row is not None:
            self._matrix[row] = vector
            return
        n = len(self.keys)
        if n == self._matrix.shape[0]:
            grown = np.zeros((max(self.MIN_ROWS, 2 * n), self.dim), dtype=np.float32)
            grown[:n] = self._matrix[:n]
            self._matrix = grown
        self._matrix[n] = vector
        self.keys.append(key)
        self._rows[key] = n

    def remove(self, key: str) -> None:
        row = self._rows.pop(key, None)
        if row is None:
            return
        last = len(self.keys) - 1
        if row != last:
            moved = self.keys[last]
            self._matrix[row] = self._matrix[last]
            self.keys[row] = moved
            self._rows[moved] = row
        self.keys.pop()
        capacity = self._matrix.shape[0]
        if capacity > 4 and len(self.keys) < capacity // 4:
            self._matrix = self._matrix[: capacity // 2].copy()  # a shrunken scope gives memory back


class MemoryStore:
    name = "memory"

    def __init__(self, namespace: str, max_entries: int = 10000, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.namespace = namespace
        self.max_entries = max(1, int(max_entries))
        self.max_bytes = max(1, int(max_bytes))
        self._lock = threading.Lock()
        self._entries: "OrderedDict[str, tuple[str, CacheEntry]]" = OrderedDict()  # key -> (bucket, entry), LRU order
        self._buckets: dict[str, _Bucket] = {}
        self._sizes: dict[str, int] = {}   # key -> estimated bytes
        self.bytes = 0

    @staticmethod
    def entry_bytes(entry: CacheEntry, dim: int) -> int:
        """What an entry holds in memory, estimated: its prompt, key and model strings, twice the
        JSON of its answer, usage and meta (parsed dicts and strings take more than their text),
        its vector row twice (a matrix that grows by doubling is at most half empty) and 1.5 KB
        of bookkeeping (its entry, LRU and row-map slots, and its scope's share when the scope
        holds only it)."""
        return (sys.getsizeof(entry.prompt) + sys.getsizeof(entry.key) + sys.getsizeof(entry.model or "")
                + 2 * len(json.dumps([entry.response, entry.usage, entry.meta], default=str)) + 8 * dim + 1536)

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: str) -> None:
        bucket_id, _ = self._entries.pop(key)
        self.bytes -= self._sizes.pop(key, 0)
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
            want = min(len(sims), max(1, k) * 2)
            top = np.argpartition(-sims, want - 1)[:want] if want < len(sims) else np.arange(len(sims))
            # keys and similarities first: _live may drop an expired entry, which moves rows
            candidates = [(bucket.keys[i], float(sims[i])) for i in top[np.argsort(-sims[top])]]
            out: list[tuple[CacheEntry, float]] = []
            for key, sim in candidates:
                if not sim >= min_similarity or len(out) >= k:  # NaN is never a hit
                    break
                entry = self._live(key, now)
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
        size = self.entry_bytes(entry, int(vector.shape[-1]))
        with self._lock:
            if entry.key in self._entries:
                self._drop(entry.key)
            if size > self.max_bytes:
                return  # bigger than the whole budget: not kept (a miss next time, never an error)
            bucket = self._buckets.get(scope.bucket)
            if bucket is None or bucket.dim != vector.shape[-1]:
                bucket = self._buckets[scope.bucket] = _Bucket(int(vector.shape[-1]))
            bucket.add(entry.key, vector)
            self._entries[entry.key] = (scope.bucket, entry)
            self._sizes[entry.key] = size
            self.bytes += size
            now = time.time()
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)  # least recently used (hits move entries to the end)
            # expired entries are also dropped lazily on read; sweep a few here to bound memory
            for key in list(islice(self._entries, 8)):
                self._live(key, now)

    def purge(self) -> int:
        with self._lock:
            n = len(self._entries)
            self._entries.clear()
            self._buckets.clear()
            self._sizes.clear()
            self.bytes = 0
            return n


_STORES: dict[str, MemoryStore] = {}
_STORES_LOCK = threading.Lock()


def shared_memory_store(namespace: str, max_entries: int = 10000,
                        max_bytes: int = DEFAULT_MAX_BYTES) -> MemoryStore:
    """The process-wide memory store of a namespace (its size bounds follow the latest config)."""
    with _STORES_LOCK:
        store = _STORES.get(namespace)
        if store is None:
            store = _STORES[namespace] = MemoryStore(namespace, max_entries, max_bytes)
        store.max_entries = max(1, int(max_entries))
        store.max_bytes = max(1, int(max_bytes))
        return store
