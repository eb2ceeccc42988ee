"""The mock LLM over real HTTP: JSON and SSE answers, usage counted with aigov.tokens, failure
injection, embeddings, stats, bad input, concurrency and the `aigov mock-llm` command."""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aigov import sse, tokens
from aigov.devredis import free_port
from aigov.mockllm import MockLLM

REPO = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}]


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, error: Exception | None):
        self.status, self.headers, self.body, self.error = status, headers, body, error

    def json(self) -> Any:
        return json.loads(self.body)


def call(mock: MockLLM, path: str, body: Any = None, headers: dict[str, str] | None = None,
         method: str = "POST", timeout: float = 10, raw: bytes | None = None) -> Reply:
    conn = http.client.HTTPConnection(mock.host, mock.port, timeout=timeout)
    try:
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, payload, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        error = None
        try:
            data = response.read()
        except http.client.IncompleteRead as exc:
            data, error = exc.partial, exc
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data, error)
    finally:
        conn.close()


def chat(mock: MockLLM, headers: dict[str, str] | None = None, **fields: Any) -> Reply:
    return call(mock, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES, **fields},
                headers)


def test_json_completion_is_deterministic_and_usage_matches_tokens(mock_llm: MockLLM) -> None:
    first, second = chat(mock_llm), chat(mock_llm)
    assert first.status == 200 and first.headers["content-type"] == "application/json"
    body = first.json()
    content = body["choices"][0]["message"]["content"]
    assert content.startswith("Answer to: What is the capital of France? [")
    assert second.json()["choices"][0]["message"]["content"] == content
    other = call(mock_llm, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "What is the capital of Spain?"}]}).json()
    assert other["choices"][0]["message"]["content"] != content
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["object"] == "chat.completion" and body["model"] == "gpt-4o-mini"
    prompt = tokens.count_chat_messages(MESSAGES, "gpt-4o-mini")
    completion = tokens.count_text(content, "gpt-4o-mini")
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    # the hash part depends on the model too: routing tests can tell models apart by the body
    assert chat(mock_llm, model="gpt-4o").json()["choices"][0]["message"]["content"] != content


def test_auth_and_model_are_echoed_as_fingerprints_only(mock_llm: MockLLM) -> None:
    key = "Bearer sk-test-secret-123"
    reply = chat(mock_llm, {"Authorization": key}, model="gpt-4.1-mini")
    assert reply.headers["x-mock-auth-header"] == "authorization"
    assert reply.headers["x-mock-auth-sha256"] == hashlib.sha256(key.encode()).hexdigest()[:16]
    assert reply.headers["x-mock-model"] == "gpt-4.1-mini"
    assert "sk-test-secret" not in json.dumps(dict(reply.headers)) + reply.body.decode()
    assert chat(mock_llm, {"api-key": "azure-key"}).headers["x-mock-auth-header"] == "api-key"
    assert chat(mock_llm).headers["x-mock-auth-sha256"] == "none"
    recent = mock_llm.stats.snapshot()["recent"]
    assert "sk-test-secret" not in json.dumps(recent)


