"""llm-semantic-cache end to end: the Kong stand-in, the real plugin-server process, real Redis
with RediSearch, the real MiniLM model; only the LLM upstream is the mock.

Every scenario runs on both plugin servers: `aigov serve` and kong-pdk's stock dedicated server
(`python3 plugins/llm-semantic-cache.py`), one gateway per server kind for the whole module.
Each kind has its own namespaces, so entries of one run never answer the other."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from aigov import sse
from kongsim.pytest_plugin import GatewayHandle, start_gateway
from conftest import TcpPeer

REPO = Path(__file__).resolve().parent.parent
PLUGIN_FILE = REPO / "plugins" / "llm-semantic-cache.py"
MODEL = "gpt-4o-mini"
CONSUMERS = [{"username": "alice", "keyauth_credentials": [{"key": "key-alice"}]},
             {"username": "bob", "keyauth_credentials": [{"key": "key-bob"}]}]


def cache_plugin(redis_port: int, namespace: str, **conf: Any) -> dict[str, Any]:
    vectordb = {"strategy": "redis", "namespace": namespace,
                "redis": {"host": "127.0.0.1", "port": redis_port, "timeout_ms": 2000}}
    vectordb.update(conf.pop("vectordb", {}))
    return {"name": "llm-semantic-cache", "config": {"vectordb": vectordb, **conf}}


def kong_yml(mock_url: str, routes: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {"_format_version": "3.0", "consumers": CONSUMERS,
            "services": [{"name": "llm", "url": mock_url, "routes": [
                {"name": name, "paths": [f"/{name}"], "strip_path": True,
                 "plugins": [{"name": "key-auth", "config": {"key_names": ["apikey"]}}] + plugins}
                for name, plugins in routes.items()]}]}


def chat(text: str, system: str | None = None, **extra: Any) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return {"model": MODEL, "messages": messages, **extra}


def post(gw: GatewayHandle, route: str, body: dict[str, Any], key: str = "key-alice", **headers: str) -> Any:
    return gw.request("POST", f"/{route}/v1/chat/completions", json=body, headers={"apikey": key, **headers})


def status(reply: Any) -> str | None:
    return reply.header("X-Cache-Status")


def answer_text(reply: Any) -> str:
    return reply.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def not_redis() -> Iterator[TcpPeer]:
    """Something that is not Redis on the configured port: it answers like a web server."""
    peer = TcpPeer(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    yield peer
    peer.close()


@pytest.fixture(scope="module", params=["aigov", "stock"])
def gw(request: pytest.FixtureRequest, redis_server: Any, mock_llm: Any, not_redis: TcpPeer) -> Iterator[GatewayHandle]:
    """One gateway per plugin-server kind for the module (the model loads once per server)."""
    _ensure_redis(redis_server)
    server = request.param
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    routes = {
        "c": [cache_plugin(port, f"e2e-{server}")],
        "strict": [cache_plugin(port, f"e2e-strict-{server}", exact_caching=False, vectordb={"threshold": 1.0})],
        "cadmin": [cache_plugin(port, f"e2e-admin-{server}", admin_path="/cadmin/purge", admin_key="s3cret")],
        "failing": [cache_plugin(port, f"e2e-fail-{server}", stop_on_failure=True)],
        "notredis": [cache_plugin(not_redis.port, f"e2e-notredis-{server}", stop_on_failure=True)],
    }
    handle = start_gateway(kong_yml(mock_llm.url, routes), server=server, plugin_files=[PLUGIN_FILE],
                           pythonpath=str(REPO))
    handle.server_kind = server  # type: ignore[attr-defined]
    try:
        # warm the embedder inside the plugin server so per-test timings are not the model load
        post(handle, "c", chat(f"warm-up {uuid.uuid4().hex}"))
        yield handle
    finally:
        handle.close()


def _ensure_redis(redis_server: Any) -> None:
    if not redis_server.running:
        redis_server.start()


def test_three_unrelated_prompts_miss(gw: GatewayHandle) -> None:
    assert status(post(gw, "c", chat("What is the boiling point of water at sea level?"))) == "Miss"
    for text in ("Write a haiku about autumn leaves.", "How do I configure nginx as a reverse proxy?",
                 "What are the health benefits of green tea?"):
        r = post(gw, "c", chat(text))
        assert r.status == 200
        assert status(r) == "Miss", text


def test_consumer_b_never_gets_consumer_a_answer(gw: GatewayHandle) -> None:
    r = post(gw, "c", chat("How much money is left in my savings account?"), key="key-alice")
    assert status(r) == "Miss"
    assert status(post(gw, "c", chat("How much money is left in my savings account?"), key="key-alice")) == "Hit"
    other = post(gw, "c", chat("How much money remains in my savings account?"), key="key-bob")
    assert other.status == 200 and status(other) == "Miss"


def test_the_path_and_query_are_scope(gw: GatewayHandle) -> None:
    # A breaker found one deployment's answer served for another on the same route: the path
    # (Azure-style /openai/deployments/<name>/...) and the query (api-version) were not scope.
    q = f"Write a haiku about autumn rain {uuid.uuid4().hex[:6]}"
    def ask(query: str) -> Any:
        return gw.request("POST", f"/c/v1/chat/completions?{query}", json=chat(q), headers={"apikey": "key-alice"})
    assert status(ask("api-version=2024-02-01")) == "Miss"
    gw.wait_logs()
    assert status(ask("api-version=2024-02-01")) == "Hit"
    other = ask("api-version=2024-06-01")
    assert other.status == 200 and status(other) == "Miss"
    assert status(post(gw, "c", chat(q))) == "Miss"  # no query: another scope again


def test_consumer_exact_layer_is_scoped(gw: GatewayHandle) -> None:
    r = post(gw, "c", chat("What is my current account balance?"), key="key-alice")
    assert status(r) == "Miss"
    again = post(gw, "c", chat("What is my current account balance?"), key="key-alice")
    assert status(again) == "Hit"
    # same text for bob: the exact layer is scoped too
    exact_other = post(gw, "c", chat("What is my current account balance?"), key="key-bob")
    assert exact_other.status == 200 and status(exact_other) == "Miss"


def test_context_and_parameters_are_hard_scope(gw: GatewayHandle) -> None:
    q = "Summarise the plot of Hamlet in two sentences."
    assert status(post(gw, "c", chat(q, system="You are a literature teacher."))) == "Miss"
    assert status(post(gw, "c", chat(q, system="You are a literature teacher."))) == "Hit"
    assert status(post(gw, "c", chat(q, system="You answer only in French."))) == "Miss"
    base = chat(q, system="You are a literature teacher.")
    for variant in ({"response_format": {"type": "json_object"}}, {"max_tokens": 17},
                    {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]}):
        r = post(gw, "c", {**base, **variant})
        assert status(r) == "Miss", variant


def test_enable_vs_disable_two_factor_is_a_miss(gw: GatewayHandle) -> None:
    assert status(post(gw, "c", chat("How do I enable two-factor authentication on my account?"))) == "Miss"
    gw.wait_logs()
    # The first answer is stored (the repeat hits), so the opposite question's Miss is a refusal.
    assert status(post(gw, "c", chat("How do I enable two-factor authentication on my account?"))) == "Hit"
    r = post(gw, "c", chat("How do I disable two-factor authentication on my account?"))
    assert r.status == 200 and status(r) == "Miss"


@pytest.mark.parametrize("fail", ["length", "429", "500", "cut"])
def test_failed_or_partial_answers_are_not_stored(gw: GatewayHandle, fail: str) -> None:
    text = f"Explain quantum entanglement simply, variant {fail}."
    body = chat(text, stream=(fail == "cut"))
    first = post(gw, "c", body, **{"X-Mock-Fail": fail})
    if fail != "cut":  # a cut stream reaches the client broken, without a readable header block
        assert status(first) == "Miss"
    gw.wait_logs()
    second = post(gw, "c", body)
    assert status(second) == "Miss", "a failed or partial answer was replayed"
    assert second.status == 200
    third = post(gw, "c", body)
    assert status(third) == "Hit"  # the good answer was stored


def test_streamed_request_twice_replays_valid_sse(gw: GatewayHandle) -> None:
    body = chat("List three uses of the Python zip function.", stream=True,
                stream_options={"include_usage": True})
    first = post(gw, "c", body)
    assert status(first) == "Miss"
    upstream, complete = sse.completion_from_chat_chunks(first.body)
    assert complete
    second = post(gw, "c", body)
    assert status(second) == "Hit"
    assert "text/event-stream" in (second.header("Content-Type") or "")
    assert second.body.count(b"data: [DONE]") == 1 and second.body.rstrip().endswith(b"data: [DONE]")
    replay, complete = sse.completion_from_chat_chunks(second.body)
    assert complete
    assert replay["choices"][0]["message"]["content"] == upstream["choices"][0]["message"]["content"]
    events = [e.json() for e in sse.parse_sse(second.body) if not e.is_done]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    # a non-stream request with the same text is another entry (stream is part of the scope)
    assert status(post(gw, "c", chat("List three uses of the Python zip function."))) == "Miss"


def test_identical_prompt_hits_at_threshold_one_without_exact_layer(gw: GatewayHandle) -> None:
    q = "What is the time complexity of binary search?"
    assert status(post(gw, "strict", chat(q))) == "Miss"
    r = post(gw, "strict", chat(q))
    assert status(r) == "Hit"
    assert float(r.header("X-Cache-Similarity")) >= 0.9999


def test_hit_headers_age_and_ttl(gw: GatewayHandle) -> None:
    q = "Give me a two-line poem about the sea."
    first = post(gw, "c", chat(q))
    assert status(first) == "Miss" and first.header("X-Cache-Key")
    time.sleep(1.1)
    hit = post(gw, "c", chat(q))
    assert status(hit) == "Hit"
    assert hit.header("X-Cache-Key") == first.header("X-Cache-Key")
    assert int(hit.header("Age")) >= 1
    assert 290 <= int(hit.header("X-Cache-Ttl")) <= 299
    assert answer_text(hit) == answer_text(first)


def test_malformed_bodies_bypass(gw: GatewayHandle) -> None:
    # the last one is a chat request with an invalid UTF-8 byte: read as U+FFFD it is metered,
    # but "caf\xff" and "caf\xfe" would read the same, so it never touches the cache
    lossy = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "caf!"}]}).encode()
    for raw in (b"{not json", b"\xff\xfe\x00garbage", json.dumps({"prompt": "legacy"}).encode(),
                lossy.replace(b"!", b"\xff"), lossy.replace(b"!", b"\xfe")):
        r = gw.request("POST", "/c/v1/chat/completions", body=raw,
                       headers={"apikey": "key-alice", "Content-Type": "application/json"})
        assert status(r) == "Bypass"
        assert r.status != 500


def test_redis_outage_fails_open_then_recovers(gw: GatewayHandle, redis_server: Any, caplog: Any) -> None:
    q = "What is the capital city of Australia?"
    try:
        redis_server.stop()
        with caplog.at_level("WARNING", logger="kongsim.pdk"):
            for i in range(6):
                down = post(gw, "c", chat(f"{q} ({i})"))
                assert down.status == 200 and status(down) == "Failed"
                assert answer_text(down)
        # The outage is logged once for six requests (every one is still counted as Failed).
        assert sum("semantic cache store failed" in r.getMessage() for r in caplog.records) == 1, \
            [r.getMessage() for r in caplog.records]
        strict = post(gw, "failing", chat(q))
        assert strict.status == 503 and status(strict) == "Failed"
    finally:
        _ensure_redis(redis_server)
    deadline = time.monotonic() + 10
    got = None
    while time.monotonic() < deadline:  # the breaker lets a probe through after its cooldown
        got = status(post(gw, "c", chat(q)))
        if got != "Failed":
            break
        time.sleep(0.3)
    assert got == "Miss"
    assert status(post(gw, "c", chat(q))) == "Hit"


def test_a_store_that_is_not_redis_is_a_failure_like_an_outage(gw: GatewayHandle) -> None:
    # A new user's finding: a peer that answers non-RESP bytes (a web server, a proxy) made the
    # cache fail open with no X-Cache-Status, ignoring stop_on_failure.
    for q in ("what is the weather like on mars", "how far away is the moon"):
        reply = post(gw, "notredis", chat(q))
        assert reply.status == 503 and status(reply) == "Failed", (reply.status, reply.headers)


def test_purge_removes_every_key_of_a_namespace(gw: GatewayHandle, redis_server: Any) -> None:
    _ensure_redis(redis_server)
    kind = gw.server_kind  # type: ignore[attr-defined]
    admin_ns, other_ns = f"e2e-admin-{kind}", f"e2e-{kind}"
    client = redis_server.client()
    for q in ("How do I bake sourdough bread?", "How do I brew cold coffee?"):
        post(gw, "cadmin", chat(q))
    assert status(post(gw, "cadmin", chat("How do I bake sourdough bread?"))) == "Hit"
    post(gw, "c", chat("A key that must survive the purge of another namespace"))
    assert client.keys(f"aigov:cache:{admin_ns}:*")
    denied = gw.request("POST", "/cadmin/purge", headers={"apikey": "key-alice", "X-Cache-Admin-Key": "no"})
    assert denied.status == 403
    # A non-ASCII key made compare_digest raise: the request failed open, on to the upstream.
    # The client's bytes: UTF-8 "s3crét" (http.client sends str headers as latin-1), and for aigov
    # serve an invalid UTF-8 byte too (the stock server's unpacker drops such an event, a known bug).
    guesses = ["s3cr\u00c3\u00a9t"] + (["s3cr\u00e9t"] if kind == "aigov" else [])
    for guess in guesses:
        denied = gw.request("POST", "/cadmin/purge", headers={"apikey": "key-alice", "X-Cache-Admin-Key": guess})
        assert denied.status == 403, (denied.status, denied.body[:200])
    assert client.keys(f"aigov:cache:{admin_ns}:*")
    # admin_path is matched against the client's path (kong.request.get_path)
    gw.finished_request(None)  # keep finished requests from here on
    r = gw.request("POST", "/cadmin/purge", headers={"apikey": "key-alice", "X-Cache-Admin-Key": "s3cret"})
    assert r.status == 200 and r.json()["purged"] >= 2
    # Kong logs every request header but Authorization: the admin key is masked in the entry
    logged = gw.finished_request(r.header("X-Kong-Request-Id")).saved["serialize"]["request"]["headers"]
    assert logged["x-cache-admin-key"] == "REDACTED"
    assert client.keys(f"aigov:cache:{admin_ns}:*") == []
    assert client.keys(f"aigov:cache:{other_ns}:*")
    assert status(post(gw, "cadmin", chat("How do I bake sourdough bread?"))) == "Miss"
    # the CLI does the same for a namespace
    out = subprocess.run([sys.executable, "-m", "aigov.cli", "purge", "--namespace", admin_ns,
                          "--redis-url", redis_server.url], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["purged"] >= 1
    assert client.keys(f"aigov:cache:{admin_ns}:*") == []
    assert not [i for i in client.execute_command("FT._LIST") if i.decode().startswith(f"aigov_cache:{admin_ns}:")]
    client.close()


def test_password_reset_paraphrase_is_a_semantic_hit(gw: GatewayHandle) -> None:
    first = post(gw, "c", chat("How do I reset my password?"))
    assert first.status == 200 and status(first) == "Miss"
    hit = post(gw, "c", chat("How can I reset my password?"))
    assert status(hit) == "Hit", hit.headers
    assert float(hit.header("X-Cache-Similarity")) >= 0.82
    assert answer_text(hit) == answer_text(first)


def test_stream_and_non_stream_entries_never_mix(gw: GatewayHandle) -> None:
    """`stream` is part of the hard scope: a JSON answer is never replayed as SSE or back."""
    q = "What are the three primary colours of light?"
    plain = post(gw, "c", chat(q))
    assert status(plain) == "Miss"
    assert status(post(gw, "c", chat(q))) == "Hit"
    streamed_body = chat(q, stream=True)
    first_stream = post(gw, "c", streamed_body)
    assert status(first_stream) == "Miss", "a non-stream entry answered a streamed request"
    assert "text/event-stream" in (first_stream.header("Content-Type") or "")
    assert first_stream.header("X-Cache-Key") != plain.header("X-Cache-Key")
    gw.wait_logs()
    stream_hit = post(gw, "c", streamed_body)
    assert status(stream_hit) == "Hit" and "text/event-stream" in (stream_hit.header("Content-Type") or "")
    assert stream_hit.header("Content-Type") == first_stream.header("Content-Type")  # the provider's
    replay, complete = sse.completion_from_chat_chunks(stream_hit.body)
    assert complete and stream_hit.body.count(b"data: [DONE]") == 1
    assert replay["choices"][0]["message"]["content"] == answer_text(plain)
    plain_hit = post(gw, "c", chat(q))
    assert status(plain_hit) == "Hit" and plain_hit.header("X-Cache-Key") == plain.header("X-Cache-Key")
    assert (plain_hit.header("Content-Type") or "").startswith("application/json")
    assert answer_text(plain_hit) == answer_text(plain)


def test_prompt_with_a_lone_surrogate_is_cached_and_hit(gw: GatewayHandle) -> None:
    """JSON's "\\ud800" escape decodes to a code point UTF-8 cannot carry: the prompt is still
    looked up, stored and hit (the cache must not fail open on it)."""
    text = f"\ud800 lone surrogate question {uuid.uuid4().hex[:8]}"
    body = json.dumps(chat(text)).encode()  # ensure_ascii: the escape goes on the wire as is
    first = gw.request("POST", "/c/v1/chat/completions", body=body,
                       headers={"apikey": "key-alice", "Content-Type": "application/json"})
    assert first.status == 200 and status(first) == "Miss", (first.status, status(first))
    assert gw.wait_logs(10)
    second = gw.request("POST", "/c/v1/chat/completions", body=body,
                        headers={"apikey": "key-alice", "Content-Type": "application/json"})
    assert second.status == 200 and status(second) == "Hit", (second.status, status(second))
    assert answer_text(second) == answer_text(first)


def test_a_temperature_above_max_temperature_is_never_cached(gw: GatewayHandle) -> None:
    # max_temperature (default 1.0): a sampled, deliberately varied answer is neither stored
    # nor served; at or under the bound the same question is cached as usual.
    hot = chat("Write a one-line poem about autumn leaves.", temperature=1.5)
    assert status(post(gw, "c", hot)) == "Bypass"
    gw.wait_logs()
    again = post(gw, "c", hot)
    assert again.status == 200 and status(again) == "Bypass"
    cool = chat("Write a one-line poem about autumn leaves.", temperature=1.0)
    assert status(post(gw, "c", cool)) == "Miss"
    gw.wait_logs()
    assert status(post(gw, "c", cool)) == "Hit"
