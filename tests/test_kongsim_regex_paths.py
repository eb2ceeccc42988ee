"""Regex route paths (and `~*` header values) are compiled at load, as Kong's Rust regex reads
them (kongsim.rust_regex): what Python's re spells differently is translated, what Kong refuses
or the stand-in cannot evaluate is a DeclarativeError at load, never a 500 per request."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "kongsim"))
from helpers import Upstream, running_upstream  # noqa: E402

from kongsim import declarative  # noqa: E402
from kongsim.pdk import Headers  # noqa: E402
from kongsim.pytest_plugin import make_prefix, start_gateway  # noqa: E402

pytestmark = pytest.mark.timeout(120)

upstream = pytest.fixture()(running_upstream)


def load(*paths: str, url: str = "http://127.0.0.1:9/base", **route: Any) -> declarative.DeclarativeConfig:
    return declarative.load({"_format_version": "3.0", "services": [
        {"name": "svc", "url": url, "routes": [{"name": "r", "paths": list(paths), **route}]}]})


def matched(cfg: declarative.DeclarativeConfig, path: str) -> str | None:
    found = cfg.match_route("GET", path, None)
    return found[1] if found else None


def test_kongs_documented_named_capture_routes_and_proxies(upstream: Upstream) -> None:
    # Kong's docs: paths: ["~/re/(?<id>\\d+)$"]. Python's re has only (?P<name>...): every
    # request was a 500 before.
    gw = start_gateway({"_format_version": "3.0", "services": [
        {"name": "svc", "url": upstream.url + "/base",
         "routes": [{"name": "r", "paths": [r"~/re/(?<id>\d+)$"]}]}]}, server=[], prefix=make_prefix())
    try:
        assert gw.request("GET", "/re/42").status == 200
        assert upstream.requests[-1]["path"] == "/base"
        assert gw.request("GET", "/re/42x").status == 404
    finally:
        gw.close()


@pytest.mark.parametrize("path, hit, miss", [
    (r"~/re/(?<id>\d+)$", "/re/7", "/re/7/x"),
    (r"~/a\z", "/a", "/ab"),  # Rust's \z: end of text
    (r"~/re/\d+$", "/re/12", "/re/12%0A"),  # Rust's $ is not Python's (a final \n)
    (r"~/x(?i:ab)y", "/xABy", "/XABy"),  # a scoped flag group
    (r"~/[[:digit:]]+$", "/123", "/12a"),  # ASCII classes
    (r"~/\x{41}", "/A", "/B"),
    (r"~/caf\u00e9$", "/caf%C3%A9", "/caf%E9"),  # the ATC router matches UTF-8 text
    (r"~/ch.t$", "/ch%C3%A9t", "/chaat"),  # "." is one character, not one byte
])
def test_regex_paths_mean_what_they_mean_in_rust(path: str, hit: str, miss: str) -> None:
    from kongsim import uri
    cfg = load(path)
    assert matched(cfg, uri.normalize(hit)) is not None
    assert matched(cfg, uri.normalize(miss)) is None


def test_the_caret_kong_prepends_anchors_the_first_alternative_only() -> None:
    # transform.lua: "^" .. regex, so ~/a|/b is ^/a|/b and /b may match anywhere; strip_path
    # then cuts as many bytes as the match has from the start (atc.lua set_upstream_uri:
    # req_uri:sub(#request_prefix + 1)), wherever the match was
    cfg = load(r"~/a|/b")
    assert matched(cfg, "/x/b") == "/base/b"
    assert matched(cfg, "/a/c") == "/base/c"


@pytest.mark.parametrize("path, reason", [
    (r"~/re/\p{L}+", r"cannot evaluate Unicode classes such as \p{L}"),
    (r"~/re/(?i)abc", "write a scoped group instead, e.g. (?i:...)"),
    (r"~/re/(?=x)", "look-around"),
    (r"~/re/(?<!x)y", "look-around"),
    (r"~/re/(a)\1", "backreferences"),
    (r"~/re/(?P=n)", "backreferences"),
    (r"~/re/a\Z", r"\Z; \z is the end of the text"),
    (r"~/re/(?>a)", "atomic groups"),
    (r"~/re/a**", "a quantifier on a quantifier"),
    (r"~/re/a{", "counted repetition"),
    (r"~/re/[a&&b]", "set operations"),
    (r"~/re/(unclosed", "unclosed group"),
    (r"~/re/\b{start}x", r"\b{...} word-boundary"),
])
def test_regex_paths_kong_refuses_or_the_stand_in_cannot_evaluate_fail_at_load(
        path: str, reason: str) -> None:
    with pytest.raises(declarative.DeclarativeError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(f"services[0].routes[0].paths: regex '{path}'"), msg
    assert reason in msg, msg


@pytest.mark.parametrize("path, message", [
    ("~re", "should start with: / (fixed path) or ~/ (regex path)"),
    ("/a//b", "must not have empty segments"),
    ("/a%2", "invalid url-encoded value: '%2'"),
    ("~/a%zz", "invalid url-encoded value: '%zz'"),
    ("/a/../b", "non-normalized path, consider use '/b' instead"),
    ("/%61", "non-normalized path, consider use '/a' instead"),
])
def test_route_paths_are_checked_as_kongs_router_path_type(path: str, message: str) -> None:
    # kong/db/schema/typedefs.lua router_path / validate_path_with_regexes
    with pytest.raises(declarative.DeclarativeError) as err:
        load(path)
    assert message in str(err.value)


def test_header_regexes_compile_at_load_and_are_lower_cased_as_kong_does() -> None:
    doc = {"_format_version": "3.0", "services": [{"name": "s", "url": "http://127.0.0.1:9", "routes": [
        {"name": "h", "paths": ["/h"], "headers": {"x-v": [r"~*^RC(?<n>\d)$"]}}]}]}
    cfg = declarative.load(doc)
    assert cfg.match_route("GET", "/h", None, Headers([("X-V", "rc1")])) is not None
    assert cfg.match_route("GET", "/h", None, Headers([("X-V", "rc1x")])) is None
    doc["services"][0]["routes"][0]["headers"] = {"x-v": [r"~*(?=a)"]}
    with pytest.raises(declarative.DeclarativeError, match=r"routes\[0\].headers.x-v: regex"):
        declarative.load(doc)
