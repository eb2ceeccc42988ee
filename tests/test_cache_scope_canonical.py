"""llm-semantic-cache's exact key and hard scope are canonical: each semantic turn keys on its own
(turns split differently are other conversations), and spellings that cannot change the answer
(1.0 for 1, a field at its documented OpenAI default, max_tokens for max_completion_tokens, a null
message field) share a scope. Library checks use the plugin's own scope_for / exact_key, the
lookup runs the real MiniLM on the memory store, and the end-to-end checks run the Kong stand-in
with the real plugin-server process; only the LLM upstream is the mock."""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from aigov.cache.core import CacheSettings, SemanticCache
from aigov.cache.key import exact_key, normalize_prompt, scope_for
from aigov.request import parse_chat_request, sha256_hex
from kongsim.pytest_plugin import GatewayHandle, start_gateway

REPO = Path(__file__).resolve().parent.parent
PLUGIN_FILE = REPO / "plugins" / "llm-semantic-cache.py"
MODEL = "gpt-4o-mini"
ANSWER = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                                                    "finish_reason": "stop"}]}
Q = "what is the capital of France"
# The tester's pair: the same joined text "Translate to German:\nI love you\n<q>", split into turns
# differently. The first asks to translate the sentence and the question; the second only the question.
CONV1 = [{"role": "user", "content": "Translate to German:"}, {"role": "assistant", "content": "OK"},
         {"role": "user", "content": "I love you\n" + Q}]
CONV2 = [{"role": "user", "content": "Translate to German:\nI love you"}, {"role": "assistant", "content": "OK"},
         {"role": "user", "content": Q}]
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"days": {"type": "integer", "minimum": 1}}}}}]


def _req(messages: list[dict[str, Any]], **extra: Any) -> Any:
    return parse_chat_request(json.dumps({"model": MODEL, "messages": messages, **extra}))


def _scope(messages: list[dict[str, Any]], countback: int = 1, **extra: Any) -> Any:
    return scope_for(_req(messages, **extra), namespace="n", consumer_id="c", route_id="r",
                     message_countback=countback)


def _key(messages: list[dict[str, Any]], countback: int = 1, **extra: Any) -> str:
    return exact_key(_scope(messages, countback, **extra), _req(messages, **extra).last_user_texts(countback))


def _ask(**extra: Any) -> Any:
    return _scope([{"role": "user", "content": Q}], **extra)


# -- 1. turns are keyed one by one -----------------------------------------------------------------
def test_turns_split_differently_get_other_keys_and_scopes() -> None:
    assert _req(CONV1).prompt_text(2) == _req(CONV2).prompt_text(2)   # the joined text cannot tell
    assert _key(CONV1, 2) != _key(CONV2, 2)
    # The semantic layer sees only the joined text: the scope keeps the two apart there.
    assert _scope(CONV1, 2) != _scope(CONV2, 2)
    # An image-only turn before or after the text: the same joined text and the same attachments.
    before = [{"role": "user", "content": [IMAGE]}, {"role": "assistant", "content": "OK"},
              {"role": "user", "content": "describe it"}]
    after = [{"role": "user", "content": "describe it"}, {"role": "assistant", "content": "OK"},
             {"role": "user", "content": [IMAGE]}]
    assert _key(before, 2) != _key(after, 2)


def test_one_turn_keys_as_before_and_each_turn_is_normalised() -> None:
    scope = _scope([{"role": "user", "content": Q}])
    # One message: the key of its normalised text alone, so entries stored before stay reachable.
    assert exact_key(scope, Q + "  ") == exact_key(scope, [Q]) == sha256_hex([scope.bucket, normalize_prompt(Q)])[:40]
    # A conversation with one user message keys the same whatever the countback.
    assert _key([{"role": "user", "content": Q}], 2) == _key([{"role": "user", "content": Q}], 1)
    padded = [dict(CONV1[0], content="Translate to German:  "), *CONV1[1:]]
    assert _key(padded, 2) == _key(CONV1, 2)      # a turn's trailing blanks, as for one prompt


