"""The quota's request-path cost as behaviour (issue 7 §2): PDK round trips and Redis round trips.

Counted through the real gateway stand-in (kongsim's `PDK.on_call` observer), the real
`aigov serve` process, real Redis and real tiktoken; only the LLM upstream is the mock. Each test
also checks that the accounting outcome is unchanged. No timings are asserted.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis as redislib

from aigov.quota.core import QuotaConfig, plan_counters
from aigov.quota.policies.redis import RedisQuotaStore
from aigov.redis_client import RedisLayer
from kongsim.pdk import serialize
from kongsim.pytest_plugin import GatewayHandle, PdkCallLog, start_recorded_gateway

REPO = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"
QUOTA = "llm-token-quota"


def _port(redis_server: Any) -> int:
    return int(redis_server.url.rsplit(":", 1)[1].split("/")[0])


def _ai_proxy(mock_url: str) -> dict[str, Any]:
    return {"name": "ai-proxy", "config": {
        "route_type": "llm/v1/chat", "auth": {"header_name": "Authorization", "header_value": "Bearer sk-test"},
        "model": {"provider": "openai", "options": {"upstream_url": f"{mock_url}/v1/chat/completions"}},
        "logging": {"log_statistics": True, "log_payloads": False}}}


@pytest.fixture(scope="module")
def log_mode(redis_server, mock_llm) -> Iterator[tuple[GatewayHandle, PdkCallLog]]:
    """The recommended AI-route setup: AIGOV_CAPTURE_PHASE=log, ai-proxy on the route."""
    prefix = f"perfpath{uuid.uuid4().hex[:8]}"
    quota = {"name": QUOTA, "config": {
        "policy": "redis", "key_prefix": prefix, "limits": [{"window": "day", "tokens": 5000}],
        "redis": {"host": "127.0.0.1", "port": _port(redis_server), "timeout_ms": 1000}}}
    ai_proxy = _ai_proxy(mock_llm.url)
    yml = {"_format_version": "3.0",
           "consumers": [{"username": "perfpath", "keyauth_credentials": [{"key": "perfpath-key"}]}],
           "services": [{"name": "llm", "url": mock_llm.url, "routes": [{
               "name": "ai", "paths": ["/ai"], "strip_path": True,
               "plugins": [{"name": "key-auth", "config": {"key_names": ["apikey"]}}, quota, ai_proxy]}]}]}
    gw, recorder = start_recorded_gateway(yml, server="aigov", pythonpath=str(REPO),
                                          extra_env={"AIGOV_CAPTURE_PHASE": "log"})
    try:
        yield gw, recorder
    finally:
        gw.close()
        with redislib.Redis.from_url(redis_server.url) as client:
            stale = client.keys(f"{prefix}:*")
            if stale:
                client.delete(*stale)


def _ask(gw: GatewayHandle, text: str, **extra: Any) -> Any:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}
    reply = gw.request("POST", "/ai/v1/chat/completions", json=body, headers={"apikey": "perfpath-key"})
    assert gw.wait_logs(20), "log phases still pending"
    return reply


def _day_used(client: redislib.Redis, prefix_glob: str = "perfpath*:tokens:day:*") -> int:
    keys = client.keys(prefix_glob)
    assert len(keys) <= 1, keys
    return int(client.get(keys[0])) if keys else 0


def test_log_capture_puts_only_four_calls_on_the_clients_path_and_settles_to_ai_proxy_usage(
        log_mode, redis_server) -> None:
    gw, calls = log_mode
    reply = _ask(gw, "how many tokens is this", max_tokens=50)
    assert reply.status == 200
    rid = reply.header("X-Kong-Request-Id")
    assert calls.calls(rid, QUOTA, "access") == ["kong.request.get_raw_body", "kong.client.get_consumer",
                                          "kong.ctx.shared.set", "kong.response.set_headers"]
    assert calls.calls(rid, QUOTA, "response") == []  # no response phase declared: Kong does not buffer
    # After the response: own state, one serializer read (usage, cache outcome, upstream status).
    # No log field: Kong drops what a log timer sets. The shared "aigov" dict is not read when
    # the cache did not hit.
    assert calls.calls(rid, QUOTA, "log") == ["kong.ctx.shared.get", "kong.log.serialize"]
    usage = reply.json()["usage"]
    with redislib.Redis.from_url(redis_server.url) as client:
        assert _day_used(client) == usage["total_tokens"]  # settled to ai-proxy's logged usage
    assert "quota" not in serialize(calls.contexts[rid]).get("aigov", {})  # log_statistics off
    # the headers left before the usage was known: they show the reservation
    assert int(reply.header("X-AI-RateLimit-Remaining-Day")) < 5000 - usage["total_tokens"]


def test_log_statistics_logs_the_reservation_from_access_in_log_capture(redis_server, mock_llm) -> None:
    """With log_statistics the entry http-log gets is written in access, the last phase before
    the log timer here: the reservation, since the usage is not known yet."""
    prefix = f"perfstat{uuid.uuid4().hex[:8]}"
    quota = {"name": QUOTA, "config": {
        "policy": "redis", "key_prefix": prefix, "limits": [{"window": "day", "tokens": 5000}],
        "log_statistics": True, "redis": {"host": "127.0.0.1", "port": _port(redis_server), "timeout_ms": 1000}}}
    ai_proxy = _ai_proxy(mock_llm.url)
    yml = {"_format_version": "3.0",
           "consumers": [{"username": "perfstat", "keyauth_credentials": [{"key": "perfstat-key"}]}],
           "services": [{"name": "llm", "url": mock_llm.url,
                         "routes": [{"name": "ai", "paths": ["/ai"], "strip_path": True,
                                     "plugins": [{"name": "key-auth", "config": {"key_names": ["apikey"]}},
                                                 quota, ai_proxy]}]}]}
    gw2, calls2 = start_recorded_gateway(yml, server="aigov", pythonpath=str(REPO),
                                         extra_env={"AIGOV_CAPTURE_PHASE": "log"})
    try:
        reply = gw2.request("POST", "/ai/v1/chat/completions", headers={"apikey": "perfstat-key"},
                            json={"model": MODEL, "messages": [{"role": "user", "content": "log me"}],
                                  "max_tokens": 50})
        assert reply.status == 200 and gw2.wait_logs(20)
        rid = reply.header("X-Kong-Request-Id")
        assert calls2.calls(rid, QUOTA, "access")[-1] == "kong.log.set_serialize_value"
        logged = serialize(calls2.contexts[rid])["aigov"]["quota"]
        assert logged["status"] == "reserved" and logged["completion_tokens"] == 50
        assert logged["prompt_tokens"] > 0 and logged["total_tokens"] == logged["prompt_tokens"] + 50
        assert logged["consumer"].startswith("consumer:") and logged["store"] == "redis"
        with redislib.Redis.from_url(redis_server.url) as client:
            assert _day_used(client, f"{prefix}:*:tokens:day:*") == reply.json()["usage"]["total_tokens"]
            client.delete(*client.keys(f"{prefix}:*"))
    finally:
        gw2.close()


def test_a_rejected_request_leaves_log_nothing_to_settle(log_mode, redis_server) -> None:
    gw, calls = log_mode
    with redislib.Redis.from_url(redis_server.url) as client:
        before = _day_used(client)
        reply = _ask(gw, "far too large a reservation", max_tokens=1_000_000)
        assert reply.status == 429 and reply.json()["error"]["code"] == "quota_exceeded"
        assert _day_used(client) == before  # nothing reserved, nothing charged
    rid = reply.header("X-Kong-Request-Id")
    access = calls.calls(rid, QUOTA, "access")
    # the state write went out while Redis answered; it is cleared before the 429 exit
    assert access == ["kong.request.get_raw_body", "kong.client.get_consumer", "kong.ctx.shared.set",
                      "kong.ctx.shared.set", "kong.log.set_serialize_value", "kong.response.exit"]
    assert calls.calls(rid, QUOTA, "log") == ["kong.ctx.shared.get"]  # no state: no settle, no log field rewrite
    assert serialize(calls.contexts[rid])["aigov"]["quota"]["status"] == "rejected"


# ------------------------------------------------------------------ the two-step script call

@pytest.fixture()
def store(redis_server) -> Iterator[tuple[RedisQuotaStore, QuotaConfig]]:
    layer = RedisLayer(host="127.0.0.1", port=_port(redis_server), timeout_ms=1000)
    prefix = f"pending{uuid.uuid4().hex[:8]}"
    config = QuotaConfig.from_plugin_config({"key_prefix": prefix, "limits": [{"window": "day", "tokens": 1000}]})
    yield RedisQuotaStore(layer, prefix), config
    stale = layer.client.keys(f"{prefix}:*")
    if stale:
        layer.client.delete(*stale)
    layer.client.close()


def test_reserve_and_settle_in_two_steps_match_the_one_step_calls(store) -> None:
    s, config = store
    now = time.time()
    counters = plan_counters(config, "consumer:a", MODEL, None, now)
    first = s.reserve_begin("consumer:a", "r1", counters, [300], now, 600).result()
    assert first.admitted and first.values == [300]
    assert s.reserve("consumer:a", "r2", counters, [300], now, 600).values == [600]
    blocked = s.reserve_begin("consumer:a", "r3", counters, [500], now, 600).result()
    assert not blocked.admitted and blocked.blocked == 0 and blocked.values == [600]
    settled = s.settle_begin("consumer:a", "r1", counters, [100], now, 600).result()
    assert (settled.status, settled.values) == ("settled", [400])
    again = s.settle_begin("consumer:a", "r1", counters, [100], now, 600).result()
    assert again.status == "duplicate" and again.values == [400]  # never metered twice


def test_a_cancelled_call_never_hands_its_reply_to_the_next_user(store) -> None:
    s, config = store
    now = time.time()
    counters = plan_counters(config, "consumer:b", MODEL, None, now)
    pool = s.layer.client.connection_pool
    in_use_before = len(pool._in_use_connections)
    pending = s.reserve_begin("consumer:b", "c1", counters, [250], now, 600)
    assert len(pool._in_use_connections) == in_use_before + 1  # held while the reply is unread
    pending.cancel()  # e.g. the PDK call in between failed: the reply is never read
    assert len(pool._in_use_connections) == in_use_before  # given back to the pool, not leaked
    # The script may have run: a later reserve on a pooled connection sees the true counter,
    # never the cancelled call's reply as its own.
    for i in range(3):
        out = s.reserve("consumer:b", f"c{i + 2}", counters, [10], now, 600)
        assert out.admitted
        assert out.values[0] == int(s.layer.client.get(counters[0].key))


def test_a_flushed_script_cache_is_reloaded(store) -> None:
    s, config = store
    now = time.time()
    counters = plan_counters(config, "consumer:c", MODEL, None, now)
    s.layer.client.script_flush()
    out = s.reserve_begin("consumer:c", "f1", counters, [40], now, 600).result()
    assert out.admitted and out.values == [40]
    s.layer.client.script_flush()
    assert s.settle_begin("consumer:c", "f1", counters, [30], now, 600).result().values == [30]
