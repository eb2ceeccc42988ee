"""llm-token-quota's Redis accounting converges after a Redis stall (SIGSTOP / SIGCONT).

A stalled Redis still has the commands it was sent in its socket buffers and runs them once it is
continued: a reserve whose answer timed out can land after the request failed open, and a settle
that timed out can land later too. These tests stall a private real redis-server (so the session
server of other tests is not disturbed) and check that the deferred settles and the "unsure"
reserves leave Redis with the real usage, no stray reservation and nothing charged twice.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis as redislib

from aigov.devredis import RedisServer, free_port
from aigov.metrics import REGISTRY
from aigov.quota.core import Counter, QuotaConfig, meta_keys, plan_counters
from aigov.quota.policies.redis import RedisQuotaStore
from aigov.redis_client import RedisLayer, RedisUnavailable
from kongsim.pytest_plugin import start_recorded_gateway

REPO = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"
STATE_KEY = "aigov.quota"


@pytest.fixture(scope="module")
def stall_redis() -> Iterator[RedisServer]:
    """A private Redis: SIGSTOP on it must not stall the session server other tests use."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        if server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)  # a stopped process does not act on SIGTERM
        server.close()


@pytest.fixture()
def rclient(stall_redis: RedisServer) -> Iterator[redislib.Redis]:
    client = stall_redis.client(socket_timeout=5)
    client.flushall()
    yield client
    client.close()


# The plugin server's Redis timeout in these gateways. A healthy call must never reach it, or a
# request meant to reserve in Redis fails open instead (in one CI run on a busy 2-core host, a
# healthy reserve took over 200 ms); a stalled call always does, whatever the timeout.
GATEWAY_REDIS_TIMEOUT_MS = 1000
# How long to wait after the last stalled call for the breaker (1 s cooldown) to let calls through.
BREAKER_REOPENED_S = 1.5


@contextmanager
def stalled(server: RedisServer) -> Iterator[None]:
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def wait_for(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout_s}s")


def failures(outcome: str) -> float:
    return REGISTRY.get_sample_value("ai_quota_store_failures_total", {"outcome": outcome}) or 0.0


def counters_for(tag: str, now: float, tokens: int = 100_000) -> list[Counter]:
    config = QuotaConfig.from_plugin_config({"limits": [{"window": "day", "tokens": tokens}]})
    return plan_counters(config, tag, MODEL, None, now)


# ------------------------------------------------------------------ the store's deferred queue

def test_deferred_queue_is_bounded_and_drops_the_oldest_with_a_warning(caplog) -> None:
    layer = RedisLayer(port=free_port(), timeout_ms=200, cooldown_s=60)  # nobody listens there
    store = RedisQuotaStore(layer, "aigov:quota", deferred_cap=3)
    now = time.time()
    cs = counters_for("consumer:q", now)
    dropped_before = failures("settle_deferred_dropped")
    with caplog.at_level(logging.WARNING, logger="aigov.quota"):
        for i in range(5):
            with pytest.raises(RedisUnavailable):  # refused (first) or breaker open (the rest)
                store.settle("consumer:q", f"r{i}", cs, [10 * i], now, 600)
        store.defer_settle("consumer:q", "r4", cs, [999], 600, now)  # an id already queued keeps its first entry
    assert [d.request_id for d in store.deferred()] == ["r2", "r3", "r4"]
    assert store.deferred()[-1].amounts == (40,)
    assert failures("settle_deferred_dropped") - dropped_before == 2
    dropped_logs = [r.getMessage() for r in caplog.records if "dropped the deferred settle" in r.getMessage()]
    assert len(dropped_logs) == 2 and "r0" in dropped_logs[0] and "r1" in dropped_logs[1]
    assert store.retry_deferred() == []  # breaker open: nothing sent, nothing lost
    assert store.deferred_count() == 3
    layer.client.close()


