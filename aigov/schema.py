"""Builders for Kong plugin schema fields.

A Python plugin's `Schema` is a list of single-key dicts that Kong validates with its metaschema
(reference kong-plugin-server.md §2.9): every field has a `type`, and a `description` of 10 to 500
characters, or Kong refuses to load the plugin. These builders keep the three plugin schemas
uniform; kongsim.metaschema checks them the way Kong does.
"""
from __future__ import annotations

from typing import Any

Field = dict[str, dict[str, Any]]


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


def redis_record(description: str = "Redis connection used when the policy is redis.") -> Field:
    """The Redis connection block, shaped like Kong's own `redis` records (host/port/...)."""
    return record("redis", description, [
        field("host", "string", "Redis host name or address.", default="127.0.0.1"),
        field("port", "integer", "Redis TCP port.", default=6379, between=[1, 65535]),
        field("database", "integer", "Redis logical database number.", default=0),
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
