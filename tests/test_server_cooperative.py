"""aigov.cooperative: plain blocking waits off the loop, parked handlers on `aigov serve`'s loop.

Off the loop (this test process, no server) every wait is the ordinary blocking call. On
`aigov serve` a handler waiting for Redis (redis_client._CooperativeReads), for a thread-pool
call (run_blocking) or for a future (wait_future) is parked, and the loop serves other events
meanwhile: concurrent waits overlap instead of adding up, and the loop answers unrelated events
at once. Timings are generous (a noisy 2-core VM) but each bound fails if the waits serialize.
"""
from __future__ import annotations

import concurrent.futures
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from aigov import cooperative

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rpc_client import (  # noqa: E402
    start_aigov, wait_until,
    short_prefix,  # noqa: F401 - pytest fixture
)

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------------------------
# Off the loop: plain blocking calls


def test_off_loop_there_is_no_loop():
    assert cooperative.current_loop() is None


def test_off_loop_sleep_sleeps():
    started = time.monotonic()
    cooperative.sleep(0.3)
    elapsed = time.monotonic() - started
    assert 0.29 <= elapsed < 2.0


def test_off_loop_wait_future_returns_the_result():
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result(42)
    assert cooperative.wait_future(done, 0) == 42

    later: concurrent.futures.Future = concurrent.futures.Future()
    timer = threading.Timer(0.2, later.set_result, ("late",))
    started = time.monotonic()  # before start(): the timer's 0.2 s counts from there at the latest
    timer.start()
    try:
        assert cooperative.wait_future(later, 5) == "late"
        assert 0.15 <= time.monotonic() - started < 3.0  # it waited, for the result only
    finally:
        timer.cancel()


def test_off_loop_wait_future_raises_the_futures_exception():
    failed: concurrent.futures.Future = concurrent.futures.Future()
    failed.set_exception(KeyError("inner"))
    with pytest.raises(KeyError, match="inner"):
        cooperative.wait_future(failed, 1)


def test_off_loop_wait_future_times_out():
    never: concurrent.futures.Future = concurrent.futures.Future()
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        cooperative.wait_future(never, 0.3)
    elapsed = time.monotonic() - started
    assert 0.29 <= elapsed < 2.0


def test_off_loop_wait_readable_on_a_socketpair():
    left, right = socket.socketpair()
    try:
        started = time.monotonic()
        assert cooperative.wait_readable(left.fileno(), 0.3) is False
        assert 0.29 <= time.monotonic() - started < 2.0  # it waited the whole timeout
        assert cooperative.wait_readable(left.fileno(), 0) is False
        right.sendall(b"x")
        started = time.monotonic()
        assert cooperative.wait_readable(left.fileno(), 5) is True
        assert time.monotonic() - started < 1.0  # data there: no waiting
        assert cooperative.wait_readable(left.fileno(), None) is True
        assert left.recv(10) == b"x"
        assert cooperative.wait_readable(left.fileno(), 0.05) is False  # drained again
        # Data arriving during the wait ends it early.
        timer = threading.Timer(0.2, right.sendall, (b"y",))
        started = time.monotonic()
        timer.start()
        assert cooperative.wait_readable(left.fileno(), 5) is True
        assert 0.15 <= time.monotonic() - started < 3.0
        timer.join(5)
    finally:
        left.close()
        right.close()


def test_off_loop_run_blocking_returns_and_raises_in_the_calling_thread():
    caller = threading.current_thread()
    assert cooperative.run_blocking(lambda a, b: (a + b, threading.current_thread()), 2, 3) == (5, caller)

    def boom(message: str) -> None:
        raise ValueError(message)

    with pytest.raises(ValueError, match="^kaput$"):
        cooperative.run_blocking(boom, "kaput")
    assert cooperative._offload_pool is None  # off the loop nothing was offloaded


# --------------------------------------------------------------------------------------------
# On `aigov serve`


def _send_events(server, configs: list[dict]) -> tuple[list, list, list]:
    """One connection and instance per config; HandleEvent sent on all of them back to back.
    Returns (clients, msgids, instance ids); the caller closes the clients."""
    clients = [server.client(timeout=15) for _ in configs]
    ids = [c.start_instance(cfg) for c, cfg in zip(clients, configs)]
    msgids = [c.send("plugin.HandleEvent", {"InstanceId": i, "EventName": "access"})
              for c, i in zip(clients, ids)]
    return clients, msgids, ids