def test_stream_with_usage_chunk(mock_llm: MockLLM) -> None:
    reply = chat(mock_llm, stream=True, stream_options={"include_usage": True})
    assert reply.status == 200 and reply.error is None
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.body.count(b"[DONE]") == 1 and reply.body.endswith(sse.DONE)
    events = sse.parse_sse(reply.body)
    usage_chunk = events[-2].json()
    assert usage_chunk["choices"] == []
    completion, complete = sse.completion_from_chat_chunks(events)
    assert complete
    expected = chat(mock_llm).json()  # the JSON answer to the same request
    assert completion["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert usage_chunk["usage"] == expected["usage"]


def test_stream_without_include_usage_has_no_usage(mock_llm: MockLLM) -> None:
    reply = chat(mock_llm, stream=True)
    completion, complete = sse.completion_from_chat_chunks(reply.body)
    assert complete and "usage" not in completion
    assert b'"usage"' not in reply.body


def test_max_tokens_truncates_with_finish_reason_length(mock_llm: MockLLM) -> None:
    full = chat(mock_llm).json()["choices"][0]["message"]["content"]
    body = chat(mock_llm, max_tokens=3).json()
    content = body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert full.startswith(content) and content != full
    assert body["usage"]["completion_tokens"] == 3 == tokens.count_text(content, "gpt-4o-mini")
    streamed, complete = sse.completion_from_chat_chunks(
        chat(mock_llm, max_completion_tokens=3, stream=True).body)
    assert complete and streamed["choices"][0]["finish_reason"] == "length"
    assert streamed["choices"][0]["message"]["content"] == content
    assert chat(mock_llm, max_tokens=1000).json()["choices"][0]["finish_reason"] == "stop"


def test_fail_429_and_500(mock_llm: MockLLM) -> None:
    limited = chat(mock_llm, {"X-Mock-Fail": "429"})
    assert limited.status == 429 and limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    broken = chat(mock_llm, {"X-Mock-Fail": "500"}, stream=True)
    assert broken.status == 500 and broken.json()["error"]["type"] == "server_error"


def test_fail_cut_stream_stops_mid_way(mock_llm: MockLLM) -> None:
    reply = chat(mock_llm, {"X-Mock-Fail": "cut"}, stream=True, stream_options={"include_usage": True})
    assert reply.status == 200
    assert isinstance(reply.error, http.client.IncompleteRead)  # chunked body never terminated
    assert b"[DONE]" not in reply.body
    completion, complete = sse.completion_from_chat_chunks(reply.body)
    assert complete is False and "usage" not in completion
    full = chat(mock_llm).json()["choices"][0]["message"]["content"]
    partial = completion["choices"][0]["message"]["content"]
    assert partial and full.startswith(partial) and partial != full


def test_fail_cut_json_body(mock_llm: MockLLM) -> None:
    reply = chat(mock_llm, {"X-Mock-Fail": "cut"})
    assert reply.status == 200 and isinstance(reply.error, http.client.IncompleteRead)
    with pytest.raises(ValueError):
        json.loads(reply.body)


def test_fail_length(mock_llm: MockLLM) -> None:
    body = chat(mock_llm, {"X-Mock-Fail": "length"}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == tokens.count_text(
        body["choices"][0]["message"]["content"], "gpt-4o-mini")
    streamed, complete = sse.completion_from_chat_chunks(
        chat(mock_llm, {"X-Mock-Fail": "length"}, stream=True).body)
    assert complete and streamed["choices"][0]["finish_reason"] == "length"


def test_fail_timeout_holds_the_connection_and_server_keeps_serving(mock_llm: MockLLM) -> None:
    started = time.monotonic()
    with pytest.raises((TimeoutError, socket.timeout)):
        call(mock_llm, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES},
             {"X-Mock-Fail": "timeout"}, timeout=0.5)
    assert time.monotonic() - started >= 0.5
    assert chat(mock_llm).status == 200  # other requests are not blocked by the hanging one


def test_stop_does_not_wait_for_hanging_requests() -> None:
    mock = MockLLM(hang_s=30).start()
    outcome: list[BaseException] = []

    def hang() -> None:
        try:
            call(mock, "/v1/chat/completions", {"model": "m", "messages": MESSAGES},
                 {"X-Mock-Fail": "timeout"}, timeout=20)
        except (http.client.HTTPException, OSError) as exc:
            outcome.append(exc)

    hung = threading.Thread(target=hang, daemon=True)
    try:
        hung.start()
        time.sleep(0.2)
    finally:
        started = time.monotonic()
        mock.stop()
    assert time.monotonic() - started < 3
    hung.join(timeout=5)
    assert not hung.is_alive()
    # the hanging request ends without any response, as a provider timeout would
    assert len(outcome) == 1 and isinstance(outcome[0], (http.client.RemoteDisconnected,
                                                         ConnectionResetError))


def test_slow_stream_and_latency_header() -> None:
    with MockLLM(slow_chunk_ms=60) as mock:
        fast_start = time.monotonic()
        fast = chat(mock, stream=True)
        fast_elapsed = time.monotonic() - fast_start
        chunk_count = len(sse.parse_sse(fast.body)) - 1
        slow_start = time.monotonic()
        slow = chat(mock, {"X-Mock-Fail": "slow-stream"}, stream=True)
        slow_elapsed = time.monotonic() - slow_start
        assert sse.completion_from_chat_chunks(slow.body)[1] is True
        assert slow_elapsed >= chunk_count * 0.06 > fast_elapsed
        delayed_start = time.monotonic()
        assert chat(mock, {"X-Mock-Latency-Ms": "300"}).status == 200
        assert time.monotonic() - delayed_start >= 0.3
        assert chat(mock, {"X-Mock-Latency-Ms": "soon"}).status == 400


def test_instance_latency_applies_to_every_request() -> None:
    with MockLLM(latency_ms=200) as mock:
        started = time.monotonic()
        assert chat(mock).status == 200
        assert time.monotonic() - started >= 0.2


def test_usage_header_modes(mock_llm: MockLLM) -> None:
    assert "usage" not in chat(mock_llm, {"X-Mock-Usage": "none"}).json()
    none_stream = chat(mock_llm, {"X-Mock-Usage": "none"}, stream=True, stream_options={"include_usage": True})
    assert b'"usage":{' not in none_stream.body
    assert sse.completion_from_chat_chunks(none_stream.body)[1] is True
    final = sse.completion_from_chat_chunks(chat(mock_llm, {"X-Mock-Usage": "final"}, stream=True).body)[0]
    assert final["usage"] == chat(mock_llm).json()["usage"]  # sent although include_usage was not set
    forced = chat(mock_llm, {"X-Mock-Usage": "total=298"}).json()["usage"]
    prompt = tokens.count_chat_messages(MESSAGES, "gpt-4o-mini")
    assert forced == {"prompt_tokens": prompt, "completion_tokens": 298 - prompt, "total_tokens": 298}
    streamed = sse.completion_from_chat_chunks(chat(mock_llm, {"X-Mock-Usage": "total=298"}, stream=True,
                                                    stream_options={"include_usage": True}).body)[0]
    assert streamed["usage"]["total_tokens"] == 298
    explicit = chat(mock_llm, {"X-Mock-Usage": "prompt=10,completion=5"}).json()["usage"]
    assert explicit == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert chat(mock_llm, {"X-Mock-Usage": "total=lots"}).status == 400
    assert chat(mock_llm, {"X-Mock-Usage": "sometimes"}).status == 400


def test_bad_requests_get_clear_errors(mock_llm: MockLLM) -> None:
    bad_json = call(mock_llm, "/v1/chat/completions", raw=b"{not json")
    assert bad_json.status == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    assert call(mock_llm, "/v1/chat/completions", raw=b"\xff\xfe").status == 400
    assert call(mock_llm, "/v1/chat/completions", [1, 2]).status == 400
    assert call(mock_llm, "/v1/chat/completions", {"messages": MESSAGES}).json()["error"]["param"] == "model"
    assert chat(mock_llm, messages=[]).status == 400
    assert chat(mock_llm, messages="hi").status == 400
    for bad in (0, -1, "10", True, 1.5):
        assert chat(mock_llm, max_tokens=bad).status == 400, bad
    assert chat(mock_llm, {"X-Mock-Fail": "explode"}).status == 400
    assert call(mock_llm, "/v1/nothing", {}).status == 404
    assert call(mock_llm, "/v1/chat/completions", method="GET").status == 405
    parts = chat(mock_llm, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {"role": "user", "name": "bob", "content": "hi"}])
    assert parts.status == 200, parts.body
    assert parts.json()["choices"][0]["message"]["content"].startswith("Answer to: hi [")


