"""kong.client.get_forwarded_ip and friends: Kong's trusted_ips / real_ip_header /
real_ip_recursive (kong.conf.default; defaults none, X-Real-IP, off), which Kong renders as
nginx's realip module (`set_real_ip_from`, templates/nginx_kong.lua); kong/pdk/client.lua reads
`$remote_addr` for the forwarded address and `$realip_remote_addr` for get_ip."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "kongsim"))
from helpers import Upstream  # noqa: E402

from kongsim.gateway import Gateway, Request  # noqa: E402
from kongsim.pdk import PDK, Headers, RequestContext, real_ip_settings, serialize  # noqa: E402
from kongsim.process import parse_kong_conf  # noqa: E402

SPOOF = [("X-Forwarded-For", "203.0.113.7"), ("X-Real-IP", "198.51.100.9"),
         ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "https")]


def ctx_for(headers: list[tuple[str, str]], client_ip: str = "127.0.0.1",
            client_port: int = 50000) -> RequestContext:
    return RequestContext(method="GET", scheme="http", host="kong.local", port=8000, path="/p",
                          query="", headers=Headers(headers), body=b"", client_ip=client_ip,
                          client_port=client_port, phase="access")


def forwarded(pdk: PDK, headers: list[tuple[str, str]], client_ip: str = "127.0.0.1") -> tuple:
    ctx = ctx_for(headers, client_ip)
    return (pdk.call(ctx, "kong.client.get_forwarded_ip", []),
            pdk.call(ctx, "kong.client.get_forwarded_port", []))


def test_default_trusts_nobody_so_forwarded_ip_is_the_connection() -> None:
    pdk = PDK()
    ctx = ctx_for(SPOOF)
    assert pdk.call(ctx, "kong.client.get_forwarded_ip", []) == "127.0.0.1"
    assert pdk.call(ctx, "kong.client.get_forwarded_port", []) == 50000
    assert pdk.call(ctx, "kong.client.get_ip", []) == "127.0.0.1"
    assert pdk.call(ctx, "kong.ip.is_trusted", ["127.0.0.1"]) is False
    # kong/pdk/request.lua: the X-Forwarded-* getters need a trusted client too
    assert pdk.call(ctx, "kong.request.get_forwarded_host", []) == "kong.local"
    assert pdk.call(ctx, "kong.request.get_forwarded_scheme", []) == "http"
    assert pdk.call(ctx, "kong.nginx.get_var", ["remote_addr"]) == "127.0.0.1"


def test_trusted_client_default_header_is_x_real_ip_not_x_forwarded_for() -> None:
    pdk = PDK(trusted_ips=["127.0.0.1"])
    # $remote_port is empty once realip took an address without a port: tonumber("") is nil
    assert forwarded(pdk, SPOOF) == ("198.51.100.9", None)
    assert forwarded(pdk, [("X-Forwarded-For", "203.0.113.7")]) == ("127.0.0.1", 50000)
    ctx = ctx_for(SPOOF)
    assert pdk.call(ctx, "kong.client.get_ip", []) == "127.0.0.1"
    assert pdk.call(ctx, "kong.request.get_forwarded_host", []) == "evil.example"
    pdk.post_read(ctx)
    assert serialize(ctx)["client_ip"] == "198.51.100.9"  # kong/pdk/log.lua: var.remote_addr
    assert pdk.call(ctx, "kong.nginx.get_var", ["realip_remote_addr"]) == "127.0.0.1"
    # an untrusted client's headers change nothing
    assert forwarded(pdk, SPOOF, client_ip="192.0.2.1") == ("192.0.2.1", 50000)


def test_x_forwarded_for_takes_the_rightmost_address_and_recursive_walks_trusted_hops() -> None:
    chain = [("X-Forwarded-For", "198.51.100.1, 10.0.0.5")]
    plain = PDK(trusted_ips=["127.0.0.1"], real_ip_header="X-Forwarded-For")
    assert forwarded(plain, chain) == ("10.0.0.5", None)
    assert forwarded(plain, [("X-Forwarded-For", "203.0.113.7:4444")]) == ("203.0.113.7", 4444)
    assert forwarded(plain, [("X-Forwarded-For", "not-an-ip")]) == ("127.0.0.1", 50000)
    recursive = PDK(trusted_ips=["127.0.0.1", "10.0.0.0/8"], real_ip_header="X-Forwarded-For",
                    real_ip_recursive=True)
    assert forwarded(recursive, chain) == ("198.51.100.1", None)
    # several X-Forwarded-For headers: walked from the last one
    two = [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "10.1.1.1, 10.2.2.2")]
    assert forwarded(recursive, two) == ("198.51.100.1", None)
    assert forwarded(plain, two) == ("10.2.2.2", None)


def test_is_trusted_matches_cidr_blocks_like_kong_ip() -> None:
    pdk = PDK(trusted_ips=["10.0.0.0/8", "::1"])
    ctx = ctx_for([])
    assert pdk.call(ctx, "kong.ip.is_trusted", ["10.20.30.40"]) is True
    assert pdk.call(ctx, "kong.ip.is_trusted", ["::1"]) is True
    assert pdk.call(ctx, "kong.ip.is_trusted", ["11.0.0.1"]) is False
    assert pdk.call(ctx, "kong.ip.is_trusted", ["garbage"]) is False


def test_kong_conf_settings_and_their_validation() -> None:
    assert real_ip_settings(parse_kong_conf("")) == {
        "trusted_ips": [], "real_ip_header": "X-Real-IP", "real_ip_recursive": False}
    conf = parse_kong_conf("trusted_ips = 10.0.0.0/8, 127.0.0.1\n"
                           "real_ip_header = X-Forwarded-For\nreal_ip_recursive = on\n")
    assert real_ip_settings(conf) == {"trusted_ips": ["10.0.0.0/8", "127.0.0.1"],
                                      "real_ip_header": "X-Forwarded-For", "real_ip_recursive": True}
    # the nginx_proxy_* keys win over their aliases; KONG_* variables override the file
    conf = parse_kong_conf("trusted_ips = NONE\nreal_ip_header = X-Forwarded-For\n"
                           "nginx_proxy_real_ip_header = X-Client\n",
                           {"KONG_TRUSTED_IPS": "0.0.0.0/0,::/0"})
    assert real_ip_settings(conf)["real_ip_header"] == "X-Client"
    assert real_ip_settings(conf)["trusted_ips"] == ["0.0.0.0/0", "::/0"]
    with pytest.raises(ValueError, match="trusted_ips must be a comma separated list .* got 'localhost'"):
        Gateway({"_format_version": "3.0"}, trusted_ips=["localhost"])


def _through_gateway(**kwargs: Any) -> dict[str, str]:
    up = Upstream()
    gw = Gateway({"_format_version": "3.0", "services": [
        {"name": "svc", "url": up.url, "routes": [{"name": "r", "paths": ["/p"]}]}]}, **kwargs)
    try:
        gw.start()
        resp = gw.handle(Request("GET", "/p", [("Host", "kong.local"), *SPOOF],
                                 client_ip="127.0.0.1", client_port=50000))
        resp.read()
        assert resp.status == 200
        return up.requests[-1]["headers"]
    finally:
        gw.close()
        up.close()


def test_upstream_headers_follow_the_same_trust() -> None:
    headers = _through_gateway()
    assert headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http" and headers["x-forwarded-host"] == "kong.local"
    headers = _through_gateway(trusted_ips=["127.0.0.0/8"])
    assert headers["x-real-ip"] == "198.51.100.9"  # $remote_addr after realip
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https" and headers["x-forwarded-host"] == "evil.example"
