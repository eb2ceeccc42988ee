"""Library-level checks of the cache (real model, real Redis); the end-to-end ones are in
test_cache_gateway.py."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

import numpy as np
import pytest

from aigov.cache.core import CacheConfigError, CacheSettings, SemanticCache
from aigov.cache.key import exact_key, scope_for
from aigov.cache.policies.memory import MemoryStore
from aigov.cache.verifier import verify
from aigov.request import parse_chat_request

ANSWER = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                                                    "finish_reason": "stop"}]}


def _req(text: str, **extra: Any) -> Any:
    return parse_chat_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": text}], **extra}))


@pytest.mark.parametrize("conf, needle", [
    ({"vectordb": {"threshold": 0.2}}, "looks like a distance"),
    ({"vectordb": {"threshold": 1.5}}, "outside [0, 1]"),
    ({"vectordb": {"distance_threshold": 0.1}}, "SIMILARITY"),
    ({"vectordb": {"namespace": "a b"}}, "namespace"),
    ({"embeddings": {"provider": "openai"}}, "needs embeddings.url"),
    ({"admin_path": "/purge"}, "admin_key"),
])
def test_bad_config_is_a_clear_error(conf: dict, needle: str) -> None:
    with pytest.raises(CacheConfigError, match=None) as err:
        CacheSettings.from_config(conf)
    assert needle in str(err.value)


@pytest.mark.parametrize("a, b", [
    ("how do I enable two-factor authentication", "how do I disable two-factor authentication"),
    ("convert 100 USD to EUR", "convert 100 EUR to USD"),
    ("flights from Paris to London", "flights from London to Paris"),
    ("Is it safe to eat raw eggs?", "Is it not safe to eat raw eggs?"),
    ("Explain 3 ways to sort a list", "Explain 5 ways to sort a list"),
    ("How many hours are in a week?", "How many minutes are in a week?"),
    ("What is the capital of France?", "What is the capital of Germany?"),
    ("How do I increase the request timeout?", "How do I decrease the request timeout?"),
    # numbers count in order and with repeats (a new user's wrong hits, similarity 0.97-0.99)
    ("what is 12 divided by 4", "what is 4 divided by 12"),
    ("is 5 greater than 10", "is 10 greater than 5"),
    ("what is 7 minus 3", "what is 3 minus 7"),
    ("book 2 rooms for 2 nights", "book 2 rooms for 1 night"),
    ("ai proxy question space 0e542b item 0", "ai proxy question space 0e542b item 1"),
    ("What is 10⁶ divided by 2?", "What is 106 divided by 2?"),  # the exact layer no longer folds NFKC
    # relative time: a day or period shifted from now must be in both texts (similarity 0.93-0.96)
    ("What's the weather in Paris today?", "What's the weather in Paris tomorrow?"),
    ("What did the stock market do yesterday?", "What did the stock market do today?"),
    ("Show my calendar for this week", "Show my calendar for next week"),
    ("What meetings do I have?", "What meetings do I have tomorrow?"),  # no time reference = now
    ("Revenue over the past 3 months", "Revenue over the next 3 months"),
    ("Is the office open this Friday?", "Is the office open next Friday?"),
    ("What is the forecast for today?", "What is the forecast for tonight?"),
    # age groups exclude each other
    ("What is the dosage of amoxicillin for a child?", "What is the dosage of amoxicillin for an adult?"),
    ("Can kids take ibuprofen?", "Can the elderly take ibuprofen?"),
    ("Is this toy safe for a toddler?", "Is this toy safe for a baby?"),
])
def test_verifier_refuses_changed_meaning(a: str, b: str) -> None:
    assert not verify(b, a).ok and not verify(a, b).ok


@pytest.mark.parametrize("a, b", [
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is my account balance?", "Show me my account balance"),
    ("a cat sits on 2 mats", "one cat sits on two mats"),  # 1 ("a", "one") is left out
    ("it costs 1,000 dollars", "it costs 1000 dollars"),
    # case and inner spaces of plain words now reach the verifier (the exact layer keeps them)
    ("What is the capital of France?", "what is the capital of france"),
    ("WHAT IS THE CAPITAL OF FRANCE?", "What is the capital of France?"),
    ("How do I  reset my password?", "How do I reset my password?"),
    ("Fix this:\n  x = 1\n  y = 2", "Fix this:\r\n  x = 1\r\n  y = 2  "),   # same indentation
    # relative time: unmarked is the present; a shift matches the same shift in other words
    ("What's the weather today?", "What's the weather?"),
    ("Show my calendar for next week", "Show me my calendar for the coming week"),
    ("Sales over the last 3 months", "Sales over the past three months"),
    # age-group synonyms are one member
    ("Can kids take ibuprofen?", "Can children take ibuprofen?"),
    ("Is this safe for a teenager?", "Is this safe for teens?"),
])
def test_verifier_keeps_paraphrases(a: str, b: str) -> None:
    assert verify(b, a).ok and verify(a, b).ok


@pytest.mark.parametrize("query, candidate", [
    ("ai proxy question 58efaade", "ai proxy question 58d9bab8"),        # the tester's pair
    ("What is the status of order 550e8400-e29b-41d4-a716-446655440000?",
     "What is the status of order 550e8400-e29b-41d4-a716-446655440001?"),
    ("Cancel request 12345678-abcd-efab-cdef-abcdefabcdef",             # the digits alike, hex differs
     "Cancel request 12345678-abcd-efab-cdef-abcdefabcdee"),
    ("Where is my order A-1234?", "Where is my order B-1234?"),
    ("Is ticket INC-4421 resolved?", "Is ticket CHG-4421 resolved?"),
    ("Price of SKU XR-200B", "Price of SKU XR-300B"),
    ("Show commit deadbeef", "Show commit cafebabe"),                    # hex without a digit
    ("What is gpt-4o?", "What is gpt-4?"),
    ("What is gpt-4o?", "What is gpt-4o-mini?"),                         # one side names more
    ("How do I reset the password of user jdoe42?", "How do I reset the password of the user?"),
    ("Book a meeting at 10am", "Book a meeting at 10pm"),
    ("Orders placed on 2021-03-04", "Orders placed on 2021-04-03"),      # same numbers, other date
])
def test_verifier_refuses_other_identifiers(query: str, candidate: str) -> None:
    """Prompts that differ only in an identifier (hex id, UUID, order/ticket number, SKU, model
    name, date) ask about different things, however close their embeddings."""
    for q, c in ((query, candidate), (candidate, query)):
        verdict = verify(q, c)
        # (a swapped date's numbers already differ in order: the number check refuses it first;
        # 10am/10pm is a clock time, whose half of the day the unit check compares first)
        assert not verdict.ok and verdict.reason.startswith(("ids:", "numbers:", "units:")), (q, c, verdict)


@pytest.mark.parametrize("query, candidate", [
    # The tester's exact-layer pairs: base64, a password; MiniLM is uncased and scores them ~1.0.
    ("Decode this base64: SGVsbG8gV29ybGQ=", "Decode this base64: sgvsbg8gv29ybgq="),
    ("Is the password Tr0ub4dor correct?", "Is the password tr0ub4dor correct?"),
    # Hex and UUIDs too: a token cannot tell a hash from a case-sensitive secret, and a miss only
    # costs one upstream call.
    ("ai proxy question 58efaade", "ai proxy question 58EFAADE"),
    ("What is the status of order 550e8400-e29b-41d4-a716-446655440000?",
     "What is the status of order 550E8400-E29B-41D4-A716-446655440000?"),
    ("Where is my order A-1234?", "Where is my order a-1234?"),
    ("What is GPT-4o?", "What is gpt4o?"),
])
def test_verifier_compares_identifiers_with_their_case(query: str, candidate: str) -> None:
    for q, c in ((query, candidate), (candidate, query)):
        verdict = verify(q, c)
        assert not verdict.ok and verdict.reason.startswith("ids:"), (q, c, verdict)


@pytest.mark.parametrize("query, candidate, reason", [
    # mixed case inside a word (base64 without digits, product names): another casing is refused
    ("What does QWxhZGRpbg decode to?", "What does qwxhzgrpbg decode to?", "case:"),
    ("Decode YWJj please", "Decode YWJJ please", "case:"),
    # multi-line text (code) whose shared lines are indented otherwise: another program
    ("Is this valid python?\nif x:\n    y()\nz()", "Is this valid python?\nif x:\n    y()\n    z()", "indent:"),
    ("Fix this YAML:\na:\n  b: 1\nc: 2", "Fix this YAML:\na:\n  b: 1\n  c: 2", "indent:"),
    ("Run:\n\tmake all\nok?", "Run:\n    make all\nok?", "indent:"),   # a tab is not 4 spaces (make)
])
def test_verifier_refuses_case_and_indentation_variants(query: str, candidate: str, reason: str) -> None:
    for q, c in ((query, candidate), (candidate, query)):
        verdict = verify(q, c)
        assert not verdict.ok and verdict.reason.startswith(reason), (q, c, verdict)


@pytest.mark.parametrize("query, candidate", [
    ("What is the status of order 58efaade?", "What's the status of order 58efaade?"),  # same id
    ("Where is my order A-1234?", "Where is my order A-1234 now?"),
    # Separators and spaces inside an id do not make another id: gpt4o, gpt-4o and gpt 4o name one
    # model (gpt-4 and gpt-4o-mini are other ones, refused above); 10am is 10 am.
    ("What is gpt4o?", "What is gpt-4o?"),
    ("What is GPT-4o?", "What is GPT4o?"),
    ("What does QWxhZGRpbg decode to?", "what does QWxhZGRpbg decode to"),  # the word's own case kept
    ("Book a meeting at 10am", "Book a meeting at 10 am"),
    # Quantities are the number and unit checks' business, not identifiers.
    ("How far is a 5km run?", "How far is a 5 km run?"),
    ("Songs from the 1990s", "Songs from the 1990's"),
    # Ordinary paraphrases without ids.
    ("How do I reset my password?", "How can I reset my password?"),
    ("A man is playing a guitar.", "A man plays the guitar."),
    ("Explain the difference between a list and a tuple", "What is the difference between a list and a tuple?"),
])
def test_verifier_accepts_the_same_identifiers(query: str, candidate: str) -> None:
    for q, c in ((query, candidate), (candidate, query)):
        assert verify(q, c).ok, (q, c, verify(q, c))


@pytest.mark.parametrize("query, candidate, reason", [
    # A second tester's pairs (MiniLM scores them 0.83-1.0): acronyms, base64 and quoted literals
    # in another case, a literal's inner spacing, the same code lines in another order.
    ("tell me about US", "tell me about us", "case:"),
    ("What is IT?", "What is it?", "case:"),
    ("Is HUNTER a strong password?", "Is hunter a strong password?", "case:"),
    ("Decode this base64: QUJDRA==", "Decode this base64: qujdra==", "case:"),
    ("DECODE THIS PLEASE: QUJDRA==", "decode this please: qujdra==", "case:"),   # shouted, still data
    ("Is a+b/Cd= valid base64?", "Is a+b/cd= valid base64?", "case:"),
    ("SELECT * FROM users WHERE name = 'Bob'", "SELECT * FROM users WHERE name = 'bob'", "literal:"),
    ("what does this print:\nprint('a  b')", "what does this print:\nprint('a b')", "literal:"),
    ('Translate "Good Morning" to French', 'Translate "good morning" to French', "literal:"),
    ("What does `ls -A` do?", "What does `ls -a` do?", "literal:"),
    ("what does this print:\nx = 1\nx = 2\nprint(x)", "what does this print:\nx = 2\nx = 1\nprint(x)", "order:"),
    ("Is this safe?\nrm -rf build\ncd build", "Is this safe?\ncd build\nrm -rf build", "order:"),
    # "after"/"before" next to a time word shift it
    ("What's the weather the day after tomorrow?", "What's the weather tomorrow?", "time:"),
    ("What is the weather this weekend", "What is the weather the weekend after next", "time:"),
    ("What should I do the day before my exam", "What should I do the day of my exam", "time:"),
    ("Can you finish it before tomorrow?", "Can you finish it tomorrow?", "time:"),
    # age groups, hyphenated compounds looked up whole or by parts
    ("ibuprofen dose for a toddler", "ibuprofen dose for a preschooler", "class:age"),
    ("ibuprofen dose for kids", "ibuprofen dose for grown-ups", "class:age"),
    ("Is the dark-blue shirt in stock?", "Is the red shirt in stock?", "class:colour"),
    # exclusion is negation, counted apart from "not" (so a negated text with it still differs)
    ("how do I delete all files except hidden ones", "how do I delete all hidden files", "negation"),
    ("list every user other than admins", "list every admin user", "negation"),
    ("Sum the invoices excluding VAT", "Sum the invoices with VAT", "negation"),
    ("don't delete anything except the logs", "don't delete the logs", "negation"),
])
def test_verifier_refuses_case_literal_order_time_age_and_exclusion(query: str, candidate: str,
                                                                    reason: str) -> None:
    for q, c in ((query, candidate), (candidate, query)):
        verdict = verify(q, c)
        assert not verdict.ok and verdict.reason.startswith(reason), (q, c, verdict)


@pytest.mark.parametrize("query, candidate", [
    # a whole text in capitals is shouting, not acronyms; sentence case and punctuation are nothing
    ("HOW DO I RESET MY PASSWORD", "how do I reset my password?"),
    ("WHAT IS IT?", "What is it?"),
    ("Where is the US embassy?", "where is the US embassy"),
    ("Book it for 10 AM", "Book it for 10 am"),
    ("Input/output errors on my disk", "What are input/output errors on my disk"),  # first letter only
    # apostrophes open no literal; a literal written the same in the other text matches
    ("What do kids' teachers earn?", "What do the kids' teachers earn?"),
    ('What does "carpe diem" mean?', 'What is the meaning of "carpe diem"?'),
    ("Translate 'hello' to French", "Translate hello to French"),
    # shared code lines in the same order; a shift said the same way in both texts
    ("what does this print:\nx = 1\nprint(x)", "what will this print?\nx = 1\nprint(x)"),
    ("What's the weather the day after tomorrow?", "what is the weather the day after tomorrow"),
    ("Is this toy safe for a grown-up?", "Is this toy safe for adults?"),
    ("Can kids take ibuprofen?", "Can children take ibuprofen?"),
])
def test_verifier_keeps_case_literal_and_time_paraphrases(query: str, candidate: str) -> None:
    for q, c in ((query, candidate), (candidate, query)):
        assert verify(q, c).ok, (q, c, verify(q, c))


@pytest.mark.parametrize("strategy", ["memory", "redis"])
def test_identical_prompt_hits_at_every_allowed_threshold(strategy: str, redis_server: Any) -> None:
    if not redis_server.running:
        redis_server.start()
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    ns = f"thr-{uuid.uuid4().hex[:6]}"
    settings = CacheSettings.from_config({"exact_caching": False, "vectordb": {
        "strategy": strategy, "namespace": ns, "redis": {"host": "127.0.0.1", "port": port, "timeout_ms": 2000}}})
    cache = SemanticCache(settings)
    req = _req("What is the time complexity of quicksort?")
    scope = scope_for(req, namespace=ns, consumer_id="c1", route_id="r")
    key = exact_key(scope, req.prompt_text())
    cache.save(scope, key, req.prompt_text(), cache.embed(req.prompt_text()), ANSWER, None, "m")
    try:
        for t in (0.5, 0.7, 0.82, 0.9, 0.95, 0.99, 1.0):
            cache.settings.threshold = t
            found = cache.lookup(scope, req.prompt_text(), key)
            assert found.status == "Hit" and found.layer == "semantic", t
        other = scope_for(req, namespace=ns, consumer_id="c2", route_id="r")
        assert cache.lookup(other, req.prompt_text(), exact_key(other, req.prompt_text())).status == "Miss"
    finally:
        cache.store.purge()


def test_memory_store_bounds_size_and_ttl() -> None:
    store = MemoryStore("t", max_entries=3)
    settings = CacheSettings.from_config({"cache_ttl": 1})
    cache = SemanticCache(settings, store=store, embedder=None)
    req = _req("q")
    scope = scope_for(req, namespace="t", consumer_id="c", route_id="r")
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(5, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for i in range(5):
        cache.save(scope, f"k{i}", f"prompt {i}", vecs[i], ANSWER, None, "m")
    assert len(store) == 3
    assert store.get_exact(scope, "k0") is None and store.get_exact(scope, "k4") is not None
    assert store.search(scope, vecs[4], 1, 0.99)[0][0].key == "k4"
    time.sleep(1.05)
    assert store.get_exact(scope, "k4") is None
    assert store.search(scope, vecs[4], 1, 0.5) == []


def test_an_image_in_the_prompt_is_part_of_the_exact_scope() -> None:
    # Only text is embedded: another picture with the same question must never share an answer.
    import json as _json

    from aigov.cache.key import exact_key, scope_for
    from aigov.request import parse_chat_request

    def scope(image: str):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": image}}]}]}
        return scope_for(parse_chat_request(_json.dumps(body).encode()), namespace="n",
                         consumer_id="c", route_id="r")

    cat, dog, cat_again = scope("https://x/cat.png"), scope("https://x/dog.png"), scope("https://x/cat.png")
    assert cat.params != dog.params
    assert exact_key(cat, "What is in this image?") != exact_key(dog, "What is in this image?")
    assert cat == cat_again


@pytest.mark.parametrize("strategy", ["memory", "redis"])
def test_prompts_longer_than_the_model_reads_never_match_semantically(strategy: str, redis_server: Any) -> None:
    """MiniLM reads 256 word pieces: two prompts that share them embed alike (similarity 1.0)
    whatever follows, and so do prompts whose first 16,384 characters are blank. They must not
    serve each other's answers; the same long prompt again is still an exact hit."""
    if not redis_server.running:
        redis_server.start()
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    ns = f"long-{uuid.uuid4().hex[:6]}"
    settings = CacheSettings.from_config({"vectordb": {
        "strategy": strategy, "namespace": ns, "redis": {"host": "127.0.0.1", "port": port, "timeout_ms": 2000}}})
    cache = SemanticCache(settings)
    log = " ".join(f"2026-12-03T10:{i % 60:02d}:00 worker-{i % 7} job {i} finished ok" for i in range(60))
    pairs = [(log + "\n\nSummarise this log in one sentence.", log + "\n\nTranslate this log into German."),
             (" " * 16384 + "How do I delete my account permanently?", " " * 16384 + "What is the capital of France?")]
    try:
        for stored_text, asked_text in pairs:
            stored, asked = _req(stored_text), _req(asked_text)
            scope = scope_for(stored, namespace=ns, consumer_id="c1", route_id="r")
            sp, ap = stored.prompt_text(), asked.prompt_text()
            v_stored, v_asked = cache.embed(sp), cache.embed(ap)
            assert float(v_stored @ v_asked) > 0.99     # the model cannot tell them apart ...
            cache.save(scope, exact_key(scope, sp), sp, v_stored, ANSWER, None, "m")
            found = cache.lookup(scope, ap, exact_key(scope, ap))
            assert found.status == "Miss" and found.rejected == ["beyond_model_window"]   # ... so no hit
            again = cache.lookup(scope, sp, exact_key(scope, sp))
            assert again.status == "Hit" and again.layer == "exact"
        # A short query is not served a long entry that merely starts like it.
        short = _req(log[:200])
        scope = scope_for(short, namespace=ns, consumer_id="c1", route_id="r")
        found = cache.lookup(scope, short.prompt_text(), exact_key(scope, short.prompt_text()))
        assert found.status == "Miss" and "beyond_model_window" in found.rejected
    finally:
        cache.store.purge()


