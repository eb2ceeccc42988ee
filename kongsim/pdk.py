"""The Kong side of the PDK calls a plugin server proxies back (`exposed_api` + `must_fix`).

A plugin's callback `{"Method": "kong.x.y", "Args": [...]}` is answered here against the
per-request state (`RequestContext`). What is imitated, with the Kong source it follows:

* dispatch: exact name lookup; an unknown name logs `could not find pdk method: X` and
  returns nil (`kong/runloop/plugin_servers/plugin.lua` exposed_api, reference §2.4);
* only the first Lua return value is returned (mp_rpc.lua `call_pdk_method`);
* `must_fix`: header/query multimaps become name -> list of strings, the query flag `true`
  becomes `[]`, raw bodies are returned as `bytes` (msgpack bin), empty tables are `[]`;
* phase checks from `kong/pdk/private/phases.lua`: a call in a phase Kong forbids raises
  `PdkLuaError` (a Lua error: 500 in access, reference §2.7);
* `kong.response.exit/error` raise `ExitSignal` after storing the response: the bridge loop
  stops without replying (reference §2.4);
* `kong.log.serialize` returns a JSON string shaped like Kong's basic serializer
  (`kong/pdk/log.lua` serialize), only in `log`;
* in `log`, request/response getters read the data saved when the response was sent;
* `kong.log.set_serialize_value` in `log` is seen by nobody: Kong runs an external plugin's log
  handler in its own `ngx.timer.at(0)` on a clone of `ngx.ctx`, with the serializer snapshot
  taken when the log phase called it (`kong/runloop/plugin_servers/plugin.lua` build_phases);
  the Lua loggers (http-log, file-log) have serialized by then, and that plugin's own
  `kong.log.serialize` returns the snapshot. Values reach loggers only from earlier phases;
* the client address: `kong.client.get_ip` is the connection's, `get_forwarded_ip/port` are
  nginx's `$remote_addr/$remote_port` after the realip module, which Kong configures from
  kong.conf `trusted_ips` (default none), `real_ip_header` (X-Real-IP) and `real_ip_recursive`
  (off) (`kong/pdk/client.lua`, `kong.conf.default`, see `RealIp`).
"""
from __future__ import annotations

import copy
import ipaddress
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import parse_qsl, quote, urlencode

from kongsim import redact, uri
from kongsim.timing import RequestTiming

log = redact.get_logger("kongsim.pdk")
# nginx's log levels between Python's: notice sits between info and warn.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

NODE_ID = str(uuid.uuid4())
KONG_VERSION = "3.9.1"  # the Kong version whose behaviour is imitated (reference §0)
# kong.conf lua_max_req_headers and lua_max_resp_headers (kong/templates/kong_defaults.lua: 100):
# what ngx.req/resp.get_headers() return at most without an argument (kong/globalpatches.lua)
MAX_REQ_HEADERS = 100


class PdkLuaError(Exception):
    """A Lua error raised by a PDK function (wrong phase, bad arguments)."""


class ExitSignal(Exception):
    """kong.response.exit/error was called; the response is stored on the context."""


# ------------------------------------------------------------------------------- headers

