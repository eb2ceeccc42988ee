"""MsgPack:1 RPC client, the way Kong's `kong/runloop/plugin_servers/rpc/mp_rpc.lua` talks.

* request `[0, msgid, "plugin.<Method>", [param]]`, reply `[1, msgid, err, result]`, and
  `[2, label, args]` notifications accepted and ignored (Kong handles only Go's serverPid;
  reference kong-plugin-server.md §2.1);
* msgid counts per (plugin server, worker) from 1 (one plugin per server since 3.9);
* every call takes a connection from the worker's pool and puts it back after the reply
  (`setkeepalive`), so one connection carries many sequential calls and concurrent requests
  use separate connections (§2.1);
* 60 s read timeout by default (OpenResty's cosocket default); a timeout raises RpcTimeout,
  which the runloop logs and continues past, like OSS Kong (§2.7).

Strings are packed with `surrogateescape`, so header bytes that are not UTF-8 reach the server
as the raw bytes of a msgpack `str`, exactly like lua-MessagePack sends Lua strings.
"""
from __future__ import annotations

import itertools
import socket
import threading
from typing import Any

import msgpack

from kongsim import redact

log = redact.get_logger("kongsim.rpc")

DEFAULT_TIMEOUT_S = 60.0
POOL_SIZE = 256  # lua_socket_pool_size default


class RpcError(RuntimeError):
    """The server answered with an error string, or the transport failed."""


class RpcTimeout(RpcError):
    """No reply within the read timeout (Kong logs it and continues the request)."""


class Connection:
    """One Unix-socket connection with a streaming unpacker."""

    _ids = itertools.count(1)

    def __init__(self, path: str, timeout_s: float) -> None:
        self.id = next(self._ids)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise RpcError(f"trying to connect: {exc}") from None
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False,
                                         unicode_errors="surrogateescape")
        self.packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")
        # recv_into one buffer per connection: recv(65536) would allocate 64 KB per reply.
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        self.calls = 0

    def send(self, message: Any) -> None:
        self.sock.sendall(self.packer.pack(message))

    def receive(self) -> Any:
        unpacker = self.unpacker
        while True:
            for msg in unpacker:
                return msg
            try:
                n = self.sock.recv_into(self._buf)
            except socket.timeout:
                raise RpcTimeout("timeout") from None
            except OSError as exc:
                raise RpcError(f"receive failed: {exc}") from None
            if not n:
                raise RpcError("closed")
            unpacker.feed(self._view[:n])  # feed copies into the unpacker's own buffer

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class RpcClient:
    """The per-worker RPC object for one plugin server (its pool and msgid counter)."""

    def __init__(self, socket_path: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._msgid = 0
        self.connections_opened = 0
        self.calls = 0

    def next_msgid(self) -> int:
        with self._lock:
            self._msgid += 1
            return self._msgid

    def _acquire(self) -> tuple[int, Connection]:
        """A msgid and a pooled connection, under one lock acquisition (the per-call hot path)."""
        with self._lock:
            self._msgid += 1
            self.calls += 1
            msgid = self._msgid
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = Connection(self.socket_path, self.timeout_s)
            with self._lock:
                self.connections_opened += 1
        return msgid, conn

    def _release(self, conn: Connection) -> None:
        with self._lock:
            if len(self._idle) < POOL_SIZE:
                self._idle.append(conn)
                return
        conn.close()

    def call(self, method: str, param: Any) -> Any:
        """`plugin.<method>` with one param; returns the result or raises RpcError/RpcTimeout."""
        msgid, conn = self._acquire()
        ok = False
        try:
            conn.send([0, msgid, "plugin." + method, [param]])
            conn.calls += 1
            while True:
                msg = conn.receive()
                if isinstance(msg, list) and msg and msg[0] == 2:
                    continue  # notification, e.g. ["serverPid", pid]: ignored
                break
            if not (isinstance(msg, list) and len(msg) == 4 and msg[0] == 1):
                raise RpcError(f"unexpected message from plugin server: type {msg!r:.80}")
            if msg[1] != msgid:
                raise RpcError(f"msgid mismatch: sent {msgid}, got {msg[1]}")
            ok = True
            if msg[2] is not None:
                raise RpcError(str(msg[2]))
            return msg[3]
        except (OSError, ValueError, msgpack.ExtraData) as exc:
            raise RpcError(f"{type(exc).__name__}: {exc}") from None
        finally:
            # A connection whose reply never came may later carry a stale reply (Kong's
            # late-reply hazard, reference §2.7); the stand-in drops it instead of pooling it.
            if ok:
                self._release(conn)
            else:
                conn.close()

    def reset_pool(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    def idle_connection_ids(self) -> list[int]:
        with self._lock:
            return [c.id for c in self._idle]