def test_retry_replays_at_most_eight_per_call_and_drops_entries_too_old_to_replay(stall_redis, rclient,
                                                                                   caplog) -> None:
    store = RedisQuotaStore(RedisLayer(url=stall_redis.url, timeout_ms=2000), "aigov:quota")
    now = time.time()
    cs = counters_for("consumer:b", now)
    for i in range(11):
        assert store.reserve("consumer:b", f"b{i}", cs, [100], now, 600).admitted
        store.defer_settle("consumer:b", f"b{i}", cs, [7], 600, now)
    # Older than 1.5 x TTL: the `done` marker of a settle that did land may be gone (2 x TTL), so a
    # replay could charge twice; it is dropped instead.
    store.defer_settle("consumer:b", "ancient", cs, [5000], 10, now - 16)
    assert rclient.get(cs[0].key) == b"1100"
    with caplog.at_level(logging.WARNING, logger="aigov.quota"):
        first = store.retry_deferred()
    assert [(rid, r.status) for rid, r in first] == [(f"b{i}", "settled") for i in range(8)]
    assert store.deferred_count() == 3 + 1
    assert rclient.get(cs[0].key) == str(3 * 100 + 8 * 7).encode()
    second = store.retry_deferred()
    assert [(rid, r.status) for rid, r in second] == [(f"b{i}", "settled") for i in range(8, 11)]
    assert any("ancient" in r.getMessage() and "too old" in r.getMessage() for r in caplog.records)
    assert store.deferred_count() == 0 and store.retry_deferred() == []
    assert rclient.get(cs[0].key) == str(11 * 7).encode()  # "ancient" never charged
    res, pending, _done = meta_keys("aigov:quota", "consumer:b")
    assert rclient.hlen(res) == 0 and rclient.zcard(pending) == 0
    store.layer.client.close()


def test_settles_lost_in_a_stall_are_replayed_once_landed_ones_as_duplicates(stall_redis, rclient) -> None:
    layer = RedisLayer(url=stall_redis.url, timeout_ms=1000, cooldown_s=0.3)  # healthy calls must not time out
    store = RedisQuotaStore(layer, "aigov:quota")
    now = time.time()
    cs = counters_for("consumer:s", now)
    res, pending, done = meta_keys("aigov:quota", "consumer:s")
    for rid, amount in (("sent", 500), ("refused", 300)):
        assert store.reserve("consumer:s", rid, cs, [amount], now, 600).admitted
    with stalled(stall_redis):
        with pytest.raises(RedisUnavailable):  # written to the socket, no answer: it may still run
            store.settle("consumer:s", "sent", cs, [120], time.time(), 600)
        with pytest.raises(RedisUnavailable):  # breaker open: never sent
            store.settle("consumer:s", "refused", cs, [70], time.time(), 600)
        assert [d.request_id for d in store.deferred()] == ["sent", "refused"]
    wait_for(lambda: rclient.zscore(done, "sent") is not None, what="the stalled settle running late")
    assert rclient.get(cs[0].key) == str(120 + 300).encode()  # the late one landed; "refused" still reserved
    wait_for(lambda: layer.healthy, what="breaker cooldown")
    replayed = store.retry_deferred()
    assert [(rid, r.status) for rid, r in replayed] == [("sent", "duplicate"), ("refused", "settled")]
    assert rclient.get(cs[0].key) == str(120 + 70).encode()  # nothing charged twice
    assert rclient.hlen(res) == 0 and rclient.zcard(pending) == 0
    assert store.deferred_count() == 0
    layer.client.close()


def test_a_reserve_landing_after_the_settle_of_its_id_reserves_nothing(stall_redis, rclient) -> None:
    # The other order of an unsure request: its settle reaches Redis before the late reserve.
    store = RedisQuotaStore(RedisLayer(url=stall_redis.url, timeout_ms=2000), "aigov:quota")
    now = time.time()
    cs = counters_for("consumer:o", now)
    assert store.settle("consumer:o", "u1", cs, [40], now, 600).status == "orphan"  # charged, id marked done
    late = store.reserve("consumer:o", "u1", cs, [530], now, 600)
    assert late.duplicate and late.values == [40]
    res, pending, _ = meta_keys("aigov:quota", "consumer:o")
    assert rclient.hlen(res) == 0 and rclient.zcard(pending) == 0
    assert rclient.get(cs[0].key) == b"40"
    store.layer.client.close()


