"""`aigov eval router`: in-scope accuracy and out-of-scope recall of the semantic router.

    aigov eval router --train TRAIN.jsonl --test TEST.jsonl [--per-route N] [--json] [--routes FILE]

Lines are `{"text": ..., "route": NAME-or-null}`; CLINC150's own format (`{"text", "intent"}` with
intent "oos" for out-of-scope) is accepted as is. In train, null lines are negatives; in test, null
means "should go to the default route". Routes are built from the train utterances (at most N per
route, first come first kept) through the plugin's own code (aigov.routing.core.Router), or taken
from a real plugin config with --routes (a JSON/YAML file holding the plugin's `config`, or a
kong.yml whose first llm-semantic-router plugin is used).

in_scope_accuracy = share of in-scope test lines routed to their route (a correct route above the
threshold); oos_recall = share of out-of-scope lines sent to the default. p50_ms is the decision
latency of one prompt through the plugin path (embed + score), measured on a sample.

Issue 5 measurements (all-MiniLM-L6-v2, CLINC150: routes from the train utterances - the first N
per intent, as --per-route keeps them - with the 100 train "oos" lines as negatives; validation
scored: 3,000 in-scope lines and only 100 out-of-scope ones, so one OOS query is 1 point of
recall and +-3 points is one standard error at 90%).

Round 3 (current): a deep-nearest-neighbour term (Sun et al. 2022) in the confidence: + w x
the raw cosine of the prompt to its k-th nearest utterance over ALL routes, k = n / 10 and
w = n / (n + 30) for n utterances per route (k=10, w=0.77 at 100; k=1, w=0.25 at 10); the
per-route offsets are fitted on the confidence without the term. "Curve" = in-scope accuracy at
88 / 90 / 92% out-of-scope recall with the threshold picked on validation itself (the score's
quality, independent of any threshold; not a product figure). "Calibrated" = the product's own
train-only threshold, calibration seeds 0 / 1 / 2 (acc/recall).

    variant                                 curve@100 (88/90/92)  curve@10 (88/90/92)
    round 2 confidence (conf)               94.67 94.43 94.43     84.13 83.03 82.07
    kNN alone, raw, k=10 (@10: k=1)         91.73 91.10 90.17     82.17 80.53 79.47
    kNN alone, centred space                90.93 89.93 88.57     80.47 79.47 79.17
    conf + 1.0 kNN (centred space)          94.97 94.63 93.73       -
    conf + 1.0 kNN, offsets refitted with   94.63 94.47 93.97     83.87 83.27 82.90
    conf + 1.0 kNN, offsets without it      95.03 94.87 94.67     84.10 83.53 82.63
    SHIPPED: conf + n/(n+30) kNN            95.10 94.83 94.63     84.17 82.97 82.70
    same, mean of the k nearest, not k-th   95.07 94.80 94.43     84.17 82.97 82.70
    rank average of conf and kNN            94.53 94.30 94.07     84.07 82.70 81.70
    conf + 0.1 kNN vote (k=10; @10: k=5)    94.53 94.03 93.53     84.30 83.03 80.93
    fold ensemble of heads (4 averaged)     94.87 94.07 93.77     83.93 83.33 81.87
    conf + (kNN - route's own held-out kNN) 94.03 93.87 93.70     83.23 81.83 81.03

    calibrated (seeds 0 / 1 / 2)            @100                        @10
    round 2 (no kNN term)                   94.60/89 94.80/85 94.67/89  85.10/86 84.87/86 85.00/86
    + 1.0 kNN, offsets refitted with it     94.47/89 94.97/86 94.60/86  85.43/81 84.50/85 85.07/85
    + 0.5 kNN, offsets refitted with it     94.70/89 94.97/86 94.97/87  85.53/83 84.87/85 85.30/85
    + 1.0 kNN, offsets without it           94.47/93 94.50/92 94.57/92  85.33/81 84.90/85 84.97/85
    + 1.25 kNN                              94.20/94 94.20/93 94.20/93    -
    + 1.0 kNN, k=5                          94.70/90 94.73/90 94.67/89    -
    + 1.0 kNN, k=20                         94.53/92 94.60/90 94.53/90    -
    + 0.1 / 0.357 kNN @10                     -                         85.20/85 84.90/86 85.03/86
                                                                        85.33/84 85.03/86 85.23/85
    SHIPPED: + n/(n+30) kNN (0.77 / 0.25)   94.57/92 94.60/90 94.57/92  85.23/85 85.13/86 85.27/86

The shipped model meets both targets at all three seeds (round 2 missed 90% recall at 100/route
at every seed). `aigov eval router` (seed 0): 94.57% / 92.0% at 100 per route, 85.23% / 85.0%
at 10. OOF in-scope 95.80% / 92.33%; heldout path 94.20/91.9 at 100 (round 2: 94.20/91.1),
81.43/90.7 at 10 (81.63/89.7); `calibrate --heldout` on all of validation (in-sample) 94.73/90.0
and 82.83/90.0. The 10/route margin is still nil: seed 0's recall is exactly 85 of 100. Likely
why the threshold carries over better: the term does not depend on the negatives (the p_none
term does, and 100 train negatives are a small sample of "off-topic"), and it flattens the
curve's high-recall end (94.43% at 93% recall vs 93.70%), so a threshold that lands a few points
of recall high costs little. At full weight with ~10 utterances per route the 1st neighbour is a
noisy density estimate and cost recall, hence the weight n / (n + 30). Between the sizes it is a
wash, not a gain: 30/route 91.37/86 91.23/88 91.40/87 (round 2: 90.73/88 90.57/88 90.73/87),
50/route 92.00/93 91.77/93 91.97/92 (92.37/91 92.07/91 91.53/92). Cost: +0.5-0.8 ms per
decision at 150 x 100 (one partition of the query's cosines, computed from the centred grid
already there: no second copy of the utterances), fit time unchanged (~7.5 s, one core).
target_oos_recall 0.92 (seed 0): 92.90% / 95% at 100 per route, 84.83% / 87% at 10.

Round 2. Every figure is at the threshold the product fits itself (train data only,
target_oos_recall 0.9); "OOF" is that calibration's own out-of-fold in-scope accuracy (held-out
train utterances, 3 folds); "heldout" is the `calibrate --heldout` path done honestly (threshold
fitted on one half of validation, scored on the other, swapped, averaged). Weights, confidence
and calibration scheme were chosen on validation; the threshold never was.

    variant                                        OOF@100 OOF@10 | val@100 acc/rec  val@10 acc/rec | heldout@100  heldout@10
    round 1: sim + 0.3p, negatives fold-scored      95.69  91.87  |  94.33 / 88.0    84.77 / 82.0   | 92.70/90.8   81.06/89.7
    negatives scored by the final model (A)         94.84  91.40  |  93.40 / 91.0    84.40 / 86.0   | 92.70/90.8   81.06/89.7
    A + confidence - 0.3 p_none (B)                 94.85  91.73  |  93.43 / 92.0    85.13 / 85.0   | 93.13/91.7   81.23/90.7
    SHIPPED: B - per-route offset, shrink n/(n+50)  96.09  91.93  |  94.60 / 89.0    85.10 / 86.0   | 94.20/91.1   81.63/89.7
    B - per-route offset, shrink n/(n+10)           96.03  92.33  |  94.60 / 89.0    85.27 / 80.0   | 94.37/90.2   81.49/90.7
    B - per-route offset, no shrinkage              95.94  92.40  |  94.40 / 90.0    84.07 / 76.0   | 94.37/90.2   75.53/90.7
    - p_none, negatives fold-scored                 96.00  92.20  |  94.90 / 87.0    85.47 / 81.0   | 93.13/91.7   81.23/90.7
    - p_none, fold head + all-utterance sim         95.78  91.47  |  94.53 / 89.0    84.87 / 85.0   |    -            -
    A, energy (logsumexp of logits) as confidence   93.46  90.13  |  91.40 / 93.0    83.37 / 82.0   | 92.83/88.7   79.40/92.0
    A, sim + 0.05 logit[route]                      94.49  89.40  |  92.90 / 92.0    83.33 / 85.0   | 92.36/91.9   80.33/91.9
    sim + 0.3p + 0.3 (sim top1 - top2), fold-scored 95.69  91.60  |  94.33 / 88.0    84.57 / 86.0   | 92.03/90.8   80.69/89.7
    B + mixup outliers (0.3 x n) as "none"          94.31  88.87  |  92.47 / 92.0    82.40 / 89.0   | 92.26/92.8   81.23/89.8
    B + mixup outliers (1 x n) as "none"            94.85  89.00  |  92.77 / 90.0    82.20 / 91.0   | 92.16/90.8   81.66/91.0
    B + 1000 Gaussian outliers as "none"            95.08  90.40  |  93.73 / 92.0    83.97 / 87.0   | 92.90/90.8   82.30/92.0
    B + 0.4 x Mahalanobis to the route mean         94.77  90.93  |  93.50 / 92.0    85.37 / 86.0   |    -            -

Ceilings: top-1 route accuracy (no out-of-scope decision) is 95.87% at 100 per route and 86.57%
at 10; with the threshold picked on validation itself (not a product figure) the shipped score
gives 94.43% at 90% recall (100/route; B: 94.10%) and 85.13% at 85% recall (10/route). So the
100/route target (94% at >= 90%) sits at this embedding's ceiling: the shipped model's own
threshold lands at 94.60% / 89% (one out-of-scope query short of 90%); B's lands at 93.43% / 92%.
The per-route offset is what moved the ceiling (+0.3 at equal recall, +1.1 on the heldout path)
at 100/route; with ~10 utterances per route its estimate is noise, hence the shrinkage.
Rejected as well: Mahalanobis or global-kNN distance alone as the out-of-scope score (ceiling 91-92% at 100/route, 78-83% at 10); an MLP head
(1,024 hidden, numpy) - top-1 +0.4 / +0.8 points but 30-300 s to fit on 2 cores; a head scale of
20-30 or l2 1e-3 (top-1 -0.5 to -1.5); similarity in the head's logit space (top-1 -1 to -2).
Scoring the held-out negatives by the final model is what made the threshold carry over: fold
models score lower than the final model (fewer utterances per route), so their 90% threshold let
12-18% of validation's out-of-scope queries through.

Round 1 ("CV" = acc at 90% OOS recall, cross-validated on train only):

    variant (CV: k=5 at 100; weights 5 / 0.3)  CV@100  CV@10  | val@100 acc/rec  val@10 acc/rec
    before: uncentred, top_k = n // 3          95.35  84.17  |  93.77 / 91.0    83.97 / 86.0
    centring only (top_k = n // 3)             95.83  84.34  |    -               -
    centring + top_k = min(5, n)               95.83  84.72  |  94.33 / 88.0    84.77 / 82.0
    + penalty 0.3 x nearest negative           ~96.3  85.34  |  94.63 / 87.0    85.80 / 80.0
    + look-alike negatives one fold              -      -    |  94.40 / 88.0    85.70 / 77.0
    whitening, shrinkage 0.2 / 0.5               -   79.5/81.7 |    -               -
    label smoothing 0.1                        95.46  81.62  |    -               -
    Mahalanobis, shared covariance (best)      91.47  82.70  |    -               -
    head scale 5, 10 epochs (2x training)      96.11  84.20  |    -               -
    calibrated at 95% OOS recall                 -      -    |  90.23 / 96.0    83.13 / 88.0
    before, calibrated at 95% OOS recall         -      -    |  91.53 / 95.0    82.37 / 91.0

The negative penalty won on CV only because held-out train negatives resemble the other train
negatives; validation out-of-scope queries are no closer to them than in-scope ones (median
nearest-negative cosine 0.26 for both), so it was not shipped.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

SAMPLE_LATENCY = 100  # prompts embedded one at a time to measure the request-path latency


class EvalInputError(ValueError):
    """An input file that cannot be read as labelled routing lines."""


def read_lines(path: str | Path) -> list[tuple[str, str | None]]:
    """(text, route-or-None) pairs from our format or CLINC150's."""
    out: list[tuple[str, str | None]] = []
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise EvalInputError(f"{path}: {exc.strerror}") from None
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise EvalInputError(f"{path}:{n}: not a JSON line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise EvalInputError(f"{path}:{n}: expected an object with a string 'text'")
            if "route" in row:
                route = row["route"]
            elif "intent" in row:  # CLINC150
                route = None if row["intent"] == "oos" else row["intent"]
            else:
                raise EvalInputError(f"{path}:{n}: needs 'route' (name or null) or CLINC150's 'intent'")
            if route is not None and not isinstance(route, str):
                raise EvalInputError(f"{path}:{n}: 'route' must be a string or null")
            out.append((row["text"], route))
    return out


def load_plugin_config(path: str | Path) -> dict[str, Any]:
    """A plugin config from a JSON/YAML file: the config itself, {"config": ...}, or a kong.yml."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise EvalInputError(f"{path}: {exc}") from None
    found = _find_router_config(doc)
    if found is None:
        raise EvalInputError(f"{path}: no llm-semantic-router config (routes + default_route) found")
    return found


def _find_router_config(doc: Any) -> dict[str, Any] | None:
    if isinstance(doc, dict):
        if "routes" in doc and "default_route" in doc:
            return doc
        if doc.get("name") == "llm-semantic-router" and isinstance(doc.get("config"), dict):
            return doc["config"]
        for v in doc.values():
            hit = _find_router_config(v)
            if hit is not None:
                return hit
    elif isinstance(doc, list):
        for v in doc:
            hit = _find_router_config(v)
            if hit is not None:
                return hit
    return None


def build_router(conf: dict[str, Any]) -> Any:
    from aigov.embeddings import embedder_from_config
    from aigov.plugins.semantic_router.schema import SCHEMA
    from aigov.routing.core import Router, settings_from_config
    from kongsim.metaschema import process_config

    # Kong's own processing (defaults, validation) so the config means what it means in Kong.
    processed = process_config(SCHEMA, conf, plugin="llm-semantic-router")
    settings = settings_from_config(processed)
    return Router(settings, embedder_from_config(processed.get("embeddings")))


def evaluate(router: Any, test: list[tuple[str, str | None]], latency_sample: int = SAMPLE_LATENCY,
             worst: int = 5) -> dict[str, Any]:
    """Score the test lines with the plugin's decision code; returns the report dict."""
    t0 = time.perf_counter()
    model, source = router.model(wait_s=3600)
    build_s = time.perf_counter() - t0
    texts = [t for t, _ in test]
    encode = getattr(router.embedder, "encode_direct", None) or router.embedder.embed
    vecs = np.asarray(encode(texts), dtype=np.float32) if texts else np.zeros((0, 1), np.float32)
    decisions = router.decide_vectors(model, vecs) if texts else []
    default_name = router.settings.default_route
    known = {r.name for r in router.settings.routes}
    in_total = in_ok = oos_total = oos_ok = 0
    confusion: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for (_, want), d in zip(test, decisions):
        matched = d.reason == "matched"
        got = d.route.name if (matched and d.route) else "(default)"
        if want is None or want not in known:
            oos_total += 1
            oos_ok += not matched
            if matched:
                confusion["(out-of-scope)"][got] += 1
        else:
            in_total += 1
            in_ok += got == want
            if got != want:
                confusion[want][got] += 1
    latencies = []
    for text in texts[:latency_sample]:
        t = time.perf_counter()
        router.decide_text(text)
        latencies.append((time.perf_counter() - t) * 1000.0)
    worst_rows = sorted(confusion.items(), key=lambda kv: -sum(kv[1].values()))[:worst]
    return {
        "in_scope_accuracy": round(in_ok / in_total, 4) if in_total else None,
        "oos_recall": round(oos_ok / oos_total, 4) if oos_total else None,
        "routes": len(router.settings.routes),
        "test_size": len(test),
        "in_scope_size": in_total,
        "oos_size": oos_total,
        "p50_ms": round(float(np.percentile(latencies, 50)), 2) if latencies else None,
        "p95_ms": round(float(np.percentile(latencies, 95)), 2) if latencies else None,
        "threshold": round(router.threshold(model), 4),
        "threshold_method": "configured" if router.configured_threshold is not None else model.calibration.method,
        "calibration": model.calibration.to_dict(),
        "default_route": default_name,
        "model_id": router.model_id,
        "model_source": source,
        "build_s": round(build_s, 2),
        "worst_routes": [{"route": name, "errors": sum(c.values()), "sent_to": dict(c.most_common(3))}
                         for name, c in worst_rows],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", help="labelled utterances (JSONL: text + route|null, or CLINC150)")
    parser.add_argument("--test", required=True, help="labelled test lines (null route = out of scope)")
    parser.add_argument("--per-route", type=int, default=None, help="keep at most N train utterances per route")
    parser.add_argument("--routes", help="evaluate this plugin config (JSON/YAML/kong.yml) instead of --train")
    parser.add_argument("--target-oos-recall", type=float, default=None,
                        help="thresholds.target_oos_recall for routes built from --train")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from aigov.routing.core import RouterConfigError, routes_from_pairs

    try:
        if args.routes:
            conf = load_plugin_config(args.routes)
        elif args.train:
            conf = routes_from_pairs(read_lines(args.train), args.per_route)
            if args.target_oos_recall is not None:
                conf["thresholds"] = {"target_oos_recall": args.target_oos_recall}
        else:
            print("aigov eval router: give --train or --routes", file=sys.stderr)
            return 2
        test = read_lines(args.test)
        router = build_router(conf)
        report = evaluate(router, test)
    except (EvalInputError, RouterConfigError) as exc:
        print(f"aigov eval router: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # kongsim ConfigError: the config Kong would reject
        print(f"aigov eval router: invalid plugin config: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return 0
    print(_format(report))
    return 0


def _format(r: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    lines = [
        f"routes: {r['routes']}  test lines: {r['test_size']} ({r['in_scope_size']} in scope, {r['oos_size']} out of scope)",
        f"in-scope accuracy: {pct(r['in_scope_accuracy'])}",
        f"out-of-scope recall: {pct(r['oos_recall'])}",
        f"threshold: {r['threshold']} ({r['threshold_method']}); embedding model {r['model_id']}",
        f"decision latency: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms; model {r['model_source']} in {r['build_s']} s",
    ]
    if r["worst_routes"]:
        lines.append("worst routes (true → sent to):")
        for row in r["worst_routes"]:
            sent = ", ".join(f"{k} x{v}" for k, v in row["sent_to"].items())
            lines.append(f"  {row['route']}: {row['errors']} errors → {sent}")
    return "\n".join(lines)
