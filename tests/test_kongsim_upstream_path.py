"""The path the stand-in sends upstream, joined as Kong 3.9 joins it: kong/router/atc.lua
set_upstream_uri with kong/router/utils.lua sanitize_uri_postfix and get_upstream_uri_v0, then
kong/runloop/handler.lua's escape; and kong.service.request.set_path, which escapes the path a
plugin gives (kong/pdk/service/request.lua)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "kongsim"))
from helpers import Upstream, running_upstream  # noqa: E402

from kongsim import declarative  # noqa: E402
from kongsim.pdk import PDK, Headers, PdkLuaError, RequestContext, UpstreamRequest  # noqa: E402
from kongsim.pytest_plugin import make_prefix, start_gateway  # noqa: E402

pytestmark = pytest.mark.timeout(120)

upstream = pytest.fixture()(running_upstream)


def doc(url: str) -> dict:
    """Service paths /base and /base/, the routes of the tester's report."""
    return {"_format_version": "3.0", "services": [
        {"name": "base", "url": url + "/base", "routes": [
            {"name": "strip", "paths": ["/strip"]},
            {"name": "slash", "paths": ["/slash/"]},
            {"name": "re", "paths": [r"~/re/\d+"]},
            {"name": "r2", "paths": [r"~/r2/\d+/"]},
            {"name": "keep", "paths": ["/keep"], "strip_path": False},
            {"name": "any", "hosts": ["any.test"]},
        ]},
        {"name": "base-slash", "url": url + "/base/", "routes": [
            {"name": "strip2", "paths": ["/strip2"]},
            {"name": "keep2", "paths": ["/keep2"], "strip_path": False},
        ]},
        {"name": "root", "url": url, "routes": [{"name": "rooted", "paths": ["/rooted"]}]},
    ]}


# (request path as normalised, Host, what Kong sends upstream)
KONG_JOINS = [
    ("/strip/x", None, "/base/x"),
    ("/strip../secret", None, "/base/secret"),  # sanitize_uri_postfix drops the leading ../
    ("/strip./x", None, "/base/x"),  # ... and ./
    ("/strip..", None, "/base"),  # a postfix ".." is empty
    ("/stripx", None, "/base/x"),
    ("/strip", None, "/base"),
    ("/strip/", None, "/base/"),
    ("/slash/", None, "/base/"),
    ("/slash/y", None, "/base/y"),
    ("/re/12..", None, "/base"),
    ("/re/12/z", None, "/base/z"),
    ("/r2/12/", None, "/base/"),
    ("/keep/a", None, "/base/keep/a"),
    ("/strip2", None, "/base"),
    ("/strip2/", None, "/base/"),
    ("/strip2x", None, "/base/x"),
    ("/strip2/x", None, "/base/x"),
    ("/keep2/a", None, "/base/keep2/a"),
    ("/rooted", None, "/"),
    ("/rooted/a", None, "/a"),
    ("/anything", "any.test", "/base/anything"),  # no paths: the prefix is "/"
    ("/", "any.test", "/base"),
]


@pytest.mark.parametrize("path, host, expected", KONG_JOINS)
def test_router_joins_service_and_request_paths_as_get_upstream_uri_v0(
        path: str, host: str | None, expected: str) -> None:
    cfg = declarative.load(doc("http://127.0.0.1:9"))
    found = cfg.match_route("GET", path, host)
    assert found is not None
    assert found[1] == expected


@pytest.mark.parametrize("sent, expected", [
    ("/strip../secret", "/base/secret"),
    ("/strip%2e%2e/secret", "/base/secret"),  # %2e is decoded by the normalisation first
    ("/strip%2E%2E/secret", "/base/secret"),
    ("/re/12..", "/base"),
    ("/slash/", "/base/"),
    ("/strip2", "/base"),
    ("/strip2x", "/base/x"),
    ("/r2/12/", "/base/"),
    ("/strip/caf%C3%A9 x", "/base/caf%C3%A9%20x"),  # escaped again (handler.lua)
])
def test_the_upstream_receives_kongs_path(upstream: Upstream, sent: str, expected: str) -> None:
    gw = start_gateway(doc(upstream.url), server=[], prefix=make_prefix())
    try:
        reply = gw.request("GET", sent.replace(" ", "%20"))
        assert reply.status == 200, reply.body
        assert upstream.requests[-1]["path"] == expected
    finally:
        gw.close()


def _ctx() -> RequestContext:
    ctx = RequestContext(method="GET", scheme="http", host="kong.local", port=8000, path="/p",
                         query="", headers=Headers([("host", "kong.local")]), body=b"")
    ctx.upstream = UpstreamRequest("http", "127.0.0.1", 9, "/p", "", "GET", Headers(), b"")
    ctx.phase = "access"
    return ctx


@pytest.mark.parametrize("given, sent", [
    ("/v1/ünï cödé", "/v1/%C3%BCn%C3%AF%20c%C3%B6d%C3%A9"),  # the plugin's UTF-8, per byte
    ("/foo/😀", "/foo/%F0%9F%98%80"),  # the example in set_path's doc comment
    ("/a%20b/c;d=e,f", "/a%20b/c;d=e,f"),  # "%" and reserved characters stay
    ("/x\"<>`{}|\\^", "/x%22%3C%3E%60%7B%7D%7C%5C%5E"),
])
def test_set_path_escapes_like_kong(given: str, sent: str) -> None:
    pdk, ctx = PDK(), _ctx()
    pdk.call(ctx, "kong.service.request.set_path", [given])
    assert ctx.upstream is not None and ctx.upstream.path == sent
    # what ngx.var.upstream_uri then holds
    assert pdk.call(ctx, "kong.nginx.get_var", ["upstream_uri"]) == sent


def test_set_path_validation_is_kongs() -> None:
    pdk, ctx = PDK(), _ctx()
    with pytest.raises(PdkLuaError, match="path must be a string"):
        pdk.call(ctx, "kong.service.request.set_path", [3])
    with pytest.raises(PdkLuaError, match="path must start with /"):
        pdk.call(ctx, "kong.service.request.set_path", ["v1/x"])
