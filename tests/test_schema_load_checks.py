"""Configs Kong refuses at load (Admin API / declarative config), checked with the stand-in's
schema engine (kongsim.metaschema, Kong's Schema rules): a new user and a breaker found these
accepted, after which every request answered 500 or the setting silently did nothing."""
from __future__ import annotations

from typing import Any

import pytest

from aigov.cache.core import CacheConfigError, CacheSettings
from aigov.plugins.semantic_cache.schema import SCHEMA as CACHE_SCHEMA
from aigov.plugins.semantic_router.schema import SCHEMA as ROUTER_SCHEMA
from aigov.plugins.token_quota.schema import SCHEMA as QUOTA_SCHEMA
from kongsim import metaschema

SCHEMAS = {"llm-token-quota": QUOTA_SCHEMA, "llm-semantic-cache": CACHE_SCHEMA,
           "llm-semantic-router": ROUTER_SCHEMA}


def router_conf(**target: Any) -> dict[str, Any]:
    return {"default_route": "a", "routes": [{"name": "a", "utterances": ["hello there"],
                                              "target": {"model": "gpt-4o-mini", **target}}]}


REFUSED = [
    ("llm-token-quota", {"limits": [{"window": "hour"}]},
     "config.limits[1].@entity: at least one of these fields must be non-empty: 'tokens', 'cost_usd'"),
    # Bounded so that no counter can overflow Redis's 64-bit integers.
    ("llm-token-quota", {"limits": [{"window": "day", "tokens": 10**19}]},
     "config.limits[1].tokens: value should be between 1 and 1000000000000000000"),
    ("llm-token-quota", {"limits": [{"window": "day", "cost_usd": 1e10}]},
     "config.limits[1].cost_usd: value should be between 0 and 1000000000"),
    ("llm-semantic-cache", {"store_finish_reasons": ["lenght"]},
     "config.store_finish_reasons[1]: expected one of: stop, length"),
    ("llm-semantic-cache", {"store_finish_reasons": []}, "config.store_finish_reasons: length must be at least 1"),
    ("llm-semantic-cache", {"vectordb": {"strategy": "redis", "redis": {"database": -3}}},
     "config.vectordb.redis.database: value should be between 0"),
    ("llm-semantic-cache", {"admin_path": "/llm/purge", "admin_key": ""}, "config.admin_key: must be non-empty"),
    ("llm-semantic-router", router_conf(host="127.0.0.1\r\nX-Evil: SECRETVAL"),
     "config.routes[1].target.host: must be a host name or IP address"),
    ("llm-semantic-router", router_conf(host="api.example.com/v1"), "config.routes[1].target.host: must be a host"),
    ("llm-semantic-router", router_conf(host="api.example.com", path="/v1\r\nX-Evil: 1"),
     "config.routes[1].target.path: must start with / and have no query, fragment or control characters"),
    ("llm-semantic-router", router_conf(host="api.example.com", path="/v1/chat/completions?api-version=1"),
     "config.routes[1].target.path: must start with /"),
    ("llm-semantic-router", router_conf(host="127.0.0.1:8080"), "config.routes[1].target.host: must be a host"),
    ("llm-semantic-router", router_conf(host="user@api.example.com"), "config.routes[1].target.host: must be a host"),
    # The name is sent as the X-Semantic-Route header: a line break would split it into another header.
    ("llm-semantic-router", {"default_route": "a\r\nX-Injected: yes", "routes": [
        {"name": "a\r\nX-Injected: yes", "utterances": ["hello there"], "target": {"model": "gpt-4o-mini"}}]},
     "config.routes[1].name: must be non-empty, without control characters"),
]


@pytest.mark.parametrize("plugin,conf,message", REFUSED)
def test_refused_at_load_with_a_message_naming_the_field(plugin: str, conf: dict[str, Any], message: str) -> None:
    with pytest.raises(metaschema.ConfigError) as err:
        metaschema.process_config(SCHEMAS[plugin], conf, plugin)
    assert message in str(err.value)
    assert "SECRETVAL" not in str(err.value)


@pytest.mark.parametrize("plugin,conf", [
    ("llm-token-quota", {"limits": [{"window": "hour", "tokens": 5}, {"window": "day", "cost_usd": 1}]}),
    ("llm-token-quota", {"limits": []}),  # metering only: priced and logged, never blocked
    ("llm-token-quota", {"limits": [{"window": "month", "tokens": 10**18, "cost_usd": 10**9}]}),
    ("llm-semantic-cache", {"store_finish_reasons": ["stop", "length"]}),
    ("llm-semantic-cache", {"vectordb": {"strategy": "redis", "redis": {"database": 3}}}),
    ("llm-semantic-router", router_conf(host="[::1]", port=8080, path="/v1/chat/completions")),
    ("llm-semantic-router", router_conf(host="my_llm-host.internal", path="/v1/deployments/a b")),
    ("llm-semantic-router", router_conf(host="api.openai.com", scheme="https")),
    ("llm-semantic-router", {"default_route": "général", "routes": [
        {"name": "général", "utterances": ["bonjour"], "target": {"model": "gpt-4o-mini"}}]}),
])
def test_the_valid_neighbours_still_load(plugin: str, conf: dict[str, Any]) -> None:
    metaschema.process_config(SCHEMAS[plugin], conf, plugin)


@pytest.mark.parametrize("reasons", [["lenght"], []])
def test_the_cache_library_refuses_finish_reasons_that_store_nothing(reasons: list[str]) -> None:
    # The library is also used without Kong's schema in front of it (aigov eval, the demo).
    with pytest.raises(CacheConfigError, match="store_finish_reasons must name some of stop"):
        CacheSettings.from_config({"store_finish_reasons": reasons})
