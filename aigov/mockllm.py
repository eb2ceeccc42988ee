"""`aigov mock-llm`: a deterministic OpenAI-compatible upstream for tests and the demo.

Endpoints: POST /v1/chat/completions (JSON, or SSE with `stream: true`), POST /v1/embeddings,
GET /v1/models, GET /health, GET /mock/stats (requests by path, model, status and failure, and
`tokens_billed`: the usage total of every completion generated, cut ones too), POST /mock/reset.
Any other method on these paths gets 405 (with Allow), any other path 404, and a body over
MAX_BODY_BYTES 413, each with an OpenAI-shaped JSON error body (an unread body is drained, so
the client reads the answer instead of a reset connection).

Answers are derived from the prompt ("Answer to: <last user text> [<hash of model+messages>]"),
`usage` is counted with aigov.tokens, and `max_tokens` / `max_completion_tokens` truncate the
answer with finish_reason "length"; `n` returns that many choices (the same text), each billed.

Chat requests are validated like OpenAI's endpoint (`check_chat_request`): wrong types or values
of messages, roles, contents and the common sampling/stream parameters, unparseable JSON and
JSON nested deeper than MAX_JSON_DEPTH get 400 with an OpenAI-shaped invalid_request_error body;
`null` counts as "not given" for optional parameters, as OpenAI takes it.

Per-request behaviour, switched by request headers:
  X-Mock-Fail: 429          rate-limit error (Retry-After: 1)
               500          server error
               cut          the body stops mid-way: a stream without finish chunk or [DONE]
                            (chunked encoding not terminated); JSON cut after half its bytes
               length       finish_reason "length" with the answer cut to half its tokens
               timeout      no response; the connection closes after `hang_s` (or at stop())
               slow-stream  stream chunks are sent `slow_chunk_ms` apart
  X-Mock-Latency-Ms: N      wait N ms before answering (capped at 60 s)
  X-Mock-Usage: none        no usage anywhere (no usage chunk even with include_usage)
                final       streams end with the usage chunk even without include_usage
                total=N[,prompt=P][,completion=C]   report these numbers instead of the counts

Response headers tell tests what reached the upstream without exposing secrets:
X-Mock-Model (the model asked for), X-Mock-Auth-Header (which credential header arrived) and
X-Mock-Auth-Sha256 (first 16 hex digits of the SHA-256 of its value). Credentials are never
logged or stored.
"""
from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import http.server
import json
import logging
import math
import signal
import socket
import socketserver
import struct
import threading
import time
import uuid
from typing import Any, Mapping

from aigov import sse, tokens
from aigov import request as request_fields

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")
DEFAULT_EMBEDDING_DIM = 384
MAX_BODY_BYTES = 8 * 1024 * 1024
# Deeper JSON is refused as unparseable; without a bound, json.loads (and json.dumps for the
# answer hash) hit Python's recursion limit and the client got a 500 instead of a 400.
MAX_JSON_DEPTH = 128
MAX_LATENCY_MS = 60_000
MAX_CONCURRENT_REQUESTS = 64
ANSWER_ECHO_CHARS = 200  # the answer quotes at most this much of the prompt
AUTH_HEADERS = ("authorization", "api-key", "x-api-key", "apikey")  # OpenAI, Azure, Anthropic; Kong key-auth


def auth_fingerprint(value: str) -> str:
    """What X-Mock-Auth-Sha256 reports for a credential header value (16 hex digits)."""
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:16]


def last_user_text(messages: Any) -> str:
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return tokens.content_text(message.get("content"))
    return ""


def answer_for(model: str, messages: Any) -> str:
    """The deterministic answer: quotes the last user text, hashes the whole conversation."""
    digest = hashlib.sha256(json.dumps([model, messages], sort_keys=True, default=str)
                            .encode("utf-8", "replace")).hexdigest()[:8]
    quoted = " ".join(last_user_text(messages).split())[:ANSWER_ECHO_CHARS]
    return f"Answer to: {quoted} [{digest}]"


