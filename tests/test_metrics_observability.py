"""Observability end to end: traffic through the Kong stand-in's HTTP front to the real `aigov serve`
process (real MiniLM, real tiktoken, in-process stores), then

- the Prometheus endpoint of the plugin server (`--metrics-listen`, 127.0.0.1 only) is scraped
  and its counters are compared with what the client saw (X-Cache-Status, X-Semantic-Route,
  usage in the mock's answers, 429s);
- the log serializer Kong would hand to http-log / file-log (the stand-in's saved serializer,
  after every plugin's log phase) carries each plugin's decision under `aigov.*` and no key.
"""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from aigov.demo.run import metric_sum, plugin_server_entries, scrape
from aigov.devredis import free_port
from kongsim.pytest_plugin import GatewayHandle, make_prefix, start_gateway

REPO = Path(__file__).resolve().parent.parent
KEYS = {"ann": "ann-obs-key", "ben": "ben-obs-key"}
CUSTOM_ID_KEY = "cust-obs-key"  # a consumer with a custom_id and no username
# Consumers named like the labels the quota gives others (unidentified callers, the overflow, the
# custom_id-only consumer's custom_id) -> (key, the label each must get).
RESERVED_NAMES = {"anonymous": ("anon-named-key", "consumer:anonymous"),
                  "other": ("other-named-key", "consumer:other"),
                  "cust-42": ("cust42-named-key", "cust-42")}


def _config(mock_url: str) -> dict[str, Any]:
    router = {"name": "llm-semantic-router", "config": {
        "default_route": "general",
        "routes": [
            {"name": "money", "target": {"model": "gpt-4o"}, "utterances": [
                "what is my account balance", "transfer money to my savings account",
                "why was my card declined", "how much do i owe on my credit card",
                "pay my electricity bill from checking", "what is the interest rate on my loan"]},
            {"name": "general", "target": {"model": "gpt-4o-mini"}, "utterances": [
                "tell me a fun fact about space", "what is the capital of france",
                "how do i say thank you in spanish", "recommend a good science fiction book",
                "what is the weather like on mars", "who painted the mona lisa"]}]}}
    quota = {"name": "llm-token-quota", "config": {"limits": [{"window": "day", "tokens": 100000}],
                                                   "log_statistics": True}}
    cache = {"name": "llm-semantic-cache", "config": {"vectordb": {"namespace": "obs"}}}
    return {
        "_format_version": "3.0",
        "consumers": [{"username": u, "keyauth_credentials": [{"key": k}]}
                      for u, k in {**KEYS, **{n: key for n, (key, _) in RESERVED_NAMES.items()}}.items()]
        + [{"custom_id": "cust-42", "keyauth_credentials": [{"key": CUSTOM_ID_KEY}]}],
        "services": [{"name": "llm", "url": mock_url, "routes": [{
            "name": "obs", "paths": ["/v1/chat"], "strip_path": False,
            "plugins": [{"name": "key-auth", "config": {"key_names": ["apikey"]}}, router, quota, cache]}]}],
        # ben: a budget the second request cannot fit (prompt + max_tokens is reserved, ~80)
        "plugins": [{"name": "llm-token-quota", "route": "obs", "consumer": "ben",
                     "config": {"limits": [{"window": "day", "tokens": 100}], "log_statistics": True}}],
    }


@pytest.fixture(scope="module")
def observed(mock_llm: Any) -> Iterator[dict[str, Any]]:
    prefix = make_prefix()
    metrics_port = free_port()
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    gw: GatewayHandle = start_gateway(_config(mock_llm.url),
                                      server=plugin_server_entries(prefix, f"127.0.0.1:{metrics_port}", env),
                                      prefix=prefix)
    saved: list[Any] = []
    runloop = gw.gateway.runloop
    chained = runloop.on_request_done  # the gateway's own hook (request timings): keep it

    def keep_ctx(ctx: Any) -> None:
        # runs after every log phase: ctx.saved["serialize"] is what http-log / file-log would send
        # (values set in the log timers are not in it: Kong drops them)
        saved.append(ctx)
        if chained is not None:
            chained(ctx)

    runloop.on_request_done = keep_ctx
    try:
        yield {"gw": gw, "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics",
               "metrics_port": metrics_port, "ctxs": saved}
    finally:
        gw.close()


def _chat(gw: GatewayHandle, user: str, text: str, stream: bool = False, max_tokens: int = 64) -> Any:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": text}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return gw.request("POST", "/v1/chat/completions", headers={"apikey": KEYS[user]}, json=body, timeout=90)


