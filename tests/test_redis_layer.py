"""The Redis layer: a dead or broken Redis costs one attempt, then the breaker answers."""
from __future__ import annotations

import socket
import threading

import pytest

from aigov.redis_client import RedisLayer, RedisUnavailable


class HangUpServer:
    """Accepts TCP connections and closes them at once, counting them (a Redis that dies on connect)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def hangup_server():
    server = HangUpServer()
    yield server
    server.close()


def test_one_connection_attempt_per_failure_then_breaker(hangup_server):
    # redis-py 8 retries 10 times with backoff by default; the layer must not (its breaker is the retry).
    layer = RedisLayer(port=hangup_server.port, timeout_ms=200, cooldown_s=30)
    with pytest.raises(RedisUnavailable):
        layer.run(lambda c: c.ping())
    assert hangup_server.accepted == 1
    assert not layer.healthy
    with pytest.raises(RedisUnavailable, match="marked down"):
        layer.run(lambda c: c.ping())
    assert hangup_server.accepted == 1  # the breaker answered without touching the network


def test_url_config_has_no_retries_either(hangup_server):
    layer = RedisLayer(url=f"redis://127.0.0.1:{hangup_server.port}/0", timeout_ms=200)
    with pytest.raises(RedisUnavailable):
        layer.run(lambda c: c.get("k"))
    assert hangup_server.accepted == 1


def test_working_redis_still_answers(redis_server):
    layer = RedisLayer(port=redis_server.port)
    assert layer.run(lambda c: c.ping()) is True
    assert layer.healthy


def test_a_full_pool_fails_the_call_without_opening_the_breaker(redis_server):
    layer = RedisLayer(port=redis_server.port)
    pool = layer.client.connection_pool
    held = [pool.get_connection() for _ in range(pool.max_connections)]  # every slot in use
    try:
        with pytest.raises(RedisUnavailable, match="pool exhausted"):
            layer.run(lambda c: c.ping())
        assert layer.healthy  # others' calls are not refused for the cooldown
    finally:
        for conn in held:
            pool.release(conn)
    assert layer.run(lambda c: c.ping()) is True
