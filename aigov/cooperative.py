"""Waits that let `aigov serve`'s event loop run other requests instead of blocking it.

`aigov serve` runs every handler as a greenlet on one loop thread that reads all Kong
connections. A handler that blocks the thread (a Redis reply, an embedding batch, an HTTP call)
would stall every other request, so the library's blocking points wait through here: on the loop
the handler is parked and the loop resumes it when the socket is readable, the future is done or
the time is up; anywhere else (the stock kong-pdk server, tests, scripts) these are the plain
blocking calls. Nothing is monkey-patched.

Plugin code that holds a lock must not wait here while holding it: another handler on the same
thread could then block on that lock forever (the loop runs it while the first is parked).
"""
from __future__ import annotations

import concurrent.futures
import select
import threading
import time
from typing import Any, Callable, Protocol, TypeVar

import greenlet

T = TypeVar("T")


class Loop(Protocol):
    """What the plugin server's loop offers the greenlet it runs (aigov.server.server.Hub)."""

    def park(self, fd: int | None, future: concurrent.futures.Future | None,
             timeout: float | None) -> bool:
        """Suspend the calling handler until `fd` is readable / `future` is done (True) or
        `timeout` seconds passed (False). EventClosedError if the event ends meanwhile."""


def current_loop() -> Loop | None:
    """The loop running the calling greenlet, or None outside `aigov serve`'s handlers."""
    return getattr(greenlet.getcurrent(), "cooperative_loop", None)


def wait_readable(fd: int, timeout: float | None) -> bool:
    """True once `fd` is readable (or has an error to report), False after `timeout` seconds."""
    loop = current_loop()
    if loop is not None:
        return loop.park(fd, None, timeout)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))


def wait_future(future: "concurrent.futures.Future[T]", timeout: float | None) -> T:
    """future.result(timeout), parking the handler instead of blocking the loop."""
    loop = current_loop()
    if loop is not None and not future.done():
        if not loop.park(None, future, timeout):
            raise concurrent.futures.TimeoutError(f"no result within {timeout}s")
    return future.result(timeout=timeout)


def sleep(seconds: float) -> None:
    """time.sleep that lets the loop serve other requests meanwhile."""
    loop = current_loop()
    if loop is None:
        time.sleep(max(0.0, seconds))
    else:
        loop.park(None, None, max(0.0, seconds))


_OFFLOAD_WORKERS = 8
_offload_pool: concurrent.futures.ThreadPoolExecutor | None = None
_offload_lock = threading.Lock()


def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args); on the loop it runs on a small thread pool while the handler is parked.

    For calls with no cooperative form (urllib to a remote embeddings API). At most
    `_OFFLOAD_WORKERS` run at once; more wait their turn, parked.
    """
    if current_loop() is None:
        return fn(*args)
    global _offload_pool
    with _offload_lock:
        if _offload_pool is None:
            _offload_pool = concurrent.futures.ThreadPoolExecutor(
                _OFFLOAD_WORKERS, thread_name_prefix="aigov-offload")
        pool = _offload_pool
    return wait_future(pool.submit(fn, *args), None)
