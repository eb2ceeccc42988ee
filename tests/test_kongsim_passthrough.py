"""Gaps in the stand-in's coverage, each against a real plugin server: invalid UTF-8 and `None`
arguments on both servers, kong.service.set_target with upstream entities, rewrite for global
plugins, consumer-scoped configs, ai-proxy streaming, and the `kong_gateway` fixture itself."""
from __future__ import annotations

import http.client
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "kongsim"))
from helpers import PROBE, Upstream, aigov_probe_entry, probe_entry, read_records, running_upstream  # noqa: E402

from aigov.mockllm import MockLLM  # noqa: E402
from kongsim.pytest_plugin import make_prefix, start_gateway  # noqa: E402

pytestmark = pytest.mark.timeout(120)
INVALID = b"caf\xc3(\xff"  # bytes no UTF-8 decoder accepts
INVALID_STR = INVALID.decode("utf-8", "surrogateescape")  # how Python sees them unharmed


upstream = pytest.fixture()(running_upstream)


def entry_for(server: str, prefix: str, phases: str = "access,log") -> Any:
    return aigov_probe_entry(prefix, phases) if server == "aigov" else probe_entry(prefix, phases=phases)


def cfg(up: Upstream, *plugins: dict, **extra: Any) -> dict:
    return {"_format_version": "3.0",
            "services": [{"name": "svc", "url": up.url, "routes": [{"name": "r", "paths": ["/p"]}]}],
            "consumers": [{"username": "alice", "keyauth_credentials": [{"key": "alice-key-77"}]},
                          {"username": "bob", "keyauth_credentials": [{"key": "bob-key-88"}]}],
            "plugins": list(plugins), **extra}


def events(rec: Path, kind: str, name: str | None = None) -> list[dict]:
    return [r for r in read_records(rec) if r["event"] == kind and (name is None or r["name"] == name)]


