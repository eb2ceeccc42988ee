"""The `aigov serve` plugin server: every plugin in one process, one Unix socket per plugin.

Threads and queues (why: reference §3.3/§3.4, the stock server's failure modes):

- one listener thread per socket, one reader thread per Kong connection. A connection carries
  sequential calls (Kong waits for each reply), so a reader answers its frames in order;
- each event's handler runs on a worker of a bounded pool and talks to the reader only through
  the event's two queues; no lock is held while a handler runs, so events run concurrently;
- the event table loses an entry on "ret", on a terminal call (kong.response.exit/error, after
  which Kong never steps again), on a handler exception (answered "ret": the request continues),
  when a reply cannot be delivered, and by the reaper after `event_timeout` of silence or
  shortly after the connection it last used died;
- a PDK call made after the event ended raises at once in the handler instead of blocking a
  worker forever; instance and event ids start at a time-based offset so ids from a previous
  process answer "no plugin instance #N" (Kong then re-creates) instead of hitting another config.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack

from aigov.server import protocol
from aigov.server.loader import LoadedPlugin

log = logging.getLogger("aigov.server")


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
# Worker pool


class WorkerPool:
    """At most `max_workers` daemon threads; a submit beyond that is refused, never queued.

    Each accepted task has a thread reserved for it, so a new event never waits behind a
    long-running handler. Idle threads exit after `idle_seconds`.
    """

    def __init__(self, max_workers: int, idle_seconds: float = 30.0) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self._idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0  # threads waiting for a task and not reserved by a submit
        self._busy = 0
        self._names = itertools.count(1)

    def try_submit(self, task: Callable[[], None]) -> bool:
        with self._lock:
            if self._busy >= self.max_workers:
                return False
            self._busy += 1
            if self._idle > 0:
                self._idle -= 1
            else:
                self._threads += 1
                threading.Thread(target=self._work, name=f"aigov-handler-{next(self._names)}",
                                 daemon=True).start()
            self._tasks.put(task)
        return True

    def _work(self) -> None:
        while True:
            try:
                task = self._tasks.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0 and self._tasks.empty():
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            if task is None:  # shutdown
                with self._lock:
                    self._threads -= 1
                return
            try:
                task()
            finally:
                with self._lock:
                    self._busy -= 1
                    self._idle += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"max": self.max_workers, "threads": self._threads, "busy": self._busy}

    def shutdown(self) -> None:
        with self._lock:
            count = self._threads
        for _ in range(count):
            self._tasks.put(None)


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
        return {"Name": self.plugin.name, "Id": self.id, "Config": self.config,
                "StartTime": self.start_time}


# Messages from a handler thread to the connection: ("call", packed_callback, method),
# ("ret",) or ("error", traceback_text).
_ABANDONED = object()


class Event:
    """One phase run of one instance: the handler thread on one side, Kong's steps on the other."""

    def __init__(self, event_id: int, instance: Instance, phase: str, conn_id: int) -> None:
        self.id = event_id
        self.instance = instance
        self.phase = phase
        self.to_handler: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.from_handler: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.closed = threading.Event()  # set once Kong will never step this event again
        self.last_activity = time.monotonic()
        self.last_conn = conn_id
        self.orphaned_at: float | None = None
        self.in_flight = True  # a reader is waiting for the handler's next message

    def close(self) -> None:
        """Mark ended and wake a handler blocked on a reply (its PDK call raises)."""
        if not self.closed.is_set():
            self.closed.set()
            self.to_handler.put(_ABANDONED)


class PDKProxy:
    """The `kong` object a handler receives: any attribute chain, called, becomes a callback.

    Behaves like kong-pdk's FakeClasses/rpc_of (log args stringified, exit/error not awaited,
    lua-style `(data, err)` returns by default), but never blocks forever: it raises once the
    event is over.
    """

    __slots__ = ("_path", "_channel")

    def __init__(self, path: str, channel: "_HandlerChannel") -> None:
        self._path = path
        self._channel = channel

    def __getattr__(self, name: str) -> "PDKProxy":
        if name.startswith("__"):
            raise AttributeError(name)  # copy/pickle/inspect probes are not PDK calls
        return PDKProxy(f"{self._path}.{name}", self._channel)

    def __call__(self, *args: Any) -> Any:
        return self._channel.call(self._path, args)

    def __repr__(self) -> str:
        return f"<PDK {self._path}>"