# ------------------------------------------------------------------ the tester's scenario, end to end

def test_a_redis_stall_during_requests_converges_to_the_real_usage(stall_redis, rclient, mock_llm) -> None:
    prefix = f"stall{uuid.uuid4().hex[:8]}"
    quota = {"name": "llm-token-quota", "config": {
        "policy": "redis", "key_prefix": prefix,
        "redis": {"host": "127.0.0.1", "port": stall_redis.port, "timeout_ms": GATEWAY_REDIS_TIMEOUT_MS},
        # 20 s rather than the tester's 10: the late reservation must still be there when the test
        # looks, or the sweep, not the fix, would have given it back.
        "reservation_ttl_seconds": 20,
        "identifier_sources": ["header"], "identifier_header": "X-User",
        "limits": [{"window": "day", "tokens": 100_000}]}}
    yml = {"_format_version": "3.0", "services": [{"name": "llm", "url": mock_llm.url, "routes": [
        {"name": "q", "paths": ["/q"], "strip_path": True, "plugins": [quota]}]}]}
    gw, calls = start_recorded_gateway(yml, server="aigov", pythonpath=str(REPO))
    res, pending, done = meta_keys(prefix, "header:staller")
    replies: dict[str, Any] = {}

    def post(name: str, total: int, **headers: str) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"request {name}"}], "max_tokens": 500}
        replies[name] = gw.request("POST", "/q/v1/chat/completions", json=body,
                                   headers={"X-User": "staller", "X-Mock-Usage": f"total={total}", **headers})

    try:
        slow = threading.Thread(target=post, args=("A", 194), kwargs={"X-Mock-Latency-Ms": "3000"})
        slow.start()
        wait_for(lambda: rclient.hlen(res) == 1, what="A's reservation")
        with stalled(stall_redis):
            post("B", 61)  # its reserve is written, its answer times out: fail open, unsure
            post("C", 43)  # usually refused by the open breaker: plain fail open
            slow.join(timeout=30)
            assert not slow.is_alive()
            assert gw.wait_logs(20)
        rclient.ping()
        time.sleep(BREAKER_REOPENED_S)  # the plugin server's breaker (1 s cooldown) lets Redis calls through again
        post("D", 29)  # one more request, after Redis resumed: its log phase replays the deferred settles
        assert gw.wait_logs(20)

        assert all(r.status == 200 for r in replies.values()), {k: r.status for k, r in replies.items()}
        used = {k: int(r.header("X-AI-Tokens-Prompt")) + int(r.header("X-AI-Tokens-Completion"))
                for k, r in replies.items()}
        assert used == {"A": 194, "B": 61, "C": 43, "D": 29}
        ctx = {k: calls.contexts[r.header("X-Kong-Request-Id")] for k, r in replies.items()}
        state = {k: c.ctx_shared[STATE_KEY] for k, c in ctx.items()}
        assert state["A"]["store"] == "redis" and state["D"]["store"] == "redis"
        assert state["B"]["store"] == "memory" and state["B"].get("redis_unsure") is True
        assert ctx["B"].discarded_serialize_values == {}  # nothing relies on a log-timer write
        assert state["C"]["store"] == "memory"

        (key,) = rclient.keys(f"{prefix}:*:tokens:day:*")
        # Redis holds the real usage of every request, the fail-open ones included: B's late
        # reservation (~530 tokens) was converted to its 61, A's lost settle and C's usage (counted
        # in memory during the stall) were replayed.
        assert int(rclient.get(key)) == sum(used.values())
        for k in "ABCD":
            rid = state[k]["rid"]
            assert not rclient.hexists(res, rid) and rclient.zscore(pending, rid) is None
            assert rclient.zscore(done, rid) is not None
        assert rclient.hlen(res) == 0 and rclient.zcard(pending) == 0

        # Replays of those settles and of the late reserve are duplicates: nothing is charged twice.
        store = RedisQuotaStore(RedisLayer(url=stall_redis.url, timeout_ms=2000), prefix)
        before = int(rclient.get(key))
        for k in "ABCD":
            cs = [Counter.from_list(c) for c in state[k]["counters"]]
            assert store.settle("header:staller", state[k]["rid"], cs, [used[k]], time.time(), 20).status == "duplicate"
            assert store.reserve("header:staller", state[k]["rid"], cs, [500], time.time(), 20).duplicate
        assert int(rclient.get(key)) == before
        store.layer.client.close()
    finally:
        gw.close()