def _usage(reply: Any) -> dict[str, int]:
    from aigov import sse

    if (reply.header("Content-Type") or "").startswith("text/event-stream"):
        completion, complete = sse.completion_from_chat_chunks(reply.body)
        assert complete
        return completion["usage"]
    return reply.json()["usage"]


def test_metrics_and_serializer_match_the_traffic(observed: dict[str, Any]) -> None:
    gw, url = observed["gw"], observed["metrics_url"]
    before = scrape(url)
    sent = [
        ("ann", "what is the balance of my checking account", False),
        ("ann", "what is the balance of my checking account", False),   # exact hit
        ("ann", "tell me an interesting fact about jupiter", True),      # streamed miss
        ("ann", "tell me an interesting fact about jupiter", True),      # streamed exact hit
        ("ben", "why was my card declined at the store", False),
        ("ben", "recommend a short novel about the sea", False),         # over ben's 100 tokens: 429
    ]
    replies = [(user, text, _chat(gw, user, text, stream)) for user, text, stream in sent]
    assert gw.wait_logs(15)
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    statuses = [r.status for _, _, r in replies]
    assert statuses == [200, 200, 200, 200, 200, 429], [(r.status, r.body[:200]) for _, _, r in replies]
    cache_status = [r.header("X-Cache-Status") for _, _, r in replies[:5]]
    assert cache_status == ["Miss", "Hit", "Miss", "Hit", "Miss"]
    assert delta("ai_llm_requests_total", cache_status="hit") == 2
    assert delta("ai_llm_requests_total", cache_status="miss") == 3

    for user in ("ann", "ben"):
        mine = [(r, _usage(r)) for u, _, r in replies if u == user and r.status == 200]
        spent = [u for r, u in mine if r.header("X-Cache-Status") != "Hit"]
        saved = [u for r, u in mine if r.header("X-Cache-Status") == "Hit"]
        tag = user  # a Kong consumer is labelled by its username, as in Kong's prometheus plugin
        assert delta("ai_llm_tokens_total", token_type="prompt_tokens", consumer=tag) == sum(u["prompt_tokens"] for u in spent)
        assert delta("ai_llm_tokens_total", token_type="completion_tokens", consumer=tag) == \
            sum(u["completion_tokens"] for u in spent)
        assert delta("ai_llm_tokens_total", token_type="saved_prompt_tokens", consumer=tag) == \
            sum(u["prompt_tokens"] for u in saved)
        assert delta("ai_llm_tokens_total", token_type="saved_completion_tokens", consumer=tag) == \
            sum(u["completion_tokens"] for u in saved)
        # the quota's response headers report the same metering as the counters
        for r, u in mine:
            if r.header("X-Cache-Status") != "Hit":
                assert int(r.header("X-AI-Tokens-Prompt")) == u["prompt_tokens"]
    assert delta("ai_quota_rejections_total", consumer="ben") == 1
    assert delta("ai_quota_rejections_total", consumer="ann") == 0

    routes = [r.header("X-Semantic-Route") for _, _, r in replies]
    assert routes[0] == "money" and routes[2] == "general"
    for route in set(routes):
        assert delta("ai_router_decisions_total", route=route) == routes.count(route), route
    assert sum(delta("ai_router_decisions_total", route=r) for r in ("money", "general")) == len(replies)

    # ----- the log serializer: each plugin's decision under aigov.*, no credential anywhere
    ctxs = [c for c in observed["ctxs"] if c.path == "/v1/chat/completions"][-len(replies):]
    by_id = {c.request_id: c for c in ctxs}
    assert len(by_id) == len(replies)
    for (user, text, reply) in replies:
        ctx = by_id[reply.header("X-Kong-Request-Id")]
        ser = ctx.saved["serialize"]
        dumped = json.dumps(ser)
        assert KEYS[user] not in dumped
        aigov = ser["aigov"]
        assert aigov["router"]["route"] == reply.header("X-Semantic-Route")
        assert aigov["router"]["reason"] == reply.header("X-Semantic-Route-Reason")
        if reply.status == 429:
            assert aigov["quota"]["status"] == "rejected"
            assert "cache" not in aigov  # the quota's exit came first: the cache never ran
            continue
        assert aigov["cache"]["status"] == reply.header("X-Cache-Status")
        usage = _usage(reply)
        if reply.header("X-Cache-Status") == "Hit":
            # The hit exits in access: no response phase, so the quota's entry (log_statistics)
            # is never written; its release happens in the log timer, counted in the metrics.
            assert "quota" not in aigov
        else:
            assert aigov["cache"]["stored"] == "stored"
            assert aigov["quota"]["prompt_tokens"] == usage["prompt_tokens"]
            assert aigov["quota"]["completion_tokens"] == usage["completion_tokens"]
            # the log entry names the quota's identity (its counter keys), Kong's the username
            consumer_ids = {c.username: c.id for c in gw.gateway.decl.consumers.values()}
            assert aigov["quota"]["consumer"] == f"consumer:{consumer_ids[user]}"
            # the quota priced the model the router put in the body, not the client's gpt-4o-mini
            routed_model = {"money": "gpt-4o", "general": "gpt-4o-mini"}[reply.header("X-Semantic-Route")]
            assert aigov["quota"]["model"] == routed_model


