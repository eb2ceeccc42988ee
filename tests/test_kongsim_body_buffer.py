"""The request-body buffer of the Kong stand-in, the way Kong behaves with it.

Kong's default nginx_http_client_body_buffer_size is 8k (kong_defaults.lua): a larger body is
spooled to a file. kong.request.get_raw_body() without a size argument returns nil for it, and
Kong's mp_rpc.lua fails packing that nil as msgpack bin (reference §2.4): the request ends in a
500. Since Kong 3.8, get_raw_body(max_allowed_file_size) reads the file back (0: any size), and
the plugins pass it (aigov.pdk.request_body, up to 8 MiB). kong.conf.example and docker/Dockerfile
also raise the buffer and set that maximum body size, so nginx refuses a bigger body with its own
413 before any plugin runs. The real plugin-server process and the real quota plugin (memory
policy) run here; only the upstream is the mock.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aigov.pdk import READ_BODY_MAX_BYTES
from kongsim.gateway import RECOMMENDED_BODY_SIZES, nginx_size
from kongsim.pdk import PDK, Headers, PdkLuaError, RequestContext
from kongsim.pytest_plugin import start_gateway

REPO = Path(__file__).resolve().parent.parent


def config(mock_url: str) -> dict[str, Any]:
    quota = {"name": "llm-token-quota", "config": {"limits": [{"window": "day", "tokens": 10_000_000}]}}
    return {"_format_version": "3.0", "services": [{"name": "llm", "url": mock_url, "routes": [
        {"name": "chat", "paths": ["/v1/chat"], "strip_path": False, "plugins": [quota]}]}]}


def chat_of_size(size: int) -> bytes:
    """A chat request body of about `size` bytes (the prompt pads it)."""
    body = {"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": ""}]}
    pad = size - len(json.dumps(body))
    body["messages"][0]["content"] = ("lorem ipsum " * (pad // 12 + 1))[:max(pad, 1)]
    return json.dumps(body).encode()


def post(gw: Any, body: bytes) -> Any:
    return gw.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"},
                      timeout=60)


def test_with_kongs_default_buffer_the_plugins_read_a_spooled_body_up_to_their_bound(mock_llm) -> None:
    gw = start_gateway(config(mock_llm.url), server="aigov", pythonpath=str(REPO),
                       client_body_buffer_size="8k", client_max_body_size=0)
    try:
        for size in (6 * 1024, 9 * 1024, 200 * 1024):  # in the buffer, then spooled to a file
            reply = post(gw, chat_of_size(size))
            assert reply.status == 200, (size, reply.body[:200])
            assert int(reply.header("X-AI-Tokens-Prompt")) > size // 8  # read and metered
        served = mock_llm.stats.snapshot()["requests"]
        # Read (below the 8 MiB bound) and refused by the quota itself: too big to meter.
        big = post(gw, chat_of_size(2 * 1024 * 1024))
        assert big.status == 413 and json.loads(big.body)["error"]["code"] == "request_too_large"
        # Past the bound Kong returns nil and its mp_rpc cannot pack it: Kong's 500, never proxied
        # (the recommended client_max_body_size has nginx answer 413 before, next test).
        huge = post(gw, chat_of_size(READ_BODY_MAX_BYTES + 1024))
        assert huge.status == 500 and b"An unexpected error occurred" in huge.body
        assert mock_llm.stats.snapshot()["requests"] == served
    finally:
        gw.close()


@pytest.mark.parametrize("limit,readable", [(None, False), (-1, False), (0, True), (20_000, True), (10_000, False)])
def test_get_raw_body_reads_a_spooled_body_as_kong_3_9_does(limit: Any, readable: bool) -> None:
    """kong/pdk/request.lua: no number or a negative one -> nil; 0 -> the whole file; else the
    file only when it is not bigger."""
    pdk = PDK()
    ctx = RequestContext(method="POST", scheme="http", host="h", port=80, path="/", query="",
                         headers=Headers(), body=b"x" * 16_000, phase="access")
    args = () if limit is None else (limit,)
    if readable:
        assert pdk.call(ctx, "kong.request.get_raw_body", list(args)) == b"x" * 16_000
    else:
        with pytest.raises(PdkLuaError):
            pdk.call(ctx, "kong.request.get_raw_body", list(args))


def test_the_recommended_settings_serve_big_chat_requests_and_refuse_bigger_bodies_with_413(mock_llm) -> None:
    assert nginx_size(RECOMMENDED_BODY_SIZES["client_body_buffer_size"]) >= \
        nginx_size(RECOMMENDED_BODY_SIZES["client_max_body_size"]) > 1024 * 1024
    gw = start_gateway(config(mock_llm.url), server="aigov", pythonpath=str(REPO))  # kong.conf.example's
    try:
        ok = post(gw, chat_of_size(200 * 1024))
        assert ok.status == 200, ok.body[:200]
        assert int(ok.header("X-AI-Tokens-Prompt")) > 10_000  # metered, not passed around the quota
        served = mock_llm.stats.snapshot()["requests"]
        too_big = post(gw, chat_of_size(nginx_size(RECOMMENDED_BODY_SIZES["client_max_body_size"]) + 1))
        assert too_big.status == 413
        assert json.loads(too_big.body)["message"] == "Payload too large"  # Kong's error handler
        assert mock_llm.stats.snapshot()["requests"] == served
    finally:
        gw.close()


@pytest.mark.parametrize("value,expected", [("8k", 8192), ("1m", 1 << 20), ("1048576", 1 << 20), (0, 0)])
def test_nginx_sizes_read_as_nginx_reads_them(value: Any, expected: int) -> None:
    assert nginx_size(value) == expected
    with pytest.raises(ValueError):
        nginx_size("8 MB")
