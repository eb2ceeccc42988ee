"""The stand-in's RPC pool across a plugin-server kill and respawn.

Kong keeps RPC connections in nginx's cosocket keepalive pool, and nginx drops an idle pooled
connection as soon as the server closes it (lua-nginx-module
`ngx_http_lua_socket_keepalive_close_handler`). So when the plugin server dies only the calls in
flight fail, and the first request after the respawn (reference §1.4) runs its plugins again.
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest

from kongsim import rpc
from kongsim.process import wait_for_socket
from kongsim.pytest_plugin import start_gateway

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(180)


class _EchoServer:
    """A minimal MsgPack:1 server: answers every request with [1, msgid, nil, "pong"]."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            unpacker.feed(data)
            for msg in unpacker:
                conn.sendall(msgpack.packb([1, msg[1], None, "pong"]))

    def drop_connections(self) -> None:
        """What a killed server does to its clients: every connection closes."""
        for c in self.conns:
            c.shutdown(socket.SHUT_RDWR)
            c.close()
        self.conns.clear()

    def close(self) -> None:
        self.drop_connections()
        self.listener.close()


@pytest.fixture()
def echo_server() -> Iterator[_EchoServer]:
    d = tempfile.mkdtemp(prefix="kongsim-", dir="/tmp")
    server = _EchoServer(os.path.join(d, "echo.socket"))
    yield server
    server.close()
    os.unlink(server.path)
    os.rmdir(d)


def test_idle_connection_closed_by_the_server_is_dropped_not_used(echo_server) -> None:
    client = rpc.RpcClient(echo_server.path, timeout_s=5)
    try:
        # two concurrent callers leave two idle connections in the pool
        conns = [client._acquire()[1] for _ in range(2)]
        for c in conns:
            client._release(c)
        assert len(client.idle_connection_ids()) == 2
        deadline = time.monotonic() + 5
        while len(echo_server.conns) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # connect() returns before the server thread accept()s
        echo_server.drop_connections()  # a Unix socket's close reaches the peer at once
        # no call fails: both stale connections are dropped and a new one carries the call
        assert client.call("Ping", None) == "pong"
        assert client.call("Ping", None) == "pong"
        assert client.stale_dropped == 2
        assert client.connections_opened == 3
        assert echo_server.accepted == 3
    finally:
        client.reset_pool()


def _quota_yml(mock_url: str) -> dict[str, Any]:
    quota = {"name": "llm-token-quota", "config": {
        "policy": "memory", "identifier_sources": ["header"], "identifier_header": "X-User",
        "limits": [{"window": "day", "tokens": 10_000_000}]}}
    return {"_format_version": "3.0",
            "services": [{"name": "llm", "url": mock_url, "routes": [
                {"name": "chat", "paths": ["/chat"], "strip_path": True, "plugins": [quota]}]}]}


def _chat(gw: Any, latency_ms: int = 0) -> Any:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    return gw.request("POST", "/chat/v1/chat/completions", json=body,
                      headers={"X-User": "restart", "X-Mock-Latency-Ms": str(latency_ms)})


def _ran_quota(reply: Any) -> bool:
    # access sets X-AI-RateLimit-*, the response phase X-AI-Tokens-*: both ran
    return (reply.status == 200 and reply.header("X-AI-RateLimit-Remaining-Day") is not None
            and reply.header("X-AI-Tokens-Prompt") is not None)


def test_first_requests_after_kill_and_respawn_run_their_plugins(mock_llm) -> None:
    gw = start_gateway(_quota_yml(mock_llm.url), server="aigov", pythonpath=str(REPO))
    try:
        client = gw.gateway.runloop.workers[0].rpc["llm-token-quota"]
        # warm the pool: concurrent requests whose phases overlap leave several idle connections
        for _ in range(5):
            barrier = threading.Barrier(8)
            replies: list[Any] = []

            def one() -> None:
                barrier.wait(30)
                replies.append(_chat(gw, latency_ms=200))

            threads = [threading.Thread(target=one) for _ in range(8)]
            [t.start() for t in threads]
            [t.join(60) for t in threads]
            assert len(replies) == 8 and all(_ran_quota(r) for r in replies)
            assert gw.wait_logs(20)
            if len(client.idle_connection_ids()) >= 3:
                break
        idle_before = len(client.idle_connection_ids())
        assert idle_before >= 2

        # one `aigov serve` hosts every plugin; the first pluginserver entry spawns it
        [server] = gw.gateway.managed.values()
        old_pid = server.pid
        server.kill()  # SIGKILL, like `kill -9`
        deadline = time.monotonic() + 30
        while (server.pid == old_pid or server.spawn_count < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.pid != old_pid
        # the old process is reaped, so the kernel has closed its end of every pooled connection
        wait_for_socket(client.socket_path, 30)

        # every request after the respawn ran the plugin, the first one included
        ran = [_ran_quota(_chat(gw)) for _ in range(idle_before + 3)]
        assert ran == [True] * len(ran)
        assert client.stale_dropped >= idle_before
    finally:
        gw.close()
