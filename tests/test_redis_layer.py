"""The Redis layer: a dead or broken Redis costs one attempt, then the breaker answers."""
from __future__ import annotations

import socket
import threading

import pytest

from aigov.redis_client import RedisLayer, RedisUnavailable
from conftest import TcpPeer


@pytest.fixture
def hangup_server():
    server = TcpPeer()  # accepts and closes at once: a Redis that dies on connect
    yield server
    server.close()


def test_one_connection_attempt_per_failure_then_breaker(hangup_server):
    # redis-py 8 retries 10 times with backoff by default; the layer must not (its breaker is the retry).
    layer = RedisLayer(port=hangup_server.port, timeout_ms=2000, cooldown_s=30)  # the hang-up is an EOF at once
    with pytest.raises(RedisUnavailable):
        layer.run(lambda c: c.ping())
    assert hangup_server.accepted == 1
    assert not layer.healthy
    with pytest.raises(RedisUnavailable, match="marked down"):
        layer.run(lambda c: c.ping())
    assert hangup_server.accepted == 1  # the breaker answered without touching the network


def test_a_peer_that_is_not_redis_is_an_outage_too() -> None:
    # A new user's finding: a web server or proxy on the Redis port answers bytes redis-py cannot
    # parse (InvalidResponse), which went past the breaker as an unknown error.
    peer = TcpPeer(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    try:
        layer = RedisLayer(port=peer.port, timeout_ms=2000, cooldown_s=30)
        with pytest.raises(RedisUnavailable):
            layer.run(lambda c: c.ping())
        assert not layer.healthy and peer.accepted == 1
    finally:
        peer.close()


def test_url_config_has_no_retries_either(hangup_server):
    layer = RedisLayer(url=f"redis://127.0.0.1:{hangup_server.port}/0", timeout_ms=2000)
    with pytest.raises(RedisUnavailable):
        layer.run(lambda c: c.get("k"))
    assert hangup_server.accepted == 1


def test_working_redis_still_answers(redis_server):
    layer = RedisLayer(port=redis_server.port, timeout_ms=2000)
    assert layer.run(lambda c: c.ping()) is True
    assert layer.healthy


def test_a_full_pool_fails_the_call_without_opening_the_breaker(redis_server):
    layer = RedisLayer(port=redis_server.port, timeout_ms=2000)
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


# ---- send(): the layer's own RESP codec (the quota's scripts), checked against redis-py's ----

def test_send_gives_the_replies_redis_py_gives(redis_client, redis_server):
    layer = RedisLayer(port=redis_server.port, timeout_ms=2000)
    assert layer.lean  # a plain TCP connection: send() packs and parses itself
    big = b"x\r\n" * 40_000  # 120 KB with CRLFs inside: a bulk string over several recv() reads
    commands = [
        ("SET", "aigov-test:lean:big", big),
        ("GET", "aigov-test:lean:big"),
        ("GET", "aigov-test:lean:missing"),
        ("INCRBY", "aigov-test:lean:n", 41),
        ("HSET", "aigov-test:lean:h", "a", 1, "b", "ü"),
        ("HGETALL", "aigov-test:lean:h"),
        ("EVAL", "return {1, 'two', {3, false}, -4}", 0),
        ("EVAL", "return redis.status_reply('FINE')", 0),
        ("EVAL", "return redis.error_reply('MYERR went wrong')", 0),
        ("EVALSHA", "0" * 40, 0),
        ("EVAL", "return 3.75", 0),
        ("PING",),
    ]
    ours = layer.send(*commands).replies()
    redis_client.delete("aigov-test:lean:n", "aigov-test:lean:h")
    theirs = layer.round_trip(*commands)
    assert len(ours) == len(theirs) == len(commands)
    for command, a, b in zip(commands, ours, theirs):
        if isinstance(b, Exception):
            assert type(a) is type(b) and str(a) == str(b), command   # NoScriptError, ResponseError
        else:
            assert a == b, command
    assert ours[1] == big and ours[2] is None and ours[6] == [1, b"two", [3, None], -4]
    assert type(ours[9]).__name__ == "NoScriptError"
    assert layer.healthy


def test_a_reply_split_anywhere_parses_only_once_complete():
    from redis.exceptions import ResponseError

    from aigov.redis_client import _INCOMPLETE, parse_reply

    wire = b"*4\r\n:1\r\n$5\r\nab\r\nc\r\n*2\r\n$-1\r\n-ERR no\r\n+OK\r\n"
    for cut in range(len(wire)):
        value, need = parse_reply(wire[:cut], 0, ResponseError)
        assert value is _INCOMPLETE and cut < need <= len(wire), cut   # how much to wait for
    value, pos = parse_reply(wire, 0, ResponseError)
    assert pos == len(wire)
    assert value[:2] == [1, b"ab\r\nc"] and value[2][0] is None and value[3] == b"OK"
    assert isinstance(value[2][1], ResponseError) and str(value[2][1]) == "ERR no"


def test_a_kept_connection_that_redis_closed_is_replaced_not_an_outage(redis_client, redis_server):
    layer = RedisLayer(port=redis_server.port, timeout_ms=2000)
    conn_id = layer.send(("CLIENT", "ID")).replies()[0]   # asked on the connection the layer keeps
    assert len(layer._lean_idle) == 1
    assert redis_client.execute_command("CLIENT", "KILL", "ID", conn_id) == 1
    # The killed connection is noticed before use (readable at EOF): a new one answers and the
    # breaker stays closed for everyone else.
    assert layer.send(("PING",)).replies() == [b"PONG"]
    assert layer.healthy


def test_a_timed_out_reply_never_reaches_the_next_call(redis_client, redis_server):
    layer = RedisLayer(port=redis_server.port, timeout_ms=200, cooldown_s=0.2)
    key = "aigov-test:lean:late"
    redis_client.delete(key)
    pending = layer.send(("BLPOP", key, 1))
    with pytest.raises(RedisUnavailable, match="Timeout"):
        pending.replies()
    assert not layer._lean_idle  # the connection that may still get BLPOP's answer is gone
    import time
    time.sleep(0.25)                 # the breaker's cooldown
    redis_client.rpush(key, "v")     # nobody waits for it any more ...
    assert layer.send(("PING",)).replies() == [b"PONG"]   # ... and nobody reads it as theirs
    assert redis_client.llen(key) == 1


def test_an_argument_redis_cannot_take_fails_before_anything_is_sent(redis_server):
    import redis

    layer = RedisLayer(port=redis_server.port, timeout_ms=2000)
    with pytest.raises(redis.DataError, match="NoneType"):
        layer.send(("SET", "aigov-test:lean:none", None))
    assert layer.healthy and layer.send(("PING",)).replies() == [b"PONG"]


def test_resp3_push_frames_and_attributes_from_a_real_redis_are_skipped():
    """Redis sends push frames (client-side caching invalidations, maintenance notices) on the
    command connection: they are not replies, so send() skips them like redis-py does, and the
    breaker stays closed. DEBUG PROTOCOL makes a real Redis 8 send one after a reply, and an
    attribute before one."""
    from aigov.devredis import RedisServer

    server = RedisServer(extra_args=("--enable-debug-command", "yes")).start()
    try:
        layer = RedisLayer(url=server.url)
        assert layer.send(("HELLO", "3")).replies()[0][b"proto"] == 3
        pushed = layer.send(("DEBUG", "PROTOCOL", "push")).replies()
        assert pushed == layer.round_trip(("DEBUG", "PROTOCOL", "push"))
        assert pushed == [b"Some real reply following the push reply"]
        # redis-py 8 raises InvalidResponse on an attribute; the reply it annotates is what counts
        assert layer.send(("DEBUG", "PROTOCOL", "attrib")).replies() == [b"Some real reply following the attribute"]
        assert layer.send(("PING",)).replies() == [b"PONG"] and layer.healthy
    finally:
        server.stop()


class _FakeConnection:
    """What _LeanCall reads through, over a socketpair whose other end plays the server."""

    def __init__(self, sock) -> None:
        from redis._parsers.resp3 import _RESP3Parser

        self._sock, self.socket_timeout = sock, 2.0
        self._parser = _RESP3Parser(socket_read_size=65536)

    def _host_error(self) -> str:
        return "fake"

    def disconnect(self) -> None:
        self.disconnected = True


@pytest.mark.parametrize("wire, count, expected", [
    (b"$3\r\nabc\r\n>2\r\n$4\r\nnote\r\n:1\r\n", 1, [b"abc"]),      # a push after the reply
    (b">2\r\n$4\r\nnote\r\n:1\r\n:7\r\n", 1, [7]),                    # ... and before it
    (b"|1\r\n+ttl\r\n:3\r\n*2\r\n:5\r\n|1\r\n+a\r\n+b\r\n:6\r\n", 1, [[5, 6]]),  # attributes dropped
    (b"$" + str(8 << 20).encode() + b"\r\n" + b"z" * (8 << 20) + b"\r\n", 1, [b"z" * (8 << 20)]),
    (b"*5000\r\n" * 5000, 1, "ConnectionError"),                     # hostile nesting
    (b"$3\r\nabcXY", 1, "ConnectionError"),                            # bulk not CRLF-terminated
    (b"%1\r\n*1\r\n:1\r\n:2\r\n", 1, "ConnectionError"),              # unhashable map key
    (b":1\r\n:2\r\n", 1, "ConnectionError"),                           # a reply nobody asked for
    (b"*1\r\n>1\r\n:1\r\n", 1, "ConnectionError"),                     # a push inside a reply
])
def test_lean_reads_skip_pushes_and_turn_hostile_frames_into_connection_errors(wire, count, expected):
    import socket as socketlib

    import redis

    from aigov.redis_client import _LeanCall

    ours, theirs = socketlib.socketpair()
    ours.settimeout(2.0)
    layer = RedisLayer(port=1)          # never connects: the fake connection is handed in
    call = _LeanCall.__new__(_LeanCall)
    call.layer, call.count = layer, count
    conn = _FakeConnection(ours)
    sender = threading.Thread(target=theirs.sendall, args=(wire,), daemon=True)
    sender.start()
    try:
        if expected == "ConnectionError":
            with pytest.raises(redis.ConnectionError):
                call._read(conn)
            assert getattr(conn, "disconnected", False) and not layer._lean_idle   # never reused
        else:
            assert call._read(conn) == expected
            assert layer._lean_idle == [conn]                                     # in step: kept
    finally:
        sender.join(5)
        ours.close()
        theirs.close()
