"""llm-token-quota end to end: the Kong stand-in, the real plugin-server process(es), real Redis,
real tiktoken, the mock LLM upstream (the only mocked part)."""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis as redislib

from aigov import sse, tokens
from aigov.prices import default_prices
from aigov.quota.core import MAX_REQUEST_AMOUNT
from kongsim.pytest_plugin import GatewayHandle, start_gateway

REPO = Path(__file__).resolve().parent.parent
PLUGIN_FILE = REPO / "plugins" / "llm-token-quota.py"
MODEL = "gpt-4o-mini"
PRICE = default_prices().lookup(MODEL)


def quota_plugin(redis_port: int, **conf: Any) -> dict[str, Any]:
    config = {"policy": "redis", "redis": {"host": "127.0.0.1", "port": redis_port, "timeout_ms": 2000},
              "identifier_sources": ["header"], "identifier_header": "X-User"}
    config.update(conf)
    return {"name": "llm-token-quota", "config": config}


def kong_yml(mock_url: str, routes: dict[str, list[dict[str, Any]]], consumers: list | None = None) -> dict:
    return {"_format_version": "3.0",
            "consumers": consumers or [],
            "services": [{"name": "llm", "url": mock_url, "routes": [
                {"name": name, "paths": [f"/{name}"], "strip_path": True, "plugins": plugins}
                for name, plugins in routes.items()]}]}


def chat(text: str = "hello", max_tokens: int | None = 32, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


def prompt_tokens(body: dict[str, Any]) -> int:
    return tokens.count_chat_messages(body["messages"], body["model"])


def avoid_window_edge(margin_s: float = 4.0, size_s: int = 60) -> None:
    """Minute-window tests must not straddle a boundary: wait (< margin_s) for a fresh window."""
    left = size_s - time.time() % size_s
    if left < margin_s:
        time.sleep(left + 0.05)


def counter_values(client: redislib.Redis, user: str, metric: str = "tokens") -> list[int]:
    return [int(client.get(k)) for k in client.keys(f"aigov:quota:{{header:{user}}}:{metric}:*")]


def post(gw: GatewayHandle, route: str, body: dict[str, Any], user: str, **headers: str) -> Any:
    return gw.request("POST", f"/{route}/v1/chat/completions", json=body, headers={"X-User": user, **headers})


def wait_logs(gw: GatewayHandle, timeout_s: float = 20.0) -> bool:
    """Wait for the deferred log phases (where reservations of failed requests are released).
    Retries kongsim's wait_logs, which can race with a log thread that is not started yet."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return gw.wait_logs(max(0.1, deadline - time.monotonic()))
        except RuntimeError:
            time.sleep(0.02)
    return False


def wait_settled(gw: GatewayHandle, client: redislib.Redis, user: str, timeout_s: float = 20.0) -> None:
    """Wait until every reservation of `user` is settled or released. The log phase runs after
    the client has its response (Kong's timer), so a test must wait for it before reading."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        wait_logs(gw, 5)
        if client.hlen(f"aigov:quota:{{header:{user}}}:res") == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"reservations of {user} still pending after {timeout_s}s")


def run_parallel(n: int, fn: Callable[[int], Any], stagger_s: float = 0.0) -> list[Any]:
    """Run fn(0..n-1) in n threads released together. stagger_s spreads the connects a little:
    the stand-in's HTTP front has the stdlib's listen backlog of 5, which drops simultaneous
    connects beyond it; a slow upstream keeps the requests in flight together anyway."""
    results: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait(timeout=30)
        time.sleep(i * stagger_s)
        results[i] = fn(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.fixture(scope="module")
def shared_gateway(redis_server, mock_llm) -> Iterator[GatewayHandle]:
    """One `aigov serve` gateway with several quota routes (separate X-User values per test)."""
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    routes = {
        "day": [quota_plugin(port, limits=[{"window": "day", "tokens": 1000}])],
        "minute": [{"name": "key-auth", "config": {"key_names": ["apikey"]}},
                   quota_plugin(port, identifier_sources=["consumer"], identifier_header=None,
                                limits=[{"window": "minute", "tokens": 400}])],
        "cost": [quota_plugin(port, limits=[{"window": "day", "tokens": 1_000_000, "cost_usd": 5}])],
        "strict": [quota_plugin(port, on_malformed_request="reject", on_store_failure="fail_closed",
                                limits=[{"window": "day", "tokens": 100000}])],
        "priced": [quota_plugin(port, unknown_model="default_price", default_price={"input": 1, "output": 2},
                                limits=[{"window": "day", "cost_usd": 1}])],
        "listed": [quota_plugin(port, unknown_model="default_price", default_price={"input": 1, "output": 2},
                                limits=[{"window": "day", "tokens": 100, "per_model": True, "name": "listed",
                                         "models": ["ft:custom-x:acme::abc123", "acme/custom-y", "plain-custom"]}])],
        "bykey": [quota_plugin(port, identifier_header="x-api-key", limits=[{"window": "day", "tokens": 1000}])],
        # Kong reads x_api_key as the X-Api-Key header; X-Auth-Token is on no list but says "token"
        "byunderscore": [quota_plugin(port, identifier_header="x_api_key", limits=[{"window": "day", "tokens": 1000}])],
        "bytoken": [quota_plugin(port, identifier_header="X-Auth-Token", limits=[{"window": "day", "tokens": 1000}])],
        "bypat": [quota_plugin(port, identifier_header="X-Pat", limits=[{"window": "day", "tokens": 1000}])],
        "askusage": [quota_plugin(port, stream_usage="request", limits=[{"window": "day", "tokens": 1_000_000}])],
    }
    consumers = [{"username": "alice", "keyauth_credentials": [{"key": "key-alice"}]},
                 {"username": "bob", "keyauth_credentials": [{"key": "key-bob"}]}]
    gw = start_gateway(kong_yml(mock_llm.url, routes, consumers), server="aigov", pythonpath=str(REPO))
    try:
        yield gw
    finally:
        gw.close()


@pytest.fixture()
def rclient(redis_server) -> Iterator[redislib.Redis]:
    if not redis_server.running:
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


# ------------------------------------------------------------------ the scenarios

@pytest.mark.parametrize("server", ["aigov", "stock"])
def test_one_cent_left_eight_parallel_half_cent_requests_admit_at_most_two(server, redis_server, mock_llm,
                                                                            rclient, kong_gateway) -> None:
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    gw = kong_gateway(kong_yml(mock_llm.url, {"c": [quota_plugin(port, limits=[{"window": "day", "cost_usd": 0.01}])]}),
                      server=server, plugin_files=[PLUGIN_FILE], pythonpath=str(REPO))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "write a long story"}], "max_tokens": 480}
    estimate = default_prices().lookup("gpt-4o").cost_nano(prompt_tokens(body), 480)
    assert 4_500_000 < estimate < 5_000_000  # "about $0.005" each, so two fit in $0.01 and three do not
    # The provider really generates max_tokens and the upstream is slow, so all eight are in flight together.
    replies = run_parallel(8, lambda i: post(gw, "c", body, "spender", **{"X-Mock-Usage": "completion=480",
                                                                         "X-Mock-Latency-Ms": "500"}),
                           stagger_s=0.01)
    admitted = [r for r in replies if r.status == 200]
    rejected = [r for r in replies if r.status == 429]
    assert len(admitted) + len(rejected) == 8
    assert 1 <= len(admitted) <= 2
    spent = sum(float(r.header("X-AI-Cost-USD")) for r in admitted)
    assert spent <= 0.01
    wait_settled(gw, rclient, "spender")
    (counter,) = counter_values(rclient, "spender", "cost")
    assert counter <= 10_000_000 and abs(counter / 1e9 - spent) < 1e-5
    err = rejected[0].json()["error"]
    assert err["code"] == "quota_exceeded" and err["window"] == "day"
    assert int(rejected[0].header("Retry-After")) > 0