class _HandlerChannel:
    def __init__(self, event: Event, lua_style: bool, reply_timeout: float) -> None:
        self.event = event
        self.lua_style = lua_style
        self.reply_timeout = reply_timeout
        self.packer = protocol.new_packer()

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        event = self.event
        if event.closed.is_set():
            raise EventClosedError(
                f"PDK call {method} after event #{event.id} ended "
                "(kong.response.exit/error was called, or Kong abandoned the event)")
        if method == "kong.log" or method.startswith("kong.log."):
            # Same sanitizing as kong-pdk: Kong can only log what it can unpack.
            args = tuple(a if type(a) in (str, int, list, dict) else str(a) for a in args)
        packed = self.packer.pack({"Method": method, "Args": list(args)})  # TypeError -> handler
        if method in protocol.TERMINAL_METHODS:
            # Kong never answers exit/error: from here on every PDK call raises at once.
            event.closed.set()
            event.from_handler.put(("call", packed, method))
            return None
        event.from_handler.put(("call", packed, method))
        try:
            reply = event.to_handler.get(timeout=self.reply_timeout)
        except queue.Empty:
            event.close()
            raise EventClosedError(f"no reply from Kong to {method} within {self.reply_timeout:g}s")
        if reply is _ABANDONED:
            raise EventClosedError(f"event #{event.id} was abandoned while waiting for {method}")
        data, err = reply
        if self.lua_style:
            return data, err
        if err:
            raise PDKError(f"exception from {method}: {err}")
        return data


# --------------------------------------------------------------------------------------------
# The server


