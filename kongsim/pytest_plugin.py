"""Reusable pytest fixtures for testing kong-pdk plugins against the Kong stand-in.

Enable with `pytest_plugins = ["kongsim.pytest_plugin"]`. The `kong_gateway` fixture is a
factory:

    gw = kong_gateway(kong_yml_path_or_dict, server="stock", plugin_files=[...])
    r = gw.request("POST", "/chat", headers={"apikey": "k"}, json={...})
    assert r.status == 200

`server` is "stock" (one kong-pdk dedicated server per plugin file, as Kong's docs configure
it), "aigov" (one `aigov serve` process for every aigov plugin), or a list of
PluginServerEntry. `http=False` skips the HTTP front: `.request()` then goes through
`Gateway.handle()` in-process (faster, same runloop). Every gateway is closed at teardown.
"""
from __future__ import annotations

import http.client
import json as jsonlib
import collections
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import pytest

from kongsim.gateway import RECOMMENDED_BODY_SIZES, Gateway, Request, aigov_entries, stock_entries
from kongsim.pdk import RequestContext
from kongsim.process import PluginServerEntry

AIGOV_PLUGINS = ("llm-semantic-cache", "llm-token-quota", "llm-semantic-router")


class Reply:
    """A finished response: status, headers (case-insensitive get), body, json()."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.header_list = headers
        self.body = body

    def header(self, name: str) -> str | None:
        for k, v in self.header_list:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.header_list}

    def json(self) -> Any:
        return jsonlib.loads(self.body or b"null")


class GatewayHandle:
    """A started stand-in (plugin servers + optional HTTP front) for one test."""

    def __init__(self, gateway: Gateway, prefix: str, http: bool) -> None:
        self.gateway = gateway
        self.prefix = prefix
        self.url = gateway.serve() if http else None

    def request(self, method: str, path: str, headers: Mapping[str, str] | None = None,
                json: Any = None, body: bytes | str | None = None, stream: bool = False,
                worker: int | None = None, timeout: float = 30.0) -> Any:
        """Send a request; with stream=True returns (Reply without body, chunk iterator)."""
        hdrs = dict(headers or {})
        data = b""
        if json is not None:
            data = jsonlib.dumps(json).encode()
            hdrs.setdefault("Content-Type", "application/json")
        elif body is not None:
            data = body.encode() if isinstance(body, str) else body
        if self.url is None:
            resp = self.gateway.handle(Request(method, path, list(hdrs.items()), data), worker)
            if stream:
                def chunks() -> Iterator[bytes]:
                    try:
                        if resp.chunks is not None:
                            yield from resp.chunks
                        else:
                            yield resp.body
                    finally:
                        resp.sent()
                return Reply(resp.status, resp.headers.items(), b""), chunks()
            return Reply(resp.status, resp.headers.items(), resp.read())
        u = urlsplit(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        conn.request(method, path, body=data or None, headers=hdrs)
        r = conn.getresponse()
        if stream:
            def read_chunks() -> Iterator[bytes]:
                try:
                    while True:
                        c = r.read1(65536)
                        if not c:
                            return
                        yield c
                finally:
                    conn.close()
            return Reply(r.status, r.getheaders(), b""), read_chunks()
        out = Reply(r.status, r.getheaders(), r.read())
        conn.close()
        return out

    def finished_request(self, request_id: str | None) -> RequestContext:
        """The context of a request whose log phases are done (what Kong's loggers got is its
        `saved["serialize"]`). Kept from the first call on: call it once before the requests."""
        if not hasattr(self, "_finished"):
            self._finished: dict[str, RequestContext] = {}
            runloop = self.gateway.runloop
            chained = runloop.on_request_done

            def keep(ctx: RequestContext) -> None:
                self._finished[ctx.request_id] = ctx
                if chained is not None:
                    chained(ctx)

            runloop.on_request_done = keep
        self.wait_logs()
        return self._finished.get(request_id or "")  # type: ignore[return-value]

    def wait_logs(self, timeout_s: float = 10.0) -> bool:
        assert self.gateway.runloop is not None
        return self.gateway.runloop.wait_logs(timeout_s)

    def close(self) -> None:
        self.gateway.close()
        shutil.rmtree(self.prefix, ignore_errors=True)


def make_prefix() -> str:
    """A short directory for sockets (Unix socket paths are limited to ~107 bytes)."""
    return tempfile.mkdtemp(prefix="kongsim-", dir="/tmp")


def start_gateway(config: str | Path | Mapping[str, Any], server: str | Sequence[PluginServerEntry] = "stock",
                  plugin_files: Sequence[str | Path] = (), workers: int = 1, http: bool = True,
                  pythonpath: str | None = None, extra_env: Mapping[str, str] | None = None,
                  python: str = sys.executable, prefix: str | None = None,
                  **gateway_kwargs: Any) -> GatewayHandle:
    """Start plugin servers and a gateway; the caller must close() the handle."""
    prefix = prefix or make_prefix()
    if isinstance(server, str):
        if server == "stock":
            entries = stock_entries(plugin_files, prefix, python, pythonpath, extra_env)
        elif server == "aigov":
            entries = aigov_entries(AIGOV_PLUGINS, prefix, python, pythonpath, extra_env)
        else:
            raise ValueError(f"unknown server preset {server!r} (use 'stock', 'aigov' or entries)")
    else:
        entries = list(server)
    gateway_kwargs = {**RECOMMENDED_BODY_SIZES, **gateway_kwargs}  # Kong as kong.conf.example sets it
    gw = Gateway(config, entries, workers=workers, **gateway_kwargs)
    try:
        gw.start()
        return GatewayHandle(gw, prefix, http)
    except BaseException:
        shutil.rmtree(prefix, ignore_errors=True)
        raise


class PdkCallLog:
    """Every PDK callback a gateway served, by request id: (plugin, phase, method) in call order.

    Install with `start_recorded_gateway`; tests count calls per plugin and phase with it (the
    cost of a phase is its round trips, so "at most N calls" is the behavioural check).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_request: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
        self.contexts: dict[str, RequestContext] = {}
        self.log_threads: dict[str, threading.Thread] = {}  # request id -> thread of its log phase

    def __call__(self, ctx: RequestContext, method: str) -> None:
        with self._lock:
            self.by_request[ctx.request_id].append((ctx.plugin_name or "", ctx.phase, method))
            self.contexts[ctx.request_id] = ctx
            if ctx.phase == "log":
                self.log_threads[ctx.request_id] = threading.current_thread()

    def calls(self, request_id: str, plugin: str, phase: str) -> list[str]:
        with self._lock:
            return [m for p, ph, m in self.by_request.get(request_id, []) if p == plugin and ph == phase]


def start_recorded_gateway(config: str | Path | Mapping[str, Any],
                           **kwargs: Any) -> tuple[GatewayHandle, PdkCallLog]:
    """start_gateway with a PdkCallLog on the stand-in's PDK dispatch; the caller closes the handle."""
    handle = start_gateway(config, **kwargs)
    recorder = PdkCallLog()
    if handle.gateway.runloop is None:
        handle.close()
        raise RuntimeError("the gateway has no runloop to record")
    handle.gateway.runloop.pdk.on_call = recorder
    return handle, recorder


@pytest.fixture()
def kong_gateway() -> Iterator[Callable[..., GatewayHandle]]:
    """Factory fixture: `kong_gateway(config, server=..., ...)` -> started GatewayHandle."""
    handles: list[GatewayHandle] = []

    def factory(config: str | Path | Mapping[str, Any], **kwargs: Any) -> GatewayHandle:
        handle = start_gateway(config, **kwargs)
        handles.append(handle)
        return handle

    yield factory
    for h in handles:
        h.close()
