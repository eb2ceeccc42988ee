"""The stand-in's gateway: route matching, plugin phases, proxying, and the HTTP front.

`Gateway` ties the pieces together the way a Kong node does: it discovers plugin servers
(query_cmd), spawns those with a start_cmd, waits for their sockets, and runs requests through
`kongsim.runloop`. `Gateway.handle(Request)` is the in-process mode; `Gateway.serve()` puts a
ThreadingHTTPServer (HTTP/1.1) in front. CLI: `aigov gateway -c kong.yml --listen
127.0.0.1:8000 [--conf kong.conf] [--workers N]`.

Kong behaviours imitated (reference kong-plugin-server.md §2.8, §4): 404
`{"message":"no Route matched with those values"}`; 502/504 on upstream failure; responses
are streamed (chunked pass-through, SSE included) unless a plugin with a `response` phase runs
on the request or a plugin enabled buffering, in which case the whole upstream body is read
first; `Via`, `X-Kong-Upstream-Latency`, `X-Kong-Proxy-Latency`, `X-Kong-Response-Latency`,
`X-Kong-Request-Id` headers. The front reads request heads as nginx does (kongsim.front):
nginx's 400/414/494/505 answers, its header-name rules and header buffers.
"""
from __future__ import annotations

import argparse
import dataclasses
import http.client
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from kongsim import declarative, front, process, redact, timing, uri
from kongsim.pdk import (DEFAULT_CLIENT_BODY_BUFFER_SIZE, DEFAULT_REAL_IP_HEADER, KONG_VERSION, Headers, RealIp,
                         RequestContext, UpstreamRequest, real_ip_settings)
from kongsim.process import ManagedServer, PluginInfo, PluginServerEntry
from kongsim.runloop import WS_ID, Response, Runloop
from kongsim.timing import RequestTiming

log = redact.get_logger("kongsim.gateway")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade", "content-length"}
NO_ROUTE = b'{"message":"no Route matched with those values"}'
JSON_CT = "application/json; charset=utf-8"
DEBUG_HEADER = "X-Kong-Request-Debug"
DEBUG_TOKEN_HEADER = "X-Kong-Request-Debug-Token"
DEBUG_LOG_HEADER = "X-Kong-Request-Debug-Log"
DEBUG_OUTPUT_HEADER = "X-Kong-Request-Debug-Output"


class FrontServer(ThreadingHTTPServer):
    """The HTTP front's listener: a deep accept queue (the stdlib's 5 resets bursts of
    simultaneous connects) and daemon handler threads (a stuck client never blocks exit)."""
    request_queue_size = 1024
    daemon_threads = True


@dataclasses.dataclass
class Request:
    """An incoming client request (in-process mode builds these directly)."""
    method: str
    path: str  # with the query string
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    client_ip: str = "127.0.0.1"
    client_port: int = 0
    scheme: str = "http"
    host: str | None = None
    port: int = 8000
    http_version: str = "1.1"


# The body settings kong.conf.example and docker/Dockerfile give Kong (tests/test_docker_config.py
# checks they agree): the harnesses that stand for Kong configured as the README says (the tests'
# start_gateway, the demo, `aigov gateway` without --conf) use them. A body up to 8 MiB stays in
# memory; nginx refuses a bigger one with 413.
RECOMMENDED_BODY_SIZES: dict[str, int | str] = {"client_body_buffer_size": "8m", "client_max_body_size": "8m"}


