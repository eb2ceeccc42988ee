"""Failures while proxying still end like a Kong request: plugin-set header values with CR/LF
are escaped as lua-nginx-module escapes them, a stand-in error is a 500 whose log phase runs,
and a client that leaves mid-stream costs one info line, not a traceback (real probe plugin)."""
from __future__ import annotations

import json
import logging
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "kongsim"))
from helpers import Upstream, probe_entry, read_records, running_upstream  # noqa: E402

from kongsim.gateway import Gateway, Request  # noqa: E402
from kongsim.pytest_plugin import make_prefix, start_gateway  # noqa: E402

pytestmark = pytest.mark.timeout(120)

upstream = pytest.fixture()(running_upstream)


def kong_yml(up: Upstream, rec: Path, username: str = "alice") -> dict[str, Any]:
    return {"_format_version": "3.0",
            "services": [{"name": "svc", "url": up.url,
                          "routes": [{"name": "r", "paths": ["/p"]}]}],
            "consumers": [{"username": username, "keyauth_credentials": [{"key": "k-123456"}]}],
            "plugins": [{"name": "key-auth"},
                        {"name": "kt-probe", "config": {"record_file": str(rec)}}]}


def logs(rec: Path) -> list[dict[str, Any]]:
    return [r for r in read_records(rec) if r["event"] == "log"]


def wait_for_logs(gw: Gateway, rec: Path, n: int) -> list[dict[str, Any]]:
    assert gw.runloop is not None and gw.runloop.wait_logs(10)
    deadline = time.monotonic() + 5
    while len(logs(rec)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return logs(rec)


def test_crlf_in_a_plugin_set_upstream_header_is_escaped_and_logged(upstream: Upstream) -> None:
    """key-auth sets X-Consumer-Username with kong.service.request.set_header, i.e.
    ngx.req.set_header: lua-nginx-module sends a newline in it as %0A (the old stand-in raised
    http.client's "Invalid header value": a bare 500 without log phase)."""
    prefix = make_prefix()
    rec = Path(prefix) / "rec.jsonl"
    gw = start_gateway(kong_yml(upstream, rec, username="bob\r\nX-Injected: 1"),
                       server=[probe_entry(prefix)], prefix=prefix)
    try:
        r = gw.request("GET", "/p", headers={"apikey": "k-123456", "x-test": "tab\tkept"})
        assert r.status == 200
        seen = upstream.requests[-1]["headers"]
        assert seen["x-consumer-username"] == "bob%0D%0AX-Injected: 1"
        assert "x-injected" not in seen
        assert seen["x-test"] == "tab\tkept"  # the client's own header goes out as it came
        entries = wait_for_logs(gw.gateway, rec, 1)
        assert entries[-1]["status"] == 200
    finally:
        gw.close()


def test_a_stand_in_error_while_proxying_is_a_500_that_still_runs_log(
        upstream: Upstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    prefix = make_prefix()
    rec = Path(prefix) / "rec.jsonl"
    gw = start_gateway(kong_yml(upstream, rec), server=[probe_entry(prefix)], prefix=prefix,
                       http=False)
    try:
        def broken(ctx: Any) -> Any:
            raise RuntimeError("balancer bug")
        monkeypatch.setattr(gw.gateway, "_target", broken)
        with caplog.at_level(logging.ERROR, logger="kongsim"):
            resp = gw.gateway.handle(Request("GET", "/p", [("apikey", "k-123456")]))
        assert resp.status == 500
        body = json.loads(resp.read())
        assert body["message"] == "An unexpected error occurred" and body["request_id"]
        assert resp.headers.get("X-Kong-Request-Id") == body["request_id"]
        assert any("balancer bug" in r.getMessage() for r in caplog.records)
        entries = wait_for_logs(gw.gateway, rec, 1)
        assert len(entries) == 1 and entries[0]["status"] == 500
        assert entries[0]["serialize"]["consumer"]["username"] == "alice"
    finally:
        gw.close()


def test_a_client_leaving_mid_stream_is_one_info_line_and_log_runs(
        upstream: Upstream, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    prefix = make_prefix()
    rec = Path(prefix) / "rec.jsonl"
    cfg = kong_yml(upstream, rec)
    cfg["plugins"] = cfg["plugins"][1:]  # the probe only
    gw = start_gateway(cfg, server=[probe_entry(prefix)], prefix=prefix)
    try:
        assert gw.url is not None
        host, port = gw.url.split("//")[1].split(":")
        with caplog.at_level(logging.INFO, logger="kongsim"):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"GET /p/sse HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while b"data:" not in got:  # headers and the first event
                got += s.recv(4096)
            # close with a reset: the gateway's next write fails at once
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            entries = wait_for_logs(gw.gateway, rec, 1)
        assert len(entries) == 1 and entries[0]["status"] == 200
        # (the echo upstream may print its own BrokenPipe traceback: only the gateway's counts)
        err = capsys.readouterr().err
        assert "kongsim/gateway.py" not in err
        lines = [r for r in caplog.records if "while sending to client" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.INFO
        assert '"GET /p/sse"' in lines[0].getMessage()
    finally:
        gw.close()