class Headers:
    """An ordered, case-insensitive multi-map of HTTP headers (like ngx.req.get_headers)."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(str(k), str(v)) for k, v in items]

    def copy(self) -> "Headers":
        return Headers(self._items)

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def get(self, name: str) -> str | None:
        name = name.lower().replace("_", "-")
        for k, v in self._items:
            if k.lower() == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        name = name.lower().replace("_", "-")
        return [v for k, v in self._items if k.lower() == name]

    def set(self, name: str, value: Any) -> None:
        self.remove(name)
        for v in (value if isinstance(value, list) else [value]):
            self._items.append((name, str(v)))

    def add(self, name: str, value: Any) -> None:
        for v in (value if isinstance(value, list) else [value]):
            self._items.append((name, str(v)))

    def remove(self, name: str) -> None:
        lname = name.lower().replace("_", "-")
        self._items = [(k, v) for k, v in self._items if k.lower() != lname]

    def multimap(self) -> dict[str, list[str]]:
        """must_fix shape: lower-cased name -> list of strings."""
        out: dict[str, list[str]] = {}
        for k, v in self._items:
            out.setdefault(k.lower(), []).append(v)
        return out

    def flat(self) -> dict[str, Any]:
        """Serializer shape: a single value as a string, repeats as a list."""
        return {k: (v[0] if len(v) == 1 else v) for k, v in self.multimap().items()}

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def count(self) -> int:
        """The number of header lines (repeats counted)."""
        return len(self._items)

    def first(self, count: int) -> "Headers":
        """The first `count` header lines (what ngx.req.get_headers(count) returns)."""
        return Headers(self._items[:count])


# ------------------------------------------------------------------------------- context

@dataclass
class UpstreamRequest:
    """What Kong will send to the service, editable through kong.service.*."""
    scheme: str
    host: str
    port: int
    path: str
    query: str
    method: str
    headers: Headers
    body: bytes
    target: tuple[str, int] | None = None
    upstream_name: str | None = None
    buffered: bool = False


@dataclass
class RequestContext:
    """Everything Kong knows about one request, shared by all plugins on it."""
    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: str
    headers: Headers
    body: bytes
    client_ip: str = "127.0.0.1"
    client_port: int = 0
    http_version: str = "1.1"
    started_at: float = field(default_factory=time.time)
    route: Any = None
    service: Any = None
    consumer: Any = None
    credential: Any = None
    phase: str = "rewrite"
    plugin_name: str | None = None
    ctx_shared: dict[str, Any] = field(default_factory=dict)
    ngx_ctx: dict[str, Any] = field(default_factory=dict)
    serialize_values: dict[str, Any] = field(default_factory=dict)
    # What log handlers set with set_serialize_value: Kong keeps it nowhere (module doc); held
    # here only so a test can show a plugin does not rely on it.
    discarded_serialize_values: dict[str, Any] = field(default_factory=dict)
    upstream: UpstreamRequest | None = None
    # the response Kong sends; `exit_response` is a delayed kong.response.exit
    status: int | None = None
    response_headers: Headers = field(default_factory=Headers)
    response_source: str | None = None
    exit_response: tuple[int, bytes, Headers] | None = None
    service_status: int | None = None
    service_headers: Headers | None = None
    service_body: bytes | None = None
    response_size: int = 0
    upstream_latency_ms: int | None = None
    proxy_latency_ms: int | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    saved: dict[str, Any] | None = None  # log-time snapshot
    timing: RequestTiming | None = None  # Kong's request-debugging tree (always collected)
    # (address, port) after nginx's realip module, set by PDK.post_read; port None is an
    # empty $remote_port (an address taken from a header without a port)
    realip: tuple[str, int | None] | None = None
    # The path as the client sent it; `path` is it normalised (kongsim.uri), as Kong routes on it.
    raw_path: str = ""
    request_uri: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if self.timing is None:
            self.timing = RequestTiming(self.request_id)
        # nginx's $request_uri: the request line as the client sent it, which no plugin changes
        # (a cleared query argument changes $args, i.e. `query`, only)
        if not self.raw_path:
            self.raw_path = self.path
        self.request_uri = self.raw_path + ("?" + self.query if self.query else "")

    @property
    def remote_addr(self) -> str:
        """nginx's $remote_addr: the realip result, else the connection's address."""
        return self.realip[0] if self.realip is not None else self.client_ip

    @property
    def remote_port(self) -> int | None:
        """nginx's $remote_port (None when realip took an address without a port)."""
        return self.realip[1] if self.realip is not None else self.client_port

    @property
    def path_with_query(self) -> str:
        return self.request_uri

    def query_multimap(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for part in self.query.split("&") if self.query else []:
            if not part:
                continue
            if "=" not in part:
                out.setdefault(_unquote(part), [])  # a flag: Lua true -> must_fix []
                continue
            k, v = part.split("=", 1)
            out.setdefault(_unquote(k), []).append(_unquote(v))
        return out

    def save_for_log(self) -> None:
        """Kong saves this when it schedules the log timer (mp_rpc.lua, reference §2.8)."""
        self.saved = {
            "serialize": serialize(self),
            "request_headers": self.headers.copy(),
            "response_headers": self.response_headers.copy(),
            "status": self.status,
            "start_time": self.started_at,
            "ngx_ctx": dict(self.ngx_ctx),  # a shallow copy, like Kong's
            "source": self.response_source,
        }


def _unquote(s: str) -> str:
    from urllib.parse import unquote_plus
    return unquote_plus(s)


def serialize(ctx: RequestContext) -> dict[str, Any]:
    """Kong's basic log serializer (kong/pdk/log.lua) plus set_serialize_value entries."""
    # kong/pdk/log.lua masks these two only; a key-auth key is logged unless hide_credentials
    # cleared it from the request (Kong/kong#2532).
    # kong/pdk/log.lua serialize: request_headers = kong.request.get_headers(), i.e. at most
    # lua_max_req_headers (100) of them
    req_headers = {k: ("REDACTED" if k.lower() in ("authorization", "proxy-authorization") else v)
                   for k, v in ctx.headers.first(MAX_REQ_HEADERS).flat().items()}
    resp_headers = ctx.response_headers.flat()
    url = f"{ctx.scheme}://{ctx.host}:{ctx.port}{ctx.path_with_query}"
    now_ms = int(time.time() * 1000)
    started_ms = int(ctx.started_at * 1000)
    upstream_ms = ctx.upstream_latency_ms if ctx.upstream_latency_ms is not None else -1
    proxy_ms = ctx.proxy_latency_ms if ctx.proxy_latency_ms is not None else -1
    out: dict[str, Any] = {
        "request": {"id": ctx.request_id or "", "method": ctx.method, "uri": ctx.path_with_query, "url": url,
                    "querystring": {k: (v[0] if len(v) == 1 else (v or True))
                                    for k, v in ctx.query_multimap().items()},
                    "headers": req_headers, "size": len(ctx.body) + sum(
                        len(k) + len(v) + 4 for k, v in ctx.headers.items())},
        "response": {"status": ctx.status, "headers": resp_headers, "size": ctx.response_size},
        "upstream_uri": ctx.upstream.path + ("?" + ctx.upstream.query if ctx.upstream.query else "")
        if ctx.upstream else None,
        "latencies": {"kong": proxy_ms, "proxy": upstream_ms,
                      "request": max(now_ms - started_ms, 0), "receive": 0},
        "client_ip": ctx.remote_addr,  # kong/pdk/log.lua: var.remote_addr (after realip)
        "started_at": started_ms,
        # var.upstream_status or ctx.buffered_status (kong/pdk/log.lua): a string, "" when no
        # upstream answered
        "upstream_status": "" if ctx.service_status is None else str(ctx.service_status),
        "source": ctx.response_source,
        "workspace": WORKSPACE_ID,
        "workspace_name": "default",
    }
    if ctx.route is not None:
        out["route"] = _route_dict(ctx.route)
    if ctx.service is not None:
        out["service"] = _service_dict(ctx.service)
    if ctx.consumer is not None:
        out["consumer"] = _consumer_dict(ctx.consumer)
    if ctx.credential is not None:
        # Kong's authenticated_entity: the credential's id and consumer_id, never the key
        out["authenticated_entity"] = {"id": ctx.credential.id,
                                       "consumer_id": {"id": ctx.credential.consumer_id}}
    for key, value in ctx.serialize_values.items():
        _set_dotted(out, key, copy.deepcopy(value))
    return out


WORKSPACE_ID = "00000000-0000-4000-8000-000000000001"


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    """set_serialize_value("a.b.c", v): dotted keys become nested tables (kong/pdk/log.lua)."""
    parts = key.split(".")
    cur = target
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    if value is None:
        cur.pop(parts[-1], None)
    else:
        cur[parts[-1]] = value


def _route_dict(r: Any) -> dict[str, Any]:
    return {"id": r.id, "name": r.name, "paths": r.paths, "methods": r.methods or None,
            "hosts": r.hosts or None, "strip_path": r.strip_path, "preserve_host": r.preserve_host,
            "protocols": ["http", "https"], "service": {"id": r.service_id} if r.service_id else None,
            "ws_id": WORKSPACE_ID}


def _service_dict(s: Any) -> dict[str, Any]:
    return {"id": s.id, "name": s.name, "protocol": s.protocol, "host": s.host, "port": s.port,
            "path": s.path, "read_timeout": s.read_timeout_ms, "ws_id": WORKSPACE_ID}


def _consumer_dict(c: Any) -> dict[str, Any]:
    return {"id": c.id, "username": c.username, "custom_id": c.custom_id, "ws_id": WORKSPACE_ID}


def _credential_dict(cred: Any) -> dict[str, Any]:
    # The key is a secret: plugins get the entity shape without it leaking into their logs.
    return {"id": cred.id, "consumer": {"id": cred.consumer_id}, "ws_id": WORKSPACE_ID}


# ------------------------------------------------------------------------------- client address

DEFAULT_REAL_IP_HEADER = "X-Real-IP"  # kong_defaults.lua: real_ip_header = X-Real-IP


def _parse_ip(text: str) -> str | None:
    if "%" in text:  # nginx's address parsers know no IPv6 zone ids
        return None
    try:
        return str(ipaddress.ip_address(text))  # ngx_sock_ntop's text form
    except ValueError:
        return None


def _parse_addr_port(text: str) -> tuple[str, int | None] | None:
    """ngx_parse_addr_port (src/core/ngx_inet.c): `addr`, `addr:port`, `[v6]`, `[v6]:port`."""
    ip = _parse_ip(text)
    if ip is not None:
        return ip, None
    if text.startswith("["):
        close = text.find("]")
        if close == len(text) - 1:
            ip = _parse_ip(text[1:-1])
            return (ip, None) if ip is not None else None
        if close < 0 or text[close + 1:close + 2] != ":":
            return None
        host, port_text = text[1:close], text[close + 2:]
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            return None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        return None
    ip = _parse_ip(host)
    return (ip, int(port_text)) if ip is not None else None


_OK, _DONE, _DECLINED = 0, 1, 2  # ngx_http_get_forwarded_addr's NGX_OK / NGX_DONE / NGX_DECLINED


class RealIp:
    """nginx's realip module as Kong configures it from kong.conf.

    Kong renders one `set_real_ip_from` per `trusted_ips` entry (templates/nginx_kong.lua) and
    `real_ip_header` / `real_ip_recursive` as the directives of the same name (kong.conf.default;
    defaults none, X-Real-IP, off). With no trusted entry the module does nothing, so
    kong.client.get_forwarded_ip is the connection's address. `kong.ip.is_trusted` matches the
    same list (kong/pdk/ip.lua), ignoring `unix:`, which only trusts Unix-socket clients (the
    stand-in's front is TCP).
    """

    def __init__(self, trusted_ips: Iterable[str] = (), header: str = DEFAULT_REAL_IP_HEADER,
                 recursive: bool = False) -> None:
        nets = []
        for entry in trusted_ips:
            if entry == "unix:":
                continue
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                # kong/conf_loader/parse.lua's check, word for word
                raise ValueError("trusted_ips must be a comma separated list in the form of IPv4 "
                                 "or IPv6 address or CIDR block or 'unix:', got '" + str(entry) + "'"
                                 ) from None
        if not isinstance(header, str) or not header.strip():
            raise ValueError("real_ip_header must be a header name or proxy_protocol")
        self.networks = tuple(nets)
        self.header = header.strip()
        self.recursive = bool(recursive)

    def is_trusted(self, ip: Any) -> bool:
        if not self.networks or not isinstance(ip, str):
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.networks)

    def _from_value(self, addr: str, port: int | None, xff: str
                    ) -> tuple[int, str, int | None]:
        """ngx_http_get_forwarded_addr_internal: take addresses from the right while the
        current one is trusted (only the last one unless recursive)."""
        found = False
        while True:
            if not self.is_trusted(addr):
                return (_DONE if found else _DECLINED), addr, port
            end = len(xff)
            i = end - 1
            while i > 0 and xff[i] in " ,":
                i -= 1
                end -= 1
            while i > 0 and xff[i] not in " ,":
                i -= 1
            start = i + 1 if i > 0 else 0
            parsed = _parse_addr_port(xff[start:end])
            if parsed is None:
                return (_DONE if found else _DECLINED), addr, port
            addr, port = parsed
            found = True
            if not (self.recursive and start > 0):
                return _OK, addr, port
            xff = xff[:start - 1]

    def resolve(self, client_ip: str, client_port: int | None, headers: Headers
                ) -> tuple[str, int | None]:
        """($remote_addr, $remote_port) for a request (ngx_http_realip_handler)."""
        unchanged = (client_ip, client_port)
        if not self.networks or self.header == "proxy_protocol":
            # no set_real_ip_from: the module is off; proxy_protocol: the stand-in's front
            # takes no PROXY protocol header, and nginx declines without one
            return unchanged
        if self.header == "X-Forwarded-For":  # nginx matches this spelling exactly
            values = headers.get_all("X-Forwarded-For")
            # every X-Forwarded-For header, the last one first (ngx_http_get_forwarded_addr)
            rc, addr, port, found = _DECLINED, client_ip, client_port, False
            for value in reversed(values):
                rc, addr, port = self._from_value(addr, port, value)
                if not self.recursive:
                    break
                if rc == _DECLINED and found:
                    rc = _DONE
                    break
                if rc != _OK:
                    break
                found = True
        else:
            # X-Real-IP (headers_in.x_real_ip) or any other name: the first such header
            value = headers.get(self.header)
            if value is None:
                return unchanged
            rc, addr, port = self._from_value(client_ip, client_port, value)
        return (addr, port) if rc != _DECLINED else unchanged


