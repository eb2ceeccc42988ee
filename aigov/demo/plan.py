"""The demo's replay plan and router config, drawn from CLINC150 (read at run time, never copied).

Requests come from the validation split, labelled with intent and domain, so the report can judge
the plugins against the labels:

- first       a query the consumer has not asked yet (a cache miss is right)
- repeat      the exact text of one of the consumer's earlier queries (an exact hit is right)
- paraphrase  another utterance of the same intent (a semantic hit is right)
- near_miss   an utterance of ANOTHER intent of the same domain (a hit would be a false hit)
- oos         an out-of-scope query (the router should take the default route)

Paraphrases and near misses are the candidates with the highest word overlap with the earlier
query, so near misses are hard (they share most words) and paraphrases are the ones a person
would call "the same question". The router's routes are the CLINC150 domains, trained on
utterances of the train split (disjoint from validation), plus a "general" default route.
Everything is seeded: the same seed gives the same plan.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

DATA_ENV = "AIGOV_DATA_DIR"
DEFAULT_ROUTE = "general"
# Routes whose prompts go to the expensive model: money questions get the stronger model.
PREMIUM_DOMAINS = ("banking", "credit_cards")
PREMIUM_MODEL = "gpt-4o"
ECONOMY_MODEL = "gpt-4o-mini"
CONSUMER_SHARES = (("alice", 0.4), ("bob", 0.35), ("carol", 0.25))
KIND_WEIGHTS = (("first", 0.34), ("repeat", 0.18), ("paraphrase", 0.2), ("near_miss", 0.16), ("oos", 0.12))
STREAM_SHARE = 0.25
AI_PROXY_SHARE = 0.15  # share of first/oos queries sent to the ai-proxy route (repeats follow them)
MAX_TOKENS = 128       # constant: max_tokens is part of the cache's hard scope

CHAT_PATH = "/v1/chat/completions"
AI_PROXY_PATH = "/ai-proxy/chat"


class DataError(RuntimeError):
    """The CLINC150 files are missing or malformed."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    text: str
    intent: str
    domain: str

    @property
    def in_scope(self) -> bool:
        return self.intent != "oos"


@dataclasses.dataclass(frozen=True)
class PlannedRequest:
    """One chat-completion request of the replay."""
    index: int            # position in the whole plan
    seq: int              # position in this consumer's sequence (requests of a consumer run in order)
    consumer: str
    path: str
    text: str
    intent: str
    domain: str
    kind: str
    of_index: int | None  # the earlier request this one repeats / paraphrases / nears
    stream: bool

    @property
    def expected_route(self) -> str:
        return expected_route(self.domain)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": ECONOMY_MODEL, "max_tokens": MAX_TOKENS,
                                "messages": [{"role": "user", "content": self.text}]}
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body


def expected_route(domain: str) -> str:
    return DEFAULT_ROUTE if domain == "oos" else domain


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """CLINC150's directory: the argument, $AIGOV_DATA_DIR/clinc150, or ../shared/data/clinc150."""
    if explicit:
        base = Path(explicit)
    elif os.environ.get(DATA_ENV):
        base = Path(os.environ[DATA_ENV])
    else:
        base = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    candidate = base if (base / "validation.jsonl").is_file() else base / "clinc150"
    if not (candidate / "validation.jsonl").is_file() or not (candidate / "train.jsonl").is_file():
        raise DataError(f"CLINC150 not found under {base} (expected validation.jsonl and train.jsonl); "
                        f"set {DATA_ENV} or --data-dir to the directory that holds clinc150/")
    return candidate


def load_split(directory: Path, split: str) -> list[Utterance]:
    path = directory / f"{split}.jsonl"
    rows: list[Utterance] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append(Utterance(str(row["text"]), str(row["intent"]), str(row["domain"])))
            except (ValueError, KeyError) as exc:
                raise DataError(f"{path}:{lineno}: not a CLINC150 row ({exc})") from None
    if not rows:
        raise DataError(f"{path} is empty")
    return rows


