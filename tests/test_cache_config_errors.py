"""llm-semantic-cache configs the schema used to accept and that then failed every request with
Kong's opaque 500 (`{"message":"An unexpected error occurred"}`, the reason only in the plugin
server's traceback). Each is now either rejected when the gateway loads the config, naming the
field, or answered on every request with a JSON 500 naming the field and logged through
kong.log.err, as the quota and router do:

- `vectordb.namespace` outside A-Z a-z 0-9 _ - ("*", "a:x:b", "a b{c}"): the schema's `match`
  pattern rejects it at load (start and reload);
- `admin_path` without `admin_key`: no schema can say so for a Python plugin (no entity_checks on
  the `config` record), so every request gets the JSON 500;
- `embeddings.provider: openai` without `url` (or `model`): the `embeddings` record's entity
  checks reject it at load, in real Kong and in the stand-in (which runs a nested record's
  `conditional` checks as Kong's Schema:validate does); the handler would still answer the JSON
  500 to a Kong that let it through;
- `admin_key` or `embeddings.api_key` given as a vault reference whose value holds a control
  character (a key file's final newline): Kong validates the reference, not its value, so every
  request gets the JSON 500, which names the field and never the value. A literal one is refused
  at load (`not_match`).

Real gateways (the Kong stand-in and both plugin servers: `aigov serve` and kong-pdk's stock
server); only the upstream is the mock LLM. No request here embeds anything (the model never
loads): the control route is asked with `Cache-Control: no-store`.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from aigov.cache.core import CacheConfigError, CacheSettings
from aigov.plugins.semantic_cache.handler import SemanticCacheHandler
from aigov.plugins.semantic_cache.schema import SCHEMA
from kongsim import metaschema
from kongsim.pytest_plugin import GatewayHandle, start_gateway
from kongsim.runloop import LoadError

REPO = Path(__file__).resolve().parent.parent
PLUGIN_FILE = REPO / "plugins" / "llm-semantic-cache.py"
OPAQUE = {"message": "An unexpected error occurred"}
BAD_NAMESPACES = ["*", "a:x:b", "a b{c}"]

# route name -> (cache config, a text the error must contain)
RUNTIME_ERRORS: dict[str, tuple[dict[str, Any], str]] = {
    "admin-nokey": ({"admin_path": "/admin-nokey/purge"}, "admin_path needs admin_key"),
    "admin-key-newline": ({"admin_path": "/admin-key-newline/purge",
                           "admin_key": "{vault://env/cache-test-admin-key}"},
                          "admin_key contains a control character"),
    "embed-key-newline": ({"embeddings": {"provider": "openai", "model": "text-embedding-3-small",
                                          "url": "http://127.0.0.1:9/v1/embeddings",
                                          "api_key": "{vault://env/cache-test-embed-key}"}},
                          "embeddings.api_key contains a control character"),
}
# Refused at load by the `embeddings` record's entity checks: (cache config, the field, what the
# library says if a config ever gets past them).
ENTITY_CHECK_ERRORS: dict[str, tuple[dict[str, Any], str, str]] = {
    "openai-nourl": ({"embeddings": {"provider": "openai", "model": "text-embedding-3-small"}},
                     "config.embeddings.url", "embeddings.provider openai needs embeddings.url"),
    "openai-nomodel": ({"embeddings": {"provider": "openai", "url": "http://127.0.0.1:9/v1/embeddings"}},
                       "config.embeddings.model", "embeddings.provider openai needs embeddings.model"),
}
# What the stand-in's env vault resolves those references to (Kong's env vault reads the same).
VAULT_VALUES = {"CACHE_TEST_ADMIN_KEY": "admin-key-from-a-file\n",
                "CACHE_TEST_EMBED_KEY": "sk-embed-key-from-a-file\r\n"}


def cache_plugin(namespace: str, **conf: Any) -> dict[str, Any]:
    return {"name": "llm-semantic-cache",
            "config": {"vectordb": {"strategy": "memory", "namespace": namespace}, **conf}}


def kong_yml(upstream: str, routes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"_format_version": "3.0",
            "services": [{"name": "llm", "url": upstream, "routes": [
                {"name": name, "paths": [f"/{name}"], "strip_path": True, "plugins": [plugin]}
                for name, plugin in routes.items()]}]}


def base_routes() -> dict[str, dict[str, Any]]:
    routes = {"ok": cache_plugin("cfgerr-ok")}
    for name, (conf, _) in RUNTIME_ERRORS.items():
        routes[name] = cache_plugin(f"cfgerr-{name}", **copy.deepcopy(conf))
    return routes


def chat(text: str = "what is the capital of france") -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


def post(gw: GatewayHandle, route: str, path: str = "/v1/chat/completions", **headers: str) -> Any:
    return gw.request("POST", f"/{route}{path}", json=chat(), headers=headers)


@pytest.fixture(scope="module", params=["aigov", "stock"])
def gw(request: pytest.FixtureRequest, mock_llm: Any) -> Iterator[GatewayHandle]:
    handle = start_gateway(kong_yml(mock_llm.url, base_routes()), server=request.param,
                           plugin_files=[PLUGIN_FILE], pythonpath=str(REPO),
                           environ={**os.environ, **VAULT_VALUES})
    try:
        yield handle
    finally:
        handle.close()


def _control_answers(gw: GatewayHandle) -> None:
    r = post(gw, "ok", **{"Cache-Control": "no-store"})
    assert r.status == 200, r.body
    assert r.header("X-Cache-Status") == "Bypass"


# --------------------------------------------------------------------------- per-request errors

@pytest.mark.parametrize("route", sorted(RUNTIME_ERRORS))
def test_refused_config_answers_every_request_with_a_json_500_naming_the_field(
        gw: GatewayHandle, route: str, caplog: Any) -> None:
    needle = RUNTIME_ERRORS[route][1]
    requests = [("/v1/chat/completions", {}), ("/v1/chat/completions", {"Cache-Control": "no-store"}),
                ("/purge", {"X-Cache-Admin-Key": "guess"})]
    with caplog.at_level(logging.ERROR, logger="kongsim.pdk"):
        for path, headers in requests:
            r = post(gw, route, path, **headers)
            assert r.status == 500, r.body
            assert r.header("Content-Type") == "application/json"
            body = r.json()
            assert body != OPAQUE
            assert body["error"]["code"] == "cache_config_error"
            assert body["error"]["type"] == "server_error"
            assert needle in body["error"]["message"], body
            assert body["error"]["message"].startswith("llm-semantic-cache config error: ")
            assert not any(v.strip() in r.body.decode() for v in VAULT_VALUES.values())
    logged = [rec.getMessage() for rec in caplog.records
              if rec.levelno == logging.ERROR and "[llm-semantic-cache]" in rec.getMessage()]
    assert len(logged) == len(requests), logged   # kong.log.err once per request
    assert all(needle in line for line in logged), logged
    assert not any(v.strip() in line for v in VAULT_VALUES.values() for line in logged)
    assert gw.gateway.runloop is not None
    _control_answers(gw)   # the other routes' instances are unaffected


# --------------------------------------------------------------------------- load-time rejection

@pytest.mark.parametrize("namespace", BAD_NAMESPACES)
def test_bad_namespace_is_rejected_when_the_config_is_reloaded(gw: GatewayHandle, mock_llm: Any,
                                                                namespace: str) -> None:
    routes = base_routes()
    routes["ok"] = cache_plugin(namespace)
    with pytest.raises(LoadError) as err:
        gw.gateway.reload(kong_yml(mock_llm.url, routes))
    text = str(err.value)
    assert "plugin 'llm-semantic-cache': schema violation" in text
    assert f"config.vectordb.namespace: invalid value: {namespace}" in text
    assert OPAQUE["message"] not in text
    _control_answers(gw)   # Kong keeps the previous config when a new one is refused


@pytest.mark.parametrize("route", sorted(ENTITY_CHECK_ERRORS))
def test_an_openai_embedder_without_url_or_model_is_rejected_at_load(gw: GatewayHandle, mock_llm: Any,
                                                                     route: str) -> None:
    conf, where, _ = ENTITY_CHECK_ERRORS[route]
    routes = base_routes()
    routes[route] = cache_plugin(f"cfgerr-{route}", **copy.deepcopy(conf))
    with pytest.raises(LoadError) as err:
        gw.gateway.reload(kong_yml(mock_llm.url, routes))
    text = str(err.value)
    assert f"{where}: required field missing" in text
    assert "config.embeddings.@entity: failed conditional validation given value of field 'provider'" in text
    _control_answers(gw)   # the previous config still serves


def test_entity_checks_pass_a_complete_openai_embedder_and_the_local_one() -> None:
    for emb in ({"provider": "openai", "url": "http://127.0.0.1:9/v1/embeddings", "model": "m"},
                {"provider": "local"}, {}):
        conf = metaschema.process_config(SCHEMA, {"embeddings": emb}, "llm-semantic-cache")
        assert conf["embeddings"]["provider"] == emb.get("provider", "local")


def test_bad_namespace_is_rejected_when_the_gateway_starts(mock_llm: Any) -> None:
    cfg = kong_yml(mock_llm.url, {"ns": cache_plugin("a:x:b")})
    with pytest.raises(LoadError) as err:
        start_gateway(cfg, server="aigov", pythonpath=str(REPO)).close()
    assert "config.vectordb.namespace: invalid value: a:x:b" in str(err.value)


def test_valid_namespaces_still_load(gw: GatewayHandle, mock_llm: Any) -> None:
    routes = base_routes()
    routes["ok"] = cache_plugin("Ab9_-" + "x" * 59)   # every allowed kind of character, 64 long
    try:
        gw.gateway.reload(kong_yml(mock_llm.url, routes))
        _control_answers(gw)
    finally:
        gw.gateway.reload(kong_yml(mock_llm.url, base_routes()))


# --------------------------------------------------------------------------- schema and library agree

@pytest.mark.parametrize("namespace", BAD_NAMESPACES + ["é", "a.b", "a/b", "aigov", "A-b_9", "x" * 64, "x" * 65])
def test_schema_pattern_and_library_accept_the_same_namespaces(namespace: str) -> None:
    try:
        metaschema.process_config(SCHEMA, {"vectordb": {"namespace": namespace}}, "llm-semantic-cache")
        schema_ok = True
    except metaschema.ConfigError as exc:
        assert "config.vectordb.namespace" in str(exc)
        schema_ok = False
    try:
        CacheSettings.from_config({"vectordb": {"namespace": namespace}})
        library_ok = True
    except CacheConfigError:
        library_ok = False
    assert schema_ok == library_ok


def test_library_refuses_a_namespace_with_a_trailing_newline() -> None:
    with pytest.raises(CacheConfigError, match="vectordb.namespace"):
        CacheSettings.from_config({"vectordb": {"namespace": "aigov\n"}})


def test_embeddings_entity_checks_reach_kong_in_the_dump() -> None:
    """Real Kong enforces a nested record's entity_checks at load: they must be in the Schema."""
    (emb,) = [spec for item in SCHEMA for name, spec in item.items() if name == "embeddings"]
    checks = emb["entity_checks"]
    required_when_openai = {c["conditional"]["then_field"] for c in checks
                            if c["conditional"]["if_field"] == "provider"
                            and c["conditional"]["if_match"] == {"one_of": ["openai"]}
                            and c["conditional"]["then_match"] == {"required": True}}
    assert required_when_openai == {"url", "model"}
    fields = {name for item in emb["fields"] for name in item}
    assert required_when_openai <= fields
    json.dumps(SCHEMA)  # JSON-expressible, as query_cmd sends it


