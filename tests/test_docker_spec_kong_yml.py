"""spec/kong.yml: the demo's declarative config, valid for real Kong and for the stand-in.

Every plugin config is validated the way Kong validates it before a plugin server sees it
(kongsim.metaschema.process_config) against the schemas the plugins dump right now, so a schema
change that breaks the file fails here. Bundled plugins are checked against the stand-in's
imitation of their schemas. The hostnames must be the compose service names.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from aigov import docs
from kongsim import declarative
from kongsim.bundled import IMITATED
from kongsim.metaschema import ConfigError, config_fields, process_config, validate_plugin_schema

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "spec" / "kong.yml"
OUR_PLUGINS = {"llm-semantic-cache", "llm-token-quota", "llm-semantic-router"}


@pytest.fixture(scope="module")
def infos() -> dict[str, dict[str, Any]]:
    """The plugin info Kong reads from each query_cmd (the same `aigov dump` output)."""
    return {info["Name"]: info for info in docs.dump_plugin_infos(None)}


@pytest.fixture(scope="module")
def spec() -> declarative.DeclarativeConfig:
    return declarative.load(SPEC)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker" / "compose.yml").read_text())


def validate_entity(name: str, config: dict[str, Any], infos: dict[str, dict[str, Any]]) -> dict:
    """Kong's processed config for one plugin entity; raises ConfigError like Kong would."""
    if name in infos:
        validate_plugin_schema(infos[name])
        return process_config(config_fields(infos[name]), config, plugin=name)
    bundled = IMITATED.get(name)
    assert bundled is not None, f"plugin {name!r} is neither ours nor a bundled plugin the stand-in knows"
    processed = process_config(bundled.fields, config, plugin=name)
    problems = bundled.check_config(processed) if hasattr(bundled, "check_config") else []
    assert not problems, problems
    return processed


def test_every_plugin_config_passes_kong_validation(spec, infos):
    assert spec.plugins, "spec/kong.yml configures no plugins"
    for entity in spec.plugins:
        try:
            validate_entity(entity.name, entity.config, infos)
        except ConfigError as exc:
            pytest.fail(f"{entity.where} ({entity.name}): {exc}")


def test_validation_catches_a_config_kong_would_reject(spec, infos):
    """The check above has teeth: an unknown key in any of our plugin configs is rejected."""
    for name in sorted(OUR_PLUGINS):
        entity = next(p for p in spec.plugins if p.name == name)
        broken = copy.deepcopy(entity.config)
        broken["no_such_field"] = True
        with pytest.raises(ConfigError, match="no_such_field"):
            validate_entity(name, broken, infos)


def test_plugins_named_are_installed_in_the_image(spec):
    from test_docker_config import parse_dockerfile, stage_env

    env = stage_env(parse_dockerfile((REPO / "docker" / "Dockerfile").read_text()), "aigov")
    installed = set(env["KONG_PLUGINS"].split(",")) - {"bundled"}
    # `plugins = bundled,...`: every external plugin in kong.yml must be listed, or DB-less Kong
    # refuses to start ("plugin is enabled but not installed").
    assert spec.plugin_names() - set(IMITATED) <= installed
    assert OUR_PLUGINS <= spec.plugin_names()


def test_each_route_has_key_auth_and_the_three_plugins(spec):
    by_name = {r.name: r for r in spec.routes}
    assert set(by_name) == {"chat", "ai-proxy-chat"}
    for route in by_name.values():
        names = {p.name for p in spec.plugins if p.route_id == route.id and p.consumer_id is None}
        assert {"key-auth"} | OUR_PLUGINS <= names, f"route {route.name}: {names}"
    ai_route = {p.name for p in spec.plugins if p.route_id == by_name["ai-proxy-chat"].id}
    assert "ai-proxy" in ai_route and "ai-proxy" not in {
        p.name for p in spec.plugins if p.route_id == by_name["chat"].id}
    assert by_name["chat"].paths == ["/v1/chat"] and by_name["chat"].strip_path is False


