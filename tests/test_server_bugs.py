"""Each stock kong-pdk 0.36 server failure of reference §3.4 (and §7's scenarios), reproduced
against the stock dedicated server, then shown survived by `aigov serve`.

The stock half of each test documents the stock behaviour with a bounded timeout; if kong-pdk
ever fixes a bug, that half fails and the documentation here must be updated.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from aigov.bench.common import proc_status

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rpc_client import (  # noqa: E402
    wait_until as _wait_until,
    ConnectionClosed, FIXTURE_PLUGINS, PYTHON, ReplyTimeout, TEST_PLUGIN, server_env,
    start_aigov, start_stock, thread_count,
    short_prefix,  # noqa: F401 - pytest fixture
)

pytestmark = pytest.mark.timeout(90)
HANG = 1.5  # seconds after which a missing stock reply counts as a hang


@pytest.fixture
def servers(short_prefix):
    """(stock, aigov) servers of the test plugin, each in its own prefix; both stopped after."""
    started = []

    def start(kind: str, *args: str):
        prefix = short_prefix / f"{kind}{len(started)}"
        prefix.mkdir()
        server = (start_stock if kind == "stock" else start_aigov)(prefix, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _status(server) -> dict:
    with server.client() as kong:
        return kong.call("plugin.GetStatus")


def test_exception_before_first_pdk_call(servers):
    stock = servers("stock")
    with stock.client() as first, stock.client() as second:
        bad = first.start_instance({"mode": "raise_before"})
        good = second.start_instance({"mode": "transcript"})
        with pytest.raises(ReplyTimeout):
            first.handle_event(bad, timeout=HANG)  # no "ret", ever
        with pytest.raises(ReplyTimeout):
            second.handle_event(good, timeout=HANG)  # e_lock is never released: deadlock

    aigov = servers("aigov")
    with aigov.client() as first, aigov.client() as second:
        bad = first.start_instance({"mode": "raise_before"})
        good = second.start_instance({"mode": "transcript"})
        assert first.handle_event(bad, timeout=5)["Data"] == "ret"  # the request continues
        assert len(second.run_event(good, {"kong.request.get_header": "v"}, timeout=5)) == 4
        assert first.handle_event(bad, timeout=5)["Data"] == "ret"  # and keeps doing so
    assert _status(aigov)["Events"] == 0
    assert "RuntimeError: boom before the first PDK call" in aigov.stderr()
    assert "Traceback" in aigov.stderr()


def test_exception_after_first_pdk_call(servers):
    stock = servers("stock")
    with stock.client() as kong:
        iid = kong.start_instance({"mode": "raise_after"})
        reply = kong.handle_event(iid)
        assert reply["Data"]["Method"] == "kong.request.get_header"
        with pytest.raises(ReplyTimeout):
            kong.step(reply["EventId"], "v", timeout=HANG)  # Kong would wait 60 s: "no data"

    aigov = servers("aigov")
    with aigov.client() as kong:
        iid = kong.start_instance({"mode": "raise_after"})
        reply = kong.handle_event(iid)
        assert reply["Data"]["Method"] == "kong.request.get_header"
        assert kong.step(reply["EventId"], "v", timeout=5) == {"Data": "ret", "EventId": reply["EventId"]}
        assert kong.call("plugin.GetStatus")["Events"] == 0
    assert "RuntimeError: boom after the first PDK call" in aigov.stderr()


def test_pdk_call_after_exit_does_not_leak_a_blocked_thread(servers):
    requests = 20
    stock = servers("stock")
    baseline = thread_count(stock.proc.pid)
    with stock.client() as kong:
        iid = kong.start_instance({"mode": "call_after_exit"})
        for _ in range(requests):
            reply = kong.handle_event(iid)
            assert reply["Data"]["Method"] == "kong.response.exit"  # Kong never steps after this
    # each handler is now blocked forever in the kong.log.err after exit
    assert _wait_until(lambda: thread_count(stock.proc.pid) >= baseline + requests)

    aigov = servers("aigov")
    with aigov.client() as kong:
        iid = kong.start_instance({"mode": "call_after_exit"})
        baseline = thread_count(aigov.proc.pid)
        for _ in range(requests):
            reply = kong.handle_event(iid)
            assert reply["Data"] == {"Method": "kong.response.exit", "Args": [200, "bye"]}
    assert _wait_until(lambda: _status(aigov)["Workers"]["busy"] == 0)
    # every handler finished; the few pool threads started while an earlier handler was still
    # winding down stay idle for reuse, instead of one blocked thread per request
    assert thread_count(aigov.proc.pid) < baseline + requests // 2
    assert _status(aigov)["Events"] == 0
    assert "EventClosedError: PDK call kong.log.err after event" in aigov.stderr()


def test_exit_as_first_call_leaves_no_event_entry(servers):
    exits = 30
    for kind, expected_leak in (("stock", exits), ("aigov", 0)):
        server = servers(kind)
        with server.client() as kong:
            iid = kong.start_instance({"mode": "exit_first"})
            for _ in range(exits):
                reply = kong.handle_event(iid)
                assert reply["Data"] == {"Method": "kong.response.exit",
                                         "Args": [403, "denied", {"x-reason": "test"}]}
            # the probe handler counts the server's event table before its own first PDK call
            probe = kong.start_instance({"mode": "probe"})
            calls = kong.run_event(probe)
            leaked = int(calls[0]["Args"][1])
        if kind == "stock":
            assert leaked == expected_leak  # one entry per exit, forever
        else:
            assert leaked <= 1  # at most the probe's own event
            assert _status(server)["Events"] == 0


def test_large_exit_body_arrives_whole(servers):
    size = 8 * 1024 * 1024
    stock = servers("stock", "-g")  # gevent mode uses socket.send, not sendall
    with stock.client() as kong:
        iid = kong.start_instance({"mode": "big_exit", "size": size})
        with pytest.raises(ReplyTimeout):
            kong.handle_event(iid, timeout=3)  # only part of the frame ever arrives

    aigov = servers("aigov")
    with aigov.client() as kong:
        iid = kong.start_instance({"mode": "big_exit", "size": size})
        reply = kong.handle_event(iid, timeout=20)
        assert reply["Data"]["Method"] == "kong.response.exit"
        assert reply["Data"]["Args"][1] == "x" * size


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _spawn_orphan(cmd: list[str], prefix: Path, socket_path: Path) -> int:
    """Start `cmd` from an intermediate parent that exits once the socket is up."""
    launcher = (
        "import os, subprocess, sys, time\n"
        f"p = subprocess.Popen({cmd!r}, stdout=open({str(prefix / 'orphan.out')!r}, 'wb'), "
        f"stderr=open({str(prefix / 'orphan.err')!r}, 'wb'))\n"
        "print(p.pid, flush=True)\n"
        "deadline = time.time() + 20\n"
        f"while not os.path.exists({str(socket_path)!r}) and time.time() < deadline: time.sleep(0.05)\n"
        "time.sleep(0.5)\n"
    )
    out = subprocess.run([PYTHON, "-c", launcher], capture_output=True, text=True, timeout=30,
                         env=server_env(), cwd=str(prefix))
    return int(out.stdout.strip())


def test_parent_death_ends_the_server(short_prefix):
    stock_prefix = short_prefix / "stock"
    aigov_prefix = short_prefix / "aigov"
    stock_prefix.mkdir()
    aigov_prefix.mkdir()
    socket_name = f"{TEST_PLUGIN}.socket"
    pids = []
    try:
        stock_pid = _spawn_orphan(
            [PYTHON, str(FIXTURE_PLUGINS / f"{TEST_PLUGIN}.py"), "--socket-name", socket_name,
             "-p", str(stock_prefix)], stock_prefix, stock_prefix / socket_name)
        pids.append(stock_pid)
        aigov_pid = _spawn_orphan(
            [PYTHON, "-m", "aigov.cli", "serve", "-p", str(aigov_prefix), "-d", str(FIXTURE_PLUGINS)],
            aigov_prefix, aigov_prefix / socket_name)
        pids.append(aigov_pid)
        # aigov notices within its 0.5 s poll and removes its socket
        assert _wait_until(lambda: not _alive(aigov_pid), timeout=5)
        assert not (aigov_prefix / socket_name).exists()
        assert "parent process died" in (aigov_prefix / "orphan.err").read_text()
        # the stock threading-mode watchdog only ends its own thread: the server lives on
        time.sleep(1.5)
        assert _alive(stock_pid)
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)


def test_instance_churn_leaves_no_growth(servers):
    stock = servers("stock")
    with stock.client() as kong:
        ids = [kong.start_instance({"mode": "echo"}) for _ in range(3)]
    # stock numbers instances 0, 1, 2, ... in every process: the root of the stale-id collision
    assert ids == [0, 1, 2]

    aigov = servers("aigov")
    cycles = 1500
    with aigov.client() as kong:
        warm = kong.start_instance({"mode": "two_calls"})
        kong.run_event(warm)
        kong.call("plugin.CloseInstance", warm)
        threads_before = thread_count(aigov.proc.pid)
        rss_before = proc_status(aigov.proc.pid)["rss_kib"]
        seen = set()
        for _ in range(cycles):
            iid = kong.start_instance({"mode": "two_calls", "tag": "x" * 200})
            seen.add(iid)
            assert len(kong.run_event(iid)) == 2
            kong.call("plugin.CloseInstance", iid)
        status = kong.call("plugin.GetStatus")
    assert len(seen) == cycles  # ids never reused within a process
    assert status["Plugins"][TEST_PLUGIN]["Instances"] == [] and status["Events"] == 0
    assert thread_count(aigov.proc.pid) <= threads_before + 2
    assert proc_status(aigov.proc.pid)["rss_kib"] - rss_before < 10_000


def test_stale_instance_id_after_restart(servers):
    def tag_seen(server, iid):
        with server.client() as kong:
            reply = kong.call_raw("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
            if reply[2] is not None:
                return reply[2]
            return json.loads(reply[3]["Data"]["Args"][1])

    for kind in ("stock", "aigov"):
        first = servers(kind)
        with first.client() as kong:
            stale = kong.start_instance({"mode": "report_config", "tag": "route-A"})
        first.stop()
        second = servers(kind)  # the respawned server, as after `kong reload` or a crash
        with second.client() as kong:
            fresh = kong.start_instance({"mode": "report_config", "tag": "route-B"})
        if kind == "stock":
            assert fresh == stale  # both processes count from 0
            assert tag_seen(second, stale) == "route-B"  # silently runs another route's config
        else:
            assert fresh != stale
            assert tag_seen(second, stale) == f"no plugin instance #{stale}"  # Kong re-creates
            assert tag_seen(second, fresh) == "route-B"


def test_invalid_utf8_in_a_message(servers):
    invalid = b"caf\xc3(\xff".decode("utf-8", "surrogateescape")  # bytes no UTF-8 decoder accepts
    stock = servers("stock")
    with stock.client() as kong:
        iid = kong.start_instance({"mode": "echo"})
        reply = kong.handle_event(iid)
        kong.send("plugin.Step", {"EventId": reply["EventId"], "Data": invalid})
        with pytest.raises((ConnectionClosed, ReplyTimeout)):
            kong.read_frame(timeout=HANG)  # the unpacker raised: the connection handler died

    aigov = servers("aigov")
    with aigov.client() as kong:
        iid = kong.start_instance({"mode": "echo"})
        reply = kong.handle_event(iid)
        reply = kong.step(reply["EventId"], invalid)
        assert reply["Data"] == {"Method": "kong.log.notice", "Args": ["str"]}  # a str handler-side
        reply = kong.step(reply["EventId"], None)
        # the original bytes go back to Kong unchanged
        assert reply["Data"] == {"Method": "kong.response.set_header", "Args": ["x-echo", invalid]}
        assert kong.step(reply["EventId"], None)["Data"] == "ret"
        # invalid UTF-8 in the method name and the config too: answered, connection alive
        _, _, err, _ = kong.call_raw("plugin.Start\udcffInstance", {})
        assert err.startswith("method plugin.Start")
        cfg = json.dumps({"mode": "echo", "tag": "x"}).replace("x", "\udcff")
        assert kong.call("plugin.StartInstance", {"Name": TEST_PLUGIN, "Config": cfg})["Id"]


def test_none_in_arguments(servers):
    def send_nones(kong):
        answers = []
        kong.send_raw(msgpack.packb([0, 41, "plugin.GetStatus", None]))
        answers.append(kong.read_frame(timeout=HANG))
        for method, params in (("plugin.HandleEvent", [None]), ("plugin.StartInstance", [None]),
                               ("plugin.Step", [{"EventId": None, "Data": None}]),
                               ("plugin.CloseInstance", [None]), ("plugin.HandleEvent", [])):
            kong.send_raw(msgpack.packb([0, 42, method, params]))
            answers.append(kong.read_frame(timeout=HANG))
        kong.send_raw(msgpack.packb([0, 43, None, [None]]))
        answers.append(kong.read_frame(timeout=HANG))
        return answers

    stock = servers("stock")
    with stock.client() as kong:
        with pytest.raises((ConnectionClosed, ReplyTimeout)):
            send_nones(kong)  # a None params list or method kills the stock connection

    aigov = servers("aigov")
    with aigov.client() as kong:
        answers = send_nones(kong)
        assert answers[0][2] is None and answers[0][3]["Pid"] == aigov.proc.pid
        errors = [a[2] for a in answers[1:]]
        assert errors == [
            "plugin.HandleEvent expects {InstanceId, EventName}",
            "plugin.StartInstance expects {Name, Config}",
            "event id None not found",
            "no plugin instance #None",
            "plugin.HandleEvent expects one parameter, got none",
            "invalid method name None: expected 'plugin.<Method>'",
        ]
        # None inside callback Args is delivered as nil, and the connection still works
        iid = kong.start_instance({"mode": "none_args"})
        assert kong.run_event(iid) == [{"Method": "kong.response.set_header", "Args": ["x-none", None]}]


def test_unknown_method_and_namespace(servers):
    stock = servers("stock")
    with stock.client() as kong:
        _, _, err, _ = kong.call_raw("plugin.NoSuchMethod", 1)
        assert "no attribute 'no_such_method'" in err  # leaks a Python AttributeError
        _, _, err, _ = kong.call_raw("pdk.Call", 1)
        assert err == "RPC for pdk is not supported"
        kong.send("NoNamespace", 1)
        with pytest.raises((ConnectionClosed, ReplyTimeout)):
            kong.read_frame(timeout=HANG)  # method.split(".") raised: connection gone

    aigov = servers("aigov")
    with aigov.client() as kong:
        _, _, err, _ = kong.call_raw("plugin.NoSuchMethod", 1)
        assert err == "method plugin.NoSuchMethod is not supported"
        _, _, err, _ = kong.call_raw("pdk.Call", 1)
        assert err == "RPC for pdk is not supported"
        _, _, err, _ = kong.call_raw("NoNamespace", 1)
        assert err == "invalid method name 'NoNamespace': expected 'plugin.<Method>'"
        assert kong.call("plugin.GetStatus")["Pid"] == aigov.proc.pid


def test_malformed_frame_closes_that_connection_only(servers):
    for kind in ("stock", "aigov"):
        server = servers(kind)
        with server.client() as healthy, server.client() as broken:
            iid = healthy.start_instance({"mode": "transcript"})
            broken.send_raw(b"\x94\x00\x01\xc1")  # a request array holding a never-used byte
            with pytest.raises((ConnectionClosed, ReplyTimeout)):
                broken.read_frame(timeout=HANG)
            assert len(healthy.run_event(iid, {"kong.request.get_header": "ok"}, timeout=5)) == 4
        assert server.proc.poll() is None
