"""Reads the declarative `kong.yml` (`_format_version: "3.0"`) that DB-less Kong reads.

Covered entities (reference kong-plugin-server.md §5, Kong's `kong/db/declarative` and the
template `kong/templates/kong_yml.lua`): services (`url`, or protocol/host/port/path), routes
(paths, methods, hosts, strip_path default true, preserve_host), consumers (username,
custom_id) with nested `keyauth_credentials`, upstreams with targets, and plugins at global,
service, route and consumer scope, nested (inheriting the parent's foreign key) or top level
with `route:` / `service:` / `consumer:` references by name or id. Anything malformed raises
DeclarativeError naming the entity path, e.g. `services[0].routes[1].paths`.

Plugin config resolution follows Kong's `lookup_cfg` in `kong/runloop/plugins_iterator.lua`:
route+service+consumer, route+consumer, service+consumer, route+service, consumer, route,
service, global; the first combination with an enabled plugin wins.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

import yaml

_NS = uuid.UUID("5e0c6b1c-7d2a-4f0e-9a31-6b6e67cfa1a0")  # stable ids for entities without one
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}


# Kong scopes a plugin to a consumer group (ai-gateway-peers.md: "attach the plugin to a consumer
# or consumer group"), a precedence level the stand-in's plugin resolution does not have: reject
# it rather than run the plugin for every consumer of the route.
_NO_CONSUMER_GROUPS = ("{where}: consumer groups are not implemented by the Kong stand-in, and "
                       "ignoring them would apply a group's plugin to every consumer; scope the "
                       "plugin to a consumer, route, service or globally instead")


class DeclarativeError(ValueError):
    """The kong.yml cannot be loaded; the message names the entity and what is wrong."""


@dataclasses.dataclass
class Service:
    id: str
    name: str | None
    protocol: str
    host: str
    port: int
    path: str | None
    read_timeout_ms: int = 60000
    connect_timeout_ms: int = 60000
    write_timeout_ms: int = 60000

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.host}:{self.port}{self.path or ''}"


@dataclasses.dataclass
class Route:
    id: str
    name: str | None
    service_id: str | None
    paths: list[str]
    methods: list[str]
    hosts: list[str]
    strip_path: bool = True
    preserve_host: bool = False
    regex_priority: int = 0


@dataclasses.dataclass
class Consumer:
    id: str
    username: str | None
    custom_id: str | None


@dataclasses.dataclass
class KeyAuthCredential:
    id: str
    consumer_id: str
    key: str


@dataclasses.dataclass
class Target:
    host: str
    port: int
    weight: int = 100


@dataclasses.dataclass
class Upstream:
    id: str
    name: str
    targets: list[Target]


@dataclasses.dataclass
class PluginEntity:
    id: str
    name: str
    config: dict[str, Any]
    enabled: bool = True
    route_id: str | None = None
    service_id: str | None = None
    consumer_id: str | None = None
    instance_name: str | None = None
    where: str = ""  # the kong.yml path, for error messages

    @property
    def is_global(self) -> bool:
        return not (self.route_id or self.service_id or self.consumer_id)


@dataclasses.dataclass
class DeclarativeConfig:
    services: dict[str, Service]
    routes: list[Route]
    consumers: dict[str, Consumer]
    credentials: list[KeyAuthCredential]
    upstreams: dict[str, Upstream]
    plugins: list[PluginEntity]

    # --- lookups -------------------------------------------------------------------------
    def consumer_by_key(self, key: str) -> tuple[Consumer, KeyAuthCredential] | None:
        for cred in self.credentials:
            if cred.key == key:
                return self.consumers[cred.consumer_id], cred
        return None

    def find_consumer(self, ref: str) -> Consumer | None:
        """By id, username or custom_id (key-auth's `anonymous` accepts id or username)."""
        for c in self.consumers.values():
            if ref in (c.id, c.username, c.custom_id):
                return c
        return None

    def upstream_for_host(self, host: str) -> Upstream | None:
        return self.upstreams.get(host)

    def plugin_names(self) -> set[str]:
        return {p.name for p in self.plugins}

    def resolve_plugin(self, name: str, route_id: str | None, service_id: str | None,
                       consumer_id: str | None) -> PluginEntity | None:
        """The plugin entity Kong would run for this request (most specific scope wins)."""
        combos: dict[tuple[str | None, str | None, str | None], PluginEntity] = {}
        for p in self.plugins:
            if p.name == name and p.enabled:
                combos[(p.route_id, p.service_id, p.consumer_id)] = p
        if not combos:
            return None
        order = []
        if route_id and service_id and consumer_id:
            order.append((route_id, service_id, consumer_id))
        if route_id and consumer_id:
            order.append((route_id, None, consumer_id))
        if service_id and consumer_id:
            order.append((None, service_id, consumer_id))
        if route_id and service_id:
            order.append((route_id, service_id, None))
        if consumer_id:
            order.append((None, None, consumer_id))
        if route_id:
            order.append((route_id, None, None))
        if service_id:
            order.append((None, service_id, None))
        order.append((None, None, None))
        for key in order:
            if key in combos:
                return combos[key]
        return None

    def match_route(self, method: str, path: str, host: str | None) -> tuple[Route, str] | None:
        """(route, upstream-relative path after strip_path) or None (Kong: 404).

        Prefix paths match the longest first; `~` paths are regexes tried before prefixes, by
        regex_priority (Kong's traditional_compatible router). Methods and hosts, when set, must
        match too.
        """
        host_only = (host or "").split(":")[0].lower()
        best: tuple[int, int, Route, str] | None = None
        for route in self.routes:
            if route.methods and method.upper() not in route.methods:
                continue
            if route.hosts and not any(_host_matches(h, host_only) for h in route.hosts):
                continue
            for rpath in route.paths or ["/"]:
                if rpath.startswith("~"):
                    m = re.match(rpath[1:], path)
                    if not m:
                        continue
                    rank = (2, route.regex_priority)
                    matched = m.group(0)
                else:
                    if not path.startswith(rpath):
                        continue
                    rank = (1, len(rpath))
                    matched = rpath
                if best is None or rank > (best[0], best[1]):
                    rest = path[len(matched):] if route.strip_path else path
                    if route.strip_path and rest and not rest.startswith("/") and matched.endswith("/"):
                        rest = "/" + rest
                    best = (rank[0], rank[1], route, rest)
        if best is None:
            return None
        return best[2], best[3]


def _host_matches(pattern: str, host: str) -> bool:
    pattern = pattern.lower()
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    if pattern.endswith(".*"):
        return host.startswith(pattern[:-1])
    return host == pattern


# ----------------------------------------------------------------------------------- loading

def load(source: str | Path | Mapping[str, Any]) -> DeclarativeConfig:
    """Parse a kong.yml path, YAML text or already-parsed dict."""
    if isinstance(source, Mapping):
        doc = dict(source)
    else:
        text = None
        p = Path(source) if not (isinstance(source, str) and "\n" in source) else None
        if p is not None:
            if not p.exists():
                raise DeclarativeError(f"{p}: no such declarative config file")
            text = p.read_text()
        else:
            text = str(source)
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DeclarativeError(f"declarative config is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise DeclarativeError("declarative config must be a mapping at the top level")
    return _Loader(doc).build()


def read_document(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The raw kong.yml document (a deep copy when given a dict), not yet validated."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    p = Path(source) if not (isinstance(source, str) and "\n" in source) else None
    if p is not None and not p.exists():
        raise DeclarativeError(f"{p}: no such declarative config file")
    try:
        doc = yaml.safe_load(p.read_text() if p is not None else str(source))
    except yaml.YAMLError as exc:
        raise DeclarativeError(f"declarative config is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise DeclarativeError("declarative config must be a mapping at the top level")
    return doc


def override_hosts(source: str | Path | Mapping[str, Any],
                   mapping: Mapping[str, str]) -> dict[str, Any]:
    """A copy of a kong.yml document with `host:port` addresses rewritten, for local runs.

    `mapping` maps "host:port" to "host:port", e.g. {"mock-llm:8080": "127.0.0.1:40123",
    "redis:6379": "127.0.0.1:40124"}. Rewritten wherever a kong.yml carries an address: URLs
    (services[].url, a plugin's upstream_url, ...) whose authority is a mapped host:port (or a
    mapped host with its scheme's default port), and every mapping with `host` and `port` keys
    (a service's host/port, a plugin's redis record). Everything else is left untouched, so the
    file stays what real Kong reads. Raises DeclarativeError if a mapped address never occurs
    (a typo would otherwise silently leave the demo pointing at docker hostnames)."""
    targets: dict[tuple[str, int], tuple[str, int]] = {}
    for old, new in mapping.items():
        targets[_host_port(old, "mapping key")] = _host_port(new, "mapping value")
    used: set[tuple[str, int]] = set()

    def url(value: str) -> str:
        parts = urlsplit(value)
        if not parts.scheme or not parts.hostname:
            return value
        try:
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:
            return value
        key = (parts.hostname.lower(), port or 0)
        if key not in targets:
            return value
        used.add(key)
        host, new_port = targets[key]
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"{host}:{new_port}"
        return parts._replace(netloc=netloc).geturl()

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            host, port = out.get("host"), out.get("port")
            if isinstance(host, str) and isinstance(port, int) and not isinstance(port, bool):
                key = (host.lower(), port)
                if key in targets:
                    used.add(key)
                    out["host"], out["port"] = targets[key]
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str) and "://" in node:
            return url(node)
        return node

    doc = walk(read_document(source))
    unused = [f"{h}:{p}" for (h, p) in targets if (h, p) not in used]
    if unused:
        raise DeclarativeError(f"override_hosts: {', '.join(unused)} does not occur in the config")
    return doc


def _host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DeclarativeError(f"override_hosts: {what} {value!r} is not HOST:PORT")
    return host.lower(), int(port)


class _Loader:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.services: dict[str, Service] = {}
        self.routes: list[Route] = []
        self.consumers: dict[str, Consumer] = {}
        self.credentials: list[KeyAuthCredential] = []
        self.upstreams: dict[str, Upstream] = {}
        self.plugins: list[PluginEntity] = []
        # top-level plugins and routes reference parents by name or id: resolve after loading
        self.pending_plugins: list[tuple[dict[str, Any], str]] = []

    def build(self) -> DeclarativeConfig:
        fmt = self.doc.get("_format_version")
        if fmt is None:
            raise DeclarativeError("missing _format_version (expected \"3.0\")")
        if str(fmt) != "3.0":
            raise DeclarativeError(f"_format_version {fmt!r} is not supported (expected \"3.0\")")
        allowed = {"_format_version", "_transform", "_comment", "_workspace", "services",
                   "routes", "consumers", "plugins", "upstreams", "keyauth_credentials",
                   "targets", "certificates", "ca_certificates", "snis", "vaults", "consumer_groups"}
        for key in self.doc:
            if key not in allowed:
                raise DeclarativeError(f"unknown top-level key '{key}'")
        if self.doc.get("consumer_groups"):
            raise DeclarativeError(_NO_CONSUMER_GROUPS.format(where="consumer_groups"))
        for i, s in enumerate(self._list(self.doc, "services", "")):
            self._service(s, f"services[{i}]")
        for i, r in enumerate(self._list(self.doc, "routes", "")):
            svc = r.get("service") if isinstance(r, dict) else None
            self._route(r, f"routes[{i}]", self._ref(self.services, svc, f"routes[{i}].service")
                        if svc is not None else None)
        for i, c in enumerate(self._list(self.doc, "consumers", "")):
            self._consumer(c, f"consumers[{i}]")
        for i, k in enumerate(self._list(self.doc, "keyauth_credentials", "")):
            where = f"keyauth_credentials[{i}]"
            cons = self._ref(self.consumers, self._get(k, "consumer", where), where + ".consumer")
            self._credential(k, where, cons)
        for i, u in enumerate(self._list(self.doc, "upstreams", "")):
            self._upstream(u, f"upstreams[{i}]")
        for i, p in enumerate(self._list(self.doc, "plugins", "")):
            self.pending_plugins.append((p, f"plugins[{i}]"))
        for p, where in self.pending_plugins:
            self._plugin(p, where)
        return DeclarativeConfig(self.services, self.routes, self.consumers, self.credentials,
                                 self.upstreams, self.plugins)

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def _list(obj: Any, key: str, where: str) -> list[Any]:
        value = obj.get(key) if isinstance(obj, dict) else None
        if value is None:
            return []
        if not isinstance(value, list):
            raise DeclarativeError(f"{where + '.' if where else ''}{key}: expected an array")
        return value

    @staticmethod
    def _get(obj: Any, key: str, where: str) -> Any:
        if not isinstance(obj, dict):
            raise DeclarativeError(f"{where}: expected a mapping")
        if obj.get(key) is None:
            raise DeclarativeError(f"{where}.{key}: required field missing")
        return obj[key]

    @staticmethod
    def _id(obj: dict[str, Any], kind: str, where: str) -> str:
        if obj.get("id"):
            try:
                return str(uuid.UUID(str(obj["id"])))
            except ValueError:
                raise DeclarativeError(f"{where}.id: expected a UUID") from None
        key = obj.get("name") or obj.get("username") or obj.get("key") or where
        return str(uuid.uuid5(_NS, f"{kind}:{key}:{where}"))

    def _ref(self, table: Mapping[str, Any], ref: Any, where: str) -> str:
        if isinstance(ref, dict):
            ref = ref.get("id") or ref.get("name") or ref.get("username")
        if ref is None:
            raise DeclarativeError(f"{where}: empty reference")
        ref = str(ref)
        for ent_id, ent in table.items():
            names = {ent_id, getattr(ent, "name", None), getattr(ent, "username", None),
                     getattr(ent, "custom_id", None)}
            if ref in names:
                return ent_id
        raise DeclarativeError(f"{where}: no entity named or with id '{ref}'")

    @staticmethod
    def _check_keys(obj: dict[str, Any], allowed: Iterable[str], where: str) -> None:
        for key in obj:
            if key not in allowed:
                raise DeclarativeError(f"{where}.{key}: unknown field")

    # --- entities ------------------------------------------------------------------------
    def _service(self, s: Any, where: str) -> None:
        if not isinstance(s, dict):
            raise DeclarativeError(f"{where}: expected a mapping")
        self._check_keys(s, {"id", "name", "url", "protocol", "host", "port", "path", "routes",
                             "plugins", "retries", "connect_timeout", "read_timeout",
                             "write_timeout", "tags", "enabled", "tls_verify"}, where)
        if s.get("url"):
            parts = urlsplit(str(s["url"]))
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise DeclarativeError(f"{where}.url: expected an http(s) URL, got {s['url']!r}")
            protocol, host = parts.scheme, parts.hostname
            port = parts.port or (443 if protocol == "https" else 80)
            path = parts.path or None
        else:
            protocol = s.get("protocol", "http")
            host = self._get(s, "host", where)
            port = int(s.get("port", 443 if protocol == "https" else 80))
            path = s.get("path")
            if protocol not in ("http", "https"):
                raise DeclarativeError(f"{where}.protocol: only http and https are supported")
        if path is not None and not str(path).startswith("/"):
            raise DeclarativeError(f"{where}.path: must start with /")
        svc = Service(self._id(s, "service", where), s.get("name"), protocol, str(host), port,
                      path, int(s.get("read_timeout", 60000)), int(s.get("connect_timeout", 60000)),
                      int(s.get("write_timeout", 60000)))
        self.services[svc.id] = svc
        for i, r in enumerate(self._list(s, "routes", where)):
            self._route(r, f"{where}.routes[{i}]", svc.id)
        for i, p in enumerate(self._list(s, "plugins", where)):
            self.pending_plugins.append((dict(p, service=svc.id) if isinstance(p, dict) else p,
                                         f"{where}.plugins[{i}]"))

    def _route(self, r: Any, where: str, service_id: str | None) -> None:
        if not isinstance(r, dict):
            raise DeclarativeError(f"{where}: expected a mapping")
        self._check_keys(r, {"id", "name", "paths", "methods", "hosts", "strip_path", "service",
                             "preserve_host", "protocols", "plugins", "regex_priority", "tags",
                             "https_redirect_status_code", "path_handling", "headers",
                             "request_buffering", "response_buffering"}, where)
        paths = r.get("paths") or []
        methods = r.get("methods") or []
        hosts = r.get("hosts") or []
        for key, value in (("paths", paths), ("methods", methods), ("hosts", hosts)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DeclarativeError(f"{where}.{key}: expected an array of strings")
        for p in paths:
            if not (p.startswith("/") or p.startswith("~")):
                raise DeclarativeError(f"{where}.paths: '{p}' must start with / or ~")
        for m in methods:
            if m.upper() not in HTTP_METHODS:
                raise DeclarativeError(f"{where}.methods: unknown method '{m}'")
        if not (paths or methods or hosts):
            raise DeclarativeError(f"{where}: must set at least one of paths, methods, hosts")
        strip = r.get("strip_path", True)
        if not isinstance(strip, bool):
            raise DeclarativeError(f"{where}.strip_path: expected a boolean")
        route = Route(self._id(r, "route", where), r.get("name"), service_id, list(paths),
                      [m.upper() for m in methods], list(hosts), strip,
                      bool(r.get("preserve_host", False)), int(r.get("regex_priority", 0)))
        self.routes.append(route)
        for i, p in enumerate(self._list(r, "plugins", where)):
            extra = {"route": route.id}
            self.pending_plugins.append((dict(p, **extra) if isinstance(p, dict) else p,
                                         f"{where}.plugins[{i}]"))

    def _consumer(self, c: Any, where: str) -> None:
        if not isinstance(c, dict):
            raise DeclarativeError(f"{where}: expected a mapping")
        self._check_keys(c, {"id", "username", "custom_id", "keyauth_credentials", "plugins",
                             "tags", "groups"}, where)
        if not c.get("username") and not c.get("custom_id"):
            raise DeclarativeError(f"{where}: at least one of username or custom_id is required")
        cons = Consumer(self._id(c, "consumer", where), c.get("username"), c.get("custom_id"))
        self.consumers[cons.id] = cons
        for i, k in enumerate(self._list(c, "keyauth_credentials", where)):
            self._credential(k, f"{where}.keyauth_credentials[{i}]", cons.id)
        for i, p in enumerate(self._list(c, "plugins", where)):
            self.pending_plugins.append((dict(p, consumer=cons.id) if isinstance(p, dict) else p,
                                         f"{where}.plugins[{i}]"))

    def _credential(self, k: Any, where: str, consumer_id: str) -> None:
        key = self._get(k, "key", where)
        if not isinstance(key, str) or not key:
            raise DeclarativeError(f"{where}.key: expected a non-empty string")
        if any(c.key == key for c in self.credentials):
            # never echo the key itself: it is a credential
            raise DeclarativeError(f"{where}.key: duplicate key-auth key")
        self.credentials.append(KeyAuthCredential(self._id({"id": k.get("id")} if k.get("id") else {},
                                                           "keyauth", where), consumer_id, key))

    def _upstream(self, u: Any, where: str) -> None:
        name = self._get(u, "name", where)
        targets = []
        for i, t in enumerate(self._list(u, "targets", where)):
            tw = f"{where}.targets[{i}]"
            target = str(self._get(t, "target", tw))
            host, _, port = target.rpartition(":") if ":" in target else (target, "", "8000")
            try:
                targets.append(Target(host, int(port), int(t.get("weight", 100))))
            except ValueError:
                raise DeclarativeError(f"{tw}.target: expected host:port, got {target!r}") from None
        self.upstreams[name] = Upstream(self._id(u, "upstream", where), name, targets)

    def _plugin(self, p: Any, where: str) -> None:
        if not isinstance(p, dict):
            raise DeclarativeError(f"{where}: expected a mapping")
        self._check_keys(p, {"id", "name", "config", "enabled", "route", "service", "consumer",
                             "protocols", "tags", "instance_name", "ordering",
                             "consumer_group"}, where)
        if p.get("consumer_group"):
            raise DeclarativeError(_NO_CONSUMER_GROUPS.format(where=f"{where}.consumer_group"))
        if p.get("ordering"):
            # Dynamic plugin ordering (Kong Enterprise) changes which plugin runs first; running
            # by priority while accepting it would, e.g., put the cache before the quota.
            raise DeclarativeError(f"{where}.ordering: dynamic plugin ordering is not implemented by "
                                   "the Kong stand-in, which runs plugins by priority only")
        name = self._get(p, "name", where)
        config = p.get("config") or {}
        if not isinstance(config, dict):
            raise DeclarativeError(f"{where}.config: expected a mapping")
        enabled = p.get("enabled", True)
        if not isinstance(enabled, bool):
            raise DeclarativeError(f"{where}.enabled: expected a boolean")
        route_id = self._ref({r.id: r for r in self.routes}, p["route"], where + ".route") \
            if p.get("route") else None
        service_id = self._ref(self.services, p["service"], where + ".service") \
            if p.get("service") else None
        consumer_id = self._ref(self.consumers, p["consumer"], where + ".consumer") \
            if p.get("consumer") else None
        scope = (route_id, service_id, consumer_id)
        for other in self.plugins:
            if other.name == name and (other.route_id, other.service_id, other.consumer_id) == scope:
                raise DeclarativeError(
                    f"{where}: plugin '{name}' is configured twice for the same route/service/"
                    f"consumer (Kong's cache_key is unique), first at {other.where}")
        ident = p.get("id") or None
        pid = self._id({"id": ident} if ident else {}, "plugin", f"{name}:{scope}")
        self.plugins.append(PluginEntity(pid, str(name), dict(config), enabled, route_id,
                                         service_id, consumer_id, p.get("instance_name"), where))
