"""llm-semantic-router end to end: the Kong stand-in, the real plugin-server process (aigov serve
and kong-pdk's stock server), the real all-MiniLM-L6-v2 model, and two mock LLM upstreams on two
ports (the only mocked part) that echo which model and which credential reached them."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from aigov.embeddings import LOCAL_MODEL_ID
from aigov.mockllm import MockLLM, auth_fingerprint
from kongsim.pytest_plugin import GatewayHandle, start_gateway

REPO = Path(__file__).resolve().parent.parent
PLUGIN_FILE = REPO / "plugins" / "llm-semantic-router.py"

CODING_KEY = "sk-coding-target-key"
BILLING_KEY = "sk-billing-target-key"
CLIENT_AUTH = "Bearer client-kong-key"
VAULT_KEY_WITH_NEWLINE = "sk-from-a-mounted-file\n"

CODING = ["how do I reverse a list in python", "my javascript function returns undefined",
          "fix this segmentation fault in my C program", "write a SQL query joining two tables",
          "what does this regular expression match", "how do I resolve a git merge conflict",
          "explain recursion with a code example", "why does my java code throw a NullPointerException",
          "how to write a unit test with pytest", "convert this bash loop to python",
          "what is the time complexity of quicksort", "how do I declare a struct in rust"]
BILLING = ["why was I charged twice this month", "I want a refund for my last invoice",
           "how do I update my credit card on file", "cancel my subscription please",
           "where can I download my invoices", "my payment was declined",
           "what plan am I on and how much does it cost", "change my billing address",
           "I was billed after cancelling", "do you offer annual billing discounts",
           "how do I get a receipt for my payment", "upgrade my plan to the pro tier"]
GENERAL = ["hello there", "good morning", "hi, how are you today", "thanks, that's all",
           "who are you", "nice to meet you"]
NEGATIVES = ["what's the weather like tomorrow", "who won the football match last night",
             "tell me a joke about cats", "what is the capital of australia",
             "recommend a good movie for tonight", "how tall is mount everest",
             "translate good night into french", "what year did the second world war end"]
# Held out: not in the config, must still land on their route.
HELD_OUT = {
    "coding": ["how can I sort a dictionary by value in python", "my C++ code does not compile, missing semicolon"],
    "billing": ["I see an unexpected charge on my bank statement from you", "please send me a refund for the double payment"],
}
LASAGNA = "what is a good recipe for vegetable lasagna with béchamel"


def router_config(mock_a: MockLLM, mock_b: MockLLM, **overrides: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "routes": [
            {"name": "coding", "utterances": CODING,
             "target": {"host": "127.0.0.1", "port": mock_a.port, "path": "/v1/chat/completions",
                        "model": "gpt-4o", "api_key": CODING_KEY,
                        "headers": {"X-Target": "coding"}}},
            {"name": "billing", "utterances": BILLING,
             "target": {"host": "127.0.0.1", "port": mock_b.port, "path": "/v1/chat/completions",
                        "model": "gpt-4o-mini", "api_key": BILLING_KEY, "auth_header": "api-key"}},
            {"name": "general", "utterances": GENERAL,
             "target": {"host": "127.0.0.1", "port": mock_b.port, "path": "/v1/chat/completions",
                        "model": "gpt-4.1-mini"}},
        ],
        "default_route": "general",
        "negative_utterances": NEGATIVES,
        "force_route_header": "X-Force-Route",
    }
    conf.update(overrides)
    return conf


def kong_yml(mock_a: MockLLM, routes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    # The service points at a dead port: only the router's target choice can reach a mock.
    return {"_format_version": "3.0", "services": [{
        "name": "llm", "url": "http://127.0.0.1:9/unrouted",
        "routes": [{"name": name, "paths": [f"/{name}"], "strip_path": True,
                    "plugins": [{"name": "llm-semantic-router", "config": conf}]}
                   for name, conf in routes.items()]}]}


def chat(text: str, model: str = "client-model") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": text}]}


def post(gw: GatewayHandle, route: str, body: Any, **headers: str) -> Any:
    hdrs = {"Authorization": CLIENT_AUTH, **headers}
    if isinstance(body, (bytes, str)):
        return gw.request("POST", f"/{route}", body=body, headers={"Content-Type": "application/json", **hdrs},
                          timeout=90)
    return gw.request("POST", f"/{route}", json=body, headers=hdrs, timeout=90)


@pytest.fixture(scope="module")
def mocks() -> Iterator[tuple[MockLLM, MockLLM]]:
    a = MockLLM("127.0.0.1", 0).start()
    b = MockLLM("127.0.0.1", 0).start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("router-cache")
    d.chmod(0o700)
    return d


def _routes(mocks: tuple[MockLLM, MockLLM], cache_dir: Path) -> dict[str, dict[str, Any]]:
    a, b = mocks
    return {
        "main": router_config(a, b, cache_dir=str(cache_dir)),
        "small-bodies": router_config(a, b, max_body_bytes=4096),
        "reject": router_config(a, b, default_route="reject"),
        "mismatch-error": router_config(a, b, calibrated_for_model="text-embedding-3-small",
                                        thresholds={"min_confidence": 0.5}),
        "mismatch-warn": router_config(a, b, calibrated_for_model="text-embedding-3-small",
                                       thresholds={"min_confidence": 0.5}, on_model_mismatch="warn"),
        "calibrated-ok": router_config(a, b, calibrated_for_model=LOCAL_MODEL_ID,
                                       thresholds={"min_confidence": 2.5}),
        # A key read from a file keeps its final newline (VAULT_KEY_WITH_NEWLINE).
        "vault-newline": router_config(a, b, routes=[{**router_config(a, b)["routes"][0], "target": {
            **router_config(a, b)["routes"][0]["target"], "api_key": "{vault://env/router-test-key}"}}],
            default_route="coding"),
        # A target naming a Kong upstream that does not exist (a typo): every request is routed there.
        "missing-upstream": router_config(a, b, routes=[{**router_config(a, b)["routes"][0], "target": {
            "upstream": "no-such-upstream", "model": "gpt-4o", "api_key": CODING_KEY}}], default_route="coding"),
        # An embeddings endpoint nobody listens on: the embedder is down.
        "embedder-down": router_config(a, b, embeddings={
            "provider": "openai", "model": "text-embedding-3-small",
            "url": "http://127.0.0.1:9/v1/embeddings", "timeout_ms": 500}),
    }


def _start(server: str, mocks: tuple[MockLLM, MockLLM], cache_dir: Path) -> GatewayHandle:
    kwargs: dict[str, Any] = {"server": server, "pythonpath": str(REPO),
                              "extra_env": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                            "TOKENIZERS_PARALLELISM": "false"}}
    if server == "stock":
        kwargs["plugin_files"] = [PLUGIN_FILE]
    return start_gateway(kong_yml(mocks[0], _routes(mocks, cache_dir)), **kwargs,
                         environ={**os.environ, "ROUTER_TEST_KEY": VAULT_KEY_WITH_NEWLINE})


@pytest.fixture(scope="module", params=["aigov", "stock"])
def gateway(request: pytest.FixtureRequest, mocks: tuple[MockLLM, MockLLM], cache_dir: Path) -> Iterator[GatewayHandle]:
    gw = _start(request.param, mocks, cache_dir)
    try:
        warm(gw, "main")
        yield gw
    finally:
        gw.close()


def warm(gw: GatewayHandle, route: str, timeout_s: float = 180.0) -> None:
    """Wait out the cold start (model load + route training): until then requests take the
    default route with reason error, by design."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = post(gw, route, chat(HELD_OUT["coding"][0]))
        if r.header("X-Semantic-Route-Reason") not in (None, "error"):
            return
        time.sleep(0.5)
    raise AssertionError(f"router on /{route} not ready after {timeout_s}s")


