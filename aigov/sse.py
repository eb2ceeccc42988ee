"""Server-sent events: parsing, building, and OpenAI chat-completion streams.

Used by the cache (replaying a stored completion as a stream), the quota plugin (metering a
streamed response) and the mock LLM. Parsing follows the WHATWG event-stream rules (CR, LF or CRLF
line ends; `:` comments; one optional space after the colon; multi-line `data`), never raises on
garbled input, and keeps an unterminated trailing event apart so a cut stream is detectable.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from aigov.request import json_text

DONE = b"data: [DONE]\n\n"
DONE_DATA = "[DONE]"


@dataclass
class SSEEvent:
    data: str = ""
    event: str | None = None
    id: str | None = None
    retry: int | None = None

    @property
    def is_done(self) -> bool:
        return self.data.strip() == DONE_DATA

    def json(self) -> Any:
        """The data parsed as JSON, or None when it is not JSON (e.g. [DONE] or garbage)."""
        try:
            return json.loads(self.data)
        except ValueError:
            return None


_LINE_END = re.compile(r"\r\n|\r|\n")
_LINE_END_BYTES = re.compile(rb"\r\n|\r|\n")


class SSEParser:
    """Incremental parser: `feed()` bytes as they arrive, get the events completed so far.

    Bytes are buffered until a line end, so multi-byte UTF-8 characters split across feeds decode
    correctly; invalid UTF-8 becomes U+FFFD. `pending` tells whether an event was started but not
    terminated by a blank line (a cut stream).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._started = False
        self._first_line = True

    @property
    def pending(self) -> bool:
        return self._started or bool(self._buffer.strip())

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buffer = self._buffer + bytes(chunk)
        # A CR at the very end might be the first half of a CRLF: keep it for the next feed.
        held = b"\r" if buffer.endswith(b"\r") else b""
        lines = _LINE_END_BYTES.split(buffer[: len(buffer) - len(held)])
        self._buffer = lines.pop() + held  # the unterminated last line
        events: list[SSEEvent] = []
        for raw in lines:
            event = self._line(raw.decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
            self._started = True
        elif name == "event":
            self._event = value
            self._started = True
        elif name == "id" and "\0" not in value:
            self._id = value
            self._started = True
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None  # unknown fields are ignored, as the spec says

    def _dispatch(self) -> SSEEvent | None:
        data = self._data
        # Per the spec an event without data is not dispatched; the last id persists.
        event = SSEEvent("\n".join(data), self._event, self._id, self._retry) if data else None
        self._data, self._event, self._retry, self._started = [], None, None, False
        return event

    def close(self) -> tuple[list[SSEEvent], SSEEvent | None]:
        """End of input: (events completed by it, the unterminated trailing event or None).

        The trailing event was cut before its blank line; callers decide whether to trust it."""
        # A final line end completes a held CR or a last line without a line end; it dispatches
        # nothing by itself (that takes a blank line).
        events = self.feed(b"\n")
        tail = None
        if self._data:
            tail = SSEEvent("\n".join(self._data), self._event, self._id, self._retry)
        self._data, self._event, self._retry, self._started = [], None, None, False
        return events, tail


def parse_sse(data: bytes | str, include_partial: bool = False) -> list[SSEEvent]:
    """All complete events in `data`. An unterminated trailing event (a cut stream) is dropped,
    as the spec says, unless `include_partial` is set."""
    parser = SSEParser()
    events = parser.feed(data.encode("utf-8") if isinstance(data, str) else data)
    completed, tail = parser.close()
    events += completed
    if include_partial and tail is not None:
        events.append(tail)
    return events


def sse_event(obj: Any, event: str | None = None) -> bytes:
    """One SSE event: dicts/lists as compact JSON, str/bytes as-is (multi-line data split into
    several `data:` lines)."""
    if isinstance(obj, (bytes, bytearray)):
        text = bytes(obj).decode("utf-8", "replace")
    elif isinstance(obj, str):
        text = obj
    else:
        text = json_text(obj, separators=(",", ":"))
    lines = [f"event: {event}"] if event else []
    lines += [f"data: {part}" for part in _LINE_END.split(text)]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


_WORD_PIECE = re.compile(r"\s*\S+\s*|\s+")


def split_for_stream(text: str, words_per_chunk: int = 1) -> list[str]:
    """Split text into stream pieces (whitespace kept with its word) that join back exactly."""
    pieces = _WORD_PIECE.findall(text)
    if words_per_chunk > 1:
        pieces = ["".join(pieces[i:i + words_per_chunk]) for i in range(0, len(pieces), words_per_chunk)]
    return pieces


def chat_stream_chunks(completion: Mapping[str, Any], include_usage: bool = False,
                       words_per_chunk: int = 1) -> list[dict[str, Any]]:
    """The chat.completion.chunk objects a provider would stream for `completion`."""
    base: dict[str, Any] = {
        "id": completion.get("id") or "chatcmpl-replay",
        "object": "chat.completion.chunk",
        "created": completion.get("created") or int(time.time()),
        "model": completion.get("model") or "",
    }
    if completion.get("system_fingerprint"):
        base["system_fingerprint"] = completion["system_fingerprint"]
    if include_usage:
        base["usage"] = None  # OpenAI sends usage: null on every chunk but the last

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**base, "choices": choices}

    out: list[dict[str, Any]] = []
    choices = completion.get("choices")
    for position, choice in enumerate(choices if isinstance(choices, list) else []):
        if not isinstance(choice, Mapping):
            continue
        index = choice.get("index", position)
        message = choice.get("message") if isinstance(choice.get("message"), Mapping) else {}
        role = message.get("role") or "assistant"
        out.append(chunk([{"index": index, "delta": {"role": role, "content": ""},
                           "logprobs": None, "finish_reason": None}]))
        content = message.get("content")
        if isinstance(content, str):
            for piece in split_for_stream(content, words_per_chunk):
                out.append(chunk([{"index": index, "delta": {"content": piece},
                                   "logprobs": None, "finish_reason": None}]))
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list) and tool_calls:
            deltas = []
            for call_index, call in enumerate(tool_calls):
                if isinstance(call, Mapping):
                    deltas.append({"index": call_index, "id": call.get("id"),
                                   "type": call.get("type", "function"),
                                   "function": dict(call.get("function") or {})})
            out.append(chunk([{"index": index, "delta": {"tool_calls": deltas},
                               "logprobs": None, "finish_reason": None}]))
        out.append(chunk([{"index": index, "delta": {}, "logprobs": None,
                           "finish_reason": choice.get("finish_reason") or "stop"}]))
    if include_usage:
        out.append({**base, "choices": [], "usage": completion.get("usage")})
    return out


