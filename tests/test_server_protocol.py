"""MsgPack:1 conformance of `aigov serve`, checked side by side with kong-pdk's stock server.

Each test drives the real server process over its Unix socket with the raw client in
_rpc_client.py, sending exactly the frames Kong's mp_rpc.lua sends (reference §2).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import msgpack
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rpc_client import (  # noqa: E402
    ConnectionClosed, FIXTURE_PLUGINS, REPO, TEST_PLUGIN, start_aigov, start_stock,
    aigov_server, short_prefix,  # noqa: F401 - pytest fixtures
)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("starter", [start_stock, start_aigov], ids=["stock", "aigov"])
def test_transcript_of_reference_2_3_on_both_servers(short_prefix, starter):
    """HandleEvent -> get_header -> log.notice -> ctx.shared.set -> set_header -> ret (§2.3)."""
    server = starter(short_prefix)
    try:
        with server.client() as kong:
            iid = kong.start_instance({"mode": "transcript"})
            assert isinstance(iid, int)
            kong.msgid = 4  # the verified transcript starts at msgid 5
            frame = kong.call_raw("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
            eid = frame[3]["EventId"]
            assert frame == [1, 5, None, {"Data": {"Method": "kong.request.get_header",
                                                   "Args": ["x-test"]}, "EventId": eid}]
            frame = kong.call_raw("plugin.Step", {"EventId": eid, "Data": "fine"})
            assert frame == [1, 6, None, {"Data": {"Method": "kong.log.notice",
                                                   "Args": ["got header", "fine"]}, "EventId": eid}]
            frame = kong.call_raw("plugin.Step", {"EventId": eid, "Data": None})
            assert frame == [1, 7, None, {"Data": {"Method": "kong.ctx.shared.set",
                                                   "Args": ["py_key", {"a": 1}]}, "EventId": eid}]
            frame = kong.call_raw("plugin.Step", {"EventId": eid, "Data": None})
            assert frame == [1, 8, None, {"Data": {"Method": "kong.response.set_header",
                                                   "Args": ["x-py", "fine"]}, "EventId": eid}]
            frame = kong.call_raw("plugin.Step", {"EventId": eid, "Data": None})
            assert frame == [1, 9, None, {"Data": "ret", "EventId": eid}]
            # The event is gone once it returned: a late Step is an error, not a hang.
            _, _, err, result = kong.call_raw("plugin.Step", {"EventId": eid, "Data": None})
            assert err == f"event id {eid} not found" and result is None
    finally:
        server.stop()


@pytest.mark.parametrize("starter", [start_stock, start_aigov], ids=["stock", "aigov"])
def test_instance_methods_have_kong_pdk_shapes(short_prefix, starter):
    server = starter(short_prefix)
    try:
        with server.client() as kong:
            config = {"mode": "echo", "size": 0, "sleep": 0, "tag": None, "__seq__": 3}
            started = kong.call("plugin.StartInstance", {"Name": TEST_PLUGIN, "Config": json.dumps(config)})
            assert set(started) == {"Name", "Id", "Config", "StartTime"}
            assert started["Name"] == TEST_PLUGIN and started["Config"] == config
            iid = started["Id"]
            status = kong.call("plugin.InstanceStatus", iid)
            assert status["Id"] == iid and status["Config"] == config
            overall = kong.call("plugin.GetStatus")
            assert overall["Pid"] == server.proc.pid
            assert [i["Id"] for i in overall["Plugins"][TEST_PLUGIN]["Instances"]] == [iid]
            info = kong.call("plugin.GetPluginInfo", TEST_PLUGIN)
            assert info["Name"] == TEST_PLUGIN and info["Phases"] == ["log", "access"]
            assert kong.call("plugin.SetPluginDir", str(FIXTURE_PLUGINS)) == "ok"
            closed = kong.call("plugin.CloseInstance", iid)
            assert closed == {"Name": TEST_PLUGIN, "Id": iid, "Config": config}
            for method in ("plugin.CloseInstance", "plugin.InstanceStatus"):
                _, _, err, _ = kong.call_raw(method, iid)
                assert err == f"no plugin instance #{iid}"
            _, _, err, _ = kong.call_raw("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
            assert err == f"no plugin instance #{iid}"
    finally:
        server.stop()


@pytest.mark.parametrize("step_method", ["plugin.StepMultiMap", "plugin.StepCredential",
                                         "plugin.StepConsumer", "plugin.StepRoute",
                                         "plugin.StepService", "plugin.StepMemoryStats"])
def test_every_typed_step_delivers_data_like_step(aigov_server, step_method):
    with aigov_server.client() as kong:
        iid = kong.start_instance({"mode": "echo"})
        reply = kong.handle_event(iid)
        reply = kong.step(reply["EventId"], {"k": ["v1", "v2"]}, method=step_method)
        assert reply["Data"] == {"Method": "kong.log.notice", "Args": ["dict"]}
        reply = kong.step(reply["EventId"], None)
        assert reply["Data"] == {"Method": "kong.response.set_header",
                                 "Args": ["x-echo", {"k": ["v1", "v2"]}]}
        assert kong.step(reply["EventId"], None)["Data"] == "ret"


def test_step_error_gives_lua_style_none_data(aigov_server):
    """StepError delivers (None, err): the handler's data is None (kong-pdk semantics)."""
    with aigov_server.client() as kong:
        iid = kong.start_instance({"mode": "echo"})
        reply = kong.handle_event(iid)
        reply = kong.step(reply["EventId"], "no such header", method="plugin.StepError")
        assert reply["Data"] == {"Method": "kong.log.notice", "Args": ["NoneType"]}


