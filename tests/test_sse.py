"""aigov.sse: parsing per the event-stream rules, stream building, reassembly and cut detection."""
from __future__ import annotations

import json

import pytest

from aigov import sse

COMPLETION = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
    "system_fingerprint": "fp_1",
    "choices": [{"index": 0, "message": {"role": "assistant",
                                         "content": "Paris is the capital of France.\nIt is big. ü"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}


def test_parse_line_endings_comments_and_multiline_data() -> None:
    raw = (b": keep-alive comment\r\n"
           b"event: message\r\nid: 7\r\ndata: first\r\ndata:second\r\n\r\n"
           b"data: {\"a\": 1}\r\r"
           b"retry: 1500\ndata: x\n\n")
    events = sse.parse_sse(raw)
    assert [e.data for e in events] == ["first\nsecond", "{\"a\": 1}", "x"]
    assert events[0].event == "message" and events[0].id == "7"
    assert events[1].id == "7"  # the last event id persists
    assert events[1].json() == {"a": 1}
    assert events[2].retry == 1500
    assert events[0].json() is None


def test_events_without_data_are_not_dispatched() -> None:
    assert sse.parse_sse(b"event: ping\n\n: comment\n\nid: 1\n\n") == []


def test_unterminated_trailing_event_is_dropped_unless_asked_for() -> None:
    raw = b"data: one\n\ndata: tw"
    assert [e.data for e in sse.parse_sse(raw)] == ["one"]
    assert [e.data for e in sse.parse_sse(raw, include_partial=True)] == ["one", "tw"]


def test_incremental_feeding_byte_by_byte_matches_whole_parse() -> None:
    raw = sse.chat_chunks_from_completion(COMPLETION, include_usage=True)
    parser = sse.SSEParser()
    events = []
    for i in range(len(raw)):  # splits multi-byte UTF-8 and CRLF pairs too
        events += parser.feed(raw[i:i + 1])
    completed, tail = parser.close()
    events += completed
    assert tail is None and not parser.pending
    assert [e.data for e in events] == [e.data for e in sse.parse_sse(raw)]


def test_crlf_split_across_feeds_is_one_line_end() -> None:
    parser = sse.SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\r") == []
    assert [e.data for e in parser.feed(b"\n")] == ["a"]


def test_garbled_input_never_raises() -> None:
    garbage = bytes(range(256)) * 4 + b"\n\ndata: \xff\xfe ok\n\n:\n\ndata"
    events = sse.parse_sse(garbage)
    assert events[-1].data == "\ufffd\ufffd ok"
    completion, complete = sse.completion_from_chat_chunks(garbage)
    assert complete is False and completion["choices"] == []


def test_sse_event_builds_json_and_multiline_text() -> None:
    assert sse.sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert sse.sse_event("l1\nl2", event="note") == b"event: note\ndata: l1\ndata: l2\n\n"
    assert sse.parse_sse(sse.sse_event("l1\r\nl2"))[0].data == "l1\nl2"
    assert sse.DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_from_completion_is_valid_and_round_trips(include_usage: bool) -> None:
    stream = sse.chat_chunks_from_completion(COMPLETION, include_usage=include_usage)
    events = sse.parse_sse(stream)
    assert stream.endswith(sse.DONE) and stream.count(b"[DONE]") == 1
    chunks = [e.json() for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content_chunks) > 3  # really streamed in pieces
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == COMPLETION["usage"]
        assert all(c["usage"] is None for c in chunks[:-1])  # OpenAI's null usage on other chunks
        finish = chunks[-2]
    else:
        assert all("usage" not in c for c in chunks)
        finish = chunks[-1]
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}

    rebuilt, complete = sse.completion_from_chat_chunks(events)
    assert complete is True
    assert rebuilt["choices"][0]["message"]["content"] == COMPLETION["choices"][0]["message"]["content"]
    assert rebuilt["choices"][0]["finish_reason"] == "stop"
    assert rebuilt["model"] == "gpt-4o-mini" and rebuilt["id"] == "chatcmpl-1"
    assert rebuilt.get("usage") == (COMPLETION["usage"] if include_usage else None)


def test_cut_stream_is_incomplete_at_every_cut_point() -> None:
    stream = sse.chat_chunks_from_completion(COMPLETION, include_usage=True)
    full_text = COMPLETION["choices"][0]["message"]["content"]
    for cut in range(0, len(stream) - len(sse.DONE), 37):
        completion, complete = sse.completion_from_chat_chunks(stream[:cut])
        assert complete is False, cut
        if completion["choices"]:
            assert full_text.startswith(completion["choices"][0]["message"]["content"])


def test_missing_done_or_finish_reason_means_incomplete() -> None:
    stream = sse.chat_chunks_from_completion(COMPLETION)
    without_done = stream[: -len(sse.DONE)]
    assert sse.completion_from_chat_chunks(without_done)[1] is False
    events = [e for e in sse.parse_sse(stream)
              if not (e.json() or {}).get("choices", [{}])[0].get("finish_reason")]
    assert sse.completion_from_chat_chunks(events)[1] is False
    assert sse.completion_from_chat_chunks(sse.DONE)[1] is False  # [DONE] alone: no choice


def test_error_event_mid_stream_is_incomplete() -> None:
    stream = (sse.sse_event({"id": "x", "choices": [{"index": 0, "delta": {"content": "Hi"}}]})
              + sse.sse_event({"error": {"message": "overloaded"}}) + sse.DONE)
    completion, complete = sse.completion_from_chat_chunks(stream)
    assert complete is False and completion["error"] == {"message": "overloaded"}


def test_tool_call_arguments_are_reassembled() -> None:
    chunks = [
        {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    stream = b"".join(sse.sse_event(c) for c in chunks) + sse.DONE
    completion, complete = sse.completion_from_chat_chunks(stream)
    assert complete is True
    message = completion["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]
    # and back: a completion with tool calls streams and reassembles to the same message
    again, ok = sse.completion_from_chat_chunks(sse.chat_chunks_from_completion(completion))
    assert ok and again["choices"][0]["message"]["tool_calls"] == message["tool_calls"]


def test_multiple_choices_round_trip() -> None:
    completion = {**COMPLETION, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "one two"}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "three"}, "finish_reason": "length"}]}
    rebuilt, complete = sse.completion_from_chat_chunks(sse.chat_chunks_from_completion(completion))
    assert complete
    assert [(c["message"]["content"], c["finish_reason"]) for c in rebuilt["choices"]] == [
        ("one two", "stop"), ("three", "length")]


def test_malformed_completion_still_gives_a_valid_stream() -> None:
    stream = sse.chat_chunks_from_completion({"choices": [None, {"message": "x"}]}, include_usage=True)
    events = sse.parse_sse(stream)
    assert events[-1].is_done and all(e.json() is not None for e in events[:-1])
    json.dumps(sse.completion_from_chat_chunks(events)[0])  # serialisable