def test_a_turn_split_never_reaches_the_semantic_layer() -> None:
    cache = SemanticCache(CacheSettings.from_config({"vectordb": {"strategy": "memory",
                                                                  "namespace": f"turns-{uuid.uuid4().hex[:6]}"}}))
    try:
        scope, prompt = _scope(CONV1, 2), _req(CONV1).prompt_text(2)
        cache.save(scope, _key(CONV1, 2), prompt, cache.embed(prompt), ANSWER, None, MODEL)
        assert cache.lookup(scope, prompt, _key(CONV1, 2)).status == "Hit"
        other = cache.lookup(_scope(CONV2, 2), _req(CONV2).prompt_text(2), _key(CONV2, 2))
        assert other.status == "Miss"                 # neither exact nor at similarity 1.0
    finally:
        cache.store.purge()


# -- 2. canonical params and context ---------------------------------------------------------------
@pytest.mark.parametrize("a, b", [
    ({"temperature": 1}, {"temperature": 1.0}),
    ({"temperature": 0.5, "seed": 7}, {"temperature": 0.5, "seed": 7.0}),
    ({}, {"n": 1}),
    ({}, {"logprobs": False}),
    ({}, {"presence_penalty": 0, "frequency_penalty": 0.0}),
    ({}, {"response_format": {"type": "text"}}),
    ({}, {"modalities": ["text"]}),
    ({"tools": TOOLS}, {"tools": TOOLS, "parallel_tool_calls": True}),
    ({"tools": TOOLS}, {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"days": {"type": "integer", "minimum": 1.0}}}}}]}),
    ({"max_tokens": 100}, {"max_completion_tokens": 100}),
    ({"max_tokens": 100}, {"max_tokens": 100, "max_completion_tokens": 100}),
])
def test_spellings_of_the_same_request_share_the_params_scope(a: dict, b: dict) -> None:
    assert _ask(**a) == _ask(**b)


@pytest.mark.parametrize("a, b", [
    ({}, {"temperature": 1}),               # OpenAI's default, not vLLM's, Ollama's or Mistral's
    ({}, {"top_p": 1}),
    ({"temperature": 0.5}, {"temperature": 0.7}),
    ({}, {"n": 2}),
    ({}, {"logprobs": True}),
    ({}, {"presence_penalty": False}),      # not the number 0: the provider refuses it
    ({}, {"parallel_tool_calls": True}),    # without tools OpenAI answers 400
    ({"tools": TOOLS}, {"tools": TOOLS, "parallel_tool_calls": False}),
    ({}, {"response_format": {"type": "json_object"}}),
    ({}, {"modalities": ["text", "audio"]}),
    ({"max_tokens": 100}, {"max_completion_tokens": 200}),
    ({"max_completion_tokens": 200}, {"max_tokens": 100, "max_completion_tokens": 200}),
])
def test_values_that_can_change_the_answer_still_split(a: dict, b: dict) -> None:
    assert _ask(**a).params != _ask(**b).params


def test_null_message_fields_are_not_given() -> None:
    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": Q}]
    nulls = [{"role": "system", "content": "be brief", "name": None}, {"role": "user", "content": Q, "name": None}]
    assert _scope(nulls) == _scope(plain)
    # An assistant turn echoed back from an SDK response object carries its unset fields as null.
    turn = {"role": "assistant", "content": "Paris"}
    echoed = dict(turn, refusal=None, tool_calls=None, function_call=None, audio=None)
    follow = {"role": "user", "content": "and of Spain?"}
    assert _scope([plain[1], echoed, follow]) == _scope([plain[1], turn, follow])
    # A name that is given, even empty, is still scope.
    assert _scope([{"role": "user", "content": Q, "name": ""}]) != _scope(plain[1:])