def test_reads_whole_follows_the_tokenizer_not_the_length() -> None:
    from aigov.embeddings import MAX_EMBED_CHARS, get_embedder

    emb = get_embedder()
    assert emb.reads_whole("x" * 254)                       # too short to exceed: no tokenizing
    assert emb.reads_whole("word " * 254) and not emb.reads_whole("word " * 255)   # 2 + 254 = 256
    assert emb.reads_whole(" " * 12000 + "What is the capital of France?")   # blanks are no tokens
    assert not emb.reads_whole(" " * MAX_EMBED_CHARS + "x")                   # cut before the model
    # A prompt seen before is not tokenised again (lookups ask for the prompt and its candidates).
    calls = []
    real_fits = emb._fits
    emb._fits = lambda text: calls.append(len(text)) or real_fits(text)
    try:
        text = "a prompt long enough to need the tokenizer " * 10
        assert [emb.reads_whole(text) for _ in range(3)] == [True] * 3 and calls == [len(text)]
    finally:
        emb._fits = real_fits


def test_memory_store_search_matches_brute_force_through_churn() -> None:
    """Puts, re-puts of a key, LRU evictions and expiries in two scopes: every search returns the
    true nearest live entries of its own scope among those the store holds (rows move when
    entries leave, so a stale row map would return a wrong or another scope's entry)."""
    from aigov.cache.key import CacheScope
    from aigov.cache.policies import CacheEntry

    rng = np.random.default_rng(7)
    store = MemoryStore("churn", max_entries=300)
    scopes = [CacheScope("churn", c, "r", "m", "x", "p") for c in ("a", "b")]
    latest: dict[str, np.ndarray] = {}
    now = time.time()
    searched = 0
    for step in range(3000):
        which = int(rng.integers(2))
        key = f"k{int(rng.integers(700))}"  # repeats: a re-put replaces the entry and its vector
        vec = rng.normal(size=16).astype(np.float32)
        vec /= np.linalg.norm(vec)
        expires = now - 1 if step % 97 == 0 else now + 3600  # a few are stored already expired
        store.put(scopes[which], vec, CacheEntry(key, key, {}, "m", None, now, expires))
        latest[key] = vec
        if step % 25 == 24:
            for s in range(2):
                query = rng.normal(size=16).astype(np.float32)
                query /= np.linalg.norm(query)
                held = [(k, float(latest[k] @ query)) for k, (bucket, e) in store._entries.items()
                        if bucket == scopes[s].bucket and e.expires_at > time.time()]
                want = [k for k, _ in sorted(held, key=lambda kv: -kv[1])[:3]]
                got = [e.key for e, _ in store.search(scopes[s], query, 3, -1.0)]
                assert got == want, (step, s)
                searched += 1
    assert searched == 240 and 250 <= len(store) <= 300