def _read_all(clients: list, started: float, timeout: float = 15) -> tuple[list, list]:
    """Read one frame per client in parallel; returns (frames, seconds from `started` to each)."""
    frames: list = [None] * len(clients)
    times: list = [None] * len(clients)

    def read(n: int) -> None:
        try:
            frames[n] = clients[n].read_frame(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            frames[n] = exc
        times[n] = time.monotonic() - started

    readers = [threading.Thread(target=read, args=(n,)) for n in range(len(clients))]
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout + 5)
    return frames, times


def _header_call(frame, msgid: int, header: str) -> tuple[int, dict]:
    """The (EventId, decoded JSON value) of a reply asking Kong to set `header`."""
    assert isinstance(frame, list), f"no reply: {frame!r}"
    assert frame[0] == 1 and frame[1] == msgid and frame[2] is None, frame
    data = frame[3]["Data"]
    assert data["Method"] == "kong.response.set_header" and data["Args"][0] == header, data
    return frame[3]["EventId"], data["Args"][1]


def _finish(client, event_id: int) -> None:
    assert client.step(event_id, None)["Data"] == "ret"


@pytest.fixture
def aigov(short_prefix):  # noqa: F811 - the fixture imported above
    server = start_aigov(short_prefix)
    try:
        yield server
    finally:
        server.stop()


def _outcomes_of(server, config: dict, header: str, count: int = 4) -> tuple[list[dict], list[float]]:
    """Run `count` events of `config` at once, one connection each: the JSON each handler put
    in `header`, and each event's time to its PDK call."""
    clients, msgids, _ = _send_events(server, [config] * count)
    started = time.monotonic()
    try:
        frames, times = _read_all(clients, started)
        outcomes = []
        for client, frame, msgid in zip(clients, frames, msgids):
            event_id, value = _header_call(frame, msgid, header)
            outcomes.append(json.loads(value))
            _finish(client, event_id)
    finally:
        for c in clients:
            c.close()
    return outcomes, times


def _no_events_left(server) -> None:
    with server.client() as admin:
        status = admin.call("plugin.GetStatus")
        assert status["Events"] == 0 and status["Workers"]["busy"] == 0, status


def _warm_up_redis(server, port: int) -> None:
    """One short BLPOP event first: its handler imports redis-py in the server (a one-off cost
    that would otherwise block the loop inside the timed part)."""
    with server.client() as kong:
        iid = kong.start_instance({"mode": "redis_blpop", "redis_port": port, "block": 0.01,
                                   "key": "aigov-test:coop:warm-up"})
        calls = kong.run_event(iid)
        assert json.loads(calls[0]["Args"][1])["reply"] is None, calls


def _blocked_blpops(redis_client) -> int:
    return sum(1 for c in redis_client.client_list() if c.get("cmd") == "blpop" and "b" in c.get("flags", ""))


@pytest.mark.parametrize("via", ["round_trip", "send"])
def test_redis_waits_overlap_and_the_loop_keeps_serving(aigov, redis_client, redis_server, via):
    """4 handlers each BLPOP (1 s, nothing pushed) through RedisLayer, then one PDK call: on the
    one loop they wait together (~1 s total; serially it would be >= 4 s), and a fifth
    connection's event is answered at once while they wait."""
    key = "aigov-test:coop:nobody-pushes"
    config = {"mode": "redis_blpop", "redis_port": redis_server.port, "timeout_ms": 3000,
              "block": 1, "key": key, "via": via}
    _warm_up_redis(aigov, redis_server.port)
    with aigov.client() as other:
        quick = other.start_instance({"mode": "two_calls"})
        clients, msgids, _ = _send_events(aigov, [config] * 4)
        started = time.monotonic()
        try:
            # All four handlers are parked with their BLPOP blocked in Redis ...
            assert wait_until(lambda: _blocked_blpops(redis_client) == 4, timeout=1.5, interval=0.02)
            before = time.monotonic()
            calls = other.run_event(quick, {"kong.request.get_header": "v"})
            quick_s = time.monotonic() - before
            # ... and still are once the fifth connection's event is done.
            still_blocked = _blocked_blpops(redis_client)
            assert [c["Method"] for c in calls] == ["kong.request.get_header"] * 2
            assert quick_s < 0.5, f"the loop was blocked: two_calls took {quick_s:.2f}s"
            assert still_blocked == 4, f"only {still_blocked} BLPOPs still waiting after two_calls"

            frames, times = _read_all(clients, started)
            total = max(times)
            outcomes = []
            for client, frame, msgid in zip(clients, frames, msgids):
                event_id, value = _header_call(frame, msgid, "x-redis")
                outcomes.append(json.loads(value))
                _finish(client, event_id)
        finally:
            for c in clients:
                c.close()
    # The handlers really waited on Redis: BLPOP's nil after its 1 s block, for each of them.
    assert [o.get("reply", o) for o in outcomes] == [None] * 4, outcomes
    assert all(o["elapsed"] >= 0.9 for o in outcomes), outcomes
    # The four BLPOP waits overlapped in time (CLOCK_MONOTONIC is system-wide): each began
    # before any ended.
    assert max(o["t0"] for o in outcomes) < min(o["t1"] for o in outcomes), outcomes
    assert total < 3.0, f"4 x BLPOP 1s took {total:.2f}s in total (times {times}): they did not overlap"
    assert redis_client.llen(key) == 0
    _no_events_left(aigov)


