"""Kong's request runloop for external plugins: instances, the bridge loop, phases, exit.

Sources (reference kong-plugin-server.md): instance cache per worker and `get_instance_id`
(`kong/runloop/plugin_servers/plugin.lua`, §2.3 step 1, §2.6), the bridge loop and step-method
table (`mp_rpc.lua`, §2.3), "no plugin instance" reset and retry (§2.7), plugin order by
priority then descending name (`sort_by_handler_priority`, §4.4), the collecting iterator
that keeps collecting after a delayed response (`kong/init.lua`
execute_collecting_plugins_iterator), phases (§2.8): rewrite only for global plugins, access,
response (buffered proxying), log in a timer after the response against saved data.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import threading
import time
from typing import Any, Callable, Iterator

from kongsim import metaschema, redact
from kongsim.bundled import IMITATED, KONG_BUNDLED, BundledPlugin
from kongsim.declarative import DeclarativeConfig, PluginEntity
from kongsim.pdk import PDK, ExitSignal, Headers, PdkLuaError, RequestContext
from kongsim.process import PluginInfo
from kongsim.rpc import DEFAULT_TIMEOUT_S, RpcClient, RpcError, RpcTimeout

log = redact.get_logger("kongsim.runloop")

WS_ID = "00000000-0000-4000-8000-000000000001"
STEP_METHODS = {
    "kong.client.get_credential": "StepCredential",
    "kong.client.authenticate": "StepCredential",
    "kong.client.get_consumer": "StepConsumer",
    "kong.client.load_consumer": "StepConsumer",
    "kong.node.get_memory_stats": "StepMemoryStats",
    "kong.router.get_route": "StepRoute",
    "kong.router.get_service": "StepService",
    "kong.request.get_query": "StepMultiMap",
    "kong.request.get_headers": "StepMultiMap",
    "kong.response.get_headers": "StepMultiMap",
    "kong.service.response.get_headers": "StepMultiMap",
}
EXIT_METHODS = {"kong.response.exit", "kong.response.error"}


class LoadError(ValueError):
    """The declarative config cannot run: unknown plugins, bad configs, unresolved vaults."""


class StartInstanceError(RuntimeError):
    pass


def get_step_method(method: str, value: Any) -> str:
    """mp_rpc.lua get_step_method (StepError is never chosen: only the first value is kept)."""
    if isinstance(value, dict) and isinstance(value.get("_method"), str):
        return value["_method"]
    return STEP_METHODS.get(method, "Step")


@dataclasses.dataclass
class PluginDef:
    """A plugin the stand-in can run: external (discovered) or an imitated bundled one."""
    name: str
    priority: int
    phases: frozenset[str]
    fields: list[dict[str, Any]]
    info: PluginInfo | None = None
    bundled: BundledPlugin | None = None

    @property
    def server(self) -> str:
        assert self.info is not None
        return self.info.server


@dataclasses.dataclass
class Instance:
    id: int | None
    seq: int
    plugin_id: str
    name: str


class Worker:
    """One simulated nginx worker: its own RPC objects (pools, msgids) and instance cache."""

    def __init__(self, index: int, sockets: dict[str, str], timeout_s: float) -> None:
        self.index = index
        self.rpc = {server: RpcClient(path, timeout_s) for server, path in sockets.items()}
        self.instances: dict[str, Instance] = {}
        self.lock = threading.Lock()
        self.start_locks: dict[str, threading.Lock] = {}

    def start_lock(self, plugin_id: str) -> threading.Lock:
        with self.lock:
            return self.start_locks.setdefault(plugin_id, threading.Lock())


@dataclasses.dataclass
class Response:
    """What the stand-in sends to the client. `chunks` is set for streamed responses."""
    status: int
    headers: Headers
    body: bytes = b""
    chunks: Iterator[bytes] | None = None
    _on_sent: Callable[[], None] | None = None

    def sent(self) -> None:
        """Call once the response reached the client: schedules the log phase."""
        cb, self._on_sent = self._on_sent, None
        if cb:
            cb()

    def read(self) -> bytes:
        """The whole body (consumes a stream) and marks the response sent."""
        if self.chunks is not None:
            self.body = b"".join(self.chunks)
            self.chunks = None
        self.sent()
        return self.body

    def json(self) -> Any:
        return json.loads(self.read() or b"null")


class Runloop:
    """Runs the plugin phases of requests against discovered plugin servers."""

    def __init__(self, config: DeclarativeConfig, infos: dict[str, PluginInfo],
                 sockets: dict[str, str], workers: int = 1,
                 step_timeout_s: float = DEFAULT_TIMEOUT_S, installed: set[str] | None = None,
                 allow_unimitated: bool = False, environ: dict[str, str] | None = None) -> None:
        self.defs: dict[str, PluginDef] = {}
        for name, p in IMITATED.items():
            self.defs[name] = PluginDef(name, p.priority, p.phases, p.fields, bundled=p)
        for info in infos.values():
            self.defs[info.name] = PluginDef(info.name, info.priority, frozenset(info.phases),
                                             info.config_fields, info=info)
        self.installed = installed
        self.allow_unimitated = allow_unimitated
        self.environ = environ
        self.pdk = PDK(config)
        self.workers = [Worker(i, sockets, step_timeout_s) for i in range(max(1, workers))]
        self._rr = itertools.count()
        self._seq = itertools.count(1)
        # Log phases due: counted from the moment a response exists (before the client can
        # see it) until its log job has finished, so wait_logs() cannot miss one.
        self._log_pending = 0
        self._log_cond = threading.Condition()
        # Called with the RequestContext once a request is completely done (log phase included).
        self.on_request_done: Callable[[RequestContext], None] | None = None
        self.skipped: set[str] = set()
        self.config: DeclarativeConfig
        self.processed: dict[str, dict[str, Any]] = {}
        self.load(config)

    # --- configuration -------------------------------------------------------------------
    def load(self, config: DeclarativeConfig) -> None:
        """Validate every plugin entity, fill defaults, resolve vaults, assign a new __seq__."""
        problems: list[str] = []
        processed: dict[str, dict[str, Any]] = {}
        skipped: set[str] = set()
        for ent in config.plugins:
            pdef = self.defs.get(ent.name)
            if pdef is None or (self.installed is not None and ent.name not in self.installed
                                and ent.name not in IMITATED):
                if ent.name in KONG_BUNDLED and pdef is None:
                    msg = (f"{ent.where}: bundled plugin '{ent.name}' is not imitated by the "
                           f"stand-in")
                    if self.allow_unimitated:
                        log.warning("%s; it will NOT run", msg)
                        skipped.add(ent.id)
                        continue
                    problems.append(msg)
                else:
                    problems.append(f"{ent.where}: plugin '{ent.name}' is enabled but not installed")
                continue
            try:
                conf = metaschema.process_config(pdef.fields, ent.config, ent.name)
                conf, secrets = metaschema.resolve_references(pdef.fields, conf, self.environ, ent.name)
            except metaschema.ConfigError as exc:
                problems.append(f"{ent.where}: {exc}")
                continue
            redact.register_secrets(secrets)
            for path in metaschema.secret_paths(pdef.fields):
                redact.register_secret(_dig(conf, path.split(".")))
            if pdef.bundled is not None and hasattr(pdef.bundled, "check_config"):
                extra = pdef.bundled.check_config(conf)  # type: ignore[attr-defined]
                if extra:
                    problems.extend(f"{ent.where}: {e}" for e in extra)
                    continue
            processed[ent.id] = self._with_kong_keys(ent, conf)
        if problems:
            raise LoadError("invalid declarative configuration:\n  " + "\n  ".join(problems))
        self.config = config
        self.pdk.config = config
        self.processed = processed
        self.skipped = skipped

    def _with_kong_keys(self, ent: PluginEntity, conf: dict[str, Any]) -> dict[str, Any]:
        """get_plugin_config in plugins_iterator.lua: scope ids, instance name, __ keys."""
        out = dict(conf)
        if ent.route_id:
            out["route_id"] = ent.route_id
        if ent.service_id:
            out["service_id"] = ent.service_id
        if ent.consumer_id:
            out["consumer_id"] = ent.consumer_id
        if ent.instance_name:
            out["plugin_instance_name"] = ent.instance_name
        out["__plugin_id"] = ent.id
        out["__ws_id"] = WS_ID
        out["__key__"] = (f"plugins:{ent.name}:{ent.route_id or ''}:{ent.service_id or ''}:"
                          f"{ent.consumer_id or ''}::{WS_ID}")
        out["__seq__"] = next(self._seq)
        return out

    # --- instances -----------------------------------------------------------------------
    def _instance_id(self, worker: Worker, pdef: PluginDef, conf: dict[str, Any]) -> int:
        plugin_id = conf["__plugin_id"]
        with worker.start_lock(plugin_id):  # a concurrent start waits (Kong sleeps 0.1 s steps)
            inst = worker.instances.get(plugin_id)
            if inst is not None and inst.id is not None and inst.seq == conf["__seq__"]:
                return inst.id
            old_id = inst.id if inst is not None else None
            rpc = worker.rpc[pdef.server]
            try:
                result = rpc.call("StartInstance", {"Name": pdef.name, "Config": json.dumps(conf)})
                new_id = int(result["Id"])
            except (RpcError, KeyError, TypeError, ValueError) as exc:
                worker.instances.pop(plugin_id, None)
                log.error("[%s] starting instance: %s", pdef.name, exc)
                raise StartInstanceError(str(exc)) from None
            worker.instances[plugin_id] = Instance(new_id, conf["__seq__"], plugin_id, pdef.name)
            if old_id is not None:
                try:
                    rpc.call("CloseInstance", old_id)  # a bare int, not a map
                except RpcError as exc:
                    log.debug("[%s] closing instance #%s: %s", pdef.name, old_id, exc)
            return new_id

    def reset_instances(self, plugin_name: str) -> None:
        """plugin_server/reset_instances: forget every instance of the plugin in all workers."""
        for w in self.workers:
            with w.lock:
                for pid in [k for k, v in w.instances.items() if v.name == plugin_name]:
                    del w.instances[pid]

    # --- running one phase of one plugin -------------------------------------------------
    def _run_external(self, worker: Worker, pdef: PluginDef, conf: dict[str, Any], phase: str,
                      ctx: RequestContext) -> None:
        ctx.phase, ctx.plugin_name = phase, pdef.name
        rpc = worker.rpc[pdef.server]
        for attempt in (1, 2):
            iid = self._instance_id(worker, pdef, conf)
            try:
                reply = rpc.call("HandleEvent", {"InstanceId": iid, "EventName": phase})
            except RpcError as exc:
                if "no plugin instance" in str(exc).lower() and attempt == 1:
                    log.warning("[%s] %s", pdef.name, exc)
                    self.reset_instances(pdef.name)
                    continue
                log.error("[%s] %s", pdef.name, _describe(exc))
                return
            self._bridge_loop(rpc, pdef, reply, ctx)
            return

    def _bridge_loop(self, rpc: RpcClient, pdef: PluginDef, reply: Any, ctx: RequestContext) -> None:
        while True:
            if not isinstance(reply, dict):
                log.error("[%s] malformed event reply", pdef.name)
                return
            data = reply.get("Data")
            if data == "ret":
                return
            if not isinstance(data, dict) or not isinstance(data.get("Method"), str):
                log.error("[%s] malformed callback from plugin server", pdef.name)
                return
            method, args = data["Method"], data.get("Args")
            try:
                value = self.pdk.call(ctx, method, args if isinstance(args, list) else [])
            except ExitSignal:
                return  # terminal: Kong never answers an exit callback
            try:
                reply = rpc.call(get_step_method(method, value),
                                 {"EventId": reply.get("EventId"), "Data": value})
            except RpcError as exc:
                log.error("[%s] %s", pdef.name, _describe(exc))
                return

    def _run(self, worker: Worker, pdef: PluginDef, conf: dict[str, Any], phase: str,
             ctx: RequestContext) -> None:
        # Kong's timing hooks: before:plugin enters <name> then <plugin id> (kong/timing).
        assert ctx.timing is not None
        with ctx.timing.span(pdef.name, str(conf.get("__plugin_id"))):
            self._run_untimed(worker, pdef, conf, phase, ctx)

    def _run_untimed(self, worker: Worker, pdef: PluginDef, conf: dict[str, Any], phase: str,
                     ctx: RequestContext) -> None:
        if pdef.bundled is not None:
            ctx.phase, ctx.plugin_name = phase, pdef.name
            if phase == "access":
                pdef.bundled.access(self, ctx, conf)
                if ctx.exit_response is not None:
                    raise ExitSignal()
            return
        self._run_external(worker, pdef, conf, phase, ctx)

    # --- plugin selection ----------------------------------------------------------------
    def ordered_names(self) -> list[str]:
        """Configured plugin names by priority descending, then name descending (§4.4)."""
        names = {p.name for p in self.config.plugins if p.id in self.processed}
        return sorted(names, key=lambda n: (-self.defs[n].priority, _Desc(n)))

    def resolve(self, name: str, ctx: RequestContext, global_only: bool = False
                ) -> tuple[PluginDef, dict[str, Any]] | None:
        route_id = None if global_only or ctx.route is None else ctx.route.id
        service_id = None if global_only or ctx.service is None else ctx.service.id
        consumer_id = None if global_only or ctx.consumer is None else ctx.consumer.id
        ent = self.config.resolve_plugin(name, route_id, service_id, consumer_id)
        if ent is None or ent.id not in self.processed:
            return None
        if global_only and not ent.is_global:
            return None
        return self.defs[name], self.processed[ent.id]

    def pick_worker(self, index: int | None = None) -> Worker:
        if index is None:
            index = next(self._rr)
        return self.workers[index % len(self.workers)]

    # --- phases --------------------------------------------------------------------------
    def rewrite(self, worker: Worker, ctx: RequestContext,
                globals_: list[tuple[PluginDef, dict[str, Any]]] | None = None
                ) -> list[tuple[PluginDef, dict[str, Any]]]:
        """Global plugins only, before routing. Returns the global plugins (for log on 404),
        collected into `globals_` if given, so a caller still has them after an exception."""
        if globals_ is None:
            globals_ = []
        assert ctx.timing is not None
        with ctx.timing.span("rewrite", "plugins"):
            self._rewrite_plugins(worker, ctx, globals_)
        return globals_

    def _rewrite_plugins(self, worker: Worker, ctx: RequestContext,
                         globals_: list[tuple[PluginDef, dict[str, Any]]]) -> None:
        for name in self.ordered_names():
            found = self.resolve(name, ctx, global_only=True)
            if found is None:
                continue
            globals_.append(found)
            pdef, conf = found
            if "rewrite" in pdef.phases and ctx.exit_response is None:
                try:
                    self._run(worker, pdef, conf, "rewrite", ctx)
                except ExitSignal:
                    pass

    def access(self, worker: Worker, ctx: RequestContext,
               collected: list[tuple[PluginDef, dict[str, Any]]] | None = None
               ) -> list[tuple[PluginDef, dict[str, Any]]]:
        """The collecting iterator: runs access handlers until an exit, keeps collecting (into
        `collected` if given: Kong's ctx.plugins, which its log phase reads even after an error).

        The caller holds the `access` timing context (routing is part of Kong's access phase)."""
        if collected is None:
            collected = []
        assert ctx.timing is not None
        with ctx.timing.span("plugins"):
            self._access_plugins(worker, ctx, collected)
        return collected

    def _access_plugins(self, worker: Worker, ctx: RequestContext,
                        collected: list[tuple[PluginDef, dict[str, Any]]]) -> None:
        for name in self.ordered_names():
            found = self.resolve(name, ctx)
            if found is None:
                continue
            collected.append(found)
            pdef, conf = found
            if ctx.exit_response is not None or "access" not in pdef.phases:
                continue
            try:
                self._run(worker, pdef, conf, "access", ctx)
            except ExitSignal:
                continue
            except (PdkLuaError, StartInstanceError) as exc:
                # A Lua error in access: Kong answers 500 (reference §2.7)
                log.error("[%s] %s", pdef.name, exc)
                ctx.exit_response = (500, b'{"message":"An unexpected error occurred"}',
                                     Headers([("Content-Type", "application/json; charset=utf-8")]))
                ctx.response_source = "error"

    def response_phase(self, worker: Worker, ctx: RequestContext,
                       collected: list[tuple[PluginDef, dict[str, Any]]]) -> None:
        assert ctx.timing is not None
        with ctx.timing.span("response", "plugins"):
            self._response_plugins(worker, ctx, collected)

    def _response_plugins(self, worker: Worker, ctx: RequestContext,
                          collected: list[tuple[PluginDef, dict[str, Any]]]) -> None:
        for pdef, conf in collected:
            if "response" not in pdef.phases or pdef.bundled is not None:
                continue
            try:
                self._run(worker, pdef, conf, "response", ctx)
            except ExitSignal:
                pass  # in response, exit sends its response directly
            except (PdkLuaError, StartInstanceError) as exc:
                # Kong.response() runs the handlers unprotected (kong/init.lua; mp_rpc.lua
                # call_pdk_method and plugin.lua get_instance_id raise): the request ends in a 500.
                log.error("[%s] %s", pdef.name, exc)
                ctx.exit_response = (500, b'{"message":"An unexpected error occurred"}',
                                     Headers([("Content-Type", "application/json; charset=utf-8")]))
                ctx.response_source = "error"
            if ctx.exit_response is not None:
                return

    def log_due(self, worker: Worker, ctx: RequestContext,
                collected: list[tuple[PluginDef, dict[str, Any]]]) -> Callable[[], None]:
        """Count a log phase as pending now; the returned callable starts it (call it once,
        when the response has been sent). wait_logs() waits for every pending one."""
        with self._log_cond:
            self._log_pending += 1
        return lambda: self._start_log(worker, ctx, collected)

    def schedule_log(self, worker: Worker, ctx: RequestContext,
                     collected: list[tuple[PluginDef, dict[str, Any]]]) -> None:
        """Kong's ngx.timer.at(0): log handlers run after the response, on saved data."""
        self.log_due(worker, ctx, collected)()

    def _start_log(self, worker: Worker, ctx: RequestContext,
                   collected: list[tuple[PluginDef, dict[str, Any]]]) -> None:
        try:
            assert ctx.timing is not None
            ctx.timing.finished = time.perf_counter()
            ctx.save_for_log()
            todo = [(p, c) for p, c in collected if "log" in p.phases and p.bundled is None]
        except BaseException:
            self._log_done()
            raise
        if not todo:
            self._finish_request(ctx)
            return

        def run() -> None:
            try:
                assert ctx.timing is not None
                with ctx.timing.span("log", "plugins"):
                    for pdef, conf in todo:
                        try:
                            self._run(worker, pdef, conf, "log", ctx)
                        except (PdkLuaError, StartInstanceError, ExitSignal) as exc:
                            log.error("[%s] log phase: %s", pdef.name, exc)
            except Exception:  # noqa: BLE001 - a timer's failure must not lose the accounting
                log.exception("log phase failed")

        try:
            _LOG_TIMERS.submit(run, then=lambda: self._finish_request(ctx))
        except BaseException:
            self._log_done()
            raise

    def _finish_request(self, ctx: RequestContext) -> None:
        try:
            if self.on_request_done is not None:
                self.on_request_done(ctx)
        except Exception:  # noqa: BLE001 - a user callback must not break the runloop
            log.exception("on_request_done callback failed")
        finally:
            self._log_done()

    def _log_done(self) -> None:
        with self._log_cond:
            self._log_pending -= 1
            self._log_cond.notify_all()

    @property
    def pending_logs(self) -> int:
        with self._log_cond:
            return self._log_pending

    def wait_logs(self, timeout_s: float = 10.0) -> bool:
        """Wait until every log phase that is due has finished (the log phase of every request
        whose response exists). True if none is pending at return."""
        deadline = time.monotonic() + timeout_s
        with self._log_cond:
            while self._log_pending > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._log_cond.wait(remaining)
            return True


class _TimerThreads:
    """Kong's ngx.timer.at(0) for log phases: daemon threads that are reused.

    Starting a thread per request costs more than the log phase of a light plugin and lands
    on the next request of a keep-alive client; reused threads start jobs at once. A job never
    waits for another: a new thread is started whenever no idle one is there, up to `cap`
    (beyond it jobs queue). Process-wide, so gateways that come and go share the same few.
    """

    def __init__(self, cap: int = 256) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], Callable[[], None] | None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0     # threads waiting for a job and not yet promised one
        self._threads = 0
        self.cap = cap

    def submit(self, job: Callable[[], None], then: Callable[[], None] | None = None) -> None:
        """Run `job` on a timer thread; `then` runs after the thread is idle again, so whoever it
        wakes (wait_logs) finds the thread reusable."""
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                spawn = False
            else:
                spawn = self._threads < self.cap
                if spawn:
                    self._threads += 1
        self._jobs.put((job, then))
        if spawn:
            try:
                threading.Thread(target=self._work, name="kongsim-log", daemon=True).start()
            except BaseException:
                with self._lock:
                    self._threads -= 1
                raise

    def _work(self) -> None:
        while True:
            job, then = self._jobs.get()
            try:
                job()
            except BaseException:  # noqa: BLE001 - jobs handle their own errors; the thread lives on
                log.exception("log timer job failed")
            del job
            with self._lock:
                self._idle += 1
            if then is not None:
                try:
                    then()
                except BaseException:  # noqa: BLE001
                    log.exception("log timer completion failed")
            del then


_LOG_TIMERS = _TimerThreads()


class _Desc(str):
    """Sorts strings in descending order inside an ascending sort key."""

    def __lt__(self, other: str) -> bool:  # type: ignore[override]
        return str.__gt__(self, other)


def _describe(exc: RpcError) -> str:
    if isinstance(exc, RpcTimeout):
        return "no data (plugin server did not answer within the step timeout)"
    return str(exc)


def _dig(conf: Any, path: list[str]) -> Any:
    for p in path:
        if not isinstance(conf, dict):
            return None
        conf = conf.get(p)
    return conf if isinstance(conf, str) else None


__all__ = ["Runloop", "Response", "LoadError", "get_step_method"]
