"""Section 1: plugin-server round trip, stock kong-pdk server vs `aigov serve`.

The same no-op plugin (aigov/bench/plugins/bench-noop.py, `pdk_calls` PDK calls per access
event) runs on both servers, driven the way Kong drives them: one connection per concurrent
request, one shared instance, HandleEvent then one Step per PDK callback. The client is the
stand-in's (kongsim.rpc) in an epoll loop per client process, like an nginx worker
(aigov.bench.rpcclient.EventLoop); `CLIENT_PROCESSES` processes share the connections of a
level the way Kong's workers each keep their own pool.

Both servers run for the whole section and each concurrency level is measured in alternating
rounds (stock, aigov, aigov, stock, ...), so a change in the machine's load during the run
falls on both sides of the ratio. Reported per server and concurrency: PDK round trips per
second (every request/reply pair on the socket, summed over the rounds), event latency p50/p99
and the CPU each side spent per round trip; then threads and RSS of each server before and
after a long run of events.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigov.bench.common import (NOOP_PLUGIN_NAME, NOOP_PLUGINS_DIR, REPO_ROOT, BenchContext,
                                SectionSkipped, Target, latency_stats, proc_cpu_seconds, proc_status, ratio)

SERVERS = ("stock", "aigov")
CONCURRENCY = (1, 8, 32)
PDK_CALLS = 3
TARGET_SPEEDUP_AT_8 = 5.0
# RSS noise of a CPython process over a run (allocator arenas); a leak of one small object per
# event is 10,000 objects, far above it.
RSS_GROWTH_LIMIT_KIB = 2048
START_TIMEOUT_S = 30.0
# Client processes sharing a level's connections (each an epoll loop, like an nginx worker).
# Measured on 2 shared cores (load average 7-8 from other work): 2 processes gave 2.4x at 8
# concurrent against 1.8-2.4x for one, within the run-to-run noise; the loop's own cost
# (~25-40 us per round trip) is below both servers', so one process is the default.
CLIENT_PROCESSES = 1
# Rounds per level, alternating the servers (ABBA...) so load drift hits both.
ROUNDS = 4


def _answer(method: str, args: list[Any]) -> Any:
    """Kong's side of the no-op plugin's PDK calls (values as Kong would return them)."""
    if method == "kong.request.get_header":
        return "1"
    return None


@dataclass
class ServerUnderTest:
    kind: str
    proc: subprocess.Popen[bytes]
    socket_path: Path
    workdir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def server_command(kind: str, prefix: Path, python: str) -> list[str]:
    plugin_file = NOOP_PLUGINS_DIR / f"{NOOP_PLUGIN_NAME}.py"
    if kind == "stock":
        # kong-pdk's dedicated server, threading mode (its default), as Kong's docs start it.
        return [python, str(plugin_file), "-p", str(prefix), "--socket-name",
                f"{NOOP_PLUGIN_NAME}.socket"]
    return [python, "-m", "aigov.cli", "serve", "-p", str(prefix), "-d", str(NOOP_PLUGINS_DIR),
            "--plugins", NOOP_PLUGIN_NAME, "-q"]


def start_server(kind: str, python: str) -> ServerUnderTest:
    from kongsim.process import wait_for_socket

    if kind == "aigov":
        try:
            import aigov.server.server  # noqa: F401 - only checks that `aigov serve` exists
        except ImportError as exc:
            raise SectionSkipped(f"aigov serve (aigov.server.server) is not available: {exc}") from None
    # Unix socket paths are limited to ~107 bytes: keep the prefix short.
    workdir = Path(tempfile.mkdtemp(prefix="aigov-b1-"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT),
           "HOME": str(workdir), "PYTHONDONTWRITEBYTECODE": "1"}
    log_file = open(workdir / f"{kind}.log", "wb")
    try:
        proc = subprocess.Popen(server_command(kind, workdir, python), stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    finally:
        log_file.close()
    server = ServerUnderTest(kind, proc, workdir / f"{NOOP_PLUGIN_NAME}.socket", workdir)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:  # short waits, so a server that dies at start fails fast
            if proc.poll() is not None:
                raise RuntimeError(f"exited with code {proc.returncode} before creating its socket")
            try:
                wait_for_socket(str(server.socket_path), min(0.5, max(0.05, deadline - time.monotonic())))
                break
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
    except Exception as exc:
        tail = (workdir / f"{kind}.log").read_bytes()[-1500:].decode("utf-8", "replace")
        server.stop()
        raise RuntimeError(f"{kind} server did not start: {exc}\n{tail}") from None
    return server


# ---- client processes ---------------------------------------------------------------------


class _LocalClient:
    """The event loops of one client process, in this process (CLIENT_PROCESSES == 1)."""

    def __init__(self) -> None:
        self._loops: dict[tuple[str, int], Any] = {}

    def open(self, socket_path: str, connections: int, instance_id: int) -> None:
        from aigov.bench.rpcclient import EventLoop

        self._loops[(socket_path, connections)] = EventLoop(
            Path(socket_path), connections, instance_id, _answer, PDK_CALLS)

    def run(self, socket_path: str, connections: int, events_per_connection: int) -> dict[str, Any]:
        loop = self._loops[(socket_path, connections)]
        rt0, cpu0, t0 = loop.round_trips, time.process_time(), time.perf_counter()
        latencies = loop.run(events_per_connection)
        t1 = time.perf_counter()
        return {"latencies": latencies, "round_trips": loop.round_trips - rt0, "t0": t0, "t1": t1,
                "cpu_s": time.process_time() - cpu0}

    def close_all(self) -> None:
        for loop in self._loops.values():
            loop.close()
        self._loops.clear()

    def stop(self) -> None:
        self.close_all()


def _client_main(pipe: Any) -> None:
    """A client process: runs the parent's commands on its own event loops."""
    client = _LocalClient()
    try:
        while True:
            command, args = pipe.recv()
            if command == "stop":
                return
            try:
                pipe.send(("ok", getattr(client, command)(*args)))
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
                pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        client.stop()


