"""The stand-in's HTTP front and log bookkeeping: wait_logs() waits for every log phase that is
due, and the listener takes bursts of simultaneous connects (real kong-pdk probe plugin)."""
from __future__ import annotations

import http.client
from http.server import BaseHTTPRequestHandler
import select
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "kongsim"))
from helpers import Upstream, probe_entry, read_records, running_upstream  # noqa: E402

from kongsim.gateway import FrontServer, Request  # noqa: E402
from kongsim.pytest_plugin import make_prefix, start_gateway  # noqa: E402

pytestmark = pytest.mark.timeout(120)


upstream = pytest.fixture()(running_upstream)


def kong_yml(up: Upstream, rec: Path) -> dict:
    return {"_format_version": "3.0",
            "services": [{"name": "svc", "url": up.url,
                          "routes": [{"name": "r", "paths": ["/p"]}]}],
            "plugins": [{"name": "kt-probe", "config": {"record_file": str(rec)}}]}


def log_count(rec: Path) -> int:
    return sum(1 for r in read_records(rec) if r["event"] == "log")


def test_wait_logs_covers_a_response_whose_log_has_not_started(upstream) -> None:
    prefix = make_prefix()
    rec = Path(prefix) / "rec.jsonl"
    gw = start_gateway(kong_yml(upstream, rec), server=[probe_entry(prefix)], prefix=prefix,
                       http=False)
    try:
        runloop = gw.gateway.runloop
        resp = gw.gateway.handle(Request("GET", "/p"))
        assert resp.status == 200
        # The response exists but is not sent yet: its log phase is due, not started.
        assert runloop.pending_logs == 1
        assert runloop.wait_logs(0.3) is False
        assert log_count(rec) == 0
        resp.read()  # sent: the log timer starts
        assert runloop.wait_logs(10) is True
        assert runloop.pending_logs == 0 and log_count(rec) == 1
    finally:
        gw.close()


def test_wait_logs_after_each_http_response_and_under_concurrency(upstream) -> None:
    prefix = make_prefix()
    rec = Path(prefix) / "rec.jsonl"
    gw = start_gateway(kong_yml(upstream, rec), server=[probe_entry(prefix)], prefix=prefix)
    try:
        # The front calls sent() after writing the response: a client that already read it
        # must still find its log phase counted.
        for i in range(15):
            assert gw.request("GET", "/p").status == 200
            assert gw.wait_logs(10)
            assert log_count(rec) == i + 1
        errors: list[BaseException] = []
        stop = threading.Event()

        def waiter() -> None:
            while not stop.is_set():
                try:
                    gw.wait_logs(0.05)
                except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                    errors.append(exc)
                    return

        def client() -> None:
            for _ in range(5):
                if gw.request("GET", "/p").status != 200:
                    errors.append(AssertionError("non-200"))

        w = threading.Thread(target=waiter)
        w.start()
        clients = [threading.Thread(target=client) for _ in range(6)]
        [t.start() for t in clients]
        [t.join(60) for t in clients]
        stop.set()
        w.join(10)
        assert errors == []
        assert gw.wait_logs(20) and log_count(rec) == 15 + 30
    finally:
        gw.close()


def test_listen_backlog_holds_64_connects_before_accept() -> None:
    """Connects complete in the kernel's accept queue; the stdlib's backlog of 5 drops the SYNs
    beyond it. The server is not accepting yet, so only the backlog decides."""
    server = FrontServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    socks = []
    try:
        for _ in range(64):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        pending = set(socks)
        deadline = time.monotonic() + 1.5
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], 0.1)
            pending -= set(writable)
        assert not pending, f"{len(pending)} of 64 connects did not complete"
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for s in socks)
    finally:
        for s in socks:
            s.close()
        server.server_close()


def test_64_simultaneous_clients_all_answered(upstream) -> None:
    gw = start_gateway({"_format_version": "3.0",
                        "services": [{"name": "svc", "url": upstream.url,
                                      "routes": [{"name": "r", "paths": ["/p"]}]}]},
                       server=[], prefix=make_prefix())
    try:
        port = int(gw.url.rsplit(":", 1)[1])
        barrier = threading.Barrier(64)
        statuses: list[object] = []

        def one(i: int) -> None:
            barrier.wait(10)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
                conn.request("GET", f"/p/{i}")
                r = conn.getresponse()
                r.read()
                statuses.append(r.status)
                conn.close()
            except OSError as exc:
                statuses.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert statuses == [200] * 64
        assert len(upstream.requests) == 64
        # handler threads are daemons: a client that never finishes cannot block shutdown
        assert isinstance(gw.gateway._http, FrontServer) and gw.gateway._http.daemon_threads
    finally:
        gw.close()


def test_a_body_shorter_than_its_content_length_gets_408(upstream) -> None:
    # A new user's request hung for over 70 s; nginx answers 408 after client_body_timeout
    # (60 s under Kong), here set to 1 s, and the upstream never sees the request.
    gw = start_gateway({"_format_version": "3.0",
                        "services": [{"name": "svc", "url": upstream.url,
                                      "routes": [{"name": "r", "paths": ["/p"]}]}]},
                       server=[], prefix=make_prefix(), client_timeout_s=1.0)
    try:
        port = int(gw.url.rsplit(":", 1)[1])
        seen_before = len(upstream.requests)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            started = time.monotonic()
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            waited = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
        assert 0.5 < waited < 5, waited
        assert len(upstream.requests) == seen_before
    finally:
        gw.close()
