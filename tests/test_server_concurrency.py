"""Concurrency and event lifetime of `aigov serve`: no global lock around handlers, a bounded
worker pool with a clear overload error, and events reaped when Kong abandons them."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rpc_client import (  # noqa: E402
    start_aigov, start_stock,
    short_prefix,  # noqa: F401 - pytest fixture
)

pytestmark = pytest.mark.timeout(60)


def _concurrent_events(server, handlers: int, config: dict) -> tuple[float, list]:
    """Send `handlers` HandleEvents at once, one connection each (as concurrent Kong requests)."""
    clients = [server.client(timeout=15) for _ in range(handlers)]
    try:
        ids = [c.start_instance(config) for c in clients]
        replies: list = [None] * handlers
        started = time.monotonic()
        msgids = [c.send("plugin.HandleEvent", {"InstanceId": i, "EventName": "access"})
                  for c, i in zip(clients, ids)]

        def read(n: int) -> None:
            replies[n] = clients[n].read_frame(timeout=15)

        readers = [threading.Thread(target=read, args=(n,)) for n in range(handlers)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(20)
        elapsed = time.monotonic() - started
        assert [r[1] for r in replies] == msgids
        return elapsed, replies
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("kind", ["stock", "aigov"])
def test_handlers_run_concurrently(short_prefix, kind):
    """8 handlers waiting 0.5 s (aigov.cooperative.sleep, as the library waits for Redis and
    embeddings) before their first PDK call: ~0.5 s total on aigov's one loop, not 8 x 0.5 s.

    The stock server holds its global e_lock until a handler's first PDK call (§3.3), which
    serializes the 8 sleeps; that is documented here as the contrast.
    """
    server = (start_stock if kind == "stock" else start_aigov)(short_prefix)
    try:
        elapsed, replies = _concurrent_events(server, 8, {"mode": "sleep_then_call", "sleep": 0.5})
        assert all(r[2] is None and r[3]["Data"]["Method"] == "kong.response.set_header"
                   for r in replies)
        if kind == "stock":
            assert elapsed >= 3.8
        else:
            assert elapsed < 1.5
    finally:
        server.stop()


def test_pool_overload_is_a_clear_error_and_recovers(short_prefix):
    server = start_aigov(short_prefix, "--max-workers", "2")
    try:
        busy = [server.client(timeout=10) for _ in range(2)]
        for c in busy:
            c.send("plugin.HandleEvent", {"InstanceId": c.start_instance({"mode": "nap_only", "sleep": 3.0}),
                                          "EventName": "access"})
        with server.client() as extra:
            # The naps are cooperative: the loop still answers status calls while both workers nap.
            deadline = time.monotonic() + 5
            while extra.call("plugin.GetStatus")["Workers"]["busy"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            iid = extra.start_instance({"mode": "two_calls"})
            started = time.monotonic()
            _, _, err, result = extra.call_raw("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
            assert err == "plugin server overloaded: all 2 handler workers are busy" and result is None
            assert time.monotonic() - started < 1.5  # refused at once, not queued behind a 3 s nap
            for c in busy:
                assert c.read_frame(timeout=5)[3]["Data"] == "ret"
                c.close()
            assert len(extra.run_event(iid)) == 2  # capacity is back
            assert extra.call("plugin.GetStatus")["Events"] == 0
    finally:
        server.stop()


def test_slow_handler_is_answered_before_kongs_read_timeout(short_prefix):
    server = start_aigov(short_prefix, "--step-timeout", "0.5")
    try:
        with server.client() as kong:
            iid = kong.start_instance({"mode": "sleep_only", "sleep": 2})
            started = time.monotonic()
            _, _, err, _ = kong.call_raw("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
            assert "neither called the PDK nor returned within 0.5s" in err
            assert time.monotonic() - started < 1.5
            assert kong.call("plugin.GetStatus")["Events"] == 0
    finally:
        server.stop()


def test_abandoned_event_is_reaped_and_its_handler_released(short_prefix):
    """Kong abandons an event when a PDK function raises on its side; no Step ever comes."""
    server = start_aigov(short_prefix, "--event-timeout", "1")
    try:
        with server.client() as kong:
            iid = kong.start_instance({"mode": "two_calls"})
            reply = kong.handle_event(iid)
            assert reply["Data"]["Method"] == "kong.request.get_header"
            assert kong.call("plugin.GetStatus")["Events"] == 1
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                status = kong.call("plugin.GetStatus")
                if status["Events"] == 0 and status["Workers"]["busy"] == 0:
                    break
                time.sleep(0.1)
            assert status["Events"] == 0 and status["Workers"]["busy"] == 0
            _, _, err, _ = kong.call_raw("plugin.Step", {"EventId": reply["EventId"], "Data": "late"})
            assert err == f"event id {reply['EventId']} not found"
        assert "reaped abandoned event" in server.stderr()
    finally:
        server.stop()


def test_event_of_a_dead_connection_is_reaped(short_prefix):
    server = start_aigov(short_prefix)  # default event timeout 65 s: only the dead connection counts
    try:
        kong = server.client()
        iid = kong.start_instance({"mode": "two_calls"})
        kong.handle_event(iid)
        kong.close()  # e.g. the nginx worker died mid-request
        with server.client() as admin:
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and admin.call("plugin.GetStatus")["Events"]:
                time.sleep(0.1)
            status = admin.call("plugin.GetStatus")
            assert status["Events"] == 0 and status["Workers"]["busy"] == 0
    finally:
        server.stop()


def test_event_may_continue_on_another_pooled_connection(short_prefix):
    """Kong takes any pooled connection for the next Step; an event is not tied to one."""
    server = start_aigov(short_prefix)
    try:
        with server.client() as first, server.client() as second:
            iid = first.start_instance({"mode": "two_calls"})
            reply = first.handle_event(iid)
            reply = second.step(reply["EventId"], "a")
            assert reply["Data"] == {"Method": "kong.request.get_header", "Args": ["x-b"]}
            assert first.step(reply["EventId"], "b")["Data"] == "ret"
    finally:
        server.stop()
