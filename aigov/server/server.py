"""The `aigov serve` plugin server: every plugin in one process, one Unix socket per plugin.

Threads, greenlets and who answers what (why: reference §2.1/§3.3/§3.4, the stock server's
failure modes, and the cost of thread handoffs on the hot path):

- one event loop (the *hub*) that accepts on every plugin socket and reads every Kong
  connection with epoll and owns the greenlets of the events whose HandleEvent it read. A
  thread per connection spent most of a round trip handing the GIL between threads;
- a handler runs as a greenlet (no monkey-patching): a Step for it switches straight into it, it
  runs until its next PDK call, packs the callback frame and switches back; the hub sends it.
  No queue, no second thread on the hot path;
- a handler that waits (a Redis reply, an embedding batch, a remote call) waits through
  aigov.cooperative: the hub parks it and serves other events until its socket is readable, its
  future is done or its timeout passed. The library's blocking points (aigov.redis_client,
  aigov.embeddings) do so;
- a handler that blocks the thread anyway (code that ignores aigov.cooperative) holds up every
  connection, but only for `loop_stall_timeout` (0.5 s): the watchdog then moves the hub's
  connections to a new hub thread; the old hub keeps only its greenlets and exits once they are
  done. The same hand-over, later, covers a handler stuck past the step timeout;
- Kong may send an event's next Step on another pooled connection, which after a hand-over may
  be read by another hub: that hub posts the Step to the owner's inbox and wakes it; the owner
  resumes the greenlet and answers on the connection that asked (every send holds that
  connection's send lock);
- step timeout: each accepted request has a deadline. A watchdog answers an overdue request with
  an error (the claim of a request and its send happen under the connection's send lock, so
  exactly one reply goes out) and closes the event. An overdue handler still running on its hub
  has had that hub's connections moved away already (the stall hand-over above);
- the event table loses an entry on "ret", on a terminal call (kong.response.exit/error, after
  which Kong never steps again), on a handler exception (answered "ret": the request continues),
  when a reply cannot be delivered, on a step timeout, and by the reaper after `event_timeout` of
  silence or shortly after the connection it last used died. Closing happens under the lock
  that accepts Steps, in the same critical section as the decision to close (the watchdog's
  claim, the reaper's test) and before the error is sent, so a Step is either accepted and
  answered or told "event id N not found", never left unanswered. A closed event's greenlet gets
  EventClosedError thrown at its pending PDK call or cooperative wait, and any later PDK call
  raises at once;
- instance and event ids start at a time-based offset so ids from a previous process answer
  "no plugin instance #N" (Kong then re-creates) instead of hitting another config.

What this asks of plugin code (the aigov plugins comply): PDK calls are made from the handler
itself, not from threads it starts (refused with a clear RuntimeError); a handler must not hold
a lock across a PDK call or a cooperative wait, since the hub may run another event's handler,
which could need that lock, on the same thread meanwhile; and waits should go through
aigov.cooperative (blocking I/O is correct but stalls the loop, up to the hand-over).
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import select
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import greenlet
import msgpack

from aigov.server import protocol
from aigov.server.loader import LoadedPlugin

log = logging.getLogger("aigov.server")

_monotonic = time.monotonic
_TERMINAL_METHODS = protocol.TERMINAL_METHODS
_POLLIN = select.POLLIN
_POLL_ERRORS = select.POLLERR | select.POLLHUP | select.POLLNVAL
# Unix socket buffers: an 8 MB exit body goes out in a few large writes instead of many wakeups.
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
# Per-connection receive buffer (recv_into): Kong pools up to 256 connections per worker, so
# this is kept moderate; a larger frame simply takes several reads.
RECV_BUFFER_BYTES = 32 * 1024
# How long a hub sleeps in epoll when nothing arrives (only bounds its reaction to shutdown).
_IDLE_POLL_S = 1.0
_INFINITY = float("inf")
# Reusable handler greenlets kept per hub (a hub rarely runs more than a few events at once).
_IDLE_GREENLETS = 16


_NOWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_SEND_NOWAIT = _NOWAIT | getattr(socket, "MSG_NOSIGNAL", 0)


class PluginServerError(Exception):
    """An RPC that fails; str(exc) is what Kong receives as the error."""


class EventClosedError(RuntimeError):
    """A PDK call on an event Kong will never step again (after exit, abandoned, shut down)."""


class PDKError(Exception):
    """A PDK call Kong answered with StepError (python-style returns only)."""


def _id_offset() -> int:
    """Ids from a previous process must not collide with ours (§2.7): start at time-in-ms x 1000.

    A process would need 1000 ids per millisecond of its lifetime to reach the next process's
    range; the value stays below 2^53, which Kong's Lua numbers hold exactly.
    """
    return int(time.time() * 1000) * 1000


# --------------------------------------------------------------------------------------------
# Instances and events


@dataclass
class Instance:
    id: int
    plugin: LoadedPlugin
    config: dict[str, Any]
    handler: Any
    start_time: float = field(default_factory=time.time)

    def status(self) -> dict[str, Any]:
        """InstanceStatus / GetStatus: the config with the schema's `encrypted` fields (Redis
        passwords, API keys) masked. Kong does not read them back, and anyone who can reach the
        socket should not learn credentials from a status call."""
        return {"Name": self.plugin.name, "Id": self.id,
                "Config": _masked(self.config, _secret_names(self.plugin.schema)),
                "StartTime": self.start_time}


def _secret_names(schema: Any) -> frozenset[str]:
    """Names of the fields a Kong schema marks `encrypted`, at any depth."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, spec in node.items():
                if isinstance(spec, dict):
                    if spec.get("encrypted"):
                        names.add(name)
                    walk(spec.get("fields"))
                    walk(spec.get("elements"))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return frozenset(names)


def _masked(value: Any, secret_names: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: ("<redacted>" if k in secret_names and v not in (None, "") else _masked(v, secret_names))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, secret_names) for v in value]
    return value


# What a handler greenlet hands its hub when it switches back or finishes.
_RET = object()  # returned normally


class _Terminal:
    """A terminal callback (exit/error): send it, then let the handler run to its end."""

    __slots__ = ("frame",)

    def __init__(self, frame: bytes) -> None:
        self.frame = frame