def test_three_server_processes_sharing_redis_never_overshoot(redis_server, mock_llm, rclient) -> None:
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    config = kong_yml(mock_llm.url, {"q": [quota_plugin(port, limits=[{"window": "day", "tokens": 2000}])]})
    gateways = [start_gateway(config, server="aigov", pythonpath=str(REPO)) for _ in range(3)]
    try:
        body = chat("count me", max_tokens=90)
        per_request = prompt_tokens(body) + 90
        # 64 requests in flight together: connects spread over ~0.4 s, each upstream call takes 1 s
        replies = run_parallel(64, lambda i: post(gateways[i % 3], "q", body, "fleet",
                                                  **{"X-Mock-Usage": "completion=90", "X-Mock-Latency-Ms": "1000"}),
                               stagger_s=0.006)
        statuses = [r.status for r in replies]
        assert set(statuses) <= {200, 429}
        assert statuses.count(200) == 2000 // per_request  # exactly what fits, on three processes
        for gw in gateways:
            wait_settled(gw, rclient, "fleet")
        (counter,) = counter_values(rclient, "fleet")
        assert counter == statuses.count(200) * per_request <= 2000
    finally:
        for gw in gateways:
            gw.close()


def test_consumer_a_exhausting_a_minute_budget_does_not_block_consumer_b(shared_gateway, rclient) -> None:
    avoid_window_edge()
    body = chat("tell me something", max_tokens=150)
    statuses = []
    for _ in range(4):
        r = shared_gateway.request("POST", "/minute/v1/chat/completions", json=body,
                                   headers={"apikey": "key-alice", "X-Mock-Usage": "completion=150"})
        statuses.append(r.status)
    assert statuses[:2] == [200, 200] and statuses[-1] == 429
    blocked = shared_gateway.request("POST", "/minute/v1/chat/completions", json=body, headers={"apikey": "key-alice"})
    assert blocked.status == 429 and "per minute" in blocked.json()["error"]["message"]
    assert 0 < int(blocked.header("Retry-After")) <= 60
    ok = shared_gateway.request("POST", "/minute/v1/chat/completions", json=body, headers={"apikey": "key-bob"})
    assert ok.status == 200
    assert int(ok.header("X-AI-RateLimit-Remaining-Minute")) == 400 - int(ok.header("X-AI-Tokens-Prompt")) \
        - int(ok.header("X-AI-Tokens-Completion"))


def test_three_fifty_token_requests_show_950_900_850(shared_gateway, rclient) -> None:
    remaining = []
    for _ in range(3):
        r = post(shared_gateway, "day", chat(), "fifty", **{"X-Mock-Usage": "total=50"})
        assert r.status == 200
        remaining.append(int(r.header("X-AI-RateLimit-Remaining-Day")))
        assert r.header("X-AI-RateLimit-Limit-Day") == "1000"
        assert int(r.header("X-AI-Tokens-Prompt")) + int(r.header("X-AI-Tokens-Completion")) == 50
    assert remaining == [950, 900, 850]
    wait_settled(shared_gateway, rclient, "fifty")
    assert counter_values(rclient, "fifty") == [150]  # the headers agree with the counter


def test_null_stream_is_an_ordinary_metered_request(shared_gateway, rclient) -> None:
    # OpenAI takes `"stream": null` as "not given"; passing it on unmetered would let any client
    # step around its quota (a tester did, with an exhausted budget).
    r = post(shared_gateway, "day", chat(stream=None), "nullstream", **{"X-Mock-Usage": "total=40"})
    assert r.status == 200
    assert r.header("X-AI-RateLimit-Remaining-Day") == "960"
    wait_settled(shared_gateway, rclient, "nullstream")
    assert counter_values(rclient, "nullstream") == [40]


def test_reply_larger_than_the_budget_is_charged_and_the_next_request_gets_429(shared_gateway, rclient) -> None:
    r = post(shared_gateway, "day", chat(max_tokens=10), "big", **{"X-Mock-Usage": "total=1500"})
    assert r.status == 200 and r.header("X-AI-RateLimit-Remaining-Day") == "0"
    wait_settled(shared_gateway, rclient, "big")
    assert counter_values(rclient, "big") == [1500]
    nxt = post(shared_gateway, "day", chat(max_tokens=10), "big")
    assert nxt.status == 429
    assert int(nxt.header("Retry-After")) > 0
    err = nxt.json()["error"]
    assert err["type"] == "rate_limit_exceeded" and "1000 tokens per day" in err["message"]
    assert err["retry_after"] == int(nxt.header("Retry-After"))


def test_stream_without_usage_is_counted_with_tiktoken(shared_gateway, rclient) -> None:
    body = chat("stream me a reply", max_tokens=None, stream=True)
    r = post(shared_gateway, "day", body, "stream-nousage")
    assert r.status == 200
    completion, complete = sse.completion_from_chat_chunks(r.body)
    assert complete and completion.get("usage") is None
    text = completion["choices"][0]["message"]["content"]
    expected_completion = tokens.count_text(text, MODEL)
    assert expected_completion > 0
    assert int(r.header("X-AI-Tokens-Completion")) == expected_completion
    assert int(r.header("X-AI-Tokens-Prompt")) == prompt_tokens(body)
    expected_cost = PRICE.cost_nano(prompt_tokens(body), expected_completion) / 1e9
    assert float(r.header("X-AI-Cost-USD")) == pytest.approx(expected_cost, abs=1e-6)
    wait_settled(shared_gateway, rclient, "stream-nousage")
    assert counter_values(rclient, "stream-nousage") == [prompt_tokens(body) + expected_completion]


@pytest.mark.parametrize("field", ["tools", "functions"])
def test_tool_definitions_are_charged_on_a_stream_without_usage(shared_gateway, rclient, field: str) -> None:
    # The provider bills function definitions as prompt tokens, the legacy `functions` as much
    # as `tools`; with no usage in the stream, the prompt charge is the quota's own count.
    function = {"name": "lookup_order", "description": "Find an order by its number " + "and more " * 200,
                "parameters": {"type": "object", "properties": {"number": {"type": "string"}}}}
    defs = [{"type": "function", "function": function}] if field == "tools" else [function]
    body = {**chat("where is my order?", max_tokens=None, stream=True), field: defs}
    plain = tokens.count_chat_messages(body["messages"], MODEL)
    expected_prompt = tokens.count_chat_messages(body["messages"], MODEL, [{"type": "function", "function": function}])
    assert expected_prompt > plain + 200
    who = f"defs-{field}"
    r = post(shared_gateway, "day", body, who)
    assert r.status == 200
    completion, complete = sse.completion_from_chat_chunks(r.body)
    assert complete and completion.get("usage") is None
    assert int(r.header("X-AI-Tokens-Prompt")) == expected_prompt
    wait_settled(shared_gateway, rclient, who)
    used = tokens.count_text(completion["choices"][0]["message"]["content"], MODEL)
    assert counter_values(rclient, who) == [expected_prompt + used]


