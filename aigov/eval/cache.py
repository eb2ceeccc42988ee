"""`aigov eval cache --pairs FILE.jsonl`: precision / recall of the semantic cache on labelled pairs.

Each line is {"a", "b", "same"} (STS-B's {"sentence1","sentence2","label"} and the GPTCache file's
{"text_a","text_b","label"} are read too; label null is skipped). `a` is stored as a cached prompt
with a fixed answer, `b` is looked up through the plugin's own code path: scope_for + exact_key
(aigov.cache.key), SemanticCache.lookup (exact layer, KNN in the store, threshold, verifier). Each
pair gets its own consumer scope so pairs cannot answer each other. Vectors are computed up front
with encode_direct batches (speed only: the lookup logic is the plugin's).
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from aigov.cache.core import DEFAULT_THRESHOLD, CacheSettings, SemanticCache
from aigov.cache.key import exact_key, scope_for
from aigov.request import parse_chat_request

ANSWER = {"id": "chatcmpl-eval", "object": "chat.completion", "created": 0, "model": "eval",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "cached answer"},
                       "finish_reason": "stop"}]}


def load_pairs(path: str | Path) -> list[tuple[str, str, bool]]:
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            d = json.loads(line)
            a = d.get("a", d.get("sentence1", d.get("text_a")))
            b = d.get("b", d.get("sentence2", d.get("text_b")))
            same = d.get("same", d.get("label"))
            if same is None:
                continue
            if not isinstance(a, str) or not isinstance(b, str):
                raise ValueError(f"{path}:{n}: a pair needs string fields a and b")
            pairs.append((a, b, bool(same)))
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", required=True, help="JSONL file of {a, b, same} pairs")
    parser.add_argument("--store", choices=["memory", "redis"], default="memory")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="for --store redis")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"cosine similarity in [0.5, 1] (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--no-verifier", action="store_true", help="measure cosine alone")
    parser.add_argument("--sweep", type=str, default=None,
                        help="comma-separated thresholds: print the trade-off table instead")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def evaluate(pairs: list[tuple[str, str, bool]], settings: CacheSettings,
             thresholds: list[float] | None = None) -> list[dict[str, Any]]:
    """Store every `a`, look up every `b` at each threshold; one result dict per threshold."""
    cache = SemanticCache(settings)
    embedder = cache.embedder
    encode = getattr(embedder, "encode_direct", embedder.embed)
    vec_a = encode([a for a, _, _ in pairs])
    vec_b = encode([b for _, b, _ in pairs])
    scopes, keys_b = [], []
    for i, (a, b, _) in enumerate(pairs):
        req_a = parse_chat_request(json.dumps({"model": "eval", "messages": [{"role": "user", "content": a}]}))
        req_b = parse_chat_request(json.dumps({"model": "eval", "messages": [{"role": "user", "content": b}]}))
        scope = scope_for(req_a, namespace=settings.namespace, consumer_id=f"pair-{i}", route_id="eval")
        scope_b = scope_for(req_b, namespace=settings.namespace, consumer_id=f"pair-{i}", route_id="eval")
        cache.save(scope, exact_key(scope, req_a.prompt_text()), req_a.prompt_text(), vec_a[i], ANSWER, None, "eval")
        scopes.append(scope_b)
        keys_b.append(exact_key(scope_b, req_b.prompt_text()))
    results = []
    try:
        for t in thresholds or [settings.threshold]:
            cache.settings.threshold = t
            hits = true_hits = 0
            for i, (_, b, same) in enumerate(pairs):
                found = cache.lookup(scopes[i], b, keys_b[i], vec_b[i])
                if found.status == "Hit":
                    hits += 1
                    true_hits += same
            positives = sum(1 for p in pairs if p[2])
            negatives = len(pairs) - positives
            results.append({
                "threshold": t, "pairs": len(pairs), "positives": positives, "negatives": negatives,
                "hits": hits, "false_hits": hits - true_hits,
                "precision": round(true_hits / hits, 4) if hits else 1.0,
                "recall": round(true_hits / positives, 4) if positives else 0.0,
                "false_hit_rate": round((hits - true_hits) / negatives, 4) if negatives else 0.0,
                "store": settings.strategy, "verifier": settings.verifier,
            })
    finally:
        if settings.strategy == "redis" or settings.namespace.startswith("eval-"):
            cache.store.purge()
    return results


def run(args: argparse.Namespace) -> int:
    try:
        pairs = load_pairs(args.pairs)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not pairs:
        print("error: no labelled pairs in the file", file=sys.stderr)
        return 2
    thresholds = [float(x) for x in args.sweep.split(",")] if args.sweep else [args.threshold]
    conf: dict[str, Any] = {"vectordb": {"strategy": args.store, "threshold": thresholds[0],
                                         "namespace": "eval-" + uuid.uuid4().hex[:8],
                                         "max_entries": max(10000, 2 * len(pairs)),
                                         "redis": {"url": args.redis_url, "timeout_ms": 2000}},
                            "verifier": not args.no_verifier, "cache_ttl": 3600}
    from aigov.cache.core import CacheConfigError

    try:
        settings = CacheSettings.from_config(conf)
        for t in thresholds:
            CacheSettings.from_config({**conf, "vectordb": {**conf["vectordb"], "threshold": t}})
    except CacheConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = evaluate(pairs, settings, thresholds)
    if args.json and not args.sweep:
        r = results[0]
        print(json.dumps({k: r[k] for k in ("precision", "recall", "false_hit_rate", "threshold", "pairs",
                                            "hits", "false_hits", "store", "verifier")}))
        return 0
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{'threshold':>9} {'hits':>5} {'false':>5} {'precision':>9} {'recall':>7} {'false_hit_rate':>14}")
    for r in results:
        print(f"{r['threshold']:>9.3f} {r['hits']:>5} {r['false_hits']:>5} {r['precision']:>9.4f} "
              f"{r['recall']:>7.4f} {r['false_hit_rate']:>14.4f}")
    print(f"pairs={results[0]['pairs']} positives={results[0]['positives']} store={settings.strategy} "
          f"verifier={'on' if settings.verifier else 'off'}")
    return 0