class _Failed:
    """The handler raised; `text` is the traceback."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class Event:
    """One phase run of one instance: a greenlet on its owner hub, Kong's requests on the other side.

    `waiting` is True while a request (HandleEvent or Step) for the event awaits its reply; the
    request's connection and msgid are `reply_conn`/`reply_msgid`, its deadline `deadline`.
    Whoever clears `waiting` under the connection's send lock (the hub or the watchdog) answers.
    """

    __slots__ = ("id", "instance", "phase", "owner", "greenlet", "closed", "waiting", "reply_conn",
                 "reply_msgid", "deadline", "last_activity", "last_conn", "orphaned_at", "parked")

    def __init__(self, event_id: int, instance: Instance, phase: str) -> None:
        self.id = event_id
        self.instance = instance
        self.phase = phase
        self.owner: Hub | None = None
        self.greenlet: greenlet.greenlet | None = None
        self.closed = False  # set once Kong will never step this event again
        self.waiting = False
        self.reply_conn: Connection | None = None
        self.reply_msgid = 0
        self.deadline = 0.0
        self.last_activity = _monotonic()
        self.last_conn = 0
        self.orphaned_at: float | None = None
        self.parked: _Park | None = None  # a cooperative wait in progress (owner hub only)

    def describe(self) -> str:
        return f"event #{self.id} ({self.instance.plugin.name}.{self.phase})"


class _PDKNode(tuple):
    """One PDK path bound to one event: the 1-tuple (channel,), built in C (tuple construction).

    Every event gets its own objects (a `kong` kept past its event can only raise, never reach
    another request), but each *path* is a class: `kong.request` is a cached descriptor on the
    class of "kong" that builds an instance of the class of "kong.request". A plain
    `__getattr__` proxy pays a failed attribute lookup (an AttributeError inside CPython) on
    every access, about 3x the cost; here it only runs for a name not seen before on that path.
    Path classes derive from this base only, never from each other, so no path inherits
    another path's children.
    """

    __slots__ = ()
    _path = "kong"

    def __getattr__(self, name: str) -> "_PDKNode":
        if name.startswith("__"):
            raise AttributeError(name)  # copy/pickle/inspect probes are not PDK calls
        owner = type(self)
        child = _PDKChild(name)
        with _PATH_CLASS_LOCK:
            if _PATH_CLASS_COUNT[0] < _MAX_PATH_CLASSES:
                child = owner.__dict__.get(name) or child
                setattr(owner, name, child)
        return child.__get__(self, owner)

    def __call__(self, *args: Any) -> Any:
        return self[0].call(self._path, args)

    def __repr__(self) -> str:
        return f"<PDK {self._path}>"


class _PDKChild:
    """Class attribute of one path class: `node.<name>` is the node of "<path>.<name>"."""

    __slots__ = ("name", "node_class")

    def __init__(self, name: str) -> None:
        self.name = name
        self.node_class: type[_PDKNode] | None = None

    def __get__(self, node: _PDKNode | None, owner: type[_PDKNode]) -> Any:
        if node is None:
            return self
        node_class = self.node_class
        if node_class is None:
            node_class = self.node_class = _path_class(f"{owner._path}.{self.name}")
        return node_class((node[0],))


_PATH_CLASS_LOCK = threading.Lock()
_PATH_CLASS_COUNT = [0]
# Path classes are shared by all events; a plugin that invents unbounded attribute names gets
# uncached (slower, still correct) nodes past this many paths.
_MAX_PATH_CLASSES = 4096


def _path_class(path: str) -> type[_PDKNode]:
    with _PATH_CLASS_LOCK:
        _PATH_CLASS_COUNT[0] += 1
    # tuple's own `count`/`index` would shadow PDK names: make them path children too.
    return type("PDKProxy", (_PDKNode,), {"__slots__": (), "_path": path,
                                          "count": _PDKChild("count"), "index": _PDKChild("index")})


# The `kong` object a handler receives: PDKProxy((channel,)). Any attribute chain, called,
# becomes a callback; it behaves like kong-pdk's FakeClasses/rpc_of (log args stringified,
# exit/error not awaited, lua-style `(data, err)` returns by default), but never blocks forever:
# it raises once the event is over.
PDKProxy = _path_class("kong")


class _HandlerChannel:
    """The handler side of an event: packs callbacks and switches to the hub for the answer."""

    __slots__ = ("event", "lua_style")

    def __init__(self, event: Event, lua_style: bool) -> None:
        self.event = event
        self.lua_style = lua_style

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        event = self.event
        if event.closed:
            raise EventClosedError(
                f"PDK call {method} after event #{event.id} ended "
                "(kong.response.exit/error was called, or Kong abandoned the event)")
        if method.startswith("kong.log") and (len(method) == 8 or method[8] == "."):
            # Same sanitizing as kong-pdk: Kong can only log what it can unpack.
            args = tuple(a if type(a) in (str, int, list, dict) else str(a) for a in args)
        hub = event.owner
        if hub is None or greenlet.getcurrent() is not event.greenlet:
            raise RuntimeError(f"PDK call {method} from outside event #{event.id}'s handler "
                               "(another thread or greenlet); call the PDK from the handler itself")
        # The whole reply frame, packed here so an unserializable argument raises TypeError in
        # the handler (not in the hub), and an 8 MB exit body is packed exactly once.
        frame = hub.packer.pack([protocol.RESPONSE, event.reply_msgid, None,
                                 {"Data": {"Method": method, "Args": list(args)}, "EventId": event.id}])
        if method in _TERMINAL_METHODS:
            # Kong never answers exit/error: from here on every PDK call raises at once.
            event.closed = True
            hub.main.switch(_Terminal(frame))
            return None
        data, err = hub.main.switch(frame)  # EventClosedError is thrown here if abandoned
        if self.lua_style:
            return data, err
        if err:
            raise PDKError(f"exception from {method}: {err}")
        return data


def _handler_loop(job: tuple[Callable[[Any], Any], PDKProxy] | None) -> None:
    """A pooled handler greenlet: one handler per job, then back to the hub for the next job.

    Creating a greenlet costs about 15x a switch, so hubs reuse them; None ends the loop. The
    finished handler is reported as _RET or _Failed, and no exception ever reaches the hub.
    """
    while job is not None:
        method, kong = job
        try:
            method(kong)
            result: Any = _RET
        except BaseException:  # noqa: BLE001 - SystemExit in a handler must not end the server
            result = _Failed(traceback.format_exc())
        del job, method, kong  # an idle greenlet must not keep the last event alive
        job = greenlet.getcurrent().parent.switch(result)


# --------------------------------------------------------------------------------------------
# The server


class PluginServer:
    def __init__(
        self,
        plugins: dict[str, LoadedPlugin],
        *,
        lua_style: bool = True,
        max_workers: int = 2048,
        step_timeout: float = 55.0,
        event_timeout: float = 65.0,
        orphan_grace: float = 2.0,
        loop_stall_timeout: float = 0.5,
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.plugins = dict(plugins)
        self.plugin_dir: str | None = None
        self.lua_style = lua_style
        self.max_workers = max_workers  # live handlers (events whose handler has not returned)
        # Kong's socket read timeout is 60 s; answering before it avoids a late reply sitting on
        # a pooled connection (msgid mismatch, §2.7).
        self.step_timeout = step_timeout
        self.event_timeout = event_timeout
        self.orphan_grace = orphan_grace
        # A handler that blocks the loop this long (no PDK call, no cooperative wait) gets its
        # hub's connections moved to a new loop thread, so one slow handler cannot stall all.
        self.loop_stall_timeout = min(loop_stall_timeout, step_timeout)
        # Guards the tables, the counters and Event.waiting; never held while a handler runs.
        self._lock = threading.Lock()
        self._instances: dict[int, Instance] = {}
        self._events: dict[int, Event] = {}
        self._hubs: set[Hub] = set()
        self._loop_hub: Hub | None = None  # the hub new connections go to
        self._live_handlers = 0
        offset = _id_offset()
        self._instance_ids = itertools.count(offset)
        self._event_ids = itertools.count(offset)
        self._last_start: dict[str, float] = {}
        self._last_close: dict[str, float] = {}
        self._stopping = threading.Event()
        self.debug = log.isEnabledFor(logging.DEBUG)  # checked once: no logging calls on the hot path

    # ---- non-event RPCs ------------------------------------------------------------------

    def dispatch(self, request: protocol.Request, conn_id: int, plugin_name: str) -> Any:
        """Run one RPC that is not HandleEvent/Step* (a hub runs those); returns the result."""
        if request.namespace != protocol.NAMESPACE:
            raise PluginServerError(f"RPC for {request.namespace} is not supported")
        if request.method not in protocol.METHODS:
            raise PluginServerError(f"method {request.namespace}.{request.method} is not supported")
        params = request.params
        if request.method == "GetStatus":
            return self.get_status()
        if not params:
            raise PluginServerError(f"plugin.{request.method} expects one parameter, got none")
        param = params[0]
        if request.method == "StartInstance":
            return self.start_instance(param, plugin_name)
        if request.method == "CloseInstance":
            return self.close_instance(param)
        if request.method == "InstanceStatus":
            return self.instance(param).status()
        if request.method == "GetPluginInfo":
            if param not in self.plugins:
                raise PluginServerError(f"{param} not initialized")
            return self.plugins[param].info()
        if request.method == "SetPluginDir":
            if not isinstance(param, str) or not os.path.isdir(param):
                raise PluginServerError(f"{param} not exists")
            self.plugin_dir = param  # recorded like kong-pdk; plugins are loaded at start only
            return "ok"
        raise PluginServerError(f"plugin.{request.method} must be sent on a plugin socket")

    # ---- instances -----------------------------------------------------------------------

    def start_instance(self, param: Any, plugin_name: str) -> dict[str, Any]:
        if not isinstance(param, dict):
            raise PluginServerError("plugin.StartInstance expects {Name, Config}")
        name = param.get("Name")
        if not isinstance(name, str) or name not in self.plugins:
            raise PluginServerError(f"{name} not initialized")
        if name != plugin_name:
            raise PluginServerError(f"plugin {name} is not served on the socket of {plugin_name}")
        raw_config = param.get("Config")
        if isinstance(raw_config, dict):
            config = raw_config
        else:
            try:
                config = json.loads(raw_config) if raw_config is not None else {}
            except (TypeError, ValueError) as exc:
                raise PluginServerError(f"StartInstance {name}: Config is not JSON: {exc}") from exc
            if not isinstance(config, dict):
                raise PluginServerError(f"StartInstance {name}: Config must be a JSON object")
        plugin = self.plugins[name]
        try:
            handler = plugin.plugin_class(config)
        except Exception as exc:  # noqa: BLE001 - a broken constructor is an RPC error, not a crash
            log.error("starting an instance of %s failed:\n%s", name, traceback.format_exc())
            raise PluginServerError(f"starting instance of {name} failed: {type(exc).__name__}: {exc}")
        with self._lock:
            iid = next(self._instance_ids)
            instance = Instance(iid, plugin, config, handler)
            self._instances[iid] = instance
            self._last_start[name] = time.time()
        if self.debug:
            log.debug("instance #%d of %s started", iid, name)
        return {"Name": name, "Id": iid, "Config": config, "StartTime": instance.start_time}

    def instance(self, iid: Any) -> Instance:
        instance = self._instances.get(iid) if type(iid) is int else None
        if instance is None:
            # Kong resets its instance cache and retries when the error says "no plugin instance".
            raise PluginServerError(f"no plugin instance #{iid}")
        return instance

    def close_instance(self, iid: Any) -> dict[str, Any]:
        with self._lock:
            instance = self._instances.pop(iid, None) if type(iid) is int else None
            if instance is not None:
                self._last_close[instance.plugin.name] = time.time()
        if instance is None:
            raise PluginServerError(f"no plugin instance #{iid}")
        if self.debug:
            log.debug("instance #%d of %s closed", iid, instance.plugin.name)
        return {"Name": instance.plugin.name, "Id": iid, "Config": instance.config}

    def get_status(self) -> dict[str, Any]:
        with self._lock:
            instances = list(self._instances.values())
            events = len(self._events)
            workers = {"max": self.max_workers, "threads": len(self._hubs),
                       "busy": self._live_handlers}
        plugins = {}
        for name, plugin in self.plugins.items():
            plugins[name] = {
                "Name": name,
                "Modtime": plugin.mtime,
                "LoadTime": plugin.load_time,
                "Instances": [i.status() for i in instances if i.plugin.name == name],
                "LastStartInstance": self._last_start.get(name, 0),
                "LastCloseInstance": self._last_close.get(name, 0),
            }
        # Pid and Plugins are kong-pdk's shape; Events and Workers are ours (observability):
        # Workers.threads counts connection hubs, Workers.busy the handlers that have not returned.
        return {"Pid": os.getpid(), "Plugins": plugins, "Events": events, "Workers": workers}

    # ---- events --------------------------------------------------------------------------

    def new_event(self, param: Any, plugin_name: str) -> tuple[Event, Callable[[Any], Any]]:
        """Validate a HandleEvent and register its event (counted as a live handler)."""
        if type(param) is not dict:
            raise PluginServerError("plugin.HandleEvent expects {InstanceId, EventName}")
        instance = self.instance(param.get("InstanceId"))
        if instance.plugin.name != plugin_name:
            raise PluginServerError(f"no plugin instance #{instance.id}")
        phase = param.get("EventName")
        if type(phase) is not str or phase not in instance.plugin.phases:
            raise PluginServerError(
                f"{instance.plugin.name} does not implement phase {phase!r}")
        method = getattr(instance.handler, phase, None)
        if not callable(method):
            raise PluginServerError(f"{instance.plugin.name} does not implement phase {phase!r}")
        with self._lock:
            if self._live_handlers >= self.max_workers:
                raise PluginServerError(
                    f"plugin server overloaded: all {self.max_workers} handler workers are busy")
            self._live_handlers += 1
            event = Event(next(self._event_ids), instance, phase)
            self._events[event.id] = event
        return event, method

    def accept_step(self, param: Any, conn: "Connection", msgid: int) -> Event:
        """Validate a Step* request and mark its event as waiting for the reply to it."""
        if type(param) is not dict:
            raise PluginServerError("plugin.Step expects {EventId, Data}")
        eid = param.get("EventId")
        with self._lock:
            event = self._events.get(eid) if type(eid) is int else None
            if event is not None and event.closed:
                event = None  # exit/error was called: Kong never steps it again
            if event is not None:
                if event.waiting:
                    raise PluginServerError(f"event id {eid} already has a step in progress")
                now = _monotonic()
                event.reply_conn = conn
                event.reply_msgid = msgid
                event.deadline = now + self.step_timeout
                event.last_activity = now
                event.last_conn = conn.id
                event.orphaned_at = None
                event.waiting = True  # last: the watchdog reads the fields above once it sees this
        if event is None:
            raise PluginServerError(f"event id {eid} not found")
        return event

    def handler_finished(self) -> None:
        with self._lock:
            self._live_handlers -= 1

    def forget_event(self, event: Event) -> None:
        """Remove an event from the table and mark it closed (called by its owner hub)."""
        with self._lock:
            self._forget_locked(event)

    def _forget_locked(self, event: Event) -> None:
        # Under _lock, like accept_step: a Step is either accepted before the close (and then
        # answered: its `waiting` is seen by whoever closes) or finds no event, never both.
        event.closed = True
        self._events.pop(event.id, None)

    def close_event(self, event: Event) -> None:
        """Close an event from any thread: its owner throws EventClosedError into the handler."""
        self.forget_event(event)
        self._tell_owner_closed(event)

    @staticmethod
    def _tell_owner_closed(event: Event) -> None:
        owner = event.owner
        if owner is not None:
            owner.post(event, _CLOSE)

    def connection_closed(self, conn_id: int) -> None:
        """Events last served on a dead connection are reaped after a grace period.

        Kong may send the next Step on another pooled connection, hence the grace period rather
        than an immediate drop.
        """
        now = _monotonic()
        with self._lock:
            for event in self._events.values():
                if event.last_conn == conn_id and event.orphaned_at is None:
                    event.orphaned_at = now

    def reap(self) -> int:
        """Close events Kong has gone silent on (no request waiting for them)."""
        now = _monotonic()
        with self._lock:
            # An event with a request waiting is live (bounded by the step timeout instead). The
            # test and the close are one critical section: a Step accepted in between would be
            # left waiting on a closed event that nobody answers.
            dead = [e for e in self._events.values() if not e.waiting and (
                now - e.last_activity > self.event_timeout
                or (e.orphaned_at is not None and now - e.orphaned_at > self.orphan_grace))]
            for event in dead:
                self._forget_locked(event)
        for event in dead:
            log.warning("reaped abandoned %s", event.describe())
            self._tell_owner_closed(event)
        return len(dead)

    def watch(self) -> int:
        """Answer requests overdue by the step timeout; free sockets of hubs stuck in a handler."""
        now = _monotonic()
        with self._lock:
            overdue = [e for e in self._events.values() if e.waiting and e.deadline < now]
            hubs = list(self._hubs)
        answered = 0
        for event in overdue:
            conn = event.reply_conn
            if conn is None:
                continue
            with conn.send_lock:
                # The claim (send_lock: exactly one reply) and the close (_lock, which
                # accept_step holds) are one step, and both precede the send: once Kong has the
                # error, a further Step for the event gets "not found". Closing after the send
                # let such a Step be accepted in between and then never be answered.
                with self._lock:
                    if not (event.waiting and event.reply_conn is conn and event.deadline < now):
                        continue  # answered meanwhile
                    event.waiting = False
                    self._forget_locked(event)
                message = (f"{event.describe()}: the handler neither called the PDK nor returned "
                           f"within {self.step_timeout:g}s")
                conn.send_locked(msgpack.packb([protocol.RESPONSE, event.reply_msgid, message, None]))
            answered += 1
            log.error("%s: no PDK call or return within %gs; answered an error", event.describe(),
                      self.step_timeout)
            self._tell_owner_closed(event)
        for hub in hubs:
            hub.release_connections_if_stuck(now - self.loop_stall_timeout)
        return answered

    def adopt(self, item: "Connection | SocketListener") -> None:
        """Give a listening socket or a connection to the loop hub (started on first use)."""
        while True:
            if self.stopping:
                raise PluginServerError("the plugin server is stopping")
            with self._lock:
                hub = self._loop_hub
                fresh = hub is None or not hub.accepting
                if fresh:
                    hub = self._loop_hub = Hub(self)
            if fresh:
                hub.start()
            if hub.adopt(item):
                return

    def loop_hub_replaced(self, old: "Hub", successor: "Hub") -> None:
        with self._lock:
            if self._loop_hub is old:
                self._loop_hub = successor

    def hub_started(self, hub: "Hub") -> None:
        with self._lock:
            self._hubs.add(hub)

    def hub_stopped(self, hub: "Hub") -> None:
        with self._lock:
            self._hubs.discard(hub)

    def wait_for_hubs(self, timeout: float) -> bool:
        """After stop(): True once every hub thread ended (bounded by `timeout`)."""
        deadline = _monotonic() + timeout
        while True:
            with self._lock:
                if not self._hubs:
                    return True
            if _monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def event_count(self) -> int:
        with self._lock:
            return len(self._events)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            events = list(self._events.values())
            hubs = list(self._hubs)
        for event in events:
            self.close_event(event)
        for hub in hubs:
            hub.wake()


_CLOSE = object()  # inbox value: throw EventClosedError into the event's handler


# --------------------------------------------------------------------------------------------
# Connections and hubs


class Connection:
    """One accepted Kong connection: its socket, its stream decoder and its send lock.

    Any hub may answer on it (a Step forwarded to the event's owner is answered on the
    connection that asked), so every send holds `send_lock`; only its current reader hub recvs.
    """

    __slots__ = ("sock", "id", "plugin_name", "listener", "send_lock", "unpacker", "buffer", "view",
                 "dead", "reader", "fd")

    def __init__(self, sock: socket.socket, conn_id: int, plugin_name: str,
                 listener: "SocketListener") -> None:
        self.sock = sock
        self.id = conn_id
        self.plugin_name = plugin_name
        self.listener = listener
        self.send_lock = threading.Lock()
        self.unpacker = protocol.new_unpacker()
        self.buffer = bytearray(RECV_BUFFER_BYTES)
        self.view = memoryview(self.buffer)
        self.dead = False
        self.reader: Hub | None = None  # the hub that reads it (Hub.conns, state_lock)
        self.fd = -1  # its key in the reader's `conns`

    def send(self, payload: bytes) -> bool:
        with self.send_lock:
            return self.send_locked(payload)

    def send_locked(self, payload: bytes) -> bool:
        """Send with `send_lock` held; False (and the connection counts as dead) on failure."""
        if self.dead:
            return False
        # One non-blocking send first: a reply nearly always fits the socket buffer, and then
        # the loop never waits. (The socket methods release the GIL around the call, which costs
        # little now that one loop thread does the sends, and less than a ctypes call.)
        try:
            try:
                sent = self.sock.send(payload, _SEND_NOWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(payload):
                return True
            self.sock.sendall(memoryview(payload)[sent:])  # an 8 MB exit body arrives whole (§3.4.2)
            return True
        except OSError:
            self.dead = True
            return False

    def recv_ready(self) -> int:
        """Read what poll() said is there into `buffer`: bytes read, 0 at EOF, -1 for nothing yet.

        Raises OSError for a broken connection.
        """
        # No lock: only the reader hub reads, and only the reader (or the watchdog after taking
        # the connection away from it) closes.
        try:
            return self.sock.recv_into(self.buffer, RECV_BUFFER_BYTES, _NOWAIT)
        except (BlockingIOError, InterruptedError):
            return -1

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # unblocks a send in progress on another thread
        except OSError:
            pass
        with self.send_lock:
            self.dead = True
            try:
                self.sock.close()
            except OSError:
                pass


class _Park:
    """A handler waiting cooperatively (aigov.cooperative): for `fd` to be readable, for `future`
    to be done, or (neither) only for `deadline`. The same object comes back in the inbox as the
    wakeup of a future, so a late wakeup for a wait that already ended is recognised."""

    __slots__ = ("fd", "future", "deadline")

    def __init__(self, fd: int | None, future: Any, deadline: float) -> None:
        self.fd, self.future, self.deadline = fd, future, deadline


class _HandlerGreenlet(greenlet.greenlet):
    """A pooled handler greenlet; `cooperative_loop` is how aigov.cooperative finds its hub."""

    def __init__(self, hub: "Hub") -> None:
        super().__init__(_handler_loop, parent=hub.main)
        self.cooperative_loop = hub


_hub_ids = itertools.count(1)


class Hub:
    """The event loop: one thread that reads Kong connections (epoll) and runs the greenlets of
    the events whose HandleEvent it read.

    One hub watches every listening socket and serves every connection (PluginServer.adopt).
    A second one appears only when a handler keeps this one busy past `loop_stall_timeout`: its
    sockets and connections then move to a successor (`released`), and this hub keeps only its
    greenlets and exits once they are done.

    `conns` (fd -> connection) changes under `state_lock` (the watchdog takes it over); a
    connection is read only by the hub named in its `reader`.
    """

    def __init__(self, server: PluginServer) -> None:
        self.server = server
        self.name = f"aigov-loop-{next(_hub_ids)}"
        self.conns: dict[int, Connection] = {}
        self.listening: dict[int, SocketListener] = {}  # fd -> listening socket (state_lock)
        # Handed over, not yet registered: connections and listening sockets (state_lock).
        self.incoming: collections.deque[Connection | SocketListener] = collections.deque()
        self.released = False  # the connections went to a successor; it adopts no more
        self.registered: set[int] = set()  # conn + listener fds in this hub's epoll (hub thread only)
        self.inbox: collections.deque[tuple[Event, Any]] = collections.deque()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.poller: Any = None
        self.packer = protocol.new_packer()  # shared by this thread's greenlets: pack() never switches
        self.main: greenlet.greenlet | None = None
        self.owned = 0  # handlers started here that have not returned
        self.idle_greenlets: list[greenlet.greenlet] = []  # finished, reusable (_handler_loop)
        self.fd_waits: dict[int, Event] = {}  # parked on a readable fd (hub thread only)
        self.deadlines: dict[Event, float] = {}  # parked with a timeout (hub thread only)
        # [monotonic start] while a handler runs on this hub, emptied when it switches back (see
        # _switch): the watchdog finds hubs whose connections would otherwise go unread.
        self.busy: list[float] = []
        self.state_lock = threading.Lock()
        self._exited = False

    def start(self) -> None:
        self.server.hub_started(self)
        try:
            threading.Thread(target=self._run, name=self.name, daemon=True).start()
        except BaseException:
            self.server.hub_stopped(self)
            os.close(self.wake_fd)
            raise

    # ---- called from other threads -------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return not (self.released or self._exited)

    def adopt(self, item: "Connection | SocketListener") -> bool:
        """Serve `item` from now on; False if this hub no longer takes any."""
        with self.state_lock:
            if not self.accepting:
                return False
            self.incoming.append(item)
        self.wake()
        return True

    def post(self, event: Event, value: Any) -> None:
        """Hand this hub a Step value, _CLOSE or a _Park wakeup for one of its events."""
        self.inbox.append((event, value))
        self.wake()

    def wake(self) -> None:
        with self.state_lock:
            if not self._exited:  # the eventfd is closed (and its number reusable) after exit
                try:
                    os.eventfd_write(self.wake_fd, 1)
                except OSError:
                    pass

    def release_connections_if_stuck(self, cutoff: float) -> None:
        """If a handler has kept this hub busy since before `cutoff`, serve its connections
        from a successor hub."""
        busy = self.busy
        try:
            if busy[0] > cutoff:
                return
        except IndexError:
            return  # not running a handler
        try:
            busy.pop()  # claims the switch: from now on this hub reads no connection
        except IndexError:
            return  # the handler switched back meanwhile
        with self.state_lock:
            self.released = True
            moving = list(self.listening.values()) + list(self.conns.values()) + list(self.incoming)
            conn_count = len(self.conns) + sum(1 for i in self.incoming if type(i) is Connection)
            self.conns = {}
            self.listening = {}
            self.incoming = collections.deque()
            for item in moving:
                if type(item) is Connection:
                    item.reader = None
        if not moving:
            return
        log.warning("a handler has run for more than %gs without a PDK call or a cooperative wait; "
                    "a new loop thread now serves its %d connection(s)",
                    self.server.loop_stall_timeout, conn_count)
        try:
            successor = Hub(self.server)
            successor.incoming = collections.deque(moving)
            self.server.loop_hub_replaced(self, successor)
            successor.start()
        except Exception:  # noqa: BLE001 - no thread: close them rather than leave them unread
            log.exception("no thread to serve %d connection(s); closing them", conn_count)
            for item in moving:
                if type(item) is Connection:
                    item.close()
                    item.listener.connection_closed(item.id)
                    self.server.connection_closed(item.id)

    # ---- on a handler greenlet (aigov.cooperative.Loop) ----------------------------------

    def park(self, fd: int | None, future: Any, timeout: float | None) -> bool:
        current = greenlet.getcurrent()
        if getattr(current, "cooperative_loop", None) is not self:
            raise RuntimeError("a cooperative wait from outside this loop's handlers")
        deadline = _INFINITY if timeout is None else _monotonic() + max(0.0, timeout)
        return self.main.switch(_Park(fd, future, deadline))

    # ---- the hub thread -------------------------------------------------------------------

    def _run(self) -> None:
        self.main = greenlet.getcurrent()
        poller = self.poller = select.epoll()
        wake_fd = self.wake_fd
        poller.register(wake_fd, _POLLIN)
        try:
            while True:
                if self.incoming:
                    self._adopt_incoming()
                if self.released and self.registered:
                    for fd in self.registered:
                        poller.unregister(fd)
                    self.registered.clear()
                if self.inbox:
                    self._drain_inbox()
                # Sockets are polled on every pass, also while the inbox keeps filling (then
                # without waiting), so no connection and no parked wait starves.
                if self.inbox:
                    timeout = 0.0
                elif self.deadlines:
                    timeout = max(0.0, min(_IDLE_POLL_S, min(self.deadlines.values()) - _monotonic()))
                elif self.owned == 0 and not self.conns and not self.incoming and (
                        self.released or self.server.stopping):
                    return
                else:
                    timeout = _IDLE_POLL_S
                polled_at = _monotonic()
                try:
                    ready = poller.poll(timeout)
                except InterruptedError:
                    continue
                for fd, _mask in ready:
                    if fd == wake_fd:
                        try:
                            os.eventfd_read(wake_fd)
                        except BlockingIOError:
                            pass
                        continue
                    conn = self.conns.get(fd)
                    if conn is not None:
                        if conn.reader is self and not self._read(conn) and conn.reader is self:
                            self._close_connection(conn)
                    elif fd in self.listening:
                        self._accept(self.listening[fd])
                    else:
                        event = self.fd_waits.get(fd)
                        if event is not None:
                            self._unpark(event)
                            self._drive(event, True, None)
                    if self.released:
                        break  # the rest of `ready` belongs to the successor now
                if self.deadlines:
                    # Only waits already due when this poll began: their sockets were looked at
                    # after the deadline. A wait that fell due while handlers ran here (its
                    # reply may have come meanwhile) gets a fresh poll first, next pass.
                    self._expire_parked(polled_at)
        except BaseException:  # noqa: BLE001 - a hub bug must not pass silently
            log.exception("%s failed", self.name)
            for conn in list(self.conns.values()):
                if conn.reader is self:
                    self._close_connection(conn)
        finally:
            with self.state_lock:
                self._exited = True
                os.close(self.wake_fd)
                orphans = self.incoming
                self.incoming = collections.deque()
            for item in orphans:  # handed over as we exited: nobody will read them
                if type(item) is Connection:
                    item.close()
                    item.listener.connection_closed(item.id)
            poller.close()
            for handler in self.idle_greenlets:
                handler.switch(None)  # end them on their own thread
            self.idle_greenlets.clear()
            self.server.hub_stopped(self)

    def _adopt_incoming(self) -> None:
        while True:
            with self.state_lock:
                if self.released or not self.incoming:
                    return
                item = self.incoming.popleft()
                if type(item) is not Connection:
                    fd = item.fileno()
                    if fd >= 0:
                        self.listening[fd] = item
                        self.poller.register(fd, _POLLIN)
                        self.registered.add(fd)
                    continue
            # A connection taken over from a stuck hub may hold complete frames already read.
            if self._take(item) and not self._answer_frames(item) and item.reader is self:
                self._close_connection(item)

    def _take(self, conn: Connection) -> bool:
        """Read `conn` from now on; False if it is closed already."""
        with self.state_lock:
            fd = -1 if conn.dead else conn.sock.fileno()
            if fd >= 0:
                conn.reader = self
                conn.fd = fd
                self.conns[fd] = conn
        if fd < 0:
            conn.listener.connection_closed(conn.id)
            self.server.connection_closed(conn.id)
            return False
        self.poller.register(fd, _POLLIN)
        self.registered.add(fd)
        return True

    def _accept(self, listener: SocketListener) -> None:
        """Accept what Kong has queued on a listening socket; every connection is read here."""
        for conn in listener.accept_ready():
            self._take(conn)
        if listener.closing:
            with self.state_lock:
                fd = next((k for k, v in self.listening.items() if v is listener), -1)
                self.listening.pop(fd, None)
            if fd in self.registered:
                self.registered.discard(fd)
                try:
                    self.poller.unregister(fd)
                except (OSError, ValueError):
                    pass

    def _close_connection(self, conn: Connection) -> None:
        with self.state_lock:
            if conn.reader is not self:
                return
            conn.reader = None
            fd = conn.fd
            if self.conns.get(fd) is conn:
                del self.conns[fd]
                if fd in self.registered:
                    self.registered.discard(fd)
                    self.poller.unregister(fd)  # before close: the number may be reused
        conn.close()
        conn.listener.connection_closed(conn.id)
        self.server.connection_closed(conn.id)

    def _read(self, conn: Connection) -> bool:
        """Read what arrived and answer every complete frame; False closes the connection.

        epoll said the socket is readable; the read does not wait (Connection.recv_ready).
        """
        try:
            received = conn.recv_ready()
        except OSError:
            return False
        if received < 0:
            return True  # nothing there after all (a spurious wakeup)
        if not received:
            return False
        try:
            conn.unpacker.feed(conn.view[:received])
        except msgpack.BufferFull:
            log.warning("%s connection %d: a frame larger than %d bytes; closing it",
                        conn.plugin_name, conn.id, protocol.MAX_FRAME_BYTES)
            return False
        return self._answer_frames(conn)

    def _answer_frames(self, conn: Connection) -> bool:
        """Answer every complete frame buffered for `conn`; False closes the connection."""
        answering = False
        try:
            # Iterating ends without an exception object, unlike unpack()'s OutOfData.
            for frame in conn.unpacker:
                answering = True
                if not self._answer(conn, frame):
                    return False
                answering = False
                if conn.reader is not self:
                    return True  # handed to another hub while a handler ran: it reads from now on
        except Exception as exc:  # noqa: BLE001 - any undecodable frame
            if answering:
                log.exception("%s connection %d: answering a frame failed; closing it",
                              conn.plugin_name, conn.id)
            else:
                log.warning("%s connection %d: undecodable msgpack (%s: %s); closing it",
                            conn.plugin_name, conn.id, type(exc).__name__, exc)
            return False
        return True

    def _answer(self, conn: Connection, frame: Any) -> bool:
        """Answer one frame; False closes the connection."""
        if type(frame) is list and len(frame) == 4 and frame[0] == 0:
            # The hot path: Kong's Step and HandleEvent, checked without building a Request.
            msgid, method, params = frame[1], frame[2], frame[3]
            if type(msgid) is int and type(params) is list and len(params) == 1:
                if method == "plugin.Step":
                    return self._step(conn, msgid, params[0], False)
                if method == "plugin.HandleEvent":
                    return self._handle_event(conn, msgid, params[0])
        if isinstance(frame, (list, tuple)) and frame and frame[0] == protocol.NOTIFICATION:
            return True  # nothing to answer
        try:
            request = protocol.parse_request(frame)
        except protocol.ProtocolError as exc:
            if exc.msgid is None:
                log.warning("%s connection %d: %s; closing it", conn.plugin_name, conn.id, exc)
                return False
            return self._send_error(conn, exc.msgid, str(exc))
        name = request.method
        if request.namespace == protocol.NAMESPACE and request.params and (
                name == "HandleEvent" or name in protocol.STEP_METHODS):
            if name == "HandleEvent":
                return self._handle_event(conn, request.msgid, request.params[0])
            return self._step(conn, request.msgid, request.params[0], name == "StepError")
        server = self.server
        try:
            result = server.dispatch(request, conn.id, conn.plugin_name)
            payload = protocol.pack_response(self.packer, request.msgid, None, result)
        except PluginServerError as exc:
            if server.debug:
                log.debug("rpc #%d %s.%s: %s", request.msgid, request.namespace, name, exc)
            payload = protocol.pack_response(self.packer, request.msgid, str(exc), None)
        except Exception as exc:  # noqa: BLE001 - a bug here must cost one reply, not the connection
            log.error("rpc #%d %s.%s failed:\n%s", request.msgid, request.namespace, name,
                      traceback.format_exc())
            payload = protocol.pack_response(self.packer, request.msgid,
                                             f"{type(exc).__name__}: {exc}", None)
        return conn.send(payload)

    def _send_error(self, conn: Connection, msgid: int, message: str) -> bool:
        if self.server.debug:
            log.debug("rpc #%d: %s", msgid, message)
        return conn.send(self.packer.pack([protocol.RESPONSE, msgid, message, None]))

    def _handle_event(self, conn: Connection, msgid: int, param: Any) -> bool:
        server = self.server
        try:
            event, method = server.new_event(param, conn.plugin_name)
        except PluginServerError as exc:
            return self._send_error(conn, msgid, str(exc))
        now = _monotonic()
        event.owner = self
        event.reply_conn = conn
        event.reply_msgid = msgid
        event.deadline = now + server.step_timeout
        event.last_activity = now
        event.last_conn = conn.id
        event.waiting = True  # last: the watchdog reads the fields above once it sees this
        kong = PDKProxy((_HandlerChannel(event, server.lua_style),))
        idle = self.idle_greenlets
        event.greenlet = idle.pop() if idle else _HandlerGreenlet(self)
        self.owned += 1
        self._drive(event, (method, kong), None)
        return not conn.dead

    def _step(self, conn: Connection, msgid: int, param: Any, is_error: bool) -> bool:
        try:
            event = self.server.accept_step(param, conn, msgid)
        except PluginServerError as exc:
            return self._send_error(conn, msgid, str(exc))
        data = param.get("Data")
        value = (None, data) if is_error else (data, None)
        owner = event.owner
        if owner is self:
            self._drive(event, value, None)
        else:
            owner.post(event, value)  # greenlets run only on their own thread
        return not conn.dead

    def _drain_inbox(self) -> None:
        inbox = self.inbox
        while inbox:
            event, value = inbox.popleft()
            if type(value) is _Park:
                if event.parked is value:  # else the wait ended otherwise (timeout, close)
                    self._unpark(event)
                    self._drive(event, True, None)
                continue
            if event.greenlet is None:
                # The handler returned meanwhile (its greenlet may serve another event).
                if value is not _CLOSE:
                    self._answer_if_still_waiting(event)
                continue
            if value is _CLOSE or event.closed:
                self._unpark(event)
                self._drive(event, None, _abandoned(event))
            else:
                self._drive(event, value, None)

    def _switch(self, event: Event, value: Any, throw: BaseException | None) -> Any:
        """Run the event's handler until it hands something back.

        `busy` holds the switch's start time; exactly one of this hub (after the switch) and the
        watchdog (a handler stuck past the step timeout) pops it (list.pop is atomic), and the
        watchdog only hands the socket to a new hub if it popped first. No lock per switch.
        """
        handler = event.greenlet
        assert handler is not None
        busy = [_monotonic()]
        self.busy = busy
        try:
            if throw is not None:
                return handler.throw(throw)
            return handler.switch(value)
        finally:
            try:
                busy.pop()
            except IndexError:
                self._connections_taken()

    def _connections_taken(self) -> None:
        """The watchdog claimed the switch: whatever it has not moved yet, this hub stops
        reading now (it moves them to the successor when it gets the lock)."""
        with self.state_lock:
            self.released = True
            for conn in self.conns.values():
                conn.reader = None

    # ---- cooperative waits ----------------------------------------------------------------

    def _park(self, event: Event, park: _Park) -> None:
        event.parked = park
        if park.future is not None:
            # Runs on the thread that completes the future (or here, if it is done already).
            park.future.add_done_callback(lambda _future: self.post(event, park))
        elif park.fd is not None:
            try:
                self.poller.register(park.fd, _POLLIN)
            except (OSError, ValueError):
                # Not pollable (closed meanwhile, or watched already): let the read itself tell.
                self.post(event, park)
            else:
                self.fd_waits[park.fd] = event
        if park.deadline < _INFINITY:
            self.deadlines[event] = park.deadline

    def _unpark(self, event: Event) -> None:
        park = event.parked
        if park is None:
            return
        event.parked = None
        self.deadlines.pop(event, None)
        fd = park.fd
        if fd is not None and self.fd_waits.get(fd) is event:
            del self.fd_waits[fd]
            try:
                self.poller.unregister(fd)
            except (OSError, ValueError):
                pass

    def _expire_parked(self, cutoff: float) -> None:
        """Resume the waits whose deadline is at or before `cutoff` with False."""
        due = [event for event, deadline in self.deadlines.items() if deadline <= cutoff]
        for event in due:
            if event.parked is not None:  # not resumed by an earlier one's handler meanwhile
                self._unpark(event)
                self._drive(event, False, None)

    def _drive(self, event: Event, value: Any, throw: BaseException | None) -> None:
        """Resume a handler and act on what it hands back until it waits for Kong or returns.

        `value` is the job (method, kong) for a new event, else the Step's (data, err).
        """
        message = self._switch(event, value, throw)
        if type(message) is bytes and not event.closed:
            # The hot path inline: answer the waiting request; the handler waits for Kong's Step.
            conn = event.reply_conn
            assert conn is not None
            lock = conn.send_lock
            lock.acquire()
            try:
                if event.waiting and not conn.dead:
                    event.waiting = False
                    event.last_activity = _monotonic()
                    if conn.send_locked(message):
                        return
            finally:
                lock.release()
        self._settle(event, message)

    def _settle(self, event: Event, message: Any) -> None:
        """Every case but the hot path: the handler returned, exited, waits cooperatively, or
        cannot be answered."""
        server = self.server
        while True:
            if type(message) is _Park:
                self._park(event, message)
                return
            failed = message if type(message) is _Failed else None
            if message is _RET or failed is not None:
                handler = event.greenlet
                event.greenlet = None
                if len(self.idle_greenlets) < _IDLE_GREENLETS:
                    self.idle_greenlets.append(handler)
                else:
                    handler.switch(None)  # ends its loop
                self.owned -= 1
                server.handler_finished()
                if not event.closed:
                    server.forget_event(event)
                    if failed is not None:
                        log.error("handler %s.%s of event #%d raised; the request continues:\n%s",
                                  event.instance.plugin.name, event.phase, event.id, failed.text)
                    self._reply(event, self.packer.pack(
                        [protocol.RESPONSE, event.reply_msgid, None,
                         {"Data": protocol.MSG_RET, "EventId": event.id}]))
                else:
                    if failed is not None:
                        log.warning("handler %s.%s of event #%d raised after the event ended:\n%s",
                                    event.instance.plugin.name, event.phase, event.id, failed.text)
                    self._answer_if_still_waiting(event)
                return
            if type(message) is _Terminal:
                server.forget_event(event)  # Kong never steps an event after exit/error
                self._reply(event, message.frame)
                # exit/error return None in the handler, which runs on to its end; its PDK calls
                # raise at once, so the next switch back is its return.
                message = self._switch(event, None, None)
                continue
            if not event.closed and self._reply(event, message):
                return  # the handler waits for Kong's next Step
            if not event.closed:
                log.warning("reply for event #%d could not be delivered; dropping the event", event.id)
                server.forget_event(event)
            message = self._switch(event, None, _abandoned(event))

    def _answer_if_still_waiting(self, event: Event) -> None:
        """A request accepted for an event that has since ended gets an error, never silence.

        (Closing under the table lock keeps Steps off closed events; this is the backstop, e.g.
        for requests still waiting when stop() closes every event.)
        """
        if event.waiting:
            self._reply(event, self.packer.pack(
                [protocol.RESPONSE, event.reply_msgid,
                 f"{event.describe()} ended before this request could be answered", None]))

    def _reply(self, event: Event, frame: bytes) -> bool:
        """Answer the event's waiting request, unless the watchdog already did."""
        conn = event.reply_conn
        assert conn is not None
        with conn.send_lock:
            if not event.waiting:
                return False
            event.waiting = False
            event.last_activity = _monotonic()
            return conn.send_locked(frame)