def test_images_are_charged_an_estimate_on_a_stream_without_usage(shared_gateway, rclient, mock_llm) -> None:
    # An attacker's stream of 20 images without include_usage was charged its few text tokens.
    png = "data:image/png;base64," + "iVBORw0KGgo" * 10
    parts = [{"type": "text", "text": "compare these"}] + \
        [{"type": "image_url", "image_url": {"url": png, "detail": "low" if i % 2 else "high"}} for i in range(20)]
    body = {**chat("x", max_tokens=None, stream=True), "messages": [{"role": "user", "content": parts}]}
    text_only = tokens.count_chat_messages([{"role": "user", "content": parts[:1]}], MODEL)
    expected_prompt = text_only + sum(tokens.image_part_tokens(p, MODEL) for p in parts[1:])
    assert expected_prompt >= text_only + 10 * 85 + 10 * 255  # the smallest a real image could cost
    billed_before = mock_llm.stats.snapshot()["tokens_billed"]
    r = post(shared_gateway, "cost", body, "images")
    assert r.status == 200
    completion, complete = sse.completion_from_chat_chunks(r.body)
    assert complete and completion.get("usage") is None
    assert int(r.header("X-AI-Tokens-Prompt")) == expected_prompt
    wait_settled(shared_gateway, rclient, "images")
    used = tokens.count_text(completion["choices"][0]["message"]["content"], MODEL)
    assert counter_values(rclient, "images") == [expected_prompt + used]
    assert mock_llm.stats.snapshot()["tokens_billed"] - billed_before == expected_prompt + used  # the mock's bill


@pytest.mark.parametrize("asked", ["ft:custom-x:acme::abc123", "acme/custom-y", "Plain-Custom"])
def test_a_listed_unpriced_model_meets_its_limit_however_it_is_spelled(shared_gateway, rclient, asked: str) -> None:
    # The limit's `models` are normalised (provider/ prefix, ft: wrapper, case): so is the name
    # the client sends, or the limit would never apply to it.
    who = f"listed-{asked.replace('/', '-').replace(':', '-')}"
    body = {"model": asked, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    statuses = [post(shared_gateway, "listed", body, who, **{"X-Mock-Usage": "total=30"}).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429], statuses


def test_a_response_schema_is_charged_on_a_stream_without_usage(shared_gateway, rclient) -> None:
    # A structured-output schema is prompt the provider reads; a client must not hide text there.
    schema = {"name": "answer", "schema": {"type": "object", "description": "an essay " * 300,
                                           "properties": {"text": {"type": "string"}}}}
    body = {**chat("answer in json", max_tokens=None, stream=True),
            "response_format": {"type": "json_schema", "json_schema": schema}}
    r = post(shared_gateway, "cost", body, "schema")
    assert r.status == 200
    expected = tokens.count_chat_messages(body["messages"], MODEL, None, [json.dumps(schema, ensure_ascii=False)])
    assert expected > prompt_tokens(body) + 250
    assert int(r.header("X-AI-Tokens-Prompt")) == expected


def test_stream_with_usage_only_in_the_final_chunk(shared_gateway, rclient) -> None:
    body = chat("stream with usage", max_tokens=None, stream=True, stream_options={"include_usage": True})
    r = post(shared_gateway, "day", body, "stream-usage", **{"X-Mock-Usage": "total=77,prompt=20"})
    completion, _ = sse.completion_from_chat_chunks(r.body)
    assert completion["usage"]["total_tokens"] == 77
    assert (r.header("X-AI-Tokens-Prompt"), r.header("X-AI-Tokens-Completion")) == ("20", "57")
    assert PRICE.cost_nano(20, 57) > 0
    assert float(r.header("X-AI-Cost-USD")) == pytest.approx(PRICE.cost_nano(20, 57) / 1e9, abs=1e-6)
    wait_settled(shared_gateway, rclient, "stream-usage")
    assert counter_values(rclient, "stream-usage") == [77]


def test_provider_total_above_prompt_plus_completion_is_metered(shared_gateway, rclient) -> None:
    r = post(shared_gateway, "day", chat(), "reasoner", **{"X-Mock-Usage": "total=298,prompt=3,completion=7"})
    assert r.status == 200
    assert r.header("X-AI-RateLimit-Remaining-Day") == str(1000 - 298)
    assert float(r.header("X-AI-Cost-USD")) == pytest.approx(PRICE.cost_nano(3, 7, total_tokens=298) / 1e9, abs=1e-9)
    wait_settled(shared_gateway, rclient, "reasoner")
    assert counter_values(rclient, "reasoner") == [298]


def test_failures_and_cut_streams_release_or_settle_exactly(shared_gateway, rclient) -> None:
    """200 requests, 10% failing (500s and cut streams): the counter is the sum of the charges."""
    max_tokens = 40

    def one(i: int) -> tuple[int, int]:
        body = chat(f"question number {i}", max_tokens=max_tokens, stream=(i % 2 == 0))
        fail = {0: "500", 10: "cut"}.get(i % 20)
        headers = {"X-Mock-Fail": fail} if fail else {}
        r = post(shared_gateway, "cost", body, "flaky", **headers)
        if fail == "500":
            assert r.status == 500
            return r.status, 0  # the provider failed and billed nothing: released
        if fail == "cut":
            assert r.status == 502
            return r.status, prompt_tokens(body) + max_tokens  # cut mid-body: the reservation is kept
        assert r.status == 200
        return r.status, int(r.header("X-AI-Tokens-Prompt")) + int(r.header("X-AI-Tokens-Completion"))

    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def batch(start: int) -> None:
        for i in range(start, 200, 8):
            res = one(i)
            with lock:
                results.append(res)

    run_parallel(8, batch)
    assert len(results) == 200
    assert sum(1 for s, _ in results if s != 200) == 20
    wait_settled(shared_gateway, rclient, "flaky")
    assert counter_values(rclient, "flaky") == [sum(c for _, c in results)]
    assert rclient.hlen("aigov:quota:{header:flaky}:res") == 0  # every reservation was settled


# ------------------------------------------------------------------ failure policy and bad input

def test_malformed_request_passes_unmetered_or_gets_a_clear_400(shared_gateway, rclient, mock_llm) -> None:
    r = shared_gateway.request("POST", "/day/v1/chat/completions", body=b"{not json", headers={"X-User": "bad"})
    assert r.status == 400  # the mock upstream's own answer: the plugin passed it on
    assert counter_values(rclient, "bad") == []
    strict = shared_gateway.request("POST", "/strict/v1/chat/completions", body=b"{not json",
                                    headers={"X-User": "bad"})
    assert strict.status == 400
    err = strict.json()["error"]
    assert err["code"] == "invalid_request" and "not valid JSON" in err["message"]
    # A chat request with a wrongly typed field never passes unmetered, whatever the setting: a
    # provider more lenient than OpenAI could answer it.
    served = mock_llm.stats.snapshot()["requests"]
    typed = post(shared_gateway, "day", chat(stream="yes"), "bad")
    assert typed.status == 400 and typed.json()["error"]["code"] == "invalid_request"
    assert "'stream' must be a boolean" in typed.json()["error"]["message"]
    assert mock_llm.stats.snapshot()["requests"] == served and counter_values(rclient, "bad") == []


def test_a_request_too_big_to_meter_is_rejected_not_passed_unmetered(shared_gateway, mock_llm,
                                                                      rclient) -> None:
    # Passing it on would let a client step around its quota by padding the prompt.
    served_before = mock_llm.stats.snapshot()["requests"]
    padded = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "pad " * 400_000}]}
    r = shared_gateway.request("POST", "/day/v1/chat/completions", json=padded, headers={"X-User": "padder"})
    assert r.status == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "byte limit" in err["message"]
    assert mock_llm.stats.snapshot()["requests"] == served_before  # never reached the provider
    assert counter_values(rclient, "padder") == []


