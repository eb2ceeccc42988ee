"""Route priority of the stand-in's router: Kong 3.x's traditional_compatible flavour
(kong/router/transform.lua get_priority and split_routes_and_services_by_path, tried by the ATC
router in (priority, uuid) order), so the order of routes in kong.yml never decides."""
from __future__ import annotations

from typing import Any

import pytest

from kongsim import declarative
from kongsim.declarative import Route
from kongsim.pdk import Headers


def load(*routes: dict[str, Any]) -> declarative.DeclarativeConfig:
    return declarative.load({"_format_version": "3.0", "services": [
        {"name": "svc", "url": "http://127.0.0.1:9", "routes": list(routes)}]})


def name(cfg: declarative.DeclarativeConfig, method: str, path: str, host: str | None = None,
         headers: Headers | None = None, port: int | None = None) -> str | None:
    extra = {k: v for k, v in (("headers", headers), ("port", port)) if v is not None}
    found = cfg.match_route(method, path, host, **extra)
    return found[0].name if found else None


def both_orders(a: dict[str, Any], b: dict[str, Any]) -> list[declarative.DeclarativeConfig]:
    return [load(a, b), load(b, a)]


def test_hosts_and_paths_beat_paths_only_whatever_the_order() -> None:
    """The reported case: `curl -H 'Host: c.local'` matched an earlier paths-only route."""
    paths_only = {"name": "any-host", "paths": ["/chat"]}
    hosted = {"name": "c-local", "paths": ["/chat"], "hosts": ["c.local"]}
    for cfg in both_orders(paths_only, hosted):
        assert name(cfg, "POST", "/chat/completions", "c.local") == "c-local"
        assert name(cfg, "POST", "/chat/completions", "c.local:8000") == "c-local"
        assert name(cfg, "POST", "/chat/completions", "other.local") == "any-host"
        assert name(cfg, "POST", "/chat/completions", None) == "any-host"


def test_more_match_categories_first() -> None:
    plain = {"name": "paths", "paths": ["/v1"]}
    with_method = {"name": "paths+methods", "paths": ["/v1"], "methods": ["POST"]}
    wildcard = {"name": "paths+wildcard", "paths": ["/v1"], "hosts": ["*.local"]}
    for cfg in both_orders(plain, with_method):
        assert name(cfg, "POST", "/v1/x") == "paths+methods"
        assert name(cfg, "GET", "/v1/x") == "paths"
    for cfg in both_orders(plain, wildcard):
        assert name(cfg, "GET", "/v1/x", "a.local") == "paths+wildcard"
        assert name(cfg, "GET", "/v1/x", "a.remote") == "paths"


def test_plain_host_before_wildcard_host() -> None:
    wildcard = {"name": "wild", "paths": ["/v1"], "hosts": ["*.local"]}
    plain = {"name": "plain", "paths": ["/v1"], "hosts": ["c.local"]}
    suffix = {"name": "suffix", "paths": ["/v1"], "hosts": ["c.*"]}
    for cfg in both_orders(wildcard, plain) + both_orders(suffix, plain):
        assert name(cfg, "GET", "/v1", "c.local") == "plain"
    for cfg in both_orders(wildcard, plain):
        assert name(cfg, "GET", "/v1", "d.local") == "wild"


def test_regex_before_prefix_then_regex_priority_then_longest_prefix() -> None:
    short = {"name": "short", "paths": ["/v1"]}
    long_ = {"name": "long", "paths": ["/v1/chat"]}
    regex = {"name": "regex", "paths": [r"~/v1/\w+$"]}
    regex_hi = {"name": "regex-hi", "paths": [r"~/v1/chat$"], "regex_priority": 5}
    for cfg in both_orders(short, long_):
        assert name(cfg, "GET", "/v1/chat/x") == "long"
        assert name(cfg, "GET", "/v1/other") == "short"
    for cfg in both_orders(long_, regex):
        assert name(cfg, "GET", "/v1/chat") == "regex"     # a regex path outranks a prefix
        assert name(cfg, "GET", "/v1/chat/x") == "long"    # the regex does not match
    for cfg in both_orders(regex, regex_hi):
        assert name(cfg, "GET", "/v1/chat") == "regex-hi"
        assert name(cfg, "GET", "/v1/models") == "regex"


def test_a_route_is_split_by_path_kind_and_length() -> None:
    """Kong's spec 08-router_spec "[overlapping prefixes]" and "[assigns different priorities
    to regex and non-regex path]": each path group of a route has its own priority."""
    for cfg in both_orders({"name": "one", "paths": ["/foo", "/foo/bar/baz"], "hosts": ["d.org"]},
                           {"name": "two", "paths": ["/foo/bar"], "hosts": ["d.org"]}):
        assert name(cfg, "GET", "/foo", "d.org") == "one"
        assert name(cfg, "GET", "/foo/bar", "d.org") == "two"
        assert name(cfg, "GET", "/foo/bar/baz", "d.org") == "one"
    for cfg in both_orders({"name": "one", "paths": ["~/some/thing/else", "/foo"], "hosts": ["d.org"]},
                           {"name": "two", "paths": ["/foo/bar"], "hosts": ["d.org"]}):
        assert name(cfg, "GET", "/some/thing/else", "d.org") == "one"
        assert name(cfg, "GET", "/foo/bar", "d.org") == "two"