def raw_request(url: str, header_value: bytes, body: bytes) -> tuple[int, dict[str, bytes], bytes]:
    """A request whose header carries raw bytes (http.client passes bytes values unchanged)."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/p")
    conn.putheader("x-test", header_value)
    conn.putheader("Content-Type", "text/plain")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    r = conn.getresponse()
    # http.client decodes header bytes as latin-1: encoding back gives the bytes on the wire
    headers = {k.lower(): v.encode("latin-1") for k, v in r.getheaders()}
    out = (r.status, headers, r.read())
    conn.close()
    return out


@pytest.mark.parametrize("server", ["aigov", "stock"])
def test_invalid_utf8_in_header_and_body(server: str, upstream: Upstream, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="kongsim")
    prefix = make_prefix()
    rec = Path(prefix) / "rec.jsonl"
    body = b"\xff\xfe not utf-8 \xc3("
    gw = start_gateway(cfg(upstream, {"name": "kt-probe", "config": {"record_file": str(rec),
                                                                      "mode": "echo_header"}}),
                       server=[entry_for(server, prefix)], prefix=prefix, step_timeout_s=3.0)
    try:
        # The body is bytes end to end (get_raw_body is msgpack bin) on both servers.
        status, headers, echoed = raw_request(gw.url, b"plain", body)
        assert status == 200
        access = events(rec, "access")[-1]
        assert access["raw_body_type"] == "bytes" and bytes.fromhex(access["raw_body_hex"]) == body
        assert json.loads(echoed)["body"] == body.decode("utf-8", "replace")  # upstream got it

        status, headers, _ = raw_request(gw.url, INVALID, b"{}")
        assert status == 200  # the stand-in neither crashed nor failed the request
        if server == "aigov":
            access = events(rec, "access")[-1]
            assert access["test"] == INVALID_STR and access["headers"]["x-test"] == [INVALID_STR]
            assert headers["x-echo"] == INVALID  # the plugin's str goes back as the same bytes
            assert upstream.requests[-1]["headers"]["x-test"] == INVALID.decode("latin-1")
        else:
            # kong-pdk 0.36's unpacker raises on invalid UTF-8 and the connection handler dies
            # (reference §7): the plugin never sees the header, the stand-in logs the failure and
            # continues the request as Kong does.
            assert "x-echo" not in headers and len(events(rec, "access")) == 1
            assert "kt-probe" in caplog.text
        # and the plugin server still serves the next request
        status, headers, _ = raw_request(gw.url, b"fine", b"{}")
        assert status == 200 and headers["x-echo"] == b"fine"
    finally:
        gw.close()


@pytest.mark.parametrize("server", ["aigov", "stock"])
def test_none_inside_pdk_call_args(server: str, upstream: Upstream) -> None:
    prefix = make_prefix()
    gw = start_gateway(cfg(upstream, {"name": "kt-probe", "config": {"mode": "none_shared"}}),
                       server=[entry_for(server, prefix)], prefix=prefix, http=False)
    try:
        r = gw.request("GET", "/p")
        assert r.status == 200 and r.header("X-Nothing") == "None"  # set(k, None) is nil
        gw.gateway.reload(cfg(upstream, {"name": "kt-probe", "config": {"mode": "none_exit"}}))
        r = gw.request("GET", "/p")
        assert r.status == 403 and r.body == b""  # a None body is no body
        assert len(upstream.requests) == 1
        gw.gateway.reload(cfg(upstream, {"name": "kt-probe", "config": {"mode": "none_header_name"}}))
        r = gw.request("GET", "/p")  # in-process: an exception here would fail the test
        assert r.status == 500 and r.json() == {"message": "An unexpected error occurred"}
        assert r.header("X-Unreachable") is None and len(upstream.requests) == 1
        gw.gateway.reload(cfg(upstream, {"name": "kt-probe", "config": {"mode": "header", "tag": "ok"}}))
        assert gw.request("GET", "/p").header("X-kt-probe-Tag") == "ok"
    finally:
        gw.close()


def test_set_target_and_upstream_entity_targets() -> None:
    a, b, c = Upstream(), Upstream(), Upstream()
    prefix = make_prefix()
    doc = {"_format_version": "3.0",
           "upstreams": [{"name": "backend", "targets": [{"target": f"127.0.0.1:{a.port}", "weight": 100},
                                                          {"target": f"127.0.0.1:{c.port}", "weight": 100}]}],
           "services": [{"name": "svc", "host": "backend", "port": 80, "protocol": "http",
                         "routes": [{"name": "plain", "paths": ["/plain"]},
                                    {"name": "moved", "paths": ["/moved"], "plugins": [
                                        {"name": "kt-probe", "config": {"mode": "upstream",
                                                                        "target_port": b.port}}]}]}]}
    gw = start_gateway(doc, server=[probe_entry(prefix)], prefix=prefix, http=False)
    try:
        for _ in range(4):
            assert gw.request("GET", "/plain/x").status == 200
        # the service's host names an upstream entity: its targets share the traffic
        assert len(a.requests) == 2 and len(c.requests) == 2 and b.requests == []
        r = gw.request("GET", "/moved/x")
        assert r.status == 200
        (got,) = b.requests  # kong.service.set_target routed to the second upstream
        assert got["path"] == "/rewritten" and got["headers"]["x-from-probe"] == "kt-probe"
        assert len(a.requests) + len(c.requests) == 4
    finally:
        gw.close()
        for up in (a, b, c):
            up.close()


@pytest.mark.parametrize("server", ["aigov", "stock"])
def test_paths_are_normalised_as_kong_normalises_them(upstream: Upstream, server: str) -> None:
    """kong.request.get_path is the raw path normalised (RFC 3986 section 6), get_raw_path the
    raw one; the router matches the normalised path and sends it upstream escaped again, while
    X-Forwarded-Path keeps the client's (kong/pdk/request.lua, kong/runloop/handler.lua)."""
    prefix = make_prefix()
    rec = Path(prefix) / "rec.jsonl"
    entry = entry_for(server, prefix, "rewrite,access")
    gw = start_gateway(cfg(upstream, {"name": "kt-probe", "config": {"record_file": str(rec)}}),
                       server=[entry], prefix=prefix, http=True)
    try:
        # Kong's own example (kong/pdk/request.lua), behind the route prefix /p
        raw = "/p/t/Abc%20123%C3%B8%2f/parent/..//test/./"
        conn = http.client.HTTPConnection("127.0.0.1", int(gw.url.rsplit(":", 1)[1]), timeout=30)
        conn.request("GET", raw + "?q=1")
        r = conn.getresponse()
        echoed = json.loads(r.read())
        conn.close()
        assert r.status == 200
        (rw,) = events(rec, "rewrite")
        assert rw["path"] == "/p/t/Abc 123\u00f8%2F/test/"
        assert rw["raw_path"] == raw
        assert echoed["path"] == "/t/Abc%20123%C3%B8%2F/test/?q=1"  # strip_path, escaped again
        assert echoed["headers"]["x-forwarded-path"] == raw
        # an escaped prefix still matches the route: /%70 is /p
        assert gw.request("GET", "/%70/x").status == 200
        assert gw.request("GET", "/q/../p/x").status == 200
    finally:
        gw.close()


