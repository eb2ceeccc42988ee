"""The cache lookup when the query vector is known (issue 7 §4): the exact-layer probe and the
KNN query share one Redis round trip, the nearest entry comes alone unless the verifier refuses
it, and the scope filters, TTL, index recreation and outage handling behave as on the
sequential path. Real Redis with RediSearch and real MiniLM vectors; round trips are counted at
the RedisLayer (every store call goes through it) and commands by Redis's INFO commandstats."""
from __future__ import annotations

import json
import time
import uuid
from types import SimpleNamespace
from typing import Any, Callable, TypeVar

import numpy as np
import pytest
import redis as redislib

from aigov.cache import verifier
from aigov.cache.core import CacheSettings, SemanticCache
from aigov.cache.key import CacheScope
from aigov.cache.policies import StoreUnavailable
from aigov.cache.policies.redis import RedisStore, document_fields
from aigov.redis_client import RedisLayer

T = TypeVar("T")

ENABLE = "How do I enable two-factor authentication on my account?"
DISABLE = "How do I disable two-factor authentication on my account?"
STEPS_ON = "two-factor authentication setup for my account"
RESET = "How can I reset my password?"


class CountingLayer(RedisLayer):
    """The real layer, counting calls: one call is one client command or one batched write."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def run(self, fn: Callable[[redislib.Redis], T]) -> T:
        self.calls += 1
        return super().run(fn)


def command_calls(client: redislib.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int((stats.get(f"cmdstat_{command}") or {}).get("calls", 0))


def indexed_docs(client: redislib.Redis, index: str) -> int:
    reply = client.execute_command("FT.SEARCH", index, "*", "LIMIT", "0", "0")
    return int(reply[b"total_results"] if isinstance(reply, dict) else reply[0])


@pytest.fixture(scope="module")
def embedder() -> Any:
    from aigov.embeddings import get_embedder

    return get_embedder()


@pytest.fixture()
def rig(redis_server: Any, embedder: Any) -> Any:
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    namespace = f"probe-{uuid.uuid4().hex[:8]}"
    layer = CountingLayer(port=port, timeout_ms=1000, cooldown_s=0.2)
    store = RedisStore(layer, namespace, "all-MiniLM-L6-v2")
    settings = CacheSettings.from_config({"vectordb": {"strategy": "redis", "threshold": 0.5,
                                                       "namespace": namespace}})
    cache = SemanticCache(settings, store=store, embedder=embedder)
    scope = CacheScope(namespace, "id:alice", "route-1", "gpt-4o-mini", "ctx", "params")
    client = redislib.Redis.from_url(redis_server.url)

    def vec(text: str) -> np.ndarray:
        return embedder.embed([text])[0]

    def save(key: str, text: str, in_scope: CacheScope = scope) -> None:
        cache.save(in_scope, key, text, vec(text), {"choices": [{"message": {"content": f"answer to {text}"}}]},
                   None, "gpt-4o-mini")

    r = SimpleNamespace(layer=layer, store=store, cache=cache, scope=scope, client=client, vec=vec, save=save)
    try:
        yield r
    finally:
        try:
            store.purge()
        except StoreUnavailable:
            pass
        client.close()


def test_known_vector_lookup_is_one_round_trip(rig: Any) -> None:
    rig.save("k-reset", RESET)
    query = "I forgot my password, how do I reset it?"
    vec = rig.vec(query)
    calls, gets, searches = rig.layer.calls, command_calls(rig.client, "get"), command_calls(rig.client, "FT.SEARCH")
    infos = command_calls(rig.client, "FT.INFO")
    found = rig.cache.lookup(rig.scope, query, "k-query", vec)
    assert (found.status, found.layer, found.entry.key) == ("Hit", "semantic", "k-reset")
    assert rig.layer.calls - calls == 1                                     # one round trip
    assert command_calls(rig.client, "get") - gets == 1                     # the exact probe ...
    assert command_calls(rig.client, "FT.SEARCH") - searches == 1           # ... and the KNN query
    assert command_calls(rig.client, "FT.INFO") == infos                    # no per-lookup index check
    assert found.vector is not None and np.allclose(found.vector, vec)


def test_exact_hit_comes_from_the_same_round_trip_and_stays_in_its_scope(rig: Any) -> None:
    rig.save("k-exact", RESET)
    vec = rig.vec(RESET)
    calls = rig.layer.calls
    found = rig.cache.lookup(rig.scope, RESET, "k-exact", vec)
    assert (found.status, found.layer, found.entry.key) == ("Hit", "exact", "k-exact")
    assert rig.layer.calls - calls == 1
    # Another consumer asking with the same key and vector gets neither layer's entry.
    bob = CacheScope(rig.scope.namespace, "id:bob", "route-1", "gpt-4o-mini", "ctx", "params")
    other = rig.cache.lookup(bob, RESET, "k-exact", vec)
    assert other.status == "Miss" and other.entry is None


def test_refused_nearest_entry_falls_back_to_the_next_ones(rig: Any) -> None:
    rig.save("k-disable", DISABLE)
    rig.save("k-steps-on", STEPS_ON)
    q = rig.vec(ENABLE)
    sim_disable, sim_steps = float(q @ rig.vec(DISABLE)), float(q @ rig.vec(STEPS_ON))
    assert sim_disable > sim_steps > 0.5   # the premise: the antonym is the nearest entry
    calls = rig.layer.calls
    found = rig.cache.lookup(rig.scope, ENABLE, "k-q", q)
    assert (found.status, found.entry.key) == ("Hit", "k-steps-on")
    assert found.similarity == pytest.approx(sim_steps, abs=1e-3)
    assert found.rejected and found.rejected[0].startswith("antonym:")
    assert rig.layer.calls - calls == 2   # the second query only because the first was refused
    # With the verifier off the nearest entry is served, from the first query alone.
    rig.cache.settings.verifier = False
    calls = rig.layer.calls
    unverified = rig.cache.lookup(rig.scope, ENABLE, "k-q", q)
    assert unverified.entry.key == "k-disable" and rig.layer.calls - calls == 1


def test_known_vector_and_embedding_paths_agree(rig: Any) -> None:
    texts = [RESET, DISABLE, "What is the capital of France?", "Explain 3 ways to sort a list"]
    for i, text in enumerate(texts):
        rig.save(f"k{i}", text)
    queries = ["How do I reset my password?", ENABLE, "What is the capital of Germany?",
               "Explain three ways to sort a list", "Tell me a joke about cats"]
    for query in queries:
        known = rig.cache.lookup(rig.scope, query, f"q-{query}", rig.vec(query))
        embedded = rig.cache.lookup(rig.scope, query, f"q-{query}")   # exact probe, embed, search
        assert known.status == embedded.status, query
        assert (known.entry.key if known.entry else None) == (embedded.entry.key if embedded.entry else None)
        if known.similarity is not None:
            assert known.similarity == pytest.approx(embedded.similarity, abs=1e-5)
        assert known.rejected == embedded.rejected


def test_corrupt_foreign_and_expired_documents_are_never_served(rig: Any) -> None:
    rig.save("k-good", RESET)
    vec = rig.vec(RESET)
    prefix = rig.store._prefix(int(vec.shape[-1])) + "v:"
    now = time.time()
    expired = {"key": "k-old", "prompt": RESET, "response": {"choices": []}, "model": None, "usage": None,
               "created_at": now - 600, "expires_at": now - 300, "meta": {}}
    rig.client.hset(prefix + "corrupt", mapping=document_fields(rig.scope, vec, "{not json"))
    foreign = document_fields(rig.scope, vec, "")
    del foreign["entry"]
    rig.client.hset(prefix + "foreign", mapping=foreign)            # no entry field
    rig.client.hset(prefix + "old", mapping=document_fields(rig.scope, vec, json.dumps(expired)))
    index = rig.store.index_name(int(vec.shape[-1]))
    deadline = time.monotonic() + 10
    while indexed_docs(rig.client, index) < 4:     # hash writes are indexed asynchronously
        assert time.monotonic() < deadline, "the planted documents were never indexed"
        time.sleep(0.05)
    # All four documents sit at similarity ~1; only the good one may come back.
    assert [e.key for e, _ in rig.store.search(rig.scope, vec, 4, 0.5)] == ["k-good"]
    found = rig.cache.lookup(rig.scope, "Reset my password, how?", "k-q", vec)
    assert found.status == "Hit" and found.entry.key == "k-good"


def test_an_expired_nearest_entry_does_not_hide_a_live_one_behind_it(rig: Any) -> None:
    rig.save("k-good", RESET)
    query = "Reset my password, how?"
    qvec = rig.vec(query)
    prefix = rig.store._prefix(int(qvec.shape[-1])) + "v:"
    now = time.time()
    expired = {"key": "k-old", "prompt": query, "response": {"choices": []}, "model": None, "usage": None,
               "created_at": now - 600, "expires_at": now - 300, "meta": {}}
    # Not yet evicted, and exactly at the query: the nearest row of a 1-nearest query.
    rig.client.hset(prefix + "old", mapping=document_fields(rig.scope, qvec, json.dumps(expired)))
    index = rig.store.index_name(int(qvec.shape[-1]))
    deadline = time.monotonic() + 10
    while indexed_docs(rig.client, index) < 2:
        assert time.monotonic() < deadline, "the planted document was never indexed"
        time.sleep(0.05)
    found = rig.store.search(rig.scope, qvec, 1, 0.5)
    assert [e.key for e, _ in found] == ["k-good"]
    assert 0.5 < found[0][1] < 0.999  # the live paraphrase, not the dead exact copy
    hit = rig.cache.lookup(rig.scope, query, "k-q", qvec)
    assert hit.status == "Hit" and hit.entry.key == "k-good"


def test_a_zero_query_vector_is_never_a_hit(rig: Any) -> None:
    rig.save("k-reset", RESET)
    zero = np.zeros_like(rig.vec(RESET))
    assert rig.store.search(rig.scope, zero, 4, 0.0) == []


def test_dropped_index_is_recreated_by_the_probe(rig: Any) -> None:
    rig.save("k-reset", RESET)
    vec = rig.vec(RESET)
    rig.client.execute_command("FT.DROPINDEX", rig.store.index_name(int(vec.shape[-1])))
    deadline = time.monotonic() + 10
    found = rig.cache.lookup(rig.scope, "How do I reset my password?", "k-q", vec)
    while found.status != "Hit" and time.monotonic() < deadline:   # FT.CREATE re-indexes in the background
        time.sleep(0.05)
        found = rig.cache.lookup(rig.scope, "How do I reset my password?", "k-q", vec)
    assert found.status == "Hit" and found.entry.key == "k-reset"


def test_outage_is_a_fast_store_error_and_the_probe_recovers(rig: Any, redis_server: Any) -> None:
    rig.save("k-reset", RESET)
    vec = rig.vec(RESET)
    redis_server.stop()
    try:
        # One refused connect, not redis-py 8's default 10 retries with backoff (4.6 s here).
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            rig.cache.lookup(rig.scope, RESET, "k-q", vec)
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="marked down"):   # the breaker: no second connect
            rig.cache.lookup(rig.scope, RESET, "k-q", vec)
        assert time.monotonic() - started < 0.5  # no connect timeout waited out
    finally:
        redis_server.start()
    time.sleep(0.25)   # the breaker's cooldown
    # Redis came back empty: the probe recreates the index and the lookup is a clean miss.
    after = rig.cache.lookup(rig.scope, RESET, "k-q", vec)
    assert after.status == "Miss"
    rig.save("k-reset", RESET)
    deadline = time.monotonic() + 10
    while rig.cache.lookup(rig.scope, "How do I reset my password?", "k-q", vec).status != "Hit":
        assert time.monotonic() < deadline, "entry stored after the outage never became a hit"
        time.sleep(0.05)


def test_memory_store_probe_has_the_same_semantics(embedder: Any) -> None:
    namespace = f"probe-mem-{uuid.uuid4().hex[:8]}"
    settings = CacheSettings.from_config({"vectordb": {"strategy": "memory", "threshold": 0.5,
                                                       "namespace": namespace}})
    cache = SemanticCache(settings, embedder=embedder)
    scope = CacheScope(namespace, "id:alice", "r", "m", "c", "p")
    for key, text in (("k-disable", DISABLE), ("k-steps-on", STEPS_ON)):
        cache.save(scope, key, text, embedder.embed([text])[0], {"choices": []}, None, "m")
    q = embedder.embed([ENABLE])[0]
    assert cache.lookup(scope, DISABLE, "k-disable", q).layer == "exact"
    found = cache.lookup(scope, ENABLE, "k-q", q)
    assert found.entry.key == "k-steps-on" and found.rejected[0].startswith("antonym:")
    cache.store.purge()


@pytest.mark.parametrize("query, candidate, ok", [
    ("A man carries a dog", "A dog carries a man", False),
    ("A man carries a dog", "A man is carrying a dog", True),
    ("convert 100 USD to EUR", "convert 100 EUR to USD", False),
    ("Uninstall the driver", "Install the driver", False),
    ("How many hours are in a week?", "How many minutes are in a week?", False),
    ("Where is Paris?", "Where is London?", False),
    ("A red bus is parked", "A blue bus is parked", False),
    ("How do I reset my password?", "How can I reset my password?", True),
])
def test_verifier_verdicts_do_not_depend_on_its_caches(query: str, candidate: str, ok: bool) -> None:
    """The per-text analysis is memoised; a cold and a warm verdict must be the same."""
    verifier._analyse.cache_clear()
    cold = verifier.verify(query, candidate)
    warm = verifier.verify(query, candidate)
    assert cold == warm and cold.ok is ok
    assert verifier.verify(candidate, query).ok is ok   # the checks are symmetric


def test_verifier_on_huge_prompts_answers_without_caching_them() -> None:
    """Texts and tokens over the memo limits are analysed each time (the caches stay small)."""
    huge = "please summarise " + "lorem ipsum dolor sit amet " * 2000 + "x" * 5000
    verifier._analyse.cache_clear()
    assert verifier.verify(huge, huge + " not").reason == "negation"
    assert verifier.verify(huge + " 3", huge + " 4").reason.startswith("numbers:")
    assert verifier._analyse.cache_info().currsize == 0      # none of the huge texts was kept
    long_token = "y" * 200                                   # over the word limit, under the text one
    assert verifier.verify(f"how do I enable {long_token}", f"how do I disable {long_token}").reason \
        .startswith("antonym:")
    assert verifier._analyse.cache_info().currsize == 2


def test_float16_vectors_keep_threshold_one_and_the_scope_filter(rig: Any) -> None:
    """The index stores FLOAT16 (half the bytes of FLOAT32) and filters on the one scope TAG: the
    same text still hits at threshold 1.0, a paraphrase does not, another scope sees nothing."""
    rig.save("k-reset", RESET)
    vec = rig.vec(RESET)
    stored = rig.client.hget(rig.store._prefix(int(vec.shape[-1])) + "v:k-reset", "vec")
    assert len(stored) == 2 * vec.shape[-1]
    rig.cache.settings.threshold = 1.0
    same = rig.cache.lookup(rig.scope, RESET, "k-other-key", vec)   # a key the exact layer lacks
    assert (same.status, same.layer, same.entry.key) == ("Hit", "semantic", "k-reset")
    assert 0.9998 <= same.similarity <= 1.0001
    paraphrase = rig.vec("How do I reset my password?")
    assert rig.cache.lookup(rig.scope, "How do I reset my password?", "k-p", paraphrase).status == "Miss"
    bob = CacheScope(rig.scope.namespace, "id:bob", "route-1", "gpt-4o-mini", "ctx", "params")
    assert rig.store.search(bob, vec, 4, 0.0) == []
    assert [e.key for e, _ in rig.store.search(rig.scope, vec, 4, 0.0)] == ["k-reset"]