def _error(reply: Reply) -> dict[str, Any]:
    assert reply.status == 400, (reply.status, reply.body[:300])
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}  # OpenAI's error shape
    return error


@pytest.mark.parametrize("fields, param, code", [
    ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
    ({"messages": [{"role": "user", "content": "a"}, None]}, "messages[1]", "invalid_type"),
    ({"messages": "hi"}, "messages", "invalid_type"),
    ({"messages": None}, "messages", "invalid_type"),
    ({"messages": []}, "messages", "empty_array"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", "missing_required_parameter"),
    ({"messages": [{"role": 5, "content": "hi"}]}, "messages[0].role", "invalid_type"),
    ({"messages": [{"role": None, "content": "hi"}]}, "messages[0].role", "invalid_type"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "User", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "system", "content": 42}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "empty_array"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, None]}]},
     "messages[0].content[1]", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, "messages[0].content[0].type",
     "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "txt", "text": "hi"}]}]},
     "messages[0].content[0].type", "invalid_value"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages[0].content[0].type", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]},
     "messages[0].content[0].text", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
     "messages[0].content[0].image_url", "invalid_type"),
    ({"messages": [{"role": "user", "name": 3, "content": "hi"}]}, "messages[0].name", "invalid_type"),
    ({"stream": "yes"}, "stream", "invalid_type"),
    ({"stream": 1}, "stream", "invalid_type"),
    ({"stream_options": {"include_usage": "yes"}, "stream": True}, "stream_options.include_usage",
     "invalid_type"),
    ({"stream_options": "usage"}, "stream_options", "invalid_type"),
    ({"max_tokens": "10"}, "max_tokens", "invalid_type"),
    ({"max_tokens": 0}, "max_tokens", "integer_below_min_value"),
    ({"max_completion_tokens": 2.5}, "max_completion_tokens", "invalid_type"),
    ({"n": "2"}, "n", "invalid_type"),
    ({"n": 0}, "n", "integer_below_min_value"),
    ({"n": 129}, "n", "integer_above_max_value"),
    ({"temperature": "hot"}, "temperature", "invalid_type"),
    ({"temperature": True}, "temperature", "invalid_type"),
    ({"temperature": 2.5}, "temperature", "decimal_above_max_value"),
    ({"temperature": -0.1}, "temperature", "decimal_below_min_value"),
    ({"top_p": 1.5}, "top_p", "decimal_above_max_value"),
])
def test_chat_requests_openai_rejects_get_400_invalid_request_error(
        mock_llm: MockLLM, fields: dict[str, Any], param: str, code: str) -> None:
    error = _error(chat(mock_llm, **fields))
    assert (error["param"], error["code"]) == (param, code), error
    if code != "invalid_value":  # OpenAI's invalid_value messages quote the value, not the param
        assert f"'{param}'" in error["message"] or param.endswith(".content"), error


