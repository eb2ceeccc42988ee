"""The verifier: a lexical check on semantic cache candidates that cosine similarity cannot do.

all-MiniLM-L6-v2 puts "how do I enable 2FA" and "how do I disable 2FA" at ~0.9 cosine, and so
it does "convert USD to EUR" / "convert EUR to USD", "3 cows" / "2 cows", "red gate" / "yellow
gate". A candidate above the threshold is served only if its user text and the query agree on:

- negation (parity of negation markers) and exclusion ("all files except hidden ones" is not
  "all hidden files": except, excepting, excluding, other than),
- numbers and quantities (digits and number words; "a"/"one" count as 1),
- units (km vs miles, USD vs EUR, hours vs minutes, ...; the half of the day of a clock time:
  "7 am" is not "7 pm", nor "seven am" "seven pm"),
- direction ("A to B" vs "B to A", "from A to B"; one end turned round: "from my savings" vs
  "to my savings", "the email from my boss" vs "... to my boss"; a "by" after a participle is its
  agent: "emails sent by John" are sent from him, "received by Alice" goes to her), and arguments swapped round a relation word
  (to, from, into, than, before/after, over/under, instead of, ...), names of several words
  included: "flights from New York to London" / "... from London to New York", "is a bigger
  than b" / "is b bigger than a". Names are compared as written, not lemmatised ("Paris" is no
  plural). Symmetric relations may swap: "vs", "versus" and "and" ("Python vs Go" / "Go vs
  Python"), a distance ("the distance from London to Paris" / "... from Paris to London", unless
  a route or a journey is asked too), and a comparison said the other way round, the arguments
  swapped round "than" together with the scale's pole ("Python is faster than Java" / "Java is
  slower than Python", "more people than" / "fewer people than"),
- antonym pairs (enable/disable, increase/decrease, add/remove, on/off, even/odd, grant/revoke,
  under/over, into/out of, indoor/outdoor, rise/fall, senior/junior, synonym/antonym,
  difference/similarity, boil/freeze, find/delete, cause/consequence, static/dynamic,
  format/parse, walk/run, ... and un-/dis-/de- prefixes), counted: "switch on the VPN on my
  laptop" has one "on" more than "switch off the VPN on my laptop", which has the "off"; in any
  inflection (a doubled consonant: "stopping"/"stopped" are "stop"; irregular verbs: "won" is
  "win", "rose" "rise"); a compound of a pair written as two words ("sun rise" / "sun set"); a
  possessive counts as its word ("men's" is "men", so it is a gender too),
- opposite adjectives of WordNet 3.0's clusters, each word in the senses it mostly has in use
  (polite/rude, formal/informal, beautiful/ugly, optimistic/pessimistic, safe/dangerous, ...:
  aigov/data/opposites.json, built by scripts/build_opposites.py), sides taken ("argue for" /
  "argue against", "in favor of", support/oppose, praise/criticize), paired prefixes
  (hypo-/hyper-, pre-/post-), single letters and short labels ("type A" / "type B" / "type AB",
  "World War I" / "II", "solve for x" / "... for y"; not "u", "x-axis" = "x axis", "3.x", "A/B"),
- opposite poles of a scale (size, price, speed, quality, mood, ...: "largest"/"smallest",
  "cheapest"/"most expensive", "faster"/"slower"; comparatives and superlatives by rule, and
  "less"/"least" turn a pole round, so "least expensive" is "cheapest") and of contrast nouns
  (pros/cons, benefits/drawbacks); comparatives and superlatives of other scales ("the cheapest
  way" / "the fastest way"),
- closed word classes whose members exclude each other (colours, genders and family words
  (mom/dad, aunt/uncle, grandson/granddaughter, stepmom/stepdad; "mom" is "mother"), the part of
  the day (noon/tonight, dawn/dusk), meals (lunch/dinner), weekdays, diets, food
  groups, units of text length such as line/sentence/paragraph, human languages, administrative
  levels city/county/state/country, audiences child/beginner/expert, past/present/future,
  delayed/cancelled, the resource a cost is measured in: "time complexity"/"space complexity",
  and git's commands in a text about git: "git commit"/"git push", ...),
- what a list is ordered by ("in order from the sun" / "in order of size", "sort by name" /
  "sort by date"),
- the tense of a question that names no date: "who is the president" is not "who was the
  president", nor "who will be" (but "what does this print" is "what will this print"),
- relative time (today/tomorrow/yesterday/tonight; "next week", "last year", "this Friday"):
  a day or period shifted from the present must be in both texts, and so must "after"/"before"
  next to a time word ("the day after tomorrow", "the day before my exam"),
- identifiers (hex ids, UUIDs, order and ticket numbers, SKUs, letter+digit tokens): every one
  either text has must be in the other, whatever the separators ("gpt-4o" = "gpt4o") but with
  its case (base64, passwords, hashes: "Tr0ub4dor" is not "tr0ub4dor"),
- the case of mixed-case words ("SGVsbG", "iPhone"), of acronyms ("US" is not "us", "IT" not
  "it", unless the acronym's text is all capitals: shouting) and of tokens with base64 symbols
  ("QUJDRA==", "a+b/C="): the same word cased otherwise is refused,
- quoted literals ('Bob', "a  b", `x`): each must be in the other text exactly, case and spaces,
- indentation and line order: multi-line texts (code) whose shared lines are indented
  differently or come in another order,
- named entities (capitalised or mixed-case tokens, acronyms, version-like tokens).

The exact layer (aigov.cache.key.normalize_prompt) folds neither case nor inner whitespace, so
those variants reach these checks; MiniLM is uncased and gives them similarity ~1.0.

Each check is deliberately conservative in one direction: it may turn a true paraphrase into a
miss (costing recall: one more upstream call) but aims to never let a changed meaning through
(costing precision: a wrong answer). Tuned on STS-B train and the GPTCache pairs; the numbers are
in `aigov eval cache` output and the README.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property, lru_cache, wraps
from pathlib import Path
from typing import Any, Callable, Iterator

_TOKEN_RE = re.compile(r"[$€£¥%°]|\d+(?:[.,]\d+)*|[A-Za-z][A-Za-z0-9]*(?:['’][A-Za-z]+)?(?:[-_.][A-Za-z0-9]+)*")
_SENTENCE_OPENERS = frozenset(".!?:;\"'([")
_SENTENCE_BREAK_RE = re.compile(r"[.!?;]\s+\S|\n")

NEGATIONS = frozenset("""not no never none nothing nobody nowhere neither nor cannot without
unable n't cant dont doesnt didnt isnt arent wasnt werent wont wouldnt shouldnt couldnt hasnt
havent hadnt mustnt neednt aint""".split())
# Exclusion inverts a set as negation inverts a claim: "delete all files except hidden ones" is not
# "delete all hidden files". Compared apart from negation, so "don't ... except" vs "don't" counts.
EXCLUSIONS = frozenset("except excepting excluding".split())

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
    "ninety": 90, "hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9,
    "trillion": 10**12, "dozen": 12, "half": 0.5, "twice": 2, "thrice": 3,
}
ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6,
            "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10, "last": "last"}

UNITS = {
    "km": "km", "kilometer": "km", "kilometre": "km", "kms": "km",
    "mile": "mile", "mi": "mile", "m": "m", "meter": "m", "metre": "m", "cm": "cm",
    "centimeter": "cm", "mm": "mm", "millimeter": "mm", "inch": "inch", "in.": "inch",
    "foot": "foot", "feet": "foot", "ft": "foot", "yard": "yard", "yd": "yard",
    "kg": "kg", "kilogram": "kg", "kilo": "kg", "g": "g", "gram": "g", "mg": "mg",
    "lb": "lb", "lbs": "lb", "pound": "lb", "oz": "oz", "ounce": "oz", "ton": "ton", "tonne": "ton",
    "celsius": "celsius", "centigrade": "celsius", "fahrenheit": "fahrenheit", "kelvin": "kelvin",
    "°": "degree", "degree": "degree",
    "$": "usd", "usd": "usd", "dollar": "usd", "€": "eur", "eur": "eur", "euro": "eur",
    "£": "gbp", "gbp": "gbp", "sterling": "gbp", "¥": "jpy", "yen": "jpy", "jpy": "jpy",
    "inr": "inr", "rupee": "inr", "cad": "cad", "aud": "aud", "chf": "chf", "franc": "chf",
    "yuan": "cny", "cny": "cny", "rmb": "cny", "bitcoin": "btc", "btc": "btc",
    "%": "percent", "percent": "percent", "percentage": "percent",
    "ms": "ms", "millisecond": "ms", "second": "second", "sec": "second", "minute": "minute",
    "min": "minute", "hour": "hour", "hr": "hour", "day": "day", "week": "week",
    "month": "month", "year": "year", "decade": "decade", "century": "century",
    "byte": "byte", "kb": "kb", "kilobyte": "kb", "mb": "mb", "megabyte": "mb", "gb": "gb",
    "gigabyte": "gb", "tb": "tb", "terabyte": "tb", "bit": "bit", "mbps": "mbps", "gbps": "gbps",
    "liter": "liter", "litre": "liter", "l": "liter", "ml": "ml", "milliliter": "ml",
    "gallon": "gallon", "gal": "gallon", "cup": "cup", "tablespoon": "tbsp", "tbsp": "tbsp",
    "teaspoon": "tsp", "tsp": "tsp", "mph": "mph", "kph": "kph", "kmh": "kph", "knot": "knot",
    "watt": "watt", "w": "watt", "kw": "kw", "kwh": "kwh", "volt": "volt", "v": "volt",
    "amp": "amp", "hz": "hz", "ghz": "ghz", "mhz": "mhz", "calorie": "calorie", "kcal": "calorie",
    "acre": "acre", "hectare": "hectare",
    # the half of the day of a clock time: "7 am" is not "7 pm" (only right after a number, _units)
    "am": "am", "a.m": "am", "pm": "pm", "p.m": "pm",
}

# Pairs of opposite words (both directions are checked). Verb/adjective pairs users actually
# flip in support questions. Gradable adjectives are not here but in SCALES (their comparatives,
# superlatives and "less"/"least" need the scale's poles, not a word pair).
ANTONYM_PAIRS = [
    ("enable", "disable"), ("enabled", "disabled"), ("activate", "deactivate"), ("increase", "decrease"),
    ("add", "remove"), ("add", "delete"), ("allow", "deny"), ("allow", "block"), ("allow", "forbid"),
    ("accept", "reject"), ("accept", "decline"), ("approve", "reject"), ("open", "close"),
    ("start", "stop"), ("start", "end"), ("begin", "end"), ("buy", "sell"), ("import", "export"),
    ("upload", "download"), ("encrypt", "decrypt"), ("compress", "decompress"), ("include", "exclude"),
    ("maximum", "minimum"), ("max", "min"), ("maximize", "minimize"), ("before", "after"),
    ("above", "below"), ("inside", "outside"), ("input", "output"), ("push", "pull"),
    ("lock", "unlock"), ("login", "logout"), ("subscribe", "unsubscribe"), ("connect", "disconnect"),
    ("show", "hide"), ("expand", "collapse"), ("win", "lose"), ("true", "false"), ("yes", "no"),
    ("positive", "negative"), ("more", "less"),
    ("more", "fewer"), ("most", "least"), ("first", "last"),
    ("left", "right"), ("up", "down"), ("north", "south"), ("east", "west"),
    ("encode", "decode"), ("serialize", "deserialize"), ("ascending", "descending"), ("asc", "desc"),
    ("horizontal", "vertical"), ("internal", "external"), ("public", "private"),
    ("synchronous", "asynchronous"), ("sync", "async"), ("client", "server"), ("send", "receive"),
    ("read", "write"), ("create", "delete"), ("create", "destroy"), ("insert", "delete"),
    ("success", "failure"), ("succeed", "fail"), ("pass", "fail"), ("valid", "invalid"),
    ("legal", "illegal"), ("possible", "impossible"), ("front", "back"), ("top", "bottom"),
    ("forward", "backward"), ("plus", "minus"), ("income", "expense"), ("credit", "debit"),
    ("deposit", "withdraw"), ("borrow", "lend"), ("asleep", "awake"),
    ("day", "night"), ("morning", "evening"), ("summer", "winter"),
    ("inner", "outer"),
    ("upper", "lower"), ("uppercase", "lowercase"), ("min", "max"), ("join", "leave"),
    ("arrive", "depart"), ("arrival", "departure"), ("entry", "exit"), ("enter", "exit"),
    ("attach", "detach"), ("install", "uninstall"), ("mount", "unmount"), ("freeze", "unfreeze"),
    ("on", "off"), ("in", "out"), ("online", "offline"), ("sunrise", "sunset"),
    ("love", "hate"), ("like", "dislike"), ("agree", "disagree"),
    ("gain", "lose"), ("profit", "loss"), ("raise", "lower"), ("upgrade", "downgrade"),
    ("inbound", "outbound"), ("incoming", "outgoing"), ("sender", "recipient"), ("buyer", "seller"),
    ("parent", "child"), ("debug", "release"),
    ("sitting", "standing"), ("sit", "stand"), ("coming", "going"), ("come", "go"),
    ("catch", "throw"), ("give", "take"), ("win", "loss"), ("winner", "loser"),
    # parity ("is zero even" / "is zero odd")
    ("even", "odd"),
    # adverbs of the pairs above: the word forms (_variants) strip no "-ly"
    ("horizontally", "vertically"), ("internally", "externally"), ("publicly", "privately"),
    ("positively", "negatively"), ("synchronously", "asynchronously"), ("legally", "illegally"),
    # decisions on a request and on access
    ("approve", "deny"), ("approve", "decline"), ("grant", "revoke"), ("grant", "deny"),
    ("permit", "deny"), ("permit", "forbid"), ("permit", "prohibit"), ("allow", "prohibit"),
    ("enable", "off"), ("disable", "on"),  # "enable dark mode" / "turn dark mode off"
    ("locally", "remotely"),
    # un- before a stem too short for the prefix rule (its stems have 4 letters or more, so
    # "unit" is not "it" undone)
    ("zip", "unzip"), ("pin", "unpin"), ("ban", "unban"), ("tie", "untie"),
    # sides of a bound or a position ("prime numbers under 100" / "over 100")
    ("under", "over"), ("below", "over"), ("above", "under"), ("beneath", "above"),
    ("underneath", "above"), ("indoor", "outdoor"), ("indoors", "outdoors"), ("into", "out"),

    ("onto", "off"), ("upstairs", "downstairs"), ("uphill", "downhill"),
    ("upstream", "downstream"), ("overestimate", "underestimate"), ("overrated", "underrated"),
    ("overpaid", "underpaid"),
    # movement of a quantity or a history ("the rise of the Roman empire" / "the fall of ...")
    ("rise", "fall"), ("rise", "decline"), ("ascend", "descend"), ("ascent", "descent"),
    ("boom", "bust"), ("surplus", "deficit"), ("inflation", "deflation"), ("bullish", "bearish"),
    ("birth", "death"), ("born", "died"), ("alive", "dead"), ("ancient", "modern"),
    ("entrance", "exit"), ("cause", "effect"),
    # ranks and the two sides of a role
    ("senior", "junior"), ("employer", "employee"), ("landlord", "tenant"), ("teacher", "student"),
    ("lender", "borrower"), ("host", "guest"), ("predator", "prey"), ("primary", "secondary"),
    ("offense", "defense"), ("offence", "defence"), ("attack", "defend"),
    ("offensive", "defensive"),
    # grammar and arithmetic terms that name opposites
    ("synonym", "antonym"), ("singular", "plural"), ("prefix", "suffix"), ("vowel", "consonant"),
    ("numerator", "denominator"),
    # likeness ("the differences between TCP and UDP" / "the similarities ...")
    ("difference", "similarity"), ("different", "similar"), ("different", "same"),
    ("differ", "resemble"), ("distinguish", "resemble"),
    # changes of state ("the boiling point of water" / "the freezing point ...")
    ("boil", "freeze"), ("boil", "melt"), ("evaporate", "condense"), ("sink", "float"),
    # a cause and what follows from it
    ("cause", "consequence"), ("cause", "aftermath"), ("cause", "impact"), ("reason", "consequence"),
    # finding data is not deleting it ("find duplicate rows" / "delete duplicate rows")
    ("find", "delete"), ("find", "remove"), ("select", "delete"),
    # opposite transformations of data and of a program's binding
    ("static", "dynamic"), ("statically", "dynamically"), ("format", "parse"), ("parse", "stringify"),
    ("undo", "redo"), ("do", "undo"),
    # ways of going somewhere ("how long to walk a mile" / "... to run a mile")
    ("walk", "run"), ("walk", "drive"), ("walk", "cycle"), ("drive", "fly"), ("drive", "cycle"),
    ("walk", "fly"),
    # other verbs that undo each other
    ("grow", "shrink"), ("spend", "earn"),
    ("sleep", "wake"), ("open", "shut"),
    # sides taken in a text ("a speech supporting the policy" / "... criticizing"; "argue for" /
    # "argue against" is _stance_clash's), and tones WordNet files under other opposites (fun is
    # no adjective there, "casual" not its "informal")
    ("support", "oppose"), ("support", "criticize"), ("support", "criticise"), ("praise", "criticize"),
    ("praise", "criticise"), ("praise", "mock"), ("praise", "complain"), ("fun", "boring"),
    ("formal", "casual"), ("similar", "opposite"), ("same", "opposite"),
    ("majority", "minority"), ("majority", "dissenting"), ("book", "cancel"),
    # statistics that are not each other ("the minimum wage" / "the average wage")
    ("minimum", "average"), ("maximum", "average"), ("average", "median"), ("mean", "median"),
    # what a dish is made of ("a vegetarian lasagna" / "a meat lasagna")
    ("vegetarian", "meat"), ("vegan", "meat"), ("vegetarian", "meaty"),
]

# Scales of gradable adjectives: scale -> (words at its high pole, words at its low pole). Words
# of one pole are near-synonyms ("big"/"large", "cheap"/"affordable") and may stand for each
# other; a word of one pole against one of the other ("largest"/"smallest") is a changed meaning.
# A word may sit on several scales ("light": weight and brightness; "short": length and height).
# Comparatives and superlatives are found by rule (_stems), and a preceding "less"/"least"
# turns the pole round ("least expensive" = "cheapest"), "more"/"most" keeps it.
SCALES = {
    "size": ("big large huge enormous giant massive vast", "small little tiny"),
    "length": ("long lengthy", "short brief"),
    "height": ("tall", "short"),
    "level": ("high", "low"),
    "width": ("wide broad", "narrow"),
    "thickness": ("thick", "thin"),
    "depth": ("deep", "shallow"),
    "body": ("fat obese overweight", "thin skinny slim underweight"),
    "weight": ("heavy", "light"),
    "brightness": ("bright light", "dark dim"),
    "price": ("expensive costly pricey", "cheap inexpensive affordable"),
    "speed": ("fast quick rapid speedy", "slow sluggish"),
    "quality": ("good excellent", "bad poor terrible awful horrible"),
    "mood": ("happy glad cheerful joyful joyous", "sad unhappy miserable gloomy"),
    "temperature": ("hot warm", "cold cool chilly"),
    "difficulty": ("hard difficult complex complicated", "easy simple straightforward"),
    "texture": ("hard", "soft"),
    "strength": ("strong powerful", "weak"),
    "wealth": ("rich wealthy", "poor"),
    "safety": ("safe", "dangerous unsafe risky hazardous"),
    "moisture": ("wet", "dry"),
    "fullness": ("full", "empty"),
    "timing": ("early", "late"),
    "age": ("old", "young"),
    "novelty": ("old", "new"),
    "distance": ("far distant", "near close"),
    "loudness": ("loud noisy", "quiet silent"),
    "cleanliness": ("clean", "dirty"),
    "importance": ("major", "minor"),
}
# Comparatives and superlatives the suffix rule cannot find. ("further" is left out: it mostly
# means "more", as in "further details".)
IRREGULAR_DEGREES = {"better": "good", "best": "good", "worse": "bad", "worst": "bad",
                     "elder": "old", "eldest": "old", "farther": "far", "farthest": "far",
                     "furthest": "far"}
# Nouns that name the two sides of an assessment; not gradable ("more benefits" stays a benefit).
CONTRAST_NOUNS = {
    "merit": ("pro advantage benefit upside merit strength",
              "con disadvantage drawback downside shortcoming weakness risk"),
}
# "less expensive" is the low pole of price, "most expensive" the high one.
_DEGREE_MODIFIERS = {"more": 1, "most": 1, "less": -1, "least": -1}

# Closed classes whose members exclude each other: "red bus" is not a "white bus".
EXCLUSIVE_CLASSES = {
    "colour": """red orange yellow green blue purple violet pink brown black white grey gray
        silver gold golden beige tan maroon navy teal turquoise cyan magenta""".split(),
    "gender": """man men woman women boy boys girl girls male female husband wife father mother
        son daughter brother sister king queen gentleman lady ladies he she his her him mom mum
        mommy mummy mama dad daddy papa grandmother grandma granny grandfather grandpa aunt uncle
        niece nephew girlfriend boyfriend unisex grandson grandsons granddaughter granddaughters
        great-grandson great-granddaughter great-grandmother great-grandfather great-grandma
        great-grandpa stepmother
        stepmom stepmum stepfather stepdad stepson stepsons stepdaughter stepdaughters stepbrother
        stepsister""".split(),
    # The part of the day: "a table at noon" is not "a table tonight"; "this evening" is "tonight".
    "time_of_day": "morning afternoon noon midday evening night tonight midnight dawn dusk".split(),
    # "a table for four for lunch" is not "... for dinner".
    "meal": "breakfast breakfasts brunch lunch lunches luncheon dinner dinners supper suppers".split(),
    "weekday": "monday tuesday wednesday thursday friday saturday sunday weekday weekend".split(),
    "month": """january february march april may june july august september october november
        december""".split(),
    "season": "spring summer autumn fall winter".split(),
    "os": "windows linux macos mac osx ios android ubuntu debian centos fedora".split(),
    "language": """python java javascript typescript ruby php perl rust golang kotlin swift scala
        haskell c++ c# csharp sql bash powershell lua""".split(),
    "cloud": "aws azure gcp".split(),
    "browser": "chrome firefox safari edge opera".split(),
    "animal": """dog dogs cat cats horse horses cow cows sheep lamb bird birds duck ducks bull
        bulls goat goats pig pigs bear bears lion lions tiger tigers elephant elephants""".split(),
    # A dose, a fare or a rule for a child is not the one for an adult; synonyms are one member
    # (_CANONICAL) so "kid" still matches "child".
    "age": """newborn newborns baby babies infant infants toddler toddlers preschooler preschoolers
        child children kid kids teen teens teenager teenagers adolescent adolescents adult adults
        grownup grownups elderly senior seniors pensioner pensioners""".split(),
    # Days relative to now ("weather today" vs "weather tonight"); see also _relative_time.
    "relative_day": "today tonight tomorrow yesterday".split(),
    # Alternatives, not kinds of each other in a question: a vegetarian recipe may have cheese, a
    # vegan one may not; a tomato is a fruit or a vegetable, and the answer says which.
    "diet": "vegan vegans vegetarian vegetarians pescatarian pescatarians keto paleo".split(),
    "food_group": """fruit fruits vegetable vegetables veggie veggies grain grains legume legumes
        nut nuts meat meats""".split(),
    # Units of a text's length: "in one sentence" is not "in one paragraph", nor "in one line".
    "text_unit": """word words line lines sentence sentences paragraph paragraphs page pages chapter
        chapters""".split(),
    # Administrative levels: "the population of New York city" is not "... of New York state".
    # ("state" after "united" is no level: _class_words skips "the United States".)
    "admin_level": """village villages town towns city cities borough boroughs district districts
        county counties municipality municipalities province provinces state states country
        countries nation nations continent continents""".split(),
    # Who a text is written for: "explain evolution to a child" is not "... to an expert". The
    # age words are members too (a word may be in several classes), so "kid" still is "child".
    "audience": """beginner beginners novice novices newbie newbies layman laymen layperson
        laypeople amateur amateurs intermediate advanced expert experts professional professionals
        specialist specialists child children kid kids toddler toddlers teen teens teenager
        teenagers adult adults physicist physicists scientist scientists engineer engineers
        developer developers programmer programmers""".split(),
    # Which variety of a language: "British English" spells "colour", "American English" "color".
    "language_variety": "british american canadian australian".split(),
    # Grammatical and historical time: "the past tense of run" is not "the future tense".
    "tense": "past present future".split(),
    # What happened to a trip or an appointment: a delayed flight is not a cancelled one.
    "disruption": """delay delays delayed cancel cancels cancelled canceled cancellation
        cancellations postpone postponed postponement reschedule rescheduled divert diverted
        overbooked""".split(),
    # Human languages (and the nationality words that name them): "translate hello to spanish"
    # is not "... to french". Lower-case, so the entity check does not see them; programming
    # languages are the class "language". ("polish" is left out: it is also a verb.)
    "human_language": """english spanish french german italian portuguese russian chinese mandarin
        cantonese japanese korean arabic hindi urdu bengali punjabi dutch swedish norwegian danish
        finnish czech greek turkish hebrew persian farsi vietnamese thai indonesian malay tagalog
        swahili latin ukrainian romanian hungarian slovak slovenian croatian serbian bosnian
        bulgarian macedonian albanian lithuanian latvian estonian icelandic irish welsh catalan
        basque galician maltese belarusian armenian georgian azerbaijani kazakh uzbek mongolian
        nepali tamil telugu marathi gujarati kannada malayalam sinhala burmese khmer lao amharic
        somali afrikaans zulu xhosa yoruba igbo hausa""".split(),
}