def test_run_blocking_calls_overlap_on_the_loop(aigov):
    """4 handlers each run a blocking 1 s call through cooperative.run_blocking: it runs on the
    offload pool while the handler is parked, so the four overlap (total well under 4 x one)."""
    one = 1.0
    outcomes, times = _outcomes_of(aigov, {"mode": "offload_sleep", "sleep": one}, "x-offload")
    total = max(times)
    for o in outcomes:
        tag, _, thread = o["value"].partition("@")
        assert tag == "done" and thread.startswith("aigov-offload"), o  # ran on the pool
        assert o["elapsed"] >= one * 0.95, o
    assert len({o["value"] for o in outcomes}) == 4  # four pool threads, one per call
    assert total < 2.5 * one, f"4 x run_blocking({one}s) took {total:.2f}s: they did not overlap"
    _no_events_left(aigov)


def test_run_blocking_propagates_the_exception_on_the_loop(aigov):
    with aigov.client() as kong:
        iid = kong.start_instance({"mode": "offload_raise"})
        calls = kong.run_event(iid)
        assert calls == [{"Method": "kong.response.set_header",
                          "Args": ["x-offload", "ValueError: from the pool"]}]
    _no_events_left(aigov)


def test_wait_future_parks_and_times_out_on_the_loop(aigov):
    """wait_future on the loop: a too-short wait raises TimeoutError after its timeout, a long
    enough one returns the result as soon as a timer thread sets it; 4 of them overlap."""
    delay = 0.8
    outcomes, times = _outcomes_of(aigov, {"mode": "future_wait", "sleep": delay}, "x-future")
    for o in outcomes:
        assert o["short"] == "TimeoutError" and o["result"] == "resolved", o
        assert delay / 4 * 0.9 <= o["short_elapsed"] < delay * 0.9, o
        assert delay * 0.9 <= o["elapsed"] < delay + 0.6, o
    assert max(times) < 3 * delay, f"took {max(times):.2f}s: the waits did not overlap"
    _no_events_left(aigov)


@pytest.mark.parametrize("via", ["round_trip", "send"])
def test_redis_timeout_is_cooperative_and_maps_to_redis_unavailable(aigov, redis_client, redis_server, via):
    """RedisLayer(timeout_ms=300) doing BLPOP key 2: RedisUnavailable (from redis.TimeoutError)
    after ~0.3 s, not 2 s; 4 at once take ~0.3 s, not 4 x 0.3 s. After the breaker's cooldown
    the layer works again and the abandoned BLPOP's late nil does not reach the next command."""
    key = "aigov-test:coop:timeout"
    config = {"mode": "redis_blpop", "redis_port": redis_server.port, "timeout_ms": 300,
              "block": 2, "key": key, "via": via}
    _warm_up_redis(aigov, redis_server.port)
    outcomes, times = _outcomes_of(aigov, config, "x-redis")
    for o in outcomes:
        assert o.get("error") == "RedisUnavailable", o
        assert "TimeoutError" in o["message"], o  # the layer mapped redis.TimeoutError
        assert 0.25 <= o["elapsed"] < 1.0, o  # the 300 ms timeout, not BLPOP's 2 s
        assert o["ping"] == "PONG", o  # not BLPOP's late nil (None) nor an error
    # The four timeouts overlapped: each wait began before any ended.
    assert max(o["t0"] for o in outcomes) < min(o["t1"] for o in outcomes), outcomes
    # Each handler: ~0.3 s timeout + 0.25 s cooldown nap + a PING. Serialized timeouts alone
    # would be 4 x 0.3 s on top of the naps.
    assert max(times) < 1.6, f"took {max(times):.2f}s (times {times}): the timeouts serialized"
    _no_events_left(aigov)