def real_ip_settings(conf: Mapping[str, str]) -> dict[str, Any]:
    """configure_real_ip() arguments from parsed kong.conf keys (process.parse_kong_conf).

    `trusted_ips` is a comma-separated list, NONE or empty for none (conf_loader `array`);
    `real_ip_header` / `real_ip_recursive` are aliases of `nginx_proxy_real_ip_header` /
    `nginx_proxy_real_ip_recursive`, which win when both are set (conf_loader
    aliased_properties); recursive is on only for "on" (conf_loader `ngx_boolean`)."""
    raw = conf.get("trusted_ips", "")
    ips = [] if raw.strip() == "NONE" else [v.strip() for v in raw.split(",") if v.strip()]
    header = conf.get("nginx_proxy_real_ip_header") or conf.get("real_ip_header") \
        or DEFAULT_REAL_IP_HEADER
    recursive = conf.get("nginx_proxy_real_ip_recursive") or conf.get("real_ip_recursive") or "off"
    return {"trusted_ips": ips, "real_ip_header": header.strip(),
            "real_ip_recursive": recursive.strip() == "on"}


# ------------------------------------------------------------------------------- phases

REQUEST_PHASES = {"rewrite", "access", "response", "header_filter", "body_filter", "log"}
BEFORE_CONTENT = {"rewrite", "access", "response"}
REWRITE_ACCESS = {"rewrite", "access"}
RESPONSE_READ = {"header_filter", "response", "body_filter", "log"}
EXIT_PHASES = {"rewrite", "access", "response", "header_filter"}
SET_RESPONSE_HEADER = {"rewrite", "access", "header_filter", "response"}


