"""Request debugging the Kong way (X-Kong-Request-Debug -> X-Kong-Request-Debug-Output) and the
in-process per-request timing (gateway.last_timings / on_timing), against the real kong-pdk
probe plugin and imitated key-auth."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "kongsim"))
from helpers import probe_entry, running_upstream  # noqa: E402

from kongsim.gateway import Request  # noqa: E402
from kongsim.pytest_plugin import make_prefix, start_gateway  # noqa: E402
from kongsim.timing import RequestTiming  # noqa: E402

pytestmark = pytest.mark.timeout(120)
KEY = "alice-timing-key-9c1"
DEBUG = {"X-Kong-Request-Debug": "*"}


upstream = pytest.fixture(scope="module")(running_upstream)


@pytest.fixture(scope="module")
def gw(upstream):
    timings: list[RequestTiming] = []
    prefix = make_prefix()
    cfg = {"_format_version": "3.0",
           "services": [{"name": "svc", "url": upstream.url, "routes": [
               {"name": "r", "paths": ["/p"], "plugins": [{"name": "key-auth"}]},
               {"name": "sse", "paths": ["/sse"], "strip_path": False}]}],
           "consumers": [{"username": "alice", "keyauth_credentials": [{"key": KEY}]}],
           "plugins": [{"name": "kt-probe", "config": {"mode": "sleep", "sleep_s": 0.15}}]}
    handle = start_gateway(cfg, server=[probe_entry(prefix, phases="rewrite,access,log")],
                           prefix=prefix, on_timing=timings.append)
    handle.timings = timings
    try:
        yield handle
    finally:
        handle.close()


def plugin_node(tree: dict, phase: str, name: str) -> dict:
    return tree["child"][phase]["child"]["plugins"]["child"][name]


def test_debug_output_header_tree(gw, upstream) -> None:
    r = gw.request("GET", "/p/slow", headers={"apikey": KEY, **DEBUG, "X-Kong-Request-Debug-Log": "false"})
    assert r.status == 200
    out = json.loads(r.header("X-Kong-Request-Debug-Output"))
    assert out["request_id"] == r.header("X-Kong-Request-Id")
    phases = out["child"]
    # what Kong has by the end of header_filter; log runs later, so it is not in the header
    assert {"rewrite", "access", "balancer", "header_filter", "upstream"} <= set(phases)
    assert "log" not in phases and "total_time" not in out
    probe_id = next(p.id for p in gw.gateway.runloop.config.plugins if p.name == "kt-probe")
    probe = plugin_node(out, "access", "kt-probe")
    assert set(probe["child"]) == {probe_id}  # <phase>.plugins.<name>.<plugin id>
    assert 150 <= probe["total_time"] < 2000 and probe["child"][probe_id]["total_time"] == probe["total_time"]
    assert isinstance(probe["total_time"], int)  # integer milliseconds, like Kong
    assert "key-auth" in phases["access"]["child"]["plugins"]["child"]
    assert "router" in phases["access"]["child"]
    assert phases["access"]["total_time"] >= probe["total_time"]
    assert "kt-probe" in phases["rewrite"]["child"]["plugins"]["child"]  # a global plugin
    up = phases["upstream"]
    assert 200 <= up["total_time"] < 2000  # the /slow upstream waits 200 ms
    assert up["child"]["time_to_first_byte"]["total_time"] == up["total_time"]
    # the debug headers are Kong's, never forwarded
    seen = upstream.requests[-1]["headers"]
    assert not any(h.startswith("x-kong-request-debug") for h in seen)


def test_no_output_without_the_header_and_off_loopback_without_token(gw) -> None:
    assert gw.request("GET", "/p", headers={"apikey": KEY}).header("X-Kong-Request-Debug-Output") is None
    # only "*" is understood (the per-phase filters are Enterprise)
    assert gw.request("GET", "/p", headers={"apikey": KEY, "X-Kong-Request-Debug": "access"}
                      ).header("X-Kong-Request-Debug-Output") is None
    g = gw.gateway

    def remote(headers: dict) -> str | None:
        resp = g.handle(Request("GET", "/p", [("apikey", KEY), *headers.items()],
                                client_ip="10.20.30.40"))
        resp.read()
        return resp.headers.get("X-Kong-Request-Debug-Output")

    assert remote(DEBUG) is None
    assert remote({**DEBUG, "X-Kong-Request-Debug-Token": "wrong"}) is None
    out = remote({**DEBUG, "X-Kong-Request-Debug-Token": g.request_debug_token})
    assert out is not None and "kt-probe" in json.loads(out)["child"]["access"]["child"]["plugins"]["child"]


def test_exit_response_is_timed_too(gw) -> None:
    r = gw.request("GET", "/p", headers=DEBUG)  # no key: key-auth exits with 401
    assert r.status == 401
    out = json.loads(r.header("X-Kong-Request-Debug-Output"))
    assert "upstream" not in out["child"] and "balancer" not in out["child"]
    assert "key-auth" in out["child"]["access"]["child"]["plugins"]["child"]


def test_in_process_timings_per_plugin_and_callback(gw) -> None:
    assert gw.wait_logs()  # earlier tests' log phases
    before = len(gw.timings)
    r = gw.request("GET", "/p/slow", headers={"apikey": KEY})
    assert r.status == 200 and gw.wait_logs()
    assert len(gw.timings) == before + 1  # on_timing: once per request, after its log phase
    t = gw.gateway.last_timings
    assert t is gw.timings[-1] and t.request_id == r.header("X-Kong-Request-Id")
    assert "log" in t.phase_ms() and "kt-probe" in t.plugin_ms(("log",))
    added = t.added_latency_ms()
    assert 150 <= added["kt-probe"] < 2000 and added["key-auth"] < 50
    assert set(t.plugin_ms()) == {"kt-probe", "key-auth"}
    assert t.plugin_ms()["kt-probe"] >= added["kt-probe"]  # log time is not client latency
    assert 200 <= t.upstream_ms < 2000
    assert t.total_ms >= added["kt-probe"] + t.upstream_ms - 1


def test_streamed_response_header_has_ttfb_and_record_has_streaming(gw) -> None:
    reply, chunks = gw.request("GET", "/sse", headers=DEBUG, stream=True)
    out = json.loads(reply.header("X-Kong-Request-Debug-Output"))
    body = b"".join(chunks)
    assert b'"n": 2' in body
    assert set(out["child"]["upstream"]["child"]) == {"time_to_first_byte"}  # sent before the body
    assert gw.wait_logs()
    t = gw.gateway.last_timings
    streaming = t.node("upstream", "streaming")["total_time"]
    assert 550 <= streaming < 3000  # three events 0.3 s apart
    assert t.upstream_ms >= streaming


def test_debug_log_header_logs_the_output(gw, caplog) -> None:
    caplog.set_level(logging.INFO, logger="kongsim")
    r = gw.request("GET", "/p", headers={"apikey": KEY, **DEBUG, "X-Kong-Request-Debug-Log": "true"})
    assert gw.wait_logs()
    lines = [rec.getMessage() for rec in caplog.records if "[request-debug] output:" in rec.getMessage()]
    assert len(lines) == 1
    logged = json.loads(lines[0].split("output: ", 1)[1])
    assert logged["request_id"] == r.header("X-Kong-Request-Id") and "log" in logged["child"]
    assert KEY not in caplog.text


def test_request_debug_off_passes_the_headers_through(upstream) -> None:
    gw = start_gateway({"_format_version": "3.0", "services": [
        {"name": "svc", "url": upstream.url, "routes": [{"name": "r", "paths": ["/p"]}]}]},
        server=[], prefix=make_prefix(), http=False, request_debug=False)
    try:
        r = gw.request("GET", "/p", headers=DEBUG)
        assert r.status == 200 and r.header("X-Kong-Request-Debug-Output") is None
        assert upstream.requests[-1]["headers"]["x-kong-request-debug"] == "*"
    finally:
        gw.close()
