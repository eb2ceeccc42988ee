"""The HTTP front reads a request head as nginx (OpenResty 1.25.3 under Kong 3.9) does
(kongsim.front): malformed request lines and too long URIs get nginx's/Kong's answer instead of
a dropped connection; header names follow underscores_in_headers on (Kong's nginx_kong.lua) and
ignore_invalid_headers on; no header count limit, only nginx's header buffers; and the PDK's
kong.request.get_headers() returns at most 100 headers, as Kong's does."""
from __future__ import annotations

import http.client
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "kongsim"))
from helpers import Upstream, probe_entry, read_records, running_upstream  # noqa: E402

from kongsim import front  # noqa: E402
from kongsim.pdk import PDK, Headers, PdkLuaError, RequestContext  # noqa: E402
from kongsim.pytest_plugin import make_prefix, start_gateway  # noqa: E402

pytestmark = pytest.mark.timeout(120)

upstream = pytest.fixture()(running_upstream)


@pytest.fixture()
def gw(upstream: Upstream):
    handle = start_gateway({"_format_version": "3.0", "services": [
        {"name": "svc", "url": upstream.url, "routes": [{"name": "r", "paths": ["/"]}]}]},
        server=[], prefix=make_prefix())
    yield handle
    handle.close()


def send(gw, data: bytes) -> bytes:
    """Raw bytes to the front; everything it answers until it closes."""
    port = int(gw.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def status_of(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:200]
    return int(reply[9:12])


def body_of(reply: bytes) -> bytes:
    return reply.partition(b"\r\n\r\n")[2]


def get(target: bytes, *headers: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(h + b"\r\n" for h in headers) \
        + b"Connection: close\r\n\r\n"


# --- malformed request lines (point 5) ------------------------------------------------------

@pytest.mark.parametrize("line, status", [
    (b"GET /a b HTTP/1.1", 400),  # a space in the target (nginx >= 1.21.1)
    (b"GET /a\x01b HTTP/1.1", 400),  # a control character
    (b"GET /a\tb HTTP/1.1", 400),
    (b"get / HTTP/1.1", 400),  # methods are upper case
    (b"GET / HTTP/2.0", 505),
    (b"GET / HTTP/0.9", 400),
    (b"GET /../secret HTTP/1.1", 400),  # above the root (ngx_http_parse_complex_uri)
    (b"GET /a/%2e%2e/%2e%2e/b HTTP/1.1", 400),
    (b"GET /a%zz HTTP/1.1", 400),  # a bad escape
    (b"GET /a%00 HTTP/1.1", 400),
])
def test_malformed_request_lines_get_nginxs_answer(gw, upstream: Upstream, line: bytes,
                                                    status: int) -> None:
    reply = send(gw, line + b"\r\nHost: x\r\n\r\n")
    assert status_of(reply) == status
    if status == 400:
        # Kong's error handler; without Accept the body is error_default_type text/plain
        assert b"Content-Type: text/plain; charset=utf-8" in reply
        assert body_of(reply).startswith(b"Bad request\nrequest_id: ")
    assert upstream.requests == []
    assert gw.request("GET", "/ok").status == 200  # the front goes on serving


def test_a_too_long_target_is_414_at_nginxs_8k_buffer(gw, upstream: Upstream) -> None:
    reply = send(gw, get(b"/" + b"a" * 70_000))  # over http.server's 64 KB: a dropped connection
    assert status_of(reply) == 414
    assert body_of(reply).startswith(b"URI too long\nrequest_id: ")
    assert status_of(send(gw, get(b"/" + b"a" * 8200))) == 414  # one 8k large buffer
    assert status_of(send(gw, get(b"/" + b"a" * 8100))) == 200
    # an error nginx finds before the buffer is full comes first
    assert status_of(send(gw, get(b"/\x01" + b"a" * 9000))) == 400
    assert len(upstream.requests) == 1


def test_an_error_answer_follows_accept(gw) -> None:
    reply = send(gw, b"GET /a b HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n")
    # the request line failed before any header was read: no Accept yet, plain text
    assert body_of(reply).startswith(b"Bad request\n")
    reply = send(gw, get(b"/x", b"Accept: application/json", b"X: a\x00b"))
    assert status_of(reply) == 400
    assert b"Content-Type: application/json; charset=utf-8" in reply
    assert body_of(reply).startswith(b'{\n  "message":"Bad request",\n  "request_id":"')


# --- header names (point 3) -----------------------------------------------------------------

def test_header_names_as_nginx_under_kong_takes_them(gw, upstream: Upstream) -> None:
    reply = send(gw, get(b"/h", b"X_Under: u", b"X.Dot: d", b"X@At: a", b"Caf\xc3\xa9: c",
                         b"X-Plain: p"))
    assert status_of(reply) == 200
    seen = upstream.requests[-1]["headers"]
    # kong/templates/nginx_kong.lua sets underscores_in_headers on: forwarded
    assert seen["x_under"] == "u"
    # other characters make the name invalid: dropped (ignore_invalid_headers on)
    assert not {"x.dot", "x@at"} & set(seen) and not any(k.startswith("caf") for k in seen)
    assert seen["x-plain"] == "p"


@pytest.mark.parametrize("line", [b"X Space: v", b"X\x01: v", b" folded", b":novalue",
                                  b"Host: a", b"Content-Length: 1x"])
def test_header_lines_nginx_refuses_are_400(gw, upstream: Upstream, line: bytes) -> None:
    assert status_of(send(gw, get(b"/h", line))) == 400
    assert upstream.requests == []


def test_head_checks_of_ngx_http_process_request_header(gw, upstream: Upstream) -> None:
    assert status_of(send(gw, b"GET / HTTP/1.1\r\n\r\n")) == 400  # HTTP/1.1 without Host
    assert status_of(send(gw, get(b"/", b"Authorization: a", b"Authorization: b"))) == 400
    assert status_of(send(gw, get(b"/", b"Transfer-Encoding: gzip"))) == 501
    assert status_of(send(gw, b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n")) == 405
    assert upstream.requests == []


# --- how many headers (point 4) -------------------------------------------------------------

@pytest.fixture()
def roomy_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The echo upstream is http.server, which itself refuses more than 100 headers."""
    monkeypatch.setattr(http.client, "_MAXHEADERS", 1000)


def test_no_header_count_limit_only_nginxs_buffers(gw, upstream: Upstream, roomy_upstream) -> None:
    many = [b"X-H%d: v" % i for i in range(150)]  # http.server answered 431 past 100
    assert status_of(send(gw, get(b"/m", *many))) == 200
    assert len([k for k in upstream.requests[-1]["headers"] if k.startswith("x-h")]) == 150
    # 40 lines of ~700 bytes fit the 1k buffer and four 8k ones; 60 do not: 494, sent as 400
    fits = [b"X-B%d: " % i + b"v" * 690 for i in range(40)]
    assert status_of(send(gw, get(b"/m", *fits))) == 200
    reply = send(gw, get(b"/m", *[b"X-B%d: " % i + b"v" * 690 for i in range(60)]))
    assert status_of(reply) == 400
    assert body_of(reply).startswith(b"Request header or cookie too large\n")
    # one line longer than an 8k buffer
    reply = send(gw, get(b"/m", b"X-Long: " + b"v" * 8200))
    assert status_of(reply) == 400
    assert body_of(reply).startswith(b"Request header or cookie too large\n")
    assert len(upstream.requests) == 2


def test_get_headers_returns_at_most_100_as_kong_does(upstream: Upstream, roomy_upstream) -> None:
    prefix = make_prefix()
    rec = Path(prefix) / "rec.jsonl"
    handle = start_gateway({"_format_version": "3.0",
                            "services": [{"name": "svc", "url": upstream.url,
                                          "routes": [{"name": "r", "paths": ["/p"]}]}],
                            "plugins": [{"name": "kt-probe", "config": {"record_file": str(rec)}}]},
                           server=[probe_entry(prefix)], prefix=prefix)
    try:
        headers = {f"X-H{i:03d}": str(i) for i in range(150)}
        assert handle.request("GET", "/p", headers=headers).status == 200
        seen = [r for r in read_records(rec) if r["event"] == "access"][-1]["headers"]
        assert len(seen) == 100  # the first 100 header lines (Host and the client's own first)
        assert "x-h000" in seen and "x-h149" not in seen
        # the upstream still gets every header
        assert len([k for k in upstream.requests[-1]["headers"] if k.startswith("x-h")]) == 150
    finally:
        handle.close()


def _ctx(n: int) -> RequestContext:
    ctx = RequestContext(method="GET", scheme="http", host="kong.local", port=8000, path="/p",
                         query="", headers=Headers([(f"x-h{i}", str(i)) for i in range(n)]), body=b"")
    ctx.phase = "access"
    return ctx


def test_get_headers_max_headers_argument_is_kongs() -> None:
    pdk = PDK()
    assert len(pdk.call(_ctx(150), "kong.request.get_headers", [])) == 100
    assert len(pdk.call(_ctx(150), "kong.request.get_headers", [120])) == 120
    assert len(pdk.call(_ctx(1500), "kong.request.get_headers", [1000])) == 1000
    assert list(pdk.call(_ctx(5), "kong.request.get_headers", [2])) == ["x-h0", "x-h1"]
    for bad, message in ((0, "max_headers must be >= 1"), (1001, "max_headers must be <= 1000"),
                         ("9", "max_headers must be a number")):
        with pytest.raises(PdkLuaError, match=message):
            pdk.call(_ctx(5), "kong.request.get_headers", [bad])
    # the response getters have the same default (lua_max_resp_headers) and limits
    ctx = _ctx(0)
    ctx.phase = "header_filter"
    ctx.response_headers = Headers([(f"x-r{i}", "v") for i in range(150)])
    ctx.service_headers = ctx.response_headers.copy()
    assert len(pdk.call(ctx, "kong.response.get_headers", [])) == 100
    assert len(pdk.call(ctx, "kong.service.response.get_headers", [])) == 100
    assert len(pdk.call(ctx, "kong.service.response.get_headers", [150])) == 150
    with pytest.raises(PdkLuaError, match="max_headers must be <= 1000"):
        pdk.call(ctx, "kong.response.get_headers", [5000])
    # kong.log.serialize's request.headers are kong.request.get_headers() too
    from kongsim.pdk import serialize
    assert len(serialize(_ctx(150))["request"]["headers"]) == 100


def test_parse_helpers_match_nginx_on_details() -> None:
    assert front.parse_request_line(b"GET http://h:8/p?q HTTP/1.1\r\n") == ("GET", "/p?q", 1, 1)
    assert front.parse_request_line(b"GET  /x   HTTP/1.1  \r\n") == ("GET", "/x", 1, 1)
    assert front.parse_header_line(b"A:   v \t x  \r\n") == (b"A", b"v \t x", False)
    assert front.parse_header_line(b"X_Y: 1\r\n") == (b"X_Y", b"1", False)
    assert front.parse_header_line(b"X.Y: 1\r\n") == (b"X.Y", b"1", True)


def test_http_1_0_needs_no_host_and_gets_no_chunked_body(gw, upstream: Upstream) -> None:
    reply = send(gw, b"GET /old HTTP/1.0\r\n\r\n")  # the front closes after it
    assert status_of(reply) == 200
    head = reply.partition(b"\r\n\r\n")[0].lower()
    assert b"transfer-encoding" not in head and b"connection: close" in head
    assert b'"path": "/old"' in body_of(reply)