def test_unknown_model_blocks_or_uses_the_default_price(shared_gateway, rclient) -> None:
    body = {"model": "mystery-model-9", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    blocked = post(shared_gateway, "day", body, "unknown")
    assert blocked.status == 400 and blocked.json()["error"]["code"] == "model_not_priced"
    assert "mystery-model-9" in blocked.json()["error"]["message"]
    priced = post(shared_gateway, "priced", body, "unknown")
    assert priced.status == 200
    cost = float(priced.header("X-AI-Cost-USD"))
    p, c = int(priced.header("X-AI-Tokens-Prompt")), int(priced.header("X-AI-Tokens-Completion"))
    assert cost > 0  # never $0 silently
    assert cost == pytest.approx((p * 1 + c * 2) / 1e6, abs=1e-6)
    # A fine-tune of a priced base is not billed at the base's (lower) price: unpriced, so blocked.
    tuned = {**body, "model": "ft:gpt-4o-mini-2024-07-18:acme::abc123"}
    blocked = post(shared_gateway, "day", tuned, "unknown")
    assert blocked.status == 400 and blocked.json()["error"]["code"] == "model_not_priced"


def test_redis_down_fail_open_serves_and_fail_closed_answers_503(shared_gateway, redis_server, rclient,
                                                                 caplog) -> None:
    redis_server.stop()
    try:
        with caplog.at_level("WARNING", logger="kongsim.pdk"):
            for _ in range(10):
                open_ = post(shared_gateway, "day", chat(), "outage")
                assert open_.status == 200 and open_.header("X-AI-Tokens-Prompt")  # counted locally
            closed = post(shared_gateway, "strict", chat(), "outage")
            assert closed.status == 503
            assert closed.json()["error"]["code"] == "quota_store_unavailable"
        # One line per failure kind, not one per request (and no extra PDK call per request).
        lines = [r.getMessage() for r in caplog.records]
        assert sum("fail_open: counting in local memory" in m for m in lines) == 1, lines
        assert sum("fail_closed: 503" in m for m in lines) == 1, lines
    finally:
        redis_server.start()
    time.sleep(1.1)  # the Redis layer's circuit breaker lets a probe through after its cooldown
    again = post(shared_gateway, "day", chat(), "outage")
    assert again.status == 200


# ------------------------------------------------------------------ cache hits, log mode, windows

def test_cache_hit_on_a_route_with_both_plugins_charges_nothing(redis_server, mock_llm, rclient, kong_gateway) -> None:
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    cache = {"name": "llm-semantic-cache", "config": {"vectordb": {"strategy": "memory"}, "exact_caching": True}}
    gw = kong_gateway(kong_yml(mock_llm.url, {"both": [quota_plugin(port, limits=[{"window": "day", "tokens": 5000}]),
                                                       cache]}), server="aigov", pythonpath=str(REPO))
    body = chat("What is the capital of France?", max_tokens=40)
    first = post(gw, "both", body, "cached")
    assert first.status == 200
    charged = int(first.header("X-AI-Tokens-Prompt")) + int(first.header("X-AI-Tokens-Completion"))
    hit = None
    for _ in range(50):  # the cache stores the answer after the response; bounded wait for it
        wait_logs(gw)
        r = post(gw, "both", body, "cached")
        if r.header("X-Cache-Status") == "Hit":
            hit = r
            break
        charged += int(r.header("X-AI-Tokens-Prompt")) + int(r.header("X-AI-Tokens-Completion"))
        time.sleep(0.1)
    assert hit is not None and hit.status == 200
    assert hit.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    wait_settled(gw, rclient, "cached")
    assert counter_values(rclient, "cached") == [charged]  # the hit released its reservation
    assert int(hit.header("X-AI-RateLimit-Remaining-Day")) == 5000 - charged
    assert rclient.hlen("aigov:quota:{header:cached}:res") == 0


@pytest.fixture(scope="module")
def log_mode_gateway(redis_server, mock_llm) -> Iterator[GatewayHandle]:
    """AIGOV_CAPTURE_PHASE=log: no response phase (no buffering); settle from ai-proxy's logged usage."""
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    ai_proxy = {"name": "ai-proxy", "config": {
        "route_type": "llm/v1/chat", "auth": {"header_name": "Authorization", "header_value": "Bearer sk-test"},
        "model": {"provider": "openai", "options": {"upstream_url": f"{mock_llm.url}/v1/chat/completions"}},
        "logging": {"log_statistics": True, "log_payloads": False}}}
    routes = {"ai": [quota_plugin(port, limits=[{"window": "day", "tokens": 1000}]), ai_proxy]}
    gw = start_gateway(kong_yml(mock_llm.url, routes), server="stock", plugin_files=[PLUGIN_FILE],
                       pythonpath=str(REPO), extra_env={"AIGOV_CAPTURE_PHASE": "log"})
    try:
        yield gw
    finally:
        gw.close()


def test_log_mode_settles_from_ai_proxy_usage_without_buffering(log_mode_gateway, rclient) -> None:
    info = log_mode_gateway.gateway.infos["llm-token-quota"]
    assert "response" not in info.phases and "log" in info.phases  # Kong will not buffer
    body = chat("through ai-proxy", max_tokens=100, stream=True, stream_options={"include_usage": True})
    r = post(log_mode_gateway, "ai", body, "logmode", **{"X-Mock-Usage": "total=120,prompt=20"})
    assert r.status == 200
    reserved = prompt_tokens(body) + 100
    # headers left before the usage was known: they show the reservation, and no per-request figures
    assert r.header("X-AI-RateLimit-Remaining-Day") == str(1000 - reserved)
    assert r.header("X-AI-Tokens-Prompt") is None
    wait_settled(log_mode_gateway, rclient, "logmode")
    assert counter_values(rclient, "logmode") == [120]  # settled to ai-proxy's logged usage
    failed = post(log_mode_gateway, "ai", chat(max_tokens=50), "logmode", **{"X-Mock-Fail": "500"})
    assert failed.status == 500
    wait_settled(log_mode_gateway, rclient, "logmode")
    assert counter_values(rclient, "logmode") == [120]  # the failed call was released
    # A 200 answer cut mid-body (Kong's 502 to the client): the provider billed part of it, so
    # the reservation is kept, as in the default mode, never released.
    body = chat("an answer cut mid-body", max_tokens=60)
    cut = post(log_mode_gateway, "ai", body, "logmode", **{"X-Mock-Fail": "cut"})
    assert cut.status == 502
    wait_settled(log_mode_gateway, rclient, "logmode")
    assert counter_values(rclient, "logmode") == [120 + prompt_tokens(body) + 60]


def test_capture_phase_missing_from_nginx_main_env_still_settles_ai_proxy_usage(redis_server, mock_llm,
                                                                                rclient) -> None:
    """On Kong, query_cmd runs in the master, which keeps the environment, and start_cmd in a
    worker, which gets only nginx_main_env: AIGOV_CAPTURE_PHASE=log in the shell but not in
    nginx_main_env makes Kong skip `response` while the server expects it. The log phase then
    settles from ai-proxy's logged usage instead of keeping the whole reservation."""
    from kongsim.gateway import stock_entries
    from kongsim.pytest_plugin import make_prefix

    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    ai_proxy = {"name": "ai-proxy", "config": {
        "route_type": "llm/v1/chat", "auth": {"header_name": "Authorization", "header_value": "Bearer sk-test"},
        "model": {"provider": "openai", "options": {"upstream_url": f"{mock_llm.url}/v1/chat/completions"}},
        "logging": {"log_statistics": True, "log_payloads": False}}}
    prefix = make_prefix()
    entry = stock_entries([PLUGIN_FILE], prefix, pythonpath=str(REPO))[0]
    entry.query_cmd = f"AIGOV_CAPTURE_PHASE=log {entry.query_cmd}"  # the master's environment only
    routes = {"ai": [quota_plugin(port, limits=[{"window": "day", "tokens": 1000}]), ai_proxy]}
    gw = start_gateway(kong_yml(mock_llm.url, routes), server=[entry], prefix=prefix)
    try:
        assert "response" not in gw.gateway.infos["llm-token-quota"].phases  # Kong will not call it
        r = post(gw, "ai", chat("mismatched capture phase", max_tokens=100), "mismatch",
                 **{"X-Mock-Usage": "total=70,prompt=20"})
        assert r.status == 200
        wait_settled(gw, rclient, "mismatch")
        assert counter_values(rclient, "mismatch") == [70]  # not the reservation (prompt + 100)
    finally:
        gw.close()


def test_first_request_of_a_new_minute_window_sees_a_full_budget(redis_server, mock_llm, rclient,
                                                                  kong_gateway) -> None:
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    gw = kong_gateway(kong_yml(mock_llm.url, {"w": [quota_plugin(port, limits=[{"window": "minute", "tokens": 100}])]}),
                      server="aigov", pythonpath=str(REPO))
    # Start close to the end of a minute so the test waits at most ~10 s for the boundary.
    left = 60 - time.time() % 60
    if left > 10:
        time.sleep(left - 8)
    elif left < 3:
        time.sleep(left + 0.05 + 52)  # too close to the edge: use the next minute's end
    first = post(gw, "w", chat(max_tokens=10), "edge", **{"X-Mock-Usage": "total=100"})
    assert first.status == 200 and first.header("X-AI-RateLimit-Remaining-Minute") == "0"
    reset = int(first.header("X-AI-RateLimit-Reset-Minute"))
    assert post(gw, "w", chat(max_tokens=10), "edge").status == 429
    time.sleep(60 - time.time() % 60 + 0.2)  # the next window
    fresh = post(gw, "w", chat(max_tokens=10), "edge", **{"X-Mock-Usage": "total=30"})
    assert fresh.status == 200 and reset <= 11
    assert fresh.header("X-AI-RateLimit-Remaining-Minute") == "70"


def test_a_big_prompt_is_counted_off_the_loop_and_still_metered(shared_gateway, rclient) -> None:
    # Over 64 KiB the prompt is counted on a thread (tiktoken releases the GIL) while the plugin
    # server's loop goes on; the estimate must be the same count.
    body = chat("pad " * 40_000, max_tokens=10)
    assert len(json.dumps(body)) > 64 * 1024
    estimate = prompt_tokens(body)
    refused = post(shared_gateway, "day", body, "bigprompt-day")
    assert refused.status == 429  # the estimate alone exceeds the 1000-token day budget
    served = post(shared_gateway, "strict", body, "bigprompt")
    assert served.status == 200
    assert int(served.header("X-AI-Tokens-Prompt")) == estimate
    wait_settled(shared_gateway, rclient, "bigprompt")
    assert counter_values(rclient, "bigprompt") == [estimate + int(served.header("X-AI-Tokens-Completion"))]


def test_no_encoding_trick_gets_an_exhausted_caller_past_the_quota(shared_gateway, rclient, mock_llm) -> None:
    """A UTF-8 BOM, UTF-16 or invalid UTF-8 bytes: lenient providers (Python's json, Go's
    encoding/json) serve such bodies, so the quota reads them as they do and meters them."""
    r = post(shared_gateway, "day", chat(max_tokens=10), "enc", **{"X-Mock-Usage": "total=1000"})
    assert r.status == 200
    wait_settled(shared_gateway, rclient, "enc")
    plain = json.dumps(chat(max_tokens=10)).encode()
    bodies = {"bom": b"\xef\xbb\xbf" + plain, "utf16": plain.decode().encode("utf-16"),
              "invalid": plain.replace(b"hello", b"hel\xfflo")}
    served = mock_llm.stats.snapshot()["requests"]
    for name, raw in bodies.items():
        blocked = shared_gateway.request("POST", "/day/v1/chat/completions", body=raw, headers={"X-User": "enc"})
        assert blocked.status == 429, (name, blocked.status, blocked.body[:200])
    assert mock_llm.stats.snapshot()["requests"] == served
    # and with budget left, each is metered like the plain body
    for name, raw in bodies.items():
        ok = shared_gateway.request("POST", "/day/v1/chat/completions", body=raw, headers={"X-User": f"enc-{name}"})
        assert ok.header("X-AI-RateLimit-Limit-Day") == "1000", (name, ok.status, ok.headers)
        wait_settled(shared_gateway, rclient, f"enc-{name}")
        assert len(counter_values(rclient, f"enc-{name}")) == 1, name


def test_wrongly_typed_messages_or_bounds_get_the_quotas_400(shared_gateway, rclient, mock_llm) -> None:
    served = mock_llm.stats.snapshot()["requests"]
    for body, field_name in (({"model": MODEL, "messages": "tell me everything"}, "messages"),
                             ({"model": MODEL, "messages": []}, "messages"),
                             (chat(max_tokens="100"), "max_tokens"),   # type: ignore[arg-type]
                             (chat(max_tokens=-5), "max_tokens"),
                             (chat(n=2.0), "n")):
        r = post(shared_gateway, "day", body, "typed")
        assert r.status == 400, (body, r.status)
        err = r.json()["error"]
        assert err["code"] == "invalid_request" and f"'{field_name}'" in err["message"], err
    assert mock_llm.stats.snapshot()["requests"] == served and counter_values(rclient, "typed") == []


def test_n_choices_are_reserved_and_charged_n_times(shared_gateway, rclient) -> None:
    body = chat("count to three", max_tokens=200, n=4)
    r = post(shared_gateway, "day", body, "nchoices")
    assert r.status == 200, r.body[:200]
    assert len(r.json()["choices"]) == 4
    usage = r.json()["usage"]
    assert int(r.header("X-AI-Tokens-Completion")) == usage["completion_tokens"]
    wait_settled(shared_gateway, rclient, "nchoices")
    assert counter_values(rclient, "nchoices") == [usage["total_tokens"]]
    # 8 x 200 completion tokens can never fit a 1000-token day, whatever is left
    too_many = post(shared_gateway, "day", chat("count to three", max_tokens=200, n=8), "nchoices-2")
    assert too_many.status == 429 and "larger than the limit" in too_many.json()["error"]["message"]
    assert too_many.header("Retry-After") is None  # waiting cannot make it fit
    # Both caps named: a provider may honour either, so the larger one is reserved (the 50 of
    # max_completion_tokens would let a max_tokens of 5000 run past the limit).
    both = post(shared_gateway, "day", chat("count to three", max_tokens=5000, max_completion_tokens=50),
                "nchoices-3")
    assert both.status == 429 and "larger than the limit" in both.json()["error"]["message"]


def test_an_upstream_timeout_keeps_the_reservation(redis_server, mock_llm, rclient) -> None:
    """Kong's 504 (read_timeout): the request reached the provider, which may bill the whole
    answer, so the reservation is charged, not released; a refused connection (502) is released."""
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    decl = kong_yml(mock_llm.url, {"t": [quota_plugin(port, limits=[{"window": "day", "tokens": 100000}])]})
    decl["services"][0]["read_timeout"] = 1000
    decl["services"].append({"name": "dead", "url": "http://127.0.0.1:1", "routes": [
        {"name": "dead", "paths": ["/dead"], "strip_path": True,
         "plugins": [quota_plugin(port, limits=[{"window": "day", "tokens": 100000}])]}]})
    gw = start_gateway(decl, server="aigov", pythonpath=str(REPO))
    try:
        body = chat("will you answer in time", max_tokens=50)
        r = post(gw, "t", body, "slowpoke", **{"X-Mock-Fail": "timeout"})
        assert r.status == 504
        wait_settled(gw, rclient, "slowpoke")
        assert counter_values(rclient, "slowpoke") == [prompt_tokens(body) + 50]
        refused = post(gw, "dead", body, "refused")
        assert refused.status == 502
        wait_settled(gw, rclient, "refused")
        assert counter_values(rclient, "refused") in ([], [0])
    finally:
        gw.close()


def test_the_first_request_does_not_stall_the_plugin_servers_loop(redis_server, mock_llm, caplog) -> None:
    """Reading a tiktoken encoding the first time takes up to 0.8 s: the quota does it off the
    loop, so the server never logs the stalled-handler warning (and moves no connections)."""
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    caplog.set_level(logging.INFO, logger="kongsim.process")
    gw = start_gateway(kong_yml(mock_llm.url, {"fresh": [quota_plugin(port, limits=[{"window": "day", "tokens": 10**6}])]}),
                       server="aigov", pythonpath=str(REPO))
    try:
        # A first request that needs no encoding (not JSON: passed on unmetered): the server's own
        # first-request work (imports) may pass the 0.5 s stall limit on a busy host; this test is
        # about the encoding's first read, which only the requests after it do.
        gw.request("POST", "/fresh/v1/chat/completions", body=b"{not json",
                   headers={"Content-Type": "application/json", "X-User": "warm"})
        assert gw.wait_logs(20)
        time.sleep(0.5)  # the plugin server's stderr lines of the warm-up are relayed
        mark = len(caplog.records)
        replies = run_parallel(4, lambda i: post(gw, "fresh", chat(f"first words {i}"), f"fresh{i}"))
        assert [r.status for r in replies] == [200] * 4
        assert all(r.header("X-AI-Tokens-Prompt") for r in replies)
        assert gw.wait_logs(20)
    finally:
        gw.close()
    server_lines = [r.getMessage() for r in caplog.records if r.name == "kongsim.process"]
    assert any("serving llm-token-quota" in line for line in server_lines), server_lines[:5]
    after = [r.getMessage() for r in caplog.records[mark:] if r.name == "kongsim.process"]
    assert not [line for line in after if "new loop thread" in line]


def test_bodies_a_lenient_reader_could_serve_are_refused_not_passed(shared_gateway, rclient, mock_llm) -> None:
    """Go's encoding/json matches keys case-insensitively, ignores bytes after the first value and
    nests 10,000 deep; a body only such a reader understands, or a bound too big to price, gets
    the quota's 400, never a pass-through (an exhausted caller got 200s with each of these)."""
    plain = chat("what is the answer", max_tokens=10)
    bodies = {
        "Messages": json.dumps({"model": MODEL, "Messages": plain["messages"]}).encode(),
        "trailing": json.dumps(plain).encode() + b' {"more": 1}',
        # not JSON for OpenAI or Go, but Python's json (FastAPI, vLLM) reads NaN and Infinity
        "NaN": json.dumps({**plain, "temperature": float("nan")}).encode(),
        "Infinity": json.dumps({**plain, "top_p": float("inf")}).encode(),
        "deep": json.dumps(plain)[:-1].encode() + b', "x": ' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}",
        "Max_Tokens": json.dumps({**plain, "Max_Tokens": 4000}).encode(),
        "huge": json.dumps({**plain, "max_tokens": 2 ** 62}).encode(),
        "huge_n": json.dumps({**plain, "n": 2 ** 62}).encode(),
        "hidden_prompt": json.dumps({**plain, "stream": True, "messages": [
            {"role": "user", "content": "hi", "CONTENT": "a long essay " * 500}]}).encode(),
    }
    served = mock_llm.stats.snapshot()["requests"]
    for name, raw in bodies.items():
        r = shared_gateway.request("POST", "/day/v1/chat/completions", body=raw, headers={"X-User": "lenient"})
        assert r.status == 400, (name, r.status, r.body[:200])
        assert r.json()["error"]["code"] == "invalid_request", name
    assert mock_llm.stats.snapshot()["requests"] == served and counter_values(rclient, "lenient") == []
    # A body that cannot be a chat request for anyone and bills nothing still passes, as
    # documented: an Assistants run whose messages are nested in its thread. A legacy completion
    # (`prompt`) is refused as an API the quota cannot meter (test_other_billable_apis_...).
    raw = b'{"assistant_id": "a", "thread": {"messages": []}}'
    other = shared_gateway.request("POST", "/day/v1/chat/completions", body=raw, headers={"X-User": "lenient"})
    assert other.status == 400 and "llm-token-quota" not in other.body.decode(), raw  # the mock's own 400
    legacy = shared_gateway.request("POST", "/day/v1/chat/completions", body=b'{"prompt": "legacy"}',
                                    headers={"X-User": "lenient"})
    assert legacy.status == 400 and legacy.json()["error"]["code"] == "not_metered"
    assert mock_llm.stats.snapshot()["requests"] == served + 1