def test_python_style_raises_on_step_error_and_event_ends_cleanly(short_prefix):
    server = start_aigov(short_prefix, "--no-lua-style")
    try:
        with server.client() as kong:
            iid = kong.start_instance({"mode": "echo"})
            reply = kong.handle_event(iid)
            # python style: the handler gets the bare data, not a (data, err) pair
            reply = kong.step(reply["EventId"], "plain")
            assert reply["Data"] == {"Method": "kong.log.notice", "Args": ["str"]}
            reply = kong.step(reply["EventId"], None)
            assert reply["Data"] == {"Method": "kong.response.set_header", "Args": ["x-echo", "plain"]}
            assert kong.step(reply["EventId"], None)["Data"] == "ret"
            reply = kong.handle_event(iid)
            reply = kong.step(reply["EventId"], "bad", method="plugin.StepError")
            assert reply["Data"] == "ret"  # PDKError raised in the handler; request continues
            assert kong.call("plugin.GetStatus")["Events"] == 0
        assert "PDKError: exception from kong.request.get_header: bad" in server.stderr()
    finally:
        server.stop()


def test_start_instance_errors_are_answered(aigov_server):
    with aigov_server.client() as kong:
        cases = [
            ({"Name": "no-such-plugin", "Config": "{}"}, "no-such-plugin not initialized"),
            ({"Name": TEST_PLUGIN, "Config": "{not json"}, "Config is not JSON"),
            ({"Name": TEST_PLUGIN, "Config": "[1, 2]"}, "Config must be a JSON object"),
            ("a string", "expects {Name, Config}"),
        ]
        for param, expected in cases:
            _, _, err, result = kong.call_raw("plugin.StartInstance", param)
            assert expected in err and result is None
        _, _, err, _ = kong.call_raw("plugin.HandleEvent", {"InstanceId": kong.start_instance(
            {"mode": "echo"}), "EventName": "rewrite"})
        assert err == "aigov-test does not implement phase 'rewrite'"
        # still serving on the same connection
        assert kong.call("plugin.GetStatus")["Events"] == 0


def test_log_phase_and_log_arg_sanitizing(aigov_server):
    with aigov_server.client() as kong:
        iid = kong.start_instance({"mode": "echo"})
        calls = kong.run_event(iid, phase="log")
        assert calls == [{"Method": "kong.log.notice", "Args": ["log phase"]}]