def _reached(mock: MockLLM, request_id: str | None, wait_s: float = 2.0) -> dict[str, Any] | None:
    """The mock's record of this request (it records just after answering: poll briefly)."""
    deadline = time.monotonic() + wait_s
    while True:
        for entry in mock.stats.snapshot()["recent"]:
            if entry["request_id"] == request_id:
                return entry
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def test_coding_billing_and_lasagna_to_default(gateway: GatewayHandle, mocks: tuple[MockLLM, MockLLM]) -> None:
    a, b = mocks
    r = post(gateway, "main", chat(HELD_OUT["coding"][0]))
    assert r.status == 200, r.body
    assert (r.header("X-Semantic-Route"), r.header("X-Semantic-Route-Reason")) == ("coding", "matched")
    assert float(r.header("X-Semantic-Route-Score")) > 0
    assert r.header("X-Mock-Model") == "gpt-4o"
    assert _reached(a, r.header("X-Mock-Request-Id")) is not None  # mock A (coding's port)
    assert r.json()["model"] == "gpt-4o"

    r = post(gateway, "main", chat(HELD_OUT["billing"][0]))
    assert r.status == 200, r.body
    assert (r.header("X-Semantic-Route"), r.header("X-Semantic-Route-Reason")) == ("billing", "matched")
    assert r.header("X-Mock-Model") == "gpt-4o-mini"
    assert _reached(b, r.header("X-Mock-Request-Id")) is not None
    assert _reached(a, r.header("X-Mock-Request-Id"), wait_s=0.2) is None

    r = post(gateway, "main", chat(LASAGNA))
    assert r.status == 200, r.body
    assert r.header("X-Semantic-Route") == "general"
    assert r.header("X-Semantic-Route-Reason") == "default"
    assert r.header("X-Mock-Model") == "gpt-4.1-mini"
    assert _reached(b, r.header("X-Mock-Request-Id")) is not None