def nginx_size(value: int | str) -> int:
    """An nginx size ("8k", "1m", "1048576"; kong.conf's nginx_http_* values) in bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)\s*", str(value))
    if not m:
        raise ValueError(f"not an nginx size: {value!r} (a number, optionally with k, m or g)")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


class Gateway:
    """A Kong node stand-in over a declarative config and pluginserver entries."""

    def __init__(self, config: str | Path | Mapping[str, Any] | declarative.DeclarativeConfig,
                 servers: Sequence[PluginServerEntry] = (), workers: int = 1,
                 step_timeout_s: float = 60.0, installed: set[str] | None = None,
                 allow_unimitated: bool = False, environ: Mapping[str, str] | None = None,
                 socket_timeout_s: float = 60.0, request_debug: bool = True,
                 request_debug_token: str | None = None,
                 on_timing: Callable[[RequestTiming], None] | None = None,
                 trusted_ips: Sequence[str] = (), real_ip_header: str = DEFAULT_REAL_IP_HEADER,
                 real_ip_recursive: bool = False, client_timeout_s: float = 60.0,
                 client_body_buffer_size: int | str = DEFAULT_CLIENT_BODY_BUFFER_SIZE,
                 client_max_body_size: int | str = 0) -> None:
        self.decl = config if isinstance(config, declarative.DeclarativeConfig) \
            else declarative.load(config)
        self.entries = list(servers)
        self.workers = workers
        self.step_timeout_s = step_timeout_s
        self.installed = installed
        self.allow_unimitated = allow_unimitated
        self.environ = dict(os.environ if environ is None else environ)
        self.socket_timeout_s = socket_timeout_s
        # nginx's client_header_timeout, client_body_timeout and keepalive_timeout (60 s each
        # under Kong): a client that stops sending gets 408, an idle keep-alive is closed.
        self.client_timeout_s = client_timeout_s
        self.managed: dict[str, ManagedServer] = {}
        self.infos: dict[str, PluginInfo] = {}
        self.runloop: Runloop | None = None
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._target_rr = itertools.count()
        self._wheels: dict[str, list[declarative.Target]] = {}
        self.url: str | None = None
        # Kong's request debugging (kong.conf request_debug / request_debug_token): a random
        # token per start unless given. It is a credential: registered for redaction.
        self.request_debug = request_debug
        self.request_debug_token = request_debug_token or uuid.uuid4().hex
        redact.register_secret(self.request_debug_token)
        # The timing of the last finished request (log phase included), and a callback that
        # receives every one: what benchmarks use for "latency added per plugin".
        self.last_timings: RequestTiming | None = None
        self.on_timing = on_timing
        # kong.conf trusted_ips / real_ip_header / real_ip_recursive (Kong's defaults: no
        # trusted address, X-Real-IP, off); validated here, before anything is spawned
        self.real_ip = RealIp(trusted_ips, real_ip_header, real_ip_recursive)
        # kong.conf nginx_http_client_body_buffer_size (8k) and nginx_http_client_max_body_size
        # (0: no limit), Kong's defaults: a body past the buffer is spooled to a file, which
        # kong.request.get_raw_body returns only with a big enough max_allowed_file_size
        # (kongsim.pdk); one past the maximum is refused by nginx with 413 before Kong's phases.
        self.client_body_buffer_size = nginx_size(client_body_buffer_size)
        self.client_max_body_size = nginx_size(client_max_body_size)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> "Gateway":
        """Discover, spawn, wait for sockets, then validate the declarative config."""
        try:
            for entry in self.entries:
                info = process.discover(entry, environ=self.environ)
                if info.name in self.infos:
                    log.warning("plugin '%s' reported by two pluginservers; the later one (%s) "
                                "wins, as in Kong 3.9+", info.name, entry.name)
                self.infos[info.name] = info
            for entry in self.entries:
                if entry.start_cmd:
                    server = ManagedServer(entry, self.environ)
                    self.managed[entry.name] = server
                    server.start()
                else:
                    log.warning("pluginserver '%s' has no start_cmd: managed externally", entry.name)
            for entry in self.entries:
                process.wait_for_socket(entry.socket, self.socket_timeout_s,
                                        self.managed.get(entry.name))
            sockets = {e.name: e.socket for e in self.entries}
            self.runloop = Runloop(self.decl, self.infos, sockets, self.workers,
                                   self.step_timeout_s, self.installed, self.allow_unimitated,
                                   self.environ)
            self.runloop.on_request_done = self._request_done
            self.runloop.pdk.real_ip = self.real_ip
            self.runloop.pdk.client_body_buffer_size = self.client_body_buffer_size
        except BaseException:
            self.close()
            raise
        return self

    def reload(self, config: str | Path | Mapping[str, Any]) -> None:
        """Like a new declarative config: every plugin gets a new __seq__."""
        assert self.runloop is not None
        self.decl = declarative.load(config)
        self.runloop.load(self.decl)
        self._wheels.clear()  # upstream targets may have changed

    def close(self) -> None:
        self._wheels.clear()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self.runloop is not None:
            self.runloop.wait_logs(5.0)
            for w in self.runloop.workers:
                for client in w.rpc.values():
                    client.reset_pool()
        for server in self.managed.values():
            server.stop()
        self.managed.clear()

    def __enter__(self) -> "Gateway":
        return self if self.runloop else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- one request ---------------------------------------------------------------------
    def handle(self, req: Request, worker: int | None = None) -> Response:
        """Run one request through rewrite/access/proxy/response; log runs after `sent()`."""
        assert self.runloop is not None, "Gateway.start() first"
        rl = self.runloop
        t0 = time.time()
        if self.client_max_body_size and len(req.body) > self.client_max_body_size:
            # "client intended to send too large body" (ngx_http_core_module): Kong's error
            # handler answers 413 before any plugin runs.
            log.error("client intended to send too large body: %d bytes, client: %s", len(req.body),
                      req.client_ip)
            status, hdrs, body = front.error_response(413, req.headers)
            return Response(status, Headers([*hdrs, ("Server", f"kong/{KONG_VERSION}")]), body)
        headers = Headers(req.headers)
        for name in redact.CREDENTIAL_HEADERS:
            for value in headers.get_all(name):
                redact.register_secret(value)
        path, _, query = req.path.partition("?")
        host_header = headers.get("host") or f"127.0.0.1:{req.port}"
        ctx = RequestContext(method=req.method.upper(), scheme=req.scheme,
                             host=req.host or host_header.split(":")[0], port=req.port,
                             path=uri.normalize(path or "/"), raw_path=path or "/", query=query,
                             headers=headers, body=req.body,
                             client_ip=req.client_ip, client_port=req.client_port,
                             http_version=req.http_version, started_at=t0)
        assert ctx.timing is not None
        ctx.timing.tree["workspace_id"] = WS_ID
        wk = rl.pick_worker(worker)
        # The plugins the log phase runs: the global ones after rewrite, then what access
        # collected (Kong's ctx.plugins). Filled in place, so an error still finds them.
        collected: list[Any] = []
        try:
            return self._handle(wk, ctx, req, host_header, collected, t0)
        except Exception as exc:  # noqa: BLE001 - a stand-in failure is Kong's Lua error
            return self._internal_error(wk, ctx, collected, t0, exc)

    def _handle(self, wk: Any, ctx: RequestContext, req: Request, host_header: str,
                collected: list[Any], t0: float) -> Response:
        rl = self.runloop
        assert rl is not None and ctx.timing is not None
        rl.pdk.post_read(ctx)  # nginx's realip module runs before Kong's phases
        self._debug_auth(ctx)
        rl.rewrite(wk, ctx, collected)
        if ctx.exit_response is not None:
            return self._exit_response(wk, ctx, collected, t0)
        set_by_nginx: set[tuple[str, str]] = set()
        ctx.timing.enter("access")  # Kong routes inside its access phase
        try:
            with ctx.timing.span("router"):
                matched = rl.config.match_route(ctx.method, ctx.path, host_header, ctx.headers,
                                                req.port)
            if matched is None:
                ctx.exit_response = (404, NO_ROUTE, Headers([("Content-Type", JSON_CT)]))
                ctx.response_source = "error"
            else:
                route, upstream_uri = matched
                ctx.route = route
                service = rl.config.services.get(route.service_id) if route.service_id else None
                if service is None:
                    ctx.exit_response = (503, b'{"message":"no Service found with those values"}',
                                         Headers([("Content-Type", JSON_CT)]))
                    ctx.response_source = "error"
                else:
                    ctx.service = service
                    ctx.upstream = self._upstream_request(
                        ctx, route, service, upstream_uri, host_header,
                        trusted=self.real_ip.is_trusted(ctx.client_ip))
                    # what nginx itself forwards; anything else was set by a plugin
                    set_by_nginx = {(k.lower(), v) for k, v in ctx.upstream.headers.items()}
                    del collected[:]  # access collects every plugin again, globals too
                    rl.access(wk, ctx, collected)
        finally:
            ctx.timing.leave()
        if ctx.exit_response is not None:
            return self._exit_response(wk, ctx, collected, t0)
        return self._proxy(wk, ctx, collected, t0, set_by_nginx)

    def _internal_error(self, wk: Any, ctx: RequestContext, collected: list[Any], t0: float,
                        exc: BaseException) -> Response:
        """A failure of the stand-in itself is what a Lua error is to Kong: nginx answers 500
        through Kong's error handler (kong/error_handlers.lua: "An unexpected error occurred"
        with the request id), and the log phase still runs for the plugins collected so far
        (nginx runs the log phase of every request; kong/init.lua Kong.log)."""
        log.error("unexpected stand-in failure: %s", exc, exc_info=exc)
        ctx.exit_response = (500, json.dumps({"message": "An unexpected error occurred",
                                              "request_id": ctx.request_id}).encode(),
                             Headers([("Content-Type", JSON_CT)]))
        ctx.response_source = "error"
        return self._exit_response(wk, ctx, collected, t0)

    # --- request debugging (kong/timing/init.lua) ----------------------------------------
    def _debug_auth(self, ctx: RequestContext) -> None:
        """Kong's timing.auth(): strip the debug headers, then honour `X-Kong-Request-Debug: *`
        from loopback, or from elsewhere with the right X-Kong-Request-Debug-Token."""
        if not self.request_debug:
            return
        wanted = ctx.headers.get(DEBUG_HEADER)
        token = ctx.headers.get(DEBUG_TOKEN_HEADER)
        log_it = ctx.headers.get(DEBUG_LOG_HEADER)
        for name in (DEBUG_HEADER, DEBUG_TOKEN_HEADER, DEBUG_LOG_HEADER):
            ctx.headers.remove(name)  # neither plugins nor the upstream see them
        if wanted != "*":
            return  # OSS Kong understands only "*" (per-phase filters are Enterprise)
        assert ctx.timing is not None
        # kong/timing/init.lua tests $binary_remote_addr: the address after realip
        ctx.timing.loopback = _is_loopback(ctx.remote_addr)
        if not ctx.timing.loopback and token != self.request_debug_token:
            return
        ctx.timing.debug = True
        ctx.timing.debug_log = log_it == "true"

    def _header_filter_end(self, ctx: RequestContext, hdrs: Headers) -> Headers:
        """After header_filter: Kong adds X-Kong-Request-Debug-Output to debugged requests."""
        t = ctx.timing
        if t is None or not t.debug:
            return hdrs
        output = t.to_kong_json()
        if len(output) >= timing.HEADER_JSON_TRUNCATE_LENGTH and not t.loopback:
            output = timing.truncated_output(ctx.request_id)
            t.debug_log = True  # Kong then logs the full output unconditionally
        hdrs.set(DEBUG_OUTPUT_HEADER, output)
        return hdrs

    def _request_done(self, ctx: RequestContext) -> None:
        """The runloop's completion hook: after the log phase of a request."""
        t = ctx.timing
        if t is None:
            return
        t.close_dangling()
        if t.debug and t.debug_log:
            log.info("%s output: %s", timing.LOG_PREFIX, t.to_kong_json())
        self.last_timings = t
        if self.on_timing is not None:
            self.on_timing(t)

    def _bundled_phase(self, ctx: RequestContext, phase: str, bundled: list[Any],
                       call: Callable[[Any, dict[str, Any]], None]) -> None:
        """Run an imitated bundled plugin's header_filter/body_filter step, timed like Kong."""
        assert ctx.timing is not None
        with ctx.timing.span(phase, "plugins"):
            for plugin, conf in bundled:
                with ctx.timing.span(plugin.name, str(conf.get("__plugin_id"))):
                    call(plugin, conf)

    @staticmethod
    def _upstream_request(ctx: RequestContext, route: declarative.Route,
                          service: declarative.Service, upstream_uri: str, host_header: str,
                          trusted: bool = False) -> UpstreamRequest:
        """`upstream_uri` is the router's join of the service path and the request path
        (kongsim.declarative.upstream_uri: kong/router/utils.lua get_upstream_uri_v0)."""
        hdrs = Headers([(k, v) for k, v in ctx.headers.items() if k.lower() not in HOP_BY_HOP])
        default_port = 443 if service.protocol == "https" else 80
        hdrs.set("Host", host_header if route.preserve_host else (
            service.host if service.port == default_port else f"{service.host}:{service.port}"))
        # kong/runloop/handler.lua: X-Forwarded-For appends the connection's address
        # ($realip_remote_addr), else is $remote_addr; a trusted client's X-Forwarded-Proto/
        # Host/Port/Path are kept. nginx_kong.lua: X-Real-IP is $remote_addr (after realip).
        xff = ctx.headers.get("x-forwarded-for")
        hdrs.set("X-Forwarded-For", f"{xff}, {ctx.client_ip}" if xff else ctx.remote_addr)
        fwd = ctx.headers.get if trusted else (lambda name: None)
        hdrs.set("X-Forwarded-Proto", fwd("x-forwarded-proto") or ctx.scheme)
        hdrs.set("X-Forwarded-Host", fwd("x-forwarded-host") or ctx.host)
        hdrs.set("X-Forwarded-Port", fwd("x-forwarded-port") or str(ctx.port))
        hdrs.set("X-Forwarded-Path", fwd("x-forwarded-path") or ctx.raw_path)  # $request_uri's path
        hdrs.set("X-Real-IP", ctx.remote_addr)
        hdrs.set("X-Kong-Request-Id", ctx.request_id)
        # kong/runloop/handler.lua: var.upstream_uri = escape(match_t.upstream_uri)
        return UpstreamRequest(service.protocol, service.host, service.port, uri.escape(upstream_uri), ctx.query,
                               ctx.method, hdrs, ctx.body)

    def _finish_headers(self, ctx: RequestContext, base: Headers, t0: float) -> Headers:
        out = base.copy()
        out.set("X-Kong-Request-Id", ctx.request_id)
        return out

    def _exit_response(self, wk: Any, ctx: RequestContext, collected: list[Any],
                       t0: float) -> Response:
        assert ctx.exit_response is not None and ctx.timing is not None
        status, body, hdrs = ctx.exit_response
        with ctx.timing.span("header_filter"):
            hdrs = self._finish_headers(ctx, hdrs, t0)
            hdrs.set("X-Kong-Response-Latency", str(int((time.time() - t0) * 1000)))
            hdrs.set("Server", f"kong/{KONG_VERSION}")
        hdrs = self._header_filter_end(ctx, hdrs)
        ctx.status, ctx.response_headers, ctx.response_size = status, hdrs, len(body)
        rl = self.runloop
        assert rl is not None
        return Response(status, hdrs, body, _on_sent=rl.log_due(wk, ctx, collected))

    def _target(self, ctx: RequestContext) -> tuple[str, int]:
        up = ctx.upstream
        assert up is not None and self.runloop is not None
        if up.target is not None:
            return up.target
        name = up.upstream_name or up.host
        upstream = self.runloop.config.upstream_for_host(name)
        if upstream is not None and upstream.targets:
            # Weighted round robin over targets (Kong's default balancer algorithm); weight 0
            # disables a target. The interleaved order spreads even short bursts.
            wheel = self._wheels.get(name)
            if wheel is None:
                wheel = self._wheels.setdefault(name, _smooth_wrr(upstream.targets))
            if wheel:
                t = wheel[next(self._target_rr) % len(wheel)]
                return t.host, t.port
        return up.host, up.port

    def _proxy(self, wk: Any, ctx: RequestContext, collected: list[Any], t0: float,
               set_by_nginx: set[tuple[str, str]] | None = None) -> Response:
        rl = self.runloop
        assert rl is not None and ctx.upstream is not None and ctx.service is not None
        tm = ctx.timing
        assert tm is not None
        up = ctx.upstream
        bundled = [(p.bundled, c) for p, c in collected if p.bundled is not None]
        buffered = up.buffered or any("response" in p.phases for p, _ in collected
                                      if p.bundled is None)
        with tm.span("balancer"):
            host, port = self._target(ctx)
        # A service's connect_timeout bounds the connect, its write_timeout each send and its
        # read_timeout each read (nginx's proxy_connect_timeout, proxy_send_timeout and
        # proxy_read_timeout, which Kong sets from them); each ends in nginx's 504.
        timeout = ctx.service.read_timeout_ms / 1000.0
        t_up = time.time()
        ctx.proxy_latency_ms = int((t_up - t0) * 1000)
        conn: http.client.HTTPConnection
        if up.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=ctx.service.connect_timeout_ms / 1000.0,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=ctx.service.connect_timeout_ms / 1000.0)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(ctx.service.write_timeout_ms / 1000.0)
            target = up.path + ("?" + up.query if up.query else "")
            conn.putrequest(up.method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in up.headers.items():
                if k.lower() == "content-length":
                    continue
                # header strings hold the client's bytes (surrogateescape, see the front):
                # send those bytes unchanged, like nginx; plugin-set text goes out as UTF-8
                value = v.encode("utf-8", "surrogateescape")
                if set_by_nginx is not None and (k.lower(), v) not in set_by_nginx:
                    # set through kong.service.request.set_header(s)/add_header, i.e.
                    # ngx.req.set_header: lua-nginx-module escapes the bytes RFC 7230 forbids
                    name = _ngx_escape(k.encode("utf-8", "surrogateescape"), _NGX_HEADER_NAME)
                    conn.putheader(name, _ngx_escape(value, _NGX_HEADER_VALUE))
                else:
                    conn.putheader(k, value)
            if up.body or up.method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(up.body)))
            conn.endheaders(up.body or None)
            conn.sock.settimeout(timeout)
            resp = conn.getresponse()
        except (socket.timeout, TimeoutError):
            conn.close()
            log.error("upstream timed out (%s:%d)", host, port)
            return self._upstream_error(wk, ctx, collected, t0, 504, "The upstream server is timing out")
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            log.error("upstream connection to %s:%d failed: %s", host, port, exc)
            return self._upstream_error(wk, ctx, collected, t0, 502,
                                        "An invalid response was received from the upstream server")
        except BaseException:
            conn.close()  # a stand-in failure (handle() answers 500): no dangling connection
            raise
        ctx.upstream_latency_ms = int((time.time() - t_up) * 1000)
        # Kong mocks an `upstream` phase: time to first byte (KONG_WAITING_TIME) + streaming.
        ttfb_ms = (time.time() - t_up) * 1000.0
        tm.add(("upstream",), ttfb_ms)
        tm.add(("upstream", "time_to_first_byte"), ttfb_ms)
        ctx.service_status = resp.status
        ctx.service_headers = Headers(resp.getheaders())
        plugin_set = ctx.response_headers  # headers plugins set in access apply on top
        final = Headers([(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP])
        for k, v in plugin_set.items():
            final.remove(k)
        for k, v in plugin_set.items():
            final.add(k, v)
        final.add("Via", f"1.1 kong/{KONG_VERSION}")
        final.set("X-Kong-Upstream-Latency", str(ctx.upstream_latency_ms))
        final.set("X-Kong-Proxy-Latency", str(ctx.proxy_latency_ms))
        ctx.status, ctx.response_headers, ctx.response_source = resp.status, final, "service"
        if buffered:
            t_body = time.time()
            try:
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                log.error("upstream response from %s:%d broke: %s", host, port, exc)
                return self._upstream_error(wk, ctx, collected, t0, 502,
                                            "An invalid response was received from the upstream server")
            conn.close()
            streaming_ms = (time.time() - t_body) * 1000.0
            tm.add(("upstream",), streaming_ms)
            tm.add(("upstream", "streaming"), streaming_ms)
            ctx.service_body = body
            rl.response_phase(wk, ctx, collected)
            if ctx.exit_response is not None:
                status, body, hdrs = ctx.exit_response
                ctx.status = status
                ctx.response_headers = self._finish_headers(ctx, hdrs, t0)
                ctx.response_source = "exit"
            final_body = body
            with tm.span("header_filter"):
                if bundled:
                    self._bundled_phase(ctx, "header_filter", bundled,
                                        lambda p, c: p.response_started(ctx, c))
                hdrs = self._finish_headers(ctx, ctx.response_headers, t0)
            if bundled:
                self._bundled_phase(ctx, "body_filter", bundled, lambda p, c: (
                    p.response_chunk(ctx, c, final_body), p.response_finished(ctx, c)))
            ctx.response_size = len(body)
            hdrs = self._header_filter_end(ctx, hdrs)
            ctx.response_headers = hdrs
            return Response(ctx.status or 502, hdrs, body, _on_sent=rl.log_due(wk, ctx, collected))
        with tm.span("header_filter"):
            if bundled:
                self._bundled_phase(ctx, "header_filter", bundled,
                                    lambda p, c: p.response_started(ctx, c))
            hdrs = self._finish_headers(ctx, ctx.response_headers, t0)
        hdrs = self._header_filter_end(ctx, hdrs)
        ctx.response_headers = hdrs
        on_sent = rl.log_due(wk, ctx, collected)

        def stream() -> Iterator[bytes]:
            reading_ms = 0.0  # upstream reads only, not the time the client takes
            try:
                while True:
                    t_read = time.time()
                    try:
                        chunk = resp.read1(65536)
                    except (OSError, http.client.HTTPException) as exc:
                        log.error("upstream stream from %s:%d broke: %s", host, port, exc)
                        return
                    finally:
                        reading_ms += (time.time() - t_read) * 1000.0
                    if not chunk:
                        return
                    ctx.response_size += len(chunk)
                    if bundled:
                        self._bundled_phase(ctx, "body_filter", bundled,
                                            lambda p, c: p.response_chunk(ctx, c, chunk))
                    yield chunk
            finally:
                conn.close()
                tm.add(("upstream",), reading_ms)
                tm.add(("upstream", "streaming"), reading_ms)
                if bundled:
                    self._bundled_phase(ctx, "body_filter", bundled,
                                        lambda p, c: p.response_finished(ctx, c))
        return Response(resp.status, hdrs, chunks=stream(), _on_sent=on_sent)

    def _upstream_error(self, wk: Any, ctx: RequestContext, collected: list[Any], t0: float,
                        status: int, message: str) -> Response:
        if ctx.service_status is None:
            # No upstream answer: nginx's $upstream_status (what Kong's serializer and
            # kong.service.response.get_status read) is the 502 or 504 nginx generated itself.
            ctx.service_status = status
        ctx.exit_response = (status, json.dumps({"message": message,
                                                 "request_id": ctx.request_id}).encode(),
                             Headers([("Content-Type", JSON_CT)]))
        ctx.response_source = "error"
        return self._exit_response(wk, ctx, collected, t0)

    # --- HTTP front ----------------------------------------------------------------------
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the HTTP front in a thread; returns its base URL."""
        handler = _make_handler(self)
        self._http = FrontServer((host, port), handler)
        bound_port = self._http.server_address[1]
        self.url = f"http://{host}:{bound_port}"
        self._http_thread = threading.Thread(target=self._http.serve_forever,
                                             name="kongsim-http", daemon=True)
        self._http_thread.start()
        log.info("kongsim gateway listening on %s", self.url)
        return self.url


# lua-nginx-module src/ngx_http_lua_util.c ngx_http_lua_escape_uri, the header_name and
# header_value tables that ngx_http_lua_copy_escaped_header applies to every name and value
# ngx.req.set_header sets (ngx_http_lua_set_input_header): each such byte becomes %XX, so a
# CR/LF in a value reaches the upstream as %0D/%0A (its t/028-req-header.t: "new%0Avalue").
_NGX_HEADER_VALUE = frozenset([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])
_NGX_HEADER_NAME = frozenset([*range(0x00, 0x21), *b'"(),/:;<=>?@[\\]{}', *range(0x7F, 0x100)])


def _ngx_escape(data: bytes, table: frozenset[int]) -> bytes:
    if not any(b in table for b in data):
        return data
    return b"".join(b"%%%02X" % b if b in table else bytes((b,)) for b in data)


def _smooth_wrr(targets: Sequence[declarative.Target]) -> list[declarative.Target]:
    """One cycle of smooth weighted round robin (as nginx does): A,B,A,B for equal weights,
    A,A,B,A,... for 3:1, instead of all of A's slots first."""
    live = [t for t in targets if t.weight > 0]
    if not live:
        return []
    g = 0
    for t in live:
        g = math.gcd(g, t.weight)
    weights = [t.weight // g for t in live]
    total = sum(weights)
    if total > 10000:  # keep the cycle small; proportions stay within 0.01 %
        weights = [max(1, w * 10000 // total) for w in weights]
        total = sum(weights)
    current = [0] * len(live)
    cycle = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(live)), key=lambda i: current[i])
        current[best] -= total
        cycle.append(live[best])
    return cycle


def _is_loopback(ip: str) -> bool:
    """Kong's is_loopback: IPv4 127.0.0.0/8 or IPv6 ::1."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return addr.is_loopback


def _make_handler(gw: Gateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Status line + headers and the body are separate writes; with Nagle on, the body waits
        # for the client's delayed ACK (~40 ms). nginx sets TCP_NODELAY on keep-alive too.
        disable_nagle_algorithm = True
        server_version = f"kong/{KONG_VERSION}"
        timeout = gw.client_timeout_s  # socket timeout of each client connection (see Gateway)

        def log_message(self, fmt: str, *args: Any) -> None:
            # The request line may carry an apikey query argument: log no query strings. Called
            # for requests whose line never parsed too: command and path may be unset.
            path = getattr(self, "path", None) or ""
            log.debug("%s %s", getattr(self, "command", None), path.split("?")[0])

        def handle_one_request(self) -> None:
            """One request, its head read the way nginx reads it (kongsim.front) rather than
            http.server's way (which answers 431 past 100 headers and drops the connection
            with a traceback on a malformed request line)."""
            self.close_connection = True
            self.command, self.path, self.request_version = None, "", "HTTP/1.1"
            try:
                head = front.read_request_head(self.rfile)
            except OSError:
                # client_header_timeout (a socket timeout), or the client reset: nginx closes
                # the connection and answers nothing
                return
            except front.FrontError as exc:
                log.info("%s while reading client request headers, client: %s", exc.reason,
                         self.client_address[0])
                self._front_error(exc.status, exc.headers)
                return
            if head is None:
                return  # the client closed before a whole request head
            self.command, self.path, self.request_version = head.method, head.target, head.version
            self.requestline = f"{head.method} {head.target.split('?')[0]} {head.version}"
            msg = http.client.HTTPMessage()
            for k, v in head.headers:
                msg[k] = v
            self.headers = msg
            self.close_connection = not head.keepalive
            # nginx answers "100 Continue" before reading such a body (ngx_http_test_expect)
            if (head.version >= "HTTP/1.1"
                    and (msg.get("Expect") or "").lower() == "100-continue"):
                self.handle_expect_100()
            self._handle()
            self.wfile.flush()

        def _front_error(self, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
            """nginx refused the request before Kong's phases: its answer (Kong's error
            handler or nginx's page, kongsim.front.error_response), then a lingering close."""
            self.close_connection = True
            status, hdrs, body = front.error_response(status, headers)
            self.request_version = self.request_version or "HTTP/1.1"
            try:
                self._write(Response(status, Headers([*hdrs, ("Server", f"kong/{KONG_VERSION}")]),
                                     body))
                self.wfile.flush()
                self._linger()
            except OSError:
                pass

        def _linger(self) -> None:
            """nginx's lingering close (lingering_timeout 5s, lingering_time 30s): read and
            discard what the client still sends after the answer, so that closing with unread
            data (a TCP reset) does not destroy the answer before the client reads it."""
            sock = self.connection
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 30.0
            sock.settimeout(5.0)
            while time.monotonic() < deadline:
                try:
                    if not sock.recv(65536):
                        return
                except OSError:
                    return

        def _read_body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                parts = []
                while True:
                    size_line = self.rfile.readline().strip().split(b";")[0]
                    size = int(size_line or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length > 0 else b""

        def _handle(self) -> None:
            try:
                body = self._read_body()
            except (socket.timeout, TimeoutError):
                # nginx's client_body_timeout: 408 (Kong's error handler), and the connection
                # is closed.
                self._front_error(408, list(self.headers.items()))
                return
            except (ValueError, OSError):
                self._front_error(400, list(self.headers.items()))
                return
            # http.server decodes header bytes as latin-1; give plugins the original bytes
            # (kongsim.rpc packs them back as raw msgpack str, like Kong does).
            headers = [(k, v.encode("latin-1", "replace").decode("utf-8", "surrogateescape"))
                       for k, v in self.headers.items()]
            req = Request(self.command, self.path, headers, body,
                          client_ip=self.client_address[0], client_port=self.client_address[1],
                          port=self.server.server_address[1],
                          http_version=self.request_version.split("/")[-1])
            try:
                resp = gw.handle(req)
            except Exception:  # noqa: BLE001 - the front must answer, never crash
                log.exception("unexpected stand-in failure")
                resp = Response(500, Headers([("Content-Type", JSON_CT)]),
                                b'{"message":"An unexpected error occurred"}')
            try:
                self._write(resp)
            except (ConnectionError, TimeoutError) as exc:
                # The client went away (or stopped reading) mid-response. nginx logs the
                # failed send at info level (ngx_connection_error: c->log_error is
                # NGX_ERROR_INFO on client connections) and finalizes the request; the log
                # phase runs as for any request (the finally below).
                self.close_connection = True
                if isinstance(exc, TimeoutError):
                    what = "client timed out (110: Connection timed out)"
                else:
                    what = (f"writev() failed ({exc.errno}: {os.strerror(exc.errno)})"
                            if exc.errno else f"writev() failed ({type(exc).__name__})")
                # the path without its query: an apikey argument must not reach the log
                log.info('%s while sending to client, client: %s, request: "%s %s"', what,
                         self.client_address[0], self.command, self.path.split("?")[0])
            finally:
                if resp.chunks is not None and hasattr(resp.chunks, "close"):
                    resp.chunks.close()  # runs the stream's finalizer if the client left
                resp.sent()

        def _write(self, resp: Response) -> None:
            self.send_response_only(resp.status)
            no_body = self.command == "HEAD" or resp.status in (204, 304)
            for k, v in resp.headers.items():
                if k.lower() in HOP_BY_HOP:
                    continue
                self.send_header(k, v.encode("utf-8", "surrogateescape").decode("latin-1"))
            if resp.chunks is not None and self.request_version < "HTTP/1.1":
                # no chunked encoding for an HTTP/1.0 (or 0.9) client: nginx sends the body as
                # it comes and closes the connection (ngx_http_chunked_filter_module)
                self.close_connection = True
            if self.close_connection:
                self.send_header("Connection", "close")  # ngx_http_header_filter_module
            if resp.chunks is None:
                self.send_header("Content-Length", str(len(resp.body)))
                self.end_headers()
                if not no_body:
                    self.wfile.write(resp.body)
                return
            if self.request_version < "HTTP/1.1":
                self.end_headers()
                for chunk in resp.chunks:
                    if not no_body:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in resp.chunks:
                if no_body:
                    continue
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _handle

    return Handler


# --------------------------------------------------------------------------- presets

def stock_entries(plugin_files: Sequence[str | Path], prefix: str | Path,
                  python: str = sys.executable, pythonpath: str | None = None,
                  extra_env: Mapping[str, str] | None = None) -> list[PluginServerEntry]:
    """One kong-pdk dedicated server per plugin file, as Kong's docs configure it (§1.5).

    Kong runs `exec <start_cmd>`, so inline variables go through /usr/bin/env
    (`exec VAR=x cmd` is not valid sh).
    """
    entries = []
    for f in plugin_files:
        f = Path(f).resolve()
        name = f.stem
        env = _env_prefix(pythonpath, extra_env)
        entries.append(PluginServerEntry(
            name=name, socket=f"{prefix}/{name}.socket",
            query_cmd=f"{env}{python} {f} --dump",
            start_cmd=f"{env}{python} {f} --socket-name {name}.socket -p {prefix}"))
    return entries


def aigov_entries(names: Sequence[str], prefix: str | Path, python: str = sys.executable,
                  pythonpath: str | None = None,
                  extra_env: Mapping[str, str] | None = None,
                  serve_args: Sequence[str] = ()) -> list[PluginServerEntry]:
    """`aigov serve` hosts every plugin: the first entry starts it, the others are external.

    `serve_args` are extra `aigov serve` options (e.g. `--metrics-listen`, `-v`)."""
    import shlex

    env = _env_prefix(pythonpath, extra_env)
    py = shlex.quote(str(python))
    extra = "".join(" " + shlex.quote(str(a)) for a in serve_args)
    entries = []
    for i, name in enumerate(names):
        entries.append(PluginServerEntry(
            name=name, socket=f"{prefix}/{name}.socket",
            query_cmd=f"{env}{py} -m aigov.cli dump {name}",
            start_cmd=f"{env}{py} -m aigov.cli serve -p {shlex.quote(str(prefix))}{extra}" if i == 0 else None))
    return entries


# What kong.conf.example lists in nginx_main_env: the variables a plugin server started by a
# worker still sees (nginx clears the rest). --plugin-server stands for that file's entries, so
# these pass from the caller's environment as they would under Kong with that kong.conf.
LOCAL_MAIN_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TIKTOKEN_CACHE_DIR", "AIGOV_CAPTURE_PHASE",
                  "AIGOV_ROUTER_CACHE_DIR", "AIGOV_EMBEDDINGS_RUNTIME", "AIGOV_MODEL_CACHE",
                  "AIGOV_PLUGINS_DIR")


def _local_entries(kind: str, prefix: str | None, metrics_listen: str | None = None) -> list[PluginServerEntry]:
    """Pluginserver entries for this repository's plugins/ run from this interpreter."""
    import tempfile

    plugins_dir = Path(__file__).resolve().parent.parent / "plugins"
    files = sorted(plugins_dir.glob("llm-*.py"))
    if not files:
        raise SystemExit(f"aigov gateway: no plugin modules in {plugins_dir}")
    if prefix:
        # Kong creates its prefix (`kong prepare`); a missing one would make the plugin
        # server exit at start, and the stand-in restart it forever.
        try:
            Path(prefix).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SystemExit(f"aigov gateway: --prefix {prefix}: {exc}") from None
    prefix = prefix or tempfile.mkdtemp(prefix="aigov-gw-")
    pythonpath = str(plugins_dir.parent)
    env = {k: os.environ[k] for k in LOCAL_MAIN_ENV if k in os.environ}
    if kind == "stock":
        if metrics_listen:
            raise SystemExit("aigov gateway: --metrics-listen needs --plugin-server aigov "
                             "(the stock kong-pdk server has no metrics)")
        return stock_entries(files, prefix, pythonpath=pythonpath, extra_env=env)
    serve_args = ["--metrics-listen", metrics_listen] if metrics_listen else []
    return aigov_entries([f.stem for f in files], prefix, pythonpath=pythonpath, extra_env=env,
                         serve_args=serve_args)


def _env_prefix(pythonpath: str | None, extra_env: Mapping[str, str] | None) -> str:
    import shlex
    pairs = dict(extra_env or {})
    if pythonpath:
        pairs["PYTHONPATH"] = pythonpath
    if not pairs:
        return ""
    return "/usr/bin/env " + " ".join(shlex.quote(f"{k}={v}") for k, v in pairs.items()) + " "


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="declarative kong.yml")
    parser.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT of the HTTP front")
    parser.add_argument("--conf", help="kong.conf-style file with the pluginserver entries")
    parser.add_argument("--plugin-server", choices=["aigov", "stock"],
                        help="without --conf: run this repository's plugins locally on one "
                             "`aigov serve` (aigov) or one kong-pdk dedicated server each (stock)")
    parser.add_argument("--prefix", help="socket directory for --plugin-server (default: a temp dir)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="with --plugin-server aigov: `aigov serve --metrics-listen` (Prometheus)")
    parser.add_argument("--override-host", action="append", default=[], metavar="FROM=TO",
                        help="rewrite host:port FROM to TO in the kong.yml for a local run, e.g. "
                             "mock-llm:8080=127.0.0.1:8080 (repeatable; the file is not changed)")
    parser.add_argument("--workers", type=int, default=1, help="simulated nginx workers")
    parser.add_argument("--step-timeout", type=float, default=60.0,
                        help="plugin-server read timeout in seconds (Kong: 60)")
    parser.add_argument("--allow-unimitated", action="store_true",
                        help="warn (instead of failing) on bundled plugins the stand-in cannot run")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    installed = None
    entries: list[PluginServerEntry] = []
    conf_kwargs: dict[str, Any] = {}
    if args.metrics_listen and (args.conf or not args.plugin_server):
        print("aigov gateway: --metrics-listen needs --plugin-server aigov (with --conf, add it to the "
              "`aigov serve` start_cmd in that file)", file=sys.stderr)
        return 2
    if args.conf:
        try:
            conf, entries = process.load_kong_conf(args.conf, os.environ)
        except (OSError, ValueError) as exc:
            print(f"aigov gateway: {exc}", file=sys.stderr)
            return 2
        if conf.get("plugins"):
            names = {n.strip() for n in conf["plugins"].split(",")}
            installed = names - {"bundled"}
        # kong.conf's request debugging settings (Kong 3.5+): request_debug = on|off
        if conf.get("request_debug"):
            conf_kwargs["request_debug"] = str(conf["request_debug"]).strip().lower() not in (
                "off", "false", "0")
        if conf.get("request_debug_token"):
            conf_kwargs["request_debug_token"] = str(conf["request_debug_token"]).strip()
        # trusted_ips, real_ip_header, real_ip_recursive (and the nginx_proxy_* forms)
        conf_kwargs.update(real_ip_settings(conf))
        for key in ("client_body_buffer_size", "client_max_body_size"):
            if conf.get(f"nginx_http_{key}"):
                conf_kwargs[key] = str(conf[f"nginx_http_{key}"]).strip()
    elif args.plugin_server:
        entries = _local_entries(args.plugin_server, args.prefix, args.metrics_listen)
        conf_kwargs.update(RECOMMENDED_BODY_SIZES)  # as LOCAL_MAIN_ENV: kong.conf.example's settings
    config: Any = args.config
    if args.override_host:
        try:
            mapping = dict(item.split("=", 1) for item in args.override_host)
            config = declarative.override_hosts(args.config, mapping)
        except (ValueError, declarative.DeclarativeError) as exc:
            print(f"aigov gateway: --override-host: {exc}", file=sys.stderr)
            return 2
    host, _, port = args.listen.rpartition(":")
    try:
        gw = Gateway(config, entries, workers=args.workers, step_timeout_s=args.step_timeout,
                     installed=installed, allow_unimitated=args.allow_unimitated, **conf_kwargs)
        gw.start()
    except (declarative.DeclarativeError, ValueError, RuntimeError, TimeoutError) as exc:
        print(f"aigov gateway: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    try:
        url = gw.serve(host or "127.0.0.1", int(port))
        print(f"aigov gateway listening on {url}", file=sys.stderr)
        stop.wait()
    finally:
        gw.close()
    return 0