def test_socket_serves_only_its_plugin(short_prefix):
    """With several plugins, each socket's StartInstance accepts only its own plugin name."""
    plugins_dir = short_prefix / "plugins"
    plugins_dir.mkdir()
    source = (FIXTURE_PLUGINS / f"{TEST_PLUGIN}.py").read_text()
    (plugins_dir / "one.py").write_text(source)
    (plugins_dir / "two.py").write_text(source)
    server = start_aigov(short_prefix, plugins_dir=plugins_dir, plugin="two")
    try:
        assert (short_prefix / "one.socket").exists()
        with server.client() as kong:
            assert kong.start_instance({"mode": "echo"}, name="two")
            _, _, err, _ = kong.call_raw("plugin.StartInstance", {"Name": "one", "Config": "{}"})
            assert err == "plugin one is not served on the socket of two"
    finally:
        server.stop()


def test_malformed_frame_closes_only_that_connection(aigov_server):
    with aigov_server.client() as healthy, aigov_server.client() as broken:
        iid = healthy.start_instance({"mode": "transcript"})
        broken.send_raw(b"\xc1")  # a byte msgpack never uses
        with pytest.raises(ConnectionClosed):
            broken.read_frame(timeout=5)
        assert len(healthy.run_event(iid, {"kong.request.get_header": "ok"})) == 4
    with aigov_server.client() as fresh:
        assert fresh.call("plugin.GetStatus")["Pid"] == aigov_server.proc.pid


def test_frame_without_msgid_closes_connection_and_notification_is_ignored(aigov_server):
    with aigov_server.client() as kong:
        kong.send_raw(msgpack.packb([2, "serverPid", 123]))  # notifications need no answer
        assert kong.call("plugin.GetStatus")["Pid"] == aigov_server.proc.pid
        kong.send_raw(msgpack.packb({"not": "a request"}))
        with pytest.raises(ConnectionClosed):
            kong.read_frame(timeout=5)


@pytest.mark.parametrize("starter", [start_stock, start_aigov], ids=["stock", "aigov"])
@pytest.mark.parametrize("plugin", ["llm-semantic-cache", "llm-token-quota", "llm-semantic-router"])
def test_real_plugin_modules_run_unchanged_on_both_servers(short_prefix, starter, plugin):
    """The thin plugins/ modules, given Kong's default-filled config, run an access event to its
    end on either server (their own logic is tested in their own test files)."""
    # Default-filled config without kongsim's validation: validating config is Kong's (and
    # kongsim's) job, not the plugin server's.
    from aigov.schema import default_config

    server = starter(short_prefix, plugin=plugin, plugins_dir=REPO / "plugins")
    try:
        with server.client() as kong:
            info = kong.call("plugin.GetPluginInfo", plugin)
            assert "access" in info["Phases"]
            config = default_config(info["Schema"]["fields"][0]["config"]["fields"])
            iid = kong.start_instance(config, name=plugin)
            calls = kong.run_event(iid, timeout=30)
            assert calls, "the handler made no PDK call"
            assert all(c["Method"].startswith("kong.") for c in calls)
            assert kong.call("plugin.CloseInstance", iid)["Id"] == iid
            if starter is start_aigov:
                assert kong.call("plugin.GetStatus")["Events"] == 0
    finally:
        server.stop()


def test_status_calls_mask_the_schemas_encrypted_fields(short_prefix):
    """InstanceStatus and GetStatus show an instance's config with the fields its schema marks
    `encrypted` (the Redis password, API keys) masked; StartInstance still echoes what Kong sent."""
    server = start_aigov(short_prefix, plugins_dir=REPO / "plugins", plugin="llm-token-quota")
    try:
        with server.client() as kong:
            config = {"policy": "redis", "limits": [{"window": "day", "tokens": 100}],
                      "redis": {"host": "127.0.0.1", "port": 6379, "password": "s3cret-pw"}}
            started = kong.call("plugin.StartInstance", {"Name": "llm-token-quota", "Config": json.dumps(config)})
            assert started["Config"]["redis"]["password"] == "s3cret-pw"
            shown = kong.call("plugin.InstanceStatus", started["Id"])["Config"]
            assert shown["redis"] == {"host": "127.0.0.1", "port": 6379, "password": "<redacted>"}
            assert shown["limits"] == config["limits"]
            overall = kong.call("plugin.GetStatus")
            assert "s3cret-pw" not in json.dumps(overall)
    finally:
        server.stop()
