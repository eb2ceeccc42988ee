"""The one chat-request parser: an OpenAI Chat Completions body as the plugins see it (and the
Embeddings body the quota meters, read the same lenient way).

Every plugin reads the client's body through `parse_chat_request`, so "what is the prompt", "is it
streamed" and "which parameters change the answer" have one definition. Errors are typed so each
plugin can map them to its documented behaviour (Bypass, pass-through or a clear 400).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_BODY_BYTES = 1024 * 1024

# The completion bounds the quota reserves by, with the most a request may ask: OpenAI's n is at
# most 128, and no model writes ten million tokens in one answer.
COMPLETION_BOUNDS = {"max_tokens": 10_000_000, "max_completion_tokens": 10_000_000, "n": 128}
# Fields the plugins read: each must be spelled exactly (see parse_chat_request).
READ_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "max_tokens",
                         "max_completion_tokens", "n", "tools", "functions", "temperature",
                         "response_format", "input", "prompt"})
MESSAGE_READ_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "function_call",
                                 "refusal"})
PART_READ_FIELDS = frozenset({"type", "text", "image_url", "input_audio", "file", "refusal"})
IMAGE_READ_FIELDS = frozenset({"url", "detail"})

# Top-level fields that cannot change the answer text, so they stay out of the cache's params
# scope (issue 3's hard scope). It is a deny-list: any other field, including ones we do not
# know (top_k, min_p, verbosity, web_search_options, prediction, vendor extensions), is scope,
# because a field wrongly kept costs a miss and a field wrongly dropped serves a wrong answer.
NON_ANSWER_FIELDS = frozenset({
    "messages",                # the semantic prompt and the context scope part
    "model",                   # its own scope part
    "stream",                  # its own scope part (scope_for adds it to the params)
    "stream_options",          # whether a usage chunk / obfuscation padding is sent: a hit is
                               # replayed per the asking client's own stream_options
    "user", "safety_identifier",  # end-user ids for the provider's abuse monitoring
    "metadata", "store",       # whether and how the provider keeps the completion (evals, logs)
    "service_tier",            # latency and price tier of the same model
    "prompt_cache_key", "prompt_cache_retention",  # provider prefix-cache hints: cost, not text
})


class RequestError(ValueError):
    """The body is not a chat request the plugins can reason about.

    `reason` is one of: too_large, invalid_json, not_object, not_chat, bad_field.
    """

    def __init__(self, reason: str, message: str, parsed: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        # not_chat: the body's JSON object, so a caller need not read it again; invalid_json: the
        # first value when it is an object (a lenient provider reads it and ignores what follows).
        self.parsed = parsed


def content_text(content: Any, sep: str = "\n") -> str:
    """The text of a message `content`: a string, or the text parts of a list of content parts
    ({"type": "text"|"input_text"|..., "text": ...}); non-text parts such as images are skipped."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return sep.join(parts)
    return ""


# Request headers a client (or key-auth) carries a credential in: the router clears them before
# setting a target's key, the quota never shows their values (hashed identities).
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "apikey", "api-key", "x-api-key",
                                "x-goog-api-key"})
# Words that mark any other header name as secret-bearing (x-auth-token, x-session-id, cookie,
# x-pat, x-hmac, x-otp, ...). Matching a harmless name only hashes a label, so the list is broad.
SECRET_HEADER_WORDS = ("auth", "key", "token", "secret", "pass", "session", "cookie", "credential",
                       "sig", "bearer", "pat", "hmac", "otp", "pin", "cert", "jwt", "nonce", "csrf",
                       "xsrf", "sso", "saml", "api")


def canonical_header_name(name: str) -> str:
    """A header name as Kong looks it up: lowercase, "_" read as "-" (x_api_key is X-Api-Key)."""
    return name.strip().lower().replace("_", "-")


def is_secret_header(name: str) -> bool:
    """Whether a header's value may be a credential: a known credential header, or a name with a
    word such as key, token, auth or session in it (its value is then never shown or stored)."""
    canonical = canonical_header_name(name)
    return canonical in CREDENTIAL_HEADERS or any(word in canonical for word in SECRET_HEADER_WORDS)