def test_requests_the_router_refuses_are_counted_as_decisions(observed: dict[str, Any]) -> None:
    """A dashboard on ai_router_decisions_total must see the abnormal traffic too: a chat request
    the router refuses (400) is counted under route "none" with its reason."""
    gw, url = observed["gw"], observed["metrics_url"]
    before = scrape(url)
    body = json.dumps({"model": "gpt-4o-mini", "Messages": [{"role": "user", "content": "hi"}]})
    reply = gw.request("POST", "/v1/chat/completions", headers={"apikey": KEYS["ann"], "Content-Type":
                       "application/json"}, body=body, timeout=90)
    assert reply.status == 400 and reply.json()["error"]["code"] == "invalid_request"
    assert gw.wait_logs(15)
    after = scrape(url)
    counted = (metric_sum(after, "ai_router_decisions_total", route="none", reason="invalid_request")
               - metric_sum(before, "ai_router_decisions_total", route="none", reason="invalid_request"))
    assert counted == 1


def test_metrics_listen_binds_loopback_only(observed: dict[str, Any]) -> None:
    port = observed["metrics_port"]
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                listening.add(addr)
    assert listening == {"0100007F"}, listening  # 127.0.0.1 and nothing else (no 0.0.0.0, no ::)
    # and it answers there in the Prometheus text format, with the metric names Kong uses
    with urllib.request.urlopen(observed["metrics_url"], timeout=10) as resp:
        text = resp.read().decode()
    for name in ("ai_llm_requests_total", "ai_llm_tokens_total", "ai_router_decisions_total",
                 "ai_quota_rejections_total"):
        assert f"# TYPE {name} counter" in text, name


def test_a_consumer_is_labelled_by_username_else_custom_id_never_its_id(observed: dict[str, Any]) -> None:
    gw, url = observed["gw"], observed["metrics_url"]
    before = scrape(url)
    body = {"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "name a planet"}]}
    reply = gw.request("POST", "/v1/chat/completions", headers={"apikey": CUSTOM_ID_KEY}, json=body, timeout=90)
    assert reply.status == 200
    assert gw.wait_logs(15)
    after = scrape(url)
    spent = int(reply.header("X-AI-Tokens-Prompt")) + int(reply.header("X-AI-Tokens-Completion"))
    label_deltas = {}
    for (name, labels), v in after.items():
        if name == "ai_llm_tokens_total" and dict(labels).get("token_type") == "total_tokens":
            label_deltas[dict(labels)["consumer"]] = v - before.get((name, labels), 0)
    assert label_deltas.get("custom_id:cust-42") == spent
    assert not label_deltas.get("cust-42")  # the label of the consumer whose username is cust-42
    consumer_id = next(c.id for c in gw.gateway.decl.consumers.values() if c.custom_id == "cust-42")
    assert not any(consumer_id in label for label in label_deltas)


def test_a_consumer_named_like_a_reserved_label_gets_its_own_series(observed: dict[str, Any]) -> None:
    # A consumer named "other" shared the series of the callers past --metrics-max-consumers, one
    # named "anonymous" those of unidentified callers: each now gets "consumer:<name>". A username
    # equal to another consumer's custom_id keeps its name (the custom_id one is custom_id:...).
    gw, url = observed["gw"], observed["metrics_url"]
    body = {"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "name a moon"}]}
    before = scrape(url)
    spent = {}
    for name, (key, label) in RESERVED_NAMES.items():
        reply = gw.request("POST", "/v1/chat/completions", headers={"apikey": key}, json=body, timeout=90)
        assert reply.status == 200
        spent[label] = int(reply.header("X-AI-Tokens-Prompt")) + int(reply.header("X-AI-Tokens-Completion"))
    assert gw.wait_logs(15)
    after = scrape(url)
    deltas = {dict(labels)["consumer"]: v - before.get((name, labels), 0) for (name, labels), v in after.items()
              if name == "ai_llm_tokens_total" and dict(labels).get("token_type") == "total_tokens"}
    for label, n in spent.items():
        assert deltas.get(label) == n, (label, deltas)
    assert not deltas.get("anonymous") and not deltas.get("other") and not deltas.get("custom_id:cust-42")
