"""The round-trip benchmark's Kong side (aigov.bench.rpcclient on kongsim.rpc) against a real
`aigov serve`, and kongsim.rpc's kernel-level read timeout. No timing assertions."""
from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rpc_client import start_aigov, short_prefix  # noqa: E402,F401 - short_prefix is a fixture

from aigov.bench.common import NOOP_PLUGIN_NAME, NOOP_PLUGINS_DIR  # noqa: E402
from aigov.bench.rpcclient import EventConnection, EventLoop, RPCError  # noqa: E402
from kongsim import rpc  # noqa: E402

pytestmark = pytest.mark.timeout(60)
CALLS = 3


def _answer(method: str, args: list) -> object:
    return "1" if method == "kong.request.get_header" else None


def test_event_loop_drives_many_connections_on_one_thread(short_prefix):
    server = start_aigov(short_prefix, "--plugins", NOOP_PLUGIN_NAME, plugins_dir=NOOP_PLUGINS_DIR,
                         plugin=NOOP_PLUGIN_NAME)
    try:
        with EventConnection(server.socket_path) as conn:
            iid = conn.start_instance(NOOP_PLUGIN_NAME, {"pdk_calls": CALLS})
            # the blocking driver sees the same event shape
            assert conn.handle_event(iid, "access", _answer) == CALLS
        with EventLoop(server.socket_path, 3, iid, _answer, CALLS) as loop:
            latencies = loop.run(5)
            assert len(latencies) == 15 and all(x > 0 for x in latencies)
            assert loop.round_trips == 15 * (1 + CALLS)  # HandleEvent + one Step per PDK call
            latencies = loop.run(2)  # the connections are reused for the next run
            assert len(latencies) == 6 and loop.round_trips == 21 * (1 + CALLS)
        with EventLoop(server.socket_path, 2, iid, _answer, CALLS + 1) as loop:
            with pytest.raises(RPCError, match=f"made {CALLS} PDK calls, expected {CALLS + 1}"):
                loop.run(1)
        with EventLoop(server.socket_path, 2, iid + 12345, _answer, CALLS) as loop:
            with pytest.raises(RPCError, match="no plugin instance"):
                loop.run(1)
    finally:
        server.stop()


def test_rpc_read_timeout_raises_and_drops_the_connection(tmp_path):
    path = str(tmp_path / "silent.socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    accepted: list[socket.socket] = []
    acceptor = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    acceptor.start()
    client = rpc.RpcClient(path, timeout_s=0.3)
    try:
        with pytest.raises(rpc.RpcTimeout):
            client.call("GetStatus", None)  # the peer reads nothing and never answers
        assert client.idle_connection_ids() == []  # a connection that timed out is not pooled
    finally:
        acceptor.join(5)
        for s in accepted:
            s.close()
        listener.close()


def test_rpc_reply_checks():
    assert rpc.check_reply([1, 7, None, {"ok": 1}], 7) == {"ok": 1}
    with pytest.raises(rpc.RpcError, match="msgid mismatch: sent 7, got 8"):
        rpc.check_reply([1, 8, None, None], 7)
    with pytest.raises(rpc.RpcError, match="boom"):
        rpc.check_reply([1, 7, "boom", None], 7)
    with pytest.raises(rpc.RpcError, match="unexpected message"):
        rpc.check_reply([0, 7, "plugin.Step", []], 7)
    assert rpc.is_notification([2, "serverPid", 42]) and not rpc.is_notification([1, 1, None, None])