_SIMPLE_STOP = frozenset("""a an the of to in on at for from by with and or is are was were be been
being it its this that these those i you we they me my your our their what which who whom how why
when where do does did can could should would will shall may might must have has had as into onto
about over than then so if any some there here""".split())


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""          # the first failing check, e.g. "negation", "numbers:2!=3"


# Word-level helpers are memoised: the vocabulary of prompts is small next to the number of
# times each word is looked at, and a new query's analysis is on the request path. Only short
# words and texts go into the caches, so a client sending huge tokens cannot grow them.
_MAX_CACHED_WORD = 40
_MAX_CACHED_TEXT = 4000


def _memo_short(limit: int, maxsize: int) -> Any:
    """lru_cache for calls whose string argument is at most `limit` long; longer ones are computed."""
    def wrap(fn: Any) -> Any:
        cached = lru_cache(maxsize=maxsize)(fn)

        @wraps(fn)
        def call(arg: str) -> Any:
            return cached(arg) if len(arg) <= limit else fn(arg)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        call.cache_info = cached.cache_info    # type: ignore[attr-defined]
        return call
    return wrap


# Past tenses and participles of common irregular verbs -> the verb: "won" is "win", "lost"
# "lose", "rose" "rise", so an antonym pair of the verbs sees them (_variants). Forms that are
# mostly other words are left out ("saw", "lay", "set", "found"; "given": "if not given" is
# "if not specified", no giving).
IRREGULAR_VERBS = {
    "won": "win", "lost": "lose", "began": "begin", "begun": "begin", "rose": "rise",
    "risen": "rise", "fell": "fall", "fallen": "fall", "bought": "buy", "sold": "sell",
    "gave": "give", "took": "take", "taken": "take", "came": "come",
    "went": "go", "gone": "go", "sat": "sit", "stood": "stand", "caught": "catch",
    "threw": "throw", "thrown": "throw", "sent": "send", "wrote": "write", "written": "write",
    "hid": "hide", "hidden": "hide", "shown": "show", "froze": "freeze", "frozen": "freeze",
    "lent": "lend", "left": "leave", "ran": "run", "drove": "drive", "driven": "drive",
    "flew": "fly", "flown": "fly", "rode": "ride", "ridden": "ride", "swam": "swim",
    "swum": "swim", "forgot": "forget", "forgotten": "forget", "grew": "grow", "grown": "grow",
    "shrank": "shrink", "shrunk": "shrink", "spent": "spend", "sank": "sink", "sunk": "sink",
    "slept": "sleep", "woke": "wake", "woken": "wake", "lit": "light",
    "withdrew": "withdraw", "withdrawn": "withdraw", "undid": "undo", "undone": "undo",
    "redid": "redo", "redone": "redo", "held": "hold", "led": "lead", "kept": "keep",
    "knew": "know", "known": "know", "got": "get", "gotten": "get", "made": "make",
    "broke": "break", "broken": "break", "chose": "choose", "chosen": "choose",
    "fought": "fight", "taught": "teach", "brought": "bring", "built": "build",
    "thought": "think", "told": "tell", "said": "say", "paid": "pay", "meant": "mean",
    "felt": "feel", "heard": "hear", "spoke": "speak", "spoken": "speak", "stole": "steal",
    "stolen": "steal", "wore": "wear", "worn": "wear", "tore": "tear", "torn": "tear",
    "drew": "draw", "drawn": "draw", "blew": "blow", "blown": "blow", "ate": "eat",
    "eaten": "eat", "drank": "drink", "drunk": "drink", "sang": "sing", "sung": "sing",
    "shook": "shake", "shaken": "shake", "understood": "understand", "forgave": "forgive",
    "forgiven": "forgive", "overtook": "overtake", "overtaken": "overtake",
}
# Doubled final consonants that stay when a suffix goes ("falling" is "fall", "missed" "miss",
# "buzzing" "buzz", "stuffed" "stuff"); any other is undoubled ("stopping" -> "stop").
_KEPT_DOUBLES = frozenset("lsfz")