def chat_chunks_from_completion(completion: Mapping[str, Any], include_usage: bool = False,
                                words_per_chunk: int = 1) -> bytes:
    """A complete SSE stream for a non-stream chat completion: per choice a role chunk, content
    chunks and a finish chunk; then (include_usage) a usage chunk with empty choices; then one
    [DONE]."""
    return b"".join(sse_event(c) for c in chat_stream_chunks(
        completion, include_usage, words_per_chunk)) + DONE


@dataclass
class _ChoiceAccumulator:
    index: int
    role: str | None = None
    content: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    has_content: bool = False

    def add(self, choice: Mapping[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, Mapping):
            if isinstance(delta.get("role"), str):
                self.role = delta["role"]
            if isinstance(delta.get("content"), str):
                self.content.append(delta["content"])
                self.has_content = True
            for position, call in enumerate(delta.get("tool_calls") or []):
                if not isinstance(call, Mapping):
                    continue
                slot = self.tool_calls.setdefault(
                    call.get("index", position) if isinstance(call.get("index", position), int) else position,
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    slot["id"] = call["id"]
                if call.get("type"):
                    slot["type"] = call["type"]
                function = call.get("function")
                if isinstance(function, Mapping):
                    # Providers stream the name once and the arguments in pieces.
                    if isinstance(function.get("name"), str):
                        slot["function"]["name"] += function["name"]
                    if isinstance(function.get("arguments"), str):
                        slot["function"]["arguments"] += function["arguments"]
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]

    def result(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role or "assistant",
                                   "content": "".join(self.content) if self.has_content or not self.tool_calls else None}
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[k] for k in sorted(self.tool_calls)]
        return {"index": self.index, "message": message, "logprobs": None,
                "finish_reason": self.finish_reason}


def completion_from_chat_chunks(events: Iterable[SSEEvent] | bytes | str) -> tuple[dict[str, Any], bool]:
    """Reassemble a chat completion from a chunk stream.

    Returns (completion, complete). `complete` is False when the stream is cut: no [DONE], no
    choice, or a choice without finish_reason; or when a chunk carried an `error`. Events that are
    not JSON are skipped (and make the stream incomplete, since data was lost).
    """
    if isinstance(events, (bytes, bytearray, str)):
        events = parse_sse(events)
    completion: dict[str, Any] = {"id": None, "object": "chat.completion", "created": None,
                                  "model": None, "choices": []}
    choices: dict[int, _ChoiceAccumulator] = {}
    usage: Any = None
    done = False
    garbled = False
    error: Any = None
    for event in events:
        if not isinstance(event, SSEEvent):
            continue
        if event.is_done:
            done = True
            continue
        chunk = event.json()
        if not isinstance(chunk, Mapping):
            garbled = True
            continue
        if chunk.get("error") is not None:
            error = chunk["error"]
        for key in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(key) is not None and completion.get(key) is None:
                completion[key] = chunk[key]
        if isinstance(chunk.get("usage"), Mapping):
            usage = dict(chunk["usage"])
        for position, choice in enumerate(chunk.get("choices") or []):
            if not isinstance(choice, Mapping):
                continue
            index = choice.get("index", position)
            index = index if isinstance(index, int) else position
            choices.setdefault(index, _ChoiceAccumulator(index)).add(choice)
    completion["choices"] = [choices[i].result() for i in sorted(choices)]
    if usage is not None:
        completion["usage"] = usage
    if error is not None:
        completion["error"] = error
    complete = (done and not garbled and error is None and bool(choices)
                and all(c.finish_reason for c in choices.values()))
    return completion, complete