def test_rewrite_runs_for_global_plugins_only(upstream: Upstream) -> None:
    prefix = make_prefix()
    rec = Path(prefix) / "rec.jsonl"
    entries = [probe_entry(prefix, "kt-first", 2000, "rewrite,access,log"),
               probe_entry(prefix, "kt-second", 1000, "rewrite,access,log")]
    doc = cfg(upstream, {"name": "kt-first", "config": {"record_file": str(rec)}},
              {"name": "kt-second", "route": "r", "config": {"record_file": str(rec)}})
    gw = start_gateway(doc, server=entries, prefix=prefix, http=False)
    try:
        r = gw.request("GET", "/p/abc", headers={"x-test": "rw"})
        assert r.status == 200 and r.header("X-Rewrite-By") == "kt-first"
        (rw,) = events(rec, "rewrite")
        assert rw["name"] == "kt-first" and rw["path"] == "/p/abc" and rw["test"] == "rw"
        assert events(rec, "access", "kt-second")  # the route plugin runs from access on
        assert gw.wait_logs()
        logs = {e["name"]: e for e in events(rec, "log")}
        assert logs["kt-second"]["rewrite_by"] == "kt-first"  # kong.ctx.shared from rewrite
        # no route matched: the global plugin's rewrite (and log) still ran
        assert gw.request("GET", "/nowhere").status == 404
        assert gw.wait_logs()
        assert len(events(rec, "rewrite")) == 2 and len(events(rec, "log", "kt-first")) == 2
        assert len(events(rec, "log", "kt-second")) == 1
    finally:
        gw.close()


def test_consumer_scoped_config_at_runtime(upstream: Upstream) -> None:
    prefix = make_prefix()
    rec = Path(prefix) / "rec.jsonl"
    doc = cfg(upstream,
              {"name": "key-auth", "route": "r"},
              {"name": "kt-probe", "route": "r", "config": {"tag": "route-default", "record_file": str(rec)}},
              {"name": "kt-probe", "route": "r", "consumer": "alice",
               "config": {"tag": "alice-only", "record_file": str(rec)}})
    gw = start_gateway(doc, server=[probe_entry(prefix)], prefix=prefix, http=False)
    try:
        # key-auth (priority 1250) identifies the consumer before the probe's config is chosen
        assert gw.request("GET", "/p", headers={"apikey": "alice-key-77"}).header("X-kt-probe-Tag") == "alice-only"
        assert gw.request("GET", "/p", headers={"apikey": "bob-key-88"}).header("X-kt-probe-Tag") == "route-default"
        assert gw.request("GET", "/p", headers={"apikey": "alice-key-77"}).header("X-kt-probe-Tag") == "alice-only"
        inits = {e["config"]["tag"]: e["config"] for e in events(rec, "init")}
        alice = next(c for c in gw.gateway.runloop.config.consumers.values() if c.username == "alice")
        assert inits["alice-only"]["consumer_id"] == alice.id and "consumer_id" not in inits["route-default"]
        assert len(events(rec, "init")) == 2  # one instance per plugin entity, reused
    finally:
        gw.close()