def _undouble(stem: str) -> str:
    """A verb stem without the consonant doubled before "-ing"/"-ed": "stopp" -> "stop",
    "winn" -> "win", "committ" -> "commit"; "add", "fall", "miss" stay."""
    if len(stem) >= 4 and stem[-1] == stem[-2] and stem[-1] not in "aeiou" \
            and stem[-1] not in _KEPT_DOUBLES and stem[-1].isalpha():
        return stem[:-1]
    return stem


@_memo_short(_MAX_CACHED_WORD, 16384)
def _lemma(word: str) -> str:
    """A crude lemma for matching word lists: plural and common verb suffixes stripped, the
    consonant doubled before "-ing"/"-ed" undoubled ("stopping", "stopped" -> "stop")."""
    w = word.lower().replace("’", "'")
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ied", "y"), ("ed", ""), ("es", ""), ("s", "")):
        if len(w) > len(suffix) + 2 and w.endswith(suffix):
            stem = w[: -len(suffix)] + repl
            return _undouble(stem) if suffix in ("ing", "ed") else stem
    return w


def _form(word: str, keep: frozenset[str]) -> str:
    """The form compared across two texts: a word either text writes as a name as it is ("Paris"
    is no plural of "pari"), any other word lemmatised."""
    return word if word in keep else _lemma(word)


def _strip_s(word: str) -> str:
    """A lower-cased token without its "'s" (a possessive or "is"/"has"): "men's" -> "men",
    "what's" -> "what"; other tokens as they are."""
    if len(word) > 3 and word.endswith(("'s", "’s")):
        return word[:-2]
    return word


@_memo_short(_MAX_CACHED_WORD, 16384)
def _variants(word: str) -> frozenset[str]:
    """The word and its plausible base forms (so 'enabled'/'enabling' match 'enable'); a
    possessive's too ("winner's" has the forms of "winner")."""
    w = word.lower()
    bare = _strip_s(w)
    if bare != w:
        return frozenset({w}) | _variants(bare)
    out = {w, _lemma(w)}
    for suffix in ("ing", "ed", "es", "s", "d"):
        if w.endswith(suffix) and len(w) > len(suffix) + 2:
            base = w[: -len(suffix)]
            out.update({base, base + "e"})
            if suffix in ("ing", "ed"):
                out.add(_undouble(base))                 # "stopping", "winning" -> "stop", "win"
    irregular = IRREGULAR_VERBS.get(w)
    if irregular:
        out.add(irregular)                               # "won" -> "win", "rose" -> "rise"
    if "-" in w:
        joined = w.replace("-", "")
        if joined.isalpha():                             # "log-in" is "login", "sun-set" "sunset"
            out.update(v for v in _variants(joined) if v in _ANTONYMS)
    return frozenset(out)


@_memo_short(_MAX_CACHED_WORD, 16384)
def _unit_candidates(word: str) -> tuple[str, ...]:
    """The spellings of a token looked up in UNITS, in lookup order."""
    return tuple([word, word.rstrip(".")] + sorted(_variants(word)))


_ANTONYMS: dict[str, set[str]] = {}
for _a, _b in ANTONYM_PAIRS:
    _ANTONYMS.setdefault(_a, set()).add(_b)
    _ANTONYMS.setdefault(_b, set()).add(_a)
# Words of the pairs that are compounds of two words ("sunrise", "upload", "outdoor"): looked for
# across two tokens too. A first part is a short word ("sun", "up", "out", "over", "down").
_MAX_COMPOUND_PART = 5
_COMPOUNDS = frozenset(w for w in _ANTONYMS if len(w) >= 5)
_COMPOUND_HEADS = frozenset(w[:k] for w in _COMPOUNDS for k in range(2, _MAX_COMPOUND_PART + 1)
                            if len(w) - k >= 2)
# word -> the classes it is a member of (a word may be in several: "child" is an age and an audience)
_CLASS_OF: dict[str, tuple[str, ...]] = {}
for _cls, _members in EXCLUSIVE_CLASSES.items():
    for _w in _members:
        _CLASS_OF[_w] = _CLASS_OF.get(_w, ()) + (_cls,)
_OPPOSITE_PREFIXES = ("un", "dis", "de", "non", "in", "im", "il", "ir", "anti")

_GRADABLE_POLES: dict[str, frozenset[tuple[str, int]]] = {}
_NOUN_POLES: dict[str, frozenset[tuple[str, int]]] = {}
for _table, _into in ((SCALES, _GRADABLE_POLES), (CONTRAST_NOUNS, _NOUN_POLES)):
    for _scale, (_high, _low) in _table.items():
        for _sign, _words in ((1, _high), (-1, _low)):
            for _w in _words.split():
                _into[_w] = _into.get(_w, frozenset()) | {(_scale, _sign)}

# Words WordNet lists as adjectives that are function words in a prompt ("no", "any", "in").
_NOT_WORDNET_POLES = _SIMPLE_STOP | frozenset("""no all both each every either neither none few many
    much more most less least own other same such only out off up down under first last next
    whole""".split())


def _wordnet_poles() -> dict[str, frozenset[tuple[str, int]]]:
    """WordNet's opposite adjective clusters (aigov/data/opposites.json, scripts/build_opposites.py):
    "polite", "courteous" on one pole of a scale, "impolite", "rude" on the other. Unlike SCALES
    they are matched as written (no degrees: WordNet puts near-synonyms such as "easy" and
    "simple" in clusters of their own, so their comparatives must not count as other scales)."""
    path = Path(__file__).resolve().parent.parent / "data" / "opposites.json"
    poles: dict[str, frozenset[tuple[str, int]]] = {}
    for high, low in json.loads(path.read_text(encoding="utf-8"))["scales"]:
        scale = f"wordnet:{high[0]}/{low[0]}"
        for sign, words in ((1, high), (-1, low)):
            for word in words:
                if word not in _NOT_WORDNET_POLES:
                    poles[word] = poles.get(word, frozenset()) | {(scale, sign)}
    return poles


_WORDNET_POLES = _wordnet_poles()


def _stems(word: str, suffixes: tuple[str, ...]) -> list[str]:
    """Plausible bases of `word` without one of `suffixes`: "larger" -> "large", "biggest" ->
    "big", "happier" -> "happy", "drying" -> "dry". Only bases that are scale words are used."""
    out: list[str] = []
    for suffix in suffixes:
        if word.endswith(suffix) and len(word) - len(suffix) >= 2:
            stem = word[: -len(suffix)]
            out += [stem, stem + "e"]
            if stem.endswith("i"):
                out += [stem[:-1] + "y", stem[:-1] + "ey"]    # happier, dried, priciest
            if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] not in "aeiou":
                out.append(stem[:-1])                         # bigger, hottest, thinning
    return out


# An adjective's degrees and its verb's forms ("cooling", "dried") name its pole; plural "-s"
# does not ("news" is not "new", "fares" not "far", "shorts" not "short"). Nouns take plurals.
_ADJECTIVE_SUFFIXES = ("est", "er", "ing", "ed")
_NOUN_SUFFIXES = ("es", "s")


@_memo_short(_MAX_CACHED_WORD, 16384)
def _poles(word: str) -> tuple[frozenset[tuple[str, int]], bool]:
    """(the (scale, sign) poles a word names, whether it is a gradable adjective)."""
    if word in _GRADABLE_POLES:
        return _GRADABLE_POLES[word], True
    if word in _NOUN_POLES:
        return _NOUN_POLES[word], False
    base = IRREGULAR_DEGREES.get(word)
    if base is not None:
        return _GRADABLE_POLES[base], True
    for cand in _stems(word, _ADJECTIVE_SUFFIXES):
        if cand in _GRADABLE_POLES:
            return _GRADABLE_POLES[cand], True
    for cand in _stems(word, _NOUN_SUFFIXES):
        if cand in _NOUN_POLES:
            return _NOUN_POLES[cand], False
    return frozenset(), False


@dataclass(frozen=True)
class _Poles:
    found: dict[tuple[str, int], str]     # (scale, sign) -> the first word that names it
    modifiers: frozenset[str]             # "more"/"less"/... used only as a scale word's degree
    degrees: dict[str, str]               # scale group -> the first comparative/superlative on it
    graded: dict[str, int]                # another word after "more"/"less"/"fewer": its sign
    # (WordNet scale, sign) -> the content words before and after the word that names it
    neighbours: dict[tuple[str, int], tuple[str | None, str | None]] = field(default_factory=dict)


# Scales one comparison may be said on: "the latest" is the "newest" version, "the earliest"
# the "oldest" record. "high"/"low" grade anything ("the highest price" is "the most expensive",
# "the lowest amount" "the smallest", "the highest mountain" "the tallest"): no degree of theirs
# is compared (None).
_SCALE_GROUP: dict[str, str | None] = {"timing": "time", "age": "time", "novelty": "time",
                                       "level": None}
# Degree modifiers of a word that is on no scale ("more popular", "fewer people"), by sign.
_GENERIC_DEGREES = {"more": 1, "most": 1, "less": -1, "least": -1, "fewer": -1, "fewest": -1}


@_memo_short(_MAX_CACHED_WORD, 16384)
def _is_degree(word: str) -> bool:
    """A comparative or superlative of a scale word: "cheaper", "biggest", "best" (not
    "cooling" or "dried", verb forms of one)."""
    return word in IRREGULAR_DEGREES or (word not in _GRADABLE_POLES and any(
        c in _GRADABLE_POLES for c in _stems(word, ("est", "er"))))


def _content_word(low: list[str], i: int, step: int) -> str | None:
    """The nearest content word before (step -1) or after (step 1) position i."""
    j = i + step
    while 0 <= j < len(low):
        w = low[j]
        if w.isalpha() and w not in _SIMPLE_STOP and w not in _DEGREE_MODIFIERS:
            return w
        j += step
    return None


def _scale_poles(t: _Text) -> _Poles:
    found: dict[tuple[str, int], str] = {}
    neighbours: dict[tuple[str, int], tuple[str | None, str | None]] = {}
    degrees: dict[str, str] = {}
    graded: dict[str, int] = {}
    low = t.lower
    used: set[int] = set()
    for i, w in enumerate(low):
        poles, gradable = _poles(w)
        opposites = _WORDNET_POLES.get(w, frozenset())
        if not poles and not opposites:
            if i > 0 and low[i - 1] in _GENERIC_DEGREES and w.isalpha() and w not in _SIMPLE_STOP:
                graded.setdefault(_lemma(w), _GENERIC_DEGREES[low[i - 1]])
            continue
        sign, word = 1, w
        degree = gradable and _is_degree(w)
        if (gradable or opposites) and i > 0 and low[i - 1] in _DEGREE_MODIFIERS:  # "less polite"
            sign = _DEGREE_MODIFIERS[low[i - 1]]
            used.add(i - 1)
            word = f"{low[i - 1]} {w}"
            degree = gradable
        for scale, pole in poles:
            found.setdefault((scale, pole * sign), word)
            group = _SCALE_GROUP.get(scale, scale)
            if degree and group is not None:
                degrees.setdefault(group, word)
        for scale, pole in opposites:  # opposite poles only, never a degree (_wordnet_poles)
            if (scale, pole * sign) not in found:
                found[(scale, pole * sign)] = word
                neighbours[(scale, pole * sign)] = (_content_word(low, i, -1), _content_word(low, i, 1))
    # A modifier is left out of the antonym pairs only if every occurrence qualifies a scale word.
    free = {w for i, w in enumerate(low) if w in _DEGREE_MODIFIERS and i not in used}
    return _Poles(found, frozenset(low[i] for i in used) - free, degrees, graded, neighbours)