def _abandoned(event: Event) -> EventClosedError:
    return EventClosedError(f"event #{event.id} was abandoned (timed out, reaped or shut down) "
                            "while its handler waited for a PDK reply")


# --------------------------------------------------------------------------------------------
# Sockets


class SocketListener:
    """One Unix socket serving one plugin. The loop hub watches it and accepts (no thread of
    its own: a listener thread competing for the GIL slowed the loop down in connection bursts)."""

    def __init__(self, server: PluginServer, plugin_name: str, path: Path,
                 backlog: int = 4096) -> None:
        self.server = server
        self.plugin_name = plugin_name
        self.path = path
        self.backlog = backlog
        self._sock: socket.socket | None = None
        self._conns: dict[int, Connection] = {}
        self._conns_lock = threading.Lock()
        self._conn_ids = itertools.count(1)
        self._closing = threading.Event()
        self._bound: tuple[int, int] | None = None

    def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # a stale socket from a killed server, as kong-pdk does
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen(self.backlog)
        sock.setblocking(False)
        self._sock = sock
        # The file this process bound: stop() removes only that one (see there).
        st = os.stat(self.path)
        self._bound = (st.st_dev, st.st_ino)
        self.server.adopt(self)
        log.info("serving %s on %s", self.plugin_name, self.path)

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    def fileno(self) -> int:
        return -1 if self._sock is None or self.closing else self._sock.fileno()

    def accept_ready(self, limit: int = 64) -> list[Connection]:
        """Accept up to `limit` queued connections without waiting (the hub calls this when the
        socket is readable; what is left makes it readable again)."""
        accepted: list[Connection] = []
        while len(accepted) < limit and not self.closing and self._sock is not None:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if not self.closing:
                    # EMFILE and the like: the socket stays readable, so pause briefly rather
                    # than spin; the connections already open keep being served.
                    log.warning("%s: accept failed (%s); retrying", self.plugin_name, exc)
                    time.sleep(0.01)
                break
            sock.setblocking(True)  # replies use sendall; reads use MSG_DONTWAIT
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
                except OSError:
                    pass  # the kernel's default buffers still work
            conn = Connection(sock, next(self._conn_ids), self.plugin_name, self)
            with self._conns_lock:
                self._conns[conn.id] = conn
            accepted.append(conn)
        return accepted

    def connection_closed(self, conn_id: int) -> None:
        with self._conns_lock:
            self._conns.pop(conn_id, None)

    def stop(self) -> None:
        self._closing.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        with self._conns_lock:
            conns = list(self._conns.values())
        for conn in conns:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # its hub sees EOF and closes it
            except OSError:
                pass
        # Only the socket file this process bound: on `kong reload` the new worker's server binds
        # a new file at the same path before the old worker stops this server, and removing that
        # one would cut Kong off from the new server until the next restart.
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._bound:
                self.path.unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------