def test_absurd_usage_from_the_upstream_settles_whole_at_the_per_request_bound(shared_gateway, rclient) -> None:
    # A breaker's finding: an upstream reporting 999,999,999,999,999 completion tokens made the
    # cost counter's INCRBY overflow mid-script (10^19 nano-USD on gpt-4o), after the tokens
    # counter had moved: the reservation stayed, and its later expiry charged $0.
    r = post(shared_gateway, "cost", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
             "absurd", **{"X-Mock-Usage": "prompt=10,completion=999999999999999"})
    assert r.status == 200, r.body[:300]
    wait_settled(shared_gateway, rclient, "absurd")   # settled: no reservation left behind
    assert counter_values(rclient, "absurd", "tokens") == [MAX_REQUEST_AMOUNT]
    assert counter_values(rclient, "absurd", "cost") == [MAX_REQUEST_AMOUNT]
    assert int(r.header("X-AI-Tokens-Completion")) == 999999999999999  # the total (10 more) is clamped
    # and the next request of that caller is refused: its budget is spent, not forgotten
    again = post(shared_gateway, "cost", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, "absurd")
    assert again.status == 429


def test_embeddings_calls_are_metered_and_refused_when_exhausted(shared_gateway, rclient, mock_llm) -> None:
    # A new user's finding: /v1/embeddings passed as "not a chat request", unmetered, although the
    # provider bills its input. Now it is reserved by its counted input and settled to the usage.
    def embed(user: str, value: Any, model: str = "text-embedding-3-small") -> Any:
        return shared_gateway.request("POST", "/day/v1/embeddings", json={"model": model, "input": value},
                                      headers={"X-User": user})

    texts = ["the quick brown fox jumps over the lazy dog", "a second input to embed"]
    first = embed("embedder", texts)
    assert first.status == 200, first.body[:300]
    billed = first.json()["usage"]["prompt_tokens"]
    assert billed == sum(tokens.count_text(t, "text-embedding-3-small") for t in texts)
    assert int(first.header("X-AI-Tokens-Prompt")) == billed and first.header("X-AI-Tokens-Completion") == "0"
    assert float(first.header("X-AI-Cost-USD")) == pytest.approx(billed * 0.02 / 1e6, abs=1e-9)
    ids = embed("embedder", [[101, 102, 103], [7] * 40])  # token ids: billed one per id
    assert ids.status == 200 and ids.json()["usage"]["prompt_tokens"] == 43
    wait_settled(shared_gateway, rclient, "embedder")
    assert counter_values(rclient, "embedder") == [billed + 43]
    assert int(ids.header("X-AI-RateLimit-Remaining-Day")) == 1000 - billed - 43
    # Exhausted: the next embeddings call is refused and never reaches the provider.
    big = embed("embedder", "word " * 990)
    assert big.status == 429 and big.json()["error"]["code"] == "quota_exceeded"
    # An embedding model is metered on any path (strip_path can leave the client "/emb"): refused
    # here as over the limit, not as an API the quota cannot meter.
    elsewhere = shared_gateway.request("POST", "/day/emb", json={"model": "text-embedding-3-small",
                                                                  "input": "word " * 990},
                                       headers={"X-User": "embedder"})
    assert elsewhere.status == 429 and elsewhere.json()["error"]["code"] == "quota_exceeded"
    wrong = embed("embedder", {"text": "x"})
    assert wrong.status == 400 and "'input' must be" in wrong.json()["error"]["message"]
    assert counter_values(rclient, "embedder") == [billed + 43]