@pytest.mark.parametrize("route", ["coding", "billing"])
def test_held_out_utterances_land_on_their_route(gateway: GatewayHandle, mocks: tuple[MockLLM, MockLLM],
                                                 route: str) -> None:
    a, b = mocks
    want_mock, want_model = (a, "gpt-4o") if route == "coding" else (b, "gpt-4o-mini")
    for text in HELD_OUT[route]:
        r = post(gateway, "main", chat(text))
        assert r.status == 200, r.body
        assert r.header("X-Semantic-Route") == route, (text, r.header("X-Semantic-Route-Score"))
        assert r.header("X-Semantic-Route-Reason") == "matched"
        entry = _reached(want_mock, r.header("X-Mock-Request-Id"))
        assert entry is not None and entry["model"] == want_model


def test_each_target_gets_only_its_own_key(gateway: GatewayHandle) -> None:
    r = post(gateway, "main", chat(HELD_OUT["coding"][1]))
    assert r.header("X-Semantic-Route") == "coding"
    # Authorization carries coding's key, not the client's credential.
    assert r.header("X-Mock-Auth-Header") == "authorization"
    assert r.header("X-Mock-Auth-Sha256") == auth_fingerprint(f"Bearer {CODING_KEY}")

    r = post(gateway, "main", chat(HELD_OUT["billing"][1]))
    assert r.header("X-Semantic-Route") == "billing"
    # The mock reports Authorization first if present: api-key here proves the client's
    # Authorization was removed and coding's key is nowhere.
    assert r.header("X-Mock-Auth-Header") == "api-key"
    assert r.header("X-Mock-Auth-Sha256") == auth_fingerprint(BILLING_KEY)

    r = post(gateway, "main", chat(LASAGNA), **{"api-key": "client-sent-api-key"})
    assert r.header("X-Semantic-Route") == "general"
    assert r.header("X-Mock-Auth-Header") == "none"  # general has no key; client keys stripped
    # A Kong key-auth key (without hide_credentials) never reaches the routed provider either.
    r = post(gateway, "main", chat(LASAGNA), apikey="client-kong-key", **{"x-api-key": "client-x-key"})
    assert r.header("X-Semantic-Route") == "general"
    assert r.header("X-Mock-Auth-Header") == "none"


