"""MsgPack:1 RPC client, the way Kong's `kong/runloop/plugin_servers/rpc/mp_rpc.lua` talks.

* request `[0, msgid, "plugin.<Method>", [param]]`, reply `[1, msgid, err, result]`, and
  `[2, label, args]` notifications accepted and ignored (Kong handles only Go's serverPid;
  reference kong-plugin-server.md §2.1);
* msgid counts per (plugin server, worker) from 1 (one plugin per server since 3.9);
* every call takes a connection from the worker's pool and puts it back after the reply
  (`setkeepalive`), so one connection carries many sequential calls and concurrent requests
  use separate connections (§2.1);
* an idle pooled connection the server closed (a killed or restarted plugin server, §1.4) is
  never used for a call: nginx drops it from the pool as soon as it turns readable
  (lua-nginx-module `ngx_http_lua_socket_keepalive_close_handler`), so after a restart only
  the calls in flight at the time fail (Kong's `Rpc:call` in mp_rpc.lua never retries);
* 60 s read timeout by default (OpenResty's cosocket default); a timeout raises RpcTimeout,
  which the runloop logs and continues past, like OSS Kong (§2.7).

Strings are packed with `surrogateescape`, so header bytes that are not UTF-8 reach the server
as the raw bytes of a msgpack `str`, exactly like lua-MessagePack sends Lua strings.
"""
from __future__ import annotations

import itertools
import socket
import struct
import threading
from typing import Any, Iterator

import msgpack

from kongsim import redact

log = redact.get_logger("kongsim.rpc")

DEFAULT_TIMEOUT_S = 60.0
POOL_SIZE = 256  # lua_socket_pool_size default
RECV_BUFFER_BYTES = 65536


class RpcError(RuntimeError):
    """The server answered with an error string, or the transport failed."""


class RpcTimeout(RpcError):
    """No reply within the read timeout (Kong logs it and continues the request)."""


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class Connection:
    """One Unix-socket connection with a reusable packer, receive buffer and streaming unpacker.

    The read/write timeouts are the kernel's SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket, not
    Python's settimeout(): with settimeout CPython polls before every recv and every send, two
    extra system calls per round trip. An expired timeout surfaces as EAGAIN (BlockingIOError).
    """

    _ids = itertools.count(1)

    def __init__(self, path: str, timeout_s: float) -> None:
        self.id = next(self._ids)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            timeval = _timeval(max(timeout_s, 0.001))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            # SO_SNDTIMEO also bounds connect() on a Unix socket whose backlog is full.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise RpcError(f"trying to connect: {exc}") from None
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False,
                                         unicode_errors="surrogateescape")
        self.packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")
        # recv_into one buffer per connection: recv(65536) would allocate 64 KB per reply.
        self._buf = bytearray(RECV_BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self.calls = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Any) -> None:
        self.sock.sendall(self.packer.pack(message))

    def send_request(self, msgid: int, method: str, param: Any) -> None:
        """Send `[0, msgid, "plugin.<method>", [param]]` (what Kong's mp_rpc.lua sends)."""
        try:
            self.sock.sendall(self.packer.pack([0, msgid, "plugin." + method, [param]]))
        except BlockingIOError:  # SO_SNDTIMEO expired: the server stopped reading
            raise RpcTimeout(f"send of {method} timed out") from None
        except OSError as exc:
            raise RpcError(f"send failed: {exc}") from None
        self.calls += 1

    def receive(self) -> Any:
        """The next message; blocks up to the read timeout (RpcTimeout)."""
        unpacker = self.unpacker
        while True:
            for msg in unpacker:
                return msg
            self._fill()

    def receive_ready(self) -> Iterator[Any]:
        """One recv (the caller knows the socket is readable), then every complete message."""
        self._fill()
        return self.unpacker

    def _fill(self) -> None:
        try:
            n = self.sock.recv_into(self._buf)
        except BlockingIOError:
            raise RpcTimeout("timeout") from None
        except OSError as exc:
            raise RpcError(f"receive failed: {exc}") from None
        if not n:
            raise RpcError("closed")
        self.unpacker.feed(self._view[:n])  # feed copies into the unpacker's own buffer

    def idle_ok(self) -> bool:
        """Whether this idle pooled connection may carry the next call.

        nginx watches idle pooled connections: on any read event it does a 1-byte recv and,
        unless that would block, closes the connection and removes it from the pool, whether
        it read EOF (the peer closed) or stray bytes (ngx_http_lua_socket_keepalive_close_handler
        in lua-nginx-module). The stand-in has no event loop, so it makes the same check when
        it takes the connection out of the pool: one non-blocking peek."""
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True  # nothing to read: still open and idle
        except OSError:
            return False
        return False  # b"" (the server closed it) or unexpected bytes

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def check_reply(msg: Any, msgid: int) -> Any:
    """The result of reply `msg` to request `msgid`; RpcError for an error or a stray frame."""
    if type(msg) is not list or len(msg) != 4 or msg[0] != 1:
        raise RpcError(f"unexpected message from plugin server: type {msg!r:.80}")
    if msg[1] != msgid:
        raise RpcError(f"msgid mismatch: sent {msgid}, got {msg[1]}")
    if msg[2] is not None:
        raise RpcError(str(msg[2]))
    return msg[3]


def is_notification(msg: Any) -> bool:
    """`[2, label, args]`, e.g. Go's ["serverPid", pid]: Kong accepts and ignores them."""
    return type(msg) is list and bool(msg) and msg[0] == 2


class RpcClient:
    """The per-worker RPC object for one plugin server (its pool and msgid counter)."""

    def __init__(self, socket_path: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._msgid = 0
        self.connections_opened = 0
        self.stale_dropped = 0  # idle connections found closed by the server and dropped
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
        # A connection the server closed while it sat in the pool is dropped, never used
        # (nginx's keepalive close handler, see Connection.idle_ok); try the next idle one.
        while conn is not None and not conn.idle_ok():
            conn.close()
            with self._lock:
                self.stale_dropped += 1
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
            conn.sock.sendall(conn.packer.pack([0, msgid, "plugin." + method, [param]]))
            conn.calls += 1
            msg = conn.receive()
            while is_notification(msg):
                msg = conn.receive()  # notification, e.g. ["serverPid", pid]: ignored
            if type(msg) is list and len(msg) == 4 and msg[0] == 1 and msg[1] == msgid:
                ok = True  # a well-formed reply: the connection may be pooled again
            return check_reply(msg, msgid)
        except BlockingIOError:
            raise RpcTimeout("timeout sending the request") from None
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