def test_openai_style_messages_name_the_wrong_type(mock_llm: MockLLM) -> None:
    assert _error(chat(mock_llm, messages=["hi"]))["message"] == (
        "Invalid type for 'messages[0]': expected an object, but got a string instead.")
    assert _error(chat(mock_llm, stream="yes"))["message"] == (
        "Invalid type for 'stream': expected a boolean, but got a string instead.")
    assert _error(chat(mock_llm, max_tokens=1.5))["message"] == (
        "Invalid type for 'max_tokens': expected an integer, but got a decimal number instead.")
    robot = _error(chat(mock_llm, messages=[{"role": "robot", "content": "hi"}]))["message"]
    assert robot.startswith("Invalid value: 'robot'. Supported values are: ")
    assert all(f"'{r}'" in robot for r in ("system", "user", "assistant", "tool", "developer",
                                            "function"))


@pytest.mark.parametrize("fields", [
    {"stream": None}, {"max_tokens": None}, {"max_completion_tokens": None}, {"n": None},
    {"temperature": None}, {"top_p": None}, {"presence_penalty": None}, {"seed": None},
    {"stream_options": None}, {"stream": False, "stream_options": {"include_usage": None}},
    {"stream": None, "max_tokens": None, "temperature": None, "n": None, "top_p": None},
    {"temperature": 0}, {"temperature": 2}, {"n": 1}, {"top_p": 1},
])
def test_null_optional_fields_are_not_given_like_openai(mock_llm: MockLLM,
                                                         fields: dict[str, Any]) -> None:
    plain = chat(mock_llm).json()
    reply = chat(mock_llm, **fields)
    assert reply.status == 200, reply.body[:300]
    assert reply.headers["content-type"] == "application/json"  # stream: null is not a stream
    body = reply.json()
    assert body["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"] == plain["usage"]


def test_assistant_content_may_be_null_or_absent(mock_llm: MockLLM) -> None:
    for assistant in ({"role": "assistant", "content": None}, {"role": "assistant"},
                      {"role": "function", "name": "f", "content": None}):
        reply = chat(mock_llm, messages=[{"role": "user", "content": "q"}, assistant,
                                         {"role": "user", "content": "again"}])
        assert reply.status == 200, (assistant, reply.body[:300])
        assert reply.json()["choices"][0]["message"]["content"].startswith("Answer to: again [")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_unparseable_and_too_deep_json_is_400_not_500(mock_llm: MockLLM, path: str) -> None:
    for raw in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 129 + b"]" * 129, b"{not json"):
        error = _error(call(mock_llm, path, raw=raw))
        assert error["message"].startswith("We could not parse the JSON body of your request.")
        assert error["param"] is None
    # the deepest accepted nesting still works (here inside a tool schema)
    nested: Any = "leaf"
    for _ in range(128 - 5):  # body > tools > [0] > function > parameters > ... nested lists
        nested = [nested]
    deep = chat(mock_llm, tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "x": nested}}}]) if path.endswith("completions") else call(
        mock_llm, path, {"model": "e", "input": "x", "extra": nested})
    assert deep.status == 200, deep.body[:300]
    assert chat(mock_llm).status == 200  # the server is fine afterwards


