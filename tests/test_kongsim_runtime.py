"""The stand-in against real kong-pdk 0.36 dedicated plugin servers (the probe plugin in
tests/fixtures/kongsim/kt-probe.py): discovery, spawning, instances, the bridge loop, phases."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "kongsim"))
from helpers import Upstream, probe_entry, read_records, running_upstream  # noqa: E402

from kongsim import process  # noqa: E402
from kongsim.gateway import Gateway  # noqa: E402
from kongsim.process import DiscoveryError, PluginServerEntry  # noqa: E402
from kongsim.pytest_plugin import make_prefix, start_gateway  # noqa: E402
from kongsim.runloop import LoadError  # noqa: E402

pytestmark = pytest.mark.timeout(120)


upstream = pytest.fixture()(running_upstream)


@pytest.fixture()
def prefix():
    p = make_prefix()
    yield p


def kong_yml(up: Upstream, plugins: list, path: str = "/p", **route) -> dict:
    return {"_format_version": "3.0",
            "services": [{"name": "svc", "url": up.url + "/base",
                          "routes": [{"name": "r", "paths": [path], **route}]}],
            "consumers": [{"username": "alice", "keyauth_credentials": [{"key": "alice-key-123"}]}],
            "plugins": plugins}


def probe(rec: Path, **config) -> dict:
    return {"name": config.pop("name", "kt-probe"), "config": {"record_file": str(rec), **config}}


def events(rec: Path, kind: str, name: str | None = None) -> list[dict]:
    return [r for r in read_records(rec) if r["event"] == kind and (name is None or r["name"] == name)]


def test_discovery_rejects_non_json_and_invalid_info(prefix) -> None:
    garbage = PluginServerEntry("bad", f"{prefix}/bad.socket", "echo hello; echo oops >&2")
    with pytest.raises(DiscoveryError, match="Not a plugin info table"):
        Gateway({"_format_version": "3.0"}, [garbage]).start()
    bad_version = PluginServerEntry(
        "bv", f"{prefix}/bv.socket",
        """echo '[{"Name":"bv","Priority":1,"Version":null,"Schema":{"name":"bv","fields":[{"config":{"type":"record","fields":[]}}]}}]'""")
    with pytest.raises(DiscoveryError, match="Version must be a dotted string"):
        Gateway({"_format_version": "3.0"}, [bad_version]).start()


def test_unknown_and_unimitated_plugins_are_reported(upstream, prefix, caplog) -> None:
    with pytest.raises(LoadError) as err:
        Gateway(kong_yml(upstream, [{"name": "py-missing"}, {"name": "rate-limiting"}])).start()
    assert "plugin 'py-missing' is enabled but not installed" in str(err.value)
    assert "bundled plugin 'rate-limiting' is not imitated by the stand-in" in str(err.value)
    caplog.set_level(logging.WARNING, logger="kongsim")
    gw = Gateway(kong_yml(upstream, [{"name": "rate-limiting"}]), allow_unimitated=True).start()
    try:
        assert "'rate-limiting' is not imitated by the stand-in; it will NOT run" in caplog.text
    finally:
        gw.close()


def test_bad_plugin_config_fails_at_load_listing_fields(upstream, prefix, tmp_path) -> None:
    cfg = kong_yml(upstream, [{"name": "kt-probe", "config": {"mode": "nope", "extra": 1}}])
    with pytest.raises(LoadError) as err:
        start_gateway(cfg, server=[probe_entry(prefix)], prefix=prefix, http=False)
    text = str(err.value)
    assert "plugins[0]: plugin 'kt-probe': schema violation" in text
    assert "config.extra: unknown field" in text and "config.mode: expected one of" in text


def test_start_instance_config_has_defaults_and_kong_keys(upstream, prefix) -> None:
    rec = Path(prefix) / "rec.jsonl"
    cfg = kong_yml(upstream, [])
    cfg["services"][0]["routes"][0]["plugins"] = [probe(rec, tag="T")]
    gw = start_gateway(cfg, server=[probe_entry(prefix)], prefix=prefix, http=False)
    try:
        r = gw.request("GET", "/p/x?a=1&flag", headers={"x-test": "hello"})
        assert r.status == 200 and r.header("X-kt-probe-Tag") == "T"
        echoed = json.loads(r.body)
        assert echoed["path"] == "/base/x?a=1&flag"  # strip_path default true
        conf = events(rec, "init")[0]["config"]
        route = gw.gateway.runloop.config.routes[0]
        assert conf["route_id"] == route.id and "service_id" not in conf and "consumer_id" not in conf
        assert conf["nested"] == {"level": 3, "label": None} and conf["items"] is None
        assert conf["__key__"] == f"plugins:kt-probe:{route.id}::::{conf['__ws_id']}"
        assert isinstance(conf["__seq__"], int) and conf["__plugin_id"]
        access = events(rec, "access")[0]
        assert access["query"] == {"a": ["1"], "flag": []}  # must_fix: flag true -> []
        assert access["headers"]["x-test"] == ["hello"] and access["route"] == "r"
    finally:
        gw.close()


def test_near_empty_environment_with_passthrough(upstream, prefix, monkeypatch) -> None:
    monkeypatch.setenv("KONGSIM_NOT_PASSED", "1")
    monkeypatch.setenv("KONGSIM_PASSED", "yes")
    entry = probe_entry(prefix)
    entry.env_passthrough = ("KONGSIM_PASSED",)
    gw = start_gateway(kong_yml(upstream, [{"name": "kt-probe", "config": {"mode": "env"}}]),
                       server=[entry], prefix=prefix, http=False)
    try:
        env_keys = set(json.loads(gw.request("GET", "/p").header("X-Env")))
        assert "KONGSIM_PASSED" in env_keys
        assert not env_keys & {"KONGSIM_NOT_PASSED", "HOME", "PATH", "VIRTUAL_ENV"}
        # only the inline start_cmd variables, TZ, the passthrough, what sh sets, and the
        # LC_CTYPE Python itself sets when it coerces the C locale (PEP 538)
        assert env_keys <= {"KT_NAME", "KT_PRIORITY", "KT_PHASES", "KONGSIM_PASSED", "TZ", "PWD",
                            "SHLVL", "_", "OLDPWD", "LC_CTYPE"}
    finally:
        gw.close()



def test_query_cmd_sees_the_masters_full_environment(prefix) -> None:
    """Kong runs query_cmd from the nginx master's init, which keeps its environment; only the
    workers, and so start_cmd, get the cleared one. A variable missing from nginx_main_env thus
    reaches the plugin's dump but not its server, on Kong and on the stand-in alike."""
    entry = probe_entry(prefix)
    entry.query_cmd = entry.query_cmd.replace("KT_PHASES=access,log ", "")
    master = {**os.environ, "KT_PHASES": "access,response,log"}
    assert "response" in process.discover(entry, environ=master).phases
    assert "response" not in process.discover(entry, environ={"PATH": os.environ["PATH"]}).phases
    assert "KT_PHASES" not in process.child_environment(entry, master)  # not in nginx_main_env


