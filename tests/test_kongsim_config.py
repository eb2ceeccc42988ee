"""kongsim's Kong-side checks that need no process: metaschema, config processing, vault
references, the declarative kong.yml, kong.conf entries and the step-method table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kongsim import declarative, metaschema, process
from kongsim.runloop import get_step_method

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "tests" / "fixtures" / "kongsim" / "kt-probe.py"


def _dump(path: Path) -> dict:
    out = subprocess.run([sys.executable, str(path), "--dump"], capture_output=True, check=True,
                         env={"PYTHONPATH": str(REPO)}, timeout=120)
    return json.loads(out.stdout)[0]


@pytest.mark.parametrize("plugin", ["llm-semantic-cache", "llm-token-quota", "llm-semantic-router"])
def test_project_plugin_dumps_pass_kong_metaschema(plugin: str) -> None:
    info = _dump(REPO / "plugins" / f"{plugin}.py")
    metaschema.validate_plugin_schema(info)  # raises on any violation
    assert info["Name"] == plugin


def _info(fields: list, version="0.1.0", priority=10) -> dict:
    return {"Name": "x", "Version": version, "Priority": priority, "Phases": ["access"],
            "Schema": {"name": "x", "fields": [{"config": {"type": "record", "fields": fields}}]}}


def test_metaschema_rejects_each_kong_violation_and_lists_all() -> None:
    bad = _info([
        {"a": {"type": "array", "description": "an array with no elements"}},
        {"b": {"type": "string", "description": "short"}},
        {"c": {"type": "strin", "description": "a typo in the type"}},
        {"d": {"type": "string", "between": [1, 2], "description": "between on a string"}},
        {"e": {"type": "integer", "colour": "red", "description": "unknown attribute"}},
        {"f": {"type": "map", "keys": {"type": "string"}, "description": "map without values"}},
        {"g": {"type": "integer", "default": "x", "description": "default of the wrong type"}},
    ], version=None, priority=1.5)
    with pytest.raises(metaschema.SchemaError) as err:
        metaschema.validate_plugin_schema(bad)
    problems = "\n".join(err.value.problems)
    for needle in ("Version must be", "Priority must be an integer", "a: type array requires 'elements'",
                   "b: description must be a string of 10 to 500", "c: unknown type 'strin'",
                   "d: attribute 'between' is not allowed for type string",
                   "e: unknown attribute 'colour'", "f: type map requires 'values'",
                   "g.default: expected an integer"):
        assert needle in problems, needle
    assert len(err.value.problems) == 9


def test_metaschema_accepts_a_three_part_version_and_rejects_four() -> None:
    ok = [{"n": {"type": "integer", "description": "a number field"}}]
    metaschema.validate_plugin_schema(_info(ok, version="1.2.3"))
    with pytest.raises(metaschema.SchemaError):
        metaschema.validate_plugin_schema(_info(ok, version="1.2.3.4"))


def test_process_config_fills_defaults_like_kong() -> None:
    fields = metaschema.config_fields(_dump(PROBE))
    conf = metaschema.process_config(fields, {"tag": "t", "items": []})
    assert conf["tag"] == "t"
    assert conf["mode"] == "header" and conf["exit_status"] == 418 and conf["sleep_s"] == 0
    assert conf["secret"] is None and conf["record_file"] is None  # unset fields: null
    assert conf["items"] == []  # an explicit empty array stays an array
    assert conf["nested"] == {"level": 3, "label": None}  # an absent record built from defaults


def test_process_config_reports_every_field_error_at_once() -> None:
    fields = metaschema.config_fields(_dump(PROBE))
    with pytest.raises(metaschema.ConfigError) as err:
        metaschema.process_config(fields, {"bogus": 1, "mode": "dance", "exit_status": 700,
                                           "sleep_s": "slow", "tag": "", "nested": {"level": "x"},
                                           "items": [1]}, plugin="kt-probe")
    e = err.value.errors
    assert e["config.bogus"] == "unknown field"
    assert e["config.mode"].startswith("expected one of: header, exit")
    assert e["config.exit_status"] == "value should be between 100 and 599"
    assert e["config.sleep_s"] == "expected a number"
    assert e["config.tag"] == "length must be at least 1"
    assert e["config.nested.level"] == "expected an integer"
    assert e["config.items[1]"] == "expected a string"
    assert "plugin 'kt-probe': schema violation (" in str(err.value)


def _nested(checks: list, fields: list) -> list:
    return [{"r": {"type": "record", "description": "a nested record", "fields": fields,
                   "entity_checks": checks}}]


_POLICY = [{"policy": {"type": "string", "default": "local", "one_of": ["local", "redis"]}},
           {"host": {"type": "string"}}, {"port": {"type": "integer"}}]


def test_a_fields_err_replaces_its_validators_message_not_its_type_error() -> None:
    # Schema:validate_field returns `field.err or err` after a validator: Kong's own
    # "invalid value: <value>" would echo a credential.
    fields = [{"key": {"type": "string", "not_match": "%c", "err": "no control characters"}}]
    with pytest.raises(metaschema.ConfigError) as err:
        metaschema.process_config(fields, {"key": "sk-secret\n"})
    assert err.value.errors == {"config.key": "no control characters"}
    with pytest.raises(metaschema.ConfigError) as err:
        metaschema.process_config(fields, {"key": 5})
    assert err.value.errors == {"config.key": "expected a string"}


def test_a_nested_records_conditional_check_runs_as_kongs_does() -> None:
    # kong/db/schema/init.lua `conditional`: a null then_field under `required` gets "required
    # field missing" and the generic message (then_err only for a then_match that fails otherwise).
    fields = _nested([
        {"conditional": {"if_field": "policy", "if_match": {"one_of": ["redis"]},
                         "then_field": "host", "then_match": {"required": True}, "then_err": "no host"}},
        {"conditional": {"if_field": "policy", "if_match": {"eq": "redis"},
                         "then_field": "port", "then_match": {"between": [1, 65535]},
                         "then_err": "policy %s needs a real port"}}], _POLICY)
    with pytest.raises(metaschema.ConfigError) as err:
        metaschema.process_config(fields, {"r": {"policy": "redis", "port": 0}})
    assert err.value.errors == {
        "config.r.host": "required field missing", "config.r.port": "value should be between 1 and 65535",
        "config.r.@entity": "failed conditional validation given value of field 'policy'; "
                            "policy policy needs a real port"}
    assert metaschema.process_config(fields, {"r": {"policy": "redis", "host": "h", "port": 6379}})["r"]["host"] == "h"
    assert metaschema.process_config(fields, {"r": {"port": 0}})["r"]["policy"] == "local"  # if_match fails: no check
    assert metaschema.process_config(fields, {})["r"]["host"] is None  # the absent record is built, then checked


@pytest.mark.parametrize("check,good,bad,message", [
    ("at_least_one_of", {"host": "h"}, {}, "at least one of these fields must be non-empty: 'host', 'port'"),
    ("only_one_of", {"port": 1}, {"host": "h", "port": 1}, "only one of these fields must be non-empty: 'host', 'port'"),
    ("mutually_required", {"host": "h", "port": 1}, {"port": 1}, "all or none of these fields must be set: 'host', 'port'"),
])
def test_a_nested_records_field_list_checks(check: str, good: dict, bad: dict, message: str) -> None:
    fields = _nested([{check: ["host", "port"]}], _POLICY)
    metaschema.process_config(fields, {"r": good})
    with pytest.raises(metaschema.ConfigError) as err:
        metaschema.process_config(fields, {"r": bad})
    assert err.value.errors == {"config.r.@entity": message}


def test_the_other_entity_checks_follow_kongs_rules() -> None:
    sets = _nested([{"mutually_exclusive_sets": {"set1": ["host"], "set2": ["port"]}}], _POLICY)
    metaschema.process_config(sets, {"r": {"host": "h"}})
    with pytest.raises(metaschema.ConfigError) as err:
        metaschema.process_config(sets, {"r": {"host": "h", "port": 1}})
    assert err.value.errors == {"config.r.@entity": "these sets are mutually exclusive: ('host'), ('port')"}
    cond = _nested([{"conditional_at_least_one_of": {
        "if_field": "policy", "if_match": {"one_of": ["redis"]}, "then_at_least_one_of": ["host", "port"],
        "then_err": "redis needs one of %s (100%%)"}}], _POLICY)
    metaschema.process_config(cond, {"r": {"policy": "local"}})
    metaschema.process_config(cond, {"r": {"policy": "redis", "port": 1}})
    with pytest.raises(metaschema.ConfigError) as err:
        metaschema.process_config(cond, {"r": {"policy": "redis"}})
    assert err.value.errors == {"config.r.@entity": "redis needs one of 'host', 'port' (100%)"}
    # `eq` fails on a null if_field, so Kong skips the check; `distinct` compares as Lua keys.
    on_null = _nested([{"conditional": {"if_field": "host", "if_match": {"eq": "h"}, "then_field": "port",
                                        "then_match": {"required": True}}}], _POLICY)
    metaschema.process_config(on_null, {"r": {}})
    distinct = _nested([{"distinct": ["host", "port"]}], [{"host": {"type": "number"}}, {"port": {"type": "number"}}])
    with pytest.raises(metaschema.ConfigError):
        metaschema.process_config(distinct, {"r": {"host": 1, "port": 1.0}})
    metaschema.process_config(distinct, {"r": {"host": 1, "port": 2}})


def test_an_entity_check_the_stand_in_cannot_run_is_refused_not_skipped() -> None:
    fields = _nested([{"custom_entity_check": {"field_sources": ["host"]}}], _POLICY)
    with pytest.raises(metaschema.ConfigError, match="does not run entity check 'custom_entity_check'"):
        metaschema.process_config(fields, {"r": {"host": "h"}})


def test_vault_env_reference_resolves_and_missing_variable_is_a_clear_error() -> None:
    fields = metaschema.config_fields(_dump(PROBE))
    conf = metaschema.process_config(fields, {"secret": "{vault://env/kt-api-key}"})
    resolved, secrets = metaschema.resolve_references(fields, conf, {"KT_API_KEY": "s3cr3t-value"})
    assert resolved["secret"] == "s3cr3t-value" and secrets == ["s3cr3t-value"]
    json_ref = metaschema.process_config(fields, {"secret": "{vault://env/kt-json/token}"})
    resolved, _ = metaschema.resolve_references(fields, json_ref, {"KT_JSON": '{"token": "tok-1"}'})
    assert resolved["secret"] == "tok-1"
    with pytest.raises(metaschema.ConfigError) as err:
        metaschema.resolve_references(fields, conf, {})
    assert "environment variable KT_API_KEY is not set" in str(err.value)
    not_ref = metaschema.process_config(fields, {"tag": "{vault://env/kt-api-key}"})
    with pytest.raises(metaschema.ConfigError, match="not referenceable"):
        metaschema.resolve_references(fields, not_ref, {"KT_API_KEY": "x"})


KONG_YML = """
_format_version: "3.0"
services:
- name: svc
  url: http://127.0.0.1:9/base
  plugins:
  - name: p
    config: {tag: service}
  routes:
  - name: chat
    paths: ["/chat"]
    methods: [POST]
  - name: chat-long
    paths: ["/chat/long"]
    strip_path: false
    plugins:
    - name: p
      config: {tag: route}
  - name: hosted
    paths: ["/h"]
    hosts: ["*.example.com"]