TEXT_PART_TYPES = frozenset({"text", "input_text"})


def is_text_part(part: Any) -> bool:
    """A content part that is only text: a string, or {"type": "text", "text": ...} with no other
    key. Any other part (an image, audio, a file, or a text part carrying more keys, which a
    case-insensitive reader may take as its text) is not fully read as text by the plugins."""
    if isinstance(part, str):
        return True
    return (isinstance(part, dict) and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}
            and part.get("type", "text") in TEXT_PART_TYPES)


def message_text(message: Any) -> str:
    """The text of one chat message."""
    return content_text(message.get("content")) if isinstance(message, dict) else ""


def canonical_json(value: Any) -> str:
    """Stable JSON text for hashing (sorted keys, no whitespace, non-ASCII kept)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def json_text(value: Any, **kwargs: Any) -> str:
    """JSON text that always encodes to UTF-8, for bodies the plugins send on (a rewritten request,
    a cached answer). Non-ASCII stays as is, except when the value holds a lone surrogate: JSON's
    escape "\\ud800" decodes to an unpaired code point that UTF-8 cannot carry, so such a value is
    written with ASCII escapes instead, which every JSON reader decodes to the same value."""
    text = json.dumps(value, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, **kwargs)
    return text


def sha256_hex(value: Any) -> str:
    data = value if isinstance(value, (bytes, bytearray)) else canonical_json(value).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


@dataclass
class ChatRequest:
    body: dict[str, Any]
    messages: list[dict[str, Any]]
    model: str | None
    stream: bool
    include_usage: bool
    raw_size: int
    extras: dict[str, Any] = field(default_factory=dict)
    # Bytes of the body were not valid in its encoding and were read as U+FFFD (decode_body):
    # meterable and routable, but distinct bodies may read the same, so never cacheable.
    lossy: bool = False

    @property
    def max_tokens(self) -> int | None:
        """The completion cap the client asked for (max_completion_tokens wins, as OpenAI does)."""
        for key in ("max_completion_tokens", "max_tokens"):
            v = self.body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    @property
    def completion_bound(self) -> int | None:
        """The largest completion cap the body names: OpenAI reads max_completion_tokens, another
        provider may read max_tokens, so a bound that must hold takes the larger (the quota's
        reservation)."""
        caps = [v for v in (self.body.get("max_completion_tokens"), self.body.get("max_tokens"))
                if isinstance(v, int) and not isinstance(v, bool) and v > 0]
        return max(caps) if caps else None

    @property
    def choices(self) -> int:
        """How many answers the provider generates (`n`), each up to max_tokens long."""
        n = self.body.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1

    @property
    def temperature(self) -> float | None:
        v = self.body.get("temperature")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        return None

    def user_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m.get("role") == "user"]

    def last_user_texts(self, count: int = 1) -> list[str]:
        """The texts of the last `count` user messages, oldest first."""
        idx = self.user_indices()[-max(1, count):]
        return [message_text(self.messages[i]) for i in idx]

    def prompt_text(self, count: int = 1) -> str:
        """The semantic part of the request: the last `count` user messages joined."""
        return "\n".join(t for t in self.last_user_texts(count) if t)

    def context_messages(self, count: int = 1) -> list[dict[str, Any]]:
        """Everything but the semantic content: every message in order, the semantic (last
        `count` user) ones without their `content`.

        The cache hashes this as an exact scope so the same question under another system prompt,
        another conversation or another `name` never shares an answer. A semantic message stays
        in its place (with its other fields) so that moving a turn before or after the question
        is another context; its text is left to the embedding, so paraphrases still match.
        """
        semantic = set(self.user_indices()[-max(1, count):])
        return [_without_content(m) if i in semantic else m for i, m in enumerate(self.messages)]

    def answer_params(self) -> dict[str, Any]:
        """Every top-level field that can change the answer (see NON_ANSWER_FIELDS); a null is
        left out, as OpenAI reads it as "not given"."""
        return {k: v for k, v in self.body.items() if k not in NON_ANSWER_FIELDS and v is not None}

    def has_tools(self) -> bool:
        return bool(self.body.get("tools") or self.body.get("functions"))

    def prompt_extras(self) -> tuple[str, ...]:
        return prompt_extras(self.body)

    def tool_definitions(self) -> list[Any] | None:
        return tool_definitions(self.body)


def prompt_extras(body: dict[str, Any]) -> tuple[str, ...]:
    """Request fields besides messages and tools that the provider reads as prompt: a
    structured-output schema (response_format json_schema), as its JSON text; and an `input` or
    `prompt` beside the messages (BILLABLE_INPUT_FIELDS): an upstream serving another API on the
    same path (embeddings, completions) bills them, so they are counted too."""
    out: list[str] = []
    fmt = body.get("response_format")
    schema = fmt.get("json_schema") if isinstance(fmt, dict) else None
    if isinstance(schema, dict) and schema:
        out.append(json.dumps(schema, ensure_ascii=False))
    for name in BILLABLE_INPUT_FIELDS:
        v = body.get(name)
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            out.extend(v)
        elif v is not None:
            out.append(json.dumps(v, ensure_ascii=False, default=str))  # token ids and the like: an upper bound
    return tuple(out)


def tool_definitions(body: dict[str, Any]) -> list[Any] | None:
    """What the provider bills as tool definitions: `tools` plus the legacy `functions` (bare
    function objects, which tokens.count_tools reads the same way)."""
    defs = [d for key in ("tools", "functions") if isinstance(body.get(key), list) for d in body[key]]
    return defs or None


def _without_content(message: dict[str, Any]) -> dict[str, Any]:
    """A semantic message minus its content, which the cache keys elsewhere (the text is the
    embedded prompt, images and files are the scope's attachments); its other fields (`name`,
    `audio`, vendor ones) stay in the context, and so does a content of no known shape, which
    neither of those reads."""
    return {k: v for k, v in message.items() if k != "content" or not isinstance(v, (str, list))}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: a number too big for any reader but Python's
        raise ValueError(f"{text} is out of range")
    return value


# JSON as the standard and OpenAI read it: NaN and Infinity (and 1e999), which Python's json takes,
# are refused (a NaN temperature or max_tokens has no meaning for a provider, nor for a cache key).
STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
# What the most lenient provider reads: Go's decoder ignores bytes after the first value, and
# Python's json (FastAPI, vLLM) takes NaN and Infinity.
_LENIENT_JSON = json.JSONDecoder()


def _lenient_first_object(text: str) -> dict[str, Any] | None:
    """The first JSON value of a body STRICT_JSON refused, when it is an object: what a lenient
    provider reads and serves (Go's encoding/json Decoder, Ollama or LocalAI, ignores the bytes
    after it; Python's json reads NaN), so the plugins judge its model and billable fields."""
    try:
        first, _ = _LENIENT_JSON.raw_decode(text.lstrip())
    except (ValueError, RecursionError):
        return None
    return first if isinstance(first, dict) else None


def _load_object(raw: bytes | str | None, max_bytes: int) -> tuple[dict[str, Any], int, bool]:
    """The body as a JSON object, its size and whether bytes had to be replaced (decode_body)."""
    if raw is None:
        raise RequestError("not_chat", "request has no body")
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    if len(raw) > max_bytes:
        raise RequestError("too_large", f"request body is {len(raw)} bytes, over the {max_bytes}-byte limit")
    text, lossy = decode_body(raw)
    try:
        body = STRICT_JSON.decode(text)
    except (ValueError, RecursionError) as exc:
        raise RequestError("invalid_json", f"request body is not valid JSON: {exc}",
                           parsed=_lenient_first_object(text)) from None
    if not isinstance(body, dict):
        raise RequestError("not_object", "request body must be a JSON object")
    return body, len(raw), lossy


@dataclass
class EmbeddingsRequest:
    """An OpenAI Embeddings body (POST .../embeddings), as the quota meters it: the provider
    bills its input tokens, one per id of an input given as token ids."""
    body: dict[str, Any]
    model: str | None
    inputs: list[str | list[int]]
    raw_size: int

    @property
    def texts(self) -> list[str]:
        return [x for x in self.inputs if isinstance(x, str)]

    @property
    def token_ids(self) -> int:
        return sum(len(x) for x in self.inputs if isinstance(x, list))


def _token_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def embeddings_inputs(value: Any) -> list[str | list[int]] | None:
    """An Embeddings `input` as its inputs (each a string or a token-id array), or None when it is
    none of the shapes OpenAI takes: a string, an array of strings, one token-id array, an array
    of token-id arrays."""
    if isinstance(value, str):
        return [value]
    if _token_ids(value):
        return [list(value)]
    if isinstance(value, list) and value and all(isinstance(x, str) or _token_ids(x) for x in value):
        return list(value)
    return None


def parse_embeddings_request(body: dict[str, Any], raw_size: int) -> EmbeddingsRequest:
    """Check an Embeddings body (already read as a JSON object). Raises RequestError."""
    _spelled_exactly(body, {"model", "input"}, "")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("bad_field", "'model' must be a string")
    inputs = embeddings_inputs(body.get("input"))
    if inputs is None:
        raise RequestError("bad_field", "'input' must be a string, an array of strings, an array "
                                        "of token ids or an array of token-id arrays")
    return EmbeddingsRequest(body=body, model=model, inputs=inputs, raw_size=raw_size)


# Fields that make a JSON body without `messages` a call a provider bills: the Responses and
# Embeddings APIs' `input`, the legacy Completions' and the image APIs' `prompt`.
BILLABLE_INPUT_FIELDS = ("input", "prompt")


def billable_fields(body: dict[str, Any]) -> list[str]:
    """The BILLABLE_INPUT_FIELDS a top-level JSON object has, in any spelling (a
    case-insensitive reader takes "Input" too)."""
    keys = {str(k).casefold() for k in body}
    return [f for f in BILLABLE_INPUT_FIELDS if f in keys]


def names_an_embedding_model(body: dict[str, Any]) -> bool:
    """Whether the body's model is an embedding model (text-embedding-3-small, nomic-embed-text,
    embed-english-v3.0, ...): an embeddings call whatever path the client used (a route with
    strip_path may give it one like /emb)."""
    model = body.get("model")
    return isinstance(model, str) and "embed" in model.lower()


def parse_chat_request(raw: bytes | str | None, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> ChatRequest:
    """Parse and check a Chat Completions body. Raises RequestError with a clear reason."""
    body, size, lossy = _load_object(raw, max_bytes)
    # Go's encoding/json (Ollama, LocalAI) matches keys case-insensitively, the last one winning:
    # "Max_Tokens" would bound the answer there and be unseen here, a message's "CONTENT" would be
    # the prompt there and uncounted here.
    _spelled_exactly(body, READ_FIELDS, "")
    if isinstance(body.get("stream_options"), dict):
        _spelled_exactly(body["stream_options"], {"include_usage"}, "stream_options.")
    messages = body.get("messages")
    if messages is None:
        raise RequestError("not_chat", "request has no 'messages' array: not a chat completion", parsed=body)
    if not isinstance(messages, list) or not messages:
        # Present but not a non-empty array: a wrongly typed field (a lenient provider may still
        # answer `"messages": "hi"`), never "not a chat request" passed on unmetered.
        raise RequestError("bad_field", "'messages' must be a non-empty array")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("bad_field", f"messages[{i}] must be an object with a string 'role'")
        _spelled_exactly(m, MESSAGE_READ_FIELDS, f"messages[{i}].")
        if isinstance(m.get("content"), list):
            for j, part in enumerate(m["content"]):
                if isinstance(part, dict):
                    _spelled_exactly(part, PART_READ_FIELDS, f"messages[{i}].content[{j}].")
                    if isinstance(part.get("image_url"), dict):  # its detail sets the image's estimate
                        _spelled_exactly(part["image_url"], IMAGE_READ_FIELDS, f"messages[{i}].content[{j}].image_url.")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("bad_field", "'model' must be a string")
    stream = body.get("stream")
    if stream is None:
        stream = False  # OpenAI takes null for any optional parameter as "not given"
    elif not isinstance(stream, bool):
        raise RequestError("bad_field", "'stream' must be a boolean or null")
    for key, most in COMPLETION_BOUNDS.items():
        # What bounds the completion must be exactly what the provider reads: pydantic-based
        # servers take "100" or 100.0 as 100, which would let a request outgrow its reservation;
        # and it must stay a number the quota can price and store (2**62 tokens cannot be).
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= most):
            raise RequestError("bad_field", f"'{key}' must be an integer from 1 to {most}, or null")
    opts = body.get("stream_options")
    include_usage = bool(stream and isinstance(opts, dict) and opts.get("include_usage") is True)
    return ChatRequest(body=body, messages=messages, model=model, stream=stream,
                       include_usage=include_usage, raw_size=size, lossy=lossy)


# The only non-ASCII characters that case-fold to one ASCII letter: the long s and the Kelvin sign.
_NON_ASCII_FOLDS = {"s": "\u017f", "k": "\u212a"}


def _spellings_of(name: str) -> str:
    """A regex matching `name` as a JSON key in every spelling a case-insensitive reader takes:
    each letter in either case, as a character that case-folds to it (Go folds "ſ" to "s"), or
    as a \\u escape with either case of hex digits."""
    letters = []
    for ch in name:
        chars = {ch, ch.upper()} | set(_NON_ASCII_FOLDS.get(ch, ""))
        escapes = [f"\\\\u{ord(c):04x}" for c in chars] + [f"\\\\u{ord(c):04X}" for c in chars]
        letters.append("(?:" + "|".join(sorted(map(re.escape, chars)) + escapes) + ")")
    return '"' + "".join(letters) + '"\\s*:'


_MESSAGES_KEY_RE = re.compile(_spellings_of("messages"))


def could_be_chat(raw: bytes | str | None) -> bool:
    """Whether a body this parser refused may still be a chat request to a more lenient reader:
    it has a `messages` key in any spelling (case, escapes) at any depth. Go's encoding/json
    reads the first value of a body and ignores trailing bytes, matches keys case-insensitively
    and nests 10,000 levels deep, where Python's json stops at about 1,000; such a body is never
    "not a chat request" for the plugins."""
    if raw is None:
        return False
    text = raw if isinstance(raw, str) else decode_body(raw)[0]
    if _MESSAGES_KEY_RE.search(text) is None:
        return False
    try:
        first, _ = STRICT_JSON.raw_decode(text.lstrip())  # the first value, as Go's Decoder
    except (ValueError, RecursionError):
        return True  # unreadable here (too deep, broken): the key anywhere may be the chat's
    # Readable: only a top-level key is what a chat endpoint reads ({"thread": {"messages": ...}}
    # is an Assistants call, not a chat request).
    return isinstance(first, dict) and any(k.casefold() == "messages" for k in first)


UNREADABLE_CHAT = ("the body has a 'messages' key this plugin cannot read exactly (invalid or cut-off "
                   "JSON, another spelling, bytes after the JSON value, or nesting too deep); a more "
                   "lenient provider might "
                   "answer it, so it is not passed on: send it as OpenAI reads it")


def _spelled_exactly(obj: dict[str, Any], fields: frozenset[str] | set[str], where: str) -> None:
    for key in obj:
        folded = key.casefold()
        if folded in fields and key != folded:
            raise RequestError("bad_field", f"'{where}{key}' must be spelled '{folded}'")


def decode_body(raw: bytes) -> tuple[str, bool]:
    """The text of a JSON body as the most lenient common upstreams read it, and whether any
    bytes had to be replaced.

    RFC 8259 lets a reader ignore a UTF-8 byte order mark; Python's json (Starlette, FastAPI,
    vLLM) also reads UTF-16 and UTF-32 bodies, and Go's encoding/json (Ollama, LocalAI) reads
    invalid UTF-8 as U+FFFD. Reading a body the way such an upstream serves it means no encoding
    trick gets a request past the quota or the router as "not a chat request"."""
    encoding = json.detect_encoding(raw)
    try:
        return raw.decode(encoding), False
    except UnicodeDecodeError:
        return raw.decode(encoding, "replace"), True
