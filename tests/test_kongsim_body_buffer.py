"""The request-body buffer of the Kong stand-in, the way Kong behaves with it.

Kong's default nginx_http_client_body_buffer_size is 8k (kong_defaults.lua): a larger body is
spooled to a file, kong.request.get_raw_body() without a size argument returns nil for it, and
Kong's mp_rpc.lua fails packing that nil as msgpack bin (reference §2.4): the request ends in a
500. kong.conf.example and docker/Dockerfile raise the buffer and set the same maximum body size,
so nginx refuses a bigger body with its own 413 before any plugin runs. The real plugin-server
process and the real quota plugin (memory policy) run here; only the upstream is the mock.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kongsim.gateway import RECOMMENDED_BODY_SIZES, nginx_size
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


def test_kongs_default_buffer_turns_a_chat_request_over_8k_into_a_500(mock_llm) -> None:
    gw = start_gateway(config(mock_llm.url), server="aigov", pythonpath=str(REPO),
                       client_body_buffer_size="8k", client_max_body_size=0)
    try:
        small = post(gw, chat_of_size(6 * 1024))
        assert small.status == 200, small.body[:200]
        served = mock_llm.stats.snapshot()["requests"]
        big = post(gw, chat_of_size(9 * 1024))
        assert big.status == 500 and b"An unexpected error occurred" in big.body
        assert mock_llm.stats.snapshot()["requests"] == served  # the access phase failed: never proxied
    finally:
        gw.close()


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
