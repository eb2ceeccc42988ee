"""Helpers for calling the Kong PDK from plugin handlers, on either plugin server.

kong-pdk's default "lua style" returns `(data, err)` from every call; python style returns
`data`. Kong never sends StepError (reference §2.3), so `err` is always None in practice and
`value()` keeps only the data, which makes handler code independent of the style.
"""
from __future__ import annotations

import functools
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