def _check(ctx: RequestContext, method: str, allowed: set[str]) -> None:
    if ctx.phase not in allowed:
        raise PdkLuaError(f"function cannot be called in {ctx.phase} phase "
                          f"(only in: {', '.join(sorted(allowed))}) [{method}]")


# ------------------------------------------------------------------------------- the PDK

Handler = Callable[..., Any]


DEFAULT_CLIENT_BODY_BUFFER_SIZE = 8 * 1024  # kong_defaults.lua nginx_http_client_body_buffer_size = 8k


class PDK:
    """Answers plugin callbacks. `call()` returns the value sent back in the Step.

    `config` is the loaded declarative config (consumers for kong.client.load_consumer);
    `real_ip` holds kong.conf's trusted_ips / real_ip_header / real_ip_recursive.
    """

    def __init__(self, config: Any = None, trusted_ips: Iterable[str] = (),
                 real_ip_header: str = DEFAULT_REAL_IP_HEADER,
                 real_ip_recursive: bool = False) -> None:
        self.config = config
        # nginx_http_client_body_buffer_size (Kong's default 8k, kong_defaults.lua): a request
        # body larger than this is spooled to a temporary file (see _get_raw_body).
        self.client_body_buffer_size = DEFAULT_CLIENT_BODY_BUFFER_SIZE
        # Kong's default trusted_ips is empty (kong_defaults.lua `trusted_ips = NONE`): no
        # client is trusted, so forwarded headers are ignored unless kong.conf says otherwise.
        self.real_ip = RealIp(trusted_ips, real_ip_header, real_ip_recursive)
        self.methods: dict[str, Handler] = {}
        # Observer of every callback, called as on_call(ctx, method) before it is answered
        # (plugin and phase are ctx.plugin_name / ctx.phase): tests count a plugin's PDK
        # round trips with it. None costs one attribute check per call.
        self.on_call: Callable[[RequestContext, str], None] | None = None
        self._register()

    def call(self, ctx: RequestContext, method: str, args: list[Any] | None) -> Any:
        """One callback: the first Lua return value, after must_fix. Raises PdkLuaError/ExitSignal.

        `args` is owned by the callee from here on (the bridge loop passes values freshly
        unpacked from the wire), so setters store them without copying."""
        observer = self.on_call
        if observer is not None:
            observer(ctx, method)
        fn = self.methods.get(method)
        if fn is None:
            log.error("[%s] could not find pdk method: %s", ctx.plugin_name, method)
            return None
        try:
            return fn(ctx, *args) if args else fn(ctx)
        except (PdkLuaError, ExitSignal):
            raise
        except Exception as exc:  # noqa: BLE001 - bad arguments must never crash the stand-in
            # Wrong argument count or types (a None where a string belongs, ...): Kong's PDK
            # function raises a Lua error, which is what the caller turns into a 500 in access.
            raise PdkLuaError(f"bad argument to {method}: {type(exc).__name__}: {exc}") from None

    # --- registration ------------------------------------------------------------------
    def _register(self) -> None:
        m = self.methods
        # kong.request (kong/pdk/request.lua)
        m["kong.request.get_scheme"] = lambda c: self._req(c, "scheme")
        m["kong.request.get_host"] = lambda c: self._req(c, "host")
        m["kong.request.get_port"] = lambda c: self._req(c, "port")
        m["kong.request.get_forwarded_scheme"] = lambda c: c.headers.get("x-forwarded-proto") \
            if self._trusted(c) and c.headers.get("x-forwarded-proto") else self._req(c, "scheme")
        m["kong.request.get_forwarded_host"] = lambda c: (c.headers.get("x-forwarded-host")
                                                          if self._trusted(c) else None) or self._req(c, "host")
        m["kong.request.get_forwarded_port"] = lambda c: int(c.headers.get("x-forwarded-port")) \
            if self._trusted(c) and (c.headers.get("x-forwarded-port") or "").isdigit() else self._req(c, "port")
        m["kong.request.get_forwarded_path"] = lambda c: (
            c.headers.get("x-forwarded-path") if self._trusted(c) and c.headers.get("x-forwarded-path")
            else self._path(c, "path"))
        m["kong.request.get_forwarded_prefix"] = lambda c: None
        m["kong.request.get_http_version"] = lambda c: float(c.http_version)
        m["kong.request.get_method"] = lambda c: self._req(c, "method")
        m["kong.request.get_path"] = lambda c: self._path(c, "path")
        m["kong.request.get_raw_path"] = lambda c: self._path(c, "raw_path")
        m["kong.request.get_path_with_query"] = lambda c: self._req(c, "path_with_query")
        m["kong.request.get_raw_query"] = lambda c: self._req(c, "query")
        m["kong.request.get_query_arg"] = self._get_query_arg
        m["kong.request.get_query"] = self._get_query
        m["kong.request.get_header"] = self._get_header
        m["kong.request.get_headers"] = self._get_headers
        m["kong.request.get_raw_body"] = self._get_raw_body
        m["kong.request.get_body"] = self._get_body
        m["kong.request.get_start_time"] = lambda c: int(c.started_at * 1000)
        m["kong.request.get_id"] = lambda c: c.request_id
        m["kong.request.get_uri_captures"] = lambda c: {"unnamed": [], "named": []}
        # kong.client
        m["kong.client.get_ip"] = lambda c: c.client_ip
        # get_ip/get_port: $realip_remote_addr/port, the connection; the forwarded ones:
        # $remote_addr/port after realip (kong/pdk/client.lua)
        m["kong.client.get_forwarded_ip"] = lambda c: self.post_read(c)[0]
        m["kong.client.get_port"] = lambda c: c.client_port
        m["kong.client.get_forwarded_port"] = lambda c: self.post_read(c)[1]
        m["kong.client.get_consumer"] = self._get_consumer
        m["kong.client.get_credential"] = self._get_credential
        m["kong.client.authenticate"] = self._authenticate
        m["kong.client.load_consumer"] = self._load_consumer
        m["kong.client.get_protocol"] = lambda c, *a: c.scheme
        # kong.router
        m["kong.router.get_route"] = self._get_route
        m["kong.router.get_service"] = self._get_service
        # kong.response
        m["kong.response.exit"] = self._exit
        m["kong.response.error"] = self._error
        m["kong.response.get_status"] = self._resp_status
        m["kong.response.get_header"] = self._resp_header
        m["kong.response.get_headers"] = self._resp_headers
        m["kong.response.get_source"] = self._resp_source
        m["kong.response.set_status"] = self._set_status
        m["kong.response.set_header"] = lambda c, n, v: self._resp_edit(c, "set", n, v)
        m["kong.response.add_header"] = lambda c, n, v: self._resp_edit(c, "add", n, v)
        m["kong.response.clear_header"] = lambda c, n: self._resp_edit(c, "clear", n, None)
        m["kong.response.set_headers"] = self._resp_set_headers
        # kong.service
        m["kong.service.set_upstream"] = self._set_upstream
        m["kong.service.set_target"] = self._set_target
        m["kong.service.request.set_raw_body"] = self._svc_set_raw_body
        m["kong.service.request.set_body"] = self._svc_set_body
        m["kong.service.request.set_header"] = lambda c, n, v: self._svc_hdr(c, "set", n, v)
        m["kong.service.request.add_header"] = lambda c, n, v: self._svc_hdr(c, "add", n, v)
        m["kong.service.request.clear_header"] = lambda c, n: self._svc_hdr(c, "clear", n, None)
        m["kong.service.request.set_headers"] = self._svc_set_headers
        m["kong.service.request.set_path"] = lambda c, p: self._svc_set(c, "path", p)
        m["kong.service.request.set_raw_query"] = lambda c, q: self._svc_set(c, "query", q)
        m["kong.service.request.set_query"] = self._svc_set_query
        m["kong.service.request.set_method"] = lambda c, v: self._svc_set(c, "method", v)
        m["kong.service.request.set_scheme"] = lambda c, v: self._svc_set(c, "scheme", v)
        m["kong.service.request.enable_buffering"] = self._enable_buffering
        m["kong.service.response.get_status"] = self._svc_status
        m["kong.service.response.get_header"] = self._svc_header
        m["kong.service.response.get_headers"] = self._svc_headers
        m["kong.service.response.get_raw_body"] = self._svc_raw_body
        m["kong.service.response.get_body"] = self._svc_body
        # kong.ctx.shared, kong.nginx (plugin.lua overrides)
        m["kong.ctx.shared.get"] = lambda c, k: _fix(c.ctx_shared.get(k))
        m["kong.ctx.shared.set"] = self._shared_set
        m["kong.nginx.get_ctx"] = self._get_ctx
        m["kong.nginx.set_ctx"] = self._set_ctx
        m["kong.nginx.get_var"] = self._get_var
        m["kong.nginx.req_start_time"] = lambda c: c.started_at
        m["kong.nginx.get_subsystem"] = lambda c: "http"
        # kong.log
        for level in ("debug", "info", "notice", "warn", "err", "crit", "alert", "emerg"):
            m[f"kong.log.{level}"] = self._make_log(level)
        m["kong.log"] = self._make_log("notice")
        m["kong.log.serialize"] = self._serialize
        m["kong.log.set_serialize_value"] = self._set_serialize_value
        # kong.node, kong.ip
        m["kong.node.get_id"] = lambda c: NODE_ID
        m["kong.node.get_hostname"] = lambda c: socket.gethostname()
        m["kong.node.get_memory_stats"] = lambda c, *a: {"workers_lua_vms": [], "lua_shared_dicts": {}}
        m["kong.ip.is_trusted"] = lambda c, ip: self.real_ip.is_trusted(ip)
        m["kong.table.new"] = lambda c, *a: []
        m["kong.version"] = lambda c: KONG_VERSION

    # --- kong.request --------------------------------------------------------------------
    @staticmethod
    def _req(ctx: RequestContext, attr: str) -> Any:
        if ctx.phase == "log":
            # Inside the log timer there is no live request (reference §2.8): nil.
            return None
        return getattr(ctx, attr)

    @classmethod
    def _path(cls, ctx: RequestContext, attr: str) -> Any:
        """A path as Kong's Lua string reaches the plugin server (its bytes, kongsim.uri.wire_text)."""
        path = cls._req(ctx, attr)
        return None if path is None else uri.wire_text(path)

    def _trusted(self, ctx: RequestContext) -> bool:
        # kong/pdk/request.lua is_trusted_ip(): kong.ip.is_trusted(kong.client.get_ip())
        return self.real_ip.is_trusted(ctx.client_ip)

    def configure_real_ip(self, trusted_ips: Iterable[str] = (),
                          real_ip_header: str = DEFAULT_REAL_IP_HEADER,
                          real_ip_recursive: bool = False) -> None:
        """Set kong.conf's trusted_ips / real_ip_header / real_ip_recursive (ValueError if bad)."""
        self.real_ip = RealIp(trusted_ips, real_ip_header, real_ip_recursive)

    def post_read(self, ctx: RequestContext) -> tuple[str, int | None]:
        """nginx's realip step (post-read phase, before any plugin): ctx.realip, set once."""
        if ctx.realip is None:
            ctx.realip = self.real_ip.resolve(ctx.client_ip, ctx.client_port, ctx.headers)
        return ctx.realip

    @staticmethod
    def _headers_source(ctx: RequestContext, saved_key: str, live: Headers) -> Headers:
        if ctx.phase == "log" and ctx.saved is not None:
            return ctx.saved[saved_key]
        return live

    def _get_header(self, ctx: RequestContext, name: str) -> str | None:
        return self._headers_source(ctx, "request_headers", ctx.headers).get(_header_name(name))

    def _get_headers(self, ctx: RequestContext, max_headers: Any = None) -> Any:
        """kong/pdk/request.lua get_headers: ngx.req.get_headers(max_headers), which Kong's
        globalpatches.lua limits to lua_max_req_headers (default 100) when max_headers is nil:
        the first that many header lines (lua-nginx-module ngx_http_lua_ffi_req_get_headers_count),
        with a notice "request headers truncated"."""
        _check(ctx, "kong.request.get_headers", REQUEST_PHASES)
        headers = self._headers_source(ctx, "request_headers", ctx.headers)
        return _fix(_at_most(ctx, headers, max_headers, "request").multimap())

    def _get_query(self, ctx: RequestContext, max_args: int | None = None) -> Any:
        _check(ctx, "kong.request.get_query", REQUEST_PHASES)
        return _fix(ctx.query_multimap())

    def _get_query_arg(self, ctx: RequestContext, name: str) -> Any:
        values = ctx.query_multimap().get(str(name))
        if values is None:
            return None
        return values[0] if values else True

    def _get_raw_body(self, ctx: RequestContext, max_allowed_file_size: Any = None, *args: Any) -> bytes:
        _check(ctx, "kong.request.get_raw_body", BEFORE_CONTENT)
        if len(ctx.body) > self.client_body_buffer_size:
            # nginx spooled the body to a file. kong/pdk/request.lua (3.8+) get_raw_body reads it
            # back when max_allowed_file_size is a number >= 0 and the file is not bigger (0: any
            # size); otherwise it returns nil, which mp_rpc.lua packs as msgpack bin and fails on
            # (reference §2.4): a Lua error, the request's 500.
            limit = max_allowed_file_size
            readable = (isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit >= 0
                        and (limit == 0 or len(ctx.body) <= limit))
            if not readable:
                raise PdkLuaError("kong.request.get_raw_body: the request body did not fit into the client "
                                  "body buffer (nginx_http_client_body_buffer_size) and packing nil as bin failed")
        return bytes(ctx.body)  # must_fix: sent as msgpack bin

    def _get_body(self, ctx: RequestContext, mimetype: str | None = None, *args: Any) -> Any:
        """kong.request.get_body: JSON, urlencoded or nil; the first return value only."""
        _check(ctx, "kong.request.get_body", BEFORE_CONTENT)
        ctype = (mimetype or ctx.headers.get("content-type") or "").lower()
        if "application/json" in ctype:
            try:
                return _fix(json.loads(ctx.body.decode("utf-8"))) if ctx.body else None
            except ValueError:
                return None
        if "application/x-www-form-urlencoded" in ctype:
            out: dict[str, Any] = {}
            for k, v in parse_qsl(ctx.body.decode("utf-8", "replace"), keep_blank_values=True):
                out[k] = v if k not in out else (out[k] if isinstance(out[k], list) else [out[k]]) + [v]
            return _fix(out)
        return None

    # --- kong.client ---------------------------------------------------------------------
    def _get_consumer(self, ctx: RequestContext) -> Any:
        _check(ctx, "kong.client.get_consumer", {"access"} | RESPONSE_READ)
        return _consumer_dict(ctx.consumer) if ctx.consumer else None

    def _get_credential(self, ctx: RequestContext) -> Any:
        _check(ctx, "kong.client.get_credential", {"access"} | RESPONSE_READ)
        return _credential_dict(ctx.credential) if ctx.credential else None

    def _authenticate(self, ctx: RequestContext, consumer: Any, credential: Any) -> None:
        _check(ctx, "kong.client.authenticate", REWRITE_ACCESS)
        if not consumer and not credential:
            raise PdkLuaError("either credential or consumer must be provided")
        cons = None
        if isinstance(consumer, dict) and self.config is not None:
            cons = self.config.consumers.get(consumer.get("id")) or self.config.find_consumer(
                str(consumer.get("username") or consumer.get("custom_id") or ""))
        ctx.consumer = cons
        ctx.credential = _CredentialRef.from_dict(credential) if isinstance(credential, dict) else None
        return None

    def _load_consumer(self, ctx: RequestContext, ref: str, by_username: bool = False) -> Any:
        if self.config is None:
            return None
        cons = self.config.consumers.get(ref) or (self.config.find_consumer(ref) if by_username else None)
        return _consumer_dict(cons) if cons else None

    # --- kong.router ---------------------------------------------------------------------
    def _get_route(self, ctx: RequestContext) -> Any:
        _check(ctx, "kong.router.get_route", {"access"} | RESPONSE_READ)
        return _route_dict(ctx.route) if ctx.route else None

    def _get_service(self, ctx: RequestContext) -> Any:
        _check(ctx, "kong.router.get_service", {"access"} | RESPONSE_READ)
        return _service_dict(ctx.service) if ctx.service else None

    # --- kong.response -------------------------------------------------------------------
    def _exit(self, ctx: RequestContext, status: Any, body: Any = None, headers: Any = None) -> None:
        _check(ctx, "kong.response.exit", EXIT_PHASES)
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise PdkLuaError("code must be a number between 100 and 599")
        hdrs = ctx.response_headers.copy()
        payload = b""
        if isinstance(body, dict) or (isinstance(body, list) and body):
            payload = json.dumps(body).encode()
            hdrs.set("Content-Type", "application/json; charset=utf-8")
        elif isinstance(body, (bytes, bytearray)):
            payload = bytes(body)
        elif isinstance(body, str):
            payload = body.encode("utf-8", "surrogateescape")
        if isinstance(headers, dict):
            for k, v in headers.items():
                hdrs.set(str(k), v)
        ctx.exit_response = (status, payload, hdrs)
        ctx.response_source = "exit"
        raise ExitSignal()

    def _error(self, ctx: RequestContext, status: Any, message: Any = None, headers: Any = None) -> None:
        """kong.response.error: Kong's default messages, JSON body (kong/pdk/response.lua)."""
        _check(ctx, "kong.response.error", EXIT_PHASES)
        defaults = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
                    405: "Method not allowed", 429: "API rate limit exceeded",
                    500: "An unexpected error occurred", 502: "An invalid response was received from the upstream server",
                    503: "The upstream server is currently unavailable"}
        msg = message if isinstance(message, str) and message else defaults.get(status, "The upstream server responded with " + str(status))
        hdrs = dict(headers) if isinstance(headers, dict) else {}
        return self._exit(ctx, status, {"message": msg}, hdrs)

    def _resp_status(self, ctx: RequestContext) -> Any:
        _check(ctx, "kong.response.get_status", RESPONSE_READ)
        if ctx.phase == "log" and ctx.saved is not None:
            return ctx.saved["status"]
        return ctx.status

    def _resp_header(self, ctx: RequestContext, name: str) -> Any:
        _check(ctx, "kong.response.get_header", RESPONSE_READ)
        return self._headers_source(ctx, "response_headers", ctx.response_headers).get(_header_name(name))

    def _resp_headers(self, ctx: RequestContext, max_headers: Any = None) -> Any:
        """kong/pdk/response.lua get_headers: ngx.resp.get_headers(max_headers), at most
        lua_max_resp_headers (100) without the argument (kong/globalpatches.lua)."""
        _check(ctx, "kong.response.get_headers", RESPONSE_READ)
        headers = self._headers_source(ctx, "response_headers", ctx.response_headers)
        return _fix(_at_most(ctx, headers, max_headers, "response").multimap())

    def _resp_source(self, ctx: RequestContext) -> str:
        if ctx.phase == "log" and ctx.saved is not None:
            src = ctx.saved["source"]
        else:
            src = ctx.response_source
        return src or "service"

    def _set_status(self, ctx: RequestContext, status: int) -> None:
        _check(ctx, "kong.response.set_status", SET_RESPONSE_HEADER)
        ctx.status = int(status)

    def _resp_edit(self, ctx: RequestContext, op: str, name: Any, value: Any) -> None:
        _check(ctx, f"kong.response.{op}_header", SET_RESPONSE_HEADER)
        if not isinstance(name, str) or not name:
            raise PdkLuaError("header name must be a string")
        if op == "set":
            ctx.response_headers.set(name, _header_value(value))
        elif op == "add":
            ctx.response_headers.add(name, _header_value(value))
        else:
            ctx.response_headers.remove(name)

    def _resp_set_headers(self, ctx: RequestContext, headers: Any) -> None:
        _check(ctx, "kong.response.set_headers", SET_RESPONSE_HEADER)
        if not isinstance(headers, dict):
            raise PdkLuaError("headers must be a table")
        for k, v in headers.items():
            ctx.response_headers.set(str(k), _header_value(v))

    # --- kong.service --------------------------------------------------------------------
    def _upstream(self, ctx: RequestContext, method: str, phases: set[str]) -> UpstreamRequest:
        _check(ctx, method, phases)
        if ctx.upstream is None:
            raise PdkLuaError(f"{method}: no service for this request")
        return ctx.upstream

    def _set_upstream(self, ctx: RequestContext, host: str) -> Any:
        up = self._upstream(ctx, "kong.service.set_upstream", {"access"})
        if self.config is None or self.config.upstream_for_host(host) is None:
            return None  # Kong returns nil, "could not find an Upstream named '<host>'"
        up.upstream_name = host
        return True

    def _set_target(self, ctx: RequestContext, host: str, port: int) -> None:
        up = self._upstream(ctx, "kong.service.set_target", REWRITE_ACCESS)
        if not isinstance(host, str) or not isinstance(port, int):
            raise PdkLuaError("host must be a string and port a number")
        up.target = (host, port)

    def _svc_set_raw_body(self, ctx: RequestContext, body: Any) -> None:
        up = self._upstream(ctx, "kong.service.request.set_raw_body", REWRITE_ACCESS)
        up.body = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else bytes(body or b"")
        up.headers.set("Content-Length", str(len(up.body)))
        # ngx.req.set_body_data replaces the body kong.request.get_raw_body/get_body read, so
        # plugins later in access see the changed body (reference §4.4)
        ctx.body = up.body

    def _svc_set_body(self, ctx: RequestContext, args: Any, mimetype: str | None = None) -> Any:
        up = self._upstream(ctx, "kong.service.request.set_body", REWRITE_ACCESS)
        ctype = (mimetype or up.headers.get("content-type") or "application/json").lower()
        if "json" in ctype:
            up.body = json.dumps(args if args != [] else {}).encode()
        elif "x-www-form-urlencoded" in ctype:
            up.body = urlencode(args or {}, doseq=True).encode()
        else:
            return None
        up.headers.set("Content-Type", mimetype or up.headers.get("content-type") or "application/json")
        up.headers.set("Content-Length", str(len(up.body)))
        # ai plugins later in access read the changed body (reference §4.4)
        ctx.body = up.body
        return True

    def _svc_hdr(self, ctx: RequestContext, op: str, name: Any, value: Any) -> None:
        up = self._upstream(ctx, f"kong.service.request.{op}_header", REWRITE_ACCESS)
        if not isinstance(name, str) or not name:
            raise PdkLuaError("header name must be a string")
        # Kong changes the one request (ngx.req.set_header / clear_header in
        # kong/pdk/service/request.lua): kong.request.get_header(s) and the log serializer's
        # request.headers (kong/pdk/log.lua) see the change too.
        for headers in (up.headers, ctx.headers):
            if op == "set":
                headers.set(name, _header_value(value))
            elif op == "add":
                headers.add(name, _header_value(value))
            else:
                headers.remove(name)

    def _svc_set_headers(self, ctx: RequestContext, headers: Any) -> None:
        up = self._upstream(ctx, "kong.service.request.set_headers", REWRITE_ACCESS)
        if not isinstance(headers, dict):
            raise PdkLuaError("headers must be a table")
        for k, v in headers.items():
            up.headers.set(str(k), _header_value(v))
            ctx.headers.set(str(k), _header_value(v))  # the same request, as in _svc_hdr

    def _svc_set(self, ctx: RequestContext, attr: str, value: Any) -> None:
        up = self._upstream(ctx, f"kong.service.request.set_{attr}", REWRITE_ACCESS)
        if not isinstance(value, str):
            raise PdkLuaError(f"{attr} must be a string")
        if attr == "path":
            if not value.startswith("/"):
                raise PdkLuaError("path must start with /")
            # kong/pdk/service/request.lua set_path: ngx_var.upstream_uri = escape(path), with
            # kong/tools/uri.lua escape: each byte of the Lua string (the plugin's UTF-8) that
            # is neither reserved nor unreserved becomes %XX; "%" and reserved bytes stay
            value = uri.escape(uri.byte_form(value))
        setattr(up, attr, value.upper() if attr == "method" else value)

    def _svc_set_query(self, ctx: RequestContext, args: Any) -> None:
        up = self._upstream(ctx, "kong.service.request.set_query", REWRITE_ACCESS)
        if not isinstance(args, (dict, list)):
            raise PdkLuaError("args must be a table")
        up.query = urlencode(args if isinstance(args, dict) else {}, doseq=True, quote_via=quote)

    def _enable_buffering(self, ctx: RequestContext) -> None:
        up = self._upstream(ctx, "kong.service.request.enable_buffering", REWRITE_ACCESS)
        up.buffered = True

    def _svc_status(self, ctx: RequestContext) -> Any:
        _check(ctx, "kong.service.response.get_status", RESPONSE_READ)
        if ctx.phase == "log":
            # An external plugin's log handler runs in ngx.timer.at (§2.8), where ngx.var (the
            # source of upstream_status) is unavailable; only the saved getters of §2.4 work.
            raise PdkLuaError("kong.service.response.get_status: API disabled in the context of ngx.timer")
        return ctx.service_status

    def _svc_header(self, ctx: RequestContext, name: str) -> Any:
        _check(ctx, "kong.service.response.get_header", RESPONSE_READ)
        name = _header_name(name)
        return ctx.service_headers.get(name) if ctx.service_headers else None

    def _svc_headers(self, ctx: RequestContext, max_headers: Any = None) -> Any:
        """kong/pdk/service/response.lua get_headers: the same limits (MAX_HEADERS_DEFAULT 100)."""
        _check(ctx, "kong.service.response.get_headers", RESPONSE_READ)
        headers = ctx.service_headers or Headers()
        return _fix(_at_most(ctx, headers, max_headers, "response").multimap())

    def _svc_raw_body(self, ctx: RequestContext) -> Any:
        # Only with buffered proxying (the response phase) is the body available.
        _check(ctx, "kong.service.response.get_raw_body", {"response", "body_filter"})
        return bytes(ctx.service_body or b"")

    def _svc_body(self, ctx: RequestContext, *args: Any) -> Any:
        _check(ctx, "kong.service.response.get_body", {"response", "body_filter"})
        try:
            return _fix(json.loads(ctx.service_body or b""))
        except ValueError:
            return None

    # --- ctx / nginx ---------------------------------------------------------------------
    @staticmethod
    def _shared_set(ctx: RequestContext, key: str, value: Any) -> None:
        # No copy: the value was unpacked from the wire for this call and nothing else holds it
        # (get hands out _fix()ed copies), which matches Kong storing the unpacked Lua table.
        ctx.ctx_shared[key] = value

    @staticmethod
    def _get_ctx(ctx: RequestContext, key: str) -> Any:
        source = ctx.saved["ngx_ctx"] if ctx.phase == "log" and ctx.saved is not None else ctx.ngx_ctx
        return _fix(source.get(key))

    @staticmethod
    def _set_ctx(ctx: RequestContext, key: str, value: Any) -> None:
        ctx.ngx_ctx[key] = value  # a fresh wire value (see _shared_set)
        if ctx.phase == "log" and ctx.saved is not None:
            ctx.saved["ngx_ctx"][key] = copy.deepcopy(value)  # two tables must not alias

    @staticmethod
    def _get_var(ctx: RequestContext, name: str) -> Any:
        variables = {
            "request_method": ctx.method, "uri": ctx.path, "request_uri": ctx.path_with_query,
            "args": ctx.query or None, "scheme": ctx.scheme, "host": ctx.host,
            "server_port": str(ctx.port), "remote_addr": ctx.remote_addr,
            "remote_port": "" if ctx.remote_port is None else str(ctx.remote_port),
            "realip_remote_addr": ctx.client_ip, "realip_remote_port": str(ctx.client_port),
            "request_id": ctx.request_id,
            "server_protocol": f"HTTP/{ctx.http_version}", "status": str(ctx.status or ""),
            "upstream_uri": ctx.upstream.path if ctx.upstream else None,
        }
        if name in variables:
            return variables[name]
        if name.startswith("http_"):
            return ctx.headers.get(name[5:].replace("_", "-"))
        if name.startswith("arg_"):
            vals = ctx.query_multimap().get(name[4:])
            return vals[0] if vals else None
        return None

    # --- kong.log ------------------------------------------------------------------------
    def _make_log(self, level: str) -> Handler:
        py_level = {"debug": 10, "info": 20, "notice": NOTICE, "warn": 30, "err": 40, "crit": 50,
                    "alert": 50, "emerg": 50}[level]

        def _log(ctx: RequestContext, *args: Any) -> None:
            # Kong concatenates the arguments; the runloop namespaces them to the plugin.
            text = "".join(a if isinstance(a, str) else json.dumps(a, default=str) for a in args)
            log.log(py_level, "[%s] %s", ctx.plugin_name or "kong", text)
        return _log

    def _serialize(self, ctx: RequestContext, *args: Any) -> str:
        _check(ctx, "kong.log.serialize", {"log"})
        data = ctx.saved["serialize"] if ctx.saved is not None else serialize(ctx)
        return json.dumps(data)  # plugin.lua override: a JSON string, not a table

    @staticmethod
    def _set_serialize_value(ctx: RequestContext, key: str, value: Any, options: Any = None) -> None:
        if not isinstance(key, str):
            raise PdkLuaError("key must be a string")
        if ctx.phase == "log" or ctx.saved is not None:
            # The log timer's set goes into a clone of ngx.ctx that nothing serializes again
            # (see the module doc): accepted, and lost, as on Kong.
            ctx.discarded_serialize_values[key] = value
            return
        ctx.serialize_values[key] = value  # a fresh wire value (see _shared_set)


