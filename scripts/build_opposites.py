#!/usr/bin/env python3
"""Build aigov/data/opposites.json, the cache verifier's opposite adjectives, from WordNet 3.0.

WordNet groups adjectives in clusters: two head synsets that are direct antonyms ("polite" /
"impolite") and the satellites similar to each ("courteous", "gracious" / "rude", "discourteous").
Each such pair of clusters becomes one scale with two poles. A word is put on a pole only when
that is what the word mostly means in use, by WordNet's sense-tagged corpus counts (cntlist.rev):
the cluster's sense must carry at least `--share` of all the word's tagged uses as a noun, verb,
adjective or adverb, and of its verb's when it is an -ing or -ed form ("trying", "telling",
"based" are verbs in a prompt, "kind" a noun, "quick" the opposite of "slow", not of
"deliberate"). A word with no tagged use is kept only as a head (a direct antonym). Left out:
multi-word lemmas, comparatives and superlatives (the verifier grades those on its own scales)
and words that point into the text ("following", "above"), which reordered paraphrases swap.

Input: WordNet's database files (Debian's wordnet-base: /usr/share/wordnet). The output is
committed (a data table like prices.json) with WordNet's licence beside it
(aigov/data/LICENSE.wordnet); rerun this after changing the rules:

    apt-get install wordnet-base
    .venv/bin/python scripts/build_opposites.py [--wordnet /usr/share/wordnet] [--share 0.3]
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "aigov" / "data" / "opposites.json"
_LEMMA = re.compile(r"^[a-z]+(?:-[a-z]+)?$")
# Words that point into the text or the list around them: "summarize the following" and
# "summarize the above" ask the same of a text placed after or before.
_DEICTIC = frozenset("""following above below preceding foregoing aforementioned previous next
    former latter""".split())
_POS_OF_SS_TYPE = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}


def read_synsets(path: Path) -> dict[str, tuple[str, list[str], list[tuple[str, str, str]]]]:
    """offset -> (type a|s, lemmas, pointers (symbol, target offset, source/target))."""
    out = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue  # the licence header
        fields = line.split(" | ", 1)[0].split()
        offset, kind, count = fields[0], fields[2], int(fields[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).lower() for i in range(count)]
        i = 4 + 2 * count
        pointers = []
        for _ in range(int(fields[i])):
            symbol, target, _pos, source_target = fields[i + 1:i + 5]
            pointers.append((symbol, target, source_target))
            i += 4
        out[offset] = (kind, lemmas, pointers)
    return out


def read_index(path: Path) -> dict[str, list[str]]:
    """lemma -> its synset offsets, most frequent sense first (an index.<pos> file)."""
    ranks = {}
    if not path.is_file():
        return ranks
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()
        lemma, synset_count = fields[0], int(fields[2])
        ranks[lemma] = fields[-synset_count:]
    return ranks


def read_counts(path: Path) -> tuple[dict[str, dict[str, int]], dict[tuple[str, int], int]]:
    """(lemma -> {pos: tagged uses}, (adjective lemma, sense number) -> tagged uses)."""
    by_pos: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    adjective_senses: dict[tuple[str, int], int] = {}
    if not path.is_file():
        return by_pos, adjective_senses
    for line in path.read_text(encoding="latin-1").splitlines():
        key, sense, count = line.split()
        lemma, rest = key.split("%", 1)
        pos = _POS_OF_SS_TYPE.get(rest[:1], "")
        by_pos[lemma][pos] += int(count)
        if pos == "a":
            adjective_senses[(lemma, int(sense))] = adjective_senses.get((lemma, int(sense)), 0) + int(count)
    return by_pos, adjective_senses


def _verb_stems(word: str) -> list[str]:
    """The verbs an -ing or -ed form may come from ("trying" -> "try", "based" -> "base")."""
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            stem = word[: -len(suffix)]
            out = [stem, stem + "e"]
            if stem.endswith("i"):
                out.append(stem[:-1] + "y")
            if len(stem) >= 3 and stem[-1] == stem[-2]:
                out.append(stem[:-1])
            return out
    return []


def build(wordnet: Path, share: float) -> list[list[list[str]]]:
    synsets = read_synsets(wordnet / "data.adj")
    ranks = read_index(wordnet / "index.adj")
    verbs = read_index(wordnet / "index.verb")
    by_pos, adjective_senses = read_counts(wordnet / "cntlist.rev")
    inflected = {line.split()[0] for line in (wordnet / "adj.exc").read_text(encoding="latin-1").splitlines()
                 if line.strip()} if (wordnet / "adj.exc").is_file() else set()
    satellites: dict[str, list[str]] = {}
    for offset, (kind, _lemmas, pointers) in synsets.items():
        if kind == "s":
            for symbol, target, _ in pointers:
                if symbol == "&":
                    satellites.setdefault(target, []).append(offset)

    def uses(word: str) -> int:
        total = sum(by_pos.get(word, {}).values())
        return total + sum(by_pos.get(stem, {}).get("v", 0) for stem in _verb_stems(word) if stem in verbs)

    def on_pole(word: str, offset: str, head: bool) -> bool:
        if not _LEMMA.match(word) or word in _DEICTIC or word in inflected:
            return False
        senses = ranks.get(word, [])
        if offset not in senses:
            return False
        if word.endswith("est") and word[:-3] in ranks:  # a superlative ("lowest")
            return False
        total = uses(word)
        if total == 0:
            return head and not _verb_stems(word)
        return adjective_senses.get((word, senses.index(offset) + 1), 0) >= share * total

    def pole(head: str) -> list[str]:
        words = {w for w in synsets[head][1] if on_pole(w, head, True)}
        for offset in satellites.get(head, []):
            words |= {w for w in synsets[offset][1] if on_pole(w, offset, False)}
        return sorted(words)

    scales, seen = [], set()
    for offset, (kind, _lemmas, pointers) in synsets.items():
        if kind != "a":
            continue
        for symbol, target, _ in pointers:
            key = tuple(sorted((offset, target)))
            if symbol != "!" or key in seen or synsets.get(target, ("",))[0] != "a":
                continue
            seen.add(key)
            high, low = pole(offset), pole(target)
            shared = set(high) & set(low)  # a word on both sides names neither
            high, low = [w for w in high if w not in shared], [w for w in low if w not in shared]
            if high and low:
                scales.append([high, low])
    return sorted(scales)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--share", type=float, default=0.3)
    args = parser.parse_args()
    scales = build(args.wordnet, args.share)
    OUT.write_text(json.dumps({
        "source": "WordNet 3.0 (Princeton University), adjective clusters: direct antonyms and their "
                  "similar-to satellites, each word in the clusters of its common senses; "
                  "scripts/build_opposites.py",
        "license": "aigov/data/LICENSE.wordnet", "share": args.share, "scales": scales,
    }, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(scales)} scales, {sum(len(h) + len(l) for h, l in scales)} words")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