def test_memory_store_bounds_bytes() -> None:
    """max_memory_mb: big answers evict the least recently used entries by size, and an entry
    bigger than the whole budget is not kept."""
    from aigov.cache.key import CacheScope
    from aigov.cache.policies import CacheEntry

    store = MemoryStore("bytes", max_entries=1000, max_bytes=200_000)
    scope = CacheScope("bytes", "c", "r", "m", "x", "p")
    vec = np.ones(8, dtype=np.float32) / np.sqrt(8)
    now = time.time()
    big = {"choices": [{"message": {"content": "x" * 30_000}}]}
    for i in range(10):
        store.put(scope, vec, CacheEntry(f"k{i}", f"p{i}", big, "m", None, now, now + 60))
    assert store.bytes <= 200_000
    assert 2 <= len(store) <= 3
    assert store.get_exact(scope, "k9") is not None and store.get_exact(scope, "k0") is None
    huge = {"choices": [{"message": {"content": "y" * 150_000}}]}
    store.put(scope, vec, CacheEntry("k9", "p9", huge, "m", None, now, now + 60))
    assert store.get_exact(scope, "k9") is None  # replaced by nothing: too big to keep
    assert store.bytes == sum(store.entry_bytes(e, 8) for _, e in store._entries.values())
    store.purge()
    assert store.bytes == 0 and len(store) == 0


def _answer(message: dict[str, Any], finish_reason: str = "stop") -> bytes:
    return json.dumps({"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [
        {"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}).encode()


def test_storable_refuses_tool_calls_even_with_finish_reason_stop() -> None:
    # Some providers answer tool calls with finish_reason "stop": replaying a call the model
    # asked the client to run, for another caller, would run it again on stale arguments.
    from aigov.cache.core import storable
    from aigov.llm_response import parse_upstream_response

    settings = CacheSettings.from_config({})
    plain = _answer({"role": "assistant", "content": "Paris."})
    call = _answer({"role": "assistant", "content": None, "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]})
    assert storable(settings, parse_upstream_response(200, {}, plain), None, len(plain)) == (True, "")
    ok, reason = storable(settings, parse_upstream_response(200, {}, call), None, len(call))
    assert not ok and reason == "tool calls"
