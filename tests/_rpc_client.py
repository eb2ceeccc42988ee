"""A raw MsgPack:1 client and process helpers for the plugin-server tests.

It sends exactly what Kong's mp_rpc.lua sends (`[0, msgid, "plugin.<Method>", [param]]`) and
keeps the raw reply frames, so tests can assert message shapes. Every read is bounded.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FIXTURE_PLUGINS = REPO / "tests" / "fixtures" / "plugins"
TEST_PLUGIN = "aigov-test"


class ReplyTimeout(Exception):
    """No complete reply within the timeout (the stock server's hangs look like this)."""


class ConnectionClosed(Exception):
    """The server closed the connection."""


class RpcClient:
    def __init__(self, path: Path | str, timeout: float = 5.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(self.path)
        self.unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape",
                                         strict_map_key=False, max_buffer_size=512 * 1024 * 1024)
        self.msgid = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, method: str, *params: Any, msgid: int | None = None) -> int:
        if msgid is None:
            self.msgid += 1
            msgid = self.msgid
        self.send_raw(msgpack.packb([0, msgid, method, list(params)], use_bin_type=True,
                                    unicode_errors="surrogateescape"))
        return msgid

    def read_frame(self, timeout: float | None = None) -> Any:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                return self.unpacker.unpack()
            except msgpack.OutOfData:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReplyTimeout(f"no complete reply within {timeout or self.timeout}s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                raise ReplyTimeout(f"no complete reply within {timeout or self.timeout}s") from None
            except ConnectionResetError:
                raise ConnectionClosed("connection reset") from None
            if not chunk:
                raise ConnectionClosed("server closed the connection")
            self.unpacker.feed(chunk)

    def call_raw(self, method: str, *params: Any, timeout: float | None = None) -> list[Any]:
        """Send one request and return the whole reply frame `[1, msgid, err, result]`."""
        msgid = self.send(method, *params)
        frame = self.read_frame(timeout)
        assert frame[0] == 1 and frame[1] == msgid, f"unexpected frame {frame!r}"
        return frame

    def call(self, method: str, *params: Any, timeout: float | None = None) -> Any:
        """The result; raises RuntimeError carrying the server's error string."""
        _, _, err, result = self.call_raw(method, *params, timeout=timeout)
        if err is not None:
            raise RuntimeError(err)
        return result

    # Kong-shaped helpers
    def start_instance(self, config: dict[str, Any], name: str = TEST_PLUGIN) -> int:
        import json
        return self.call("plugin.StartInstance", {"Name": name, "Config": json.dumps(config)})["Id"]

    def handle_event(self, instance_id: int, phase: str = "access", timeout: float | None = None) -> Any:
        return self.call("plugin.HandleEvent", {"InstanceId": instance_id, "EventName": phase},
                         timeout=timeout)

    def step(self, event_id: int, data: Any, method: str = "plugin.Step",
             timeout: float | None = None) -> Any:
        return self.call(method, {"EventId": event_id, "Data": data}, timeout=timeout)

    def run_event(self, instance_id: int, answers: dict[str, Any] | None = None,
                  phase: str = "access", timeout: float | None = None) -> list[dict[str, Any]]:
        """Drive one phase like Kong's bridge loop; returns the callbacks seen (exit ends it)."""
        answers = answers or {}
        calls = []
        reply = self.handle_event(instance_id, phase, timeout=timeout)
        while reply["Data"] != "ret":
            callback = reply["Data"]
            calls.append(callback)
            if callback["Method"] in ("kong.response.exit", "kong.response.error"):
                break
            reply = self.step(reply["EventId"], answers.get(callback["Method"]), timeout=timeout)
        return calls


# --------------------------------------------------------------------------------------------
# Server processes


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ServerProc:
    proc: subprocess.Popen
    prefix: Path
    socket_path: Path
    stderr_path: Path
    stdout_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, timeout: float = 5.0) -> RpcClient:
        return RpcClient(self.socket_path, timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> bytes:
        return self.stdout_path.read_bytes()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {path}")
        if path.exists():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(path))
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"no socket {path} after {timeout}s")


def _spawn(cmd: list[str], prefix: Path, socket_path: Path, tag: str) -> ServerProc:
    stderr_path = prefix / f"{tag}.stderr"
    stdout_path = prefix / f"{tag}.stdout"
    with open(stderr_path, "wb") as err, open(stdout_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=server_env(), cwd=str(prefix))
    server = ServerProc(proc, prefix, socket_path, stderr_path, stdout_path)
    try:
        wait_for_socket(socket_path, proc)
    except Exception:
        server.stop()
        raise
    return server


def start_aigov(prefix: Path, *extra_args: str, plugins_dir: Path = FIXTURE_PLUGINS,
                plugin: str = TEST_PLUGIN) -> ServerProc:
    cmd = [PYTHON, "-m", "aigov.cli", "serve", "-p", str(prefix), "-d", str(plugins_dir), *extra_args]
    return _spawn(cmd, prefix, prefix / f"{plugin}.socket", "aigov")


def start_stock(prefix: Path, *extra_args: str, plugin: str = TEST_PLUGIN,
                plugins_dir: Path = FIXTURE_PLUGINS) -> ServerProc:
    """kong-pdk's dedicated server, started the way Kong's own spec starts it (§1.5)."""
    cmd = [PYTHON, str(plugins_dir / f"{plugin}.py"), "--socket-name", f"{plugin}.socket",
           "-p", str(prefix), *extra_args]
    return _spawn(cmd, prefix, prefix / f"{plugin}.socket", "stock")


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# --------------------------------------------------------------------------------------------
# pytest fixtures (import them into a test module to use them)

import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def short_prefix():
    """A short directory for sockets (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="aigov-srv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def aigov_server(short_prefix):
    server = start_aigov(short_prefix)
    yield server
    server.stop()


@pytest.fixture
def stock_server(short_prefix):
    server = start_stock(short_prefix)
    yield server
    server.stop()
