"""The exact layer equates only prompts that cannot differ in meaning (an exact hit skips the
verifier); case, NFKC and whitespace variants go to the semantic layer, where the verifier judges
them. Real MiniLM, memory store."""
from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from aigov.cache.core import CacheSettings, SemanticCache
from aigov.cache.key import exact_key, normalize_prompt, scope_for
from aigov.request import parse_chat_request

ANSWER = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                                                    "finish_reason": "stop"}]}


@pytest.mark.parametrize("a, b", [
    ("Caf\u00e9 hours?", "Cafe\u0301 hours?"),                         # NFC: canonically equivalent
    ("line one\r\nline two", "line one\nline two"),                    # line endings
    ("line one\rline two", "line one\nline two"),
    ("What is the capital of France?  \n", "What is the capital of France?"),
    ("   What is the capital of France?", "What is the capital of France?"),  # one line: indent is not code
    ("\n \n  x = 1\n  y = 2", "  x = 1\n  y = 2"),                     # leading blank lines only
])
def test_normalize_prompt_erases_what_cannot_change_meaning(a: str, b: str) -> None:
    assert normalize_prompt(a) == normalize_prompt(b)


@pytest.mark.parametrize("a, b", [
    ("Decode this base64: SGVsbG8gV29ybGQ=", "Decode this base64: sgvsbg8gv29ybgq="),
    ("Is the password Tr0ub4dor correct?", "Is the password tr0ub4dor correct?"),
    ("What is 10\u2076 divided by 2?", "What is 106 divided by 2?"),      # NFKC would fold these
    ("\ufb01le", "file"),
    ("Is this valid python?\nif x:\n    y()\nz()", "Is this valid python?\nif x:\n    y()\n    z()"),
    ("  x = 1\ny = 2", "x = 1\ny = 2"),                                 # a first line's indent is relative
    ("a  b", "a b"),
    ("What is the capital of France?", "what is the capital of france?"),
])
def test_normalize_prompt_keeps_case_compatibility_forms_and_inner_whitespace(a: str, b: str) -> None:
    assert normalize_prompt(a) != normalize_prompt(b)


def _req(text: str) -> Any:
    return parse_chat_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}))


@pytest.fixture(scope="module")
def cache() -> Any:
    settings = CacheSettings.from_config({"vectordb": {"strategy": "memory",
                                                       "namespace": f"exact-{uuid.uuid4().hex[:6]}"}})
    cache = SemanticCache(settings)
    yield cache
    cache.store.purge()


def _store_then_ask(cache: Any, stored: str, asked: str) -> Any:
    scope = scope_for(_req(stored), namespace=cache.settings.namespace, consumer_id=uuid.uuid4().hex, route_id="r")
    sp, ap = _req(stored).prompt_text(), _req(asked).prompt_text()
    cache.save(scope, exact_key(scope, sp), sp, cache.embed(sp), ANSWER, None, "m")
    return cache.lookup(scope, ap, exact_key(scope, ap))


@pytest.mark.parametrize("stored, asked", [
    # the tester's pairs: each was an exact hit, served without the verifier
    ("Decode this base64: SGVsbG8gV29ybGQ=", "Decode this base64: sgvsbg8gv29ybgq="),
    ("Is this valid python?\nif x:\n    y()\nz()", "Is this valid python?\nif x:\n    y()\n    z()"),
    ("What is 10\u2076 divided by 2?", "What is 106 divided by 2?"),
    ("Is the password Tr0ub4dor correct?", "Is the password tr0ub4dor correct?"),
    # a second tester's pairs: semantic hits at similarity 0.99-1.0 the verifier let through
    ("tell me about US", "tell me about us"),
    ("Decode this base64: QUJDRA==", "Decode this base64: qujdra=="),
    ("SELECT * FROM users WHERE name = 'Bob'", "SELECT * FROM users WHERE name = 'bob'"),
    ("what does this print:\nprint('a  b')", "what does this print:\nprint('a b')"),
    ("what does this print:\nx = 1\nx = 2\nprint(x)", "what does this print:\nx = 2\nx = 1\nprint(x)"),
])
def test_variants_that_change_meaning_miss(cache: Any, stored: str, asked: str) -> None:
    assert _store_then_ask(cache, stored, asked).status == "Miss"


def test_sentence_case_still_hits_through_the_semantic_layer(cache: Any) -> None:
    found = _store_then_ask(cache, "What is the capital of France?", "what is the capital of france?")
    assert (found.status, found.layer) == ("Hit", "semantic")


def test_a_shouted_prompt_still_hits_through_the_semantic_layer(cache: Any) -> None:
    # all capitals is shouting: its words are not acronyms to keep apart from lower case
    found = _store_then_ask(cache, "HOW DO I RESET MY PASSWORD", "how do I reset my password?")
    assert (found.status, found.layer) == ("Hit", "semantic")


def test_line_endings_and_surrounding_blanks_still_hit_exactly(cache: Any) -> None:
    found = _store_then_ask(cache, "Summarise:\n  a\n  b", "\r\nSummarise:\r\n  a\r\n  b\r\n")
    assert (found.status, found.layer) == ("Hit", "exact")