def test_no_provider_key_reaches_the_log_entry(gateway: GatewayHandle) -> None:
    # Kong's log serializer reads the request's headers after the router changed them and masks
    # only Authorization: the router masks the other key headers it sets (api-key here).
    gateway.finished_request(None)  # start keeping finished requests
    logged = {}
    for route, text in (("billing", HELD_OUT["billing"][1]), ("coding", HELD_OUT["coding"][1])):
        r = post(gateway, "main", chat(text))
        assert r.header("X-Semantic-Route") == route
        ctx = gateway.finished_request(r.header("X-Kong-Request-Id"))
        logged[route] = json.dumps(ctx.saved["serialize"])
        headers = ctx.saved["serialize"]["request"]["headers"]
        if route == "billing":
            assert headers["api-key"] == "REDACTED" and "authorization" not in headers
        else:  # coding: its key, and the value of its extra X-Target header, masked too
            assert headers["authorization"] == "REDACTED" and headers["x-target"] == "REDACTED"
    for key in (BILLING_KEY, CODING_KEY, CLIENT_AUTH.split()[-1]):
        assert all(key not in entry for entry in logged.values()), key


def test_a_body_over_max_body_bytes_is_refused_when_its_model_could_not_be_enforced(gateway: GatewayHandle) -> None:
    # Bodies larger than max_body_bytes are not parsed. The default route (general) sets a
    # model, which an unread body would escape (the client's own model on general's key): 413,
    # never the misleading 400 "cannot read exactly".
    big = chat(HELD_OUT["coding"][0] + " " + "and more detail " * 600, model="o1-pro")
    r = post(gateway, "small-bodies", big)
    assert r.status == 413 and r.json()["error"]["code"] == "request_too_large", r.body
    small = post(gateway, "small-bodies", chat(HELD_OUT["coding"][0]))
    assert (small.header("X-Semantic-Route"), small.header("X-Semantic-Route-Reason")) == ("coding", "matched")


def test_a_vault_value_with_a_line_break_is_a_clear_config_error(gateway: GatewayHandle) -> None:
    # The schema sees only the reference; the value Kong's env vault resolves it to ends in a
    # newline, which no header can carry. A JSON 500 names the field, never the value.
    r = post(gateway, "vault-newline", chat("how do I reverse a list in python"))
    assert r.status == 500, (r.status, r.body[:300])
    err = json.loads(r.body)["error"]
    assert err["code"] == "config_error" and "target.api_key contains a control character" in err["message"]
    assert "sk-from-a-mounted-file" not in r.body.decode(errors="replace")


def test_reject_default_gives_clear_4xx(gateway: GatewayHandle) -> None:
    r = post(gateway, "reject", chat(LASAGNA))
    assert r.status == 400
    assert r.json()["error"]["code"] == "no_route"
    assert r.header("X-Semantic-Route") == "reject"
    assert r.header("X-Semantic-Route-Reason") == "default"
    r = post(gateway, "reject", chat(HELD_OUT["coding"][0]))
    assert r.status == 200 and r.header("X-Semantic-Route") == "coding"


def test_model_mismatch_error_and_warn(gateway: GatewayHandle) -> None:
    r = post(gateway, "mismatch-error", chat(HELD_OUT["coding"][0]))
    assert r.status == 500
    msg = r.json()["error"]["message"]
    assert "text-embedding-3-small" in msg and LOCAL_MODEL_ID in msg and "recalibrate" in msg
    # warn: still routes, with the self-calibrated threshold instead of the foreign one.
    r = post(gateway, "mismatch-warn", chat(HELD_OUT["coding"][0]))
    assert r.status == 200 and r.header("X-Semantic-Route") == "coding"
    # Matching model id: the configured threshold is used (2.5 is above any confidence).
    r = post(gateway, "calibrated-ok", chat(HELD_OUT["coding"][0]))
    assert r.status == 200
    assert (r.header("X-Semantic-Route"), r.header("X-Semantic-Route-Reason")) == ("general", "default")


def test_embedder_failure_takes_default_route(gateway: GatewayHandle) -> None:
    r = post(gateway, "embedder-down", chat(HELD_OUT["coding"][0]))
    assert r.status == 200, r.body
    assert r.header("X-Semantic-Route") == "general"
    assert r.header("X-Semantic-Route-Reason") == "error"
    assert r.header("X-Mock-Model") == "gpt-4.1-mini"