def embedding_for(text: str, dimensions: int = DEFAULT_EMBEDDING_DIM) -> list[float]:
    """A deterministic unit vector for `text` (hash-based: equal texts get equal vectors,
    different texts nearly orthogonal ones; no semantics)."""
    values: list[float] = []
    counter = 0
    seed = text.encode("utf-8", "replace")
    while len(values) < dimensions:
        block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        values.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


class MockError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.code, self.param = (
            status, message, error_type, code, param)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


CHAT_ROLES = ("system", "assistant", "user", "function", "tool", "developer")
# content-part types each role may send (OpenAI's chat completions request schema)
_PART_TYPES = {"user": ("text", "image_url", "input_audio", "file"), "system": ("text",),
               "developer": ("text",), "tool": ("text",), "assistant": ("text", "refusal")}
# optional parameters: (kind, minimum, maximum); null is accepted for all of them
_CHAT_PARAMS: dict[str, tuple[str, float | None, float | None]] = {
    "stream": ("boolean", None, None),
    "max_tokens": ("integer", 1, None),
    "max_completion_tokens": ("integer", 1, None),
    "n": ("integer", 1, 128),
    "temperature": ("number", 0, 2),
    "top_p": ("number", 0, 1),
    "presence_penalty": ("number", -2, 2),
    "frequency_penalty": ("number", -2, 2),
    "seed": ("integer", None, None),
    "stream_options": ("object", None, None),
}
_EXPECTED = {"boolean": "a boolean", "integer": "an integer", "number": "a decimal",
             "object": "an object", "string": "a string", "array": "an array"}