@dataclass
class _Text:
    """One text's tokens and, computed once per text (the candidates' prompts recur across
    requests and `_analyse` is cached), every per-text feature the checks compare."""
    raw: str
    tokens: list[str]          # as written
    lower: list[str]
    lemmas: set[str]
    words: set[str]            # lower + variants

    @property
    def content(self) -> list[str]:
        return [t for t in self.lower if t not in _SIMPLE_STOP and t not in NEGATIONS and t.isalpha()]

    @cached_property
    def negated(self) -> bool:
        return _negated(self)

    @cached_property
    def excluded(self) -> bool:
        return _excluded(self)

    @cached_property
    def shouting(self) -> bool:
        """Letters, none of them small: the writer's capitals say nothing about acronyms."""
        return not any(c.islower() for c in self.raw) and any(c.isupper() for c in self.raw)

    @cached_property
    def symbol_tokens(self) -> frozenset[str]:
        return _symbol_tokens(self.raw)

    @cached_property
    def literals(self) -> frozenset[str]:
        return _literals(self.raw)

    @cached_property
    def numbered_lines(self) -> tuple[tuple[str, int], ...] | None:
        return _numbered_lines(self.raw)

    @cached_property
    def numbers(self) -> tuple[tuple, frozenset]:
        return _numbers(self)

    @cached_property
    def units(self) -> frozenset:
        return _units(self)

    @cached_property
    def directions(self) -> set[tuple[str, str]]:
        return _direction_pairs(self)

    @cached_property
    def entities(self) -> set[str]:
        return _entities(self)

    @cached_property
    def classes(self) -> dict[str, set[str]]:
        return _by_class(self)

    @cached_property
    def labels(self) -> Counter:
        return _labels(self)

    @cached_property
    def stances(self) -> frozenset[str]:
        return _stances(self)

    @cached_property
    def prefixed(self) -> frozenset[str]:
        """Its words that start with one of the paired prefixes (_prefix_pair_clash)."""
        return frozenset(w for w in self.lower if w.startswith(_PREFIX_STARTS))

    @cached_property
    def identifiers(self) -> frozenset[str]:
        return _identifiers(self.raw)

    @cached_property
    def atom_stream(self) -> tuple[str, frozenset[int]]:
        return _atom_stream(self.raw)

    @cached_property
    def shifted_times(self) -> frozenset[str]:
        return _shifted_times(self)

    @cached_property
    def atoms(self) -> frozenset[str]:
        return frozenset(_ATOM_RE.findall(self.raw))

    @cached_property
    def line_indents(self) -> dict[str, tuple[str, ...]] | None:
        return _line_indents(self.raw)

    @cached_property
    def proper(self) -> frozenset[str]:
        """The words the text writes as names (capitalised inside a sentence, acronyms, mixed
        case), lower-cased and without "'s": "Paris", "Athens", "AWS" are not plurals."""
        return frozenset(_strip_s(e) for e in self.entities)

    @cached_property
    def content_words(self) -> list[str] | None:
        """The content words (see `content`) without "'s"; None for long texts (see _role_swap)."""
        words = [_strip_s(w) for w in self.content]
        return None if len(words) > 30 else words

    def _forms_kept(self, keep: frozenset[str]) -> bool:
        """Whether `keep` changes any of this text's forms: a kept name of it that _lemma would
        change (most pairs: none, and the lemmatised forms computed once per text serve)."""
        return any(w in self.words and _lemma(w) != w for w in keep)

    @staticmethod
    def _unique_positions(forms: list[str]) -> dict[str, int]:
        counts = Counter(forms)
        return {w: i for i, w in enumerate(forms) if counts[w] == 1}

    @cached_property
    def _lemma_positions(self) -> dict[str, int] | None:
        words = self.content_words
        return None if words is None else self._unique_positions([_lemma(w) for w in words])

    def unique_content_positions(self, keep: frozenset[str]) -> dict[str, int] | None:
        """Position of each content word's form (_form) that occurs once; None for long texts."""
        words = self.content_words
        if words is None or not self._forms_kept(keep):
            return self._lemma_positions
        return self._unique_positions([_form(w, keep) for w in words])

    @cached_property
    def relation_sequence(self) -> list[tuple[bool, str]] | None:
        return _relation_sequence(self)

    @cached_property
    def _relation_lemmas(self) -> list[tuple[bool, str]] | None:
        seq = self.relation_sequence
        return None if seq is None else [(rel, w if rel else _lemma(w)) for rel, w in seq]

    def relation_forms(self, keep: frozenset[str]) -> list[tuple[bool, str]] | None:
        """relation_sequence with each argument's _form."""
        seq = self.relation_sequence
        if seq is None or not self._forms_kept(keep):
            return self._relation_lemmas
        return [(rel, w if rel else _form(w, keep)) for rel, w in seq]

    @cached_property
    def one_sentence(self) -> bool:
        """No sentence break inside (an end mark before more text, or a line break)."""
        return _SENTENCE_BREAK_RE.search(self.raw.strip()) is None

    @cached_property
    def question_tense(self) -> str | None:
        return _question_tense(self)

    @cached_property
    def word_counts(self) -> dict[str, int]:
        """How many tokens have each word form (`words` with multiplicity), and the compounds of
        the antonym pairs written as two words: "sun rise" / "sun set" count as "sunrise" /
        "sunset", "up load" as "upload" (the second word in any of its forms: "sun rose")."""
        out: dict[str, int] = {}
        low = self.lower
        for t in low:
            for v in _variants(t):
                out[v] = out.get(v, 0) + 1
        for w1, w2 in zip(low, low[1:]):
            if w1 not in _COMPOUND_HEADS or not w2.isalpha():
                continue
            joined = {w1 + v for v in _variants(w2)}
            for v in joined & _COMPOUNDS:
                out[v] = out.get(v, 0) + 1
        return out

    @cached_property
    def prefix_stems(self) -> dict[str, list[str]]:
        """word -> what is left after each opposite prefix it starts with (in prefix order)."""
        out: dict[str, list[str]] = {}
        for w in self.words:
            stems = [w[len(p):] for p in _OPPOSITE_PREFIXES if w.startswith(p) and len(w) - len(p) >= 4]
            if stems:
                out[w] = stems
        return out

    @cached_property
    def poles(self) -> _Poles:
        return _scale_poles(self)

    @cached_property
    def squashed(self) -> str:
        """Lower-cased with spaces and hyphens removed (entity matching across spellings)."""
        return self.raw.lower().replace(" ", "").replace("-", "")


@_memo_short(_MAX_CACHED_TEXT, 4096)
def _analyse(text: str) -> _Text:
    tokens = _TOKEN_RE.findall(text)
    lower = [t.lower().replace("’", "'") for t in tokens]
    words: set[str] = set()
    for t in lower:
        words |= _variants(t)
    return _Text(text, tokens, lower, {_lemma(t) for t in lower}, words)


def _negated(t: _Text) -> bool:
    """Whether the text carries a negation ("No, it doesn't" and "it does not" both count once)."""
    return any(w in NEGATIONS or w.endswith("n't") or w.startswith(("non-", "no-")) for w in t.lower)


def _excluded(t: _Text) -> bool:
    """Whether the text excludes something ("except", "excluding", "other than")."""
    low = t.lower
    return any(w in EXCLUSIONS for w in low) or any(
        w == "other" and nxt == "than" for w, nxt in zip(low, low[1:]))


_PLAIN_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def _number_value(tok: str) -> float | str:
    # Only plain numerals are values: "0e542b" (an id) must not read as 0e542 = 0.0.
    if not _PLAIN_NUMBER.fullmatch(tok):
        return tok
    try:
        if tok.count(",") == 1 and len(tok.split(",")[1]) != 3:
            return float(tok.replace(",", "."))  # decimal comma
        return float(tok.replace(",", ""))
    except ValueError:
        return tok


def _numbers(t: _Text) -> tuple[tuple, frozenset]:
    """(exact numbers in order of appearance, ordinals). 1 ("a", "one", "1") is left out: "a cat"
    and "one cat" agree. Kept in order and with repeats: "12 divided by 4" and "4 divided by 12",
    "2 rooms for 2 nights" and "2 rooms for 1 night" are different questions."""
    exact: list = []
    ordinals: set = set()
    for w in t.lower:
        if w[0].isdigit():
            exact.append(_number_value(w))
        elif w in NUMBER_WORDS:
            exact.append(float(NUMBER_WORDS[w]))
        elif w in ORDINALS:
            ordinals.add(ORDINALS[w])
    return tuple(n for n in exact if n != 1.0), frozenset(ordinals)


# Unit words that are also ordinary words ("a cloudy day", "a yard", "ML tasks") count only next
# to a number; the others count wherever they appear ("hours in a week" vs "minutes in a week").
_AMBIGUOUS_UNITS = frozenset("""m g l w v mi min sec second day week month year decade century yard
    yd foot feet ft inch pound cup degree bit byte ml mb gb kb tb hr ms""".split())


_MERIDIEMS = frozenset(("am", "a.m", "pm", "p.m"))
# Hours written as words before am/pm ("seven am"); not "one" ("which one am I").
_CLOCK_HOUR_WORDS = frozenset("two three four five six seven eight nine ten eleven twelve".split())
_CLOCK_PARTS = frozenset("quarter half five ten twenty twenty-five".split())


def _units(t: _Text) -> frozenset:
    found = set()
    low = t.lower
    for i, w in enumerate(low):
        if w in _MERIDIEMS:  # "I am 7" is no clock time: only a number right before counts
            written = t.tokens[i]
            if i > 0 and (low[i - 1][0].isdigit() or (
                    low[i - 1] in _CLOCK_HOUR_WORDS and written in (w, w.upper()))):  # "twelve. Am I"
                found.add(UNITS[w])
            continue
        if w in ("past", "after", "to", "before") and 0 < i < len(low) - 1 and low[i - 1] in _CLOCK_PARTS and (
                low[i + 1][0].isdigit() or low[i + 1] in _CLOCK_HOUR_WORDS or low[i + 1] == "one"):
            # "a quarter past seven" is not "a quarter to seven" ("after" is "past")
            found.add("clock past" if w in ("past", "after") else "clock to")
            continue
        for cand in _unit_candidates(w):
            if cand in UNITS:
                if cand in _AMBIGUOUS_UNITS or w in _AMBIGUOUS_UNITS:
                    near = low[max(0, i - 2):i] + low[i + 1:i + 2]
                    if not any(x[0].isdigit() or x in NUMBER_WORDS for x in near):
                        break
                found.add(UNITS[cand])
                break
    return frozenset(found)


_DIRECTION_REACH = 8  # words looked at on each side of a "to" for its source and target


def _direction_pairs(t: _Text) -> set[tuple[str, str]]:
    """Ordered (source, target) pairs from 'X to Y', 'from X to Y', 'X into Y', 'X -> Y', as
    written (lower-cased, without "'s"); verify compares their _form."""
    pairs: set[tuple[str, str]] = set()
    low = t.lower
    arrows = {i for i, tok in enumerate(re.findall(r"->|→|=>|\S+", t.raw)) if tok in ("->", "→", "=>")}
    for i, w in enumerate(low):
        if w in ("to", "into", "2") and 0 < i < len(low) - 1:
            # A few words each way: a long run of stop words is no direction, and scanning it
            # from every "to" made a crafted prompt quadratic (minutes for 240 KB).
            left = next((low[j] for j in range(i - 1, max(-1, i - 1 - _DIRECTION_REACH), -1)
                         if low[j] not in _SIMPLE_STOP), None)
            right = next((low[j] for j in range(i + 1, min(len(low), i + 1 + _DIRECTION_REACH))
                          if low[j] not in _SIMPLE_STOP), None)
            if left and right and left != right:
                pairs.add((_strip_s(left), _strip_s(right)))
    if arrows:
        parts = re.split(r"->|→|=>", t.raw)
        for a, b in zip(parts, parts[1:]):
            la = _TOKEN_RE.findall(a.lower())
            lb = _TOKEN_RE.findall(b.lower())
            if la and lb:
                pairs.add((_strip_s(la[-1]), _strip_s(lb[0])))
    return pairs


def _at_sentence_start(raw: str, start: int) -> bool:
    """Whether the token at `start` opens a sentence (after an end mark, a quote or a newline).

    Looks back over whitespace only, so scanning every token stays linear in the text length
    (a regex over the whole prefix made long prompts quadratic).
    """
    i = start
    while i > 0 and raw[i - 1].isspace():
        if raw[i - 1] == "\n":
            return True
        i -= 1
    return i == 0 or raw[i - 1] in _SENTENCE_OPENERS


def _entities(t: _Text) -> set[str]:
    """Names: capitalised words not at a sentence start, ALL-CAPS acronyms, mixed case, versions."""
    ents: set[str] = set()
    for m in _TOKEN_RE.finditer(t.raw):
        tok = m.group(0)
        if not tok[0].isalpha():
            continue
        at_start = _at_sentence_start(t.raw, m.start())
        low = tok.lower()
        if tok.isupper() and len(tok) >= 2 and low not in ("ok", "i"):
            ents.add(low)
        elif any(c.isdigit() for c in tok):
            ents.add(low)
        elif tok[0].isupper() and not at_start and low not in _SIMPLE_STOP:
            ents.add(low)
        elif any(c.isupper() for c in tok[1:]):
            ents.add(low)
    return ents