def _fail_open_gateway(redis_port: int, mock_url: str, prefix: str, user: str,
                       limit: int) -> tuple[Any, Any, Any, dict[str, Any]]:
    """A gateway with the quota (redis policy, fail_open, GATEWAY_REDIS_TIMEOUT_MS) keyed on X-User,
    and `post(name, total)`: a request by `user` whose upstream reports `total` tokens used."""
    quota = {"name": "llm-token-quota", "config": {
        "policy": "redis", "key_prefix": prefix,
        "redis": {"host": "127.0.0.1", "port": redis_port, "timeout_ms": GATEWAY_REDIS_TIMEOUT_MS},
        "reservation_ttl_seconds": 20,
        "identifier_sources": ["header"], "identifier_header": "X-User",
        "limits": [{"window": "day", "tokens": limit}]}}
    yml = {"_format_version": "3.0", "services": [{"name": "llm", "url": mock_url, "routes": [
        {"name": "q", "paths": ["/q"], "strip_path": True, "plugins": [quota]}]}]}
    gw, calls = start_recorded_gateway(yml, server="aigov", pythonpath=str(REPO))
    replies: dict[str, Any] = {}

    def post(name: str, total: int, **headers: str) -> Any:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"request {name}"}], "max_tokens": 500}
        replies[name] = gw.request("POST", "/q/v1/chat/completions", json=body,
                                   headers={"X-User": user, "X-Mock-Usage": f"total={total}", **headers})
        return replies[name]

    return gw, calls, post, replies


