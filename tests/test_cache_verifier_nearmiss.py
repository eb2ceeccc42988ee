"""The verifier's relation swaps, tense, possessives and the word lists a user's near misses lacked.

A new user found 15 pairs served as cache hits at the default threshold (0.82, all-MiniLM-L6-v2,
cosine 0.83 to 0.99), each a wrong answer. The fix is general rules (arguments swapped round a
relation word, a question's tense, possessives, antonym pairs and closed classes), so most cases
below use other words and sentences than the user's; each rule also keeps a paraphrase.

A tester then found more near misses served (inflected antonyms: "stopping"/"starting", "won"/
"lost", "sun rise"/"sun set"; pairs and classes no rule had: differences/similarities, time/space
complexity, cheapest/fastest, git commit/push, "in order from the sun"/"of size", ...) and true
paraphrases the relation swap refused ("Python vs Go" / "Go vs Python", "Python is faster than
Java" / "Java is slower than Python", "the distance from London to Paris" / "from Paris to
London"). Those are the second half of this file.
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


# === the tester's round: inflections, compounds, new pairs and classes, symmetric relations ===

# The tester's near misses (wrong answers served through a gateway at 0.82), as they were or
# nearly, with the check that refuses each now.
TESTER_NEAR_MISSES = [
    ("What happens after stopping antidepressants?", "What happens after starting antidepressants?",
     "antonym:"),
    ("Why was the nginx service stopped?", "Why was the nginx service started?", "antonym:"),
    ("Who won the Super Bowl in 2020?", "Who lost the Super Bowl in 2020?", "antonym:"),
    ("tips for winning at chess", "tips for losing at chess", "antonym:"),
    ("what time is sun rise in London", "what time is sun set in London", "antonym:"),
    ("what is the time complexity of quicksort", "what is the space complexity of quicksort", "class:"),
    ("what are the differences between TCP and UDP", "what are the similarities between TCP and UDP",
     "antonym:"),
    ("What is the boiling point of water at sea level?", "What is the freezing point of water at sea level?",
     "antonym:"),
    ("how to find duplicate rows in SQL", "how to delete duplicate rows in SQL", "antonym:"),
    ("how long does it take to walk a mile", "how long does it take to run a mile", "antonym:"),
    ("what were the causes of WW1", "what were the consequences of WW1", "antonym:"),
    ("should I get a static IP for my home server", "should I get a dynamic IP for my home server",
     "antonym:"),
    ("how to format dates with moment.js", "how to parse dates with moment.js", "antonym:"),
    ("what's the cheapest way to get from the airport to downtown",
     "what's the fastest way to get from the airport to downtown", "degree:"),
    ("what does git commit --amend do", "what does git push --amend do", "class:"),
    ("list the planets in order from the sun", "list the planets in order of size", "order:"),
]

# The tester's true paraphrases the last change refused (each must hit again).
TESTER_PARAPHRASES = [
    ("Compare Python vs Go for web servers", "Compare Go vs Python for web servers"),
    ("Is Python faster than Java?", "Is Java slower than Python?"),
    ("distance from London to Paris", "distance from Paris to London"),
]


@pytest.mark.parametrize("a, b, prefix", TESTER_NEAR_MISSES)
def test_the_testers_near_misses_are_refused(a: str, b: str, prefix: str) -> None:
    assert all(r.startswith(prefix) for r in _refused(a, b))


@pytest.mark.parametrize("a, b", TESTER_PARAPHRASES)
def test_the_testers_paraphrases_pass(a: str, b: str) -> None:
    _kept(a, b)


# --- inflections: doubled consonants, irregular verbs, compounds of two words --------------------

@pytest.mark.parametrize("a, b, reason", [
    # the consonant doubled before -ing/-ed
    ("the service keeps stopping", "the service keeps starting", "antonym:stop/start"),
    ("the backup job stopped at midnight", "the backup job started at midnight", "antonym:stop/start"),
    ("is the team winning", "is the team losing", "antonym:win/lose"),
    # irregular past tenses and participles
    ("who won the election in 2016", "who lost the election in 2016", "antonym:win/lose"),
    ("when the war began", "when the war ended", "antonym:begin/end"),
    ("the stock rose 10 percent", "the stock fell 10 percent", "antonym:rise/fall"),
    ("he sold his house last year", "he bought his house last year", "antonym:sell/buy"),
    ("the window was shown", "the window was hidden", "antonym:show/hide"),
    ("how long does it take to drive from Boston to Chicago",
     "how long does it take to fly from Boston to Chicago", "antonym:drive/fly"),
    # a compound of the pairs written as two words, or hyphenated
    ("what time does the sun rise in Tokyo", "what time does the sun set in Tokyo",
     "antonym:sunrise/sunset"),
    ("sun-rise time in Oslo", "sun-set time in Oslo", "antonym:sunrise/sunset"),
    ("how to up load a file to the server", "how to download a file to the server",
     "antonym:upload/download"),
])
def test_inflected_antonyms_are_refused(a: str, b: str, reason: str | None) -> None:
    reasons = _refused(a, b)
    assert all(r.startswith("antonym:") for r in reasons), reasons
    if reason:
        assert reasons[0] == reason


@pytest.mark.parametrize("a, b", [
    ("the winning team of the world cup", "the team that won the world cup"),
    ("who started the fire", "who was starting the fire"),
    ("when does the sun rise in London", "what time is sunrise in London"),
    ("who won the super bowl in 2020", "who was the winner of the super bowl in 2020"),
    # "falling", "missed", "adding" keep their doubled letters: no other word is made
    ("why are leaves falling", "why are the leaves falling down"),
    # "if not given" is "if not specified": no "give" to oppose "take"
    ("the function takes a path; if not given, the default is used",
     "the function takes a path; if not specified, the default is used"),
])
def test_inflections_keep_paraphrases(a: str, b: str) -> None:
    _kept(a, b)


# --- new pairs and classes --------------------------------------------------------------------

@pytest.mark.parametrize("a, b, prefix", [
    ("how are python and java different", "how are python and java similar", "antonym:"),
    ("what is the boiling point of ethanol", "what is the melting point of ethanol", "antonym:"),
    ("how to select duplicate rows in postgres", "how to delete duplicate rows in postgres", "antonym:"),
    ("main causes of the French revolution", "main consequences of the French revolution", "antonym:"),
    ("how to statically link a library", "how to dynamically link a library", "antonym:"),
    ("how to parse json in javascript", "how to stringify json in javascript", "antonym:"),
    ("how many calories does walking burn", "how many calories does running burn", "antonym:"),
    ("why do ships float", "why do ships sink", "antonym:"),
    # resources a cost is measured in
    ("time complexity of merge sort", "space complexity of merge sort", "class:resource:"),
    ("how to reduce memory usage in pandas", "how to reduce cpu usage in pandas", "class:resource:"),
    # git's commands, in a text about git
    ("how to undo a git commit", "how to undo a git push", "class:git_command:"),
    ("git merge vs git rebase", "git merge vs git cherry-pick", "class:git_command:"),
    # comparatives and superlatives of other scales
    ("what is the quickest way to learn spanish", "what is the cheapest way to learn spanish", "degree:"),
    ("which is the best laptop for students", "which is the lightest laptop for students", "degree:"),
    ("Is the train cheaper than the bus?", "Is the train faster than the bus?", "degree:"),
    # what a list is ordered by
    ("sort the list by name", "sort the list by date", "order:"),
    ("rank countries by population", "rank countries by area", "order:"),
    ("list planets in order of distance from the sun", "list planets in order of size", "order:"),
])
def test_the_new_rules_refuse(a: str, b: str, prefix: str) -> None:
    reasons = _refused(a, b)
    assert all(r.startswith(prefix) for r in reasons), reasons


@pytest.mark.parametrize("a, b", [
    ("difference between tcp and udp", "what is the difference between udp and tcp"),
    ("what are the differences between TCP and UDP", "how do TCP and UDP differ"),
    ("how to remove duplicate rows in sql", "how to delete duplicate rows in sql"),
    ("how to find and remove duplicates in excel", "how to find and delete duplicates in excel"),
    ("what is the time complexity of quicksort", "what is the runtime complexity of quicksort"),
    ("what's the time complexity of quicksort", "quicksort time complexity"),
    ("time and space complexity of heapsort", "what is the time and space complexity of heapsort"),
    ("what does git commit do", "what does the git commit command do"),
    ("git pull vs git fetch", "git fetch vs git pull"),
    # one scale said otherwise: synonyms, "least", related scales, "high"/"low" grading any
    ("what is the cheapest way to get to the airport", "what is the least expensive way to get to the airport"),
    ("what's the fastest way to learn python", "what's the quickest way to learn python"),
    ("what is the tallest mountain", "what is the highest mountain"),
    ("get the latest version of node", "get the newest version of node"),
    ("i need to pay the smallest amount on my bill", "what is the lowest i can pay on my bill"),
    ("what's the cheapest and fastest way to Rome", "what's the fastest way to Rome"),
    # an order's key said with more words
    ("list the planets in order from the sun", "list the planets ordered by distance from the sun"),
    ("sort users by age", "sort the users by their age"),
])
def test_the_new_rules_keep_paraphrases(a: str, b: str) -> None:
    _kept(a, b)


# --- symmetric and converse relations, names not lemmatised ------------------------------------

@pytest.mark.parametrize("a, b", [
    # "vs", "versus" compare symmetrically
    ("python vs java for web development", "java vs python for web development"),
    ("Python versus Go for web servers", "Go versus Python for web servers"),
    ("AWS vs Azure for startups", "Azure vs AWS for startups"),
    # a comparison said the other way round: arguments swapped AND the pole turned
    ("Is Rust faster than Go?", "Is Go slower than Rust?"),
    ("Is a train more expensive than a bus?", "Is a bus cheaper than a train?"),
    ("Is a train more expensive than a bus?", "Is a bus less expensive than a train?"),
    ("Is Rust better than C++ for embedded?", "Is C++ worse than Rust for embedded?"),
    ("Does China have more people than India?", "Does India have fewer people than China?"),
    # a distance is the same both ways
    ("What is the distance from New York to Boston?", "What is the distance from Boston to New York?"),
    ("how far is it from Rome to Milan", "how far is it from Milan to Rome"),
    ("How far is Paris from London?", "How far is London from Paris?"),
    ("Paris to London distance", "distance from London to Paris"),
])
def test_symmetric_and_converse_relations_pass(a: str, b: str) -> None:
    _kept(a, b)


@pytest.mark.parametrize("a, b, reason", [
    # the pole kept, or turned without the swap
    ("Is Python faster than Java?", "Is Java faster than Python?", "direction:"),
    ("Is Python faster than Java?", "Is Python slower than Java?", "antonym:faster/slower"),
    ("are there more cats than dogs", "are there more dogs than cats", "direction:"),
    ("Does China have more people than India?", "Does India have fewer cars than China?", None),
    # a route, a flight, a translation has a direction; the name is not lemmatised ("pari")
    ("flights from London to Paris", "flights from Paris to London", "direction:london->paris"),
    ("how to get from Paris to Athens", "how to get from Athens to Paris", "direction:paris->athens"),
    ("translate from English to French", "translate from French to English", "direction:"),
    # "distance" in one text only is no symmetric relation, nor a distance asked with a route
    ("distance from London to Paris", "how to get from Paris to London", "direction:"),
    ("what is the distance and the best route from London to Paris",
     "what is the distance and the best route from Paris to London", "direction:london->paris"),
])
def test_directed_relations_are_still_refused(a: str, b: str, reason: str | None) -> None:
    reasons = _refused(a, b)
    if reason:
        assert reasons[0].startswith(reason), reasons


# --- the tester's pairs through the cache, with the real model -----------------------------------

# (MiniLM puts the boiling/freezing pair at 0.819, under the threshold: no candidate to refuse.)
@pytest.mark.parametrize("stored, asked, prefix", [p for p in TESTER_NEAR_MISSES if "boiling" not in p[0]])
def test_the_testers_near_misses_miss_through_the_cache(cache: Any, stored: str, asked: str,
                                                        prefix: str) -> None:
    found = lookup_pair(cache, stored, asked)
    assert found.status == "Miss" and found.rejected, (stored, asked, found.similarity)
    assert found.rejected[0].startswith(prefix), found.rejected


@pytest.mark.parametrize("stored, asked", TESTER_PARAPHRASES + [
    ("Is Rust faster than Go?", "Is Go slower than Rust?"),
    ("How far is London from Paris?", "How far is Paris from London?"),
])
def test_the_testers_paraphrases_hit_through_the_cache(cache: Any, stored: str, asked: str) -> None:
    found = lookup_pair(cache, stored, asked)
    assert found.status == "Hit", (stored, asked, found.similarity, found.rejected)


# --- a third user's near misses: clock halves, one end of a move, family words, the part of day --
# All six were served as hits through the stand-in at the default threshold (0.825 to 0.995).
THIRD_USER_NEAR_MISSES = [
    ("set an alarm for 7 am", "set an alarm for 7 pm", "units:"),
    ("transfer 100 dollars to my savings account", "transfer 100 dollars from my savings account", "direction:"),
    ("remind me to call mom at 5", "remind me to call dad at 5", "class:"),
    ("book a table for 2 people tonight", "book a table for 2 people at noon", "class:"),
    ("send an email to my boss", "read the email from my boss", "direction:"),
    # the same rules on other words
    ("wake me at 6:30 a.m.", "wake me at 6:30 p.m.", "units:"),
    ("copy the backups to the nas", "copy the backups from the nas", "direction:"),
    ("gift ideas for my grandma", "gift ideas for my grandpa", "class:"),
    ("what to cook this morning", "what to cook this evening", "antonym:"),
]
THIRD_USER_PARAPHRASES = [
    ("set an alarm for 7 pm", "set an alarm for 7 p.m."),
    ("I am 7 years old, suggest a game", "I'm 7 years old, suggest a game"),
    ("call my mom", "call my mother"),
    ("what should I cook tonight", "what should I cook this evening"),
    ("how do I get from London to Paris", "how to get from London to Paris"),
    ("translate from english to french", "translate english to french"),
    ("in addition to metrics, what tools evaluate models", "apart from metrics, what tools evaluate models"),
]


@pytest.mark.parametrize("a, b, reason", THIRD_USER_NEAR_MISSES)
def test_the_third_users_near_misses_are_refused(a: str, b: str, reason: str) -> None:
    reasons = _refused(a, b)
    assert all(r.startswith(reason) for r in reasons), reasons


@pytest.mark.parametrize("a, b", THIRD_USER_PARAPHRASES)
def test_the_third_users_paraphrases_pass(a: str, b: str) -> None:
    _kept(a, b)


@pytest.mark.parametrize("stored, asked, prefix", THIRD_USER_NEAR_MISSES[:5])
def test_the_third_users_near_misses_miss_through_the_cache(cache: Any, stored: str, asked: str,
                                                            prefix: str) -> None:
    found = lookup_pair(cache, stored, asked)
    assert found.status == "Miss", (stored, asked, found.similarity)
    if found.rejected:  # a candidate above the threshold, refused by the verifier
        assert found.rejected[0].startswith(prefix), found.rejected


# === a breaker's round: hours in words, meals, dawn/dusk, step- and grand- family words, "by" ===

# Served as hits through the gateway at 0.82 (the first two) or passed by the verifier.
BREAKER_NEAR_MISSES = [
    ("set an alarm for seven am", "set an alarm for seven pm", "units:"),
    ("book a table for four people for lunch", "book a table for four people for dinner", "class:meal"),
    ("what should I eat for breakfast before a run", "what should I eat for dinner before a run", "class:meal"),
    ("best time to photograph birds at dawn", "best time to photograph birds at dusk", "class:time_of_day"),
    ("birthday gift ideas for my grandson", "birthday gift ideas for my granddaughter", "class:gender"),
    ("how do I get along with my stepmom", "how do I get along with my stepdad", "class:gender"),
    ("show the emails sent to john", "show the emails sent by john", "direction:"),
    ("payments received from alice last month", "payments received by alice last month", "direction:"),
]


@pytest.mark.parametrize("a, b, prefix", BREAKER_NEAR_MISSES)
def test_the_breakers_near_misses_are_refused(a: str, b: str, prefix: str) -> None:
    assert all(r.startswith(prefix) for r in _refused(a, b))


@pytest.mark.parametrize("a, b", [
    ("set an alarm for 7 am", "set an alarm for seven am"),            # the hour in digits or words
    ("which one am I supposed to pick", "which one should I pick"),     # "one am" is no clock time
    ("healthy breakfast ideas", "healthy ideas for breakfast"),
    ("how do I get along with my stepmom", "how do I get along with my stepmother"),
    ("show the emails sent by john", "show the emails sent from john"),  # the sender either way
    ("datasets generated from a dictionary", "datasets created by a dictionary"),
    ("sort the list by date", "sort the list by the date"),              # a "by" that names no end
])
def test_the_breakers_rules_keep_paraphrases(a: str, b: str) -> None:
    _kept(a, b)


@pytest.mark.parametrize("stored, asked", [("set an alarm for seven am", "set an alarm for seven pm"),
                                           ("book a table for four people for lunch",
                                            "book a table for four people for dinner")])
def test_the_breakers_gateway_hits_now_miss_through_the_cache(cache: Any, stored: str, asked: str) -> None:
    found = lookup_pair(cache, stored, asked)
    assert found.status == "Miss" and found.rejected, (stored, asked, found.similarity)


# === a new user's round: general opposites (WordNet), sides taken, audiences, labels ===

# All were served as hits at the default threshold (cosine 0.85 to 0.97), each a wrong answer.
NEW_USER_NEAR_MISSES = [
    ("write an essay supporting the death penalty", "write an essay opposing the death penalty", "antonym:"),
    ("argue for nuclear power", "argue against nuclear power", "antonym:"),
    ("write a polite email declining a meeting", "write a rude email declining a meeting", "antonym:"),
    ("explain quantum computing to a beginner", "explain quantum computing to a physicist", "class:audience"),
    ("tell me a fun fact about space", "tell me a boring fact about space", "antonym:"),
    ("give me a vegetarian lasagna recipe", "give me a meat lasagna recipe", "antonym:"),
    ("write a formal letter to my landlord", "write a casual letter to my landlord", "antonym:"),
    ("write an optimistic forecast for the economy", "write a pessimistic forecast for the economy", "antonym:"),
    ("describe a beautiful sunset", "describe an ugly sunset", "antonym:"),
    ("list words that are similar to happy", "list words that are opposite to happy", "antonym:"),
    ("translate this to british english: color", "translate this to american english: colour", "class:"),
    ("what is a type a personality", "what is a type b personality", "letters:"),
    ("how do I get to platform a", "how do I get to platform c", "letters:"),
    ("lru entry d about zebras", "lru entry a about zebras", "letters:"),
    # other WordNet opposites than the user's, in other sentences
    ("is it safe to swim here at night", "is it dangerous to swim here at night", "antonym:"),
    ("write a generous review of the hotel", "write a stingy review of the hotel", "antonym:"),
    ("describe a noisy street at night", "describe a quiet street at night", "antonym:"),
    ("solve for x in this equation", "solve for y in this equation", "letters:"),
]


@pytest.mark.parametrize("a, b, prefix", NEW_USER_NEAR_MISSES)
def test_the_new_users_near_misses_are_refused(a: str, b: str, prefix: str) -> None:
    assert all(r.startswith(prefix) for r in _refused(a, b))


@pytest.mark.parametrize("a, b", [
    ("write a polite email declining a meeting", "write a courteous email declining a meeting"),  # one pole
    ("describe a beautiful sunset", "describe a lovely sunset"),
    ("tell me an interesting fact about space", "tell me a fun fact about space"),
    ("explain it to a programmer", "explain it to a developer"),
    ("explain it to developers", "explain it to a developer"),
    ("what is a type a personality", "what's a type a personality"),
    ("how do I write a for loop in python", "how to write a for loop in python"),
    ("the easiest way to learn python", "the simplest way to learn python"),  # no degree of WordNet's
])
def test_the_new_users_rules_keep_paraphrases(a: str, b: str) -> None:
    _kept(a, b)


@pytest.mark.parametrize("stored, asked", [("argue for nuclear power", "argue against nuclear power"),
                                           ("describe a beautiful sunset", "describe an ugly sunset"),
                                           ("what is a type a personality", "what is a type b personality")])
def test_the_new_users_hits_now_miss_through_the_cache(cache: Any, stored: str, asked: str) -> None:
    found = lookup_pair(cache, stored, asked)
    assert found.status == "Miss" and found.rejected, (stored, asked, found.similarity)



# === a breaker's second round: the first rules refused true paraphrases; what they now keep ===

@pytest.mark.parametrize("a, b", [
    # WordNet words in their common senses only (quick is fast, not hurried; kind is a noun)
    ("What's an easy way to reverse a string in Python?", "What's a quick way to reverse a string in Python?"),
    ("What kind of saw should I use for plywood?", "Which saw is best for cutting plywood?"),
    ("Sorry to bother you, how do I reset my password?", "Good afternoon, how do I reset my password?"),
    ("I'm trying to center a div in CSS", "Is there a simple way to center a div in CSS?"),
    # the text pointed at from either side
    ("Summarize the following text in two sentences:\n\nThe meeting covered Q3 revenue.",
     "The meeting covered Q3 revenue.\n\nSummarize the text above in two sentences."),
    # "for" and "against" that take no side
    ("Is there a vaccine for measles?", "Is there a vaccine against measles?"),
    ("Do I need home insurance against flooding?", "Do I need home insurance for flooding?"),
    # letters that are no labels
    ("can u explain recursion simply", "can you explain recursion simply"),
    ("How do I label the x axis in matplotlib?", "How do I label the x-axis in matplotlib?"),
    ("What does a p value of 0.05 mean?", "What does a p-value of 0.05 mean?"),
    ("How do I install pip for Python 3.x on Ubuntu?", "How do I install pip for Python 3 on Ubuntu?"),
    ("How do I run an A/B test on my landing page?", "How do I run a split test on my landing page?"),
    ("How do I read a text file line by line in C++?", "How do I read a text file line by line in cpp?"),
    # professions and near-synonyms in the classes
    ("I'm a software engineer, how do I ask for a raise?", "As a software developer, how should I ask for a raise?"),
    ("What should I cook for dinner tonight?", "What should I make for supper tonight?"),
    ("I want to start running at dawn, any tips?", "I want to start running early in the morning, any tips?"),
    # a "by" that names a means, not a sender
    ("How can I get notified by email when my CI build fails?",
     "How can I get a notification sent to my email when my CI build fails?"),
    ("My son is twelve. Am I allowed to leave him home alone?", "My son is twelve, can I legally leave him home alone?"),
])
def test_the_breakers_paraphrases_pass_again(a: str, b: str) -> None:
    _kept(a, b)


@pytest.mark.parametrize("a, b, prefix", [
    ("Write an essay arguing in favor of nuclear power", "Write an essay arguing against nuclear power", "antonym:"),
    ("Write a speech supporting the new housing policy", "Write a speech criticizing the new housing policy", "antonym:"),
    ("Write a tweet praising our new feature", "Write a tweet mocking our new feature", "antonym:"),
    ("What foods should people with blood type A avoid?", "What foods should people with blood type AB avoid?",
     "letters:"),
    ("What is a type I error in statistics?", "What is a type II error in statistics?", "letters:"),
    ("Summarize the causes of World War I", "Summarize the causes of World War II", "letters:"),
    ("How do I get along with my step dad?", "How do I get along with my dad?", "class:gender"),
    ("Gift ideas for my great grandson", "Gift ideas for my grandson", "class:gender"),
    ("Write a poem about my grandmother", "Write a poem about my great-grandmother", "class:gender"),
    ("What are the symptoms of hypothyroidism?", "What are the symptoms of hyperthyroidism?", "antonym:"),
    ("Set an alarm for a quarter past seven", "Set an alarm for a quarter to seven", "units:"),
    ("Write a product description for a men's watch", "Write a product description for a unisex watch",
     "class:gender"),
    ("Summarize the majority opinion in Roe v. Wade", "Summarize the dissenting opinion in Roe v. Wade", "antonym:"),
    ("What's the minimum wage in California?", "What's the average wage in California?", "antonym:"),
])
def test_the_breakers_second_near_misses_are_refused(a: str, b: str, prefix: str) -> None:
    assert all(r.startswith(prefix) for r in _refused(a, b))


# === an audit's round: the rules must fire where one word stands in the other's place ===

@pytest.mark.parametrize("a, b", [
    # WordNet opposites apart, not in each other's place
    ("Quick question: how do I lazy-load images in React?", "How do I lazy load images in React?"),
    ("Do I need any extra documents for a Schengen visa?", "What additional documents are necessary for a Schengen visa?"),
    ("Find remote software jobs in the Boston area", "Find work-from-home software jobs near Boston"),
    ("What's a great way to save a bit of money each month?", "What's a good way to save a little money each month?"),
    ("Is dizziness when standing up something serious?", "Should I worry if I get dizzy when I stand up?"),
    # "for" and "against" after words that take no side
    ("What is the best sleeping position against acid reflux?", "What is the best sleeping position for acid reflux?"),
    ("What's a good case against scratches for the Galaxy S24?", "What's a good scratch-proof case for the Galaxy S24?"),
    # a letter in one text only is a word said another way
    ("How do I solve 2x + 3 = 11?", "Solve for x: 2x + 3 = 11"),
    ("how do i factory reset my laptop n keep my files", "How do I factory reset my laptop and keep my files?"),
    ("y is my wifi so slow at night", "why is my wifi so slow at night"),
    ("What's the big O of quicksort?", "What is the time complexity of quicksort?"),
    ("How much paint do I need for a 10 x 12 room?", "How much paint do I need for a 10 by 12 room?"),
])
def test_the_audits_paraphrases_pass(a: str, b: str) -> None:
    _kept(a, b)


@pytest.mark.parametrize("a, b, prefix", [
    ("What does the -i flag do in grep?", "What does the -r flag do in grep?", "letters:"),
    ("Write a persuasive essay for school uniforms", "Write a persuasive essay against school uniforms", "antonym:"),
    ("Set an alarm for a quarter after six", "Set an alarm for a quarter to six", "units:"),
])
def test_the_audits_near_misses_are_refused(a: str, b: str, prefix: str) -> None:
    assert all(r.startswith(prefix) for r in _refused(a, b))
