"""The one Redis layer: a client per connection config, with a short circuit breaker.

Plugins run on the request path, so a dead Redis must cost one fast failure, not a connect
timeout on every request: after a connection error the layer refuses calls for `cooldown_s`
and then lets one probe through. Every plugin maps `RedisUnavailable` to its documented
failure policy (cache: Failed + proxy; quota: fail_open / fail_closed).
"""
from __future__ import annotations

import hashlib
import select
import threading
import time
from typing import Any, Callable, TypeVar

import redis
import redis.connection
from redis.backoff import NoBackoff
from redis.retry import Retry

from aigov import cooperative

T = TypeVar("T")


class RedisUnavailable(RuntimeError):
    """Redis could not be reached or answered with a connection-level error."""


class RedisLayer:
    def __init__(self, host: str = "127.0.0.1", port: int = 6379, database: int = 0,
                 username: str | None = None, password: str | None = None, ssl: bool = False,
                 timeout_ms: int = 200, cooldown_s: float = 1.0, url: str | None = None) -> None:
        # No client-side retries: redis-py 8 retries a failed connect 10 times with backoff by
        # default (4.6 s against a dead port with a 200 ms timeout); the breaker below is our retry.
        common = dict(socket_timeout=timeout_ms / 1000.0, socket_connect_timeout=timeout_ms / 1000.0,
                      health_check_interval=30, max_connections=1024,
                      retry=Retry(NoBackoff(), 0))
        if url:
            self.client = redis.Redis.from_url(url, **common)
            self.address = url.split("@")[-1]
        else:
            self.client = redis.Redis(host=host, port=port, db=database, username=username or None,
                                      password=password or None, ssl=ssl, **common)
            self.address = f"{host}:{port}/{database}"
        _make_reads_cooperative(self.client.connection_pool)
        # send() writes and reads its commands itself on plain TCP / Unix connections (see
        # _LeanCall); TLS keeps redis-py's reads, which know about buffered TLS records.
        self.lean = self.client.connection_pool.connection_class in _COOPERATIVE_CLASSES.values()
        self._lean_idle: list[Any] = []  # connected connections kept out of the pool between calls
        self.cooldown_s = cooldown_s
        self._down_until = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # the password never appears
        return f"RedisLayer({self.address})"

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._down_until

    def send(self, *commands: tuple[Any, ...]) -> "PendingReplies | _LeanCall":
        """Send `commands` now in one write; read their replies later (`.replies()`).

        For commands whose replies are scalars and arrays (EVALSHA of the quota's scripts): on
        plain connections they are packed and parsed here, not by redis-py's per-call machinery
        (connection pool, encoder, parser), which cost more than Redis's answer did."""
        if self.lean:
            return _LeanCall(self, commands)
        return PendingReplies(self, commands)

    def _take_lean(self) -> Any:
        """A connected connection of our own: a kept one that is still open, else the pool's."""
        pool = self.client.connection_pool
        while True:
            try:
                conn = self._lean_idle.pop()
            except IndexError:
                return pool.get_connection()
            if _quiet_and_open(conn):
                return conn
            conn.disconnect()  # closed by Redis (restart, idle timeout) or out of step
            pool.release(conn)

    def _keep_lean(self, conn: Any) -> None:
        if len(self._lean_idle) < _LEAN_IDLE_CAP:
            self._lean_idle.append(conn)
        else:
            self.client.connection_pool.release(conn)

    def _drop_lean(self, conn: Any) -> None:
        conn.disconnect()
        self.client.connection_pool.release(conn)

    def round_trip(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Several commands in one write and their replies in order (no MULTI): what redis-py's
        Pipeline does, without its per-call machinery, which cost as much as the trip it saved.
        Error replies come back as ResponseError in their slots."""
        pool = self.client.connection_pool
        return self.run(lambda _client: _read_replies(pool, _send_now(pool, commands), len(commands)))

    def run(self, fn: Callable[[redis.Redis], T]) -> T:
        """Call `fn(client)`; connection failures become RedisUnavailable and open the breaker."""
        if not self.healthy:
            raise RedisUnavailable(f"redis {self.address} marked down (retry after cooldown)")
        return self.mapped(fn)

    def mapped(self, fn: Callable[[redis.Redis], T]) -> T:
        """run() without the breaker's refusal: reading the replies of commands already sent
        (they must be read, or the connection is dropped, whatever the breaker says)."""
        try:
            return fn(self.client)
        except redis.exceptions.MaxConnectionsError as exc:
            # Our own pool is full (many requests in flight), not a Redis outage: fail this call
            # only, without opening the breaker for everyone.
            raise RedisUnavailable(f"redis {self.address}: connection pool exhausted: {exc}") from None
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.InvalidResponse, OSError) as exc:
            # InvalidResponse: the peer does not speak RESP (a web server or a proxy on the port).
            with self._lock:
                self._down_until = time.monotonic() + self.cooldown_s
            raise RedisUnavailable(f"redis {self.address}: {type(exc).__name__}: {exc}") from None
        except redis.ResponseError as exc:
            # Busy loading / read-only replica behave like an outage for our purposes.
            msg = str(exc)
            if msg.startswith(("LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN")):
                raise RedisUnavailable(f"redis {self.address}: {msg}") from None
            raise


class _CooperativeReads:
    """Waits for a reply's first byte through aigov.cooperative: on `aigov serve`'s loop the
    handler is parked until the socket is readable, so other requests run while Redis works.

    Only when nothing is buffered (a buffered reply may need no socket data at all) and the
    parser is redis-py's own (it reads through a SocketBuffer); otherwise the read blocks as usual.
    """

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        sock = self._sock
        buffer = getattr(self._parser, "_buffer", None)
        if sock is not None and buffer is not None and cooperative.current_loop() is not None \
                and not buffer.unread_bytes():
            timeout = kwargs.get("timeout", redis.connection.SENTINEL)
            if timeout is redis.connection.SENTINEL:
                timeout = self.socket_timeout
            if not cooperative.wait_readable(sock.fileno(), timeout):
                self.disconnect()  # the reply may still come: it must not reach the next user
                raise redis.TimeoutError(f"Timeout reading from {self._host_error()}")
        return super().read_response(*args, **kwargs)


_COOPERATIVE_CLASSES = {
    redis.connection.Connection: type("CooperativeConnection",
                                      (_CooperativeReads, redis.connection.Connection), {}),
    redis.connection.UnixDomainSocketConnection: type(
        "CooperativeUnixDomainSocketConnection",
        (_CooperativeReads, redis.connection.UnixDomainSocketConnection), {}),
}


def _make_reads_cooperative(pool: Any) -> None:
    """Plain TCP and Unix-socket connections read cooperatively; TLS keeps redis-py's class
    (TLS buffers records, so a readable socket and a readable reply are different things)."""
    cooperative_class = _COOPERATIVE_CLASSES.get(getattr(pool, "connection_class", None))
    if cooperative_class is not None:
        pool.connection_class = cooperative_class


def _send_now(pool: Any, commands: tuple[tuple[Any, ...], ...]) -> Any:
    """Take a pooled connection and write `commands` in one go; the connection is the caller's."""
    conn = pool.get_connection()
    try:
        conn.send_packed_command(conn.pack_commands(commands))
    except BaseException:
        conn.disconnect()
        pool.release(conn)
        raise
    return conn


def _read_replies(pool: Any, conn: Any, count: int) -> list[Any]:
    """Read `count` replies in order and give the connection back; an error reply is a
    ResponseError in its slot (all are still read, so the connection stays in step)."""
    try:
        out: list[Any] = []
        for _ in range(count):
            try:
                out.append(conn.read_response())
            except redis.ResponseError as exc:
                out.append(exc)
        return out
    except BaseException:
        conn.disconnect()  # a half-read reply must never be handed to the next caller
        raise
    finally:
        pool.release(conn)


_LEAN_IDLE_CAP = 256  # connections send() keeps between calls; more go back to the pool
_CRLF = b"\r\n"
_INCOMPLETE = object()


def pack_command(args: tuple[Any, ...]) -> bytes:
    """One command as a RESP array of bulk strings, encoded as redis-py encodes arguments (str
    as strict UTF-8, int and float as their repr; anything else is a DataError)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is bytes:
            data = arg
        elif type(arg) is str:
            data = arg.encode("utf-8")
        elif type(arg) is int or type(arg) is float:
            data = repr(arg).encode()
        elif isinstance(arg, (bytes, bytearray, memoryview)):
            data = bytes(arg)
        else:
            raise redis.DataError(f"invalid input of type {type(arg).__name__}: use bytes, str, int or float")
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(_CRLF)
    return b"".join(parts)


class _Push(list):
    """A RESP3 push frame (`>`: client-side caching invalidations, maintenance notices): not the
    reply to any command; the reader skips it, as redis-py's parser hands it to its handler."""


def parse_reply(buf: bytes | bytearray, pos: int, parse_error: Callable[[str], Exception],
                top: bool = True) -> tuple[Any, int]:
    """The RESP2/RESP3 reply at `buf[pos:]` and the position after it; (_INCOMPLETE, n) when
    the buffer must hold at least n bytes before a retry can get further.

    Values as redis-py's parser gives them without decoding: bytes for strings, int, float, bool,
    None, lists, dicts; an error reply is the exception redis-py would give (NoScriptError,
    ResponseError, ...), returned in place, not raised. A push frame comes back as a _Push (only
    between replies); attributes (`|`) are read and dropped. Malformed input raises ValueError
    (or ConnectionError for an unknown type)."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        return _INCOMPLETE, len(buf) + 1
    kind, line, after = buf[pos:pos + 1], bytes(buf[pos + 1:end]), end + 2
    if kind == b":" or kind == b"(":
        return int(line), after
    if kind == b"$" or kind == b"=":
        n = int(line)
        if n == -1:
            return None, after
        if n < 0:
            raise ValueError(f"bulk length {n}")
        if len(buf) < after + n + 2:
            return _INCOMPLETE, after + n + 2
        if buf[after + n:after + n + 2] != _CRLF:
            raise ValueError("bulk string not terminated by CRLF")
        data = bytes(buf[after:after + n])
        return (data[4:] if kind == b"=" else data), after + n + 2  # verbatim: drop "txt:"
    if kind in (b"*", b"~", b"%", b">", b"|"):
        n = int(line)
        if n == -1 and kind == b"*":
            return None, after
        if n < 0:
            raise ValueError(f"aggregate length {n}")
        if kind == b">" and not top:
            raise ValueError("push frame inside a reply")
        items: list[Any] = []
        for _ in range(2 * n if kind in (b"%", b"|") else n):
            item, after = parse_reply(buf, after, parse_error, top=False)
            if item is _INCOMPLETE:
                return _INCOMPLETE, after
            items.append(item)
        if kind == b"|":  # attributes annotate the reply that follows: keep the reply only
            return parse_reply(buf, after, parse_error, top=top)
        if kind == b"%":
            return dict(zip(items[::2], items[1::2])), after
        if kind == b">":
            return _Push(items), after
        return items, after
    if kind == b"+":
        return line, after
    if kind == b"-":
        return parse_error(line.decode("utf-8", "replace")), after
    if kind == b"_":
        return None, after
    if kind == b",":
        return float(line), after
    if kind == b"#":
        return line == b"t", after
    raise redis.ConnectionError(f"unexpected RESP reply type {kind!r}")


def _quiet_and_open(conn: Any) -> bool:
    """A kept connection can be reused: connected, nothing unread (Redis closing it makes the
    socket readable too). One poll(0), as redis-py's pool does before handing one out."""
    sock = getattr(conn, "_sock", None)
    if sock is None:
        return False
    buffer = getattr(conn._parser, "_buffer", None)
    if buffer is not None and buffer.unread_bytes():
        return False
    return not _readable_now(sock)


class _LeanCall:
    """Commands written now on a connection of the layer's own, their replies read later
    (replies()), like PendingReplies but packed and parsed in this module.

    Waiting for the reply goes through aigov.cooperative (the handler is parked on `aigov
    serve`'s loop) unless it is there already. A timeout, a transport error or a malformed
    reply disconnects the connection (it may still carry the late reply) and raises the error
    redis-py raises (TimeoutError, ConnectionError), which the layer maps to RedisUnavailable.
    """

    def __init__(self, layer: RedisLayer, commands: tuple[tuple[Any, ...], ...]) -> None:
        self.layer, self.count = layer, len(commands)
        payload = b"".join(pack_command(c) for c in commands)  # a DataError raises before any send
        self._conn: Any = layer.run(lambda _client: self._send(payload))

    def _send(self, payload: bytes) -> Any:
        conn = self.layer._take_lean()
        try:
            conn._sock.sendall(payload)
        except BaseException as exc:
            self.layer._drop_lean(conn)
            if isinstance(exc, OSError):
                raise redis.ConnectionError(f"Error while writing to {conn._host_error()}: {exc}") from None
            raise
        return conn

    def replies(self) -> list[Any]:
        """Every reply in order (error replies as exceptions in their slots)."""
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("replies() called twice or after cancel()")
        return self.layer.mapped(lambda _client: self._read(conn))

    def _read(self, conn: Any) -> list[Any]:
        sock, timeout = conn._sock, conn.socket_timeout
        parse_error = conn._parser.parse_error
        buf, pos, out = bytearray(), 0, []
        need = 1  # bytes the buffer must hold before parsing again can get further
        try:
            # Every reply, then whatever else was sent with them: only push frames may follow.
            while len(out) < self.count or pos < len(buf):
                item, after = parse_reply(buf, pos, parse_error) if len(buf) >= need else (_INCOMPLETE, need)
                if item is _INCOMPLETE:
                    need = max(after, len(buf) + 1)
                    if pos:  # drop what is parsed already
                        del buf[:pos]
                        need -= pos
                        pos = 0
                    self._fill(conn, sock, timeout, buf, need)
                    continue
                pos = after
                need = 1
                if type(item) is _Push:
                    continue  # not a reply (redis-py hands it to its push handler)
                if len(out) == self.count:
                    raise redis.ConnectionError(f"a reply nobody asked for from {conn._host_error()}")
                if isinstance(item, redis.ConnectionError):
                    raise item  # LOADING and friends: redis-py raises these, and so do we
                out.append(item)
        except BaseException as exc:
            self.layer._drop_lean(conn)  # a half-read reply must never reach the next caller
            if isinstance(exc, OSError) and not isinstance(exc, (redis.RedisError, TimeoutError)):
                raise redis.ConnectionError(f"Error while reading from {conn._host_error()}: {exc}") from None
            if isinstance(exc, (ValueError, TypeError, RecursionError)):  # not RESP, or hostile
                raise redis.ConnectionError(f"malformed reply from {conn._host_error()}: "
                                            f"{type(exc).__name__}: {exc}") from None
            raise
        self.layer._keep_lean(conn)
        return out

    @staticmethod
    def _fill(conn: Any, sock: Any, timeout: float | None, buf: bytearray, need: int) -> None:
        """Read until `buf` holds `need` bytes, then whatever else is there already. Parsing
        again only then keeps a big reply linear (a retry per 64 KB read was quadratic)."""
        while True:
            if cooperative.current_loop() is not None and not _readable_now(sock) \
                    and not cooperative.wait_readable(sock.fileno(), timeout):
                raise redis.TimeoutError(f"Timeout reading from {conn._host_error()}")
            size = min(max(65536, need - len(buf)), 4 << 20)
            try:
                chunk = sock.recv(size)
            except TimeoutError:
                raise redis.TimeoutError(f"Timeout reading from {conn._host_error()}") from None
            if not chunk:
                raise redis.ConnectionError(f"Connection closed by {conn._host_error()}")
            buf += chunk
            # A short read emptied the socket; after a full one, look whether more is there.
            if len(buf) >= need and (len(chunk) < size or not _readable_now(sock)):
                return

    def cancel(self) -> None:
        """Give up on the replies (the caller failed in between): drop the connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self.layer._drop_lean(conn)


def _readable_now(sock: Any) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class PendingReplies:
    """Commands already written on a pooled connection whose replies are read later (replies()),
    so Redis runs them while the caller does other work (a PDK round trip).

    The connection is owned until replies() or cancel(): it carries unread replies, so it goes
    back to the pool only once they are read and is disconnected otherwise (a later user would
    read them as its own). Failures go through the layer (RedisUnavailable, breaker).
    """

    def __init__(self, layer: "RedisLayer", commands: tuple[tuple[Any, ...], ...]) -> None:
        self.layer, self.count = layer, len(commands)
        pool = layer.client.connection_pool
        self._conn: Any = layer.run(lambda _client: _send_now(pool, commands))

    def replies(self) -> list[Any]:
        """Every reply in order (error replies as ResponseError in their slots)."""
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("PendingReplies.replies() called twice or after cancel()")
        pool = self.layer.client.connection_pool
        return self.layer.mapped(lambda _client: _read_replies(pool, conn, self.count))

    def cancel(self) -> None:
        """Give up on the replies (the caller failed in between): drop the connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()
            self.layer.client.connection_pool.release(conn)


_LAYERS: dict[str, RedisLayer] = {}
_LAYERS_LOCK = threading.Lock()


def layer_from_config(conf: dict[str, Any] | None) -> RedisLayer:
    """The shared RedisLayer for a plugin's `redis` record (one pool per distinct config)."""
    conf = dict(conf or {})
    key = hashlib.sha256(repr(sorted((k, str(v)) for k, v in conf.items())).encode()).hexdigest()
    with _LAYERS_LOCK:
        layer = _LAYERS.get(key)
        if layer is None:
            layer = RedisLayer(host=conf.get("host") or "127.0.0.1", port=int(conf.get("port") or 6379),
                               database=int(conf.get("database") or 0), username=conf.get("username"),
                               password=conf.get("password"), ssl=bool(conf.get("ssl")),
                               timeout_ms=int(conf.get("timeout_ms") or 200), url=conf.get("url"))
            _LAYERS[key] = layer
        return layer