# -- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gw(mock_llm: Any) -> Iterator[GatewayHandle]:
    def cache(name: str, **conf: Any) -> dict[str, Any]:
        return {"name": "llm-semantic-cache", "config": {
            "vectordb": {"strategy": "memory", "namespace": f"{name}-{uuid.uuid4().hex[:6]}"}, **conf}}

    config = {"_format_version": "3.0", "services": [{"name": "llm", "url": mock_llm.url, "routes": [
        {"name": "turns", "paths": ["/turns"], "strip_path": True, "plugins": [cache("turns", message_countback=2)]},
        {"name": "one", "paths": ["/one"], "strip_path": True, "plugins": [cache("one")]}]}]}
    handle = start_gateway(config, server="aigov", plugin_files=[PLUGIN_FILE], pythonpath=str(REPO))
    try:
        post(handle, "one", {"model": MODEL, "messages": [{"role": "user", "content": f"warm-up {uuid.uuid4().hex}"}]})
        yield handle
    finally:
        handle.close()


def post(gw: GatewayHandle, route: str, body: dict[str, Any]) -> Any:
    reply = gw.request("POST", f"/{route}/v1/chat/completions", json=body)
    assert reply.status == 200, reply.body[:300]
    return reply


def _exact_hit(reply: Any) -> bool:
    return reply.header("X-Cache-Status") == "Hit" and reply.header("X-Cache-Similarity") is None


def test_the_plugin_keys_each_turn(gw: GatewayHandle) -> None:
    tag = uuid.uuid4().hex[:6]
    conv1 = [dict(m, content=f"{m['content']} {tag}") if i == 2 else m for i, m in enumerate(CONV1)]
    conv2 = [dict(m, content=f"{m['content']} {tag}") if i == 2 else m for i, m in enumerate(CONV2)]
    assert post(gw, "turns", {"model": MODEL, "messages": conv1}).header("X-Cache-Status") == "Miss"
    assert _exact_hit(post(gw, "turns", {"model": MODEL, "messages": conv1}))
    assert post(gw, "turns", {"model": MODEL, "messages": conv2}).header("X-Cache-Status") == "Miss"
    # The first turn's trailing blanks are erased as one prompt's are: still the exact entry.
    padded = [dict(conv1[0], content=conv1[0]["content"] + "  "), *conv1[1:]]
    assert _exact_hit(post(gw, "turns", {"model": MODEL, "messages": padded}))


def test_the_plugin_shares_answers_across_spellings(gw: GatewayHandle) -> None:
    def ask(**extra: Any) -> Any:
        return post(gw, "one", {"model": MODEL, "messages": [{"role": "user", "content": question}], **extra})

    question = f"what is the boiling point of water at sea level {uuid.uuid4().hex[:6]}"
    assert ask().header("X-Cache-Status") == "Miss"
    assert _exact_hit(ask(n=1, logprobs=False, presence_penalty=0, frequency_penalty=0.0))
    assert ask(temperature=1).header("X-Cache-Status") == "Miss"       # kept: not every upstream's default
    assert _exact_hit(ask(temperature=1.0))
    question = f"name the largest ocean {uuid.uuid4().hex[:6]}"
    assert ask(max_tokens=50).header("X-Cache-Status") == "Miss"
    assert _exact_hit(ask(max_completion_tokens=50))
    assert _exact_hit(post(gw, "one", {"model": MODEL, "max_tokens": 50,
                                       "messages": [{"role": "user", "content": question, "name": None}]}))


def test_a_part_that_is_not_only_text_is_exact_scope() -> None:
    """An image part carrying "text": "" (or any part with more than type and text) is not read
    as text alone: it is scope, so a plain question never gets the answer about a picture."""
    q = "what is in this picture?"
    plain = _scope([{"role": "user", "content": [{"type": "text", "text": q}]}])

    def with_image(url: str) -> Any:
        return _scope([{"role": "user", "content": [{"type": "text", "text": q},
                                                    {"type": "image_url", "image_url": {"url": url}, "text": ""}]}])

    assert with_image("https://x/cat.png") != plain
    assert with_image("https://x/cat.png") != with_image("https://x/dog.png")
    assert with_image("https://x/cat.png") == with_image("https://x/cat.png")
    assert _scope([{"role": "user", "content": q}]) == _scope([{"role": "user", "content": [q]}])