def test_other_billable_apis_are_refused_not_passed_unmetered(shared_gateway, rclient, mock_llm) -> None:
    # The Responses API, legacy Completions and image generation bill too; the quota cannot meter
    # them, so it refuses them clearly instead of passing them on uncounted.
    served = mock_llm.stats.snapshot()["requests"]
    for path, body in (("/day/v1/responses", {"model": MODEL, "input": "hello"}),
                       ("/day/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hello"}),
                       ("/day/v1/images/generations", {"model": "dall-e-3", "prompt": "a cat"})):
        r = shared_gateway.request("POST", path, json=body, headers={"X-User": "other-api"})
        assert r.status == 400, (path, r.status)
        err = r.json()["error"]
        assert err["code"] == "not_metered" and path.split("/day", 1)[1] in err["message"]
    # With bytes after the JSON object (Go's decoder serves the object and ignores them) it is
    # refused too, not passed on as an unreadable body (a breaker's finding).
    for raw in (b'{"model": "gpt-4o-mini", "input": "hello"} x', b'{"model": "gpt-4o-mini", "input": "hello"}\n{}',
                # a breaker's: NaN made it unreadable here, so it passed unmetered to a provider
                # whose json reads NaN (FastAPI, vLLM)
                b'{"model": "gpt-4o-mini", "input": "hello", "temperature": NaN}'):
        r = shared_gateway.request("POST", "/day/v1/responses", body=raw, headers={"X-User": "other-api"})
        assert r.status == 400 and r.json()["error"]["code"] == "not_metered", (raw, r.status, r.body[:200])
    # In another spelling (a case-insensitive reader takes it) it is refused too.
    other_case = shared_gateway.request("POST", "/day/v1/images/generations",
                                        json={"model": "dall-e-3", "Prompt": "a cat"}, headers={"X-User": "other-api"})
    assert other_case.status == 400 and "'Prompt' must be spelled 'prompt'" in other_case.json()["error"]["message"]
    assert mock_llm.stats.snapshot()["requests"] == served and counter_values(rclient, "other-api") == []
    # A body with neither (an Assistants-style call) still passes, as documented.
    thread = shared_gateway.request("POST", "/day/v1/threads", json={"metadata": {"k": "v"}},
                                    headers={"X-User": "other-api"})
    assert thread.status == 404  # the mock's own answer: the quota passed it on


