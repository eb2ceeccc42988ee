#!/usr/bin/env python3
"""Build aigov/data/opposites.json, the cache verifier's opposite adjectives, from WordNet 3.0.

WordNet groups adjectives in clusters: two head synsets that are direct antonyms ("polite" /
"impolite") and the satellites similar to each ("courteous", "gracious" / "rude", "discourteous").
Each such pair of clusters becomes one scale with two poles; a word is put on a pole only when
that cluster is one of its `--senses` most frequent senses, so a rare sense ("rude": unfinished)
puts no common word on a foreign scale. Only single-word, lower-case lemmas are kept.

Input: WordNet's database files (Debian's wordnet-base: /usr/share/wordnet). The output is
committed (a data table like prices.json, ~100 KB) with WordNet's licence beside it
(aigov/data/LICENSE.wordnet); rerun this after changing the rules:

    apt-get install wordnet-base
    .venv/bin/python scripts/build_opposites.py [--wordnet /usr/share/wordnet] [--senses 2]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "aigov" / "data" / "opposites.json"
_LEMMA = re.compile(r"^[a-z]+(?:-[a-z]+)?$")


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


def sense_ranks(path: Path) -> dict[str, list[str]]:
    """lemma -> its synset offsets, most frequent sense first (index.adj)."""
    ranks = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()
        lemma, synset_count = fields[0], int(fields[2])
        ranks[lemma] = fields[-synset_count:]
    return ranks


def build(wordnet: Path, senses: int) -> list[list[list[str]]]:
    synsets = read_synsets(wordnet / "data.adj")
    ranks = sense_ranks(wordnet / "index.adj")
    satellites: dict[str, list[str]] = {}
    for offset, (kind, _lemmas, pointers) in synsets.items():
        if kind == "s":
            for symbol, target, _ in pointers:
                if symbol == "&":
                    satellites.setdefault(target, []).append(offset)

    def pole(head: str) -> list[str]:
        words = set()
        for offset in [head, *satellites.get(head, [])]:
            for lemma in synsets[offset][1]:
                if _LEMMA.match(lemma) and offset in ranks.get(lemma, [])[:senses]:
                    words.add(lemma)
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
    parser.add_argument("--senses", type=int, default=2)
    args = parser.parse_args()
    scales = build(args.wordnet, args.senses)
    OUT.write_text(json.dumps({
        "source": "WordNet 3.0 (Princeton University), adjective clusters: direct antonyms and their "
                  "similar-to satellites; scripts/build_opposites.py",
        "license": "aigov/data/LICENSE.wordnet", "senses": args.senses, "scales": scales,
    }, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(scales)} scales, {sum(len(h) + len(l) for h, l in scales)} words")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