def test_equal_priorities_go_to_the_larger_route_id() -> None:
    """atc-router's matchers are a BTreeMap keyed by (priority, uuid), tried in reverse."""
    low = {"name": "low", "id": "e8fb37f1-102d-461e-9c51-6608a6bb8101", "paths": ["/same"]}
    high = {"name": "high", "id": "e8fb37f1-102d-461e-9c51-6608a6bb8102", "paths": ["/same"]}
    for cfg in both_orders(low, high):
        assert name(cfg, "GET", "/same") == "high"


def test_headers_are_a_match_category() -> None:
    plain = {"name": "paths", "paths": ["/v1"]}
    beta = {"name": "beta", "paths": ["/v1"], "headers": {"x-version": ["Beta", "~*^rc\\d"]}}
    for cfg in both_orders(plain, beta):
        assert name(cfg, "GET", "/v1", headers=Headers([("X-Version", "beta")])) == "beta"
        assert name(cfg, "GET", "/v1", headers=Headers([("x-version", "RC2")])) == "beta"
        assert name(cfg, "GET", "/v1", headers=Headers([("X-Version", "stable")])) == "paths"
        assert name(cfg, "GET", "/v1", headers=Headers()) == "paths"
    with pytest.raises(declarative.DeclarativeError, match="'host' header"):
        load({"name": "bad", "paths": ["/"], "headers": {"Host": ["x"]}})


def test_host_with_port_needs_that_port() -> None:
    """transform.lua: a `host:port` entry is (http.host == host && net.dst.port == port)."""
    cfg = load({"name": "port", "paths": ["/"], "hosts": ["c.local:8443", "*.wild:81"]})
    assert name(cfg, "GET", "/", "c.local:8443") == "port"
    assert name(cfg, "GET", "/", "c.local", port=8443) == "port"  # $server_port
    assert name(cfg, "GET", "/", "a.wild:81") == "port"
    assert name(cfg, "GET", "/", "c.local:8000") is None
    assert name(cfg, "GET", "/", "c.local") is None


def route(**kw: Any) -> Route:
    return Route("00000000-0000-4000-8000-000000000001", None, None, kw.get("paths", []),
                 kw.get("methods", []), kw.get("hosts", []),
                 regex_priority=kw.get("regex_priority", 0), headers=kw.get("headers", {}))


@pytest.mark.parametrize("kw, luajit", [
    # get_priority from kong/router/transform.lua run by luajit 2.1 (x86-64) on these routes
    ({"paths": ["/x"]}, 536870914),
    ({"hosts": ["c.local"], "paths": ["/x"]}, 1152921505680588802),
    ({"hosts": ["*.local"], "methods": ["GET"], "paths": ["/x"]}, 1610612738),
    ({"paths": ["~/x"], "regex_priority": 3}, 2251800352129024),
    ({"methods": ["GET"], "paths": ["/x"]}, 1073741826),
    ({"methods": ["GET"], "hosts": ["c.local"], "paths": ["/x"], "headers": {"a": ["b"]}},
     10376293541462671362),
    ({"paths": ["~/x"], "regex_priority": -1}, 9225623837205331968),
    ({"hosts": ["a.b"], "headers": {"a": ["1"], "b": ["2"]}}, 1152921505682685952),
])
def test_priority_is_what_kong_computes(kw: dict[str, Any], luajit: int) -> None:
    from kongsim.declarative import _kong_priority
    r = route(**kw)
    assert _kong_priority(r, r.paths) == luajit


def test_luajit_32_bit_shifts_put_plain_hosts_and_regex_paths_above_match_weight() -> None:
    """transform.lua's lshift_uint64 shifts Lua numbers (32-bit, count mod 32): only the
    plain-host (bit 60) and regex (bit 51) flags keep their 64-bit places, so on real Kong
    they outrank a route matching on more categories."""
    for cfg in both_orders({"name": "plain+paths", "paths": ["/v1"], "hosts": ["c.local"]},
                           {"name": "wild+methods+paths", "paths": ["/v1"], "hosts": ["*.local"],
                            "methods": ["GET"]}):
        assert name(cfg, "GET", "/v1", "c.local") == "plain+paths"
    for cfg in both_orders({"name": "regex", "paths": ["~/v1"]},
                           {"name": "methods+prefix", "paths": ["/v1"], "methods": ["GET"]}):
        assert name(cfg, "GET", "/v1") == "regex"
