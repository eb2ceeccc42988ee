"""`aigov dump` (Kong's query_cmd) and the process hygiene of `aigov serve`: stdout silence,
SIGTERM shutdown with sockets unlinked, clear load errors."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rpc_client import (  # noqa: E402
    FIXTURE_PLUGINS, PYTHON, REPO, TEST_PLUGIN, server_env, start_aigov, wait_for_socket, wait_until,
    short_prefix,  # noqa: F401 - pytest fixture
)

pytestmark = pytest.mark.timeout(60)
REAL_PLUGINS = ("llm-semantic-cache", "llm-semantic-router", "llm-token-quota")
KONG_TYPES = {"string", "number", "integer", "boolean", "array", "set", "map", "record", "json", "foreign"}


def aigov(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "aigov.cli", *args], capture_output=True, timeout=60,
                          env=server_env(), cwd=str(cwd or REPO))


def _check_fields(fields: list, path: str) -> None:
    """The metaschema rules of reference §2.9 that a dump can break (kongsim does the rest)."""
    assert isinstance(fields, list)
    for item in fields:
        assert isinstance(item, dict) and len(item) == 1, f"{path}: not a single-key field"
        (name, spec), = item.items()
        where = f"{path}.{name}"
        assert spec.get("type") in KONG_TYPES, f"{where}: type {spec.get('type')!r}"
        if "description" in spec:
            assert 10 <= len(spec["description"]) <= 500, f"{where}: description length"
        if spec["type"] == "record":
            _check_fields(spec["fields"], where)
        if spec["type"] in ("array", "set"):
            assert "elements" in spec, f"{where}: needs elements"
        if spec["type"] == "map":
            assert "keys" in spec and "values" in spec, f"{where}: needs keys and values"


def _check_kong_info(info: dict, name: str) -> None:
    assert set(info) == {"Name", "Priority", "Version", "Schema", "Phases"}
    assert info["Name"] == name
    assert isinstance(info["Priority"], int) and not isinstance(info["Priority"], bool)
    assert isinstance(info["Version"], str) and 1 <= len(info["Version"].split(".")) <= 3
    assert all(part.isdigit() for part in info["Version"].split("."))
    phases_order = ["certificate", "rewrite", "log", "access", "preread", "response"]
    assert info["Phases"] == [p for p in phases_order if p in info["Phases"]]
    schema = info["Schema"]
    assert schema["name"] == name and len(schema["fields"]) == 1
    config = schema["fields"][0]["config"]
    assert config["type"] == "record"
    _check_fields(config["fields"], "config")


def test_dump_llm_semantic_cache_is_a_kong_valid_info_list():
    out = aigov("dump", "llm-semantic-cache")
    assert out.returncode == 0, out.stderr.decode()
    dumped = json.loads(out.stdout)  # all of stdout is the JSON, as Kong's io.popen reads it
    assert isinstance(dumped, list) and len(dumped) == 1
    _check_kong_info(dumped[0], "llm-semantic-cache")
    assert dumped[0]["Priority"] == 770
    try:
        from kongsim.metaschema import validate_plugin_schema
    except ImportError:
        return
    validate_plugin_schema(dumped[0])


def test_dump_all_lists_every_plugin_in_name_order():
    out = aigov("dump", "--all")
    assert out.returncode == 0, out.stderr.decode()
    dumped = json.loads(out.stdout)
    assert [d["Name"] for d in dumped] == list(REAL_PLUGINS)
    for info in dumped:
        _check_kong_info(info, info["Name"])


def test_dump_matches_the_stock_dedicated_server_dump():
    ours = aigov("dump", TEST_PLUGIN, "-d", str(FIXTURE_PLUGINS))
    stock = subprocess.run([PYTHON, str(FIXTURE_PLUGINS / f"{TEST_PLUGIN}.py"), "--dump"],
                           capture_output=True, timeout=60, env=server_env())
    assert ours.returncode == 0 and stock.returncode == 0
    assert json.loads(ours.stdout) == json.loads(stock.stdout)


def test_plugins_dir_from_environment(short_prefix):
    env = server_env()
    env["AIGOV_PLUGINS_DIR"] = str(FIXTURE_PLUGINS)
    out = subprocess.run([PYTHON, "-m", "aigov.cli", "dump", TEST_PLUGIN], capture_output=True,
                         timeout=60, env=env, cwd=str(short_prefix))
    assert out.returncode == 0 and json.loads(out.stdout)[0]["Name"] == TEST_PLUGIN


def _plugin_dir(base: Path, files: dict[str, str]) -> Path:
    plugins = base / "plugins"
    plugins.mkdir()
    for name, source in files.items():
        (plugins / f"{name}.py").write_text(source)
    return plugins


GOOD_BODY = "class Plugin:\n    def __init__(self, config): pass\n    def access(self, kong): pass\n"


@pytest.mark.parametrize("name, module, message", [
    ("no-version", "priority = 1\n" + GOOD_BODY, "version must be a string of 1 to 3 dotted numbers"),
    ("long-version", "version = '1.2.3.4'\n" + GOOD_BODY, "Kong rejects '1.2.3.4'"),
    ("str-priority", "version = '1.0'\npriority = 'high'\n" + GOOD_BODY, "priority must be an integer"),
    ("no-class", "version = '1.0'\n", "defines no class Plugin"),
    ("broken", "version = '1.0'\nimport no_such_module_xyz\n", "import failed: ModuleNotFoundError"),
    ("bad-schema", "version = '1.0'\nSchema = [{'a': {}, 'b': {}}]\n" + GOOD_BODY,
     "Schema must be a list of single-key dicts"),
])
def test_dump_rejects_what_kong_rejects(short_prefix, name, module, message):
    plugins = _plugin_dir(short_prefix, {name: module})
    out = aigov("dump", name, "-d", str(plugins))
    assert out.returncode == 1
    assert out.stdout == b""
    assert message in out.stderr.decode() and name in out.stderr.decode()


def test_dump_unknown_name_and_bad_arguments(short_prefix):
    out = aigov("dump", "llm-nope")
    assert out.returncode == 1 and out.stdout == b""
    assert "no plugin module llm-nope" in out.stderr.decode()
    assert "llm-semantic-cache" in out.stderr.decode()  # lists what is available
    out = aigov("dump")
    assert out.returncode == 2 and out.stdout == b"" and b"exactly one of NAME or --all" in out.stderr


NOISY = ("import os, sys\nprint('import-time noise')\nos.write(1, b'fd-level noise\\n')\n"
         "version = '1.0'\npriority = 5\n" + GOOD_BODY)


def test_dump_keeps_stdout_pure_json_when_a_plugin_prints(short_prefix):
    plugins = _plugin_dir(short_prefix, {"noisy": NOISY})
    out = aigov("dump", "noisy", "-d", str(plugins))
    assert out.returncode == 0
    assert json.loads(out.stdout)[0]["Name"] == "noisy"
    assert b"import-time noise" in out.stderr and b"fd-level noise" in out.stderr


def test_serve_never_writes_stdout_and_sigterm_unlinks_sockets(short_prefix):
    plugins = _plugin_dir(short_prefix, {"noisy": NOISY})
    (plugins / f"{TEST_PLUGIN}.py").write_text((FIXTURE_PLUGINS / f"{TEST_PLUGIN}.py").read_text())
    server = start_aigov(short_prefix, plugins_dir=plugins)
    # start_aigov waits for the aigov-test socket only; the listeners start one after another.
    wait_for_socket(short_prefix / "noisy.socket", server.proc)
    assert (short_prefix / "noisy.socket").exists()
    with server.client() as kong:
        iid = kong.start_instance({"mode": "print"})
        assert kong.run_event(iid) == [{"Method": "kong.response.set_header", "Args": ["x-printed", "yes"]}]
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert server.stdout() == b""
    assert "handler output that must not reach stdout" in server.stderr()
    assert "import-time noise" in server.stderr()
    assert not (short_prefix / "noisy.socket").exists()
    assert not (short_prefix / f"{TEST_PLUGIN}.socket").exists()


def test_an_old_server_stopping_after_a_reload_leaves_the_new_servers_socket(short_prefix):
    """`kong reload`: the new worker starts a new server, which binds a new socket file at the
    same path; then the old worker stops the old server, which must not remove that new file."""
    path = short_prefix / f"{TEST_PLUGIN}.socket"
    old = start_aigov(short_prefix)
    first = path.stat().st_ino
    new = start_aigov(short_prefix)
    try:
        assert wait_until(lambda: path.exists() and path.stat().st_ino != first, 10), "not re-bound"
        old.proc.send_signal(signal.SIGTERM)
        assert old.proc.wait(10) == 0
        assert path.exists(), "the old server removed the new server's socket"
        with new.client() as kong:
            assert kong.call("plugin.GetPluginInfo", TEST_PLUGIN)["Name"] == TEST_PLUGIN
    finally:
        old.stop()
        new.stop()
    assert not path.exists()  # its own file: removed when the new server stops


def test_serve_selected_plugins_and_load_errors(short_prefix):
    server = start_aigov(short_prefix, "--plugins", "llm-token-quota", plugins_dir=REPO / "plugins",
                         plugin="llm-token-quota")
    try:
        assert sorted(p.name for p in short_prefix.glob("*.socket")) == ["llm-token-quota.socket"]
        with server.client() as kong:
            info = kong.call("plugin.GetPluginInfo", "llm-token-quota")
            assert info["Name"] == "llm-token-quota" and info["Priority"] == 906
    finally:
        server.stop()
    out = aigov("serve", "-p", str(short_prefix), "--plugins", "llm-nope")
    assert out.returncode == 1 and out.stdout == b"" and b"no plugin module llm-nope" in out.stderr
    out = aigov("serve", "-p", str(short_prefix / "missing"), "-d", str(FIXTURE_PLUGINS))
    assert out.returncode == 1 and b"does not exist" in out.stderr


def test_sigterm_during_a_blocked_handler_still_exits(short_prefix):
    server = start_aigov(short_prefix)
    kong = server.client()
    try:
        iid = kong.start_instance({"mode": "two_calls"})
        kong.handle_event(iid)  # the handler now waits for a Step that never comes
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        assert time.monotonic() - started < 3
    finally:
        kong.close()
        server.stop()


def test_debug_logs_never_carry_config_or_pdk_values(short_prefix):
    """Even at -v (debug), neither the config (referenceable secrets) nor PDK data are logged."""
    server = start_aigov(short_prefix, "-v")
    try:
        with server.client() as kong:
            iid = kong.start_instance({"mode": "raise_after", "tag": "sk-config-secret-123"})
            reply = kong.handle_event(iid)
            assert kong.step(reply["EventId"], "Bearer sk-header-secret-456")["Data"] == "ret"
            _, _, err, _ = kong.call_raw("plugin.StartInstance",
                                         {"Name": TEST_PLUGIN, "Config": '{"apikey": "sk-broken-789"'})
            assert err.startswith("StartInstance aigov-test: Config is not JSON")
    finally:
        server.stop()
    logged = server.stderr()
    assert "RuntimeError: boom after the first PDK call" in logged  # the failure itself is logged
    for secret in ("sk-config-secret-123", "sk-header-secret-456", "sk-broken-789"):
        assert secret not in logged
