"""llm-semantic-cache's hard scope: every field that can change the answer, the route a
non-route-scoped instance serves, and the usage a stream stored without provider usage replays.

The library checks build scopes with the plugin's own scope_for; the end-to-end ones run the Kong
stand-in with the real plugin-server process (`aigov serve` and kong-pdk's stock server), real
Redis with RediSearch and the real MiniLM model; only the LLM upstreams are mocks.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from aigov import sse, tokens
from aigov.cache.key import exact_key, scope_for
from aigov.mockllm import MockLLM
from aigov.request import parse_chat_request
from kongsim.pytest_plugin import GatewayHandle, PdkCallLog, start_recorded_gateway

REPO = Path(__file__).resolve().parent.parent
PLUGIN_FILE = REPO / "plugins" / "llm-semantic-cache.py"
MODEL = "gpt-4o-mini"
KEY = "key-scope-fields"

# Fields that change the answer but were missing from the old allow-list, with two values each.
ANSWER_FIELDS = [
    ("verbosity", {"verbosity": "low"}, {"verbosity": "high"}),
    ("web_search_options", {}, {"web_search_options": {"search_context_size": "high"}}),
    ("top_k", {"top_k": 1}, {"top_k": 100}),
    ("min_p", {"min_p": 0.0}, {"min_p": 0.9}),
    ("prediction", {}, {"prediction": {"type": "content", "content": "def f(): pass"}}),
]
# Fields that cannot change the answer text: requests differing only in them share entries.
NON_ANSWER_FIELDS = {"user": "u-42", "safety_identifier": "hash-1", "metadata": {"team": "a"}, "store": True,
                     "service_tier": "flex", "prompt_cache_key": "k1", "stream_options": None}


def _scope(body: dict[str, Any], **kw: Any) -> Any:
    return scope_for(parse_chat_request(json.dumps(body)), namespace="n", consumer_id="c", route_id="r", **kw)


def _chat(text: str, system: str | None = None, **extra: Any) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return {"model": MODEL, "messages": messages, **extra}


# -- library: scope_for -------------------------------------------------------------------------
@pytest.mark.parametrize("name, a, b", ANSWER_FIELDS)
def test_every_answer_changing_field_is_in_the_params_scope(name: str, a: dict, b: dict) -> None:
    assert _scope(_chat("explain gears", **a)).params != _scope(_chat("explain gears", **b)).params, name


def test_fields_that_cannot_change_the_answer_and_nulls_stay_out_of_the_scope() -> None:
    base = _chat("explain gears", temperature=0.2)
    assert _scope({**base, **NON_ANSWER_FIELDS}) == _scope(base)
    assert _scope({**base, "top_k": None, "verbosity": None}) == _scope(base)  # null is "not given"
    assert _scope({**base, "stream": True}) != _scope(base)                   # stream stays its own part


def test_semantic_message_fields_are_exact_scope_but_its_text_is_not() -> None:
    def ask(content: Any, **fields: Any) -> dict[str, Any]:
        return {"model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": content, **fields}]}

    alice, bob = _scope(ask("what is my name", name="alice")), _scope(ask("what is my name", name="bob"))
    assert alice.context != bob.context
    assert exact_key(alice, "what is my name") != exact_key(bob, "what is my name")
    assert _scope(ask("what is my name")) != alice
    # The text is the semantic part: a paraphrase (or the same text as a text part) keeps the scope.
    assert _scope(ask("tell me my name", name="alice")) == alice
    assert _scope(ask([{"type": "text", "text": "tell me my name"}], name="alice")) == alice
    # Other fields of the semantic message are scope too (audio of a voice turn, vendor fields).
    assert _scope(ask("hi", audio={"id": "a1"})) != _scope(ask("hi", audio={"id": "a2"}))


def test_semantic_fields_count_for_every_message_of_the_countback() -> None:
    def ask(first_name: str) -> dict[str, Any]:
        return {"model": MODEL, "messages": [{"role": "user", "name": first_name, "content": "hello"},
                                             {"role": "assistant", "content": "hi"},
                                             {"role": "user", "name": "carol", "content": "what is my name"}]}

    assert _scope(ask("alice"), message_countback=2) != _scope(ask("bob"), message_countback=2)


def test_where_the_question_stands_among_the_turns_is_scope() -> None:
    # An assistant turn before the question is history; after it, a prefill the answer continues.
    history = {"model": MODEL, "messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "Sure"},
                                            {"role": "user", "content": "list three colours"}]}
    prefill = {"model": MODEL, "messages": [{"role": "system", "content": "s"},
                                            {"role": "user", "content": "list three colours"},
                                            {"role": "assistant", "content": "Sure"}]}
    assert _scope(history).context != _scope(prefill).context


def test_pending_sources_are_bounded_and_released() -> None:
    from aigov.plugins.semantic_cache.handler import _PendingMisses

    pending = _PendingMisses(cap=8, source_budget=100)
    vec = np.ones(4, dtype=np.float32)
    old = pending.put(vec, ([{"role": "user", "content": "a"}], None, 60))
    new = pending.put(vec, ([{"role": "user", "content": "b"}], None, 60))
    too_big = pending.put(vec, ([{"role": "user", "content": "c"}], None, 101))
    v_old, s_old = pending.pop(old)
    assert v_old is vec and s_old is None            # over budget: the oldest source went, its vector stayed
    assert pending.pop(new)[1] is not None
    assert pending.pop(too_big)[1] is None
    assert pending.pop(new) == (None, None)          # popped once
    assert pending._source_bytes == 0


# -- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_mock() -> Iterator[MockLLM]:
    mock = MockLLM("127.0.0.1", 0, hang_s=10).start()
    try:
        yield mock
    finally:
        mock.stop()


@pytest.fixture(scope="module", params=["aigov", "stock"])
def gw(request: pytest.FixtureRequest, redis_server: Any, mock_llm: Any,
       other_mock: MockLLM) -> Iterator[tuple[GatewayHandle, PdkCallLog]]:
    if not redis_server.running:
        redis_server.start()
    server = request.param
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])

    def cache(ns: str) -> dict[str, Any]:
        return {"name": "llm-semantic-cache", "config": {"vectordb": {
            "strategy": "redis", "namespace": f"{ns}-{server}-{uuid.uuid4().hex[:6]}",
            "redis": {"host": "127.0.0.1", "port": port, "timeout_ms": 2000}}}}

    def route(name: str, *plugins: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "paths": [f"/{name}"], "strip_path": True, "plugins": list(plugins)}

    config = {"_format_version": "3.0",
              "consumers": [{"username": "dora", "keyauth_credentials": [{"key": KEY}]}],
              "services": [
                  # a global cache instance serves ga and gb, two routes to two different upstreams
                  {"name": "prov-a", "url": mock_llm.url, "routes": [route("ga"), route("routed", cache("routed"))]},
                  {"name": "prov-b", "url": other_mock.url, "routes": [route("gb")]},
                  # a service-scoped instance serves s1 and s2
                  {"name": "prov-s", "url": mock_llm.url, "routes": [route("s1"), route("s2")],
                   "plugins": [cache("service")]}],
              "plugins": [{"name": "key-auth", "config": {"key_names": ["apikey"]}}, cache("global")]}
    handle, calls = start_recorded_gateway(config, server=server, plugin_files=[PLUGIN_FILE], pythonpath=str(REPO))
    try:
        post(handle, "ga", _chat(f"warm-up {uuid.uuid4().hex}"))  # the model loads once per server
        yield handle, calls
    finally:
        handle.close()


def post(gw: GatewayHandle, route: str, body: dict[str, Any], **headers: str) -> Any:
    reply = gw.request("POST", f"/{route}/v1/chat/completions", json=body, headers={"apikey": KEY, **headers})
    assert reply.status == 200, reply.body[:300]
    return reply


def status(reply: Any) -> str | None:
    return reply.header("X-Cache-Status")


def test_answer_changing_fields_never_share_an_answer(gw: tuple[GatewayHandle, PdkCallLog]) -> None:
    handle, _ = gw
    for name, a, b in ANSWER_FIELDS:
        q = f"explain how a bicycle gear works {uuid.uuid4().hex[:6]}"
        assert status(post(handle, "ga", _chat(q, **a))) == "Miss", name
        assert status(post(handle, "ga", _chat(q, **b))) == "Miss", name
        assert status(post(handle, "ga", _chat(q, **b))) == "Hit", name   # each value has its entry
    q = f"what is my name {uuid.uuid4().hex[:6]}"
    alice = {"model": MODEL, "messages": [{"role": "user", "name": "alice", "content": q}]}
    bob = {"model": MODEL, "messages": [{"role": "user", "name": "bob", "content": q}]}
    assert status(post(handle, "ga", alice)) == "Miss"
    assert status(post(handle, "ga", bob)) == "Miss"
    # fields that cannot change the answer still share it
    q = f"name the largest ocean {uuid.uuid4().hex[:6]}"
    assert status(post(handle, "ga", _chat(q))) == "Miss"
    assert status(post(handle, "ga", _chat(q, **NON_ANSWER_FIELDS))) == "Hit"


def test_a_global_instance_never_shares_entries_across_routes(gw: tuple[GatewayHandle, PdkCallLog],
                                                             other_mock: MockLLM) -> None:
    handle, calls = gw
    q = _chat(f"what is the refund policy {uuid.uuid4().hex[:6]}")
    first = post(handle, "ga", q)
    assert status(first) == "Miss" and status(post(handle, "ga", q)) == "Hit"
    served_by_b = other_mock.stats.snapshot()["requests"]
    b = post(handle, "gb", q)
    assert status(b) == "Miss"
    assert other_mock.stats.snapshot()["requests"] == served_by_b + 1   # route b's own upstream answered
    assert status(post(handle, "gb", q)) == "Hit"
    # One router call in access for the global instance ...
    access = calls.calls(b.header("X-Kong-Request-Id"), "llm-semantic-cache", "access")
    assert access.count("kong.router.get_route") == 1, access


def test_a_service_instance_scopes_by_route_and_a_route_instance_asks_nothing(
        gw: tuple[GatewayHandle, PdkCallLog]) -> None:
    handle, calls = gw
    q = _chat(f"how do I reset my router {uuid.uuid4().hex[:6]}")
    assert status(post(handle, "s1", q)) == "Miss" and status(post(handle, "s1", q)) == "Hit"
    assert status(post(handle, "s2", q)) == "Miss"
    # ... and none for a route-scoped instance, whose config names its route.
    routed = post(handle, "routed", q)
    assert status(routed) == "Miss" and status(post(handle, "routed", q)) == "Hit"
    access = calls.calls(routed.header("X-Kong-Request-Id"), "llm-semantic-cache", "access")
    assert access and "kong.router.get_route" not in access, access


def _usage_chunk(reply: Any) -> dict[str, Any] | None:
    replay, complete = sse.completion_from_chat_chunks(reply.body)
    assert complete
    return replay.get("usage")


def test_a_stream_stored_without_usage_replays_the_whole_prompts_estimate(
        gw: tuple[GatewayHandle, PdkCallLog]) -> None:
    handle, _ = gw
    system = "You are a meticulous assistant. " * 150
    q = _chat(f"name three kinds of clouds {uuid.uuid4().hex[:6]}", system=system, stream=True)
    assert status(post(handle, "ga", q)) == "Miss"                     # stored from a stream without usage
    with_usage = {**q, "stream_options": {"include_usage": True}}
    real = _usage_chunk(post(handle, "ga", with_usage, **{"Cache-Control": "no-store"}))
    hit = post(handle, "ga", with_usage)
    assert status(hit) == "Hit"
    replayed = _usage_chunk(hit)
    assert real is not None and replayed is not None
    # The mock counts the prompt as the quota does (every message, the formula's overheads).
    assert replayed["prompt_tokens"] == real["prompt_tokens"]
    assert replayed["prompt_tokens"] > tokens.count_text(system, MODEL)
    assert replayed["completion_tokens"] == real["completion_tokens"]
    assert replayed["total_tokens"] == replayed["prompt_tokens"] + replayed["completion_tokens"]
    assert "estimated" not in replayed                                 # OpenAI's usage holds counts only


@pytest.fixture(scope="module")
def logmode_gw(redis_server: Any, mock_llm: Any) -> Iterator[GatewayHandle]:
    """The cache in log capture mode behind the stand-in's ai-proxy: the answer is stored in
    `log`, where the request body can no longer be read (the estimate uses what access kept)."""
    if not redis_server.running:
        redis_server.start()
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    ai_proxy = {"name": "ai-proxy", "config": {
        "route_type": "llm/v1/chat",
        "model": {"provider": "openai", "options": {"upstream_url": f"{mock_llm.url}/v1/chat/completions"}},
        "logging": {"log_statistics": True, "log_payloads": True}}}
    cache = {"name": "llm-semantic-cache", "config": {"vectordb": {
        "strategy": "redis", "namespace": f"scope-log-{uuid.uuid4().hex[:6]}",
        "redis": {"host": "127.0.0.1", "port": port, "timeout_ms": 2000}}}}
    config = {"_format_version": "3.0",
              "consumers": [{"username": "dora", "keyauth_credentials": [{"key": KEY}]}],
              "services": [{"name": "llm", "url": mock_llm.url, "routes": [
                  {"name": "proxied", "paths": ["/proxied"], "strip_path": True,
                   "plugins": [{"name": "key-auth", "config": {"key_names": ["apikey"]}}, ai_proxy, cache]}]}]}
    handle, _ = start_recorded_gateway(config, server="aigov", pythonpath=str(REPO),
                                       extra_env={"AIGOV_CAPTURE_PHASE": "log", "HF_HUB_OFFLINE": "1",
                                                  "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    try:
        post(handle, "proxied", _chat(f"warm-up {uuid.uuid4().hex}"))
        assert handle.wait_logs(20)
        yield handle
    finally:
        handle.close()


def test_log_mode_estimates_the_whole_prompt_too(logmode_gw: GatewayHandle) -> None:
    system = "Answer as a careful meteorologist would. " * 60
    q = _chat(f"why are clouds white {uuid.uuid4().hex[:6]}", system=system, stream=True)
    assert status(post(logmode_gw, "proxied", q)) == "Miss"
    assert logmode_gw.wait_logs(20)                                    # stored in log
    with_usage = {**q, "stream_options": {"include_usage": True}}
    real = _usage_chunk(post(logmode_gw, "proxied", with_usage, **{"Cache-Control": "no-store"}))
    hit = post(logmode_gw, "proxied", with_usage)
    assert status(hit) == "Hit"
    replayed = _usage_chunk(hit)
    assert real is not None and replayed is not None
    assert replayed["prompt_tokens"] == real["prompt_tokens"] and "estimated" not in replayed


# -- behind llm-semantic-router: the routed target is scope --------------------------------------
def test_the_routed_target_is_in_the_scope() -> None:
    body = _chat("what is my balance")
    assert _scope(body, routed_to="billing").params != _scope(body, routed_to="support").params
    assert _scope(body, routed_to="billing") == _scope(body, routed_to="billing")


def test_two_semantic_routes_with_one_model_never_share_an_answer(mock_llm: Any, other_mock: MockLLM) -> None:
    """Two router routes may send the same model to different upstreams (another deployment,
    another system prompt behind it): an answer from one must not be served for the other."""
    def target(mock: MockLLM) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": mock.port, "path": "/v1/chat/completions", "model": MODEL}

    router = {"name": "llm-semantic-router", "config": {
        "default_route": "alpha", "force_route_header": "X-Force-Route", "routes": [
            {"name": "alpha", "utterances": ["what is my account balance", "show my last payment"],
             "target": target(mock_llm)},
            {"name": "beta", "utterances": ["how do I reset my password", "my login does not work"],
             "target": target(other_mock)}]}}
    cache = {"name": "llm-semantic-cache", "config": {"vectordb": {"strategy": "memory"}}}
    config = {"_format_version": "3.0",
              "consumers": [{"username": "dora", "keyauth_credentials": [{"key": KEY}]}],
              "services": [{"name": "svc", "url": "http://127.0.0.1:9/unrouted", "routes": [
                  {"name": "r", "paths": ["/r"], "strip_path": True, "plugins": [router, cache]}]}],
              "plugins": [{"name": "key-auth", "config": {"key_names": ["apikey"]}}]}
    handle, _ = start_recorded_gateway(config, server="aigov", pythonpath=str(REPO))
    try:
        q = _chat(f"what is my account balance {uuid.uuid4().hex[:6]}")
        first = post(handle, "r", q, **{"X-Force-Route": "alpha"})
        assert first.header("X-Semantic-Route") == "alpha" and status(first) == "Miss"
        assert status(post(handle, "r", q, **{"X-Force-Route": "alpha"})) == "Hit"
        served_by_beta = other_mock.stats.snapshot()["requests"]
        beta = post(handle, "r", q, **{"X-Force-Route": "beta"})
        assert beta.header("X-Semantic-Route") == "beta" and status(beta) == "Miss"
        assert other_mock.stats.snapshot()["requests"] == served_by_beta + 1  # beta's upstream answered
    finally:
        handle.close()