def test_a_caller_without_the_identifier_header_is_counted_by_address_not_in_a_shared_bucket(
        shared_gateway, rclient) -> None:
    """Kong's rate-limiting falls back to the client's address when its identifier is missing;
    so does the quota: a caller who leaves the header out neither shares one budget with every
    other such caller nor spends theirs."""
    body = chat("no identity header", max_tokens=5)
    reply = shared_gateway.request("POST", "/day/v1/chat/completions", json=body, headers={"X-Mock-Usage": "total=30"})
    assert reply.status == 200
    wait_logs(shared_gateway)
    names = [k.decode() for k in rclient.keys("aigov:quota:*:tokens:*")]
    assert any("{ip:127.0.0.1}" in n for n in names), names
    assert not [n for n in names if "anonymous" in n]


@pytest.mark.parametrize("route,header", [("bykey", "x-api-key"), ("byunderscore", "X-Api-Key"),
                                          ("bytoken", "x-auth-token"), ("bypat", "X-Pat")])
def test_a_credential_header_identity_never_appears_in_clear(shared_gateway, rclient, route: str,
                                                             header: str) -> None:
    # identifier_header: x-api-key kept a short key as it was: in every Redis key name and in the
    # metrics' consumer label. A credential header's value is hashed; the caller is still one caller.
    # A breaker found the x_api_key spelling (and X-Auth-Token, on no list) stored the key in clear.
    key = f"sk-live-4f9a1c-{route}"
    body = chat("hi", max_tokens=5)
    replies = [shared_gateway.request("POST", f"/{route}/v1/chat/completions", json=body,
                                      headers={header: key, "X-Mock-Usage": "total=30"}) for _ in range(2)]
    assert [r.status for r in replies] == [200, 200]
    assert int(replies[1].header("X-AI-RateLimit-Remaining-Day")) == 1000 - 60
    wait_logs(shared_gateway)
    names = [k.decode() for k in rclient.keys("aigov:quota:*")]
    assert names and not [n for n in names if key in n]
    assert all("{header:#" in n for n in names)


