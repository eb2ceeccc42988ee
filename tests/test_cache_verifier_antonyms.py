"""The verifier's scales, contrast nouns and exclusive sets (aigov/cache/verifier.py).

A tester's probe got opposite prompts served at the default threshold (pros/cons,
largest/smallest, cheapest/most expensive, vegan/vegetarian, ...). The fix is knowledge of
scales and sets, not of those sentences, so most cases below use other words of the same sets.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cache_pairs import kept as _kept, lookup_pair, memory_cache, refused as _refused  # noqa: E402


@pytest.mark.parametrize("a, b", [
    # opposite poles of a scale, in positive, comparative and superlative forms
    ("What is the largest planet in the solar system?", "What is the smallest planet in the solar system?"),
    ("Which dog breed is the biggest?", "Which dog breed is the tiniest?"),          # doubled consonant, -iest
    ("What is the hottest month in Spain?", "What is the coldest month in Spain?"),
    ("Is Rust faster than Go?", "Is Rust slower than Go?"),
    ("What is the easiest language to learn?", "What is the hardest language to learn?"),
    ("Which route is shorter?", "Which route is longer?"),
    ("Who is the oldest player on the team?", "Who is the youngest player on the team?"),
    ("Is coffee good for you?", "Is coffee bad for you?"),
    ("What is the best laptop for students?", "What is the worst laptop for students?"),  # irregular
    ("Write a happy poem about rain", "Write a sad poem about rain"),
    ("Are cats happier indoors?", "Are cats sadder indoors?"),                           # -ier, -dder
    ("Which is the nearest station?", "Which is the farthest station?"),
    ("Is it expensive to live in Oslo?", "Is it inexpensive to live in Oslo?"),
    # "most"/"least" give a superlative its pole; "least" turns it round
    ("What is the cheapest city in Europe?", "What is the most expensive city in Europe?"),
    ("What is the cheapest city in Europe?", "What is the priciest city in Europe?"),    # pricey -> priciest
    ("Which phone is the least expensive?", "Which phone is the most expensive?"),
    ("Is a train more expensive than a bus?", "Is a train cheaper than a bus?"),
    ("Which is more affordable, Lisbon or Porto?", "Which is more expensive, Lisbon or Porto?"),
])
def test_opposite_poles_of_a_scale_are_refused(a: str, b: str) -> None:
    assert all(r.startswith("antonym:") for r in _refused(a, b))


@pytest.mark.parametrize("a, b", [
    ("What are the pros of nuclear power?", "What are the cons of nuclear power?"),
    ("What are the benefits of fasting?", "What are the risks of fasting?"),
    ("List the strengths of this plan", "List the weaknesses of this plan"),
    ("What are the upsides of remote work?", "What are the drawbacks of remote work?"),
])
def test_contrast_nouns_are_refused(a: str, b: str) -> None:
    assert all(r.startswith("antonym:") for r in _refused(a, b))


@pytest.mark.parametrize("a, b", [
    ("Give me a vegan recipe for dinner", "Give me a vegetarian recipe for dinner"),
    ("Are vegans allowed honey?", "Are pescatarians allowed honey?"),
    ("Is a tomato a fruit?", "Is a tomato a vegetable?"),
    ("Are peanuts nuts?", "Are peanuts legumes?"),
    ("Summarize the book in one sentence", "Summarize the book in one paragraph"),
    ("Summarize this article in 50 words", "Summarize this article in 50 sentences"),
    ("Write two pages about the French revolution", "Write two paragraphs about the French revolution"),
])
def test_exclusive_alternatives_are_refused(a: str, b: str) -> None:
    assert all(r.startswith("class:") for r in _refused(a, b))


@pytest.mark.parametrize("a, b", [
    # the same pole said otherwise: degrees, "least" + the opposite word, synonyms of one pole
    ("What is the cheapest city in Europe?", "What is the least expensive city in Europe?"),
    ("Which phone is cheaper?", "Which phone is less expensive?"),
    ("Which phone is more affordable?", "Which phone is less expensive?"),  # "more"/"less" as degrees only
    ("Where can I find inexpensive flights?", "Where can I find the least expensive flights?"),
    ("What is the biggest planet?", "What is the largest planet?"),
    ("Give me an easy recipe", "Give me a simple recipe"),
    ("Write a brief summary", "Write a short summary"),
    ("What are the benefits of meditation?", "What are the advantages of meditation?"),
    ("What are the pros and cons of Kotlin?", "What are the advantages and disadvantages of Kotlin?"),
    ("Healthy vegetables for kids", "Healthy veggies for kids"),
    ("Are fruits and vegetables good for you?", "Are vegetables and fruits good for you?"),
])
def test_same_pole_and_same_member_still_match(a: str, b: str) -> None:
    _kept(a, b)


def test_more_and_less_of_a_plain_noun_still_clash() -> None:
    # Only a scale word's "less"/"more" is taken as its degree; here they are quantities.
    assert sorted(_refused("How do I use more memory in Java?", "How do I use less memory in Java?")) == \
        ["antonym:less/more", "antonym:more/less"]


# The tester's 14 paraphrases (probe at the default threshold, memory store, verifier on).
PARAPHRASES = [
    ("What is the capital of France?", "what is the capital of france"),
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is the weather today?", "what's the weather today"),
    ("Who wrote Hamlet?", "who wrote hamlet?"),
    ("Can you recommend a good book", "can you recommend a good book?"),
    ("What's the dose of ibuprofen for a kid", "What's the ibuprofen dose for a child"),
    ("Explain quantum computing.", "explain quantum computing"),
    ("How do I install Docker on Windows?", "How can I install Docker on Windows?"),
    ("What are the benefits of meditation?", "What are the benefits of meditating?"),
    ("How do I cook rice?", "What's the way to cook rice?"),
    ("Tell me a joke about cats", "Tell me a cat joke"),
    ("What is machine learning?", "Can you explain what machine learning is?"),
    ("How tall is the Eiffel Tower?", "What is the height of the Eiffel Tower?"),
    ("Best way to learn Spanish", "What's the best way to learn Spanish?"),
    # and scale words the model puts close together, said the same way
    ("Is a train cheaper than a bus?", "Is a train less expensive than a bus?"),
]
# The tester's wrong hits (each one above 0.82 before the fix), through the cache's own lookup.
OPPOSITES = [
    ("What are the pros of nuclear power?", "What are the cons of nuclear power?"),
    ("What is the largest planet in the solar system?", "What is the smallest planet in the solar system?"),
    ("What is the cheapest city in Europe?", "What is the most expensive city in Europe?"),
    ("Give me a vegan recipe for dinner", "Give me a vegetarian recipe for dinner"),
    ("Write a happy poem about rain", "Write a sad poem about rain"),
    ("Summarize the book in one sentence", "Summarize the book in one paragraph"),
    ("Is coffee good for you?", "Is coffee bad for you?"),
    ("How do I make my code faster?", "How do I make my code slower?"),
    ("Is a tomato a fruit?", "Is a tomato a vegetable?"),
    # a second probe's (served at 0.82 before the rules at the end of this file)
    ("switch on the VPN on my laptop", "switch off the VPN on my laptop"),
    ("how to turn on bluetooth on iphone", "how to turn off bluetooth on iphone"),
    ("is zero an even number", "is zero an odd number"),
    ("list the even numbers below ten", "list the odd numbers below ten"),
    ("align text vertically in css", "align text horizontally in css"),
    ("How to center a div horizontally", "How to center a div vertically"),
    ("how to zip a folder on linux", "how to unzip a folder on linux"),
    ("approve the refund request for order", "deny the refund request for order"),
]
# (The probe's grant/revoke, spanish/french and cake/cookie pairs are at 0.806, 0.747 and 0.789
# cosine: misses at 0.82 without the verifier, so they are tested by verify alone below.)


@pytest.fixture(scope="module")
def cache() -> Iterator[Any]:
    yield from memory_cache("ant")


@pytest.mark.parametrize("stored, asked", OPPOSITES)
def test_the_testers_opposites_miss_through_the_cache(cache: Any, stored: str, asked: str) -> None:
    found = lookup_pair(cache, stored, asked)
    # The premise: the model alone would serve it (the nearest entry passed the threshold).
    assert found.status == "Miss" and found.rejected, (stored, asked, found.similarity)
    assert found.rejected[0].startswith(("antonym:", "class:"))


@pytest.mark.parametrize("stored, asked", PARAPHRASES)
def test_paraphrases_still_hit_through_the_cache(cache: Any, stored: str, asked: str) -> None:
    found = lookup_pair(cache, stored, asked)
    assert found.status == "Hit", (stored, asked, found.similarity, found.rejected)


# The second probe's rules. Each: its opposites refused, a paraphrase of the same words kept.

def test_antonyms_are_counted_so_a_recurring_preposition_does_not_hide_a_particle() -> None:
    # "on" is also the preposition of "on my laptop": as sets both texts have it
    assert _refused("switch on the VPN on my laptop", "switch off the VPN on my laptop") == \
        ["antonym:on/off", "antonym:off/on"]
    assert _refused("turn the heating on in the bedroom in winter",
                    "turn the heating off in the bedroom in winter")[0] == "antonym:on/off"
    _kept("how to turn on bluetooth on iphone", "how to switch on bluetooth on iphone")
    _kept("turn the lights on and off", "turn the lights off and on")


def test_parity_is_refused() -> None:
    assert _refused("is zero an even number", "is zero an odd number") == \
        ["antonym:even/odd", "antonym:odd/even"]
    _refused("sum of the odd digits of 1234", "sum of the even digits of 1234")
    _kept("is zero an even number", "is zero even")


def test_adverbs_of_antonyms_are_refused() -> None:
    assert _refused("How to center a div horizontally", "How to center a div vertically") == \
        ["antonym:horizontally/vertically", "antonym:vertically/horizontally"]
    _refused("is the service reachable publicly", "is the service reachable privately")
    _kept("align text vertically in css", "how do I vertically align text in css")


def test_decisions_on_requests_and_access_are_refused() -> None:
    assert _refused("approve the refund request for order", "deny the refund request for order")[0] == \
        "antonym:approve/deny"
    assert _refused("grant read access to the bucket", "revoke read access to the bucket")[0] == \
        "antonym:grant/revoke"
    _refused("who can grant admin rights", "who can deny admin rights")
    _kept("approve the refund request for order", "accept the refund request for order")
    _kept("grant read access to the bucket", "give read access to the bucket")


def test_un_before_a_short_stem_is_refused() -> None:
    # the prefix rule needs a stem of 4 letters or more ("unit" is not "it" undone)
    assert _refused("how to zip a folder on linux", "how to unzip a folder on linux") == \
        ["antonym:zip/unzip", "antonym:unzip/zip"]
    _refused("how do I pin a message in slack", "how do I unpin a message in slack")
    _kept("how to zip a folder on linux", "how do I zip a folder in linux")


def test_human_languages_exclude_each_other() -> None:
    assert _refused("translate hello to spanish", "translate hello to french") == \
        ["class:human_language:spanish!=french", "class:human_language:french!=spanish"]
    _refused("how do you say thank you in japanese", "how do you say thank you in korean")
    _kept("translate hello to spanish", "how do you say hello in spanish")
    _kept("how to say thank you in mandarin", "how to say thank you in chinese")


def test_a_second_probes_opposites_are_refused() -> None:
    # languages the first list lacked, permit/prohibit, locally/remotely, enable vs turn off
    _refused("translate hello into slovak", "translate hello into czech")
    _refused("translate hello into lithuanian", "translate hello into latvian")
    _refused("how do I permit a user to ssh", "how do I prohibit a user from ssh")
    _refused("how to store passwords locally", "how to store passwords remotely")
    assert _refused("how to enable dark mode", "how to turn off dark mode")[0] == "antonym:enable/off"
    _refused("how do I disable wifi", "how do I turn wifi on")
    _kept("how to enable dark mode", "how to turn on dark mode")
    _kept("disable notifications on iphone", "turn off notifications on iphone")
    _kept("how to store passwords locally", "how do I store passwords locally")
