"""The stand-in's log filter masks credentials in messages and in tracebacks."""
from __future__ import annotations

import io
import logging

from kongsim import redact


def test_a_registered_secret_is_masked_in_a_logged_traceback() -> None:
    secret = "sk-live-traceback-0123456789"
    redact.register_secret(secret)
    logger = redact.get_logger("kongsim.test-redact")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError(f"upstream said no to Bearer {secret}")
        except RuntimeError:
            logger.exception("call failed for %s", secret)
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "RuntimeError" in out and "Traceback" in out  # the traceback itself is kept
    assert secret not in out
    assert redact.REDACTED in out
