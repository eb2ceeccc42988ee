"""The stand-in bounds the connect by the service's connect_timeout and each read by its
read_timeout (nginx's proxy_connect_timeout / proxy_read_timeout): an upstream that never
accepts is a 504 after connect_timeout, not after read_timeout."""
from __future__ import annotations

import socket
from typing import Iterator

import pytest

from kongsim.pytest_plugin import start_gateway


@pytest.fixture()
def unaccepting_port() -> Iterator[int]:
    """A listener whose accept queue is full: a further connect waits for a SYN-ACK that never comes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # the backlog of 0 still admits one or two: fill it
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_connect_timeout_not_read_timeout_bounds_the_connect(unaccepting_port: int) -> None:
    decl = {"_format_version": "3.0", "services": [{
        "name": "stuck", "url": f"http://127.0.0.1:{unaccepting_port}", "connect_timeout": 300,
        "read_timeout": 60000, "routes": [{"name": "r", "paths": ["/"]}]}]}
    gw = start_gateway(decl, server=[])
    try:
        # With read_timeout bounding the connect this takes 60 s and the client gives up at 20.
        r = gw.request("GET", "/anything", timeout=20)
        assert r.status == 504
        assert "timing out" in r.json()["message"]
    finally:
        gw.close()


def test_write_timeout_bounds_sending_the_body() -> None:
    """An upstream that accepts but never reads: a body bigger than the socket buffers cannot be
    sent, and the service's write_timeout (nginx's proxy_send_timeout) ends it with a 504."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    decl = {"_format_version": "3.0", "services": [{
        "name": "deaf", "url": f"http://127.0.0.1:{listener.getsockname()[1]}", "write_timeout": 300,
        "read_timeout": 60000, "routes": [{"name": "r", "paths": ["/"]}]}]}
    # Kong's default client_max_body_size (0: no limit); kong.conf.example's 8m would answer 413.
    gw = start_gateway(decl, server=[], client_max_body_size=0)
    try:
        r = gw.request("POST", "/upload", body=b"x" * (16 * 1024 * 1024), timeout=20)
        assert r.status == 504
    finally:
        gw.close()
        for s in held:
            s.close()
        listener.close()