consumers:
- username: alice
  keyauth_credentials: [{key: alice-key}]
  plugins:
  - name: p
    config: {tag: consumer}
- username: bob
  custom_id: b-1
plugins:
- name: p
  config: {tag: global}
- name: p
  route: chat-long
  consumer: bob
  config: {tag: route+consumer}
"""


def test_declarative_routes_match_by_longest_prefix_method_and_host() -> None:
    cfg = declarative.load(KONG_YML)
    route, upstream_uri = cfg.match_route("POST", "/chat/x", None)
    assert route.name == "chat" and upstream_uri == "/base/x"  # the service path joined
    assert cfg.match_route("GET", "/chat/x", None) is None  # methods: [POST]
    route, upstream_uri = cfg.match_route("GET", "/chat/long/y", None)
    assert route.name == "chat-long" and upstream_uri == "/base/chat/long/y"  # strip_path: false
    assert cfg.match_route("GET", "/h", "api.example.com:8000")[0].name == "hosted"
    assert cfg.match_route("GET", "/h", "other.org") is None
    assert cfg.match_route("GET", "/nothing", None) is None
    svc = cfg.services[route.service_id]
    assert (svc.protocol, svc.host, svc.port, svc.path) == ("http", "127.0.0.1", 9, "/base")
    consumer, cred = cfg.consumer_by_key("alice-key")
    assert consumer.username == "alice" and cred.consumer_id == consumer.id


def test_plugin_resolution_most_specific_scope_wins() -> None:
    cfg = declarative.load(KONG_YML)
    routes = {r.name: r for r in cfg.routes}
    alice = cfg.find_consumer("alice")
    bob = cfg.find_consumer("b-1")
    svc = routes["chat"].service_id

    def tag(route: str | None, consumer) -> str:
        ent = cfg.resolve_plugin("p", routes[route].id if route else None, svc if route else None,
                                 consumer.id if consumer else None)
        return ent.config["tag"]

    assert tag(None, None) == "global"
    assert tag("chat", None) == "service"
    assert tag("chat-long", None) == "route"
    assert tag("chat", alice) == "consumer"  # consumer beats route and service
    assert tag("chat-long", alice) == "consumer"
    assert tag("chat-long", bob) == "route+consumer"


@pytest.mark.parametrize("doc, message", [
    ({"services": []}, "missing _format_version"),
    ({"_format_version": "2.1"}, "_format_version '2.1' is not supported"),
    ({"_format_version": "3.0", "servics": []}, "unknown top-level key 'servics'"),
    ({"_format_version": "3.0", "services": [{"name": "s", "url": "ftp://x"}]}, "services[0].url"),
    ({"_format_version": "3.0", "services": [{"name": "s", "url": "http://x",
                                               "routes": [{"paths": ["chat"]}]}]},
     "services[0].routes[0].paths: 'chat' should start with: / (fixed path) or ~/"),
    ({"_format_version": "3.0", "plugins": [{"name": "p", "route": "nope"}]},
     "plugins[0].route: no entity named or with id 'nope'"),
    ({"_format_version": "3.0", "plugins": [{"name": "p"}, {"name": "p"}]}, "configured twice"),
    ({"_format_version": "3.0", "consumers": [{"username": "a", "keyauth_credentials": [{}]}]},
     "consumers[0].keyauth_credentials[0].key: required field missing"),
    # consumer groups: a precedence level the stand-in does not have, so never silently ignored
    ({"_format_version": "3.0", "plugins": [{"name": "p", "consumer_group": "gold"}]},
     "plugins[0].consumer_group: consumer groups are not implemented by the Kong stand-in"),
    ({"_format_version": "3.0", "consumer_groups": [{"name": "gold"}]},
     "consumer_groups: consumer groups are not implemented"),
    ({"_format_version": "3.0", "plugins": [{"name": "p", "ordering": {"before": {"access": ["q"]}}}]},
     "plugins[0].ordering: dynamic plugin ordering is not implemented"),
])
def test_declarative_errors_name_the_entity(doc: dict, message: str) -> None:
    with pytest.raises(declarative.DeclarativeError) as err:
        declarative.load(doc)
    assert message in str(err.value)


def test_kong_conf_entries_env_override_and_missing_query_cmd() -> None:
    text = """
    pluginserver_names = my-plugin, other   # two servers
    pluginserver_my_plugin_socket = /tmp/x/my-plugin.socket
    pluginserver_my_plugin_start_cmd = /opt/my-plugin.py
    pluginserver_my_plugin_query_cmd = /opt/my-plugin.py --dump
    pluginserver_other_query_cmd = /opt/other --dump
    nginx_main_env = PATH
    prefix = /tmp/kp
    """
    conf = process.parse_kong_conf(text, {"KONG_PLUGINSERVER_OTHER_START_CMD": "/opt/other"})
    mine, other = process.entries_from_conf(conf)
    assert (mine.name, mine.socket, mine.start_cmd, mine.query_cmd) == (
        "my-plugin", "/tmp/x/my-plugin.socket", "/opt/my-plugin.py", "/opt/my-plugin.py --dump")
    assert other.socket == "/tmp/kp/other.socket" and other.start_cmd == "/opt/other"
    assert mine.env_passthrough == ("PATH",)
    env = process.child_environment(mine, {"PATH": "/bin", "HOME": "/root", "TZ": "UTC"})
    assert env == {"TZ": "UTC", "PATH": "/bin"}
    with pytest.raises(ValueError, match="query_command undefined for pluginserver lone"):
        process.entries_from_conf(process.parse_kong_conf("pluginserver_names = lone"))



# Expected values below were checked against a real nginx 1.22 worker (its `environ` after
# ngx_set_environment) and dash: envp keeps duplicates in directive order, and sh keeps the last.
@pytest.mark.parametrize("value, directives, env", [
    ("A", ("A",), {"A": "pa", "TZ": "Europe/Paris"}),
    # the documented several-variables form: every one counts, not just the first
    ("A; env B; env C", ("A", "B", "C"), {"A": "pa", "B": "pb", "TZ": "Europe/Paris"}),
    ("A; env B=1; env C", ("A", "B=1", "C"), {"A": "pa", "B": "1", "TZ": "Europe/Paris"}),
    ("B=x=y; env A", ("B=x=y", "A"), {"B": "x=y", "A": "pa", "TZ": "Europe/Paris"}),
    ("TZ=UTC", ("TZ=UTC",), {"TZ": "UTC"}),
    ("A=1; env A", ("A=1", "A"), {"A": "pa", "TZ": "Europe/Paris"}),
    ("A; env A=2", ("A", "A=2"), {"A": "2", "TZ": "Europe/Paris"}),
    ("\"Y=a b\";env   Z=${x}", ("Y=a b", "Z=${x}"), {"Y": "a b", "Z": "${x}", "TZ": "Europe/Paris"}),
    ("A=\\t\\q", ("A=\t\\q",), {"A": "\t\\q", "TZ": "Europe/Paris"}),
    ("A; timer_resolution 100ms", ("A",), {"A": "pa", "TZ": "Europe/Paris"}),
    # kong.conf's \# is a literal #, which nginx keeps inside a token; commas are not lists
    ("A\\#B; env A,B", ("A#B", "A,B"), {"TZ": "Europe/Paris"}),
    ("=v; env A", ("=v", "A"), {"A": "pa", "TZ": "Europe/Paris"}),
    ("NONE", (), {"TZ": "Europe/Paris"}),
])
def test_nginx_main_env_directives_and_worker_environment(value: str, directives: tuple,
                                                           env: dict) -> None:
    parent = {"A": "pa", "B": "pb", "TZ": "Europe/Paris", "HOME": "/root", "Y": "py"}
    conf = process.parse_kong_conf(f"pluginserver_names = s\npluginserver_s_query_cmd = q\n"
                                   f"nginx_main_env = {value}\n")
    (entry,) = process.entries_from_conf(conf)
    assert entry.env_passthrough == directives
    assert process.child_environment(entry, parent) == env


@pytest.mark.parametrize("value, message", [
    ("A;", 'unexpected ";"'),  # `env A;;`
    ("A; B", 'unknown directive "B"'),
    ("A B", 'invalid number of arguments in "env" directive'),
    ("A, B", 'invalid number of arguments in "env" directive'),
    ("A {", 'directive "env" is not terminated by ";"'),
    ("\"A", "unexpected end of file"),
    ("'A'B", 'unexpected "B"'),
])
def test_nginx_main_env_that_nginx_refuses_is_an_error(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        process.nginx_env_directives(value)


def test_kong_nginx_main_env_variable_overrides_kong_conf() -> None:
    conf = process.parse_kong_conf("pluginserver_names = s\npluginserver_s_query_cmd = q\n"
                                   "nginx_main_env = ONLY_FILE\n",
                                   {"KONG_NGINX_MAIN_ENV": "X; env AIGOV_CAPTURE_PHASE"})
    (entry,) = process.entries_from_conf(conf)
    assert process.child_environment(entry, {"X": "1", "AIGOV_CAPTURE_PHASE": "log",
                                             "ONLY_FILE": "f"}) == {"X": "1",
                                                                    "AIGOV_CAPTURE_PHASE": "log"}


def test_kong_conf_example_passes_every_listed_variable() -> None:
    conf, entries = process.load_kong_conf(REPO / "kong.conf.example", {})
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TIKTOKEN_CACHE_DIR", "AIGOV_CAPTURE_PHASE",
             "AIGOV_ROUTER_CACHE_DIR", "AIGOV_EMBEDDINGS_RUNTIME", "AIGOV_MODEL_CACHE", "AIGOV_PLUGINS_DIR"]
    parent = {n: f"v-{n}" for n in names} | {"PATH": "/bin", "TZ": "UTC"}
    for entry in entries:
        assert entry.env_passthrough == tuple(names)
        assert process.child_environment(entry, parent) == {n: f"v-{n}" for n in names} | {"TZ": "UTC"}

def test_step_method_table() -> None:
    assert get_step_method("kong.request.get_headers", {}) == "StepMultiMap"
    assert get_step_method("kong.client.get_consumer", None) == "StepConsumer"
    assert get_step_method("kong.client.authenticate", None) == "StepCredential"
    assert get_step_method("kong.router.get_route", {}) == "StepRoute"
    assert get_step_method("kong.x", {"_method": "StepMemoryStats"}) == "StepMemoryStats"
    assert get_step_method("kong.request.get_header", "v") == "Step"
