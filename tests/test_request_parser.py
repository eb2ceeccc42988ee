"""The one chat-request parser and the one JSON writer of bodies the plugins send on."""
from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from aigov import sse
from aigov.cache.core import CacheSettings, SemanticCache
from aigov.cache.key import exact_key, scope_for
from aigov.request import RequestError, could_be_chat, json_text, parse_chat_request

LONE_SURROGATE_BODY = b'{"model": "m", "messages": [{"role": "user", "content": "why was my card declined \\ud800"}]}'


def test_null_stream_is_not_streamed_and_other_types_are_refused() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat_request(json.dumps({**base, "stream": None})).stream is False
    assert parse_chat_request(json.dumps({**base, "stream": True})).stream is True
    for bad in ("yes", 1, [], {}):
        with pytest.raises(RequestError) as exc:
            parse_chat_request(json.dumps({**base, "stream": bad}))
        assert exc.value.reason == "bad_field"


def test_json_text_keeps_non_ascii_and_escapes_only_what_utf8_cannot_carry() -> None:
    assert json_text({"t": "béchamel"}) == '{"t": "béchamel"}'
    value = json.loads(LONE_SURROGATE_BODY)
    text = json_text(value)
    text.encode("utf-8")  # would raise UnicodeEncodeError with ensure_ascii=False
    assert json.loads(text) == value and "\\ud800" in text


def test_a_cached_answer_with_a_lone_surrogate_replays_as_json_and_as_a_stream() -> None:
    completion = {"id": "c1", "object": "chat.completion", "model": "m",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok \ud800"},
                               "finish_reason": "stop"}]}
    body = sse.chat_chunks_from_completion(completion, include_usage=False)
    assert "\\ud800" in body.decode("utf-8")  # valid UTF-8 on the wire, the code point escaped
    replayed, complete = sse.completion_from_chat_chunks(body)
    assert complete and replayed["choices"][0]["message"]["content"] == "ok \ud800"
    assert json.loads(json_text(completion).encode("utf-8")) == completion


@pytest.mark.parametrize("strategy", ["memory", "redis"])
def test_a_prompt_with_a_lone_surrogate_is_stored_and_hits(strategy: str, redis_server: Any) -> None:
    if not redis_server.running:
        redis_server.start()
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    ns = f"sur-{uuid.uuid4().hex[:6]}"
    cache = SemanticCache(CacheSettings.from_config({"vectordb": {
        "strategy": strategy, "namespace": ns, "redis": {"host": "127.0.0.1", "port": port}}}))
    req = parse_chat_request(LONE_SURROGATE_BODY)
    scope = scope_for(req, namespace=ns, consumer_id="c1", route_id="r")
    key = exact_key(scope, req.prompt_text())
    answer = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                                                        "finish_reason": "stop"}]}
    try:
        cache.save(scope, key, req.prompt_text(), cache.embed(req.prompt_text()), answer, None, "m")
        found = cache.lookup(scope, req.prompt_text(), key)
        assert found.status == "Hit"
    finally:
        cache.store.purge()


def test_bodies_read_as_lenient_json_readers_read_them() -> None:
    plain = json.dumps({"model": "m", "messages": [{"role": "user", "content": "héllo"}]}, ensure_ascii=False)
    want = parse_chat_request(plain.encode())
    assert not want.lossy
    for raw in (b"\xef\xbb\xbf" + plain.encode(), plain.encode("utf-16"), plain.encode("utf-16-le"),
                plain.encode("utf-32")):
        got = parse_chat_request(raw)
        assert got.messages == want.messages and not got.lossy
    broken = parse_chat_request(plain.encode().replace("é".encode(), b"\xff"))
    assert broken.lossy and broken.messages[0]["content"] == "h\ufffdllo"


