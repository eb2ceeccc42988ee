"""A minimal Kong-side MsgPack:1 client for the round-trip benchmark.

It sends exactly what Kong's mp_rpc.lua sends (reference §2): StartInstance with the config as a
JSON string, HandleEvent, then one Step per PDK callback until "ret"; an exit callback ends the
event without a reply. One client is one pooled Kong connection (one per concurrent request).
`open_connection` uses the stand-in's client (kongsim.rpc) for the transport when it is
importable and falls back to the minimal one here otherwise; the event loop is the same.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Callable

import msgpack

TERMINAL_METHODS = frozenset({"kong.response.exit", "kong.response.error"})
READ_CHUNK = 65536

PdkAnswer = Callable[[str, list[Any]], Any]


class RPCError(RuntimeError):
    """The plugin server answered an error, or the connection broke."""


def wait_for_socket(path: Path, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Kong does not wait for the socket (reference §1.4); a harness does, boundedly."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RPCError(f"plugin server exited before creating {path}")
        if path.exists():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(1.0)
                    probe.connect(str(path))
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise RPCError(f"plugin server socket {path} did not appear within {timeout_s:.0f}s")


class _EventLoop:
    """Kong's bridge loop (mp_rpc.lua) over any `call(method, param)` transport."""

    round_trips = 0

    def call(self, method: str, param: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def start_instance(self, name: str, config: dict[str, Any]) -> int:
        reply = self.call("StartInstance", {"Name": name, "Config": json.dumps(config)})
        return int(reply["Id"])

    def handle_event(self, instance_id: int, phase: str, answer: PdkAnswer) -> int:
        """Run one phase to its end; returns the number of PDK callbacks answered."""
        reply = self.call("HandleEvent", {"InstanceId": instance_id, "EventName": phase})
        steps = 0
        while True:
            data = reply.get("Data") if isinstance(reply, dict) else None
            if data == "ret":
                return steps
            if not isinstance(data, dict) or "Method" not in data:
                raise RPCError(f"unexpected event data {data!r:.200}")
            if data["Method"] in TERMINAL_METHODS:
                return steps  # Kong abandons the event without a Step (§2.4)
            value = answer(data["Method"], list(data.get("Args") or []))
            steps += 1
            reply = self.call("Step", {"EventId": reply["EventId"], "Data": value})

    def close(self) -> None:
        pass

    def __enter__(self) -> "_EventLoop":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KongsimConnection(_EventLoop):
    """The stand-in's RpcClient (its own pool: one connection while used by one thread)."""

    transport = "kongsim.rpc"

    def __init__(self, socket_path: Path, timeout_s: float = 30.0) -> None:
        from kongsim.rpc import RpcClient

        self._client = RpcClient(str(socket_path), timeout_s=timeout_s)
        self.round_trips = 0

    def call(self, method: str, param: Any) -> Any:
        from kongsim.rpc import RpcError

        try:
            result = self._client.call(method, param)
        except RpcError as exc:
            raise RPCError(f"{method}: {exc}") from None
        self.round_trips += 1
        return result

    def close(self) -> None:
        self._client.reset_pool()


def open_connection(socket_path: Path, timeout_s: float = 30.0) -> _EventLoop:
    try:
        import kongsim.rpc  # noqa: F401
    except ImportError:
        return PluginConnection(socket_path, timeout_s)
    return KongsimConnection(socket_path, timeout_s)


class PluginConnection(_EventLoop):
    transport = "aigov.bench.rpcclient"

    def __init__(self, socket_path: Path, timeout_s: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        self._sock.connect(str(socket_path))
        self._packer = msgpack.Packer(use_bin_type=True)
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self._msgid = 0
        self.round_trips = 0

    def call(self, method: str, param: Any) -> Any:
        self._msgid += 1
        msgid = self._msgid
        self._sock.sendall(self._packer.pack([0, msgid, f"plugin.{method}", [param]]))
        while True:
            for frame in self._unpacker:
                if isinstance(frame, list) and frame and frame[0] == 2:
                    continue  # notification (serverPid): accepted and ignored, like Kong
                if not isinstance(frame, list) or len(frame) != 4 or frame[0] != 1 or frame[1] != msgid:
                    raise RPCError(f"unexpected frame for msgid {msgid}: {frame!r:.200}")
                self.round_trips += 1
                if frame[2] is not None:
                    raise RPCError(f"{method}: {frame[2]}")
                return frame[3]
            chunk = self._sock.recv(READ_CHUNK)
            if not chunk:
                raise RPCError(f"{method}: connection closed by the plugin server")
            self._unpacker.feed(chunk)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
