"""The verifier's relation swaps, tense, possessives and the word lists a user's near misses lacked.

A new user found 15 pairs served as cache hits at the default threshold (0.82, all-MiniLM-L6-v2,
cosine 0.83 to 0.99), each a wrong answer. The fix is general rules (arguments swapped round a
relation word, a question's tense, possessives, antonym pairs and closed classes), so most cases
below use other words and sentences than the user's; each rule also keeps a paraphrase.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cache_pairs import kept as _kept, lookup_pair, memory_cache, refused as _refused  # noqa: E402


# The user's pairs, with the check that refuses each now (all were hits before).
USER_NEAR_MISSES = [
    ("flights from new york to london", "flights from london to new york", "direction:"),
    ("list prime numbers under 100", "list prime numbers over 100", "antonym:"),
    ("is a bigger than b", "is b bigger than a", "direction:"),
    ("what is the population of new york city", "what is the population of new york state", "class:"),
    ("summarize the news in one line", "summarize the news in one paragraph", "class:"),
    ("write a cover letter for a senior engineer role", "write a cover letter for a junior engineer role",
     "antonym:"),
    ("what's a synonym for happy", "what's an antonym for happy", "antonym:"),
    ("my flight is delayed what should i do", "my flight is cancelled what should i do", "class:"),
    ("who is the president of the united states", "who was the president of the united states", "tense:"),
    ("tell me about the rise of the roman empire", "tell me about the fall of the roman empire", "antonym:"),
    ("give me a list of men's names", "give me a list of women's names", "class:"),
    ("how to care for an indoor plant", "how to care for an outdoor plant", "antonym:"),
    ("how to get into harvard", "how to get out of harvard", "antonym:"),
    ("explain the theory of evolution to a child", "explain the theory of evolution to an expert", "class:"),
    ("what is the past tense of run", "what is the future tense of run", "class:"),
]


@pytest.mark.parametrize("a, b, prefix", USER_NEAR_MISSES)
def test_the_users_near_misses_are_refused(a: str, b: str, prefix: str) -> None:
    assert all(r.startswith(prefix) for r in _refused(a, b))


# --- arguments swapped round a relation word --------------------------------------------------

@pytest.mark.parametrize("a, b", [
    # names of several words: the old check compared the nearest words only ("york"/"london")
    ("train from new york city to boston", "train from boston to new york city"),
    ("how to fly from los angeles to san francisco", "how to fly from san francisco to los angeles"),
    ("cheapest way from hong kong to kuala lumpur", "cheapest way from kuala lumpur to hong kong"),
    # letters as names, and other relation words
    ("is x greater than y", "is y greater than x"),
    ("is the sun bigger than the earth", "is the earth bigger than the sun"),
    ("python vs java for web development", "java vs python for web development"),
    ("should I wash rice before soaking", "should I soak rice before washing"),
    ("why do people prefer tea over coffee", "why do people prefer coffee over tea"),
    ("use tabs instead of spaces", "use spaces instead of tabs"),
    ("copy the file from the laptop onto the server", "copy the file from the server onto the laptop"),
])
def test_arguments_swapped_round_a_relation_word_are_refused(a: str, b: str) -> None:
    assert all(r.startswith("direction:") for r in _refused(a, b))


def test_the_reason_names_the_words_that_crossed() -> None:
    assert _refused("flights from new york to london", "flights from london to new york") == \
        ["direction:new<to<london", "direction:london<to<new"]
    assert _refused("is a bigger than b", "is b bigger than a") == \
        ["direction:a<than<b", "direction:b<than<a"]


@pytest.mark.parametrize("a, b", [
    # a phrase moved whole crosses the relation word one way only
    ("how to get from the airport to the hotel", "how do I get to the hotel from the airport"),
    ("flights from new york to london", "flights to london from new york"),
    ("travel from a city to the coast", "travel to the coast from a city"),
    ("rather than driving i prefer walking", "i prefer walking rather than driving"),
    ("flights from new york to london", "new york to london flights"),
    # "a" is an article unless the text names things by letters
    ("is a cat bigger than a dog", "is a cat larger than a dog"),
    ("is a bigger than b", "is a larger than b"),
])
def test_a_phrase_moved_whole_is_no_swap(a: str, b: str) -> None:
    _kept(a, b)


def test_reworded_paragraphs_do_not_pair_their_relation_words() -> None:
    # GPTCache pairs: a sentence's clauses move round infinitive "to"s; the arguments looked at
    # are a relation word's neighbours, and repeated "to"s are paired only within one sentence
    _kept("You can use the `ls` method on a FileSystem instance to list files from a cloud storage. "
          "You need to specify the path to the directory as a parameter.",
          "The `ls` method of a FileSystem instance can be employed to list files from a cloud "
          "storage, with the path to the directory needing to be specified as a parameter.")
    _kept("For pretrained speech recognition models, you need to load a feature extractor and "
          "tokenizer and combine them in a processor.",
          "You must combine a feature extractor, tokenizer, and processor to utilize pretrained "
          "speech recognition models.")
    _kept("The `add_column` function adds a column to the table at a specified position.",
          "A specified position can be used to insert a column into the table with the "
          "`add_column` function.")


# --- a question's tense -------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [
    ("what was the price of bitcoin", "what is the price of bitcoin"),
    ("who will be the ceo of twitter", "who is the ceo of twitter"),
    ("who's the ceo of twitter", "who'll be the ceo of twitter"),
    ("what does a bitcoin cost", "what did a bitcoin cost"),
    ("is it raining in paris", "was it raining in paris"),
    ("is it sunny in rome", "is it going to be sunny in rome"),
    ("who won the world cup", "who will win the world cup"),
    ("how many people were living in tokyo", "how many people are living in tokyo"),
])
def test_questions_in_another_tense_are_refused(a: str, b: str) -> None:
    assert all(r.startswith("tense:") for r in _refused(a, b))


@pytest.mark.parametrize("a, b", [
    ("who is the president of france", "who's the president of france"),
    ("is it going to rain", "will it rain"),
    # the future and present of a verb other than "be" are one question
    ("what does this code print", "what will this code print"),
    ("what happens if I mix bleach and vinegar", "what will happen if I mix bleach and vinegar"),
    # a past verb is compared with the future only ("who invented" is "who is the inventor")
    ("who invented the telephone", "who is the inventor of the telephone"),
    ("who won the world cup", "who was the winner of the world cup"),
    # a dated question is compared by its date
    ("what will the weather be like tomorrow", "what's the weather like tomorrow"),
    ("who was the president in 2010", "who is the president in 2010"),
    # statements' tense is narration (captions)
    ("A man is playing a guitar.", "A man was playing a guitar."),
])
def test_tense_is_compared_only_where_it_is_the_time(a: str, b: str) -> None:
    _kept(a, b)


# --- possessives, antonym pairs and closed classes ----------------------------------------------

def test_a_possessive_is_its_word() -> None:
    assert _refused("the girl's bike is red", "the boy's bike is red")[0] == "class:gender:girl!=boy"
    assert _refused("what are the employee's rights", "what are the employer's rights")[0] == \
        "antonym:employee/employer"
    _kept("what are men's names", "what are names for men")
    _kept("a list of women's names", "a list of names for women")


@pytest.mark.parametrize("a, b", [
    ("list cities with population below 1 million", "list cities with population over 1 million"),
    ("temperatures above zero", "temperatures under zero"),
    ("how to move files into a folder", "how to move files out of a folder"),
    ("how do I log into gmail", "how do I log out of gmail"),
    ("the causes of the decline of rome", "the causes of the rise of rome"),
    ("what is the plural of mouse", "what is the singular of mouse"),
    ("what is a prefix in english", "what is a suffix in english"),
    ("primary school curriculum in japan", "secondary school curriculum in japan"),
    ("is the stock market bullish", "is the stock market bearish"),
    ("best outdoor games for a party", "best indoor games for a party"),
    ("junior developer salary in berlin", "senior developer salary in berlin"),
])
def test_the_missing_antonym_pairs_are_refused(a: str, b: str) -> None:
    assert all(r.startswith("antonym:") for r in _refused(a, b))


@pytest.mark.parametrize("a, b", [
    ("list prime numbers under 100", "list prime numbers below 100"),
    ("list prime numbers over 100", "list prime numbers above 100"),
    ("numbers over 100", "numbers more than 100"),
    ("how to care for an indoor plant", "indoor plant care tips"),
    ("what's a synonym for happy", "what is another word for happy"),
])
def test_the_same_side_said_otherwise_still_matches(a: str, b: str) -> None:
    _kept(a, b)


@pytest.mark.parametrize("a, b, cls", [
    ("what is the capital of the state", "what is the capital of the country", "admin_level"),
    ("what's the biggest city in the county", "what's the biggest town in the county", "admin_level"),
    ("write the summary in three lines", "write the summary in three sentences", "text_unit"),
    ("python tutorial for beginners", "python tutorial for experts", "audience"),
    ("a beginner's guide to chess", "an advanced guide to chess", "audience"),
    ("explain it like i'm a layman", "explain it like i'm a professional", "audience"),
    ("explain black holes to a kid", "explain black holes to a specialist", "audience"),
    ("what is the past participle of go", "what is the present participle of go", "tense"),
    ("my train was cancelled", "my train was delayed", "disruption"),
    ("the meeting is postponed what now", "the meeting is cancelled what now", "disruption"),
])
def test_the_missing_classes_are_refused(a: str, b: str, cls: str) -> None:
    assert all(r.startswith(f"class:{cls}:") for r in _refused(a, b))


@pytest.mark.parametrize("a, b", [
    # synonyms are one member
    ("explain evolution to a kid", "explain evolution to a child"),
    ("explain it to an expert", "explain it to a professional"),
    ("which nation has the most lakes", "which country has the most lakes"),
    ("the meeting was postponed", "the meeting was delayed"),
    # "states" of "the United States" is no administrative level
    ("what is the population of the united states", "what is the population of the country"),
    # a member on one side only is no replacement
    ("summarize in one line", "give a one line summary"),
])
def test_the_new_classes_keep_synonyms_and_one_sided_words(a: str, b: str) -> None:
    _kept(a, b)


# --- through the cache, with the real model ------------------------------------------------------

@pytest.fixture(scope="module")
def cache() -> Iterator[Any]:
    yield from memory_cache("nm")


@pytest.mark.parametrize("stored, asked, prefix", USER_NEAR_MISSES)
def test_the_users_near_misses_miss_through_the_cache(cache: Any, stored: str, asked: str,
                                                      prefix: str) -> None:
    found = lookup_pair(cache, stored, asked)
    # The premise: the model alone would serve it (the nearest entry passed the threshold).
    assert found.status == "Miss" and found.rejected, (stored, asked, found.similarity)
    assert found.rejected[0].startswith(prefix), found.rejected


@pytest.mark.parametrize("stored, asked", [
    ("flights from new york to london", "flights to london from new york"),
    ("who is the president of the united states", "who's the president of the united states"),
    ("give me a list of men's names", "give me a list of names for men"),
    ("explain the theory of evolution to a child", "explain the theory of evolution to a kid"),
])
def test_paraphrases_of_the_near_misses_still_hit_through_the_cache(cache: Any, stored: str,
                                                                    asked: str) -> None:
    found = lookup_pair(cache, stored, asked)
    assert found.status == "Hit", (stored, asked, found.similarity, found.rejected)
