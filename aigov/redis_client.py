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
from redis.backoff import NoBackoff
from redis.retry import Retry

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
                      health_check_interval=30, max_connections=256,
                      retry=Retry(NoBackoff(), 0))
        if url:
            self.client = redis.Redis.from_url(url, **common)
            self.address = url.split("@")[-1]
        else:
            self.client = redis.Redis(host=host, port=port, db=database, username=username or None,
                                      password=password or None, ssl=ssl, **common)
            self.address = f"{host}:{port}/{database}"
        self.cooldown_s = cooldown_s
        self._down_until = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # the password never appears
        return f"RedisLayer({self.address})"

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._down_until

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
