"""Helpers for the verifier tests: both-direction verdicts, and, through the cache with the real
model, a memory-store cache at the default threshold and one stored/asked pair looked up in a
scope of its own."""
from __future__ import annotations

import json
import uuid
from typing import Any, Iterator

from aigov.cache.core import CacheSettings, SemanticCache
from aigov.cache.key import exact_key, scope_for
from aigov.cache.verifier import verify
from aigov.request import parse_chat_request


def memory_cache(prefix: str) -> Iterator[SemanticCache]:
    """The body of a module-scoped `cache` fixture (default threshold 0.82, verifier on)."""
    settings = CacheSettings.from_config({"vectordb": {"strategy": "memory",
                                                       "namespace": f"{prefix}-{uuid.uuid4().hex[:8]}"}})
    cache = SemanticCache(settings)
    try:
        yield cache
    finally:
        cache.store.purge()


def lookup_pair(cache: SemanticCache, stored: str, asked: str) -> Any:
    """Store `stored`, then look `asked` up; one scope per pair, so pairs cannot answer each other."""
    def req(text: str) -> Any:
        return parse_chat_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}))
    consumer = uuid.uuid4().hex
    sa = scope_for(req(stored), namespace=cache.settings.namespace, consumer_id=consumer, route_id="r")
    sb = scope_for(req(asked), namespace=cache.settings.namespace, consumer_id=consumer, route_id="r")
    cache.save(sa, exact_key(sa, stored), stored, cache.embed(stored), {"choices": []}, None, "m")
    return cache.lookup(sb, asked, exact_key(sb, asked))


def refused(a: str, b: str) -> list[str]:
    """The verifier's reasons in both directions; the checks are symmetric, so both must refuse."""
    out = []
    for q, c in ((a, b), (b, a)):
        v = verify(q, c)
        assert not v.ok, (q, c)
        out.append(v.reason)
    return out


def kept(a: str, b: str) -> None:
    """Both directions pass the verifier."""
    for q, c in ((a, b), (b, a)):
        v = verify(q, c)
        assert v.ok, (q, c, v.reason)