class PluginServer:
    def __init__(
        self,
        plugins: dict[str, LoadedPlugin],
        *,
        lua_style: bool = True,
        max_workers: int = 256,
        step_timeout: float = 55.0,
        event_timeout: float = 65.0,
        orphan_grace: float = 2.0,
    ) -> None:
        self.plugins = dict(plugins)
        self.plugin_dir: str | None = None
        self.lua_style = lua_style
        # Kong's socket read timeout is 60 s; answering before it avoids a late reply sitting on
        # a pooled connection (msgid mismatch, §2.7).
        self.step_timeout = step_timeout
        self.event_timeout = event_timeout
        self.orphan_grace = orphan_grace
        self.pool = WorkerPool(max_workers)
        self._lock = threading.Lock()  # guards the two tables and counters, never held in a handler
        self._instances: dict[int, Instance] = {}
        self._events: dict[int, Event] = {}
        offset = _id_offset()
        self._instance_ids = itertools.count(offset)
        self._event_ids = itertools.count(offset)
        self._last_start: dict[str, float] = {}
        self._last_close: dict[str, float] = {}
        self._closed_conns: dict[int, float] = {}
        self._stopping = threading.Event()

    # ---- dispatch ------------------------------------------------------------------------

    def dispatch(self, request: protocol.Request, conn_id: int, plugin_name: str) -> Any:
        """Run one RPC; returns the result (an EventReply for HandleEvent and Step*)."""
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
        if request.method == "HandleEvent":
            return self.handle_event(param, conn_id, plugin_name)
        return self.step(param, conn_id, is_error=request.method == "StepError")

    # ---- instances -----------------------------------------------------------------------

    def start_instance(self, param: Any, plugin_name: str) -> dict[str, Any]:
        if not isinstance(param, dict):
            raise PluginServerError("plugin.StartInstance expects {Name, Config}")
        name = param.get("Name")
        if name not in self.plugins:
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
        log.debug("instance #%d of %s started", iid, name)
        return {"Name": name, "Id": iid, "Config": config, "StartTime": instance.start_time}

    def instance(self, iid: Any) -> Instance:
        with self._lock:
            instance = self._instances.get(iid) if isinstance(iid, int) else None
        if instance is None:
            # Kong resets its instance cache and retries when the error says "no plugin instance".
            raise PluginServerError(f"no plugin instance #{iid}")
        return instance

    def close_instance(self, iid: Any) -> dict[str, Any]:
        with self._lock:
            instance = self._instances.pop(iid, None) if isinstance(iid, int) else None
            if instance is not None:
                self._last_close[instance.plugin.name] = time.time()
        if instance is None:
            raise PluginServerError(f"no plugin instance #{iid}")
        log.debug("instance #%d of %s closed", iid, instance.plugin.name)
        return {"Name": instance.plugin.name, "Id": iid, "Config": instance.config}

    def get_status(self) -> dict[str, Any]:
        with self._lock:
            instances = list(self._instances.values())
            events = len(self._events)
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
        # Pid and Plugins are kong-pdk's shape; Events and Workers are ours (observability).
        return {"Pid": os.getpid(), "Plugins": plugins, "Events": events, "Workers": self.pool.stats()}

    # ---- events --------------------------------------------------------------------------

    def handle_event(self, param: Any, conn_id: int, plugin_name: str) -> Any:
        if not isinstance(param, dict):
            raise PluginServerError("plugin.HandleEvent expects {InstanceId, EventName}")
        instance = self.instance(param.get("InstanceId"))
        if instance.plugin.name != plugin_name:
            raise PluginServerError(f"no plugin instance #{instance.id}")
        phase = param.get("EventName")
        if not isinstance(phase, str) or phase not in instance.plugin.phases:
            raise PluginServerError(
                f"{instance.plugin.name} does not implement phase {phase!r}")
        method = getattr(instance.handler, phase, None)
        if not callable(method):
            raise PluginServerError(f"{instance.plugin.name} does not implement phase {phase!r}")
        with self._lock:
            event = Event(next(self._event_ids), instance, phase, conn_id)
            self._events[event.id] = event
        channel = _HandlerChannel(event, self.lua_style, self.event_timeout)
        if not self.pool.try_submit(lambda: self._run_handler(event, method, channel)):
            self._drop_event(event)
            raise PluginServerError(
                f"plugin server overloaded: all {self.pool.max_workers} handler workers are busy")
        return self._next_reply(event)

    def step(self, param: Any, conn_id: int, is_error: bool) -> Any:
        if not isinstance(param, dict):
            raise PluginServerError("plugin.Step expects {EventId, Data}")
        eid = param.get("EventId")
        with self._lock:
            event = self._events.get(eid) if isinstance(eid, int) else None
            if event is not None:
                if event.in_flight:
                    raise PluginServerError(f"event id {eid} already has a step in progress")
                event.in_flight = True
                event.last_activity = time.monotonic()
                event.last_conn = conn_id
                event.orphaned_at = None
        if event is None:
            raise PluginServerError(f"event id {eid} not found")
        data = param.get("Data")
        event.to_handler.put((None, data) if is_error else (data, None))
        return self._next_reply(event)

    def _run_handler(self, event: Event, method: Callable[[Any], Any], channel: _HandlerChannel) -> None:
        try:
            method(PDKProxy("kong", channel))
        except BaseException:  # noqa: BLE001 - SystemExit in a handler must not end the server
            text = traceback.format_exc()
            if event.closed.is_set():
                log.warning("handler %s.%s of event #%d raised after the event ended:\n%s",
                            event.instance.plugin.name, event.phase, event.id, text)
            else:
                event.from_handler.put(("error", text))
        else:
            if not event.closed.is_set():
                event.from_handler.put(("ret",))

    def _next_reply(self, event: Event) -> "EventReply":
        """Wait for the handler's next message: a callback, or "ret" once the event is over."""
        try:
            message = event.from_handler.get(timeout=self.step_timeout)
        except queue.Empty:
            self._drop_event(event)
            raise PluginServerError(
                f"event #{event.id} ({event.instance.plugin.name}.{event.phase}): the handler "
                f"neither called the PDK nor returned within {self.step_timeout:g}s")
        kind = message[0]
        if kind == "call":
            _, packed, method = message
            if method in protocol.TERMINAL_METHODS:
                self._drop_event(event)  # Kong never steps an event after exit/error
            else:
                with self._lock:
                    event.last_activity = time.monotonic()
                    event.in_flight = False
            return EventReply(event.id, packed)
        self._drop_event(event)
        if kind == "error":
            log.error("handler %s.%s of event #%d raised; the request continues:\n%s",
                      event.instance.plugin.name, event.phase, event.id, message[1])
        return EventReply(event.id, _PACKED_RET)

    def _drop_event(self, event: Event) -> None:
        with self._lock:
            self._events.pop(event.id, None)
        event.close()

    def event_delivery_failed(self, event_id: int) -> None:
        with self._lock:
            event = self._events.get(event_id)
        if event is not None:
            log.warning("reply for event #%d could not be delivered; dropping the event", event_id)
            self._drop_event(event)

    def connection_closed(self, conn_id: int) -> None:
        """Events last served on a dead connection are reaped after a grace period.

        Kong may send the next Step on another pooled connection, hence the grace period rather
        than an immediate drop.
        """
        now = time.monotonic()
        with self._lock:
            for event in self._events.values():
                if event.last_conn == conn_id and event.orphaned_at is None:
                    event.orphaned_at = now

    def reap(self) -> int:
        now = time.monotonic()
        with self._lock:
            # An event whose reader waits for its handler is live (bounded by step_timeout).
            dead = [e for e in self._events.values() if not e.in_flight and (
                now - e.last_activity > self.event_timeout
                or (e.orphaned_at is not None and now - e.orphaned_at > self.orphan_grace))]
            for event in dead:
                del self._events[event.id]
        for event in dead:
            log.warning("reaped abandoned event #%d (%s.%s)", event.id, event.instance.plugin.name,
                        event.phase)
            event.close()
        return len(dead)

    def event_count(self) -> int:
        with self._lock:
            return len(self._events)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            events = list(self._events.values())
            self._events.clear()
        for event in events:
            event.close()
        self.pool.shutdown()