# Identifiers: "question 58efaade" and "question 58d9bab8" embed almost alike and no other check
# tells them apart (the tokenizer splits "58efaade" into the number 58 and the lowercase word
# "efaade", and one-sided names are tolerated). A chunk is alphanumeric pieces joined by "-" or "_"
# ("A-1234", "x86_64", "gpt-4o", a UUID), or by "." or "/" between digits ("v2.10.0",
# "2021-03-04", "03/04/2021"). It is an identifier when a piece mixes letters and digits
# ("58efaade", "2FA", "gpt4o", "10am"), a piece is a long hex string ("deadbeef"), a letter piece
# and a digit piece are joined ("INC-4421", "COVID-19", "3-D"), or three or more digit groups are
# ("2021-03-04", "555-123-4567"). Number + unit ("5km", "2.5GB"), ordinals ("5th") and decades
# ("1990s") are quantities, compared by the number and unit checks, not identifiers; so are
# hyphenated quantities of words ("3-year-old", "64-bit", "2-factor").
_ID_CHUNK_RE = re.compile(r"[^\W_]+(?:(?:[-_]+|(?<=[0-9])[./](?=[0-9]))[^\W_]+)*")
_ATOM_RE = re.compile(r"[^\W_]+")
_HEX_RE = re.compile(r"[0-9a-f]{8,}")
_QUANTITY_RE = re.compile(r"[0-9]+([a-z]+)")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ID_ORDINAL_SUFFIXES = frozenset(("st", "nd", "rd", "th", "s"))
_ID_HINT_RE = re.compile(r"[0-9]|[a-fA-F]{8}")   # what every identifier has: a digit or 8 hex letters
_DIGIT_RE = re.compile(r"[0-9]")


def _has_digit(w: str) -> bool:
    return _DIGIT_RE.search(w) is not None


def _join_atoms(atoms: list[str]) -> str:
    """Atoms concatenated, with "." kept only between two digits: "gpt-4o", "GPT 4o" and "gpt4o"
    all give "gpt4o", while "v2.10.0" stays apart from "v2.1.00" and "2021-03-04" from "20210304"."""
    out = atoms[0]
    for prev, atom in zip(atoms, atoms[1:]):
        out += ("." if "0" <= prev[-1] <= "9" and "0" <= atom[0] <= "9" else "") + atom
    return out


@_memo_short(_MAX_CACHED_WORD, 16384)
def _is_quantity(piece: str) -> bool:
    """A number followed by a unit, an ordinal suffix or a decade "s" ("5km", "5th", "1990s")."""
    m = _QUANTITY_RE.fullmatch(piece)
    if not m:
        return False
    suffix = m.group(1)
    return suffix in _ID_ORDINAL_SUFFIXES or any(c in UNITS for c in _unit_candidates(suffix))


def _chunk_is_identifier(chunk: str, pieces: list[str]) -> bool:
    """`chunk` as written, `pieces` its alphanumeric runs lower-cased."""
    if _UUID_RE.fullmatch(chunk.lower()):
        return True
    kinds = []
    for p in pieces:
        digit, alpha = _has_digit(p), any(c.isalpha() for c in p)
        if digit and alpha and not _is_quantity(p):
            return True
        if alpha and len(p) >= 8 and _HEX_RE.fullmatch(p):
            return True
        kinds.append("d" if digit and not alpha else "a" if alpha and not digit else "q")
    if kinds.count("d") >= 3:
        return True
    originals = _ATOM_RE.findall(chunk)
    for i, (k, nxt) in enumerate(zip(kinds, kinds[1:])):
        if k == "a" and nxt == "d":                    # "INC-4421", "COVID-19"
            return True
        if k == "d" and nxt == "a":                    # "1234-A", "3-D", "10-K" but not "3-year"
            letters = originals[i + 1]
            if len(letters) == 1 or letters.isupper():
                return True
    return False


def _identifiers(raw: str) -> frozenset[str]:
    """The text's identifiers, in their case and joined as `_join_atoms` does."""
    out: set[str] = set()
    if _ID_HINT_RE.search(raw) is None:
        return frozenset()                               # the common case: plain words only
    for m in _ID_CHUNK_RE.finditer(raw):
        chunk = m.group(0)
        if _ID_HINT_RE.search(chunk) is None:
            continue
        pieces = _ATOM_RE.findall(chunk.lower())
        if _chunk_is_identifier(chunk, pieces):
            out.add(_join_atoms(_ATOM_RE.findall(chunk)))   # as written: case is part of an id
    return frozenset(out)


def _atom_stream(raw: str) -> tuple[str, frozenset[int]]:
    """Every alphanumeric run of the text joined as `_join_atoms` does, and the offsets in that
    string where a run starts or ends: an identifier written "10am" is found in "at 10 am"."""
    atoms = _ATOM_RE.findall(raw)
    if not atoms:
        return "", frozenset((0,))
    bounds = {0}
    pos = 0
    for prev, atom in zip([""] + atoms, atoms):
        if prev and "0" <= prev[-1] <= "9" and "0" <= atom[0] <= "9":
            pos += 1
            bounds.add(pos)
        pos += len(atom)
        bounds.add(pos)
    return _join_atoms(atoms), frozenset(bounds)


# An identifier that is not one of the other text's is looked for in its atom stream (a scan of
# the whole text); a verdict makes at most this many scans, and an identifier left unsearched
# counts as absent (a miss, never a wrong hit), so two long texts full of ids stay cheap.
_MAX_ID_SCANS = 32


def _identifier_known(ident: str, other: _Text, budget: list[int]) -> bool:
    """`ident` is one of the other text's identifiers, or is spelled there across separators or
    spaces ("10am" / "10 am", "GPT-4o" / "gpt 4o"): a run of its words, whole, joined."""
    if ident in other.identifiers:
        return True
    if budget[0] <= 0:
        return False
    budget[0] -= 1
    stream, bounds = other.atom_stream
    start = stream.find(ident)
    while start != -1:
        if start in bounds and start + len(ident) in bounds:
            return True
        start = stream.find(ident, start + 1)
    return False


def _identifier_clash(a: _Text, b: _Text) -> str | None:
    """An identifier of either text that the other does not have: another order, ticket, hash...

    The reason names up to three missing identifiers of each side."""
    if not a.identifiers and not b.identifiers:
        return None
    budget = [_MAX_ID_SCANS]
    missing: list[list[str]] = []
    for x, y in ((a, b), (b, a)):
        gone: list[str] = []
        for ident in sorted(x.identifiers):
            if not _identifier_known(ident, y, budget):
                gone.append(ident)
                if len(gone) == 3:
                    break
        missing.append(gone)
    if missing[0] or missing[1]:
        return f"{missing[0]}!={missing[1]}"
    return None


def _mixed_case(atom: str) -> bool:
    """A capital after the first character and a small letter: "iPhone", "SGVsbG", "5Mb", not
    "Paris" or "NASA" (sentence case and shouting carry no meaning; these spellings may)."""
    return any(c.isupper() for c in atom[1:]) and any(c.islower() for c in atom)


# All-capital words whose lower case is the same word (times of day, "OK").
_CASELESS_ACRONYMS = frozenset(("ok", "am", "pm"))


def _acronym(atom: str) -> bool:
    """Two or more letters, all capitals: "US", "IT", "HUNTER" (an acronym, a name, a secret)."""
    return len(atom) >= 2 and atom.isalpha() and atom.isupper() and atom.lower() not in _CASELESS_ACRONYMS


def _case_clash(a: _Text, b: _Text) -> str | None:
    """A mixed-case word ("SGVsbG"/"sgvsbg") or an acronym ("US"/"us") of one text written in
    another case in the other. MiniLM is uncased, so nothing else tells "IT" from "it". A text
    all in capitals is shouting: its words are then not acronyms (but keep their mixed case).
    Identifiers (letters with digits, hex) are compared with their case by _identifier_clash."""
    for x, y in ((a, b), (b, a)):
        other = None
        for atom in x.atoms:
            if atom in y.atoms or not (_mixed_case(atom) or (not x.shouting and _acronym(atom))):
                continue
            if other is None:
                other = {w.lower(): w for w in y.atoms}
            if atom.lower() in other:
                return f"{atom}!={other[atom.lower()]}"
    return None


# A run of base64's alphabet with a letter and one of its symbols ("QUJDRA==", "a+b/C", "x=Foo"):
# encoded data, a path or code, where case is meaning even in a shouted text.
# (Runs are found whole and then filtered: a pattern requiring the letter would backtrack
# quadratically over a long run of digits.)
_SYMBOL_RUN_RE = re.compile(r"[A-Za-z0-9+/=]+")


def _symbol_tokens(raw: str) -> frozenset[str]:
    if not any(c in raw for c in "+/="):
        return frozenset()
    return frozenset(m for m in _SYMBOL_RUN_RE.findall(raw)
                     if any(c in "+/=" for c in m) and any(c.isalpha() for c in m))


def _symbol_case_clash(a: _Text, b: _Text) -> str | None:
    """A token with base64 symbols cased otherwise in the other text, beyond its first letter
    (sentence case: "Yes/no" and "yes/no" are one token)."""
    if not a.symbol_tokens or not b.symbol_tokens:
        return None
    for x, y in ((a, b), (b, a)):
        other = {w.lower(): w for w in y.symbol_tokens}
        for tok in x.symbol_tokens - y.symbol_tokens:
            o = other.get(tok.lower())
            if o is not None and o[1:] != tok[1:]:
                return f"{tok}!={o}"
    return None


# A quoted literal: the quote opens after a non-word character and closes before one, so
# apostrophes ("what's", "the kids' toys") open nothing. One line at most; fences (```) open none.
_LITERAL_RE = re.compile(r"""(?<![\w'"`])(?:'([^'\n]+)'|"([^"\n]+)"|`([^`\n]+)`|“([^”\n]+)”|‘([^’\n]+)’)(?!\w)""")


def _literals(raw: str) -> frozenset[str]:
    if not any(q in raw for q in "'\"`“‘"):
        return frozenset()
    return frozenset(next(g for g in m.groups() if g is not None) for m in _LITERAL_RE.finditer(raw))


def _literal_known(lit: str, other: _Text, budget: list[int]) -> bool:
    """`lit` is one of the other text's literals, or is written there exactly as a whole word
    run ("Translate 'hello'" / "Translate hello"): same case, same spaces."""
    if lit in other.literals:
        return True
    if budget[0] <= 0:
        return False
    budget[0] -= 1
    raw = other.raw
    start = raw.find(lit)
    while start != -1:
        end = start + len(lit)
        if not (lit[0].isalnum() and start > 0 and raw[start - 1].isalnum()) and \
                not (lit[-1].isalnum() and end < len(raw) and raw[end].isalnum()):
            return True
        start = raw.find(lit, start + 1)
    return False


# A lone letter: not inside a word, a number ("3.x", "3x3"), an escape ("\\n"), a pair ("A/B"),
# an abbreviation ("e.g.") or a language name ("C++", "C#"); "x-axis" and "p-value" have theirs.
_LONE_LETTER_RE = re.compile(r"(?<![A-Za-z0-9.'’\\/])([A-Za-z])(?![A-Za-z0-9'’/+#]|\.[A-Za-z])")
# "a", "I" (the article, the pronoun), "u" and "r" (chat for "you", "are") are no labels by
# themselves, but after a dash they are a flag ("grep -i" / "grep -r").
_NOT_LABELS = frozenset("aiur")
# Words a short label follows: "type A"/"type AB", "World War I"/"II", "Plan B", "platform a".
_LABEL_WORDS = frozenset("""type war phase part plan chapter class grade level stage tier option
    section schedule category vitamin platform gate terminal entry row seat zone block building
    room track door exit wing hall""".split())


def _labels(t: _Text) -> Counter:
    raw = t.raw
    out = Counter(m.group(1).lower() for m in _LONE_LETTER_RE.finditer(raw)
                  if m.group(1).lower() not in _NOT_LABELS or raw[max(m.start() - 1, 0):m.start()] == "-")
    low = t.lower
    for i, w in enumerate(low[:-1]):
        nxt = t.tokens[i + 1]
        if w in _LABEL_WORDS and len(nxt) <= 3 and nxt.isalpha() and (nxt.isupper() or len(nxt) == 1):
            out[f"{w} {nxt.lower()}"] += 1   # "type A" vs "type AB", "war I" vs "war II"
    return out


def _letter_clash(a: _Text, b: _Text) -> str | None:
    """Single letters and short labels, each text with one the other lacks: "type A personality"
    is not "type B" nor "type AB", "platform a" not "platform c", "solve for x" not "solve for y",
    "World War I" not "II", "grep -i" not "grep -r". A letter in one text only is often a word
    said another way ("y" for "why", "n" for "and", "10 x 12" for "10 by 12"): no clash."""
    la, lb = a.labels, b.labels
    if la - lb and lb - la:
        return f"{','.join(sorted(la.elements())) or '-'}/{','.join(sorted(lb.elements())) or '-'}"
    return None


def _literal_clash(a: _Text, b: _Text) -> str | None:
    """A quoted literal of either text that the other does not have exactly: a string in code,
    a name in SQL, a phrase to translate is data, and its case and spacing are part of it.
    Scans are budgeted as identifiers' are (an unsearched literal counts as absent: a miss)."""
    if not a.literals and not b.literals:
        return None
    budget = [_MAX_ID_SCANS]
    for x, y in ((a, b), (b, a)):
        for lit in sorted(x.literals):
            if not _literal_known(lit, y, budget):
                return f"{lit[:40]!r}"
    return None


def _line_indents(raw: str) -> dict[str, tuple[str, ...]] | None:
    """Each non-blank line's text (stripped) -> the indentation it has, for texts of two or more
    non-blank lines; None for one-line texts (a lone line's indentation is not code's)."""
    lines = [ln for ln in raw.replace("\r\n", "\n").replace("\r", "\n").split("\n") if ln.strip()]
    if len(lines) < 2:
        return None
    out: dict[str, list[str]] = {}
    for ln in lines:
        body = ln.lstrip()
        out.setdefault(body.rstrip(), []).append(ln[: len(ln) - len(body)])
    return {k: tuple(v) for k, v in out.items()}