def test_start_cmd_gets_every_nginx_main_env_variable(tmp_path) -> None:
    """Through kong.conf, as Kong renders it: the variables after the first `; env` reach the
    spawned server too, `env NAME=value` sets one, unlisted ones stay out."""
    out = tmp_path / "env.out"
    conf_file = tmp_path / "kong.conf"
    conf_file.write_text(
        "pluginserver_names = envdump\n"
        f"pluginserver_envdump_socket = {tmp_path}/envdump.socket\n"
        "pluginserver_envdump_query_cmd = /bin/true\n"
        f"pluginserver_envdump_start_cmd = /bin/sh -c '/usr/bin/env > {out}.tmp && "
        f"/bin/mv {out}.tmp {out}; exec /bin/sleep 60'\n"
        "nginx_main_env = KONGSIM_FIRST; env AIGOV_CAPTURE_PHASE; env \"KONGSIM_SET=from conf\"\n")
    _, (entry,) = process.load_kong_conf(conf_file, {})
    assert entry.env_passthrough == ("KONGSIM_FIRST", "AIGOV_CAPTURE_PHASE", "KONGSIM_SET=from conf")
    server = process.ManagedServer(entry, {"KONGSIM_FIRST": "1", "AIGOV_CAPTURE_PHASE": "log",
                                           "KONGSIM_SET": "parent", "KONGSIM_UNLISTED": "x",
                                           "PATH": "/usr/bin:/bin"})
    server.start()
    try:
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        env = dict(line.split("=", 1) for line in out.read_text().splitlines())
    finally:
        server.stop()
    assert env["KONGSIM_FIRST"] == "1" and env["AIGOV_CAPTURE_PHASE"] == "log"
    assert env["KONGSIM_SET"] == "from conf"
    assert "KONGSIM_UNLISTED" not in env and "PATH" not in env