def test_oversized_body_is_refused() -> None:
    with MockLLM() as mock:
        conn = http.client.HTTPConnection(mock.host, mock.port, timeout=10)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Length", str(9 * 1024 * 1024))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413
        conn.close()
        assert chat(mock).status == 200


def test_embeddings_are_deterministic_unit_vectors(mock_llm: MockLLM) -> None:
    texts = ["hello world", "something else", "hello world"]
    body = call(mock_llm, "/v1/embeddings", {"model": "text-embedding-3-small", "input": texts}).json()
    vectors = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-9 for v in vectors)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    expected_tokens = sum(tokens.count_text(t, "text-embedding-3-small") for t in texts)
    assert body["usage"] == {"prompt_tokens": expected_tokens, "total_tokens": expected_tokens}
    packed = call(mock_llm, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello world",
                                               "encoding_format": "base64", "dimensions": 16}).json()
    decoded = struct.unpack("<16f", base64.b64decode(packed["data"][0]["embedding"]))
    plain = call(mock_llm, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello world",
                                              "dimensions": 16}).json()["data"][0]["embedding"]
    assert all(abs(a - b) < 1e-6 for a, b in zip(decoded, plain))
    assert call(mock_llm, "/v1/embeddings", {"model": "e", "input": [1, "x"]}).status == 400
    assert call(mock_llm, "/v1/embeddings", {"model": "e", "input": "x", "dimensions": 0}).status == 400
    assert call(mock_llm, "/v1/embeddings", {"model": "e", "input": "x"},
                {"X-Mock-Fail": "429"}).status == 429


def test_models_health_stats_and_restricted_models() -> None:
    with MockLLM(models=["small-model", "large-model"]) as mock:
        assert call(mock, "/health", method="GET").json() == {"status": "ok"}
        listed = call(mock, "/v1/models", method="GET").json()
        assert [m["id"] for m in listed["data"]] == ["small-model", "large-model"]
        missing = chat(mock, model="gpt-4o")
        assert missing.status == 404 and missing.json()["error"]["code"] == "model_not_found"
        for model in ("small-model", "small-model", "large-model"):
            assert chat(mock, model=model).status == 200
        chat(mock, {"X-Mock-Fail": "500"}, model="large-model")
        stats = call(mock, "/mock/stats", method="GET").json()
        assert stats["requests"] == 6  # /v1/ calls only; health and stats are not counted
        assert stats["by_model"] == {"gpt-4o": 1, "small-model": 2, "large-model": 2}
        assert stats["by_status"] == {"404": 1, "200": 4, "500": 1}
        assert stats["by_fail"] == {"500": 1}
        assert mock.stats.snapshot()["by_model"] == stats["by_model"]
        assert call(mock, "/mock/reset", {}).json() == {"reset": True}
        assert mock.stats.snapshot()["requests"] == 0


def test_stats_count_the_tokens_billed() -> None:
    """tokens_billed is what the upstream generated: every answer's usage total, a cut answer
    too (the provider bills it), nothing for a refusal. The benchmark checks the quota with it."""
    with MockLLM() as mock:
        whole = chat(mock).json()["usage"]["total_tokens"]
        streamed = chat(mock, stream=True, stream_options={"include_usage": True})
        assert streamed.status == 200
        no_usage = chat(mock, {"X-Mock-Usage": "none"}, max_tokens=3)
        assert "usage" not in no_usage.json()
        chat(mock, {"X-Mock-Fail": "cut"})
        for fail in ("500", "429"):
            assert chat(mock, {"X-Mock-Fail": fail}).status == int(fail)
        truncated = chat(mock, max_tokens=3).json()["usage"]["total_tokens"]
        # A call is in the stats as soon as its answer starts: no wait for the last one.
        assert mock.stats.snapshot()["requests"] == 7
        # the stream and the cut JSON are the same completion as `whole`; no_usage as `truncated`
        assert mock.stats.snapshot()["tokens_billed"] == 3 * whole + 2 * truncated
        assert truncated < whole