def _numbered_lines(raw: str) -> tuple[tuple[str, int], ...] | None:
    """Each non-blank line stripped, with how many times it occurred before, for texts of two or
    more non-blank lines (as _line_indents)."""
    lines = [ln.strip() for ln in raw.replace("\r\n", "\n").replace("\r", "\n").split("\n") if ln.strip()]
    if len(lines) < 2:
        return None
    seen: dict[str, int] = {}
    out = []
    for ln in lines:
        out.append((ln, seen.get(ln, 0)))
        seen[ln] = seen.get(ln, 0) + 1
    return tuple(out)


def _line_order_clash(a: _Text, b: _Text) -> str | None:
    """Lines both multi-line texts have, in another order: "x = 1; x = 2" and "x = 2; x = 1" are
    other programs, with the same words and numbers."""
    la, lb = a.numbered_lines, b.numbered_lines
    if la is None or lb is None:
        return None
    shared = set(la) & set(lb)
    if len(shared) < 2:
        return None
    for x, y in zip((ln for ln in la if ln in shared), (ln for ln in lb if ln in shared)):
        if x != y:
            return f"order:{x[0][:40]!r}"
    return None


def _indent_clash(a: _Text, b: _Text) -> str | None:
    """A line both multi-line texts have, indented otherwise: in code (Python, YAML, Makefiles)
    indentation is syntax, and a re-indented block is another program."""
    ia, ib = a.line_indents, b.line_indents
    if ia is None or ib is None:
        return None
    for line in ia.keys() & ib.keys():
        if ia[line] != ib[line]:
            return f"indent:{line[:40]!r}"
    return None


# Relative time. A question without a time reference is about the present, so "today", "tonight"
# and "this week" may match it, while a day or period shifted from now ("tomorrow", "next week",
# "the last 3 days") must be in both texts. Modifiers of a period, by what they shift it to:
_TIME_MODIFIERS = {"this": "", "current": "", "next": "next", "coming": "next", "upcoming": "next",
                   "following": "next", "last": "last", "previous": "last", "past": "last",
                   "prior": "last"}
_TIME_PERIODS = frozenset("""day week weekend fortnight month year quarter semester season decade
    century hour minute morning afternoon evening night""".split()
    + EXCLUSIVE_CLASSES["weekday"] + EXCLUSIVE_CLASSES["month"] + EXCLUSIVE_CLASSES["season"])
_SHIFTED_DAYS = frozenset(("tomorrow", "yesterday"))
# What may stand between a modifier and its period: "the next 3 days", "the past few weeks".
_TIME_FILLERS = frozenset("few couple of several".split()) | frozenset(NUMBER_WORDS)
# "after"/"before" next to one of these shifts the time: "the day after tomorrow" is not
# "tomorrow", "the weekend after next" not "this weekend", "the day before my exam" not its day.
_TIME_WORDS = _TIME_PERIODS | frozenset(EXCLUSIVE_CLASSES["relative_day"]) | frozenset(
    ("noon", "midnight", "next", "last"))


def _is_time_word(w: str) -> bool:
    return w in _TIME_WORDS or _lemma(w) in _TIME_WORDS


def _shifted_times(t: _Text) -> frozenset[str]:
    """The text's days and periods shifted from the present: "tomorrow", "next:week", "last:year"."""
    out: set[str] = set()
    low = t.lower
    for i, w in enumerate(low):
        if w in _SHIFTED_DAYS:
            out.add(w)
        if w in ("after", "before"):
            if i > 0 and _is_time_word(low[i - 1]):
                out.add(f"{_lemma(low[i - 1])}:{w}")         # "the day after", "a week before"
            elif i + 1 < len(low) and _is_time_word(low[i + 1]):
                out.add(f"{w}:{_lemma(low[i + 1])}")         # "before tomorrow", "after noon"
        shift = _TIME_MODIFIERS.get(w)
        if not shift:
            continue
        j = i + 1
        while j < len(low) and j - i <= 3 and (low[j] in _TIME_FILLERS or low[j][0].isdigit()):
            j += 1
        if j < len(low) and (low[j] in _TIME_PERIODS or _lemma(low[j]) in _TIME_PERIODS):
            out.add(f"{shift}:{_lemma(low[j]) if low[j] not in _TIME_PERIODS else low[j]}")
    return frozenset(out)


def _time_clash(a: _Text, b: _Text) -> str | None:
    sa, sb = a.shifted_times, b.shifted_times
    if sa != sb:
        return f"{sorted(sa - sb)}!={sorted(sb - sa)}"
    return None


def _more_often(x: _Text, mx: frozenset[str], y: _Text, my: frozenset[str]) -> set[str]:
    """The word forms x has more often than y, a scale's degree modifiers counting as absent.

    Counted, not compared as sets: a word may recur in another role ("switch on the VPN on my
    laptop" / "switch off the VPN on my laptop": the particle "on" became "off", the preposition
    "on" stayed), and the word that changed is the one whose count changed."""
    cy = y.word_counts
    return {w for w, n in x.word_counts.items()
            if w not in mx and n > (0 if w in my else cy.get(w, 0))}


def _opposite_scales(a: _Text, b: _Text) -> list[tuple[str, str, str]]:
    """(scale, a's word, b's word) for each scale whose poles the texts name one each. WordNet's
    opposites count only where one stands in the other's place, next to the same content word
    ("a polite email" / "a rude email"): its clusters are broad, and two of their words apart in
    a paraphrase ("Quick question: how do I lazy-load ..." / "How do I lazy load ...") are no
    changed meaning."""
    pa, pb = a.poles, b.poles
    out = []
    for (scale, sign), word in pa.found.items():
        if (scale, sign) in pb.found or (scale, -sign) not in pb.found or (scale, -sign) in pa.found:
            continue
        if scale.startswith("wordnet:"):
            (before_a, after_a), (before_b, after_b) = pa.neighbours[(scale, sign)], pb.neighbours[(scale, -sign)]
            if not ((before_a and before_a == before_b) or (after_a and after_a == after_b)):
                continue
        out.append((scale, word, pb.found[(scale, -sign)]))
    return out


# Words after which "for" and "against" take a side: "argue for nuclear power" is not "argue
# against" it. Elsewhere they name no side ("a vaccine for / against measles").
_STANCE_WORDS = frozenset("""argue argues arguing argued argument arguments vote votes voting voted
    campaign campaigns campaigning speak speaks speaking lobby lobbies lobbying rally rallying
    petition petitions stance debate debating essay essays speech speeches""".split())


def _stances(t: _Text) -> frozenset[str]:
    low, out = t.lower, set()
    for i, w in enumerate(low):
        if w in ("for", "against") and i > 0 and low[i - 1] in _STANCE_WORDS:
            out.add("pro" if w == "for" else "con")
        elif w in ("favor", "favour") and i > 0 and low[i - 1] == "in" and i + 1 < len(low) and low[i + 1] == "of":
            out.add("pro")
    return frozenset(out)


def _stance_clash(a: _Text, b: _Text) -> str | None:
    """One text argues for something, the other against it ("an essay arguing in favor of
    nuclear power" / "... arguing against nuclear power")."""
    sa, sb = a.stances, b.stances
    if sa != sb and sa and sb and not (sa & sb):
        return f"{'/'.join(sorted(sa))}!={'/'.join(sorted(sb))}"
    return None


# Prefixes that name opposite ends: "hypothyroidism" / "hyperthyroidism", "pre-war" / "post-war".
_PAIRED_PREFIXES = (("hyper", "hypo"), ("pre", "post"), ("inter", "intra"), ("micro", "macro"),
                    ("over", "under"), ("super", "sub"))
_OPPOSITE_PREFIX = {**dict(_PAIRED_PREFIXES), **{y: x for x, y in _PAIRED_PREFIXES}}
_PREFIX_STARTS = tuple(_OPPOSITE_PREFIX)


def _prefix_pair_clash(a: _Text, b: _Text) -> str | None:
    if not a.prefixed or not b.prefixed:  # most texts have no such word: nothing to compare
        return None
    wa, wb = a.prefixed - b.prefixed, b.prefixed - a.prefixed
    for w in sorted(wa):
        for p, q in _OPPOSITE_PREFIX.items():
            if w.startswith(p):
                core = w[len(p):].lstrip("-")
                if len(core) >= 4 and (q + core in wb or f"{q}-{core}" in wb):
                    return f"{w}/{q}{core}"
    return None


def _antonym_clash(a: _Text, b: _Text, ctx: _Pair) -> str | None:
    pa, pb = a.poles, b.poles
    only_a = _more_often(a, pa.modifiers, b, pb.modifiers) - ctx.converse_words
    only_b = _more_often(b, pb.modifiers, a, pa.modifiers) - ctx.converse_words
    for w in only_a:
        for opp in _ANTONYMS.get(w, ()):
            if opp in only_b:
                return f"{w}/{opp}"
    # Opposite poles of one scale, each named by one text only ("largest"/"smallest"), unless
    # the comparison's arguments swapped with them (_converse).
    for scale, word, other in _opposite_scales(a, b):
        if scale not in ctx.converse_scales:
            return f"{word}/{other}"
    # un-/dis-/de- prefixes: "install" vs "uninstall", "able" vs "disable" style flips. Scale
    # words are left to the scales ("inexpensive" is "least expensive", not its opposite).
    for t, x, y in ((a, only_a, only_b), (b, only_b, only_a)):
        stems = t.prefix_stems
        for w in x:
            if w in _GRADABLE_POLES or w in _NOUN_POLES:
                continue
            for stem in stems.get(w, ()):
                if stem in y:
                    return f"{stem}/{w}"
    return None


_CANONICAL = {"kid": "child", "kids": "child", "children": "child", "babies": "baby", "infant": "baby",
              "infants": "baby", "newborns": "newborn", "toddlers": "toddler", "teens": "teen",
              "teenager": "teen", "teenagers": "teen", "adolescent": "teen", "adolescents": "teen",
              "adults": "adult", "grownup": "adult", "grownups": "adult", "senior": "elderly",
              "seniors": "elderly", "pensioner": "elderly", "pensioners": "elderly",
              "preschoolers": "preschooler",
              "grey": "gray", "golden": "gold", "lady": "woman", "ladies": "woman", "women": "woman",
              "men": "man", "gentleman": "man", "female": "woman", "male": "man", "boys": "boy",
              "girls": "girl", "mac": "macos", "osx": "macos", "c#": "csharp", "golang": "go",
              "vegans": "vegan", "vegetarians": "vegetarian", "pescatarians": "pescatarian",
              "fruits": "fruit", "vegetables": "vegetable", "veggie": "vegetable",
              "veggies": "vegetable", "grains": "grain", "legumes": "legume", "nuts": "nut",
              "meats": "meat", "words": "word", "sentences": "sentence", "paragraphs": "paragraph",
              "pages": "page", "chapters": "chapter", "mandarin": "chinese", "farsi": "persian",
              "lines": "line",
              "villages": "village", "towns": "town", "cities": "city", "boroughs": "borough",
              "districts": "district", "counties": "county", "municipalities": "municipality",
              "provinces": "province", "states": "state", "countries": "country", "nation": "country",
              "nations": "country", "continents": "continent",
              "beginners": "beginner", "novice": "beginner", "novices": "beginner",
              "newbie": "beginner", "newbies": "beginner", "laymen": "layman", "layperson": "layman",
              "laypeople": "layman", "amateurs": "amateur", "experts": "expert",
              "professional": "expert", "professionals": "expert", "specialist": "expert",
              "specialists": "expert", "advanced": "expert",
              "delays": "delay", "delayed": "delay", "postpone": "delay", "postponed": "delay",
              "postponement": "delay", "reschedule": "delay", "rescheduled": "delay",
              "cancels": "cancel", "cancelled": "cancel", "canceled": "cancel",
              "cancellation": "cancel", "cancellations": "cancel", "diverted": "divert",
              "mom": "mother", "mum": "mother", "mommy": "mother", "mummy": "mother", "mama": "mother",
              "dad": "father", "daddy": "father", "papa": "father", "grandma": "grandmother",
              "granny": "grandmother", "grandpa": "grandfather", "great-grandma": "great-grandmother",
              "great-grandpa": "great-grandfather", "midday": "noon", "evening": "night",
              "tonight": "night", "stepmom": "stepmother", "stepmum": "stepmother", "stepdad": "stepfather",
              "grandsons": "grandson", "granddaughters": "granddaughter", "stepsons": "stepson",
              "stepdaughters": "stepdaughter", "breakfasts": "breakfast", "lunches": "lunch",
              "luncheon": "lunch", "dinners": "dinner",
              # a profession is an expert audience: "explain it to a physicist" is not "... to
              # a beginner", and an engineer is a developer
              "physicist": "expert", "physicists": "expert", "scientist": "expert",
              "scientists": "expert", "engineer": "expert", "engineers": "expert", "developer": "expert",
              "developers": "expert", "programmer": "expert", "programmers": "expert",
              "supper": "dinner", "suppers": "dinner", "dawn": "morning", "dusk": "night"}


