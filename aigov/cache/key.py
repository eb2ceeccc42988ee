"""Cache keys: the hard scope (exact filters) and the semantic part (the embedded text).

The scope is never folded into the embedded text: an answer for consumer A, another system
prompt, another model or other sampling parameters is not "similar", it is a different key. Each
scope part is hashed so it can be a RediSearch TAG value without escaping and never leaks a
consumer name or a system prompt into Redis key names.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from aigov.request import ChatRequest, sha256_hex

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


def scope_for(request: ChatRequest, *, namespace: str, consumer_id: str | None, route_id: str | None,
              scope_mode: str = "consumer", message_countback: int = 1) -> CacheScope:
    """The hard scope of a request. `consumer_id` None means anonymous traffic."""
    if scope_mode == "global":
        consumer = GLOBAL_CONSUMER
    else:
        consumer = f"id:{consumer_id}" if consumer_id else ANONYMOUS_CONSUMER
    params = dict(request.answer_params())
    params["stream"] = bool(request.stream)
    # Images, audio and files in the semantic messages are not embedded (only text is), so they
    # go into the exact scope: the same question about another picture never shares an answer.
    # (Those messages' other fields, such as `name`, are in the context part: context_messages.)
    attachments = [part for i in request.user_indices()[-max(1, message_countback):]
                   for part in (request.messages[i].get("content") or [])
                   if isinstance(request.messages[i].get("content"), list)
                   and not (isinstance(part, str) or (isinstance(part, dict) and isinstance(part.get("text"), str)))]
    if attachments:
        params["attachments"] = sha256_hex(attachments)
    return CacheScope(
        namespace=namespace,
        consumer=consumer,
        route=route_id or "-",
        model=request.model or "-",
        context=sha256_hex(request.context_messages(message_countback)),
        params=sha256_hex(params),
    )


def exact_key(scope: CacheScope, prompt_text: str) -> str:
    """The exact layer's key: the whole scope plus the normalized semantic text."""
    return sha256_hex([scope.bucket, normalize_prompt(prompt_text)])[:40]
