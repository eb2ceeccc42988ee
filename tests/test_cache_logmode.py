"""llm-semantic-cache in log capture mode (AIGOV_CAPTURE_PHASE=log) behind the stand-in's ai-proxy.

The plugin then declares no `response` phase, so Kong (and the stand-in) does not buffer the
upstream answer: streams reach the client chunk by chunk, and the cache stores the answer in
`log` from what ai-proxy logged (`logging.log_payloads` -> ai.proxy.payload.response). Real
`aigov serve`, real Redis with RediSearch, real MiniLM; the upstream is a mock LLM of this module
whose stream chunks are 40 ms apart, so "unbuffered" is measurable.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from aigov import sse
from aigov.mockllm import MockLLM
from kongsim.pytest_plugin import GatewayHandle, start_gateway

REPO = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"
CHUNK_DELAY_MS = 40
CONSUMERS = [{"username": "carol", "keyauth_credentials": [{"key": "key-carol-logmode"}]}]
KEY = "key-carol-logmode"


def _redis_port(redis_server: Any) -> int:
    return int(redis_server.url.rsplit(":", 1)[1].split("/")[0])


def _cache(redis_port: int, namespace: str) -> dict[str, Any]:
    return {"name": "llm-semantic-cache", "config": {"vectordb": {
        "strategy": "redis", "namespace": namespace,
        "redis": {"host": "127.0.0.1", "port": redis_port, "timeout_ms": 2000}}}}


def _ai_proxy(mock_url: str, log_payloads: bool = True) -> dict[str, Any]:
    return {"name": "ai-proxy", "config": {
        "route_type": "llm/v1/chat",
        "model": {"provider": "openai", "options": {"upstream_url": f"{mock_url}/v1/chat/completions"}},
        "logging": {"log_statistics": True, "log_payloads": log_payloads}}}


@pytest.fixture(scope="module")
def slow_mock() -> Iterator[MockLLM]:
    mock = MockLLM("127.0.0.1", 0, chunk_delay_ms=CHUNK_DELAY_MS, hang_s=5).start()
    try:
        yield mock
    finally:
        mock.stop()


@pytest.fixture(scope="module")
def logmode(redis_server: Any, slow_mock: MockLLM) -> Iterator[dict[str, Any]]:
    if not redis_server.running:
        redis_server.start()
    port = _redis_port(redis_server)
    ns = f"logmode-{uuid.uuid4().hex[:6]}"
    auth = {"name": "key-auth", "config": {"key_names": ["apikey"]}}
    config = {"_format_version": "3.0", "consumers": CONSUMERS, "services": [
        {"name": "llm", "url": slow_mock.url, "routes": [
            {"name": "proxied", "paths": ["/proxied"], "strip_path": True,
             "plugins": [auth, _ai_proxy(slow_mock.url), _cache(port, ns)]},
            {"name": "nopayload", "paths": ["/nopayload"], "strip_path": True,
             "plugins": [auth, _ai_proxy(slow_mock.url, log_payloads=False), _cache(port, ns + "-np")]},
        ]}]}
    gw = start_gateway(config, server="aigov", pythonpath=str(REPO),
                       extra_env={"AIGOV_CAPTURE_PHASE": "log", "HF_HUB_OFFLINE": "1",
                                  "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    # The cache's kong.log lines (Kong's error log): in log capture the store outcome is said
    # there, since what a log timer puts in the serializer reaches no logger.
    lines = _KongLogLines()
    pdk_log = logging.getLogger("kongsim.pdk")
    level = pdk_log.level
    pdk_log.setLevel(logging.INFO)
    pdk_log.addHandler(lines)
    try:
        # warm the model inside the plugin server so timings below are not the model load
        _post(gw, "proxied", _chat(f"warm-up {uuid.uuid4().hex}"))
        assert gw.wait_logs(20)
        yield {"gw": gw, "lines": lines}
    finally:
        pdk_log.removeHandler(lines)
        pdk_log.setLevel(level)
        gw.close()


class _KongLogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def _post(gw: GatewayHandle, route: str, body: dict[str, Any], **headers: str) -> Any:
    return gw.request("POST", f"/{route}/v1/chat/completions", json=body,
                      headers={"apikey": KEY, **headers}, timeout=60)


def _not_stored_reasons(state: dict[str, Any], send: Any) -> tuple[Any, list[str]]:
    """Run `send()` (one request) and return the reasons the cache gave for not storing it."""
    gw: GatewayHandle = state["gw"]
    lines: _KongLogLines = state["lines"]
    assert gw.wait_logs(15)
    start = len(lines.messages)
    reply = send()
    assert gw.wait_logs(15)
    said = [m for m in lines.messages[start:]
            if m.startswith("[llm-semantic-cache]") and ("not stored" in m or "nothing stored" in m)]
    return reply, said


def test_dump_declares_no_response_phase_in_log_mode() -> None:
    def phases(env_extra: dict[str, str]) -> list[str]:
        out = subprocess.run([sys.executable, "-m", "aigov.cli", "dump", "llm-semantic-cache"],
                             capture_output=True, text=True, timeout=60, cwd=REPO,
                             env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **env_extra})
        assert out.returncode == 0, out.stderr
        dump = json.loads(out.stdout)
        info = (dump.get("Plugins") if isinstance(dump, dict) else dump)[0]
        return info["Phases"]

    log_phases = phases({"AIGOV_CAPTURE_PHASE": "log"})
    assert "response" not in log_phases and {"access", "log"} <= set(log_phases)
    assert "response" in phases({})


def test_miss_is_stored_from_ai_proxy_payload_then_hits(logmode: dict[str, Any]) -> None:
    gw = logmode["gw"]
    q = "Which planets in the solar system have rings?"
    first, said = _not_stored_reasons(logmode, lambda: _post(gw, "proxied", _chat(q)))
    assert first.status == 200 and first.header("X-Cache-Status") == "Miss"
    assert first.header("X-Kong-LLM-Model") == f"openai/{MODEL}"  # ai-proxy really ran
    assert said == []
    hit = _post(gw, "proxied", _chat(q))
    assert hit.header("X-Cache-Status") == "Hit"
    assert hit.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert hit.json()["usage"] == first.json()["usage"]
    # a paraphrase is a semantic hit on the entry captured in log
    para = _post(gw, "proxied", _chat("Which planets of the solar system have rings?"))
    assert para.header("X-Cache-Status") == "Hit" and para.header("X-Cache-Similarity")


def test_without_logged_payload_nothing_is_stored(logmode: dict[str, Any]) -> None:
    """log_payloads off: the documented limitation, said in the log line, never a wrong entry."""
    gw = logmode["gw"]
    q = "How tall is the Eiffel tower?"
    first, said = _not_stored_reasons(logmode, lambda: _post(gw, "nopayload", _chat(q)))
    assert first.status == 200 and first.header("X-Cache-Status") == "Miss"
    assert len(said) == 1 and "log_payloads" in said[0], said
    assert _post(gw, "nopayload", _chat(q)).header("X-Cache-Status") == "Miss"


def _timed_stream(gw: GatewayHandle, body: dict[str, Any], **headers: str) -> tuple[Any, bytes, list[float]]:
    """(reply head, whole body, arrival time of each body chunk in seconds after the head)."""
    head, chunks = gw.request("POST", "/proxied/v1/chat/completions", json=body,
                              headers={"apikey": KEY, **headers}, stream=True, timeout=60)
    head_at = time.monotonic()  # after access (lookup, embedding): only the body is timed
    parts: list[bytes] = []
    arrivals: list[float] = []
    for chunk in chunks:
        if chunk.strip():
            arrivals.append(time.monotonic() - head_at)
        parts.append(chunk)
    return head, b"".join(parts), arrivals


def test_stream_passes_through_unbuffered_and_is_stored_when_complete(logmode: dict[str, Any]) -> None:
    gw = logmode["gw"]
    body = _chat("Name five famous rivers of Europe and the countries they cross.", stream=True,
                 stream_options={"include_usage": True})
    (head, raw, arrivals), said = _not_stored_reasons(logmode, lambda: _timed_stream(gw, body))
    assert head.status == 200 and head.header("X-Cache-Status") == "Miss"
    assert "text/event-stream" in (head.header("Content-Type") or "")
    upstream, complete = sse.completion_from_chat_chunks(raw)
    assert complete and raw.count(b"data: [DONE]") == 1
    n_events = sum(1 for _ in sse.parse_sse(raw))
    upstream_s = (n_events - 1) * CHUNK_DELAY_MS / 1000.0  # the mock's own pacing
    # unbuffered: the first chunk comes long before the end, and chunks arrive spread out as the
    # mock sends them (a buffered proxy delivers everything at once, at the end)
    assert len(arrivals) >= 3, arrivals
    assert arrivals[0] < arrivals[-1] / 3, arrivals
    assert arrivals[-1] - arrivals[0] >= 0.5 * upstream_s, (arrivals, upstream_s)
    assert said == []

    hit = _post(gw, "proxied", body)
    assert hit.header("X-Cache-Status") == "Hit"
    assert hit.body.count(b"data: [DONE]") == 1 and hit.body.rstrip().endswith(b"data: [DONE]")
    replay, complete = sse.completion_from_chat_chunks(hit.body)
    assert complete
    assert replay["choices"][0]["message"]["content"] == upstream["choices"][0]["message"]["content"]
    assert replay["usage"]["completion_tokens"] == upstream["usage"]["completion_tokens"]


def test_cut_stream_is_not_stored(logmode: dict[str, Any]) -> None:
    gw = logmode["gw"]
    body = _chat("Describe the water cycle for a ten year old.", stream=True)
    (head, raw, _), said = _not_stored_reasons(logmode, lambda: _timed_stream(gw, body, **{"X-Mock-Fail": "cut"}))
    assert head.header("X-Cache-Status") == "Miss"
    assert b"data: [DONE]" not in raw
    assert len(said) == 1 and "stream" in said[0], said
    again, said = _not_stored_reasons(logmode, lambda: _post(gw, "proxied", body))
    assert again.header("X-Cache-Status") == "Miss", "an interrupted stream was replayed"
    assert said == []
    replay = _post(gw, "proxied", body)
    assert replay.header("X-Cache-Status") == "Hit"
    assert sse.completion_from_chat_chunks(replay.body)[1]


def test_error_and_length_answers_are_not_stored_in_log_mode(logmode: dict[str, Any]) -> None:
    gw = logmode["gw"]
    for fail in ("500", "length"):
        body = _chat(f"Explain photosynthesis briefly ({fail}).")
        first, said = _not_stored_reasons(logmode, lambda: _post(gw, "proxied", body, **{"X-Mock-Fail": fail}))
        assert first.header("X-Cache-Status") == "Miss"
        assert len(said) == 1, said
        assert _post(gw, "proxied", body).header("X-Cache-Status") == "Miss", fail