def test_stream_usage_request_has_the_provider_report_a_streams_usage(shared_gateway, rclient) -> None:
    # With stream_usage: request the provider's own count settles a stream: here 777 tokens, which
    # the quota's count of this prompt and reply (a few dozen) could never give. The mock sends a
    # usage chunk only when the request asks for it (see the default route below).
    body = chat("stream me a reply", max_tokens=None, stream=True)
    r = post(shared_gateway, "askusage", body, "askusage", **{"X-Mock-Usage": "total=777"})
    assert r.status == 200
    completion, complete = sse.completion_from_chat_chunks(r.body)
    assert complete and completion["usage"]["total_tokens"] == 777  # the client gets the chunk too
    assert int(r.header("X-AI-Tokens-Prompt")) + int(r.header("X-AI-Tokens-Completion")) == 777
    wait_settled(shared_gateway, rclient, "askusage")
    assert counter_values(rclient, "askusage") == [777]
    # A client's own stream_options are kept beside include_usage, and one that asked is unchanged.
    for options in ({"include_usage": True}, {}, None, {"include_usage": None}):  # null: not given
        r = post(shared_gateway, "askusage", {**body, "stream_options": options}, "askusage2",
                 **{"X-Mock-Usage": "total=55"})
        assert r.status == 200 and int(r.header("X-AI-Tokens-Prompt")) + int(r.header("X-AI-Tokens-Completion")) == 55
    # A client that said include_usage: false gets no usage chunk (the README: added only to a
    # stream that lacks it); the stream is settled from the text counted, as any stream without usage.
    r = post(shared_gateway, "askusage", {**body, "stream_options": {"include_usage": False}}, "askusage3",
             **{"X-Mock-Usage": "total=55"})
    completion, complete = sse.completion_from_chat_chunks(r.body)
    assert r.status == 200 and complete and not completion.get("usage")
    assert int(r.header("X-AI-Tokens-Prompt")) + int(r.header("X-AI-Tokens-Completion")) != 55
    # stream_options the provider refuses are not repaired into a request it serves (and bills)
    r = post(shared_gateway, "askusage", {**body, "stream_options": "x"}, "askusage3")
    assert r.status == 400
    # Without it (the default) the same stream is charged the quota's own count.
    r = post(shared_gateway, "day", body, "asksent", **{"X-Mock-Usage": "total=777"})
    assert r.status == 200 and sse.completion_from_chat_chunks(r.body)[0].get("usage") is None
    assert int(r.header("X-AI-Tokens-Prompt")) + int(r.header("X-AI-Tokens-Completion")) < 777


def test_a_request_without_model_says_so(shared_gateway, rclient) -> None:
    r = post(shared_gateway, "day", {"messages": [{"role": "user", "content": "hi"}]}, "no-model")
    assert r.status == 400 and r.json()["error"]["code"] == "model_not_priced"
    assert "names no model" in r.json()["error"]["message"] and "None" not in r.json()["error"]["message"]


def test_an_input_beside_the_messages_is_counted(shared_gateway, rclient, mock_llm) -> None:
    # A tester's finding: an embeddings body that also carries `messages` was read as chat and its
    # `input` (5,000 tokens, billed by the embeddings upstream) reserved and charged as nothing.
    body = {"model": "text-embedding-3-small", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 1, "input": "word " * 5000}
    served = mock_llm.stats.snapshot()["requests"]
    r = shared_gateway.request("POST", "/day/v1/embeddings", json=body, headers={"X-User": "mixed"})
    assert r.status == 429 and "larger than the limit" in r.json()["error"]["message"]
    small = {**body, "input": "word " * 200}
    ok = shared_gateway.request("POST", "/day/v1/embeddings", json=small, headers={"X-User": "mixed"})
    assert ok.status == 200
    wait_settled(shared_gateway, rclient, "mixed")
    assert counter_values(rclient, "mixed") == [ok.json()["usage"]["total_tokens"]]
    assert mock_llm.stats.snapshot()["requests"] == served + 1


def test_an_embeddings_body_it_cannot_read_is_refused(shared_gateway, rclient, mock_llm) -> None:
    # Go's decoder (Ollama) reads past trailing bytes and deeper nesting; passing such a body on
    # unmetered would let an exhausted caller embed for free there.
    served = mock_llm.stats.snapshot()["requests"]
    good = json.dumps({"model": "text-embedding-3-small", "input": "hi"}).encode()
    for raw in (good + b" trailing", good[:-1] + b', "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",
                b"[" + good + b"]"):
        r = shared_gateway.request("POST", "/day/v1/embeddings", body=raw, headers={"X-User": "unread"})
        assert r.status == 400 and r.json()["error"]["code"] == "invalid_request", (raw[:60], r.status)
        assert "cannot read exactly" in r.json()["error"]["message"]
    assert mock_llm.stats.snapshot()["requests"] == served and counter_values(rclient, "unread") == []


def test_fail_open_counts_each_redis_apart(mock_llm) -> None:
    # A new user's finding: during an outage the local fallback was one store for the process, so
    # routes on different Redis servers (different budgets) drew on one counter.
    from aigov.devredis import free_port

    routes = {name: [quota_plugin(free_port(), limits=[{"window": "day", "tokens": 1000}])] for name in ("r1", "r2")}
    gw = start_gateway(kong_yml(mock_llm.url, routes), server="aigov", pythonpath=str(REPO))
    try:
        remaining = {}
        for name in ("r1", "r2", "r1"):
            r = post(gw, name, chat("count me", max_tokens=50), "same-user")
            assert r.status == 200, r.body[:200]
            remaining.setdefault(name, []).append(int(r.header("X-AI-RateLimit-Remaining-Day")))
        first_r1, second_r1 = remaining["r1"]
        assert remaining["r2"] == [first_r1]      # r2's own budget: r1's request is not in it
        assert second_r1 < first_r1               # while r1 counts its own requests
    finally:
        gw.close()
