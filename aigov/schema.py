"""Builders for Kong plugin schema fields.

A Python plugin's `Schema` is a list of single-key dicts that Kong validates with its metaschema
(reference kong-plugin-server.md §2.9): every field has a `type`, and a `description` of 10 to 500
characters, or Kong refuses to load the plugin. These builders keep the three plugin schemas
uniform; kongsim.metaschema checks them the way Kong does.
"""
from __future__ import annotations

import re
from typing import Any

Field = dict[str, dict[str, Any]]

# Lua's %c (iscntrl: 0x00-0x1f and 0x7f), for `not_match` on what becomes a header value: a line
# break would split the header, other control characters are refused by upstreams or corrupt logs.
CONTROL_CHAR_PATTERN = "%c"
# Kong's not_match error is "invalid value: <the value>", which would put a credential into the
# Admin API's answer and the error log; a field's `err` replaces it.
# Kong's `err` replaces every validator's message for the field, its default len_min 1 too.
CONTROL_CHAR_ERR = "must be non-empty, without control characters (a line break at the end of the value?)"
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")


def has_control_char(value: Any) -> bool:
    """Whether a string holds what CONTROL_CHAR_PATTERN refuses. Kong validates a vault
    reference, not the value it resolves to (a key file's final newline), so plugins check that."""
    return isinstance(value, str) and _CONTROL_CHAR.search(value) is not None


def control_char_error(where: str) -> str:
    """The config error for a header-bound value with a control character; never the value."""
    return (f"{where} contains a control character (a line break at the end of a vault value?); "
            "a header value cannot carry it")


def field(name: str, type_: str, description: str, **attrs: Any) -> Field:
    """One schema field: `{name: {"type": type_, "description": ..., **attrs}}`."""
    return {name: {"type": type_, "description": description, **attrs}}


def record(name: str, description: str, fields: list[Field], **attrs: Any) -> Field:
    return field(name, "record", description, fields=fields, **attrs)


def array(name: str, description: str, elements: dict[str, Any], **attrs: Any) -> Field:
    return field(name, "array", description, elements=elements, **attrs)


def secret(name: str, description: str, **attrs: Any) -> Field:
    """A credential: `referenceable` so `{vault://env/NAME}` works, `encrypted` at rest in Kong."""
    return field(name, "string", description, referenceable=True, encrypted=True, **attrs)


def header_secret(name: str, description: str, **attrs: Any) -> Field:
    """A credential sent in, or compared with, a request header: no control characters."""
    return secret(name, description, not_match=CONTROL_CHAR_PATTERN, err=CONTROL_CHAR_ERR, **attrs)


def embeddings_record(description: str, model_description: str, timeout_max_ms: int) -> Field:
    """The `embeddings` block of the cache and the router: the local model or an OpenAI-compatible
    endpoint, whose url and model Kong requires at load (a nested record's entity checks)."""
    return record("embeddings", description, [
        field("provider", "string", "Embedding provider: local (in-process MiniLM) or openai (HTTP endpoint).",
              default="local", one_of=["local", "openai"]),
        field("model", "string", model_description),
        field("url", "string", "Full URL of the OpenAI-compatible /embeddings endpoint (required with provider openai)."),
        header_secret("api_key", "API key for the embeddings endpoint; may be a Kong Vault reference."),
        field("timeout_ms", "integer", "Timeout of one embeddings call in milliseconds.", default=10000,
              between=[1, timeout_max_ms]),
    ], required=True, entity_checks=[
        {"conditional": {"if_field": "provider", "if_match": {"one_of": ["openai"]},
                         "then_field": name, "then_match": {"required": True},
                         "then_err": f"embeddings.provider openai needs embeddings.{name}"}}
        for name in ("url", "model")])


def redis_record(description: str = "Redis connection used when the policy is redis.") -> Field:
    """The Redis connection block, shaped like Kong's own `redis` records (host/port/...)."""
    return record("redis", description, [
        field("host", "string", "Redis host name or address.", default="127.0.0.1"),
        field("port", "integer", "Redis TCP port.", default=6379, between=[1, 65535]),
        field("database", "integer", "Redis logical database number.", default=0, between=[0, 2147483647]),
        field("username", "string", "Redis ACL user name (optional).", referenceable=True),
        secret("password", "Redis password (optional); may be a Kong Vault reference."),
        field("ssl", "boolean", "Connect to Redis over TLS.", default=False),
        field("timeout_ms", "integer", "Connect and command timeout in milliseconds.",
              default=200, between=[1, 60000]),
    ], required=True)


def default_config(schema: list[Field]) -> dict[str, Any]:
    """The config Kong would pass for an empty plugin config: defaults filled, the rest None."""
    out: dict[str, Any] = {}
    for item in schema:
        (name, spec), = item.items()
        if spec["type"] == "record":
            out[name] = default_config(spec["fields"]) if spec.get("required") or "default" not in spec else spec["default"]
        else:
            out[name] = spec.get("default")
    return out
