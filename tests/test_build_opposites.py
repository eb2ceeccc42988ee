"""scripts/build_opposites.py on a tiny WordNet in WordNet's own file format, and the committed
table it made (aigov/data/opposites.json), which the cache verifier reads."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DATA_ADJ = """  1 This licence header line starts with spaces and is skipped
00000001 00 a 01 polite 0 002 ! 00000002 a 0101 & 00000003 a 0000 | showing regard for others
00000002 00 a 01 impolite 0 002 ! 00000001 a 0101 & 00000004 a 0000 | not polite
00000003 00 s 03 courteous 0 well_mannered 0 following 0 001 & 00000001 a 0000 | polite and kind
00000004 00 s 03 rude 0 discourteous(a) 0 trying 0 001 & 00000002 a 0000 | socially incorrect
00000005 00 s 01 rude 0 001 & 00000001 a 0000 | a rare sense filed under polite's cluster
"""
INDEX_ADJ = """  1 licence header
courteous a 1 1 & 1 0 00000003
discourteous a 1 1 & 1 0 00000004
following a 1 1 & 1 0 00000003
impolite a 1 2 ! & 1 0 00000002
polite a 1 2 ! & 1 0 00000001
rude a 2 1 & 2 0 00000004 00000005
trying a 1 1 & 1 0 00000004
"""
INDEX_VERB = """try v 1 1 @ 1 1 00000009
"""
# sense key lemma%ss_type:..., sense number, tagged uses (ss_type 3 adjective, 5 satellite, 2 verb)
CNTLIST = """rude%5:00:00:impolite:00 1 9
rude%5:00:00:polite:00 2 1
courteous%5:00:00:polite:00 1 3
polite%3:00:00:: 1 12
impolite%3:00:00:: 1 2
trying%5:00:00:impolite:00 1 1
try%2:41:00:: 1 40
"""


def _script():
    spec = importlib.util.spec_from_file_location("build_opposites", REPO / "scripts" / "build_opposites.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clusters_become_two_poles_of_the_words_common_senses(tmp_path: Path) -> None:
    for name, text in (("data.adj", DATA_ADJ), ("index.adj", INDEX_ADJ), ("index.verb", INDEX_VERB),
                       ("cntlist.rev", CNTLIST)):
        (tmp_path / name).write_text(text, encoding="latin-1")
    build = _script().build
    # "rude" is 90% the impolite sense, so it stands there only; "trying" is mostly the verb
    # "try"; "following" points into the text; "discourteous" (no tagged use) is a satellite;
    # a multi-word lemma ("well_mannered") is left out.
    assert build(tmp_path, share=0.3) == [[["courteous", "polite"], ["impolite", "rude"]]]
    # A share so low that the rare sense counts puts "rude" on both poles, so on neither.
    assert build(tmp_path, share=0.05) == [[["courteous", "polite"], ["impolite"]]]


def test_the_committed_table_puts_common_opposites_on_opposite_poles() -> None:
    table = json.loads((REPO / "aigov" / "data" / "opposites.json").read_text(encoding="utf-8"))
    assert (REPO / "aigov" / "data" / "LICENSE.wordnet").is_file() and table["license"] == "aigov/data/LICENSE.wordnet"
    sides: dict[str, set[tuple[int, int]]] = {}
    for i, (high, low) in enumerate(table["scales"]):
        assert high and low and not set(high) & set(low)
        for sign, words in ((1, high), (-1, low)):
            for w in words:
                sides.setdefault(w, set()).add((i, sign))

    def opposite(a: str, b: str) -> bool:
        return any((i, -sign) in sides.get(b, ()) for i, sign in sides.get(a, ()))

    for a, b in (("polite", "rude"), ("beautiful", "ugly"), ("optimistic", "pessimistic"), ("safe", "dangerous"),
                 ("formal", "informal")):
        assert opposite(a, b), (a, b)
    for a, b in (("big", "large"), ("polite", "courteous"), ("happy", "glad")):
        assert not opposite(a, b), (a, b)
