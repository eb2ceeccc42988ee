"""spec/kong.yml end to end through the stand-in: the demo's own declarative config, its docker
hostnames rewritten (kongsim.declarative.override_hosts) to a local mock LLM and the session's
real Redis + RediSearch, with the three real plugins (router, quota, cache) and the real MiniLM
model, on `aigov serve` (one process) and on the stock kong-pdk servers (one per plugin)."""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from aigov.mockllm import MockLLM
from kongsim.declarative import DeclarativeError, load, override_hosts
from kongsim.pytest_plugin import GatewayHandle, start_gateway

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "spec" / "kong.yml"
PLUGIN_FILES = [REPO / "plugins" / f"{n}.py"
                for n in ("llm-semantic-router", "llm-token-quota", "llm-semantic-cache")]
KEY = "alice-demo-key"  # alice has the large budgets (bob and carol are the demo's small ones)
BANKING = "what is my account balance"


def local_spec(mock: MockLLM, redis_url: str) -> dict[str, Any]:
    redis_addr = redis_url.split("://", 1)[1].split("/", 1)[0]
    doc = override_hosts(SPEC, {"mock-llm:8080": f"127.0.0.1:{mock.port}",
                                "redis:6379": redis_addr})
    _patient_redis(doc)
    return doc


def _patient_redis(node: Any) -> None:
    """Every Redis block of the document with a 2 s timeout: the spec keeps the plugins' 200 ms
    default, which a healthy call can pass on a busy CI host (it then fails open)."""
    if isinstance(node, dict):
        if isinstance(node.get("redis"), dict) and "host" in node["redis"]:
            node["redis"].setdefault("timeout_ms", 2000)
        for v in node.values():
            _patient_redis(v)
    elif isinstance(node, list):
        for v in node:
            _patient_redis(v)


def test_override_hosts_rewrites_exactly_the_documented_places(redis_server: Any) -> None:
    mock_port, redis_addr = 40999, redis_server.url.split("://", 1)[1]
    doc = override_hosts(SPEC, {"mock-llm:8080": f"127.0.0.1:{mock_port}", "redis:6379": redis_addr})
    original = SPEC.read_text()
    cfg = load(doc)  # still a valid declarative config
    (svc,) = cfg.services.values()
    assert (svc.host, svc.port) == ("127.0.0.1", mock_port)
    rhost, rport = redis_addr.split(":")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for p in cfg.plugins:
        by_name.setdefault(p.name, []).append(p.config)
    assert by_name["ai-proxy"][0]["model"]["options"]["upstream_url"] == \
        f"http://127.0.0.1:{mock_port}/v1/chat/completions"
    redis_records = [c["redis"] for c in by_name["llm-token-quota"]] + \
        [c["vectordb"]["redis"] for c in by_name["llm-semantic-cache"]]
    assert len(redis_records) == 6 and all(r == {"host": rhost, "port": int(rport)} for r in redis_records)
    assert "mock-llm:8080" in original and SPEC.read_text() == original  # the file is untouched
    with pytest.raises(DeclarativeError, match="redis:6380 does not occur"):
        override_hosts(SPEC, {"redis:6380": "127.0.0.1:1"})
    with pytest.raises(DeclarativeError, match="is not HOST:PORT"):
        override_hosts(SPEC, {"redis": "127.0.0.1:1"})


@pytest.fixture(scope="module")
def mock() -> Iterator[MockLLM]:
    m = MockLLM("127.0.0.1", 0).start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module", params=["aigov", "stock"])
def gateway(request: pytest.FixtureRequest, mock: MockLLM, redis_server: Any) -> Iterator[GatewayHandle]:
    if not redis_server.running:
        redis_server.start()
    # Both gateways share the session's Redis: start each from empty, so the other kind's
    # cached answers and quota counters cannot leak in (the plugins create their index lazily).
    client = redis_server.client()
    client.flushall()
    client.close()
    kwargs: dict[str, Any] = {"server": request.param, "pythonpath": str(REPO),
                              "extra_env": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                            "TOKENIZERS_PARALLELISM": "false"}}
    if request.param == "stock":
        kwargs["plugin_files"] = PLUGIN_FILES
    gw = start_gateway(local_spec(mock, redis_server.url), **kwargs)
    gw.server_kind = request.param
    try:
        warm(gw, KEY)
        yield gw
    finally:
        gw.close()


def chat(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


def warm(gw: GatewayHandle, key: str, timeout_s: float = 240.0) -> None:
    """Until the router has its model and routes it answers with reason `error` (by design).
    The warm-up prompt is unrelated to the test prompt, so the cache cannot replay it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = gw.request("POST", "/v1/chat/completions", headers={"apikey": key},
                       json=chat(f"warm-up ping {uuid.uuid4().hex}"), timeout=120)
        assert r.status == 200, r.body
        if r.header("X-Semantic-Route-Reason") not in (None, "error"):
            return
        time.sleep(1.0)
    raise AssertionError(f"router not ready after {timeout_s}s")


def test_consumer_request_reaches_the_mock_through_all_three_plugins(gateway: GatewayHandle,
                                                                     mock: MockLLM) -> None:
    key = KEY
    before = mock.stats.snapshot()["requests"]
    r = gateway.request("POST", "/v1/chat/completions", headers={"apikey": key},
                        json=chat(BANKING), timeout=120)
    assert r.status == 200, r.body
    # llm-semantic-router picked the banking route, whose target model is gpt-4o
    assert r.header("X-Semantic-Route") == "banking"
    # llm-token-quota reported the consumer's window(s)
    quota = {k: v for k, v in r.headers.items() if k.startswith("x-ai-ratelimit-")}
    assert any(k.startswith("x-ai-ratelimit-remaining-") for k in quota), r.headers
    assert any(k.startswith("x-ai-ratelimit-limit-") for k in quota)
    # llm-semantic-cache looked up and missed
    assert r.header("X-Cache-Status") == "Miss"
    stats = mock.stats.snapshot()
    assert stats["requests"] == before + 1
    assert stats["recent"][-1]["model"] == "gpt-4o" and stats["recent"][-1]["status"] == 200
    assert r.json()["choices"][0]["message"]["content"]
    assert gateway.wait_logs(30)

    # The cache stored the answer (response/log phase): the same question is now a hit and
    # never reaches the mock.
    again = gateway.request("POST", "/v1/chat/completions", headers={"apikey": key},
                            json=chat(BANKING), timeout=120)
    assert again.status == 200 and again.header("X-Cache-Status") == "Hit"
    assert again.json()["choices"][0]["message"]["content"] == r.json()["choices"][0]["message"]["content"]
    assert mock.stats.snapshot()["requests"] == before + 1

    # and key-auth still guards the route
    denied = gateway.request("POST", "/v1/chat/completions", json=chat(BANKING))
    assert denied.status == 401