def test_ai_proxy_route_as_documented(spec, infos):
    (entity,) = [p for p in spec.plugins if p.name == "ai-proxy"]
    conf = validate_entity("ai-proxy", entity.config, infos)
    assert conf["route_type"] == "llm/v1/chat"
    assert conf["model"]["provider"] == "openai" and conf["model"]["name"] == "gpt-4o-mini"
    assert conf["logging"] == {"log_statistics": True, "log_payloads": True}
    upstream = urlsplit(conf["model"]["options"]["upstream_url"])
    assert (upstream.hostname, upstream.port, upstream.path) == ("mock-llm", 8080, "/v1/chat/completions")


def test_consumers_have_keys_and_different_budgets(spec, infos):
    chat = next(r for r in spec.routes if r.name == "chat")
    budgets = {}
    for username in ("alice", "bob", "carol"):
        consumer = spec.find_consumer(username)
        assert consumer is not None, username
        keys = [c.key for c in spec.credentials if c.consumer_id == consumer.id]
        assert len(keys) == 1 and spec.consumer_by_key(keys[0])[0].username == username
        entity = spec.resolve_plugin("llm-token-quota", chat.id, chat.service_id, consumer.id)
        conf = validate_entity("llm-token-quota", entity.config, infos)
        budgets[username] = tuple((l["window"], l.get("tokens"), l.get("cost_usd"))
                                  for l in conf["limits"])
    assert len(set(budgets.values())) == 3, budgets


def _redis_blocks(config: Any) -> list[dict[str, Any]]:
    """Every `redis` record inside a plugin config, wherever the schema nests it."""
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "redis" and isinstance(value, dict):
                found.append(value)
            else:
                found += _redis_blocks(value)
    elif isinstance(config, list):
        for item in config:
            found += _redis_blocks(item)
    return found


def test_hostnames_are_the_compose_services(spec, compose):
    services = compose["services"]
    mock_cmd = services["mock-llm"]["command"]
    mock_port = int(mock_cmd[mock_cmd.index("--listen") + 1].rsplit(":", 1)[1])
    for service in spec.services.values():
        assert (service.host, service.port) == ("mock-llm", mock_port)
    redis_blocks = [b for p in spec.plugins for b in _redis_blocks(p.config)]
    assert redis_blocks, "the demo uses Redis for the cache and the quota"
    for block in redis_blocks:
        assert block["host"] in services and block["host"] == "redis"
        assert block.get("port", 6379) == 6379


def test_no_credentials_other_than_demo_keys():
    text = SPEC.read_text()
    assert not re.search(r"sk-[A-Za-z0-9]{10,}", text), "no provider API keys in the demo config"
    keys = re.findall(r"^\s*-?\s*key:\s*(\S+)", text, re.M)
    assert keys and all(k.endswith("-demo-key") for k in keys)


def test_the_routers_off_topic_prompts_take_the_default_route(spec, infos) -> None:
    """A new user copied this file and saw gibberish routed to gpt-4o ("matched", 0.38): with
    three utterances a route and no negatives the out-of-scope threshold was weak."""
    from aigov.embeddings import embedder_from_config
    from aigov.routing import core

    chat = next(r for r in spec.routes if r.name == "chat")
    conf = next(p.config for p in spec.plugins if p.name == "llm-semantic-router" and p.route_id == chat.id)
    processed = validate_entity("llm-semantic-router", copy.deepcopy(conf), infos)
    router = core.Router(core.settings_from_config(processed), embedder_from_config(processed.get("embeddings")))
    for text in ("asdkjh qwe zxc", "sort a list in descending order in python", "how many calories in a banana",
                 "write a haiku about linux kernels", "can you explain photosynthesis"):
        decision = router.decide_text(text)
        assert (decision.route.name, decision.reason) == ("general", "default"), (text, decision)
    for text, route in (("what's my checking account balance", "banking"), ("my debit card was stolen", "banking"),
                        ("what is the capital of italy", "general")):
        decision = router.decide_text(text)
        assert (decision.route.name, decision.reason) == (route, "matched"), (text, decision)