_PACKED_RET = msgpack.packb(protocol.MSG_RET)


@dataclass(frozen=True)
class EventReply:
    """`{"Data": ..., "EventId": ...}` with Data already packed by the handler thread."""

    event_id: int
    packed_data: bytes


# --------------------------------------------------------------------------------------------
# Sockets


class SocketListener:
    """One Unix socket serving one plugin; one reader thread per accepted connection."""

    def __init__(self, server: PluginServer, plugin_name: str, path: Path,
                 backlog: int = 4096) -> None:
        self.server = server
        self.plugin_name = plugin_name
        self.path = path
        self.backlog = backlog
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: dict[int, socket.socket] = {}
        self._conns_lock = threading.Lock()
        self._conn_ids = itertools.count(1)
        self._closing = threading.Event()

    def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # a stale socket from a killed server, as kong-pdk does
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen(self.backlog)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name=f"aigov-listen-{self.plugin_name}",
                                        daemon=True)
        self._thread.start()
        log.info("serving %s on %s", self.plugin_name, self.path)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.05)  # EMFILE and the like: back off rather than spin
                continue
            conn_id = next(self._conn_ids)
            with self._conns_lock:
                self._conns[conn_id] = conn
            threading.Thread(target=self._serve_connection, args=(conn, conn_id),
                             name=f"aigov-conn-{self.plugin_name}-{conn_id}", daemon=True).start()

    def _serve_connection(self, conn: socket.socket, conn_id: int) -> None:
        unpacker = protocol.new_unpacker()
        packer = protocol.new_packer()
        try:
            while not self._closing.is_set():
                try:
                    chunk = conn.recv(protocol.READ_CHUNK)
                except OSError:
                    return
                if not chunk:
                    return
                unpacker.feed(chunk)
                while True:
                    try:
                        frame = unpacker.unpack()
                    except msgpack.OutOfData:
                        break
                    except Exception as exc:  # noqa: BLE001 - any undecodable frame
                        log.warning("%s connection %d: undecodable msgpack (%s: %s); closing it",
                                    self.plugin_name, conn_id, type(exc).__name__, exc)
                        return
                    if not self._answer(conn, conn_id, packer, frame):
                        return
        finally:
            with self._conns_lock:
                self._conns.pop(conn_id, None)
            try:
                conn.close()
            except OSError:
                pass
            self.server.connection_closed(conn_id)

    def _answer(self, conn: socket.socket, conn_id: int, packer: msgpack.Packer, frame: Any) -> bool:
        """Answer one frame; False closes the connection."""
        if isinstance(frame, (list, tuple)) and frame and frame[0] == protocol.NOTIFICATION:
            return True  # nothing to answer
        try:
            request = protocol.parse_request(frame)
        except protocol.ProtocolError as exc:
            if exc.msgid is None:
                log.warning("%s connection %d: %s; closing it", self.plugin_name, conn_id, exc)
                return False
            return self._send(conn, packer.pack([protocol.RESPONSE, exc.msgid, str(exc), None]))
        event_id = None
        try:
            result = self.server.dispatch(request, conn_id, self.plugin_name)
            if isinstance(result, EventReply):
                event_id = result.event_id
                payload = protocol.pack_event_response(packer, request.msgid, result.event_id,
                                                       result.packed_data)
            else:
                payload = protocol.pack_response(packer, request.msgid, None, result)
        except PluginServerError as exc:
            log.debug("rpc #%d %s.%s: %s", request.msgid, request.namespace, request.method, exc)
            payload = protocol.pack_response(packer, request.msgid, str(exc), None)
        except Exception as exc:  # noqa: BLE001 - a bug here must cost one reply, not the connection
            log.error("rpc #%d %s.%s failed:\n%s", request.msgid, request.namespace, request.method,
                      traceback.format_exc())
            payload = protocol.pack_response(packer, request.msgid, f"{type(exc).__name__}: {exc}", None)
        if not self._send(conn, payload):
            if event_id is not None:
                self.server.event_delivery_failed(event_id)
            return False
        return True

    @staticmethod
    def _send(conn: socket.socket, payload: bytes) -> bool:
        try:
            conn.sendall(payload)  # sendall: an 8 MB exit body must arrive whole (§3.4.2)
            return True
        except OSError:
            return False

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
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------
# Process lifecycle


class ServerProcess:
    """Listeners + reaper + parent watchdog around a PluginServer; `stop()` unlinks the sockets."""

    def __init__(self, server: PluginServer, prefix: Path, backlog: int = 4096,
                 reap_interval: float | None = None, parent_pid: int | None = None) -> None:
        self.server = server
        self.prefix = prefix
        self.listeners = [SocketListener(server, name, prefix / f"{name}.socket", backlog)
                          for name in server.plugins]
        self.reap_interval = reap_interval if reap_interval is not None else min(
            1.0, server.event_timeout / 4, server.orphan_grace / 2)
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
        threading.Thread(target=self._reap_loop, name="aigov-reaper", daemon=True).start()
        threading.Thread(target=self._watch_parent, name="aigov-parent-watchdog", daemon=True).start()

    def _reap_loop(self) -> None:
        while not self.stopped.wait(self.reap_interval):
            try:
                self.server.reap()
            except Exception:  # noqa: BLE001 - the reaper must outlive any bug
                log.exception("reaper failed")

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

    def stop(self) -> None:
        self.request_stop(self.stop_reason or "stop requested")
        for listener in self.listeners:
            listener.stop()
        self.server.stop()
        log.info("plugin server stopped (%s); sockets removed", self.stop_reason)