_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def _overlap(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / (len(wa | wb) or 1)


def _closest(text: str, candidates: Iterable[Utterance]) -> Utterance | None:
    best, best_score = None, -1.0
    for c in candidates:
        if c.text == text:
            continue
        score = _overlap(text, c.text)
        if score > best_score:  # first of equal scores wins: the candidates' order is seeded
            best, best_score = c, score
    return best


def build_plan(requests: int, seed: int, rows: list[Utterance]) -> list[PlannedRequest]:
    """A seeded plan of `requests` requests over the consumers (see the module doc)."""
    if requests < 1:
        raise ValueError("requests must be at least 1")
    rng = random.Random(seed)
    in_scope = [r for r in rows if r.in_scope]
    oos = [r for r in rows if not r.in_scope]
    by_intent: dict[str, list[Utterance]] = defaultdict(list)
    by_domain: dict[str, list[Utterance]] = defaultdict(list)
    for r in in_scope:
        by_intent[r.intent].append(r)
        by_domain[r.domain].append(r)
    for group in (*by_intent.values(), *by_domain.values()):
        rng.shuffle(group)
    fresh = list(in_scope)
    rng.shuffle(fresh)
    oos_pool = list(oos)
    rng.shuffle(oos_pool)
    kinds, kind_w = zip(*KIND_WEIGHTS)
    names, name_w = zip(*CONSUMER_SHARES)

    plan: list[PlannedRequest] = []
    asked: dict[str, list[PlannedRequest]] = defaultdict(list)   # in-scope originals per consumer
    seqs: dict[str, int] = defaultdict(int)
    said: dict[tuple[str, str, str], PlannedRequest] = {}  # first request of each text per consumer and path
    for index in range(requests):
        consumer = rng.choices(names, name_w)[0]
        kind = rng.choices(kinds, kind_w)[0]
        earlier = asked[consumer]
        if kind in ("repeat", "paraphrase", "near_miss") and not earlier:
            kind = "first"
        of: PlannedRequest | None = None
        utt: Utterance | None = None
        if kind == "repeat":
            of = rng.choice(earlier)
            utt = Utterance(of.text, of.intent, of.domain)
        elif kind == "paraphrase":
            of = rng.choice(earlier)
            utt = _closest(of.text, by_intent[of.intent])
        elif kind == "near_miss":
            of = rng.choice(earlier)
            utt = _closest(of.text, (u for u in by_domain[of.domain] if u.intent != of.intent))
        elif kind == "oos" and oos_pool:
            utt = oos_pool.pop()
        if utt is None:  # "first", or nothing left of the chosen kind
            kind = "first"
            utt = fresh.pop() if fresh else rng.choice(in_scope)
        if of is not None:
            path = of.path
        else:
            path = AI_PROXY_PATH if rng.random() < AI_PROXY_SHARE else CHAT_PATH
        same_text = said.get((consumer, path, utt.text))
        if same_text is not None and kind != "repeat":
            # e.g. the same near miss drawn twice: the second one is honestly a repeat
            kind, of = "repeat", same_text
        stream_draw = rng.random() < STREAM_SHARE
        req = PlannedRequest(index=index, seq=seqs[consumer], consumer=consumer, path=path, text=utt.text,
                             intent=utt.intent, domain=utt.domain, kind=kind,
                             of_index=of.index if of is not None else None,
                             # the same request again, worded differently: only the text varies
                             stream=of.stream if of is not None else stream_draw)
        seqs[consumer] += 1
        plan.append(req)
        said.setdefault((consumer, path, req.text), req)
        if kind == "first":
            earlier.append(req)
    return plan


def router_routes(train: list[Utterance], seed: int, per_intent: int = 4, general: int = 40,
                  premium_model: str = PREMIUM_MODEL, economy_model: str = ECONOMY_MODEL
                  ) -> list[dict[str, Any]]:
    """llm-semantic-router routes: one per CLINC150 domain (per_intent utterances of each of its
    intents, from train) and the "general" default route (out-of-scope train utterances)."""
    rng = random.Random(seed + 1)
    by_domain_intent: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    oos: list[str] = []
    for r in train:
        if r.in_scope:
            by_domain_intent[r.domain][r.intent].append(r.text)
        else:
            oos.append(r.text)
    routes = []
    for domain in sorted(by_domain_intent):
        utterances: list[str] = []
        for intent in sorted(by_domain_intent[domain]):
            texts = list(by_domain_intent[domain][intent])
            rng.shuffle(texts)
            utterances.extend(texts[:per_intent])
        model = premium_model if domain in PREMIUM_DOMAINS else economy_model
        routes.append({"name": domain, "utterances": utterances, "target": {"model": model}})
    rng.shuffle(oos)
    if not oos:
        raise DataError("the train split has no out-of-scope rows for the general route")
    routes.append({"name": DEFAULT_ROUTE, "utterances": oos[:general], "target": {"model": economy_model}})
    return routes


def calibration_prompts(train: list[Utterance], count: int, seed: int) -> list[str]:
    """Distinct in-scope train utterances for the latency calibration (not in the replay)."""
    rng = random.Random(seed + 2)
    texts = sorted({r.text for r in train if r.in_scope})
    rng.shuffle(texts)
    return texts[:count]
