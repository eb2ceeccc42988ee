"""MsgPack:1, the wire protocol between Kong and an external plugin server (reference §2).

Framing: bare concatenated msgpack objects on a Unix stream socket, no length prefix.

    request   Kong -> server   [0, msgid, "plugin.<Method>", [param]]
    response  server -> Kong   [1, msgid, error-or-nil, result-or-nil]

This module only knows bytes and shapes; the server logic lives in aigov.server.server.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2

NAMESPACE = "plugin"
MSG_RET = "ret"

# The PDK calls after which Kong abandons the event without ever sending a Step (§2.4).
TERMINAL_METHODS = frozenset({"kong.response.exit", "kong.response.error"})

# Every method name Kong (or an admin tool) may send in the "plugin" namespace (§2.2).
STEP_METHODS = frozenset({
    "Step", "StepError", "StepMultiMap", "StepCredential", "StepConsumer", "StepRoute",
    "StepService", "StepPlugin", "StepMemoryStats",
})
METHODS = frozenset({
    "StartInstance", "CloseInstance", "HandleEvent", "InstanceStatus", "GetStatus",
    "GetPluginInfo", "SetPluginDir",
}) | STEP_METHODS

# Kong's Lua strings are bytes; a header may carry invalid UTF-8. surrogateescape decodes
# them to a str (the handler sees a string) and re-encodes the original bytes on the way back,
# where the stock server's strict decoding kills the connection (§2.1).
UNICODE_ERRORS = "surrogateescape"
MAX_FRAME_BYTES = 256 * 1024 * 1024
UNPACKER_INITIAL_BYTES = 64 * 1024


class ProtocolError(Exception):
    """A frame that is valid msgpack but not a MsgPack:1 request we can serve.

    `msgid` is set when the frame still names a msgid, so the error can be answered; without
    one there is no way to address a reply and the caller closes the connection.
    """

    def __init__(self, message: str, msgid: int | None = None) -> None:
        super().__init__(message)
        self.msgid = msgid


@dataclass(frozen=True)
class Request:
    msgid: int
    namespace: str
    method: str
    params: list[Any]


def new_packer() -> msgpack.Packer:
    """A packer per thread (msgpack.Packer is not thread safe; a hub's greenlets share one)."""
    return msgpack.Packer(use_bin_type=True, unicode_errors=UNICODE_ERRORS)


def new_unpacker() -> msgpack.Unpacker:
    # read_size is the initial buffer: msgpack's default, min(max_buffer_size, 1 MiB), would add
    # up to 1 MiB of resident memory per pooled connection as the stream walks through it. The
    # buffer still grows on demand, up to MAX_FRAME_BYTES, for a large frame.
    return msgpack.Unpacker(
        raw=False,
        unicode_errors=UNICODE_ERRORS,
        strict_map_key=False,
        max_buffer_size=MAX_FRAME_BYTES,
        read_size=UNPACKER_INITIAL_BYTES,
    )


def parse_request(frame: Any) -> Request:
    """Check a decoded frame's shape; raise ProtocolError with a message Kong can log."""
    if not isinstance(frame, (list, tuple)) or len(frame) != 4:
        raise ProtocolError("malformed frame: expected [type, msgid, method, params]")
    kind, msgid, method, params = frame
    if kind != REQUEST or not isinstance(msgid, int) or isinstance(msgid, bool):
        raise ProtocolError("malformed frame: expected a request [0, msgid, method, params]")
    if not isinstance(method, str) or "." not in method:
        raise ProtocolError(f"invalid method name {method!r}: expected 'plugin.<Method>'", msgid)
    namespace, _, name = method.partition(".")
    if params is None:
        params = []
    if not isinstance(params, (list, tuple)):
        raise ProtocolError(f"{method}: params must be an array", msgid)
    return Request(msgid=msgid, namespace=namespace, method=name, params=list(params))


def pack_response(packer: msgpack.Packer, msgid: int, error: str | None, result: Any) -> bytes:
    return packer.pack([RESPONSE, msgid, error, result])