def test_fail_open_usage_converges_into_redis_once_it_is_back(stall_redis, rclient, mock_llm) -> None:
    # The tester's report: fail_open requests served while Redis was stalled (breaker open after
    # the first timeout) were charged in local memory only, so Redis stayed below the real usage
    # for good. Now each fail-open settle is also queued for Redis (same request id, real amounts)
    # and replayed by the log phases once Redis answers.
    prefix = f"conv{uuid.uuid4().hex[:8]}"
    limit = 100_000
    gw, calls, post, replies = _fail_open_gateway(stall_redis.port, mock_llm.url, prefix, "alice", limit)
    tag = "header:alice"
    res, pending, done = meta_keys(prefix, tag)

    real = {"before": 100, "s1": 61, "s2": 43, "s3": 37, "s4": 52, "s5": 71, "s6": 29,
            "after1": 11, "after2": 13, "after3": 17}
    stalled_served = ["s1", "s2", "s3", "s4", "s5", "s6"]
    try:
        post("before", real["before"])
        assert gw.wait_logs(20)
        with stalled(stall_redis):
            for name in ("s1", "s2", "s3"):  # s1 times out (unsure), then the breaker is open
                post(name, real[name])
            post("failed", 999, **{"X-Mock-Fail": "500"})  # released: nothing to charge anywhere
            time.sleep(1.1)  # past the breaker's cooldown: one more probe times out, then open again
            for name in ("s4", "s5", "s6"):
                post(name, real[name])
            assert gw.wait_logs(20)
        rclient.ping()
        time.sleep(BREAKER_REOPENED_S)  # the plugin server's breaker lets Redis calls through again
        for name in ("after1", "after2", "after3"):  # their log phases replay the deferred settles
            post(name, real[name])
            assert gw.wait_logs(20)

        assert replies["failed"].status == 500
        served = {k: r for k, r in replies.items() if k != "failed"}
        assert all(r.status == 200 for r in served.values()), {k: r.status for k, r in served.items()}
        used = {k: int(r.header("X-AI-Tokens-Prompt")) + int(r.header("X-AI-Tokens-Completion"))
                for k, r in served.items()}
        assert used == real
        state = {k: calls.contexts[r.header("X-Kong-Request-Id")].ctx_shared[STATE_KEY] for k, r in replies.items()}
        assert all(state[k]["store"] == "memory" for k in [*stalled_served, "failed"])
        assert all(state[k]["store"] == "redis" for k in ("before", "after1", "after2", "after3"))
        plain = [k for k in stalled_served if not state[k].get("redis_unsure")]
        assert len(plain) >= 3, plain  # the bug's case: refused by the open breaker, not unsure

        # The local decision during the outage kept working: the memory counters started from the
        # usage Redis last reported ("before") and held the outage's usage on top (the headers of
        # each fail-open request show them after its own settle).
        seen = real["before"]
        for k in stalled_served:
            seen += used[k]
            assert int(served[k].header("X-AI-RateLimit-Remaining-Day")) == limit - seen

        # Redis converged to the real usage of ALL requests, the fail-open ones included.
        (key,) = rclient.keys(f"{prefix}:*:tokens:day:*")
        assert int(rclient.get(key)) == sum(real.values()) == 434
        for k in real:
            assert rclient.zscore(done, state[k]["rid"]) is not None, k
        assert rclient.hlen(res) == 0 and rclient.zcard(pending) == 0  # late reserves converted
        if not state["failed"].get("redis_unsure"):
            assert rclient.zscore(done, state["failed"]["rid"]) is None  # amount 0: nothing queued

        # Replaying every settle again, twice, through the deferred queue: duplicates, no double count.
        store = RedisQuotaStore(RedisLayer(url=stall_redis.url, timeout_ms=2000), prefix)
        for _ in range(2):
            for k in real:
                cs = [Counter.from_list(c) for c in state[k]["counters"]]
                store.defer_settle(tag, state[k]["rid"], cs, [used[k]], 20)
            replayed = store.retry_deferred(max_items=len(real))
            assert [(rid, r.status) for rid, r in replayed] == [(state[k]["rid"], "duplicate") for k in real]
            assert int(rclient.get(key)) == 434
        store.layer.client.close()
    finally:
        gw.close()


def test_an_exhausted_caller_stays_refused_when_redis_stalls(stall_redis, rclient, mock_llm) -> None:
    # A new user's finding: the fail_open fallback counted from 0, so a caller who had used up the
    # limit in Redis got a whole fresh budget in local memory for the outage (49 more requests
    # served, about 2x the limit). It now starts from what Redis last reported to this node.
    prefix = f"exh{uuid.uuid4().hex[:8]}"
    gw, calls, post, replies = _fail_open_gateway(stall_redis.port, mock_llm.url, prefix, "carol", 1000)
    try:
        assert post("spend", 700).status == 200      # reserved 500 + prompt, charged 700
        assert gw.wait_logs(20)
        assert post("refused", 1).status == 429      # 700 + the 500 it may use: over 1000
        assert gw.wait_logs(20)
        with stalled(stall_redis):
            statuses = [post(f"s{i}", 1).status for i in range(6)]
            assert gw.wait_logs(20)
        assert statuses == [429] * 6, statuses
        state = {k: calls.contexts[r.header("X-Kong-Request-Id")].ctx_shared.get(STATE_KEY) for k, r in replies.items()}
        assert all(state[f"s{i}"] is None or state[f"s{i}"]["store"] == "memory" for i in range(6))
        assert json.loads(replies["s5"].body)["error"]["code"] == "quota_exceeded"
        rclient.ping()
        (key,) = rclient.keys(f"{prefix}:*:tokens:day:*")
        assert int(rclient.get(key)) == 700         # refused requests hold nothing there
        # Once Redis answers, a request that fits is served from Redis again.
        time.sleep(BREAKER_REOPENED_S)  # the breaker lets Redis calls through again
        small = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        reply = gw.request("POST", "/q/v1/chat/completions", json=small,
                           headers={"X-User": "carol", "X-Mock-Usage": "total=20"})
        assert reply.status == 200 and int(reply.header("X-AI-RateLimit-Remaining-Day")) == 280
    finally:
        gw.close()


