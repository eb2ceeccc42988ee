"""Per-request timing, shaped like Kong's request debugging (Kong 3.5+, `kong/timing`).

Kong keeps a tree of named contexts per debugged request: the root carries `request_id` (and
`workspace_id`), each phase (`rewrite`, `access`, `balancer`, `response`, `header_filter`,
`body_filter`, `log`) is a child, plugins sit under `<phase>.child.plugins.child.<name>.child.<id>`,
and `upstream` is mocked from the time to first byte (header_filter) plus the streaming time (log).
Every node has `total_time` in milliseconds, accumulated when a context is entered again (a
plugin's body_filter runs once per chunk). The stand-in collects this for every request (a few
clock reads) so benchmarks can compute the latency each plugin adds; the
`X-Kong-Request-Debug-Output` header is only sent when the client asks, as Kong does.

Differences from Kong, on purpose: times are kept as float milliseconds internally (Kong floors
them per accumulation); `to_kong_json()` floors them for the header. Only the OSS filter `*` is
understood (Enterprise's per-phase filters are not imitated). Kong's dns/redis/socket hooks are
not imitated: a plugin server's own I/O is part of its plugin's time.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from typing import Any, Iterator

# Phases whose plugin time delays the response to the client; `log` runs after it (a timer).
CLIENT_PHASES = ("rewrite", "access", "response", "header_filter", "body_filter")
HEADER_JSON_TRUNCATE_LENGTH = 2048  # kong/timing/init.lua: 2 KB, larger outputs are truncated
LOG_PREFIX = "[request-debug]"  # kong.constants.REQUEST_DEBUG_LOG_PREFIX


class RequestTiming:
    """The timing tree of one request. Spans nest like Kong's enter/leave_subcontext."""

    def __init__(self, request_id: str, workspace_id: str | None = None) -> None:
        self.request_id = request_id
        self.tree: dict[str, Any] = {"request_id": request_id}
        if workspace_id:
            self.tree["workspace_id"] = workspace_id
        self._stack: list[dict[str, Any]] = [self.tree]
        self._starts: list[float] = []
        self.started = time.perf_counter()
        self.finished: float | None = None  # when the response was handed to the client
        # Request debugging: did the client ask (and pass the token check)?
        self.debug = False
        self.debug_log = False  # X-Kong-Request-Debug-Log: true
        self.loopback = True

    # --- building ------------------------------------------------------------------------
    def enter(self, name: str, now: float | None = None) -> None:
        node = self._stack[-1].setdefault("child", {}).setdefault(name, {})
        self._stack.append(node)
        self._starts.append(time.perf_counter() if now is None else now)

    def leave(self, now: float | None = None) -> None:
        if len(self._stack) <= 1:
            return  # unbalanced leave: ignore rather than corrupt the root
        node = self._stack.pop()
        elapsed_ms = ((time.perf_counter() if now is None else now) - self._starts.pop()) * 1000.0
        node["total_time"] = node.get("total_time", 0.0) + elapsed_ms

    @contextlib.contextmanager
    def span(self, *names: str) -> Iterator[None]:
        """Enter each name in turn (nested), leave them all on exit, even on exceptions. The
        nested names share one start and one end reading: `<plugin>` and its `<plugin id>`
        child time the same call, so they must agree (Kong's whole milliseconds do)."""
        start = time.perf_counter()
        for n in names:
            self.enter(n, start)
        try:
            yield
        finally:
            end = time.perf_counter()
            for _ in names:
                self.leave(end)

    def add(self, path: tuple[str, ...], ms: float) -> None:
        """Add a measured duration to a node (used for the mocked upstream phase)."""
        node = self.tree
        for name in path:
            node = node.setdefault("child", {}).setdefault(name, {})
        node["total_time"] = node.get("total_time", 0.0) + ms

    def close_dangling(self) -> bool:
        """Leave contexts still open (Kong marks them `dangling`). True if there were any."""
        dangling = len(self._stack) > 1
        while len(self._stack) > 1:
            self._stack[-1]["dangling"] = True
            self.leave()
        return dangling

    # --- reading -------------------------------------------------------------------------
    def node(self, *path: str) -> dict[str, Any] | None:
        node: dict[str, Any] | None = self.tree
        for name in path:
            node = (node or {}).get("child", {}).get(name)
            if node is None:
                return None
        return node

    def phase_ms(self) -> dict[str, float]:
        """Phase name -> milliseconds (the upstream pseudo-phase included)."""
        return {k: v.get("total_time", 0.0) for k, v in self.tree.get("child", {}).items()}

    def plugin_ms(self, phases: tuple[str, ...] | None = None) -> dict[str, float]:
        """Plugin name -> milliseconds summed over `phases` (default: every phase)."""
        out: dict[str, float] = {}
        for phase, pnode in self.tree.get("child", {}).items():
            if phases is not None and phase not in phases:
                continue
            plugins = pnode.get("child", {}).get("plugins", {}).get("child", {})
            for name, node in plugins.items():
                out[name] = out.get(name, 0.0) + node.get("total_time", 0.0)
        return out

    def added_latency_ms(self) -> dict[str, float]:
        """Plugin name -> the time it kept the client waiting (every phase but `log`)."""
        return self.plugin_ms(CLIENT_PHASES)

    @property
    def upstream_ms(self) -> float | None:
        node = self.node("upstream")
        return None if node is None else node.get("total_time", 0.0)

    @property
    def total_ms(self) -> float | None:
        """From the start of the request to the response handed to the client."""
        return None if self.finished is None else (self.finished - self.started) * 1000.0

    def to_kong_json(self) -> str:
        """The tree as Kong sends it in X-Kong-Request-Debug-Output (integer milliseconds)."""
        return json.dumps(_floored(self.tree), separators=(",", ":"))


def _floored(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (math.floor(v) if k == "total_time" else _floored(v)) for k, v in node.items()}
    return node


def truncated_output(request_id: str) -> str:
    """What Kong sends instead of an output of 2 KB or more to a client not on loopback."""
    return json.dumps({"truncated": True, "request_id": request_id,
                       "message": "Output is truncated, please check the error_log for full "
                                  "output by filtering with the request_id."})


__all__ = ["RequestTiming", "CLIENT_PHASES", "truncated_output", "LOG_PREFIX",
           "HEADER_JSON_TRUNCATE_LENGTH"]
