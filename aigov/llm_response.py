"""The one upstream-response reader: what an LLM answered, from the bytes the gateway saw.

Used by the cache (what to store, whether it is complete) and by the quota (the provider's usage
is the truth). Handles an OpenAI JSON completion and an SSE stream (reassembled through
aigov.sse), and says when a response is incomplete (cut stream, error status, garbled body).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from aigov import sse


_MAX_COUNT_DIGITS = 15  # a token count past this is not a count (and int() of a huge string is slow)


def token_count(v: Any) -> int:
    """A usage figure as a count: a positive finite number, or one written as a decimal string
    (some OpenAI-compatible servers send "50"); 0 for anything else."""
    if isinstance(v, str):
        digits = v.strip()
        return int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= _MAX_COUNT_DIGITS else 0
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    return int(v) if ok else 0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0      # prompt_tokens_details.cached_tokens (billed at the cached rate)
    reasoning_tokens: int = 0   # completion_tokens_details.reasoning_tokens (billed as output)

    @classmethod
    def from_dict(cls, d: Any) -> "Usage | None":
        if not isinstance(d, dict):
            return None

        ptd = d.get("prompt_tokens_details") if isinstance(d.get("prompt_tokens_details"), dict) else {}
        ctd = d.get("completion_tokens_details") if isinstance(d.get("completion_tokens_details"), dict) else {}
        u = cls(prompt_tokens=token_count(d.get("prompt_tokens")),
                completion_tokens=token_count(d.get("completion_tokens")),
                total_tokens=token_count(d.get("total_tokens")),
                cached_tokens=token_count(ptd.get("cached_tokens")),
                reasoning_tokens=token_count(ctd.get("reasoning_tokens")))
        if not (u.prompt_tokens or u.completion_tokens or u.total_tokens):
            return None
        return u

    @property
    def metered_total(self) -> int:
        """Provider total when it exceeds prompt + completion (hidden reasoning), else the sum."""
        return max(self.total_tokens, self.prompt_tokens + self.completion_tokens)

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.metered_total, "cached_tokens": self.cached_tokens,
                "reasoning_tokens": self.reasoning_tokens}


@dataclass
class LLMResponse:
    status: int
    streamed: bool
    complete: bool                      # a whole answer: 200, parsed, and (for streams) terminated
    completion: dict[str, Any] | None   # OpenAI chat.completion shape (streams reassembled)
    usage: Usage | None
    finish_reasons: list[str] = field(default_factory=list)
    text: str = ""
    has_tool_calls: bool = False
    error: str | None = None


def _content_type(headers: dict[str, Any] | None) -> str:
    for k, v in (headers or {}).items():
        if k.lower() == "content-type":
            v = v[0] if isinstance(v, list) and v else v
            return str(v).lower()
    return ""


def parse_upstream_response(status: int, headers: dict[str, Any] | None, body: bytes | None) -> LLMResponse:
    """Read an upstream chat response; never raises."""
    body = body or b""
    streamed = "text/event-stream" in _content_type(headers) or body.lstrip().startswith(b"data:")
    if streamed:
        try:
            completion, complete = sse.completion_from_chat_chunks(sse.parse_sse(body))
        except Exception as exc:  # noqa: BLE001 - a garbled stream is an incomplete response
            return LLMResponse(status, True, False, None, None, error=f"unreadable stream: {exc}")
    else:
        try:
            completion = json.loads(body.decode("utf-8"))
            complete = isinstance(completion, dict) and isinstance(completion.get("choices"), list)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return LLMResponse(status, False, False, None, None, error=f"unreadable body: {type(exc).__name__}")
        if not isinstance(completion, dict):
            return LLMResponse(status, False, False, None, None, error="body is not a JSON object")
    usage = Usage.from_dict(completion.get("usage")) if isinstance(completion, dict) else None
    choices = completion.get("choices") if isinstance(completion, dict) else None
    finish, texts, tools = [], [], False
    for ch in choices or []:
        if not isinstance(ch, dict):
            continue
        if ch.get("finish_reason"):
            finish.append(str(ch["finish_reason"]))
        msg = ch.get("message") or {}
        if isinstance(msg, dict):
            if isinstance(msg.get("content"), str):
                texts.append(msg["content"])
            if msg.get("tool_calls") or msg.get("function_call"):
                tools = True
    return LLMResponse(status=status, streamed=streamed, complete=bool(complete) and status == 200,
                       completion=completion, usage=usage, finish_reasons=finish, text="".join(texts),
                       has_tool_calls=tools)
