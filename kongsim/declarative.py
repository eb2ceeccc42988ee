"""Reads the declarative `kong.yml` (`_format_version: "3.0"`) that DB-less Kong reads.

Covered entities (reference kong-plugin-server.md §5, Kong's `kong/db/declarative` and the
template `kong/templates/kong_yml.lua`): services (`url`, or protocol/host/port/path), routes
(paths, methods, hosts, headers, regex_priority, strip_path default true, preserve_host; matched
by Kong 3.x's traditional_compatible priorities, see match_route), consumers (username,
custom_id) with nested `keyauth_credentials`, upstreams with targets, and plugins at global,
service, route and consumer scope, nested (inheriting the parent's foreign key) or top level
with `route:` / `service:` / `consumer:` references by name or id. Anything malformed raises
DeclarativeError naming the entity path, e.g. `services[0].routes[1].paths`. Route paths are
checked as Kong's router_path type checks them, and regex paths and `~*` header values are
compiled at load as Kong's Rust regex reads them (kongsim.rust_regex); match_route joins the
service path and the request path as Kong's router does (upstream_uri).

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

from kongsim import rust_regex, uri

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
    headers: dict[str, list[str]] = dataclasses.field(default_factory=dict)


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
    # the router's matchers in the order Kong's ATC router tries them (built on first use)
    _matchers: tuple[Any, list["_Matcher"]] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False)

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

    def match_route(self, method: str, path: str, host: str | None,
                    headers: Any = None, port: int | None = None) -> tuple[Route, str] | None:
        """(route, upstream URI) or None (Kong: 404). `path` is the normalised request path
        (Kong's router input: kong/router/utils.lua strip_uri_args); the upstream URI is the
        router's match_t.upstream_uri, not yet escaped (see `upstream_uri`).

        Kong 3.x's default router_flavor, traditional_compatible (kong/router/compat.lua over
        kong/router/atc.lua): every route becomes one matcher per group of its paths
        (kong/router/transform.lua split_routes_and_services_by_path: the regex paths, then
        one group per prefix length), each with the priority transform.lua get_priority
        computes (see _kong_priority), and the ATC router (Kong/atc-router src/router.rs)
        tries them by (priority, route uuid) descending: the first whose methods, hosts,
        headers and paths all match wins, whatever the order in kong.yml.

        `host` is the Host header (a port in it is what host:port route entries compare;
        without one, `port`, the listening port, as $server_port); `headers` anything with
        get_all(name) (kongsim.pdk.Headers), for routes with `headers`.
        """
        hostname, hport = _split_host_port(host or "")
        req_port = int(hport) if hport.isdigit() else port
        for m in self._router():
            route = m.route
            if route.methods and method.upper() not in route.methods:
                continue
            if route.hosts and not any(_host_matches(h, hostname, req_port) for h in route.hosts):
                continue
            if route.headers and not _headers_match(route.headers, headers):
                continue
            matched = _path_match(m.paths, path)
            if matched is None:
                continue
            service = self.services.get(route.service_id) if route.service_id else None
            # kong/router/utils.lua get_service_info: service.path or "/" (an http service)
            base = (service.path if service is not None else None) or "/"
            return route, upstream_uri(route.strip_path, matched, path, base)
        return None

    def _router(self) -> list["_Matcher"]:
        key = (id(self.routes), len(self.routes))
        if self._matchers is None or self._matchers[0] != key:
            self._matchers = (key, _build_router(self.routes))
        return self._matchers[1]


@dataclasses.dataclass
class _Matcher:
    """One ATC matcher: a route, or one path group of a route Kong split."""
    priority: int
    uuid: int
    route: Route
    paths: list[str]


# kong/router/transform.lua: split routes get uuid v5 ids from this namespace and
# "<route id>#<group index>"; the id breaks priority ties in the ATC router.
_SPLIT_NS = uuid.UUID("7f145bf9-0dce-4f91-98eb-debbce4b9f6b")


def _build_router(routes: Iterable[Route]) -> list[_Matcher]:
    matchers = []
    for route in routes:
        groups: dict[int, list[str]] = {}  # transform.lua group_by_regex_or_length: key 0 = regex
        for p in route.paths:
            groups.setdefault(0 if p.startswith("~") else len(p.encode()), []).append(p)
        if len(groups) <= 1:
            matchers.append(_Matcher(_kong_priority(route, route.paths), uuid.UUID(route.id).int,
                                     route, list(route.paths)))
            continue
        for i, paths in enumerate(groups.values(), start=1):
            split_id = uuid.uuid5(_SPLIT_NS, f"{route.id}#{i}")
            matchers.append(_Matcher(_kong_priority(route, paths), split_id.int, route, paths))
    # atc-router: matchers are a BTreeMap keyed by (priority, uuid), iterated in reverse
    matchers.sort(key=lambda m: (m.priority, m.uuid), reverse=True)
    return matchers


def _kong_priority(route: Route, paths: list[str]) -> int:
    """kong/router/transform.lua get_priority for an http route (one path group), as LuaJIT
    computes it.

    The layout in its comment is match weight << 61 | plain-host-only bit 60 | header count
    << 52 | regex bit 51 | regex_priority << 19 | path length. But its lshift_uint64 helper
    assigns the Lua number to its upvalue (`ffi_uint = v`) rather than into the uint64 cdata,
    so bit.lshift gets a plain number: LuaJIT's 32-bit BitOp shift, count taken mod 32. Only
    the two constants built from 0x01ULL keep their 64-bit places. So a route with only plain
    hosts, and then one with a regex path, outranks any route that has more of methods/hosts/
    headers/paths without it. Checked with luajit 2.1: lshift_uint64(2, 61) is 1073741824
    (2 << 29), not 2^62.
    """
    weight = 0
    if route.methods:
        weight += 1
    if route.hosts:
        weight += 1
    headers_count = min(len(route.headers), 255)  # MAX_HEADER_COUNT
    if headers_count:
        weight += 1
    if paths:
        weight += 1
    plain_host_only = bool(route.hosts) and not any("*" in h for h in route.hosts)
    regex_url = bool(paths) and paths[0].startswith("~")
    uri_length = 0 if regex_url or not paths else len(paths[0].encode())
    numbers = [_lj_lshift(weight, 61), _lj_lshift(headers_count, 52),
               _lj_lshift(route.regex_priority if regex_url else 0, 19),
               uri_length & 0x7FFFF]
    cdata = ([1 << 60] if plain_host_only else []) + ([1 << 51] if regex_url else [])
    if not cdata:
        # bit.bor of numbers only: a 32-bit result, made a uint64 by the FFI call that adds it
        result = 0
        for n in numbers:
            result |= n
        return _lj_to_u64(result)
    result = 0
    for n in cdata:
        result |= n
    for n in numbers:  # bit.bor with a uint64 operand converts every number to uint64
        result |= _lj_to_u64(n)
    return result


def _lj_lshift(value: int, count: int) -> int:
    """LuaJIT's bit.lshift on a Lua number: the value as int32, shifted by count mod 32, int32."""
    r = ((value & 0xFFFFFFFF) << (count & 31)) & 0xFFFFFFFF
    return r - (1 << 32) if r & 0x80000000 else r


