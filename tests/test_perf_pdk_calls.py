"""Request-path cost of the three plugins, as behaviour: PDK round trips per phase (issue 7 §2).

Every PDK call is a full round trip between Kong and the plugin server, so the number of calls a
phase makes is the cost we control. These tests count them with kongsim's `PDK.on_call` observer
through the real gateway stand-in, the real `aigov serve` process, real Redis (RediSearch), real
tiktoken and the real MiniLM model; only the LLM upstream is the mock. Each test also checks that
the outcome did not change (headers, counters, log fields). No timings are asserted.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis as redislib

from aigov import sse, tokens
from kongsim.pdk import serialize
from kongsim.pytest_plugin import GatewayHandle, PdkCallLog, start_recorded_gateway

REPO = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"
DAY_TOKENS = 1_000_000


def kong_yml(mock_url: str, redis_port: int) -> dict[str, Any]:
    redis_conf = {"host": "127.0.0.1", "port": redis_port, "timeout_ms": 1000}
    quota = {"name": "llm-token-quota", "config": {
        "policy": "redis", "redis": redis_conf, "limits": [{"window": "day", "tokens": DAY_TOKENS}]}}
    cache = {"name": "llm-semantic-cache", "config": {
        "scope": "consumer", "cache_ttl": 600,
        "vectordb": {"strategy": "redis", "redis": redis_conf, "namespace": "perfcalls"}}}
    router = {"name": "llm-semantic-router", "config": {
        "embed_text": "last_user", "default_route": "general", "routes": [
            {"name": "general", "target": {"model": MODEL},
             "utterances": ["what is the capital of france", "tell me a fun fact about space"]},
            {"name": "banking", "target": {"model": MODEL},
             "utterances": ["what is my account balance", "why was my card declined"]}]}}
    auth = {"name": "key-auth", "config": {"key_names": ["apikey"]}}

    def route(name: str, *plugins: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "paths": [f"/{name}"], "strip_path": True, "plugins": [auth, *plugins]}

    logged_quota = {**quota, "config": {**quota["config"], "log_statistics": True}}
    return {"_format_version": "3.0",
            "consumers": [{"username": "perf", "keyauth_credentials": [{"key": "perf-key"}]}],
            "services": [{"name": "llm", "url": mock_url, "routes": [
                route("quota", quota), route("cache", cache), route("router", router),
                route("all", router, logged_quota, cache)]}]}


@pytest.fixture(scope="module")
def gateway(redis_server, mock_llm) -> Iterator[tuple[GatewayHandle, PdkCallLog]]:
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    # Counters left in the session's Redis by earlier modules belong to other consumers.
    with redislib.Redis.from_url(redis_server.url) as client:
        stale = client.keys("aigov:quota:*")
        if stale:
            client.delete(*stale)
    gw, recorder = start_recorded_gateway(kong_yml(mock_llm.url, port), server="aigov", pythonpath=str(REPO))
    try:
        yield gw, recorder
    finally:
        gw.close()


@pytest.fixture()
def rclient(redis_server) -> Iterator[redislib.Redis]:
    client = redislib.Redis.from_url(redis_server.url)
    yield client
    client.close()


def ask(gw: GatewayHandle, route: str, text: str, **extra: Any) -> Any:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}
    reply = gw.request("POST", f"/{route}/v1/chat/completions", json=body, headers={"apikey": "perf-key"})
    assert gw.wait_logs(20), "log phases still pending"
    return reply


def request_id(reply: Any) -> str:
    rid = reply.header("X-Kong-Request-Id")
    assert rid, "the stand-in names every request"
    return rid


def day_used(client: redislib.Redis) -> int:
    keys = client.keys("aigov:quota:*:tokens:day:*")
    assert len(keys) == 1, keys
    return int(client.get(keys[0]))


def test_quota_phases_make_four_three_and_two_calls_and_meter_exactly_once(gateway, rclient) -> None:
    gw, calls = gateway
    before = {k: int(rclient.get(k)) for k in rclient.keys("aigov:quota:*:tokens:day:*")}
    reply = ask(gw, "quota", "count my tokens please", max_tokens=40)
    assert reply.status == 200
    usage = reply.json()["usage"]
    rid = request_id(reply)

    access = calls.calls(rid, "llm-token-quota", "access")
    response = calls.calls(rid, "llm-token-quota", "response")
    log = calls.calls(rid, "llm-token-quota", "log")
    # No read of the shared "aigov" dict: the quota's state has its own ctx key.
    assert access == ["kong.request.get_raw_body", "kong.client.get_consumer", "kong.ctx.shared.set",
                      "kong.response.set_headers"]
    # No upstream header or status read (the body carries usage) and no ctx write-back on the
    # client's path after the answer.
    assert response == ["kong.ctx.shared.get", "kong.service.response.get_raw_body", "kong.response.set_headers"]
    # Settled in response: log only finds that out (no serializer write: Kong drops the log
    # timer's, and log_statistics is off).
    assert log == ["kong.ctx.shared.get"]

    # Same outcome as before: the provider's usage charged exactly once, headers agree with it.
    assert int(reply.header("X-AI-Tokens-Prompt")) == usage["prompt_tokens"]
    assert int(reply.header("X-AI-Tokens-Completion")) == usage["completion_tokens"]
    key = rclient.keys("aigov:quota:*:tokens:day:*")[0]
    used = int(rclient.get(key))
    assert used - before.get(key, 0) == usage["total_tokens"]
    assert int(reply.header("X-AI-RateLimit-Remaining-Day")) == DAY_TOKENS - used
    assert rclient.hlen(key.decode().split(":tokens:")[0] + ":res") == 0  # nothing left reserved
    assert "quota" not in serialize(calls.contexts[rid]).get("aigov", {})
    assert calls.contexts[rid].discarded_serialize_values == {}


def test_quota_counts_a_stream_without_reading_upstream_headers(gateway, rclient) -> None:
    gw, calls = gateway
    used_before = day_used(rclient)
    reply = ask(gw, "quota", "stream a short answer", stream=True, max_tokens=30)
    assert reply.status == 200
    completion, complete = sse.completion_from_chat_chunks(sse.parse_sse(reply.body))
    assert complete
    rid = request_id(reply)
    assert "kong.service.response.get_headers" not in calls.calls(rid, "llm-token-quota", "response")
    text = completion["choices"][0]["message"]["content"]
    if completion.get("usage"):   # the mock reports usage in the last chunk: the provider's truth
        expected = completion["usage"]["total_tokens"]
    else:                         # otherwise the streamed text is counted with tiktoken
        expected = int(reply.header("X-AI-Tokens-Prompt")) + tokens.count_text(text, MODEL)
    assert int(reply.header("X-AI-Tokens-Completion")) > 0
    assert day_used(rclient) - used_before == expected
    assert int(reply.header("X-AI-RateLimit-Remaining-Day")) == DAY_TOKENS - day_used(rclient)


def test_cache_miss_and_hit_make_eight_calls_with_one_log_field_write(gateway) -> None:
    # Eight since the path and query became scope (kong.request.get_path_with_query).
    gw, calls = gateway
    text = f"perf cache question {time.time_ns()}"
    miss = ask(gw, "cache", text)
    assert miss.status == 200 and miss.header("X-Cache-Status") == "Miss"
    miss_calls = calls.calls(request_id(miss), "llm-semantic-cache", "access")
    assert len(miss_calls) == 8 and "kong.request.get_path_with_query" in miss_calls, miss_calls
    assert miss_calls.count("kong.response.set_headers") == 1 and "kong.response.set_header" not in miss_calls
    assert miss_calls.count("kong.log.set_serialize_value") == 1
    # Storing the answer: read the pending entry, the upstream answer, log the outcome; no
    # ctx.shared write-back (nothing after this phase reads it).
    assert sorted(calls.calls(request_id(miss), "llm-semantic-cache", "response")) == sorted([
        "kong.ctx.shared.get", "kong.service.response.get_status", "kong.service.response.get_headers",
        "kong.service.response.get_raw_body", "kong.log.set_serialize_value"])

    hit = ask(gw, "cache", text)
    assert hit.status == 200 and hit.header("X-Cache-Status") == "Hit"
    assert hit.json()["choices"] == miss.json()["choices"]
    hit_calls = calls.calls(request_id(hit), "llm-semantic-cache", "access")
    assert len(hit_calls) == 8 and hit_calls[-1] == "kong.response.exit", hit_calls
    # One set_serialize_value("aigov.cache", {...}) logs the same nested fields as two dotted ones.
    logged = serialize(calls.contexts[request_id(hit)])["aigov"]["cache"]
    assert logged == {"status": "Hit", "capture": "response"}
    stored = serialize(calls.contexts[request_id(miss)])["aigov"]["cache"]
    assert stored == {"status": "Miss", "capture": "response", "stored": "stored"}


def test_router_reports_in_three_calls_and_all_three_plugins_agree(gateway, rclient) -> None:
    gw, calls = gateway
    reply = ask(gw, "all", f"why was my card declined yesterday {time.time_ns()}")
    assert reply.status == 200
    assert reply.header("X-Semantic-Route") == "banking"
    assert reply.header("X-Cache-Status") == "Miss"
    rid = request_id(reply)
    router_calls = calls.calls(rid, "llm-semantic-router", "access")
    assert router_calls.count("kong.response.set_headers") == 1 and "kong.response.set_header" not in router_calls
    assert router_calls.count("kong.log.set_serialize_value") == 1
    # body, client headers (to clear only the credentials really sent), one clear, headers,
    # ctx get/set, serializer
    assert len(router_calls) <= 7, router_calls
    logged = serialize(calls.contexts[rid])["aigov"]
    assert logged["router"]["route"] == "banking" and logged["router"]["reason"] == "matched"
    assert set(logged["router"]) >= {"route", "reason", "score", "latency_ms"}
    # log_statistics on this route: the settled charge is logged from the response phase, the
    # last one whose serializer values reach http-log and file-log.
    assert logged["cache"]["status"] == "Miss"
    assert (logged["quota"]["status"], logged["quota"]["total_tokens"]) == ("usage", reply.json()["usage"]["total_tokens"])
    assert calls.calls(rid, "llm-token-quota", "response")[-1] == "kong.log.set_serialize_value"
    # Every plugin's log-phase round trips, whole request: quota 1, cache none (it stores in response).
    assert len(calls.calls(rid, "llm-token-quota", "log")) == 1
    assert calls.contexts[rid].discarded_serialize_values == {}
    assert calls.calls(rid, "llm-semantic-cache", "log") == []


def test_log_phases_reuse_timer_threads(gateway) -> None:
    gw, calls = gateway
    existing = {t for t in threading.enumerate() if t.name == "kongsim-log"}  # idle from earlier tests
    ids = [request_id(ask(gw, "quota", f"thread reuse {i}")) for i in range(12)]
    used = {calls.log_threads[rid] for rid in ids}  # Thread objects, kept alive by the log
    assert all(t.name == "kongsim-log" and t.daemon for t in used)
    # Sequential requests: each log phase finished before the next began, so reused timer
    # threads ran all twelve; at most a couple are new (a thread per request would be twelve).
    assert len(used - existing) <= 2, sorted(t.name for t in used)