@pytest.mark.parametrize("body, name", [
    ({"messages": "hi"}, "messages"), ({"messages": []}, "messages"), ({"messages": {}}, "messages"),
    ({"max_tokens": "100"}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_completion_tokens": True}, "max_completion_tokens"), ({"n": "2"}, "n"), ({"n": 0}, "n"),
])
def test_wrongly_typed_fields_are_bad_field(body: dict, name: str) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(RequestError) as err:
        parse_chat_request(json.dumps(full).encode())
    assert err.value.reason == "bad_field" and f"'{name}'" in str(err.value)


def test_choices_is_n_or_one() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert parse_chat_request(json.dumps(base).encode()).choices == 1
    assert parse_chat_request(json.dumps({**base, "n": None}).encode()).choices == 1
    assert parse_chat_request(json.dumps({**base, "n": 5}).encode()).choices == 5


@pytest.mark.parametrize("body, name", [
    ({"max_tokens": 2 ** 62}, "max_tokens"), ({"max_completion_tokens": 10_000_001}, "max_completion_tokens"),
    ({"n": 129}, "n"), ({"Max_Tokens": 5}, "Max_Tokens"), ({"MODEL": "gpt-4o"}, "MODEL"),
    ({"\u017ftream": True}, "\u017ftream"),  # long s: Go's case folding reads it as "stream"
    ({"messages": [{"role": "user", "content": "hi", "CONTENT": "a hidden prompt"}]}, "messages[0].CONTENT"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q", "Text": "x"}]}]},
     "messages[0].content[0].Text"),
    ({"stream": True, "stream_options": {"Include_Usage": True}}, "stream_options.Include_Usage"),
    # the quota estimates an image by its detail: a Go upstream reads "Detail" as detail
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://x/y.png", "detail": "low", "Detail": "high"}}]}]}, "messages[0].content[0].image_url.Detail"),
])
def test_bounds_and_other_spellings_of_read_fields_are_bad_field(body: dict, name: str) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "x"}], **body}
    if "MODEL" in body:
        del full["model"]
    with pytest.raises(RequestError) as err:
        parse_chat_request(json.dumps(full).encode())
    assert err.value.reason == "bad_field" and f"'{name}'" in str(err.value)


def test_the_largest_bounds_and_other_fields_in_any_case_are_read() -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 128,
            "max_tokens": 10_000_000, "Metadata": {"a": 1}}
    request = parse_chat_request(json.dumps(full).encode())
    assert request.choices == 128 and request.max_tokens == 10_000_000


@pytest.mark.parametrize("raw, expected", [
    (b'{"Messages": [{"role": "user", "content": "hi"}]}', True),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]} trailing', True),
    (b'{"\\u006dessages": []}', True),                      # an escaped key
    (b'{"\\u004DESSAGES": []}', True),                      # escaped, upper-case hex
    ('{"me\u017f\u017fages": []}'.encode(), True),             # the long s, which Go folds to s
    ("[" * 3000 + "]" * 3000, False),
    (('{"a":' * 3000 + '{"messages": []}' + "}" * 3000).encode(), True),  # deeper than Python's json
    (b'{"prompt": "messages"}', False),                     # a value, not a key
    (b'{"thread": {"messages": [{"role": "user", "content": "hi"}]}}', False),  # Assistants: not chat
    (b'{"prompt": "x", "metadata": {"messages": "3"}}', False),
    (b'{"thread": {"messages": []}} trailing', False),     # the first value is readable
    (b'{not json', False), (None, False),
])
def test_could_be_chat_finds_a_messages_key_in_any_spelling(raw: Any, expected: bool) -> None:
    assert could_be_chat(raw) is expected


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    # OpenAI's newer field is the cap the provider applies when both are sent.
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1000, "max_completion_tokens": 10}
    assert parse_chat_request(json.dumps(body).encode()).max_tokens == 10
    body = {**body, "max_tokens": 5}
    assert parse_chat_request(json.dumps(body).encode()).max_tokens == 10


def test_invalid_json_carries_the_first_object_a_lenient_reader_serves() -> None:
    # Go's json.Decoder reads the first value and ignores what follows: the plugins must see the
    # model and billable fields such a provider would act on.
    for raw in (b'{"model":"gpt-4o","input":"hi"} x', b'{"model":"gpt-4o","input":"hi"}\n{"model":"other"}'):
        with pytest.raises(RequestError) as err:
            parse_chat_request(raw)
        assert err.value.reason == "invalid_json" and err.value.parsed == {"model": "gpt-4o", "input": "hi"}
    for raw in (b'{"model": "gpt-4o"', b'[1, 2] x', b"not json"):  # no readable object first
        with pytest.raises(RequestError) as err:
            parse_chat_request(raw)
        assert err.value.reason == "invalid_json" and err.value.parsed is None


def test_nan_and_infinity_are_not_json() -> None:
    # Python's json reads them; OpenAI and Go refuse them, and a NaN temperature has no meaning
    # for a cache key (a new user's NaN temperature was cached).
    for constant in ("NaN", "Infinity", "-Infinity", "1e999", "-1e999"):
        raw = ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % constant).encode()
        with pytest.raises(RequestError) as err:
            parse_chat_request(raw)
        assert err.value.reason == "invalid_json" and constant.lstrip("-") in str(err.value)
        assert could_be_chat(raw)  # so the quota and the router refuse it rather than pass it
    # Not a chat request: the object a Python provider would read is still what the plugins judge
    # (its model for the router, its billable fields for the quota), as for trailing bytes.
    with pytest.raises(RequestError) as err:
        parse_chat_request(b'{"model": "gpt-4o", "input": "hi", "temperature": NaN}')
    assert err.value.reason == "invalid_json" and err.value.parsed["model"] == "gpt-4o"
    assert "input" in err.value.parsed