@pytest.fixture(scope="module")
def slow_mock() -> Iterator[MockLLM]:
    m = MockLLM("127.0.0.1", 0, chunk_delay_ms=120).start()
    try:
        yield m
    finally:
        m.stop()


def test_ai_proxy_stream_usage_from_final_chunk_unbuffered(slow_mock: MockLLM) -> None:
    prefix = make_prefix()
    rec = Path(prefix) / "rec.jsonl"
    doc = {"_format_version": "3.0",
           "services": [{"name": "llm", "url": slow_mock.url, "routes": [{
               "name": "chat", "paths": ["/chat"], "plugins": [
                   {"name": "kt-probe", "config": {"record_file": str(rec)}},
                   {"name": "ai-proxy", "config": {
                       "route_type": "llm/v1/chat",
                       "model": {"provider": "openai", "name": "gpt-4o-mini",
                                 "options": {"upstream_url": slow_mock.url + "/v1/chat/completions"}},
                       "logging": {"log_statistics": True}}}]}]}]}
    gw = start_gateway(doc, server=[probe_entry(prefix)], prefix=prefix)
    try:
        body = {"messages": [{"role": "user", "content": "Tell me a long story about streams"}],
                "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.monotonic()
        reply, chunks = gw.request("POST", "/chat", json=body, stream=True)
        first = next(chunks)
        t_first = time.monotonic() - t0
        rest = b"".join(chunks)
        total = time.monotonic() - t0
        assert reply.status == 200 and reply.header("Content-Type").startswith("text/event-stream")
        assert reply.header("X-Kong-LLM-Model") == "openai/gpt-4o-mini"
        # no plugin has a response phase: the chunks pass through as they come
        assert total - t_first >= 0.3, (t_first, total)
        events_ = [json.loads(line[5:]) for line in (first + rest).decode().splitlines()
                   if line.startswith("data:") and line[5:].strip() != "[DONE]"]
        final_usage = events_[-1]["usage"]
        assert final_usage["prompt_tokens"] > 0 and final_usage["completion_tokens"] > 0
        assert gw.wait_logs()
        (log_ev,) = events(rec, "log")
        usage = log_ev["serialize"]["ai"]["proxy"]["usage"]
        assert usage["prompt_tokens"] == final_usage["prompt_tokens"]
        assert usage["completion_tokens"] == final_usage["completion_tokens"]
        assert usage["total_tokens"] == final_usage["total_tokens"]
        # normalize-json-response.lua names the model only when the service answered 200
        failed = gw.request("POST", "/chat", json={**body, "stream": False}, headers={"X-Mock-Fail": "500"})
        assert failed.status == 500 and failed.header("X-Kong-LLM-Model") is None
    finally:
        gw.close()


_FIXTURE_PIDS: list[int] = []


def test_kong_gateway_fixture_starts_plugin_servers(kong_gateway, upstream: Upstream) -> None:
    # the preset a kong-pdk user would write: a plugin file on the stock dedicated server
    gw = kong_gateway(cfg(upstream, {"name": "kt-probe", "config": {"tag": "via-fixture"}}),
                      server="stock", plugin_files=[PROBE])
    r = gw.request("GET", "/p")  # through the HTTP front (the default)
    assert gw.url is not None and r.status == 200 and r.header("X-kt-probe-Tag") == "via-fixture"
    in_process = kong_gateway(cfg(upstream, {"name": "kt-probe"}), server="stock",
                              plugin_files=[PROBE], http=False)
    assert in_process.url is None and in_process.request("GET", "/p").header("X-kt-probe-Tag") == "probe"
    _FIXTURE_PIDS.extend(s.pid for h in (gw, in_process) for s in h.gateway.managed.values())
    assert len(_FIXTURE_PIDS) == 2


def test_kong_gateway_fixture_stopped_them_at_teardown() -> None:
    assert len(_FIXTURE_PIDS) == 2, "runs after test_kong_gateway_fixture_starts_plugin_servers"
    for pid in _FIXTURE_PIDS:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # a zombie is gone too, for our purposes; a live process is not
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        assert state == "Z", f"plugin server {pid} still running after the fixture's teardown"
