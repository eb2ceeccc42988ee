"""Keeps credentials out of every log line the stand-in writes.

The stand-in knows which values are secret: resolved vault references, key-auth keys, and the
values of credential headers (Authorization, Proxy-Authorization, apikey and key-auth's
key_names) seen on requests. They are registered here, and a logging.Filter on the `kongsim`
logger replaces them in the formatted message, including the plugin-server output that the
stand-in copies into its log (Kong copies it into its error log, reference §1.4).
"""
from __future__ import annotations

import logging
import threading
from typing import Iterable

REDACTED = "[REDACTED]"
CREDENTIAL_HEADERS = {"authorization", "proxy-authorization", "apikey", "x-api-key", "cookie"}
_MIN_SECRET_LEN = 4  # shorter values would redact ordinary words

_lock = threading.Lock()
_secrets: set[str] = set()


def register_secret(value: str | bytes | None) -> None:
    """Remember a secret value so it is masked in every later log line."""
    if value is None:
        return
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = str(value)
    if len(value) < _MIN_SECRET_LEN:
        return
    with _lock:
        _secrets.add(value)
        # "Bearer <token>": the token alone may be logged by someone else, mask it too.
        if " " in value:
            tail = value.split(" ", 1)[1].strip()
            if len(tail) >= _MIN_SECRET_LEN:
                _secrets.add(tail)


def register_secrets(values: Iterable[str | bytes | None]) -> None:
    for v in values:
        register_secret(v)


def redact(text: str) -> str:
    """`text` with every registered secret replaced by [REDACTED] (longest first)."""
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Formats the record's message now and masks registered secrets in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not lose the line
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        # Tracebacks are formatted later by the handler, unfiltered: format and mask them now.
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactingFilter()


def get_logger(name: str) -> logging.Logger:
    """A stand-in logger whose records are redacted before any handler sees them.

    Logger-level filters do not apply to child loggers' records, so each module's logger
    carries the filter itself.
    """
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