def test_the_first_reserve_after_an_outage_sees_what_was_served_during_it(stall_redis, rclient, mock_llm) -> None:
    # A tester's finding: once Redis answered again, reserves were decided on Redis's figure,
    # which lacked the outage's usage until later log phases replayed it: an exhausted caller got
    # 5 more answers. The reserve now replays the deferred settles first.
    prefix = f"rec{uuid.uuid4().hex[:8]}"
    gw, calls, post, replies = _fail_open_gateway(stall_redis.port, mock_llm.url, prefix, "dora", 1500)
    try:
        assert post("before", 300).status == 200
        assert gw.wait_logs(20)
        with stalled(stall_redis):
            # The probe's reserve times out (it may still land: ~505 reserved late), then the
            # breaker is open and "during" fails open plainly, served from local memory.
            assert post("probe", 100).status == 200
            assert post("during", 800).status == 200
            assert gw.wait_logs(20)
        rclient.ping()
        time.sleep(BREAKER_REOPENED_S)  # the breaker lets Redis calls through again
        # Redis alone holds at most 300 + the probe's late ~505 = ~805, where this one (its prompt
        # + 500) fits a 1500 limit; the real usage is 1200, where it does not.
        after = post("after", 20)
        assert after.status == 429, (after.status, after.body[:200])
        assert gw.wait_logs(20)
        (key,) = rclient.keys(f"{prefix}:*:tokens:day:*")
        assert int(rclient.get(key)) == 1200  # the outage's usage replayed, the refusal holds nothing
    finally:
        gw.close()


def test_fail_open_usage_of_a_redis_outage_is_replayed_in_batches_after_it_restarts(stall_redis, mock_llm) -> None:
    # Redis down (connection refused, then the breaker): every request fails open plainly (no
    # reserve ever reached Redis). Once it is back, each access (before its reserve) and each log
    # phase replays up to eight queued settles as orphans (charged, id marked settled); a failed upstream (released) queued nothing.
    prefix = f"down{uuid.uuid4().hex[:8]}"
    gw, calls, post, replies = _fail_open_gateway(stall_redis.port, mock_llm.url, prefix, "bob", 100_000)
    tag = "header:bob"
    res, pending, done = meta_keys(prefix, tag)

    outage = {f"o{i}": 20 + i for i in range(10)}
    client = None
    try:
        stall_redis.stop()
        try:
            for name, total in list(outage.items())[:5]:
                assert post(name, total).status == 200
            assert post("failed", 999, **{"X-Mock-Fail": "500"}).status == 500
            for name, total in list(outage.items())[5:]:
                assert post(name, total).status == 200
            assert gw.wait_logs(20)
        finally:
            stall_redis.start()
        client = stall_redis.client(socket_timeout=5)
        time.sleep(BREAKER_REOPENED_S)  # the plugin server's breaker lets Redis calls through again
        state = {k: calls.contexts[r.header("X-Kong-Request-Id")].ctx_shared[STATE_KEY] for k, r in replies.items()}
        assert all(s["store"] == "memory" and not s.get("redis_unsure") for s in state.values())
        key = Counter.from_list(state["o0"]["counters"][0]).key
        assert client.get(key) is None

        post("after1", 7)
        assert gw.wait_logs(20)
        # eight replayed before its reserve (access), the other two after it (its log phase)
        assert int(client.get(key)) == 7 + sum(outage.values())
        post("after2", 9)
        assert gw.wait_logs(20)
        assert int(client.get(key)) == 7 + 9 + sum(outage.values()) == 261
        for k in outage:
            assert client.zscore(done, state[k]["rid"]) is not None, k
        assert client.zscore(done, state["failed"]["rid"]) is None  # released: nothing was queued
        assert client.hlen(res) == 0 and client.zcard(pending) == 0

        post("after3", 5)  # nothing left to replay: the counter only gets this request's usage
        assert gw.wait_logs(20)
        assert int(client.get(key)) == 261 + 5
    finally:
        gw.close()
        if client is not None:
            client.close()


