"""Kong's side of the round-trip benchmark, on the stand-in's MsgPack:1 client (kongsim.rpc).

It sends exactly what Kong's mp_rpc.lua sends (reference §2): StartInstance with the config as a
JSON string, HandleEvent, then one Step per PDK callback until "ret"; an exit callback ends the
event without a reply.

Two drivers, both on kongsim.rpc's framing:

* `EventConnection`: one blocking connection (kongsim.rpc.RpcClient), for setup calls and
  single events;
* `EventLoop`: what one nginx worker does: a single thread multiplexing many connections
  (epoll), each running events back to back, one call outstanding per connection. Kong's
  client is LuaJIT in such a loop; a thread per connection in one Python process would measure
  the client's GIL hand-offs instead of the server (reference §2.1).
"""
from __future__ import annotations

import json
import select
import time
from pathlib import Path
from typing import Any, Callable

from kongsim import rpc

TERMINAL_METHODS = frozenset({"kong.response.exit", "kong.response.error"})

PdkAnswer = Callable[[str, list[Any]], Any]


class RPCError(RuntimeError):
    """The plugin server answered an error, or the connection broke."""


def _event_step(reply: Any) -> tuple[int, str, list[Any]] | None:
    """(event id, method, args) of a HandleEvent/Step reply that is a PDK callback; None for "ret"."""
    data = reply.get("Data") if type(reply) is dict else None
    if data == "ret":
        return None
    if type(data) is not dict or "Method" not in data:
        raise RPCError(f"unexpected event data {data!r:.200}")
    return reply["EventId"], data["Method"], list(data.get("Args") or [])


class EventConnection:
    """One pooled Kong connection used by one caller at a time (blocking calls)."""

    transport = "kongsim.rpc"

    def __init__(self, socket_path: Path, timeout_s: float = 30.0) -> None:
        self._client = rpc.RpcClient(str(socket_path), timeout_s=timeout_s)
        self.round_trips = 0

    def call(self, method: str, param: Any) -> Any:
        try:
            result = self._client.call(method, param)
        except rpc.RpcError as exc:
            raise RPCError(f"{method}: {exc}") from None
        self.round_trips += 1
        return result

    def start_instance(self, name: str, config: dict[str, Any]) -> int:
        reply = self.call("StartInstance", {"Name": name, "Config": json.dumps(config)})
        return int(reply["Id"])

    def handle_event(self, instance_id: int, phase: str, answer: PdkAnswer) -> int:
        """Run one phase to its end; returns the number of PDK callbacks answered."""
        reply = self.call("HandleEvent", {"InstanceId": instance_id, "EventName": phase})
        steps = 0
        while True:
            step = _event_step(reply)
            if step is None:
                return steps
            event_id, method, args = step
            if method in TERMINAL_METHODS:
                return steps  # Kong abandons the event without a Step (§2.4)
            steps += 1
            reply = self.call("Step", {"EventId": event_id, "Data": answer(method, args)})

    def close(self) -> None:
        self._client.reset_pool()

    def __enter__(self) -> "EventConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Lane:
    """One connection of an EventLoop and the event it is running."""

    __slots__ = ("conn", "msgid", "left", "steps", "started", "latencies")

    def __init__(self, conn: rpc.Connection) -> None:
        self.conn = conn
        self.msgid = 0
        self.left = 0
        self.steps = 0
        self.started = 0.0
        self.latencies: list[float] = []


class EventLoop:
    """`connections` Kong connections driven from one thread, like one nginx worker.

    `run(events_per_connection)` starts an event on every connection and, whenever a reply
    arrives, answers its PDK callback (Step) or, on "ret", records the event's latency and
    starts the next one. Every event must make exactly `expected_steps` callbacks.
    """

    transport = "kongsim.rpc (one epoll loop per client process)"

    def __init__(self, socket_path: Path, connections: int, instance_id: int, answer: PdkAnswer,
                 expected_steps: int, phase: str = "access", timeout_s: float = 30.0) -> None:
        if connections < 1:
            raise ValueError("connections must be >= 1")
        self.instance_id = instance_id
        self.answer = answer
        self.expected_steps = expected_steps
        self.timeout_s = timeout_s
        self._handle = {"InstanceId": instance_id, "EventName": phase}
        self._lanes: dict[int, _Lane] = {}
        self._poller = select.epoll()
        try:
            for _ in range(connections):
                conn = rpc.Connection(str(socket_path), timeout_s)
                self._lanes[conn.fileno()] = _Lane(conn)
                self._poller.register(conn.fileno(), select.EPOLLIN)
        except BaseException:
            self.close()
            raise
        self.round_trips = 0

    def _start(self, lane: _Lane) -> None:
        lane.msgid += 1
        lane.steps = 0
        lane.started = time.perf_counter()
        lane.conn.send_request(lane.msgid, "HandleEvent", self._handle)

    def run(self, events_per_connection: int) -> list[float]:
        """Run the events; returns every event's latency in seconds."""
        lanes = list(self._lanes.values())
        for lane in lanes:
            lane.latencies = []
            lane.left = events_per_connection
        active = 0
        for lane in lanes:
            if lane.left > 0:
                self._start(lane)
                active += 1
        by_fd = self._lanes
        answer, terminal, expected = self.answer, TERMINAL_METHODS, self.expected_steps
        round_trips = 0
        perf_counter = time.perf_counter
        try:
            while active:
                ready = self._poller.poll(self.timeout_s)
                if not ready:
                    raise RPCError(f"no reply within {self.timeout_s:.0f}s on {active} connection(s)")
                for fd, _mask in ready:
                    lane = by_fd[fd]
                    conn = lane.conn
                    for msg in conn.receive_ready():
                        # The reply checks of rpc.check_reply, inlined: this loop is the client's
                        # whole per-round-trip cost.
                        if type(msg) is not list or len(msg) != 4 or msg[0] != 1 or msg[1] != lane.msgid:
                            if rpc.is_notification(msg):
                                continue
                            rpc.check_reply(msg, lane.msgid)  # raises the precise error
                        if msg[2] is not None:
                            raise RPCError(str(msg[2]))
                        round_trips += 1
                        reply = msg[3]
                        data = reply.get("Data") if type(reply) is dict else None
                        method = data.get("Method") if type(data) is dict else None
                        if method is not None and method not in terminal:
                            lane.steps += 1
                            lane.msgid += 1
                            conn.send_request(lane.msgid, "Step", {
                                "EventId": reply["EventId"],
                                "Data": answer(method, data.get("Args") or [])})
                            continue
                        if data != "ret" and method is None:
                            raise RPCError(f"unexpected event data {data!r:.200}")
                        # "ret", or exit/error (Kong abandons the event without a Step, §2.4)
                        lane.latencies.append(perf_counter() - lane.started)
                        if lane.steps != expected:
                            raise RPCError(f"event made {lane.steps} PDK calls, expected {expected}")
                        lane.left -= 1
                        if lane.left > 0:
                            self._start(lane)
                        else:
                            active -= 1
        except rpc.RpcError as exc:
            raise RPCError(str(exc)) from None
        finally:
            self.round_trips += round_trips
        return [x for lane in lanes for x in lane.latencies]

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.conn.close()
        self._lanes.clear()
        self._poller.close()

    def __enter__(self) -> "EventLoop":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
