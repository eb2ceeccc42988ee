"""Cache keys: the hard scope (exact filters) and the semantic part (the embedded text).

The scope is never folded into the embedded text: an answer for consumer A, another system
prompt, another model or other sampling parameters is not "similar", it is a different key. Each
scope part is hashed so it can be a RediSearch TAG value without escaping and never leaks a
consumer name or a system prompt into Redis key names.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from aigov.request import ChatRequest, is_text_part, sha256_hex

ANONYMOUS_CONSUMER = "anonymous"   # the one shared scope of unauthenticated traffic
GLOBAL_CONSUMER = "global"         # scope: global (opt-in) puts every consumer here
SCOPE_PARTS = ("consumer", "route", "model", "context", "params")

# Lines of only whitespace at the start of a prompt. The first text line's own indentation is
# kept when more lines follow: it can be code's, and the lines after it are indented relative to it.
_LEADING_BLANK_LINES_RE = re.compile(r"\A(?:[^\S\n]*\n)+")


@dataclass(frozen=True)
class CacheScope:
    namespace: str
    consumer: str
    route: str
    model: str
    context: str    # hash of every message but the semantic contents (system prompts, turns, names)
                    # and, for several semantic turns, how many lines each spans
    params: str     # hash of every top-level field that can change the answer, stream included

    @property
    def bucket(self) -> str:
        """One id for the whole scope: the memory store's bucket key and the redis store's TAG
        (memoised: scopes recur across requests)."""
        return _bucket((self.namespace,) + tuple(getattr(self, p) for p in SCOPE_PARTS))


# Scope values come partly from the client (the model name): only short ones are memoised, so
# 4096 distinct 1 MB "model" strings cannot pin gigabytes in the plugin server.
MEMO_VALUE_MAX = 256


def _short(values: tuple[str, ...]) -> bool:
    return all(isinstance(v, str) and len(v) <= MEMO_VALUE_MAX for v in values)


def _hash_bucket(values: tuple[str, ...]) -> str:
    return sha256_hex(list(values))[:32]


_memo_bucket = lru_cache(maxsize=4096)(_hash_bucket)


def _bucket(values: tuple[str, ...]) -> str:
    return _memo_bucket(values) if _short(values) else _hash_bucket(values)


def normalize_prompt(text: str) -> str:
    """The exact layer's view of a prompt. An exact hit skips the verifier, so only differences
    that cannot change what the prompt says are erased: Unicode NFC (canonically equivalent
    spellings, "\u00e9" or "e" + U+0301), line endings ("\\r\\n" and "\\r" are "\\n"), trailing
    whitespace and leading blank lines of the whole prompt, and a one-line prompt's leading
    whitespace. NFKC ("10\u2076" is not "106"), case (base64, passwords) and inner whitespace (code
    indentation) are kept: such variants go to the semantic layer, whose verifier judges them."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").rstrip()
    text = _LEADING_BLANK_LINES_RE.sub("", text)
    return text if "\n" in text else text.lstrip()


# Fields sent at the value OpenAI documents as their default mean the same as leaving them out
# (https://platform.openai.com/docs/api-reference/chat/create), so they are dropped from the
# params scope. Only defaults that are also what the other OpenAI-compatible servers do when the
# field is absent are here: `temperature: 1` and `top_p: 1` are OpenAI's defaults but not vLLM's
# (the model's generation_config), Ollama's (0.8 / 0.9) or Mistral's, so they stay scope.
ANSWER_PARAM_DEFAULTS: dict[str, Any] = {
    "n": 1,                        # one choice: what every server returns without `n`
    "logprobs": False,             # no log probabilities in the answer
    "presence_penalty": 0,         # 0 is no penalty (the logits are not adjusted)
    "frequency_penalty": 0,
    "response_format": {"type": "text"},  # "Default response format": plain text
    "modalities": ["text"],        # "text, which is the default"
}
# Defaults that hold only when tools are given: without tools OpenAI refuses these fields with a
# 400, so a request carrying them must not be served another request's answer.
TOOL_PARAM_DEFAULTS: dict[str, Any] = {
    "parallel_tool_calls": True,   # the model may call several tools in one turn
}