def _lj_to_u64(value: int) -> int:
    """A Lua number made uint64_t. Only a negative int32 is affected (4+ match categories, or a
    regex_priority below 0 or whose << 19 leaves int32): LuaJIT 2.1 on x86-64 gives 2^63 for it
    (seen with luajit 2.1.0-beta3: bit.bor(-1, 0ULL) == 2^63; other builds may differ)."""
    return value if value >= 0 else 1 << 63


def _path_match(paths: list[str], path: str) -> str | None:
    """The matched value ATC's get_result("http.path") gives, or None; "/" for a route without
    paths (no http.path in its expression: atc.lua set_upstream_uri then takes "/").
    transform.lua: a regex path is `http.path ~ "^<regex>"`, a plain one `http.path ^= "<prefix>"`;
    the first of the group that matches gives the matched value.

    `path` holds one character per byte (kongsim.uri); the ATC router sees the UTF-8 text, so a
    regex runs on that text and its match is given back as bytes. Route paths are YAML text:
    a prefix is compared as its UTF-8 bytes."""
    if not paths:
        return "/"
    for p in paths:
        if p.startswith("~"):
            text = uri.wire_text(path)
            m = _compiled_path(p).search(text)
            if m:
                # back to bytes, unless the path was already text (in-process, wire_text kept it)
                return uri.byte_form(m.group(0)) if text is not path else m.group(0)
        else:
            prefix = uri.byte_form(p)
            if path.startswith(prefix):
                return prefix
    return None


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _compiled_path(p: str) -> re.Pattern[str]:
    pattern = _PATTERNS.get(p)
    if pattern is None:
        pattern = _PATTERNS.setdefault(p, rust_regex.compile_path(p))
    return pattern


