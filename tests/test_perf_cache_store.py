"""The redis cache store's round trips (issue 7 §2): storing an answer costs one Redis round trip,
not an FT.INFO index check each time, and an index dropped behind the store's back (Redis
restarted empty, a purge from another node) still comes back. Real Redis with RediSearch, real
MiniLM vectors; counts come from Redis's own INFO commandstats, not from timings."""
from __future__ import annotations

import os
import time
import uuid
from typing import Any

import numpy as np
import pytest
import redis as redislib

from aigov.cache.key import CacheScope
from aigov.cache.policies import CacheEntry
from aigov.cache.policies.redis import RedisStore
from aigov.redis_client import RedisLayer


def command_calls(client: redislib.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int((stats.get(f"cmdstat_{command}") or {}).get("calls", 0))


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from aigov.embeddings import get_embedder

    texts = [f"how do I reset the password of account {i}" for i in range(6)]
    return dict(zip(texts, get_embedder().embed(texts)))


def entry(key: str, prompt: str) -> CacheEntry:
    now = time.time()
    return CacheEntry(key=key, prompt=prompt, response={"choices": [{"message": {"content": prompt[::-1]}}]},
                      model="gpt-4o-mini", usage=None, created_at=now, expires_at=now + 300)


def test_puts_check_the_index_once_and_a_dropped_index_comes_back(redis_server: Any, vectors) -> None:
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    namespace = f"perfstore-{uuid.uuid4().hex[:8]}"
    store = RedisStore(RedisLayer(port=port, timeout_ms=1000), namespace, "all-MiniLM-L6-v2")
    scope = CacheScope(namespace, "id:c", "r", "gpt-4o-mini", "ctx", "params")
    client = redislib.Redis.from_url(redis_server.url)
    items = list(vectors.items())
    try:
        store.put(scope, items[0][1], entry("k0", items[0][0]))   # first put: creates the index
        info_before = command_calls(client, "FT.INFO")
        assert info_before >= 1  # the first put did check (the counter is real)
        for i, (prompt, vec) in enumerate(items[1:4], start=1):
            store.put(scope, vec, entry(f"k{i}", prompt))
        assert command_calls(client, "FT.INFO") == info_before     # no per-store index check
        found = store.search(scope, items[2][1], 1, 0.99)
        assert [e.key for e, _ in found] == ["k2"]

        # Another node purges the namespace's index; this process still believes it exists.
        index = store.index_name(int(items[0][1].shape[-1]))
        client.execute_command("FT.DROPINDEX", index)
        store.put(scope, items[4][1], entry("k4", items[4][0]))  # written without an index
        deadline = time.monotonic() + 10
        found = []
        while time.monotonic() < deadline and not found:  # FT.CREATE indexes existing keys in the background
            found = store.search(scope, items[4][1], 1, 0.99)
            if not found:
                time.sleep(0.05)
        assert [e.key for e, _ in found] == ["k4"]
        assert index.encode() in client.execute_command("FT._LIST")
    finally:
        store.purge()
        client.close()