# Process lifecycle


class ServerProcess:
    """Listeners + watchdog/reaper + parent watchdog around a PluginServer; `stop()` unlinks the sockets."""

    def __init__(self, server: PluginServer, prefix: Path, backlog: int = 4096,
                 reap_interval: float | None = None, parent_pid: int | None = None) -> None:
        self.server = server
        self.prefix = prefix
        self.listeners = [SocketListener(server, name, prefix / f"{name}.socket", backlog)
                          for name in server.plugins]
        self.reap_interval = reap_interval if reap_interval is not None else min(
            1.0, server.event_timeout / 4, server.orphan_grace / 2)
        # Step timeouts are answered within a quarter of the timeout (at most 0.25 s late).
        self.watch_interval = min(self.reap_interval, 0.25, max(0.01, server.step_timeout / 4))
        # Kong's stock watchdog tests getppid()==1, which misses subreapers; compare to the
        # parent we started with instead.
        self.parent_pid = os.getppid() if parent_pid is None else parent_pid
        self.stopped = threading.Event()
        self.stop_reason = ""

    def start(self) -> None:
        if not self.prefix.is_dir():
            raise FileNotFoundError(f"kong prefix {self.prefix} does not exist; can't create unix sockets")
        started = []
        try:
            for listener in self.listeners:
                listener.start()
                started.append(listener)
        except OSError:
            for listener in started:
                listener.stop()
            raise
        threading.Thread(target=self._watch_loop, name="aigov-watchdog", daemon=True).start()
        threading.Thread(target=self._watch_parent, name="aigov-parent-watchdog", daemon=True).start()

    def _watch_loop(self) -> None:
        next_reap = _monotonic() + self.reap_interval
        while not self.stopped.wait(self.watch_interval):
            try:
                self.server.watch()
                if _monotonic() >= next_reap:
                    next_reap = _monotonic() + self.reap_interval
                    self.server.reap()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any bug
                log.exception("watchdog failed")

    def _watch_parent(self) -> None:
        while not self.stopped.wait(0.5):
            if os.getppid() != self.parent_pid:
                self.request_stop("parent process died")
                return

    def request_stop(self, reason: str) -> None:
        if not self.stopped.is_set():
            self.stop_reason = reason
            self.stopped.set()

    def wait(self) -> None:
        # A bounded wait in a loop keeps the main thread responsive to signals.
        while not self.stopped.wait(1.0):
            pass

    def stop(self, hub_timeout: float = 3.0) -> bool:
        """Stop serving; True if every connection thread ended within `hub_timeout`.

        Hub threads are joined (not left to interpreter shutdown) because a greenlet destroyed
        during finalization, away from its thread, can crash the process. False means a handler
        is still running (blocked in its own code): the caller should end the process with
        os._exit rather than a normal interpreter shutdown.
        """
        self.request_stop(self.stop_reason or "stop requested")
        for listener in self.listeners:
            listener.stop()
        self.server.stop()
        clean = self.server.wait_for_hubs(hub_timeout)
        if not clean:
            log.warning("a handler is still running %gs after stop; exiting without waiting for it",
                        hub_timeout)
        log.info("plugin server stopped (%s); sockets removed", self.stop_reason)
        return clean