@pytest.mark.parametrize("via", ["round_trip", "send"])
def test_a_reply_that_came_while_the_loop_was_busy_is_not_a_timeout(aigov, redis_client, redis_server, via):
    """A handler waits for Redis with a 500 ms timeout; another handler then blocks the loop
    for 1 s, and the reply arrives meanwhile (the test pushes what the BLPOP waits for). The
    wait's deadline passed while the loop was busy, but its socket was readable before the loop
    looked again: the handler gets the reply, not a timeout (which would also open the
    breaker for every request)."""
    key = "aigov-test:coop:late-look"
    redis_client.delete(key)
    _warm_up_redis(aigov, redis_server.port)
    with aigov.client(timeout=10) as waiter, aigov.client(timeout=10) as blocker:
        wait_iid = waiter.start_instance({"mode": "redis_blpop", "redis_port": redis_server.port,
                                          "timeout_ms": 500, "block": 2, "key": key, "via": via})
        block_iid = blocker.start_instance({"mode": "block_then_call", "sleep": 1.0})
        msgid = waiter.send("plugin.HandleEvent", {"InstanceId": wait_iid, "EventName": "access"})
        assert wait_until(lambda: _blocked_blpops(redis_client) == 1, timeout=1.0, interval=0.01)
        blocker.send("plugin.HandleEvent", {"InstanceId": block_iid, "EventName": "access"})
        time.sleep(0.3)  # the loop is inside the blocking handler now
        redis_client.rpush(key, "value")  # BLPOP answers at once; the loop is still blocked
        event_id, value = _header_call(waiter.read_frame(timeout=5), msgid, "x-redis")
        outcome = json.loads(value)
        assert outcome.get("reply") == [repr(key.encode()), repr(b"value")], outcome  # not an error
        _finish(waiter, event_id)
        _, _, err, result = blocker.read_frame(timeout=5)
        assert err is None
        _finish(blocker, result["EventId"])
    _no_events_left(aigov)


def test_the_routers_first_model_build_does_not_block_the_loop(aigov):
    """The first request of a router waits for its model build (1 s with this embedder) without
    blocking the loop: another connection's event is answered at once meanwhile, and no stall
    hand-over happens."""
    tag = f"cold-{time.monotonic_ns()}"  # a model key no earlier test built
    with aigov.client(timeout=10) as waiter, aigov.client(timeout=10) as other:
        # A first build of another key with no wait: the imports the first such event does on the
        # loop (numpy, aigov.routing: 0.1 s idle) can pass the 0.5 s stall limit on a busy host.
        warm = waiter.start_instance({"mode": "router_cold_build", "sleep": 0, "tag": tag + "-warm"})
        msgid = waiter.send("plugin.HandleEvent", {"InstanceId": warm, "EventName": "access"})
        event_id, _ = _header_call(waiter.read_frame(timeout=30), msgid, "x-router")
        _finish(waiter, event_id)
        time.sleep(0.2)  # the stderr relay has the warm-up's lines
        logged_before = len(aigov.stderr())
        iid = waiter.start_instance({"mode": "router_cold_build", "sleep": 1.0, "tag": tag})
        quick = other.start_instance({"mode": "two_calls"})
        msgid = waiter.send("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
        time.sleep(0.3)  # the build thread is inside its 1 s embedding
        before = time.monotonic()
        assert len(other.run_event(quick)) == 2
        quick_s = time.monotonic() - before
        event_id, value = _header_call(waiter.read_frame(timeout=10), msgid, "x-router")
        outcome = json.loads(value)
        _finish(waiter, event_id)
    assert outcome.get("source") == "built", outcome
    assert outcome["elapsed"] >= 0.9, outcome
    assert quick_s < 0.7, f"the loop was blocked by the build wait: two_calls took {quick_s:.2f}s"
    assert "a new loop thread now serves" not in aigov.stderr()[logged_before:]
    _no_events_left(aigov)