def test_a_request_refused_locally_after_its_reserve_reached_a_stalled_redis_holds_nothing(
        stall_redis, rclient, mock_llm) -> None:
    # The tester's case: during a stall, fail_open decides in local memory. A request whose
    # reserve script was written to the stalled Redis (unsure) and which local memory then
    # refuses (429) used to leave that script's reservation in Redis once it ran, holding the
    # consumer's budget until the reservation TTL. Its release is now queued like fail_closed's.
    prefix = f"refused{uuid.uuid4().hex[:8]}"
    user = f"u{uuid.uuid4().hex[:6]}"
    gw, calls, _post, _replies = _fail_open_gateway(stall_redis.port, mock_llm.url, prefix, user, 100)
    res, pending, _ = meta_keys(prefix, f"header:{user}")
    replies: dict[str, Any] = {}

    def post(name: str, max_tokens: int, total: int, who: str = user, **headers: str) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"request {name}"}],
                "max_tokens": max_tokens}
        replies[name] = gw.request("POST", "/q/v1/chat/completions", json=body,
                                   headers={"X-User": who, "X-Mock-Usage": f"total={total}", **headers})

    try:
        # A busy node holds several pooled Redis connections: 6 reserves in flight during a pause
        # shorter than the Redis timeout each take one, so the scripts below are written to
        # open connections (a new one would fail its handshake instead: no script at all).
        warm = [threading.Thread(target=post, args=(f"warm{i}", 5, 5, f"{user}-warm")) for i in range(6)]
        with stalled(stall_redis):
            for t in warm:
                t.start()
            time.sleep(0.12)
        for t in warm:
            t.join(timeout=30)
        assert gw.wait_logs(20)
        with stalled(stall_redis):
            post("W", 5, 10)  # the first timeout: unsure, served from memory; the breaker opens
            slow = threading.Thread(target=post, args=("A", 60, 20), kwargs={"X-Mock-Latency-Ms": "3000"})
            slow.start()      # breaker open: plain fail open, ~70 reserved in memory only
            time.sleep(1.3)   # past the breaker's 1 s cooldown: the next call reaches Redis again
            post("B", 60, 20)  # its script is written to the stalled Redis, then memory says 429
            slow.join(timeout=30)
            assert gw.wait_logs(20)
        assert (replies["W"].status, replies["A"].status, replies["B"].status) == (200, 200, 429)
        rclient.ping()
        time.sleep(BREAKER_REOPENED_S)  # the breaker lets Redis calls through again
        for i in range(3):  # another caller's log phases replay the deferred settles and releases
            post(f"after{i}", 5, 5, who=f"{user}-other")
            assert gw.wait_logs(20)
        (key,) = rclient.keys(f"{prefix}:{{header:{user}}}:*tokens:day:*")
        assert int(rclient.get(key)) == 10 + 20  # W and A, what was used; nothing of B
        assert rclient.hlen(res) == 0 and rclient.zcard(pending) == 0
    finally:
        gw.close()
