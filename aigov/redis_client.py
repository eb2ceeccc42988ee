"""The one Redis layer: a client per connection config, with a short circuit breaker.

Plugins run on the request path, so a dead Redis must cost one fast failure, not a connect
timeout on every request: after a connection error the layer refuses calls for `cooldown_s`
and then lets one probe through. Every plugin maps `RedisUnavailable` to its documented
failure policy (cache: Failed + proxy; quota: fail_open / fail_closed).
"""
from __future__ import annotations

import hashlib
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
        self.cooldown_s = cooldown_s
        self._down_until = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # the password never appears
        return f"RedisLayer({self.address})"

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._down_until

    def send(self, *commands: tuple[Any, ...]) -> PendingReplies:
        """Send `commands` now in one write; read their replies later (PendingReplies.replies())."""
        return PendingReplies(self, commands)

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
        try:
            return fn(self.client)
        except redis.exceptions.MaxConnectionsError as exc:
            # Our own pool is full (many requests in flight), not a Redis outage: fail this call
            # only, without opening the breaker for everyone.
            raise RedisUnavailable(f"redis {self.address}: connection pool exhausted: {exc}") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
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
        return self.layer.run(lambda _client: _read_replies(pool, conn, self.count))

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
