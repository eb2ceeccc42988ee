"""The quota stores at library level: the Redis Lua scripts against a real Redis, and the memory
store, held to the same contract (atomic check-and-reserve, settle exactly once, expiry)."""
from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest
from redis.crc import key_slot

from aigov.quota.core import QuotaConfig, meta_keys, plan_counters
from aigov.quota.policies.memory import MemoryQuotaStore
from aigov.quota.policies.redis import RedisQuotaStore
from aigov.redis_client import RedisLayer

NOW = 1_800_000_030.0  # fixed clock: 30 s into a minute window


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest) -> Iterator[object]:
    if request.param == "memory":
        yield MemoryQuotaStore()
        return
    request.getfixturevalue("redis_client")  # a real Redis, flushed before the test
    layer = RedisLayer(url=request.getfixturevalue("redis_server").url, timeout_ms=2000)
    yield RedisQuotaStore(layer, "aigov:quota")


def counters_for(limits: list[dict], tag: str = "consumer:a", now: float = NOW, model: str = "gpt-4o"):
    return plan_counters(QuotaConfig.from_plugin_config({"limits": limits}), tag, model, None, now)


def test_reserve_is_all_or_nothing(store) -> None:
    cs = counters_for([{"window": "minute", "tokens": 1000}, {"window": "day", "cost_usd": 0.01}])
    assert store.reserve("consumer:a", "r1", cs, [600, 4_000_000], NOW, 600).admitted
    # fits the token limit but not the cost limit: nothing may be reserved on either
    r = store.reserve("consumer:a", "r2", cs, [300, 7_000_000], NOW, 600)
    assert not r.admitted and r.blocked == 1 and r.values == [600, 4_000_000]
    assert store.values("consumer:a", cs, NOW) == [600, 4_000_000]


def test_settle_is_idempotent_and_charges_the_truth(store) -> None:
    cs = counters_for([{"window": "minute", "tokens": 1000}])
    store.reserve("consumer:a", "r1", cs, [500], NOW, 600)
    first = store.settle("consumer:a", "r1", cs, [120], NOW + 1, 600)
    assert (first.status, first.values) == ("settled", [120])
    again = store.settle("consumer:a", "r1", cs, [120], NOW + 2, 600)
    assert (again.status, again.values) == ("duplicate", [120])
    # a late duplicate reserve of a settled request id reserves nothing
    assert store.reserve("consumer:a", "r1", cs, [500], NOW + 3, 600).duplicate
    assert store.values("consumer:a", cs, NOW + 3) == [120]


def test_truth_larger_than_the_estimate_is_charged(store) -> None:
    cs = counters_for([{"window": "minute", "tokens": 1000}])
    store.reserve("consumer:a", "r1", cs, [100], NOW, 600)
    assert store.settle("consumer:a", "r1", cs, [1400], NOW, 600).values == [1400]
    assert not store.reserve("consumer:a", "r2", cs, [1], NOW, 600).admitted


def test_release_gives_the_budget_back(store) -> None:
    cs = counters_for([{"window": "minute", "tokens": 1000}])
    store.reserve("consumer:a", "r1", cs, [900], NOW, 600)
    assert not store.reserve("consumer:a", "r2", cs, [200], NOW, 600).admitted
    assert store.settle("consumer:a", "r1", cs, [0], NOW, 600).values == [0]
    assert store.reserve("consumer:a", "r2", cs, [200], NOW, 600).admitted


def test_unsettled_reservation_expires_by_itself(store) -> None:
    cs = counters_for([{"window": "day", "tokens": 1000}])
    store.reserve("consumer:a", "dead-node", cs, [800], NOW, 10)
    assert store.values("consumer:a", cs, NOW + 9) == [800]
    assert store.values("consumer:a", cs, NOW + 11) == [0]  # given back, not leaked for a day
    # a settle arriving after the expiry still charges what was really used, once
    late = store.settle("consumer:a", "dead-node", cs, [50], NOW + 12, 10)
    assert (late.status, late.values) == ("orphan", [50])
    assert store.settle("consumer:a", "dead-node", cs, [50], NOW + 13, 10).status == "duplicate"


def test_consumers_and_windows_do_not_share_counters(store) -> None:
    limits = [{"window": "minute", "tokens": 100}]
    a, b = counters_for(limits, "consumer:a"), counters_for(limits, "consumer:b")
    assert store.reserve("consumer:a", "r1", a, [100], NOW, 600).admitted
    assert not store.reserve("consumer:a", "r2", a, [1], NOW, 600).admitted
    assert store.reserve("consumer:b", "r3", b, [100], NOW, 600).admitted
    nxt = counters_for(limits, "consumer:a", now=NOW + 30)  # the next minute window
    assert nxt[0].key != a[0].key
    assert store.reserve("consumer:a", "r4", nxt, [100], NOW + 30, 600).admitted


def test_concurrent_reservations_never_overshoot(store) -> None:
    cs = counters_for([{"window": "minute", "tokens": 1000}])
    admitted: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(24)

    def worker(i: int) -> None:
        barrier.wait(timeout=10)
        ok = store.reserve("consumer:a", f"c{i}", cs, [90], NOW, 600).admitted
        with lock:
            admitted.append(ok)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert admitted.count(True) == 11  # floor(1000 / 90)
    assert store.values("consumer:a", cs, NOW) == [990]


def test_all_keys_of_a_caller_share_one_cluster_slot() -> None:
    cs = counters_for([{"window": "minute", "tokens": 10}, {"window": "month", "cost_usd": 5, "per_model": True},
                       {"window": "day", "tokens": 7, "name": "team budget"}], tag="header:h{weird}")
    keys = [c.key for c in cs] + list(meta_keys("aigov:quota", "header:h{weird}"))
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert len({c.key for c in cs}) == 3


def test_redis_keys_expire_after_their_window(redis_client, redis_server) -> None:
    layer = RedisLayer(url=redis_server.url)
    store = RedisQuotaStore(layer, "aigov:quota")
    now = time.time()
    cs = counters_for([{"window": "minute", "tokens": 1000}], now=now)
    store.reserve("consumer:a", "r1", cs, [10], now, 600)
    ttl = redis_client.ttl(cs[0].key)
    assert 0 < ttl <= 60 + 120
    res, pending, done = meta_keys("aigov:quota", "consumer:a")
    assert redis_client.ttl(res) > 0 and redis_client.ttl(pending) > 0
    store.settle("consumer:a", "r1", cs, [10], now, 600)
    assert redis_client.hlen(res) == 0 and redis_client.zcard(pending) == 0
    assert 0 < redis_client.pttl(done) <= 1_200_000