def _compiled_header(value: str) -> re.Pattern[str]:
    key = "\0h" + value
    pattern = _PATTERNS.get(key)
    if pattern is None:
        pattern = _PATTERNS.setdefault(key, rust_regex.compile_header(value))
    return pattern


def sanitize_uri_postfix(postfix: str) -> str:
    """kong/router/utils.lua sanitize_uri_postfix: a leading "./" or "../" of what follows the
    matched prefix is dropped, and a postfix "." or ".." is empty."""
    if postfix in (".", ".."):
        return ""
    if postfix.startswith("./"):
        return postfix[2:]
    if postfix.startswith("../"):
        return postfix[3:]
    return postfix


def upstream_uri(strip_path: bool, matched: str, req_uri: str, upstream_base: str) -> str:
    """kong/router/atc.lua set_upstream_uri with kong/router/utils.lua get_upstream_uri_v0
    (traditional_compatible runs path_handling v0 for every route): how the service path
    (`upstream_base`), the route's match and the normalised request path `req_uri` join.
    `matched` is the router's matched value ("/" for a route without paths); without
    strip_path the prefix is "/"."""
    prefix = matched if strip_path else "/"
    postfix = sanitize_uri_postfix(req_uri[len(prefix):])
    if upstream_base.endswith("/"):
        if strip_path:
            if postfix == "":
                if upstream_base == "/":
                    return "/"
                if req_uri.endswith("/"):
                    return upstream_base
                return upstream_base[:-1]
            if postfix.startswith("/"):
                return upstream_base[:-1] + postfix  # double "/", so drop the first
            return upstream_base + postfix
        return upstream_base + req_uri[1:]
    if strip_path:
        if postfix == "":
            if len(req_uri) > 1 and req_uri.endswith("/"):
                return upstream_base + "/"
            return upstream_base
        if postfix.startswith("/"):
            return upstream_base + postfix
        return upstream_base + "/" + postfix
    if req_uri == "/":
        return upstream_base
    return upstream_base + req_uri


def _split_host_port(value: str) -> tuple[str, str]:
    """transform.lua split_host_port: "host:port" or "[v6]:port" -> (lower-cased host, port)."""
    if value.startswith("["):
        host, sep, rest = value.partition("]")
        return (host + sep).lower(), rest[1:] if rest.startswith(":") else ""
    host, _, port = value.partition(":")
    return host.lower(), port


def _host_matches(pattern: str, host: str, port: int | None = None) -> bool:
    """transform.lua get_expression: `*.x` is a suffix match, `x.*` a prefix match, and a
    `host:port` entry also needs net.dst.port == port."""
    pattern, pport = _split_host_port(pattern)
    if pport:
        if not pport.isdigit() or port != int(pport):
            return False
    if pattern.startswith("*"):
        return host.endswith(pattern[1:])
    if pattern.endswith("*"):
        return host.startswith(pattern[:-1])
    return host == pattern