@dataclass
class _CredentialRef:
    id: str
    consumer_id: str | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "_CredentialRef":
        consumer = d.get("consumer")
        cid = consumer.get("id") if isinstance(consumer, dict) else d.get("consumer_id")
        return cls(str(d.get("id") or ""), cid)


def _at_most(ctx: RequestContext, headers: Headers, max_headers: Any, kind: str) -> Headers:
    """The header lines ngx.req/resp.get_headers(max_headers) returns: max_headers checked as
    kong/pdk/request.lua and response.lua check it (a number within 1..1000), nil meaning
    kong.conf lua_max_req/resp_headers (100, kong/globalpatches.lua, which logs the notice)."""
    if max_headers is None:
        limit = MAX_REQ_HEADERS
    elif isinstance(max_headers, bool) or not isinstance(max_headers, (int, float)):
        raise PdkLuaError("max_headers must be a number")
    elif max_headers < 1:
        raise PdkLuaError("max_headers must be >= 1")
    elif max_headers > 1000:
        raise PdkLuaError("max_headers must be <= 1000")
    else:
        limit = int(max_headers)
    if headers.count() <= limit:
        return headers
    log.log(NOTICE, "[%s] %s headers truncated", ctx.plugin_name or "kong", kind)
    return headers.first(limit)


def _header_name(name: Any) -> str:
    """kong/pdk/request.lua & response.lua: a nil or non-string name is a Lua error."""
    if not isinstance(name, str):
        raise PdkLuaError("header name must be a string")
    return name


def _header_value(value: Any) -> Any:
    if isinstance(value, bool):
        raise PdkLuaError("invalid header value: boolean")
    if isinstance(value, list):
        return [str(v) for v in value]
    if value is None:
        raise PdkLuaError("invalid header value: nil")
    return str(value)


def _fix(value: Any) -> Any:
    """must_fix + lua-MessagePack: an empty table is sent as an array (reference §2.4)."""
    if isinstance(value, dict):
        if not value:
            return []
        return {k: _fix(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix(v) for v in value]
    return value


def chunked(data: bytes, size: int = 16384) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


__all__ = ["PDK", "RequestContext", "Headers", "UpstreamRequest", "PdkLuaError", "ExitSignal",
           "RealIp", "real_ip_settings", "serialize"]