def test_requests_run_concurrently() -> None:
    with MockLLM(latency_ms=400) as mock:
        assert chat(mock).status == 200  # the first count reads a tiktoken encoding: not timed
        replies: list[int] = []
        threads = [threading.Thread(target=lambda: replies.append(chat(mock).status)) for _ in range(8)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        elapsed = time.monotonic() - started
        assert replies == [200] * 8
        assert elapsed < 8 * 0.4 / 2  # serial handling would take 3.2 s


def test_keep_alive_connection_serves_several_requests(mock_llm: MockLLM) -> None:
    conn = http.client.HTTPConnection(mock_llm.host, mock_llm.port, timeout=10)
    try:
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions",
                         json.dumps({"model": "gpt-4o", "messages": MESSAGES, "stream": True}))
            response = conn.getresponse()
            assert response.status == 200 and response.read().endswith(sse.DONE)
    finally:
        conn.close()


def test_cli_serves_until_sigterm() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "aigov.cli", "mock-llm", "--listen", f"127.0.0.1:{port}",
                             "--models", "a,b"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/v1/models")
                listed = json.loads(conn.getresponse().read())
                conn.close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "mock-llm did not start"
                time.sleep(0.1)
        assert [m["id"] for m in listed["data"]] == ["a", "b"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()
    assert out == b""  # logs go to stderr


def test_cli_rejects_bad_listen_address() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "aigov.cli", "mock-llm", "--listen", "nowhere"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


def test_other_methods_get_a_json_405_or_404_on_a_kept_alive_connection(mock_llm: MockLLM) -> None:
    """The mock had no do_PUT/do_PATCH/do_DELETE: the stdlib's 501 crashed in send_response and
    the connection closed without an answer (a 502 "invalid response" behind the gateway)."""
    conn = http.client.HTTPConnection(mock_llm.host, mock_llm.port, timeout=10)
    try:
        for method, path, body, status in [
                ("DELETE", "/v1/chat/completions", None, 405),
                ("PUT", "/v1/chat/completions", b'{"model": "x"}', 405),
                ("PATCH", "/v1/embeddings", b"{}", 405),
                ("OPTIONS", "/v1/models", None, 405),
                ("DELETE", "/v1/nothing", b"dropped", 404)]:
            conn.request(method, path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            error = json.loads(response.read())["error"]
            assert response.status == status, (method, path)
            assert error["type"] == "invalid_request_error" and method in error["message"]
            if status == 405:
                assert response.getheader("Allow") == ("GET" if path == "/v1/models" else "POST")
            assert response.getheader("Connection") != "close"
        conn.request("HEAD", "/v1/chat/completions")
        head = conn.getresponse()
        assert head.status == 405 and head.read() == b""  # a HEAD answer carries no body
        # the same connection still serves a completion: every unread body was drained
        conn.request("POST", "/v1/chat/completions",
                     json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["choices"]
    finally:
        conn.close()


def test_an_oversized_body_sent_in_full_gets_its_413() -> None:
    """Before, the mock answered 413 and closed with the body unread: the client, still
    sending, got a broken pipe / reset instead of the answer."""
    from aigov.mockllm import MAX_BODY_BYTES
    with MockLLM() as mock:
        reply = call(mock, "/v1/chat/completions", raw=b" " * (MAX_BODY_BYTES + 1024 * 1024),
                     timeout=30)
        assert reply.status == 413 and reply.error is None
        assert "request body over" in reply.json()["error"]["message"]
        assert chat(mock).status == 200


def test_the_gateway_passes_the_mock_405_through() -> None:
    from kongsim.gateway import Gateway, Request
    with MockLLM() as mock:
        cfg = {"_format_version": "3.0", "services": [
            {"name": "llm", "url": mock.url, "routes": [{"name": "r", "paths": ["/"],
                                                         "strip_path": False}]}]}
        with Gateway(cfg) as gw:
            resp = gw.handle(Request("DELETE", "/v1/chat/completions"))
            assert resp.status == 405 and json.loads(resp.read())["error"]["message"]