def test_a_target_upstream_kong_does_not_know_is_a_clear_500_never_the_services_host(
        gateway: GatewayHandle, mocks: tuple[MockLLM, MockLLM]) -> None:
    """kong.service.set_upstream answers nil for an unknown name: sent on, the request would go
    to the service's own host with this target's key and a route header it did not take."""
    r = post(gateway, "missing-upstream", chat(HELD_OUT["coding"][0]))
    assert r.status == 500, r.body
    error = r.json()["error"]
    assert error["code"] == "upstream_not_found" and "'no-such-upstream'" in error["message"]
    assert r.header("X-Semantic-Route") is None
    assert all(_reached(m, r.header("X-Kong-Request-Id"), wait_s=0.2) is None for m in mocks)


def test_a_body_without_messages_asking_for_another_model_than_the_default_targets_is_refused(
        gateway: GatewayHandle, mocks: tuple[MockLLM, MockLLM]) -> None:
    """Not a chat request, so not rewritten: sent on, an embeddings call would reach the client's
    model with the default target's key. The default target's own model, or none, passes."""
    r = post(gateway, "main", {"model": "text-embedding-3-large", "input": ["hello"]})
    assert r.status == 400 and r.json()["error"]["code"] == "model_not_routed", r.body
    assert all(_reached(m, r.header("X-Kong-Request-Id"), wait_s=0.2) is None for m in mocks)
    # Bytes after the JSON object: a Go provider still serves the object's model (a breaker's
    # finding: it went to the default target with that target's key).
    for raw in (b'{"model": "gpt-4o", "input": "hi"} x', b'{"model": "gpt-4o", "input": "hi"}\n{"a": 1}',
                b'{"model": "gpt-4o", "input": "hi", "temperature": NaN}'):
        r = post(gateway, "main", raw)
        assert r.status == 400 and r.json()["error"]["code"] == "model_not_routed", (raw, r.status, r.body[:200])
        assert all(_reached(m, r.header("X-Kong-Request-Id"), wait_s=0.2) is None for m in mocks)
    # The default target's model, however the client cases or pads it (providers read model
    # names case-insensitively), is the model the route sends anyway: passed on.
    for model in ("gpt-4.1-mini", "GPT-4.1-Mini", " gpt-4.1-mini "):
        r = post(gateway, "main", {"model": model, "input": ["hello"]})
        assert r.header("X-Semantic-Route") == "general" and r.header("X-Semantic-Route-Reason") == "default"
        assert r.status != 400 or r.json().get("error", {}).get("code") != "model_not_routed", (model, r.body)


def test_forced_route_and_malformed_body(gateway: GatewayHandle) -> None:
    r = post(gateway, "main", chat(LASAGNA), **{"X-Force-Route": "billing"})
    assert (r.header("X-Semantic-Route"), r.header("X-Semantic-Route-Reason")) == ("billing", "forced")
    assert r.header("X-Mock-Model") == "gpt-4o-mini"
    # Unknown forced name: decided normally.
    r = post(gateway, "main", chat(HELD_OUT["coding"][0]), **{"X-Force-Route": "nope"})
    assert r.header("X-Semantic-Route") == "coding"
    # Not JSON: default route, body untouched (the mock answers 400 to it), never a 500.
    r = post(gateway, "main", b"{not json")
    assert r.header("X-Semantic-Route") == "general"
    assert r.header("X-Semantic-Route-Reason") == "default"
    assert r.status == 400
    # A chat request only a lenient reader understands ("Messages", trailing bytes) or with a
    # wrongly typed field: refused by the router itself, never sent on with the client's model.
    for raw in (json.dumps({"model": "gpt-4o", "Messages": chat(LASAGNA)["messages"]}).encode(),
                json.dumps(chat(LASAGNA, model="gpt-4o")).encode() + b" trailing",
                json.dumps({**chat(LASAGNA), "messages": "hi"}).encode()):
        r = post(gateway, "main", raw)
        assert r.status == 400 and r.header("X-Mock-Model") is None, (raw[:40], r.status)
        assert r.json()["error"]["code"] == "invalid_request"