def _class_words(low: list[str]) -> list[str]:
    """The words looked up in the classes: a hyphenated token as one word if it is a member
    ("grown-ups" = "grownups"), else each of its parts ("dark-blue", "kid-friendly"); a
    possessive or "'s" without it ("men's" is "men"); "states" of "the United States" left out."""
    out: list[str] = []
    skip = -1
    for i, w in enumerate(low):
        if i == skip:
            continue
        w = _strip_s(w)
        if w in ("state", "states") and i > 0 and low[i - 1] == "united":
            continue
        if w in ("step", "great") and i + 1 < len(low):  # "step dad", "great grandson"
            nxt = _strip_s(low[i + 1])
            compound = next((c for c in (w + nxt, f"{w}-{nxt}") if c in _CLASS_OF), None)
            if compound is not None:
                out.append(compound)
                skip = i + 1
                continue
        if "-" not in w or w in _CLASS_OF:
            out.append(w)
            continue
        joined = w.replace("-", "")
        if joined in _CLASS_OF or _lemma(joined) in _CLASS_OF:
            out.append(joined)
        else:
            out.extend(p for p in w.split("-") if p)
    return out


# Resources a cost is measured in, named before the measure: "time complexity" is not "space
# complexity", nor "memory usage" "CPU usage" ("time and space complexity" names both).
_RESOURCES = {"time": "time", "runtime": "time", "space": "space", "memory": "memory",
              "ram": "memory", "cpu": "cpu", "gpu": "gpu", "disk": "disk", "storage": "disk",
              "bandwidth": "bandwidth", "network": "bandwidth", "energy": "energy",
              "power": "energy", "battery": "energy"}
_MEASURES = frozenset("""complexity complexities usage cost costs efficiency overhead requirement
    requirements consumption limit limits bound bounds footprint budget constraint constraints
    utilization utilisation""".split())
# Git's commands: with "git" in both texts, "what does git commit do" is not "... git push do".
_GIT_COMMANDS = frozenset("""commit push pull fetch merge rebase clone checkout stash reset revert
    cherrypick init diff log status blame bisect squash amend tag""".split())


def _resources(words: list[str]) -> set[str]:
    out: set[str] = set()
    for i, w in enumerate(words):
        if w not in _MEASURES:
            continue
        j = i - 1
        while j >= 0 and (words[j] in _RESOURCES or words[j] in ("and", "or")):
            if words[j] in _RESOURCES:
                out.add(_RESOURCES[words[j]])
            j -= 1
    return out


def _git_commands(t: _Text) -> set[str]:
    out: set[str] = set()
    for w in t.lower:
        forms = _variants(w.replace("-", "")) & _GIT_COMMANDS
        if forms:
            out.add(min(forms))
    return out


def _by_class(t: _Text) -> dict[str, set[str]]:
    """The members of each closed class the text names, canonicalised; the resources a cost is
    measured in, and git's commands in a text about git, as classes too."""
    out: dict[str, set[str]] = {}
    words = _class_words(t.lower)
    resources = _resources(words)
    if resources:
        out["resource"] = resources
    if "git" in t.lower:
        commands = _git_commands(t)
        if commands:
            out["git_command"] = commands
    for w in words:
        classes = _CLASS_OF.get(w)
        base = w
        if classes is None and _lemma(w) in _CLASS_OF:
            base = _lemma(w)
            classes = _CLASS_OF[base]
        if classes:
            base = _CANONICAL.get(base, base)
            for cls in classes:
                out.setdefault(cls, set()).add(_lemma(base) if cls == "animal" else base)
    return out


def _class_clash(a: _Text, b: _Text) -> str | None:
    """A member of a closed class replaced by another member ("red" -> "blue", "Monday" -> "Friday")."""
    ca, cb = a.classes, b.classes
    for cls in ca.keys() & cb.keys():
        only_a, only_b = ca[cls] - cb[cls], cb[cls] - ca[cls]
        if only_a and only_b:
            return f"{cls}:{','.join(sorted(only_a))}!={','.join(sorted(only_b))}"
    return None


def _role_swap(a: _Text, b: _Text, ctx: _Pair) -> str | None:
    """'A man carries a dog' vs 'A dog carries a man': two shared words swap sides of a shared pivot.

    Only words within two content positions of the pivot in both texts count, so each pivot
    looks at a handful of neighbours instead of every shared word. A symmetric word ("vs") is
    no pivot, and the arguments of a symmetric or converse relation (ctx.ignore) may move.
    """
    pa, pb = a.unique_content_positions(ctx.keep), b.unique_content_positions(ctx.keep)
    if pa is None or pb is None:
        return None  # long texts reorder clauses freely; the check is meant for questions
    shared = [w for w in pa if w in pb]
    movable = [w for w in shared if w not in ctx.ignore]
    for v in shared:
        if v in _SYMMETRIC_WORDS:
            continue
        ia, ib = pa[v], pb[v]
        near = [w for w in movable if w != v and abs(pa[w] - ia) <= 2 and abs(pb[w] - ib) <= 2]
        for x in near:
            if pa[x] < ia and pb[x] > ib:       # x left of the pivot in a, right of it in b
                for y in near:
                    if pa[y] > ia and pb[y] < ib:
                        return f"{x}<{v}<{y}"
    return None


# Relation words: what stands left of one and what stands right of it are the relation's
# arguments, in order ("flights from New York to London", "is a bigger than b", "wash before
# cooking", "prefer tea over coffee", "use X instead of Y"). A comparison with "vs", "versus" or
# "and" is symmetric ("Python vs Go" is "Go vs Python"): those are no relation words, and no
# pivot of _role_swap.
RELATION_WORDS = frozenset("""to from into onto than before after over under above below
    instead against toward towards""".split())
_SYMMETRIC_WORDS = frozenset("vs versus versu v and or".split())   # "versu": the lemma
# Arguments looked at on each side of a relation word: its neighbours, as _role_swap's (a
# multi-word name has a word this near on both sides: "new york" / "york"; further out, a
# reworded sentence's clauses move round infinitive "to"s: "you need to load a processor" /
# "a processor is required to utilize ...").
_RELATION_WINDOW = 2
_MAX_RELATION_ARGS = 30


def _relation_sequence(t: _Text) -> list[tuple[bool, str]] | None:
    """The text as (is a relation word, word): relation words and arguments (content words
    without "'s", as written: compared by their _form; single letters too when the text names
    things by letters, as "is a bigger than b" does: a letter other than "a" and "i"); None for
    long texts."""
    out: list[tuple[bool, str]] = []
    args = rels = 0
    letters = any(len(w) == 1 and w.isalpha() and w not in ("a", "i") for w in t.lower)
    for w in t.lower:
        w = _strip_s(w)
        if w in RELATION_WORDS:
            out.append((True, w))
            rels += 1
        elif w.isalpha() and ((letters and len(w) == 1)
                              or (w not in _SIMPLE_STOP and w not in NEGATIONS)):
            out.append((False, w))
            args += 1
        if args > _MAX_RELATION_ARGS or rels > _MAX_RELATION_ARGS:
            return None
    return out


def _relation_sides(seq: list[tuple[bool, str]], i: int) -> tuple[set[str], set[str]]:
    """The arguments within _RELATION_WINDOW before and after the relation word at seq[i]."""
    left = [w for rel, w in seq[:i] if not rel][-_RELATION_WINDOW:]
    right = [w for rel, w in seq[i + 1:] if not rel][:_RELATION_WINDOW]
    return set(left), set(right)


def _relation_crossings(a: _Text, b: _Text, keep: frozenset[str],
                        skip: Callable[[str], bool] | None = None,
                        ) -> Iterator[tuple[str, list[str], list[str]]]:
    """(relation word, arguments that went right of it, arguments that went left) for each
    relation word the texts compare (see _relation_swap) round which arguments crossed both ways;
    arguments as written for which `skip` is true are left out first."""
    sa, sb = a.relation_sequence, b.relation_sequence
    if not sa or not sb:
        return
    if skip is None:
        sa, sb = a.relation_forms(keep) or [], b.relation_forms(keep) or []
    else:
        sa = [(rel, w if rel else _form(w, keep)) for rel, w in sa if rel or not skip(w)]
        sb = [(rel, w if rel else _form(w, keep)) for rel, w in sb if rel or not skip(w)]
    pos_a: dict[str, list[int]] = {}
    pos_b: dict[str, list[int]] = {}
    for seq, pos in ((sa, pos_a), (sb, pos_b)):
        for i, (rel, w) in enumerate(seq):
            if rel:
                pos.setdefault(w, []).append(i)
    in_order = a.one_sentence and b.one_sentence
    words = sorted(w for w in pos_a.keys() & pos_b.keys() if len(pos_a[w]) == len(pos_b[w])
                   and (in_order or len(pos_a[w]) == 1))
    if not words:
        return
    count_a = Counter(w for rel, w in sa if not rel)
    count_b = Counter(w for rel, w in sb if not rel)
    once = {w for w, n in count_a.items() if n == 1 and count_b.get(w) == 1}
    for word in words:
        for ia, ib in zip(pos_a[word], pos_b[word]):
            la, ra = _relation_sides(sa, ia)
            lb, rb = _relation_sides(sb, ib)
            went_right = sorted(la & rb & once)
            went_left = sorted(ra & lb & once)
            if went_right and went_left:
                yield word, went_right, went_left


def _relation_swap(a: _Text, b: _Text, ctx: _Pair) -> str | None:
    """Arguments swapped round a relation word: a word left of it in one text is right of it in
    the other AND another goes the other way ("from New York to London" / "from London to New
    York", "is a bigger than b" / "is b bigger than a"). A phrase moved whole ("to the coast from
    the city" / "from the city to the coast") crosses one way only. A relation word both texts
    have once is compared; one they have equally often is compared occurrence by occurrence, in
    order ("how to fly from X to Y": the second "to" with the second), if each text is one
    sentence (a reworded paragraph's sentences do not keep their order). Arguments that occur
    more than once in a text are not compared (their side is ambiguous), nor those of a
    symmetric or converse relation (ctx.ignore: "the distance from A to B", "A is faster than
    B" / "B is slower than A")."""
    for word, went_right, went_left in _relation_crossings(a, b, ctx.keep):
        went_right = [w for w in went_right if w not in ctx.ignore]
        went_left = [w for w in went_left if w not in ctx.ignore]
        if went_right and went_left:
            return f"{went_right[0]}<{word}<{went_left[0]}"
    return None


# A question's tense is the time of the fact it asks about: "who is the president" and "who was
# the president" have other answers, as have "what does it cost" / "what did it cost" and "who won"
# / "who will win". Statements are left alone (a caption's "is"/"was" is narration).
_QUESTION_WORDS = frozenset("who what which where when how whose whom why".split())
# An auxiliary's tense; "-be" marks the copula, whose present and future are other states
# ("who is" / "who will be the president"), while the present and future of another verb are
# mostly one question ("what does this print" / "what will this print", "what happens if").
_TENSE_OF = {"is": "present-be", "are": "present-be", "am": "present-be", "isn't": "present-be",
             "aren't": "present-be", "does": "present", "do": "present", "doesn't": "present",
             "don't": "present", "was": "past", "were": "past", "did": "past", "wasn't": "past",
             "weren't": "past", "didn't": "past", "will": "future", "shall": "future",
             "won't": "future"}
_CONTRACTED_TENSE = {"s": "present-be", "re": "present-be", "ll": "future"}
# A main verb in the past straight after the question word ("who won", "who invented"): past,
# but compared only with the future ("who will win"), since "who invented the telephone" is
# "who is the inventor of the telephone".
_IRREGULAR_PAST = frozenset("""won lost wrote made said went came became took gave began found
    built led ran sang held fought saw knew thought told sold bought taught brought drew flew grew
    threw fell rose chose broke spoke stole wore beat met paid sent spent left""".split())
_PAST_VERB = "past-verb"


def _question_tense(t: _Text) -> str | None:
    """The tense of a question's first auxiliary (see _TENSE_OF; "is ... going to" is future,
    and a future is "future-be" when "be" follows within three words); _PAST_VERB for "who
    won"; None for a text that is not a question (opened by a question word or an auxiliary)
    or whose auxiliary is not among its first words."""
    low = t.lower
    if not low:
        return None
    first = low[0].replace("’", "'")
    head, _, tail = first.partition("'")
    if head in _QUESTION_WORDS and tail:
        tense = _CONTRACTED_TENSE.get(tail)              # "who's", "what're", "who'll"
        start = 1
    elif head in _QUESTION_WORDS:
        tense, start = None, 1
        for j in range(1, min(len(low), 4)):              # "how many people are", "what time is"
            if low[j] in _TENSE_OF:
                tense, start = _TENSE_OF[low[j]], j + 1
                break
        else:
            nxt = low[1] if len(low) > 1 else ""
            if nxt in _IRREGULAR_PAST or (len(nxt) > 4 and nxt.endswith("ed")):
                return _PAST_VERB
    elif first in _TENSE_OF:
        tense, start = _TENSE_OF[first], 1               # "is it raining", "did it rain"
    else:
        return None
    if tense == "present-be":                             # "is it going to rain" is future
        for j in range(start, min(len(low) - 1, start + 3)):
            if low[j] == "going" and low[j + 1] == "to":
                tense, start = "future", j + 2
                break
    if tense == "future" and "be" in low[start:start + 3]:
        tense = "future-be"                               # "who will be", "will it be"
    return tense


_YEAR_RE = re.compile(r"(?:1[0-9]|20)[0-9]{2}s?")
_DATE_WORDS = frozenset(EXCLUSIVE_CLASSES["relative_day"] + EXCLUSIVE_CLASSES["weekday"]
                        + EXCLUSIVE_CLASSES["month"])


def _dated(t: _Text) -> bool:
    """Whether the text names its time itself: a day or period shifted from now, a day's name,
    a month, a year or a decade ("in 2010", "the 1990s")."""
    return bool(t.shifted_times) or any(w in _DATE_WORDS or _YEAR_RE.fullmatch(w) for w in t.lower)