def _headers_match(wanted: Mapping[str, list[str]], headers: Any) -> bool:
    """transform.lua get_expression: every header (AND) must have a value (any(...)) equal to
    one of the route's values (OR), both lower-cased; `~*re` values are regexes searched in
    the lower-cased value."""
    if headers is None:
        return False
    for name, values in wanted.items():
        got = [v.lower() for v in headers.get_all(name)]
        if not any(_header_value_matches(v, g) for v in values for g in got):
            return False
    return True


def _header_value_matches(value: str, got: str) -> bool:
    if value.startswith("~*"):
        return _compiled_header(value).search(got) is not None
    return value.lower() == got


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
        headers = r.get("headers") or {}
        if not isinstance(headers, dict):
            raise DeclarativeError(f"{where}.headers: expected a map of header names to arrays "
                                   "of strings")
        for name, values in headers.items():
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                raise DeclarativeError(f"{where}.headers.{name}: expected an array of strings")
            if str(name).lower() == "host":  # kong/db/schema/entities/routes.lua
                raise DeclarativeError(f"{where}.headers: cannot contain 'host' header, which must "
                                       "be specified in the 'hosts' attribute")
        for p in paths:
            _check_router_path(p, f"{where}.paths")
        for name, values in headers.items():
            for v in values:
                if v.startswith("~*"):
                    try:
                        _compiled_header(v)
                    except rust_regex.Unsupported as exc:
                        raise DeclarativeError(f"{where}.headers.{name}: regex '{v[2:]}': "
                                               f"{exc}") from None
        for m in methods:
            if m.upper() not in HTTP_METHODS:
                raise DeclarativeError(f"{where}.methods: unknown method '{m}'")
        if not (paths or methods or hosts or headers):
            raise DeclarativeError(f"{where}: must set at least one of paths, methods, hosts, "
                                   "headers")
        strip = r.get("strip_path", True)
        if not isinstance(strip, bool):
            raise DeclarativeError(f"{where}.strip_path: expected a boolean")
        route = Route(self._id(r, "route", where), r.get("name"), service_id, list(paths),
                      [m.upper() for m in methods], list(hosts), strip,
                      bool(r.get("preserve_host", False)), int(r.get("regex_priority", 0)),
                      {str(k): list(v) for k, v in headers.items()})
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


_PERCENT_OK = re.compile(r"%[0-9A-Fa-f]{2}")


def _check_router_path(p: str, where: str) -> None:
    """kong/db/schema/typedefs.lua router_path: starts with "/" or "~/", no empty segment,
    valid percent-encoding (validate_path's "percent" error), a prefix path in normalised form
    (validate_path_with_regexes), and a regex both PCRE and Kong's Rust regex accept, which the
    stand-in evaluates with Python's re (kongsim.rust_regex): compiled here, never per request."""
    if not (p.startswith("/") or p.startswith("~/")):
        raise DeclarativeError(f"{where}: '{p}' should start with: / (fixed path) or ~/ (regex "
                               "path)")
    if "//" in p:
        raise DeclarativeError(f"{where}: '{p}' must not have empty segments")
    raw = _PERCENT_OK.sub("___", p)
    if "%" in raw:
        bad = raw[raw.index("%"):raw.index("%") + 3]
        raise DeclarativeError(f"{where}: '{p}': invalid url-encoded value: '{bad}'")
    if not p.startswith("~"):
        normalized = uri.normalize(uri.byte_form(p))
        if normalized != uri.byte_form(p):
            shown = normalized.encode("latin-1").decode("utf-8", "replace")
            raise DeclarativeError(f"{where}: '{p}': non-normalized path, consider use "
                                   f"'{shown}' instead")
        return
    try:
        _compiled_path(p)
    except rust_regex.Unsupported as exc:
        raise DeclarativeError(f"{where}: regex '{p}': {exc}") from None