class _ProcessClient:
    """A client process (spawned: no state inherited from the benchmark's threads)."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_client_main, args=(child,), daemon=True)
        self._proc.start()
        child.close()

    def send(self, command: str, *args: Any) -> None:
        self._pipe.send((command, args))

    def result(self, timeout_s: float) -> Any:
        if not self._pipe.poll(timeout_s):
            raise TimeoutError(f"client process gave no result within {timeout_s:.0f}s")
        status, value = self._pipe.recv()
        if status != "ok":
            raise RuntimeError(f"client process: {value}")
        return value

    def stop(self) -> None:
        try:
            self._pipe.send(("stop", ()))
        except OSError:
            pass
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)


class ClientPool:
    """`processes` client processes; a level's connections are split between them."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._local = _LocalClient() if processes == 1 else None
        self._remote = [] if processes == 1 else [_ProcessClient() for _ in range(processes)]

    def _split(self, connections: int) -> list[int]:
        n = min(self.processes, connections)
        return [connections // n + (1 if i < connections % n else 0) for i in range(n)]

    def _each(self, command: str, per_client_args: list[tuple[Any, ...]], timeout_s: float) -> list[Any]:
        if self._local is not None:
            return [getattr(self._local, command)(*per_client_args[0])]
        clients = self._remote[:len(per_client_args)]
        for client, args in zip(clients, per_client_args):
            client.send(command, *args)
        return [client.result(timeout_s) for client in clients]

    def open(self, socket_path: Path, connections: int, instance_id: int, timeout_s: float) -> None:
        self._each("open", [(str(socket_path), n, instance_id) for n in self._split(connections)],
                   timeout_s)

    def run(self, socket_path: Path, connections: int, events_per_connection: int,
            timeout_s: float) -> dict[str, Any]:
        parts = self._each("run", [(str(socket_path), n, events_per_connection)
                                   for n in self._split(connections)], timeout_s)
        # perf_counter is CLOCK_MONOTONIC, one clock for every process of the machine.
        return {"latencies": [x for p in parts for x in p["latencies"]],
                "round_trips": sum(p["round_trips"] for p in parts),
                "elapsed_s": max(p["t1"] for p in parts) - min(p["t0"] for p in parts),
                "cpu_s": sum(p["cpu_s"] for p in parts)}

    def close_all(self, timeout_s: float) -> None:
        self._each("close_all", [()] * (1 if self._local else len(self._remote)), timeout_s)

    def stop(self) -> None:
        if self._local is not None:
            self._local.stop()
        for client in self._remote:
            client.stop()


# ---- measurements -------------------------------------------------------------------------


def measure_level(servers: dict[str, ServerUnderTest], instance_ids: dict[str, int], clients: ClientPool,
                  concurrency: int, events_per_connection: int, rounds: int,
                  deadline_s: float) -> dict[str, dict[str, Any]]:
    """One concurrency level on every server, in alternating rounds; totals per server."""
    kinds = list(servers)
    totals = {k: {"latencies": [], "round_trips": 0, "elapsed_s": 0.0, "client_cpu_s": 0.0,
                  "server_cpu_s": 0.0} for k in kinds}
    per_round = max(1, events_per_connection // rounds)
    try:
        for kind in kinds:
            clients.open(servers[kind].socket_path, concurrency, instance_ids[kind], deadline_s)
            clients.run(servers[kind].socket_path, concurrency, max(2, 40 // concurrency), deadline_s)
        for r in range(rounds):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                server, total = servers[kind], totals[kind]
                cpu0 = proc_cpu_seconds(server.pid)
                part = clients.run(server.socket_path, concurrency, per_round, deadline_s)
                total["server_cpu_s"] += proc_cpu_seconds(server.pid) - cpu0
                total["latencies"].extend(part["latencies"])
                total["round_trips"] += part["round_trips"]
                total["elapsed_s"] += part["elapsed_s"]
                total["client_cpu_s"] += part["cpu_s"]
    finally:
        clients.close_all(deadline_s)
    levels = {}
    for kind, total in totals.items():
        rt, elapsed, events = total["round_trips"], total["elapsed_s"], len(total["latencies"])
        levels[kind] = {
            "concurrency": concurrency, "events": events, "round_trips": rt, "rounds": rounds,
            "elapsed_s": round(elapsed, 4), "round_trips_per_s": round(rt / elapsed, 1),
            "events_per_s": round(events / elapsed, 1), "latency": latency_stats(total["latencies"]),
            # CPU per round trip shows which side limits throughput on 2 shared cores.
            "server_cpu_us_per_rt": round(total["server_cpu_s"] / max(1, rt) * 1e6, 1),
            "client_cpu_us_per_rt": round(total["client_cpu_s"] / max(1, rt) * 1e6, 1)}
    return levels


def soak(server: ServerUnderTest, instance_id: int, events: int, concurrency: int,
         deadline_s: float) -> dict[str, Any]:
    """Threads/RSS after a warm-up, then after `events` more events on the same connections."""
    from aigov.bench.rpcclient import EventLoop

    per_connection = max(1, events // concurrency)
    with EventLoop(server.socket_path, concurrency, instance_id, _answer, PDK_CALLS,
                   timeout_s=deadline_s) as loop:
        loop.run(max(20, per_connection // 10))
        time.sleep(0.2)  # let finished per-event threads of the stock server exit
        before = proc_status(server.pid)
        loop.run(per_connection)
        time.sleep(0.2)
        after = proc_status(server.pid)
    return {"events": per_connection * concurrency, "concurrency": concurrency, "before": before,
            "after": after, "thread_growth": after["threads"] - before["threads"],
            "rss_growth_kib": after["rss_kib"] - before["rss_kib"]}


def run(ctx: BenchContext) -> dict[str, Any]:
    import sys

    from aigov.bench.rpcclient import EventConnection, EventLoop

    events_total = ctx.size(240, 3200)      # per server and concurrency level
    soak_events = ctx.size(800, 10_000)
    deadline_s = ctx.size(120, 600)
    rounds = ctx.size(2, ROUNDS)
    results: dict[str, Any] = {"pdk_calls_per_event": PDK_CALLS, "client": EventLoop.transport,
                               "client_processes": CLIENT_PROCESSES, "rounds": rounds, "servers": {}}
    servers: dict[str, ServerUnderTest] = {}
    clients: ClientPool | None = None
    try:
        instance_ids = {}
        for kind in SERVERS:
            servers[kind] = start_server(kind, sys.executable)
            with EventConnection(servers[kind].socket_path) as conn:
                instance_ids[kind] = conn.start_instance(NOOP_PLUGIN_NAME, {"pdk_calls": PDK_CALLS})
        clients = ClientPool(CLIENT_PROCESSES)
        levels: dict[str, list[dict[str, Any]]] = {k: [] for k in SERVERS}
        for c in CONCURRENCY:
            measured = measure_level(servers, instance_ids, clients, c, max(1, events_total // c),
                                     rounds, deadline_s)
            for kind in SERVERS:
                lv = measured[kind]
                levels[kind].append(lv)
                ctx.echo(f"  {kind:5s} c={c:<2d} {lv['round_trips_per_s']:>9.0f} rt/s  "
                         f"p50 {lv['latency']['p50_ms']} ms  p99 {lv['latency']['p99_ms']} ms  "
                         f"cpu/rt server {lv['server_cpu_us_per_rt']} us client "
                         f"{lv['client_cpu_us_per_rt']} us")
        for kind in SERVERS:
            soak_result = soak(servers[kind], instance_ids[kind], soak_events, 8, deadline_s)
            ctx.echo(f"  {kind:5s} soak {soak_result['events']} events: threads "
                     f"{soak_result['before']['threads']}->{soak_result['after']['threads']}, RSS "
                     f"{soak_result['before']['rss_kib']}->{soak_result['after']['rss_kib']} KiB")
            results["servers"][kind] = {"levels": levels[kind], "soak": soak_result}
    finally:
        if clients is not None:
            clients.stop()
        for server in servers.values():
            server.stop()

    def rt_at(kind: str, c: int) -> float:
        return next(l["round_trips_per_s"] for l in results["servers"][kind]["levels"] if l["concurrency"] == c)

    results["speedup"] = {str(c): round(ratio(rt_at("aigov", c), rt_at("stock", c)) or 0, 2)
                          for c in CONCURRENCY}

    def cpu_at(kind: str, c: int) -> float:
        return next(l["server_cpu_us_per_rt"] for l in results["servers"][kind]["levels"] if l["concurrency"] == c)

    aigov_soak = results["servers"]["aigov"]["soak"]
    targets = [
        Target("aigov serve round trips/s vs stock at 8 concurrent", ratio(rt_at("aigov", 8), rt_at("stock", 8)),
               "x", ">=", TARGET_SPEEDUP_AT_8, baseline=rt_at("stock", 8),
               note=f"aigov {rt_at('aigov', 8):.0f} rt/s vs stock {rt_at('stock', 8):.0f} rt/s, "
                    f"{rounds} alternating rounds, {CLIENT_PROCESSES} epoll client process(es)"),
        # On 2 shared cores throughput also depends on the client and on other load, so the
        # server's own CPU per round trip is reported beside it.
        Target("server CPU per round trip, stock vs aigov serve at 8 concurrent",
               ratio(cpu_at("stock", 8), cpu_at("aigov", 8)), "x", ">=", TARGET_SPEEDUP_AT_8,
               baseline=cpu_at("stock", 8),
               note=f"stock {cpu_at('stock', 8)} us vs aigov {cpu_at('aigov', 8)} us of server CPU per round trip"),
        Target(f"aigov serve thread growth over {aigov_soak['events']} events", aigov_soak["thread_growth"],
               "threads", "<=", 0, baseline=aigov_soak["before"]["threads"]),
        Target(f"aigov serve RSS growth over {aigov_soak['events']} events", aigov_soak["rss_growth_kib"],
               "KiB", "<=", RSS_GROWTH_LIMIT_KIB, baseline=aigov_soak["before"]["rss_kib"]),
    ]
    return {"results": results, "targets": targets}