def _tense_clash(a: _Text, b: _Text) -> str | None:
    """Questions in other tenses when neither names its time: the tense is then the only time
    the question has. A dated question is compared by its date ("what will the weather be
    tomorrow" / "what's the weather tomorrow"; the time, number and class checks see the date)."""
    ta, tb = a.question_tense, b.question_tense
    if not ta or not tb:
        return None
    base_a, base_b = ta.split("-")[0], tb.split("-")[0]
    if base_a == base_b:
        return None
    pair = {base_a, base_b}
    if _PAST_VERB in (ta, tb) and "future" not in pair:
        return None                                      # "who invented" / "who is the inventor"
    if pair == {"present", "future"} and not (ta.endswith("-be") and tb.endswith("-be")):
        return None                                      # "what does it print" / "what will it print"
    if _dated(a) or _dated(b):
        return None
    return f"{ta}!={tb}"


def _entity_known(entity: str, other: _Text) -> bool:
    """An entity of one text is present in the other, allowing for case, hyphens and truncation."""
    if entity in other.words:
        return True
    parts = [p for p in re.split(r"[-_.]", entity) if p]
    if len(parts) > 1 and all(p in other.words for p in parts):
        return True
    if len(entity) >= 4 and entity.replace("-", "") in other.squashed:
        return True
    return any(len(w) >= 5 and len(entity) >= 5 and (w.startswith(entity) or entity.startswith(w))
               for w in other.words)


def _degree_clash(a: _Text, b: _Text) -> str | None:
    """Comparatives or superlatives on other scales: "the cheapest way" is not "the fastest way",
    nor "is it better" "is it faster". A scale only one text grades is no clash ("cheapest and
    fastest" / "fastest"); related scales count as one (_SCALE_GROUP: "tallest" / "highest")."""
    da, db = a.poles.degrees, b.poles.degrees
    if not da or not db:
        return None
    only_a = sorted(g for g in da if g not in db)
    only_b = sorted(g for g in db if g not in da)
    if only_a and only_b:
        return f"{da[only_a[0]]}/{db[only_b[0]]}"
    return None


# What a list is ordered by: "the planets in order from the sun" is not "... in order of size",
# nor "sort users by age" "sort users by name". The preposition follows the order word or its
# object ("sort the list by name"); the keys are the content words of the next few ("in order
# of increasing size": a direction word is no key; "ordered by distance from the sun" has the
# key "sun" too, so it is "in order from the sun").
_ORDER_WORDS = {"order": ("of", "from", "by"), "ordered": ("by", "from"), "ordering": ("by",),
                "sort": ("by",), "sorted": ("by",), "sorting": ("by",), "sorts": ("by",),
                "rank": ("by",), "ranked": ("by",), "ranking": ("by",), "arrange": ("by",),
                "arranged": ("by",), "group": ("by",), "grouped": ("by",)}
_ORDER_REACH = 3    # words between an order word and its preposition, at most
_KEY_REACH = 4      # words after the preposition whose content words are keys
_NO_KEY = _SIMPLE_STOP | frozenset("""increasing decreasing ascending descending asc desc
    their its his her them then""".split())


def _order_keys(t: _Text, keep: frozenset[str]) -> set[str]:
    low = t.lower
    keys: set[str] = set()
    for i, w in enumerate(low[:-1]):
        preps = _ORDER_WORDS.get(w)
        if preps is None:
            continue
        j = next((j for j in range(i + 1, min(len(low), i + 2 + _ORDER_REACH)) if low[j] in preps), None)
        if j is None:
            continue
        keys.update(_form(_strip_s(x), keep) for x in low[j + 1:j + 1 + _KEY_REACH]
                    if x not in _NO_KEY and x.isalpha() and x not in RELATION_WORDS)
    return keys


def _order_clash(a: _Text, b: _Text, ctx: _Pair) -> str | None:
    if not any(w in _ORDER_WORDS for w in a.lower) or not any(w in _ORDER_WORDS for w in b.lower):
        return None
    ka, kb = _order_keys(a, ctx.keep), _order_keys(b, ctx.keep)
    if ka and kb and not ka & kb:
        return f"{','.join(sorted(ka))}!={','.join(sorted(kb))}"
    return None


@dataclass(frozen=True)
class _Pair:
    """What verify knows of the two texts together before the checks that compare them."""
    keep: frozenset[str] = frozenset()             # names in either text: compared unlemmatised
    ignore: frozenset[str] = frozenset()           # arguments of a symmetric or converse relation
    converse_scales: frozenset[str] = frozenset()  # scales turned round with the arguments
    converse_words: frozenset[str] = frozenset()   # "more"/"less" turned round with them


# A distance is the same both ways: "the distance from London to Paris" is "... from Paris to
# London", "how far is Rome from Milan" is "how far is Milan from Rome". A route, a journey, a
# conversion is not, and a text that asks for one besides ("the distance and the best route
# from A to B", "how far is it to drive from A to B") has a direction.
_SYMMETRIC_RELATIONS = frozenset(("to", "from"))
_DIRECTED_WORDS = frozenset("""route routes direction directions way get go going travel
    travelling traveling trip journey commute fly flight flights drive driving ride train bus
    ferry ship shipping send move transfer convert translate navigate walk walking cost fare
    fares ticket tickets time long""".split())


def _symmetric_measure(t: _Text) -> bool:
    low = t.lower
    if not (any(w in ("distance", "distances") for w in low)
            or any(w == "how" and nxt == "far" for w, nxt in zip(low, low[1:]))):
        return False
    return not any(w in _DIRECTED_WORDS for w in low)


_Converse = tuple[frozenset[str], frozenset[str], frozenset[str]]
_NO_CONVERSE: _Converse = (frozenset(), frozenset(), frozenset())


def _converse(a: _Text, b: _Text, keep: frozenset[str]) -> _Converse:
    """A comparison said the other way round: the arguments swap round "than" AND the scale's
    pole turns ("Python is faster than Java" / "Java is slower than Python", "more people than"
    / "fewer people than"). (arguments, scales, degree modifiers) that may then differ."""
    if "than" not in a.lower or "than" not in b.lower:
        return _NO_CONVERSE
    crossed: set[str] = set()
    # The degree words are not arguments: "a train is more expensive than a bus" compares "train"
    # and "bus" (the window of two would end at "more expensive").
    for word, went_right, went_left in _relation_crossings(a, b, keep, _is_degree_word):
        if word == "than":
            crossed.update(went_right + went_left)
    if not crossed:
        return _NO_CONVERSE
    scales = frozenset(scale for scale, _, _ in _opposite_scales(a, b))
    ga, gb = a.poles.graded, b.poles.graded
    turned = [w for w in ga.keys() & gb.keys() if ga[w] != gb[w]]
    words = frozenset(_GENERIC_DEGREES) if turned else frozenset()
    if not scales and not words:
        return _NO_CONVERSE
    return frozenset(crossed), scales, words


def _is_degree_word(w: str) -> bool:
    return w in _GENERIC_DEGREES or bool(_poles(w)[0])


def _pair_context(a: _Text, b: _Text) -> _Pair:
    keep = a.proper | b.proper
    ignore: set[str] = set()
    if _symmetric_measure(a) and _symmetric_measure(b):
        for word, went_right, went_left in _relation_crossings(a, b, keep):
            if word in _SYMMETRIC_RELATIONS:
                ignore.update(went_right + went_left)
    crossed, scales, words = _converse(a, b, keep)
    return _Pair(keep, frozenset(ignore | crossed), scales, words)


# The checks that name what clashes, in the order verify runs them, with their reason's prefix
# (the code-shape checks name themselves whole); those that take the pair's context (_Pair) too.
# One end of a move named the other way round: "transfer 100 dollars from my savings" is not
# "... to my savings", "the email from my boss" not "... to my boss". Only the same word after
# "from" in one text and after "to" in the other counts: "to" is mostly no direction ("how to",
# "in addition to"), and "from A to B" / "from B to A" is the direction check's.
_ENDPOINT_SKIP = frozenset("the a an my your our their his her its this that these those".split())
# Fixed phrases whose "to"/"from" names no end of a move: "in addition to", "apart from", "access to".
_NOT_AN_END = frozenset("""addition according due thanks prior compared similar related next close
    owing regard respect access apart aside""".split())


# Past participles whose "by" names the agent: the end a thing comes from ("emails sent by John"
# are "sent from John", not "sent to John"); "-ed" participles are found by their ending. After a
# verb of receiving the agent is the end it goes to: "received by Alice" is not "received from
# Alice".
_AGENT_PARTICIPLES = frozenset("""sent written made paid given told sold built held kept left lent lost
    meant met read said seen shown brought taught thought spent done drawn driven eaten forgiven
    forgotten hidden known ridden spoken stolen sung sworn thrown worn""".split())
_RECEIVING_PARTICIPLES = frozenset("""received got gotten accepted obtained collected acquired bought
    purchased adopted inherited borrowed earned won taken caught downloaded""".split())


# After "by", a means, not an agent: "notified by email", "sent by post", "shipped by air".
_MEANS = frozenset("""email e-mail mail post phone telephone text sms message fax courier hand car
    train bus plane air sea road rail ship boat bike bicycle foot taxi default design mistake
    accident chance force name""".split())


def _agent_side(low: list[str], i: int) -> str | None:
    """The end the "by" at i names: "from" (the agent sends or makes), "to" (it receives), or
    None when the word before it is no participle ("sort by date", "by Friday") or the word after
    it a means ("notified by email")."""
    prev = low[i - 1] if i > 0 else ""
    j = i + 1
    while j < len(low) and low[j] in _ENDPOINT_SKIP:
        j += 1
    if j < len(low) and low[j] in _MEANS:
        return None
    if prev in _RECEIVING_PARTICIPLES:
        return "to"
    return "from" if prev in _AGENT_PARTICIPLES or (len(prev) > 3 and prev.endswith("ed")) else None


def _endpoints(t: _Text) -> dict[tuple[str, str], str]:
    """{("from"|"to", lemma of the word after it): that word} for each "from", "to" and "into",
    and a "by" after a participle (its agent, _agent_side), determiners skipped."""
    low, out = t.lower, {}
    for i, w in enumerate(low):
        side = "from" if w == "from" else "to" if w in ("to", "into") else _agent_side(low, i) if w == "by" else None
        if side is not None and not (i > 0 and low[i - 1] in _NOT_AN_END):
            j = i + 1
            while j < len(low) and low[j] in _ENDPOINT_SKIP:
                j += 1
            if j < len(low):
                out.setdefault((side, _lemma(low[j])), low[j])
    return out


def _endpoint_clash(a: _Text, b: _Text) -> str | None:
    if a.directions and b.directions:
        return None  # both name a move from one place to another: the direction check's
    ea, eb = _endpoints(a), _endpoints(b)
    for side, lemma in sorted(ea.keys() - eb.keys()):
        flip = "to" if side == "from" else "from"
        other = (flip, lemma)
        if other not in eb or other in ea:
            continue
        # Both ends swapped ("from London to Paris" / "from Paris to London"): the direction
        # check's, which lets a distance swap.
        if any((flip, y) in ea and (side, y) in eb for s, y in eb if s == side and y != lemma):
            continue
        return f"{side} {ea[(side, lemma)]}/{flip} {eb[other]}"
    return None


_CLASH_CHECKS: tuple[tuple[str, bool, Callable[..., str | None]], ...] = (
    ("direction:", True, _role_swap), ("direction:", True, _relation_swap), ("direction:", False, _endpoint_clash),
    ("antonym:", True, _antonym_clash), ("antonym:", False, _stance_clash),
    ("antonym:", False, _prefix_pair_clash), ("class:", False, _class_clash),
    ("degree:", False, _degree_clash), ("order:", True, _order_clash), ("time:", False, _time_clash),
    ("tense:", False, _tense_clash), ("ids:", False, _identifier_clash),
    ("case:", False, _case_clash), ("case:", False, _symbol_case_clash),
    ("literal:", False, _literal_clash), ("letters:", False, _letter_clash), ("", False, _indent_clash), ("", False, _line_order_clash),
)


def verify(query: str, candidate: str) -> Verdict:
    """Whether `candidate` (a cached prompt) may answer `query`. Identical texts always pass."""
    if query == candidate:
        return Verdict(True)
    a, b = _analyse(query), _analyse(candidate)
    if a.negated != b.negated:
        return Verdict(False, "negation")
    if a.excluded != b.excluded:
        return Verdict(False, "negation:exclusion")
    (na, oa), (nb, ob) = a.numbers, b.numbers
    if na != nb:
        return Verdict(False, f"numbers:{list(map(str, na))}!={list(map(str, nb))}")
    if oa and ob and oa != ob:
        return Verdict(False, f"ordinals:{sorted(map(str, oa))}!={sorted(map(str, ob))}")
    ua, ub = a.units, b.units
    if ua != ub:
        return Verdict(False, f"units:{sorted(ua)}!={sorted(ub)}")
    ctx = _pair_context(a, b)
    da = {(_form(x, ctx.keep), _form(y, ctx.keep)) for x, y in a.directions}
    db = {(_form(x, ctx.keep), _form(y, ctx.keep)) for x, y in b.directions}
    for x, y in sorted(da):
        if (y, x) in db and (x, y) not in db and not (x in ctx.ignore and y in ctx.ignore):
            return Verdict(False, f"direction:{x}->{y}")
    for prefix, takes_ctx, check in _CLASH_CHECKS:
        clash = check(a, b, ctx) if takes_ctx else check(a, b)
        if clash:
            return Verdict(False, prefix + clash)
    missing_in_b = {e for e in a.entities if not _entity_known(e, b)}
    missing_in_a = {e for e in b.entities if not _entity_known(e, a)}
    if missing_in_a and missing_in_b:  # one name replaced by another
        return Verdict(False, f"entities:{sorted(missing_in_b)}!={sorted(missing_in_a)}")
    return Verdict(True)
