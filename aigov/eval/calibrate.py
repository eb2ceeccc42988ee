"""`aigov calibrate router`: fit the out-of-scope threshold and print the trade-off.

    aigov calibrate router --train TRAIN.jsonl [--heldout HELDOUT.jsonl] [--per-route N]
                           [--routes FILE] [--target-oos-recall R] [--json]

Without negatives (null-route lines in --train / negative_utterances in --routes) and without a
held-out file that has out-of-scope lines, calibrating would only say "accept everything": the
command refuses. With --heldout the threshold is chosen on that file (the routes are trained on
--train); otherwise on out-of-fold scores of the training data (what the plugin does at start).

The output is the `thresholds` block and the `calibrated_for_model` value to paste into the
plugin config, with the in-scope accuracy / out-of-scope recall each candidate threshold costs.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from aigov.eval.router import EvalInputError, build_router, load_plugin_config, read_lines


class CalibrationRefused(ValueError):
    """Not enough data to calibrate an out-of-scope threshold."""


def calibrate(router: Any, heldout: list[tuple[str, str | None]] | None,
              target_oos_recall: float) -> dict[str, Any]:
    from aigov.routing.core import training_data
    from aigov.routing.model import _tradeoff, choose_threshold

    _, _, negatives = training_data(router.settings)
    heldout_oos = [t for t, r in heldout or [] if r is None]
    if not negatives and not heldout_oos:
        raise CalibrationRefused(
            "refusing to calibrate: no negatives (null-route lines / negative_utterances) and no "
            "held-out out-of-scope lines; without them any threshold is a guess")
    model, _ = router.model(wait_s=3600)
    if heldout:
        known = {r.name for r in router.settings.routes}
        texts = [t for t, _ in heldout]
        encode = getattr(router.embedder, "encode_direct", None) or router.embedder.embed
        vecs = np.asarray(encode(texts), dtype=np.float32)
        s = model.score(vecs)
        names = [router.settings.routes[i].name for i in s.route_index.tolist()]
        is_in = np.array([r is not None and r in known for _, r in heldout])
        correct = np.array([n == r for n, (_, r) in zip(names, heldout)])
        pos_conf, pos_ok, neg_conf = s.confidence[is_in], correct[is_in], s.confidence[~is_in]
        thr, method = choose_threshold(pos_conf, pos_ok, neg_conf, target_oos_recall)
        source = "heldout"
        tradeoff = _tradeoff(pos_conf, pos_ok, neg_conf)
        acc = float(np.mean(pos_ok & (pos_conf >= thr))) if len(pos_conf) else None
        rec = float(np.mean(neg_conf < thr)) if len(neg_conf) else None
    else:
        cal = model.calibration
        thr, method, source, tradeoff = cal.threshold, cal.method, "out-of-fold", cal.tradeoff
        acc, rec = cal.inscope_accuracy, cal.oos_recall
    return {
        "thresholds": {"min_confidence": round(float(thr), 4), "target_oos_recall": target_oos_recall},
        "calibrated_for_model": router.model_id,
        "method": method, "source": source,
        "inscope_accuracy": None if acc is None else round(acc, 4),
        "oos_recall": None if rec is None else round(rec, 4),
        "negatives": len(negatives), "heldout_lines": len(heldout or []),
        "tradeoff": tradeoff,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", help="labelled utterances (JSONL: text + route|null, or CLINC150)")
    parser.add_argument("--routes", help="a plugin config (JSON/YAML/kong.yml) instead of --train")
    parser.add_argument("--heldout", help="labelled held-out lines to choose the threshold on")
    parser.add_argument("--per-route", type=int, default=None, help="keep at most N train utterances per route")
    parser.add_argument("--target-oos-recall", type=float, default=0.9,
                        help="share of out-of-scope examples the threshold must reject (default 0.9)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from aigov.routing.core import RouterConfigError, routes_from_pairs

    if not 0.5 <= args.target_oos_recall <= 1.0:
        print("aigov calibrate router: --target-oos-recall must be between 0.5 and 1", file=sys.stderr)
        return 2
    try:
        if args.routes:
            conf: dict[str, Any] = load_plugin_config(args.routes)
        elif args.train:
            conf = routes_from_pairs(read_lines(args.train), args.per_route)
        else:
            print("aigov calibrate router: give --train or --routes", file=sys.stderr)
            return 2
        conf = dict(conf)
        conf["thresholds"] = {**(conf.get("thresholds") or {}), "min_confidence": None,
                              "target_oos_recall": args.target_oos_recall}
        conf.pop("calibrated_for_model", None)
        heldout = read_lines(args.heldout) if args.heldout else None
        router = build_router(conf)
        out = calibrate(router, heldout, args.target_oos_recall)
    except CalibrationRefused as exc:
        print(f"aigov calibrate router: {exc}", file=sys.stderr)
        return 3
    except (EvalInputError, RouterConfigError) as exc:
        print(f"aigov calibrate router: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"aigov calibrate router: invalid plugin config: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(f"threshold {out['thresholds']['min_confidence']} ({out['method']}, chosen on {out['source']} data); "
          f"in-scope accuracy {out['inscope_accuracy']}, out-of-scope recall {out['oos_recall']}")
    print("trade-off (threshold → in-scope accuracy / out-of-scope recall):")
    for row in out["tradeoff"]:
        print(f"  {row['threshold']:.4f} → {row['inscope_accuracy']} / {row.get('oos_recall', 'n/a')}")
    print("plugin config:")
    print(json.dumps({"thresholds": out["thresholds"], "calibrated_for_model": out["calibrated_for_model"]}, indent=2))
    return 0