def canonical_value(value: Any) -> Any:
    """`value` with every integral float written as an int, at any depth: 1.0 and 1 are one JSON
    number (`"temperature": 1.0` is `"temperature": 1`), so the two spellings hash alike.
    Booleans and non-integral floats are kept as they are."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if not isinstance(value, (dict, list)):
        return value
    # A loop, not recursion: a body nested as deep as the parser accepts must not raise here.
    root: Any = {} if isinstance(value, dict) else [None] * len(value)
    stack = [(value, root)]
    while stack:
        src, dst = stack.pop()
        for k, v in (src.items() if isinstance(src, dict) else enumerate(src)):
            if isinstance(v, float):
                v = int(v) if v.is_integer() else v
            elif isinstance(v, (dict, list)):
                copy: Any = {} if isinstance(v, dict) else [None] * len(v)
                stack.append((v, copy))
                v = copy
            dst[k] = v
    return root


def _is_default(value: Any, default: Any) -> bool:
    # The same type too: `false == 0` in Python, but `"presence_penalty": false` is a 400, not 0.
    return type(value) is type(default) and value == default


def canonical_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params scope part without spelling differences that cannot change the answer: integral
    floats as ints, fields at their documented default dropped (ANSWER_PARAM_DEFAULTS,
    TOOL_PARAM_DEFAULTS), and `max_tokens` read as `max_completion_tokens` (OpenAI's newer name
    for the same cap). Two different caps given together are both kept (which one a provider
    honours is its own choice)."""
    out = {k: canonical_value(v) for k, v in params.items() if v is not None}
    defaults = dict(ANSWER_PARAM_DEFAULTS, **(TOOL_PARAM_DEFAULTS if out.get("tools") else {}))
    out = {k: v for k, v in out.items() if not (k in defaults and _is_default(v, defaults[k]))}
    if "max_tokens" in out and out.get("max_completion_tokens", out["max_tokens"]) == out["max_tokens"]:
        out["max_completion_tokens"] = out.pop("max_tokens")
    return out


def canonical_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The context scope part's messages without spelling differences: a field set to null is
    "not given" for OpenAI (SDKs echo assistant turns with `"tool_calls": null, "refusal": null`),
    and integral floats are ints."""
    return [{k: canonical_value(v) for k, v in m.items() if v is not None} for m in messages]


def _line_span(text: str) -> int:
    """How many lines a semantic text spans once normalised (0 for an empty one)."""
    text = normalize_prompt(text)
    return text.count("\n") + 1 if text else 0


def scope_for(request: ChatRequest, *, namespace: str, consumer_id: str | None, route_id: str | None,
              scope_mode: str = "consumer", message_countback: int = 1,
              path: str | None = None, routed_to: str | None = None) -> CacheScope:
    """The hard scope of a request. `consumer_id` None means anonymous traffic; `path` is the
    request's path and query as the client sent them (an Azure-style deployment in the path, an
    api-version in the query can change the answer), hashed into the scope, never stored.
    `routed_to` is llm-semantic-router's route for the request: two routes may send the same
    model to different upstreams (another deployment, another system prompt behind it)."""
    if scope_mode == "global":
        consumer = GLOBAL_CONSUMER
    else:
        consumer = f"id:{consumer_id}" if consumer_id else ANONYMOUS_CONSUMER
    params = canonical_params(request.answer_params())
    params["stream"] = bool(request.stream)
    if path is not None:
        params["path"] = path
    if routed_to is not None:
        params["routed_to"] = routed_to
    # Images, audio and files in the semantic messages are not embedded (only text is), so they
    # go into the exact scope: the same question about another picture never shares an answer.
    # So does any part that is not only text (an image part with a "text" key, a text part with a
    # "TEXT" key a case-insensitive upstream reads instead). (Those messages' other fields, such
    # as `name`, are in the context part: context_messages.)
    attachments = [part for i in request.user_indices()[-max(1, message_countback):]
                   for part in (request.messages[i].get("content") or [])
                   if isinstance(request.messages[i].get("content"), list) and not is_text_part(part)]
    if attachments:
        params["attachments"] = sha256_hex(attachments)
    context: Any = canonical_messages(request.context_messages(message_countback))
    texts = request.last_user_texts(message_countback)
    if len(texts) > 1:
        # The semantic layer embeds and verifies the turns joined with "\n", so ["A", "B\nC"] and
        # ["A\nB", "C"] read the same there. How many lines each turn spans is scope: with it, the
        # joined text splits into turns one way only (blank lines aside), and a paraphrase that
        # keeps each turn's lines still matches.
        context = {"messages": context, "turn_lines": [_line_span(t) for t in texts]}
    return CacheScope(
        namespace=namespace,
        consumer=consumer,
        route=route_id or "-",
        model=request.model or "-",
        context=sha256_hex(context),
        params=sha256_hex(params),
    )


def exact_key(scope: CacheScope, prompt: str | Sequence[str]) -> str:
    """The exact layer's key: the whole scope plus the normalized semantic text of each semantic
    message (ChatRequest.last_user_texts, oldest first; a string is one message). The texts are
    hashed as a list, never joined: ["A", "B\\nC"] and ["A\\nB", "C"] are other conversations.
    One message keys as its text alone, as before."""
    texts = [normalize_prompt(t) for t in ([prompt] if isinstance(prompt, str) else prompt)]
    part: str | list[str] = texts[0] if len(texts) == 1 else texts
    return sha256_hex([scope.bucket, part])[:40]