@pytest.mark.parametrize("field,conf", [
    ("admin_key", {"admin_path": "/purge", "admin_key": "k\n"}),
    ("embeddings.api_key", {"embeddings": {"provider": "openai", "model": "m", "url": "http://x/e",
                                           "api_key": "sk\x00"}}),
])
def test_a_literal_header_secret_with_a_control_character_is_refused_at_load(field: str, conf: dict) -> None:
    # Kong's not_match message is "invalid value: <value>"; the field's `err` keeps the secret out.
    with pytest.raises(metaschema.ConfigError, match=f"config.{field}: must be non-empty, without control characters") as err:
        metaschema.process_config(SCHEMA, conf, "llm-semantic-cache")
    assert "invalid value" not in str(err.value) and "sk\x00" not in str(err.value) and "k\n" not in str(err.value)


@pytest.mark.parametrize("conf,needle", [(c, n) for c, n in RUNTIME_ERRORS.values() if "vault://" not in json.dumps(c)]
                         + [(c, n) for c, _, n in ENTITY_CHECK_ERRORS.values()]
                         + [({"vectordb": {"namespace": "a b"}}, "vectordb.namespace"),
                            ({"admin_path": "/p", "admin_key": "k\n"}, "admin_key contains a control character")])
def test_handler_instance_starts_on_a_refused_config(conf: dict[str, Any], needle: str) -> None:
    """StartInstance must not fail (Kong would answer the opaque 500): the error is kept."""
    handler = SemanticCacheHandler(copy.deepcopy(conf))
    assert handler.config_error and handler.config_error.startswith("llm-semantic-cache config error: ")
    assert needle in handler.config_error