def test_respawn_after_kill_and_stale_instance_reset(upstream, prefix) -> None:
    rec = Path(prefix) / "rec.jsonl"
    gw = start_gateway(kong_yml(upstream, [probe(rec)]), server=[probe_entry(prefix)],
                       prefix=prefix, http=False)
    try:
        assert gw.request("GET", "/p").header("X-kt-probe-Tag") == "probe"
        server = gw.gateway.managed["kt-probe"]
        old_pid = server.pid
        server.kill()
        deadline = time.monotonic() + 20
        while (server.pid == old_pid or server.spawn_count < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.pid != old_pid
        # Kong's next_spawn = now + 1: two spawns are never less than a second apart
        assert server.spawn_times[1] - server.spawn_times[0] >= 0.99
        from kongsim.process import wait_for_socket
        wait_for_socket(f"{prefix}/kt-probe.socket", 20)
        # the worker still holds instance #0 of the dead process: "no plugin instance" -> retry
        r = gw.request("GET", "/p")
        assert r.status == 200 and r.header("X-kt-probe-Tag") == "probe"
        pids = [e["pid"] for e in events(rec, "init")]
        assert len(pids) == 2 and pids[0] != pids[1]
    finally:
        gw.close()


def test_workers_get_their_own_instances_and_pooled_connections(upstream, prefix) -> None:
    rec = Path(prefix) / "rec.jsonl"
    gw = start_gateway(kong_yml(upstream, [probe(rec)]), server=[probe_entry(prefix)],
                       prefix=prefix, http=False, workers=3)
    try:
        for i in range(6):
            assert gw.request("GET", "/p", worker=i % 3).status == 200
            # Kong runs log in a timer after the response: a worker's next request could
            # overlap it and rightly take a second connection. Strictly one call at a time here.
            assert gw.wait_logs()
        assert len(events(rec, "init")) == 3  # one StartInstance per worker
        for w in gw.gateway.runloop.workers:
            client = w.rpc["kt-probe"]
            # two requests x (Start?, HandleEvent, steps, log) on one pooled connection
            assert client.connections_opened == 1 and client.calls > 10
        # concurrent requests in one worker use separate connections
        gw.gateway.reload(kong_yml(upstream, [probe(rec, mode="sleep", sleep_s=0.5)]))
        threads = [threading.Thread(target=gw.request, args=("GET", "/p"), kwargs={"worker": 0})
                   for _ in range(3)]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        assert gw.gateway.runloop.workers[0].rpc["kt-probe"].connections_opened >= 3
    finally:
        gw.close()


def test_config_change_starts_new_instance_and_closes_old(upstream, prefix) -> None:
    rec = Path(prefix) / "rec.jsonl"
    gw = start_gateway(kong_yml(upstream, [probe(rec, tag="one")]), server=[probe_entry(prefix)],
                       prefix=prefix, http=False)
    try:
        assert gw.request("GET", "/p").header("X-kt-probe-Tag") == "one"
        worker = gw.gateway.runloop.workers[0]
        # Let request 1's log phase finish first: run after the reload, it would carry the old
        # __seq__ and (as in Kong) start the old config's instance again.
        assert gw.wait_logs(30)
        (old,) = worker.instances.values()
        gw.gateway.reload(kong_yml(upstream, [probe(rec, tag="two")]))
        assert gw.request("GET", "/p").header("X-kt-probe-Tag") == "two"
        assert gw.wait_logs(30)
        (new,) = worker.instances.values()
        inits = events(rec, "init")
        assert [i["config"]["tag"] for i in inits] == ["one", "two"]
        assert inits[1]["config"]["__seq__"] > inits[0]["config"]["__seq__"] and new.id != old.id
        from kongsim.rpc import RpcError
        with pytest.raises(RpcError, match="no plugin instance"):
            worker.rpc["kt-probe"].call("InstanceStatus", old.id)  # CloseInstance(old) happened
    finally:
        gw.close()


def test_exit_skips_later_access_but_their_log_runs(upstream, prefix) -> None:
    rec = Path(prefix) / "rec.jsonl"
    entries = [probe_entry(prefix, "kt-first", 2000), probe_entry(prefix, "kt-second", 1000)]
    cfg = kong_yml(upstream, [probe(rec, name="kt-first", mode="exit", exit_status=418),
                              probe(rec, name="kt-second")])
    gw = start_gateway(cfg, server=entries, prefix=prefix, http=False)
    try:
        r = gw.request("GET", "/p")
        assert r.status == 418 and r.header("X-Exit-By") == "kt-first"
        assert r.json() == {"exit_by": "kt-first"} and r.header("X-kt-first-Tag") == "probe"
        assert gw.wait_logs()
        assert events(rec, "access", "kt-first") and not events(rec, "access", "kt-second")
        logs = {e["name"]: e for e in events(rec, "log")}
        assert set(logs) == {"kt-first", "kt-second"} and logs["kt-second"]["status"] == 418
        assert logs["kt-second"]["serialize"]["response"]["status"] == 418
        assert upstream.requests == []  # never proxied
    finally:
        gw.close()


def test_order_ctx_shared_and_log_phase_saved_data(upstream, prefix) -> None:
    rec = Path(prefix) / "rec.jsonl"
    entries = [probe_entry(prefix, "kt-a", 500), probe_entry(prefix, "kt-b", 500),
               probe_entry(prefix, "kt-c", 900)]
    cfg = kong_yml(upstream, [probe(rec, name=n) for n in ("kt-a", "kt-b", "kt-c")]
                   + [{"name": "key-auth", "route": "r"}])
    gw = start_gateway(cfg, server=entries, prefix=prefix, http=False)
    try:
        r = gw.request("POST", "/p/q?x=1", headers={"apikey": "alice-key-123", "x-test": "t1"},
                       json={"hello": "world"})
        assert r.status == 200
        # priority 900 first, then equal priority 500 by descending name (reference §4.4)
        assert r.header("X-Order") == "kt-c,kt-b,kt-a"
        assert gw.wait_logs()
        logs = {e["name"]: e for e in events(rec, "log")}
        ser = logs["kt-a"]["serialize"]
        assert logs["kt-a"]["serialize_type"] == "str"  # kong.log.serialize is a JSON string
        assert ser["request"]["method"] == "POST" and ser["request"]["uri"] == "/p/q?x=1"
        # kong/pdk/log.lua masks Authorization and Proxy-Authorization only: without
        # hide_credentials, Kong's log entry carries the key-auth key (Kong/kong#2532)
        assert ser["request"]["headers"]["apikey"] == "alice-key-123"
        assert ser["request"]["id"] == r.header("X-Kong-Request-Id")
        assert ser["response"]["status"] == 200 and ser["route"]["name"] == "r"
        assert ser["service"]["name"] == "svc" and ser["consumer"]["username"] == "alice"
        assert ser["upstream_uri"] == "/base/q?x=1" and ser["latencies"]["proxy"] >= 0
        assert logs["kt-a"]["shared"] == ["kt-c", "kt-b", "kt-a"]  # kong.ctx.shared across plugins
        assert logs["kt-a"]["resp_header"] == "kt-c,kt-b,kt-a"  # saved response headers
        assert logs["kt-a"]["req_header"] == "t1" and logs["kt-a"]["ctx"] == {"seen": True}
        assert events(rec, "access", "kt-a")[0]["raw_body"] == '{"hello": "world"}'
        assert events(rec, "access", "kt-a")[0]["consumer"] == "alice"
    finally:
        gw.close()


def test_response_phase_sees_upstream_body_and_exit_replaces_it(upstream, prefix) -> None:
    rec = Path(prefix) / "rec.jsonl"
    entry = probe_entry(prefix, phases="access,response,log")
    gw = start_gateway(kong_yml(upstream, [probe(rec)]), server=[entry], prefix=prefix, http=False)
    try:
        r = gw.request("GET", "/p/body")
        resp = events(rec, "response")[0]
        assert resp["type"] == "bytes" and json.loads(resp["body"])["path"] == "/base/body"
        assert resp["status"] == 200 and r.header("X-Upstream-Len") == str(len(r.body))
        gw.gateway.reload(kong_yml(upstream, [probe(rec, mode="rewrite_body")]))
        r = gw.request("GET", "/p/body")
        assert r.status == 201 and r.header("X-Rewritten") == "1"
        assert json.loads(r.body)["PATH"] == "/BASE/BODY"
    finally:
        gw.close()


def test_step_timeout_logs_and_continues(upstream, prefix, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="kongsim")
    gw = start_gateway(kong_yml(upstream, [{"name": "kt-probe", "config": {"mode": "sleep", "sleep_s": 3}}]),
                       server=[probe_entry(prefix)], prefix=prefix, http=False, step_timeout_s=1.0)
    try:
        t0 = time.monotonic()
        r = gw.request("GET", "/p")
        assert r.status == 200 and r.header("X-Slept") is None  # proxied as if the plugin passed
        assert time.monotonic() - t0 < 2.8
        assert "did not answer within the step timeout" in caplog.text
    finally:
        gw.close()


def test_wrong_phase_pdk_call_is_a_500(upstream, prefix) -> None:
    gw = start_gateway(kong_yml(upstream, [{"name": "kt-probe", "config": {"mode": "lua_error"}}]),
                       server=[probe_entry(prefix)], prefix=prefix, http=False)
    try:
        r = gw.request("GET", "/p")
        assert r.status == 500 and r.json() == {"message": "An unexpected error occurred"}
        assert upstream.requests == []
    finally:
        gw.close()


def test_lua_error_in_the_response_phase_is_a_500(upstream, prefix) -> None:
    # Kong.response() calls the handlers unprotected: the buffered answer is replaced by a 500.
    gw = start_gateway(kong_yml(upstream, [{"name": "kt-probe", "config": {"mode": "response_lua_error"}}]),
                       server=[probe_entry(prefix, phases="access,response,log")], prefix=prefix, http=False)
    try:
        r = gw.request("GET", "/p")
        assert len(upstream.requests) == 1  # proxied, then the response phase failed
        assert r.status == 500 and r.json() == {"message": "An unexpected error occurred"}
    finally:
        gw.close()


def test_key_auth_duplicate_key_and_hide_credentials_follow_kong(upstream, prefix) -> None:
    # key-auth handler.lua: a key sent twice is a Lua table, 401 "Duplicate API key found";
    # hide_credentials clears the query argument and the header of that name, wherever the key was.
    cfg = kong_yml(upstream, [{"name": "key-auth", "route": "r", "config": {"hide_credentials": True}}])
    gw = start_gateway(cfg, server=[probe_entry(prefix)], prefix=prefix, http=False)
    gw.finished_request(None)  # start keeping finished requests
    try:
        dup = gw.request("GET", "/p?apikey=alice-key-123&apikey=alice-key-123")
        assert dup.status == 401 and dup.json() == {"message": "Duplicate API key found"}
        assert dup.header("WWW-Authenticate") == "Key"
        ok = gw.request("GET", "/p?apikey=stray&keep=1", headers={"apikey": "alice-key-123",
                                                                  "Authorization": "Basic czpz"})
        assert ok.status == 200
        seen = upstream.requests[-1]
        assert "apikey" not in seen["headers"] and "apikey" not in seen["path"] and "keep=1" in seen["path"]
        logged = gw.finished_request(ok.header("X-Kong-Request-Id")).saved["serialize"]["request"]["headers"]
        # the cleared key is gone from Kong's log entry too; Authorization is masked as Kong does
        assert "apikey" not in logged and logged["authorization"] == "REDACTED"
        entry = gw.finished_request(ok.header("X-Kong-Request-Id")).saved["serialize"]
        assert entry["request"]["querystring"] == {"keep": "1"}  # get_query after clear_query_arg
        assert entry["request"]["uri"] == "/p?apikey=stray&keep=1"  # $request_uri, as sent
        assert len(upstream.requests) == 1  # the duplicate never reached the upstream
    finally:
        gw.close()


def test_vault_secret_resolved_and_credentials_never_logged(upstream, prefix, caplog, monkeypatch) -> None:
    caplog.set_level(logging.DEBUG, logger="kongsim")
    secret = "vault-secret-8f2c1d"
    monkeypatch.setenv("KT_PROBE_SECRET", secret)
    cfg = kong_yml(upstream, [{"name": "kt-probe", "config": {"mode": "secret",
                                                              "secret": "{vault://env/kt-probe-secret}"}},
                              {"name": "key-auth", "route": "r"}])
    gw = start_gateway(cfg, server=[probe_entry(prefix)], prefix=prefix, http=False)
    try:
        r = gw.request("GET", "/p?apikey=alice-key-123",
                       headers={"Authorization": "Bearer tok-aaaa-bbbb-cccc"})
        assert r.status == 200
        assert r.header("X-Secret-Sha") == hashlib.sha256(secret.encode()).hexdigest()[:16]
        bad = gw.request("GET", "/p", headers={"apikey": "wrong-key-zzz"})
        assert bad.status == 401 and bad.json() == {"message": "Unauthorized"}
        assert gw.request("GET", "/p").json() == {"message": "No API key found in request"}
        gw.wait_logs()
        deadline = time.monotonic() + 5
        while "stderr secret" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)  # the plugin's stderr reaches the log asynchronously
        text = caplog.text
        assert "stderr secret [REDACTED]" in text and "the secret is [REDACTED]" in text
        for credential in (secret, "alice-key-123", "tok-aaaa-bbbb-cccc", "wrong-key-zzz"):
            assert credential not in text
    finally:
        gw.close()
    fresh = make_prefix()
    with pytest.raises(LoadError, match="environment variable KT_MISSING_VAR is not set"):
        start_gateway(kong_yml(upstream, [{"name": "kt-probe",
                                           "config": {"secret": "{vault://env/kt-missing-var}"}}]),
                      server=[probe_entry(fresh)], prefix=fresh, http=False)


