"""Helpers for calling the Kong PDK from plugin handlers, on either plugin server.

kong-pdk's default "lua style" returns `(data, err)` from every call; python style returns
`data`. Kong never sends StepError (reference §2.3), so `err` is always None in practice and
`value()` keeps only the data, which makes handler code independent of the style.
"""
from __future__ import annotations

import functools
import threading
import time
import traceback
from typing import Any, Callable


def value(result: Any) -> Any:
    """The data part of a PDK call result, for lua-style and python-style servers alike."""
    if isinstance(result, tuple) and len(result) == 2:
        return result[0]
    return result


def text(result: Any) -> str | None:
    """A PDK string result (bytes are decoded leniently: headers may carry invalid UTF-8)."""
    v = value(result)
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, list):  # a repeated header arrives as a list
        return text(v[0]) if v else None
    return str(v)


# What a plugin reads of a request body nginx spooled to a file (one larger than Kong's
# client_body_buffer_size, 8k by default): kong.request.get_raw_body(max_allowed_file_size), Kong
# 3.8+, reads it back up to this size; without the argument Kong returns nil, which its mp_rpc.lua
# cannot pack (a 500). Bounded, so a huge body is not read into Kong's worker and sent here: the
# size kong.conf.example lets nginx accept (nginx_http_client_max_body_size 8m).
READ_BODY_MAX_BYTES = 8 * 1024 * 1024


def request_body(kong: Any, at_least: int = 0) -> bytes:
    """The request body (kong.request.get_raw_body), also when nginx spooled it to a file, up to
    READ_BODY_MAX_BYTES or just past `at_least` (the caller's own limit, so it can refuse a
    bigger body itself), whichever is larger."""
    return raw(kong.request.get_raw_body(max(READ_BODY_MAX_BYTES, at_least + 1)))


def raw(result: Any) -> bytes:
    """A PDK raw-body result as bytes ("" and None become b"")."""
    v = value(result)
    if v is None:
        return b""
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape")
    if isinstance(v, list):  # an empty Lua string/table can arrive as []
        return b""
    return bytes(v)


def guarded(phase: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """Wrap a phase method so an exception never escapes into the plugin server.

    The stock kong-pdk server deadlocks or leaves the request hanging when a handler raises
    (reference §3.4.1). A failure is logged through the PDK and the request continues, which is
    the documented fail-open behaviour of every aigov plugin.
    """

    @functools.wraps(phase)
    def wrapper(self: Any, kong: Any) -> None:
        try:
            phase(self, kong)
        except Exception as exc:  # noqa: BLE001 - the whole point is to catch everything
            try:
                kong.log.err(f"{phase.__qualname__} failed open: {type(exc).__name__}: {exc}")
                kong.log.debug(traceback.format_exc(limit=8))
            except Exception:  # noqa: BLE001 - the PDK channel itself may be gone
                pass

    return wrapper


class LogThrottle:
    """At most one log line per key and interval; the next line says how many were held back.

    During an outage every request hits the same failure: a warning each would flood Kong's
    error log at the gateway's request rate, and each is also a PDK round trip on the request
    path. Metrics still count every occurrence; the log shows the first, then one per interval.
    """

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def take(self, key: str) -> int | None:
        """None: stay quiet. Else log now; the value is how many lines were held back before."""
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(key, 0.0):
                self._held[key] = self._held.get(key, 0) + 1
                return None
            if len(self._next) > 1024:  # keys are a handful of failure kinds; never grow without bound
                self._next.clear()
                self._held.clear()
            self._next[key] = now + self.interval_s
            return self._held.pop(key, 0)

    def log(self, log_fn: Callable[[str], Any], key: str, message: str) -> None:
        """Call `log_fn(message)` (e.g. kong.log.warn) unless throttled."""
        held = self.take(key)
        if held is None:
            return
        if held:
            message += f" ({held} more like this in the last {self.interval_s:g} s not logged)"
        log_fn(message)


OUTAGE_LOG = LogThrottle()  # the plugins' store/embedding outage lines, per failure kind