def _json_type(value: Any) -> str:
    """How OpenAI's errors name the JSON type of `value`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _type_error(param: str, expected: str, value: Any) -> MockError:
    return MockError(400, f"Invalid type for '{param}': expected {expected}, but got "
                          f"{_json_type(value)} instead.", code="invalid_type", param=param)


def _value_error(param: str, value: Any, allowed: tuple[str, ...]) -> MockError:
    listed = ", ".join(f"'{a}'" for a in allowed[:-1]) + f", and '{allowed[-1]}'"
    return MockError(400, f"Invalid value: '{value}'. Supported values are: {listed}.",
                     code="invalid_value", param=param)


def _empty_array(param: str) -> MockError:
    return MockError(400, f"Invalid '{param}': empty array. Expected an array with minimum "
                          "length 1, but got an empty array instead.", code="empty_array", param=param)


def _missing(param: str) -> MockError:
    return MockError(400, f"Missing required parameter: '{param}'.",
                     code="missing_required_parameter", param=param)


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "object":
        return isinstance(value, Mapping)
    if kind == "string":
        return isinstance(value, str)
    return isinstance(value, list)


def _check_param(name: str, value: Any, kind: str, low: float | None, high: float | None) -> None:
    if value is None:
        return  # OpenAI takes null as "not given"
    if not _is_kind(value, kind):
        raise _type_error(name, _EXPECTED[kind], value)
    if kind not in ("integer", "number"):
        return
    word = "integer" if kind == "integer" else "decimal"
    shown = value if kind == "integer" or not float(value).is_integer() else int(value)
    if low is not None and value < low:
        raise MockError(400, f"Invalid '{name}': {word} below minimum value. Expected a value >= "
                             f"{low}, but got {shown} instead.", code=f"{word}_below_min_value",
                        param=name)
    if high is not None and value > high:
        raise MockError(400, f"Invalid '{name}': {word} above maximum value. Expected a value <= "
                             f"{high}, but got {shown} instead.", code=f"{word}_above_max_value",
                        param=name)


def _one_of(obj: Mapping[str, Any], key: str, where: str, allowed: tuple[str, ...]) -> str:
    """obj[key], which must be present, a string and one of `allowed` (OpenAI's three errors)."""
    param = f"{where}.{key}"
    if key not in obj:
        raise _missing(param)
    chosen = obj[key]
    if not isinstance(chosen, str):
        raise _type_error(param, "a string", chosen)
    if chosen not in allowed:
        raise _value_error(param, chosen, allowed)
    return chosen


def _check_content(where: str, role: str, message: Mapping[str, Any]) -> None:
    param = f"{where}.content"
    if "content" not in message:
        if role in ("assistant", "function"):
            return  # optional for these (assistant tool-call turns carry none)
        raise _missing(param)
    content = message["content"]
    if content is None:
        if role in ("assistant", "function"):
            return
        raise MockError(400, "Invalid value for 'content': expected a string, got null.",
                        code="invalid_type", param=param)
    if isinstance(content, str):
        return
    if role == "function":
        raise _type_error(param, "a string", content)
    if not isinstance(content, list):
        raise _type_error(param, "one of a string or array of objects", content)
    if not content:
        raise _empty_array(param)
    allowed = _PART_TYPES[role]
    for j, part in enumerate(content):
        part_param = f"{param}[{j}]"
        if not isinstance(part, Mapping):
            raise _type_error(part_param, "an object", part)
        kind = _one_of(part, "type", part_param, allowed)
        field = kind  # each part carries its payload under its type's name
        if field not in part:
            raise _missing(f"{part_param}.{field}")
        expected = "string" if kind in ("text", "refusal") else "object"
        if not _is_kind(part[field], expected):
            raise _type_error(f"{part_param}.{field}", _EXPECTED[expected], part[field])
        if kind == "image_url" and not isinstance(part[field].get("url"), str):
            if "url" not in part[field]:
                raise _missing(f"{part_param}.image_url.url")
            raise _type_error(f"{part_param}.image_url.url", "a string", part[field]["url"])


def check_chat_request(body: Mapping[str, Any]) -> None:
    """Raise MockError(400) where OpenAI's chat completions endpoint answers 400
    invalid_request_error: wrong types or values of messages (items, role, content, name) and of
    the optional parameters in _CHAT_PARAMS, for which null means "not given"."""
    if "messages" not in body:
        raise _missing("messages")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise _empty_array("messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise _type_error(where, "an object", message)
        role = _one_of(message, "role", where, CHAT_ROLES)
        _check_content(where, role, message)
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise _type_error(f"{where}.name", "a string", message["name"])
    for name, (kind, low, high) in _CHAT_PARAMS.items():
        _check_param(name, body.get(name), kind, low, high)
    stream_options = body.get("stream_options")
    if isinstance(stream_options, Mapping):
        _check_param("stream_options.include_usage", stream_options.get("include_usage"),
                     "boolean", None, None)


def _json_depth_ok(value: Any, limit: int) -> bool:
    # iterative, so checking a deep document cannot itself overflow the stack
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def parse_usage_override(value: str) -> dict[str, int] | None:
    """`total=298[,prompt=P][,completion=C]` → the numbers to report; None if not an override."""
    numbers: dict[str, int] = {}
    for part in value.split(","):
        key, sep, number = part.strip().partition("=")
        if not sep:
            return None
        key = key.strip().lower()
        if key not in ("total", "prompt", "completion") or not number.strip().isdigit():
            raise MockError(400, f"X-Mock-Usage: cannot parse {part.strip()!r}; expected "
                                 "none, final or total=N[,prompt=P][,completion=C]")
        numbers[key] = int(number)
    return numbers


class MockStats:
    """Per-instance counters, safe across handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.tokens_billed = 0  # the usage total of every completion generated
            self.by_model: collections.Counter[str] = collections.Counter()
            self.by_path: collections.Counter[str] = collections.Counter()
            self.by_status: collections.Counter[int] = collections.Counter()
            self.by_fail: collections.Counter[str] = collections.Counter()
            # Recent calls for assertions (which model/key reached the upstream); bounded.
            self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests += 1
            self.tokens_billed += entry.get("billed_tokens") or 0
            self.by_path[entry["path"]] += 1
            self.by_status[entry["status"]] += 1
            if entry.get("model"):
                self.by_model[entry["model"]] += 1
            if entry.get("fail"):
                self.by_fail[entry["fail"]] += 1
            self.recent.append(entry)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "tokens_billed": self.tokens_billed,
                    "by_model": dict(self.by_model),
                    "by_path": dict(self.by_path),
                    "by_status": {str(k): v for k, v in self.by_status.items()},
                    "by_fail": dict(self.by_fail), "recent": list(self.recent)}


class _BoundedThreadingHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type, mock: "MockLLM") -> None:
        self.mock = mock
        # Bounded concurrency: the accept loop waits for a free slot (backpressure via backlog).
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON, chunked encoding for streams
    # Headers and body go out in separate writes; with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms per request). TCP_NODELAY removes that floor.
    disable_nagle_algorithm = True
    server_version = "aigov-mock-llm/0.1"
    timeout = 30  # a silent client must not hold a handler thread forever

    server: _BoundedThreadingHTTPServer
    # what send_response/_record_stats read before _dispatch set them (e.g. the stdlib's own
    # send_error for a request line it cannot parse)
    _path = ""
    _recorded = False
    _status = 0
    _linger = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("mock-llm %s - %s", self.address_string(), format % args)

    # ---- plumbing -------------------------------------------------------------------------
    @property
    def mock(self) -> "MockLLM":
        return self.server.mock

    def _auth(self) -> tuple[str, str]:
        for name in AUTH_HEADERS:
            value = self.headers.get(name)
            if value is not None:
                return name, auth_fingerprint(value)
        return "none", "none"

    def _common_headers(self, model: str | None) -> dict[str, str]:
        header_name, fingerprint = self._auth()
        headers = {"X-Mock-Auth-Header": header_name, "X-Mock-Auth-Sha256": fingerprint,
                   "X-Mock-Request-Id": self._request_id}
        if model is not None:
            headers["X-Mock-Model"] = model
        return headers

    def _send_json(self, status: int, body: Any, model: str | None = None,
                   extra: Mapping[str, str] | None = None) -> None:
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in {**self._common_headers(model), **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has the headers of the GET, no body
            self.wfile.write(payload)
        self._status = status

    def _discard_body(self) -> None:
        """Read and drop a request body no handler reads, so a kept-alive connection stays in
        step; one too large to read (or chunked) is drained after the answer instead."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection, self._linger = True, True
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            return
        if 0 < length <= MAX_BODY_BYTES:
            self.rfile.read(length)
        elif length > MAX_BODY_BYTES:
            self.close_connection, self._linger = True, True

    def _lingering_close(self) -> None:
        """Like nginx's lingering_close: after an answer sent before the request body was
        read, stop sending and read (and drop) what the client still sends for a while, so
        it is not reset before it reads the answer (closing a socket with unread data sends
        a RST). Bounded like nginx's lingering_time 30s / lingering_timeout 5s."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(5.0)
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline and not self.mock._stopping.is_set():
                if not self.rfile.read1(65536):
                    break
        except OSError:
            pass

    def _read_json(self) -> Any:
        length_header = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection, self._linger = True, True
            raise MockError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(length_header or 0)
        except ValueError:
            raise MockError(400, "invalid Content-Length") from None
        if length < 0 or length > MAX_BODY_BYTES:
            # the unread body would poison a kept-alive connection: answer, then drain it
            self.close_connection, self._linger = True, True
            raise MockError(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _unparseable(str(exc)) from None
        except RecursionError:
            raise _unparseable(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
        if not _json_depth_ok(body, MAX_JSON_DEPTH):
            raise _unparseable(f"nested deeper than {MAX_JSON_DEPTH} levels")
        return body

    def _sleep(self, milliseconds: float) -> None:
        if milliseconds > 0:
            # Interruptible: stop() does not wait for sleeping handlers.
            self.mock._stopping.wait(min(milliseconds, MAX_LATENCY_MS) / 1000.0)

    # ---- dispatch ---------------------------------------------------------------------------
    def _any_method(self) -> None:
        self._dispatch(self.command)

    # Every method goes through _dispatch: without a do_X the stdlib answers 501 itself (and
    # dropped the connection: send_response read attributes _dispatch sets). Any other method
    # than a route's on a known path is a 405, elsewhere a 404, with the same JSON error body.
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _any_method

    def _dispatch(self, method: str) -> None:
        self._request_id = uuid.uuid4().hex[:12]
        self._status = 0
        self._model: str | None = None
        self._fail: str | None = None
        self._billed = 0
        self._recorded = False
        self._linger = False
        path = self._path = self.path.split("?", 1)[0].rstrip("/") or "/"
        routes = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): lambda: self._send_json(200, {"status": "ok"}),
            ("GET", "/mock/stats"): lambda: self._send_json(200, self.mock.stats.snapshot()),
            ("POST", "/mock/reset"): self._reset,
        }
        handler = routes.get((method, path))
        extra: dict[str, str] = {}
        try:
            if handler is None:
                self._discard_body()
                allowed = sorted(m for (m, p) in routes if p == path)
                if allowed:
                    extra["Allow"] = ", ".join(allowed)  # RFC 9110: a 405 lists them
                raise MockError(405 if allowed else 404,
                                f"{method} {path} is not served by the mock LLM")
            handler()
        except MockError as exc:
            self._send_json(exc.status, exc.body(), self._model, extra)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in the mock: answer 500 rather than drop the client
            log.exception("mock-llm: internal error")
            try:
                self._send_json(500, MockError(500, f"mock internal error: {exc}", "server_error").body())
            except OSError:
                self.close_connection = True
        finally:
            self._record_stats()  # a call that sent no answer (timeout, dropped client) too
            if self._linger:
                self._lingering_close()

    def send_response(self, code: int, message: str | None = None) -> None:
        # Recorded as the answer starts, so a client that has read it finds it in the stats.
        self._status = code
        self._record_stats()
        super().send_response(code, message)

    def _record_stats(self) -> None:
        if self._recorded or not self._path.startswith("/v1/"):
            return
        self._recorded = True
        header_name, fingerprint = self._auth()
        self.mock.stats.record({"path": self._path, "model": self._model, "status": self._status,
                                "fail": self._fail, "billed_tokens": self._billed,
                                "auth_header": header_name,
                                "auth_sha256": fingerprint, "request_id": self._request_id})

    def _reset(self) -> None:
        self.mock.stats.reset()
        self._send_json(200, {"reset": True})

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "aigov-mock"}
            for m in self.mock.models]})

    def _check_model(self, body: Mapping[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise MockError(400, "you must provide a model parameter", param="model")
        self._model = model
        if self.mock.restrict_models and model not in self.mock.models:
            raise MockError(404, f"The model `{model}` does not exist", code="model_not_found",
                            param="model")
        return model

    def _apply_failure_headers(self) -> str | None:
        """Latency and the X-Mock-Fail modes that answer before any work. Returns the mode."""
        latency = self.mock.latency_ms
        header_latency = self.headers.get("X-Mock-Latency-Ms")
        if header_latency is not None:
            try:
                latency = float(header_latency)
            except ValueError:
                raise MockError(400, "X-Mock-Latency-Ms must be a number of milliseconds") from None
        self._sleep(latency)
        fail = (self.headers.get("X-Mock-Fail") or "").strip().lower() or None
        self._fail = fail
        if fail is None:
            return None
        if fail == "429":
            raise _RateLimited()
        if fail == "500":
            raise MockError(500, "The server had an error while processing your request (mock)",
                            "server_error")
        if fail == "timeout":
            self.mock._stopping.wait(self.mock.hang_s)
            self.close_connection = True
            raise _NoResponse()
        if fail not in ("cut", "length", "slow-stream"):
            raise MockError(400, f"X-Mock-Fail: unknown mode {fail!r} "
                                 "(429, 500, cut, length, timeout, slow-stream)")
        return fail

    # ---- chat ------------------------------------------------------------------------------
    def _chat(self) -> None:
        try:
            self._chat_inner()
        except _RateLimited:
            self._send_json(429, MockError(429, "Rate limit reached for requests (mock)",
                                           "rate_limit_exceeded", "rate_limit_exceeded").body(),
                            self._model, {"Retry-After": "1"})
        except _NoResponse:
            pass

    def _chat_inner(self) -> None:
        body = self._read_json()
        if not isinstance(body, Mapping):
            raise MockError(400, "request body must be a JSON object")
        model = self._check_model(body)
        check_chat_request(body)
        messages = body["messages"]
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        usage_mode = (self.headers.get("X-Mock-Usage") or "").strip().lower()
        usage_override = None
        if usage_mode not in ("", "none", "final"):
            usage_override = parse_usage_override(usage_mode)
            if usage_override is None:
                raise MockError(400, f"X-Mock-Usage: unknown value {usage_mode!r}")
        fail = self._apply_failure_headers()

        encoding = tokens.encoding_for(model)
        answer_tokens = encoding.encode_ordinary(answer_for(model, messages))
        finish_reason = "stop"
        limit = max_tokens
        if fail == "length":
            limit = max(1, len(answer_tokens) // 2) if limit is None else min(limit, max(1, len(answer_tokens) // 2))
        if limit is not None and len(answer_tokens) > limit:
            answer_tokens, finish_reason = answer_tokens[:limit], "length"
        content = encoding.decode(answer_tokens)
        # Billed as prompt: tool definitions (the legacy `functions` too) and a response schema.
        prompt_tokens = tokens.count_chat_messages(messages, model, request_fields.tool_definitions(body),
                                                   request_fields.prompt_extras(body))
        n = body.get("n") or 1  # check_chat_request has checked it: an integer in 1..128
        completion_tokens = tokens.count_text(content, model) * n  # OpenAI bills every choice
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if usage_override:
            usage = _overridden_usage(usage, usage_override)
        self._billed = usage["total_tokens"]  # generated, so billed: also when cut or sent without usage
        completion = {
            "id": f"chatcmpl-mock-{self._request_id}", "object": "chat.completion",
            "created": int(time.time()), "model": model, "system_fingerprint": "fp_aigov_mock",
            "choices": [{"index": i, "message": {"role": "assistant", "content": content,
                                                  "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason} for i in range(n)],
            "usage": usage,
        }
        if usage_mode == "none":
            del completion["usage"]
        if body.get("stream") is True:
            stream_options = body.get("stream_options")
            include_usage = isinstance(stream_options, Mapping) and stream_options.get("include_usage") is True
            include_usage = (include_usage or usage_mode == "final") and usage_mode != "none"
            self._stream(completion, include_usage, fail)
        elif fail == "cut":
            payload = json.dumps(completion).encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))  # promises more than it sends
            for key, value in self._common_headers(model).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self._status = 200
            self._abort_connection()
        else:
            self._send_json(200, completion, model)

    def _stream(self, completion: dict[str, Any], include_usage: bool, fail: str | None) -> None:
        chunks = sse.chat_stream_chunks(completion, include_usage)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for key, value in self._common_headers(self._model).items():
            self.send_header(key, value)
        self.end_headers()
        self._status = 200
        if fail == "cut":
            # Role chunk and about half the content; no finish chunk, no usage, no [DONE].
            content_chunks = len(chunks) - 1 - (1 if include_usage else 0) - 1
            chunks = chunks[: 1 + max(1, content_chunks // 2)]
        delay_ms = self.mock.slow_chunk_ms if fail == "slow-stream" else self.mock.chunk_delay_ms
        for chunk in chunks:
            self._write_chunk(sse.sse_event(chunk))
            self._sleep(delay_ms)
            if self.mock._stopping.is_set():
                break
        if fail == "cut":
            self._abort_connection()
            return
        self._write_chunk(sse.DONE)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _abort_connection(self) -> None:
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---- embeddings ----------------------------------------------------------------------------
    def _embeddings(self) -> None:
        try:
            body = self._read_json()
            if not isinstance(body, Mapping):
                raise MockError(400, "request body must be a JSON object")
            model = self._check_model(body)
            self._apply_failure_headers()
        except _RateLimited:
            self._send_json(429, MockError(429, "Rate limit reached (mock)", "rate_limit_exceeded",
                                           "rate_limit_exceeded").body(), self._model,
                            {"Retry-After": "1"})
            return
        except _NoResponse:
            return
        inputs = request_fields.embeddings_inputs(body.get("input"))
        if inputs is None:
            raise MockError(400, "input must be a string, an array of strings or token arrays",
                            param="input")
        # A token array is embedded as its JSON text and billed one token per id.
        texts = [x if isinstance(x, str) else json.dumps(x) for x in inputs]
        dimensions = body.get("dimensions", DEFAULT_EMBEDDING_DIM)
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= 4096:
            raise MockError(400, "dimensions must be an integer from 1 to 4096", param="dimensions")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = embedding_for(text, dimensions)
            value: Any = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() \
                if as_base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": value})
        prompt_tokens = sum(tokens.count_text(x, model) if isinstance(x, str) else len(x) for x in inputs)
        self._billed = prompt_tokens
        self._send_json(200, {"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}},
                        model)


def _unparseable(detail: str) -> MockError:
    # OpenAI's wording for a body it cannot parse, with what our parser said
    return MockError(400, "We could not parse the JSON body of your request. (HINT: This likely "
                          "means you aren't using your HTTP library correctly. The OpenAI API "
                          "expects a JSON payload, but what was sent was not valid JSON.) "
                          f"[{detail}]")


class _RateLimited(Exception):
    pass


class _NoResponse(Exception):
    pass


def _overridden_usage(counted: dict[str, int], override: dict[str, int]) -> dict[str, int]:
    prompt = override.get("prompt", counted["prompt_tokens"])
    if "total" in override:
        total = override["total"]
        prompt = min(prompt, total)
        completion = override.get("completion", total - prompt)
    else:
        completion = override.get("completion", counted["completion_tokens"])
        total = prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


class MockLLM:
    """The mock upstream, in-process: `MockLLM("127.0.0.1").start()`, `.url`, `.stop()`.

    models: names listed by /v1/models; with restrict_models=True other names get 404.
    latency_ms: wait before every answer. chunk_delay_ms: gap between stream chunks.
    hang_s: how long `X-Mock-Fail: timeout` holds the connection.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0,
                 models: list[str] | tuple[str, ...] | None = None, restrict_models: bool | None = None,
                 chunk_delay_ms: float = 0, slow_chunk_ms: float = 200, hang_s: float = 30) -> None:
        self.host = host
        self.port = port
        self.latency_ms = latency_ms
        self.models = tuple(models) if models else DEFAULT_MODELS
        self.restrict_models = bool(models) if restrict_models is None else restrict_models
        self.chunk_delay_ms = chunk_delay_ms
        self.slow_chunk_ms = slow_chunk_ms
        self.hang_s = hang_s
        self.stats = MockStats()
        self._stopping = threading.Event()
        self._server: _BoundedThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL without /v1, e.g. http://127.0.0.1:40123."""
        if self._server is None:
            raise RuntimeError("MockLLM is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> "MockLLM":
        if self._server is not None:
            return self
        tokens.ensure_offline_encodings()
        self._stopping.clear()
        self._server = _BoundedThreadingHTTPServer((self.host, self.port), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"mock-llm:{self.port}", daemon=True)
        self._thread.start()
        log.info("mock LLM listening on %s", self.url)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes sleeping/hanging handlers
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "MockLLM":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- CLI: aigov mock-llm ---------------------------------------------------------------------------
def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", type=_listen_address, default=("127.0.0.1", 8081),
                        metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:8081)")
    parser.add_argument("--latency-ms", type=float, default=0, help="wait before every answer")
    parser.add_argument("--chunk-delay-ms", type=float, default=0, help="gap between stream chunks")
    parser.add_argument("--models", default=None,
                        help="comma-separated model names to serve; others get 404 "
                             f"(default: any model; /v1/models lists {','.join(DEFAULT_MODELS)})")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    host, port = args.listen
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    mock = MockLLM(host, port, latency_ms=args.latency_ms, models=models,
                   chunk_delay_ms=args.chunk_delay_ms)
    # The handlers come first: a SIGTERM sent as soon as the mock answers must stop it cleanly.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        mock.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", host, port, exc)
        return 1
    while not stop.wait(0.5):
        pass
    mock.stop()
    return 0