def test_restart_keeps_decisions(gateway: GatewayHandle, cache_dir: Path) -> None:
    prompts = [HELD_OUT["coding"][0], HELD_OUT["billing"][0], LASAGNA, "is my invoice wrong?",
               "how do I center a div with css"]
    before = [(r.header("X-Semantic-Route"), r.header("X-Semantic-Route-Score"))
              for r in (post(gateway, "main", chat(p)) for p in prompts)]
    assert list(cache_dir.glob("router-*.npz")), "the trained model was not stored in cache_dir"
    managed = next(iter(gateway.gateway.managed.values()))
    old_pid = managed.pid
    managed.kill(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (managed.pid == old_pid or not os.path.exists(managed.entry.socket)):
        time.sleep(0.1)
    assert managed.pid != old_pid, "plugin server was not respawned"
    after = []
    for p in prompts:
        for _ in range(50):  # the socket may not accept yet right after respawn
            r = post(gateway, "main", chat(p))
            if r.header("X-Semantic-Route"):
                break
            time.sleep(0.2)
        after.append((r.header("X-Semantic-Route"), r.header("X-Semantic-Route-Score")))
    assert after == before


def test_lone_surrogate_and_null_stream_are_routed(gateway: GatewayHandle, mocks: tuple[MockLLM, MockLLM]) -> None:
    a, _ = mocks
    # JSON's escape \ud800 decodes to a lone surrogate, which UTF-8 cannot carry: the rewritten
    # body must still go out (ASCII-escaped), with the route's model and key, never the client's.
    raw = ('{"model": "client-model", "messages": [{"role": "user", "content": "'
           + HELD_OUT["coding"][0] + ' \\ud800"}]}')
    r = post(gateway, "main", raw)
    assert r.status == 200, r.body
    assert (r.header("X-Semantic-Route"), r.header("X-Semantic-Route-Reason")) == ("coding", "matched")
    assert r.header("X-Mock-Model") == "gpt-4o"
    assert r.header("X-Mock-Auth-Sha256") == auth_fingerprint(f"Bearer {CODING_KEY}")
    entry = _reached(a, r.header("X-Mock-Request-Id"))
    assert entry is not None and entry["model"] == "gpt-4o"
    # OpenAI takes `"stream": null` as "not given": it is a chat request like any other.
    r = post(gateway, "main", {**chat(HELD_OUT["coding"][1]), "stream": None})
    assert r.status == 200, r.body
    assert r.header("X-Semantic-Route") == "coding"
    assert r.header("X-Mock-Model") == "gpt-4o"


def test_a_quota_keyed_on_the_clients_authorization_keeps_callers_apart_behind_the_router(
        mocks: tuple[MockLLM, MockLLM], cache_dir: Path) -> None:
    # The router (907) swaps the client's Authorization for the target's key before the quota
    # (906) runs; a quota that identifies callers by that header must still see the client's.
    quota = {"name": "llm-token-quota", "config": {
        "policy": "memory", "identifier_sources": ["header"], "identifier_header": "Authorization",
        "limits": [{"window": "day", "tokens": 1000}]}}
    yml = {"_format_version": "3.0", "services": [{
        "name": "llm", "url": "http://127.0.0.1:9/unrouted",
        "routes": [{"name": "main", "paths": ["/main"], "strip_path": True,
                    "plugins": [{"name": "llm-semantic-router", "config": router_config(*mocks, cache_dir=str(cache_dir))},
                                quota]}]}]}
    gw = start_gateway(yml, server="aigov", pythonpath=str(REPO),
                       extra_env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    try:
        def ask(user: str) -> Any:
            r = post(gw, "main", chat(HELD_OUT["coding"][0]), Authorization=f"Bearer key-of-{user}",
                     **{"X-Mock-Usage": "total=30"})
            assert r.status == 200 and r.header("X-Semantic-Route") == "coding", r.body
            assert r.header("X-Mock-Auth-Sha256") == auth_fingerprint(f"Bearer {CODING_KEY}")  # target's key upstream
            gw.wait_logs()
            return int(r.header("X-AI-RateLimit-Remaining-Day"))

        assert [ask("alice"), ask("alice"), ask("bob")] == [970, 940, 970]
    finally:
        gw.close()