def test_http_front_streams_without_response_phase_and_buffers_with_it(upstream, prefix) -> None:
    cfg = kong_yml(upstream, [{"name": "kt-probe"}], path="/sse", strip_path=False)
    for phases, streamed in (("access,log", True), ("access,response,log", False)):
        p = make_prefix()
        gw = start_gateway(cfg, server=[probe_entry(p, phases=phases)], prefix=p)
        try:
            t0 = time.monotonic()
            reply, chunks = gw.request("GET", "/sse", stream=True)
            first = next(chunks)
            t_first = time.monotonic() - t0
            rest = b"".join(chunks)
            total = time.monotonic() - t0
            assert reply.status == 200 and b'"n": 2' in first + rest
            assert reply.header("Via") == "1.1 kong/3.9.1" and reply.header("X-Kong-Proxy-Latency")
            if streamed:
                # The upstream's pacing reaches the client after the first chunk (buffering: ~0).
                assert total - t_first >= 0.4 and total >= 0.55, (t_first, total)
            else:
                assert t_first >= 0.55 and b'"n": 0' in first and b'"n": 2' in first
        finally:
            gw.close()


def test_http_front_404_and_502(upstream, prefix) -> None:
    cfg = kong_yml(upstream, [])
    cfg["services"].append({"name": "dead", "url": "http://127.0.0.1:1",
                            "routes": [{"name": "dead", "paths": ["/dead"]}]})
    gw = start_gateway(cfg, server=[], prefix=prefix)
    try:
        r = gw.request("GET", "/nowhere")
        assert r.status == 404 and r.json() == {"message": "no Route matched with those values"}
        r = gw.request("GET", "/dead")
        assert r.status == 502
        assert r.json()["message"] == "An invalid response was received from the upstream server"
        r = gw.request("POST", "/p/x", json={"a": 1})
        assert r.status == 200 and json.loads(r.body)["body"] == '{"a": 1}'
    finally:
        gw.close()
