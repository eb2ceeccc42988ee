"""The demo report: figures from the per-request results, as text (one screen), JSON and PNG.

`summarize` works only from what the client saw (status codes, response headers, bodies) and the
plan's labels; the cross-checks against the plugin server's Prometheus metrics and the mock
LLM's counters are added by the runner under "checks".
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from aigov.prices import default_prices

KINDS = ("first", "repeat", "paraphrase", "near_miss", "oos")


def quantile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated quantile (numpy's default method); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def saved_cost_usd(model: str | None, prompt_tokens: int, completion_tokens: int) -> float:
    """What the provider would have billed for a cached answer (the shipped price table)."""
    price = default_prices().lookup(model) if model else None
    if price is None:
        return 0.0
    return price.cost_nano(prompt_tokens, completion_tokens) / 1e9


def summarize(results: Sequence[Mapping[str, Any]], latency: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report's figures from the per-request results (see runner.RequestResult.as_dict)."""
    total = len(results)
    by_status = Counter(str(r["status"]) for r in results)
    through_cache = [r for r in results if r.get("cache_status")]
    hits = [r for r in through_cache if r["cache_status"] == "Hit"]
    exact = [r for r in hits if r.get("cache_layer") == "exact"]
    semantic = [r for r in hits if r.get("cache_layer") == "semantic"]
    by_index = {r["index"]: r for r in results}
    false_hits = []
    unattributed = 0
    for r in hits:
        source = by_index.get(r.get("hit_of")) if r.get("hit_of") is not None else None
        if source is None:
            unattributed += 1
        elif source["intent"] != r["intent"]:
            false_hits.append({"index": r["index"], "consumer": r["consumer"], "query": r["text"],
                               "query_intent": r["intent"], "cached_prompt": source["text"],
                               "cached_intent": source["intent"], "layer": r.get("cache_layer"),
                               "similarity": r.get("similarity")})

    by_kind: dict[str, dict[str, int]] = {}
    for kind in KINDS:
        rows = [r for r in through_cache if r["kind"] == kind]
        by_kind[kind] = {"requests": len(rows),
                         "exact_hits": sum(1 for r in rows if r["cache_status"] == "Hit" and r.get("cache_layer") == "exact"),
                         "semantic_hits": sum(1 for r in rows if r["cache_status"] == "Hit" and r.get("cache_layer") == "semantic"),
                         "misses": sum(1 for r in rows if r["cache_status"] != "Hit")}

    consumers: dict[str, dict[str, Any]] = {}
    for name in sorted({r["consumer"] for r in results}):
        rows = [r for r in results if r["consumer"] == name]
        spent_p = sum(int(r.get("spent_prompt_tokens") or 0) for r in rows)
        spent_c = sum(int(r.get("spent_completion_tokens") or 0) for r in rows)
        saved_p = sum(int(r.get("saved_prompt_tokens") or 0) for r in rows)
        saved_c = sum(int(r.get("saved_completion_tokens") or 0) for r in rows)
        rejected = [r for r in rows if r["status"] == 429]
        first = min(rejected, key=lambda r: r["seq"]) if rejected else None
        consumers[name] = {
            "requests": len(rows),
            "served": sum(1 for r in rows if r["status"] == 200),
            "cache_hits": sum(1 for r in rows if r.get("cache_status") == "Hit"),
            "spent": {"prompt_tokens": spent_p, "completion_tokens": spent_c, "total_tokens": spent_p + spent_c,
                      "cost_usd": round(sum(float(r.get("spent_cost_usd") or 0) for r in rows), 9)},
            "saved": {"prompt_tokens": saved_p, "completion_tokens": saved_c, "total_tokens": saved_p + saved_c,
                      "cost_usd": round(sum(float(r.get("saved_cost_usd") or 0) for r in rows), 9)},
            "quota": {"rejections": len(rejected),
                      # The first 429: a cost budget refuses the dearer model's reservations
                      # first, so cheaper requests may still be served after it.
                      "first_rejection": None if first is None else {
                          "request_of_consumer": first["seq"] + 1, "after_s": _r(first.get("t_s")),
                          "message": first.get("error")}},
        }

    routed = [r for r in results if r.get("route")]
    routes: dict[str, dict[str, Any]] = {}
    for name in sorted({r["route"] for r in routed} | {r["expected_route"] for r in routed}):
        decided = [r for r in routed if r["route"] == name]
        expected = [r for r in routed if r["expected_route"] == name]
        routes[name] = {
            "decisions": len(decided),
            "reasons": dict(Counter(r.get("route_reason") or "" for r in decided)),
            "models": dict(Counter(r.get("upstream_model") or "" for r in decided if r.get("upstream_model"))),
            "expected": len(expected),
            "correct": sum(1 for r in expected if r["route"] == name),
            "precision": _r(sum(1 for r in decided if r["expected_route"] == name) / len(decided), 4) if decided else None,
            "recall": _r(sum(1 for r in expected if r["route"] == name) / len(expected), 4) if expected else None,
        }
    correct = sum(1 for r in routed if r["route"] == r["expected_route"])
    in_scope = [r for r in routed if r["domain"] != "oos"]
    oos = [r for r in routed if r["domain"] == "oos"]

    debugged = [r["plugin_ms"] for r in results if isinstance(r.get("plugin_ms"), dict)]
    if debugged:
        names = sorted({n for d in debugged for n in d})
        added = {"method": "X-Kong-Request-Debug (Kong's request debugging), integer ms per request",
                 "samples": len(debugged), "plugins": {}}
        for name in names:
            ms = [float(d[name]) for d in debugged if name in d]
            added["plugins"][name] = {"p50_ms": _r(quantile(ms, 0.5)), "p95_ms": _r(quantile(ms, 0.95)), "n": len(ms)}
        added_latency: dict[str, Any] = {**added, "calibration": dict(latency or {})} if latency else added
    else:
        added_latency = dict(latency or {})
    e2e: dict[str, Any] = {}
    for status in ("Hit", "Miss"):
        ms = [float(r["elapsed_ms"]) for r in results if r.get("cache_status") == status and r["status"] == 200]
        e2e[status.lower()] = {"n": len(ms), "p50_ms": _r(quantile(ms, 0.5)), "p95_ms": _r(quantile(ms, 0.95))}

    return {
        "requests": {"total": total, "by_status": dict(sorted(by_status.items())),
                     "by_kind": dict(Counter(r["kind"] for r in results)),
                     "streamed": sum(1 for r in results if r.get("stream")),
                     "by_path": dict(Counter(r["path"] for r in results))},
        "cache": {
            "looked_up": len(through_cache),
            "hits": len(hits), "exact_hits": len(exact), "semantic_hits": len(semantic),
            "misses": sum(1 for r in through_cache if r["cache_status"] == "Miss"),
            "other": dict(Counter(r["cache_status"] for r in through_cache if r["cache_status"] not in ("Hit", "Miss"))),
            "hit_rate": _r(len(hits) / len(through_cache), 4) if through_cache else None,
            "exact_hit_rate": _r(len(exact) / len(through_cache), 4) if through_cache else None,
            "semantic_hit_rate": _r(len(semantic) / len(through_cache), 4) if through_cache else None,
            "false_hits": len(false_hits), "false_hit_examples": false_hits[:5],
            "unattributed_hits": unattributed,
            "by_kind": by_kind,
        },
        "consumers": consumers,
        "totals": {
            "spent_tokens": sum(c["spent"]["total_tokens"] for c in consumers.values()),
            "saved_tokens": sum(c["saved"]["total_tokens"] for c in consumers.values()),
            "spent_usd": round(sum(c["spent"]["cost_usd"] for c in consumers.values()), 9),
            "saved_usd": round(sum(c["saved"]["cost_usd"] for c in consumers.values()), 9),
            "served_usage_tokens": sum(int(r.get("usage_total_tokens") or 0) for r in results if r["status"] == 200),
        },
        "routing": {"decisions": len(routed), "accuracy": _r(correct / len(routed), 4) if routed else None,
                    "in_scope_accuracy": _r(sum(1 for r in in_scope if r["route"] == r["expected_route"]) / len(in_scope), 4)
                    if in_scope else None,
                    "oos_to_default": _r(sum(1 for r in oos if r["route"] == r["expected_route"]) / len(oos), 4)
                    if oos else None,
                    "routes": routes},
        "latency": {"end_to_end": e2e, "added_per_plugin": added_latency},
    }


# --------------------------------------------------------------------------- text

def _usd(x: float) -> str:
    return f"${x:.4f}" if x < 1 else f"${x:.2f}"


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}%"


def render_text(report: Mapping[str, Any]) -> str:
    """The one-screen summary printed at the end of the demo."""
    s = report["summary"]
    meta = report.get("meta", {})
    req, cache, routing = s["requests"], s["cache"], s["routing"]
    out: list[str] = []
    out.append(f"aigov demo  seed={meta.get('seed')}  store={meta.get('store')}  provider={meta.get('provider')}  "
               f"{meta.get('duration_s', 0):.0f}s")
    out.append(f"requests  {req['total']} ({req['streamed']} streamed)  status {req['by_status']}  kinds {req['by_kind']}")
    out.append(f"cache     hit rate {_pct(cache['hit_rate'])} = exact {_pct(cache['exact_hit_rate'])} + semantic "
               f"{_pct(cache['semantic_hit_rate'])} of {cache['looked_up']} lookups   false hits {cache['false_hits']}")
    bk = cache["by_kind"]
    out.append("          by kind (exact/semantic/of): " + "  ".join(
        f"{k} {v['exact_hits']}/{v['semantic_hits']}/{v['requests']}" for k, v in bk.items() if v["requests"]))
    out.append("consumer   served hits  spent tok      $spent  saved tok      $saved  429s  first 429")
    for name, c in s["consumers"].items():
        ran = c["quota"]["first_rejection"]
        ran_s = "-" if ran is None else f"at request {ran['request_of_consumer']} ({ran['after_s']}s)"
        out.append(f"{name:<10} {c['served']:>6} {c['cache_hits']:>4} {c['spent']['total_tokens']:>10} "
                   f"{_usd(c['spent']['cost_usd']):>11} {c['saved']['total_tokens']:>10} {_usd(c['saved']['cost_usd']):>11} "
                   f"{c['quota']['rejections']:>5}  {ran_s}")
    t = s["totals"]
    out.append(f"{'total':<10} {'':>6} {'':>4} {t['spent_tokens']:>10} {_usd(t['spent_usd']):>11} "
               f"{t['saved_tokens']:>10} {_usd(t['saved_usd']):>11}")
    out.append(f"routing   accuracy {_pct(routing['accuracy'])} (in scope {_pct(routing['in_scope_accuracy'])}, "
               f"out-of-scope to default {_pct(routing['oos_to_default'])}) over {routing['decisions']} decisions")
    cells = []
    for name, r in routing["routes"].items():
        model = ",".join(r["models"]) or "-"
        cells.append(f"{name} {r['decisions']} ({model}, recall {_pct(r['recall']).strip()})")
    for i in range(0, len(cells), 3):
        out.append("          " + "; ".join(cells[i:i + 3]))
    lat = s["latency"]
    added = lat["added_per_plugin"]
    if added.get("plugins"):
        out.append(f"latency   added per plugin, {added.get('samples')} requests ({added.get('method')}):")
        out.append("          " + "  ".join(f"{p} p50 {v['p50_ms']}ms p95 {v['p95_ms']}ms"
                                          for p, v in added["plugins"].items() if p.startswith("llm-")))
    else:
        out.append("latency   added per plugin: not measured (" + str(added.get("reason") or "disabled") + ")")
    e2e = lat["end_to_end"]
    def ms(v: Any) -> str:
        return "n/a" if v is None else f"{v}ms"

    out.append(f"          end to end: hit p50 {ms(e2e['hit']['p50_ms'])} p95 {ms(e2e['hit']['p95_ms'])}; "
               f"miss p50 {ms(e2e['miss']['p50_ms'])} p95 {ms(e2e['miss']['p95_ms'])}")
    checks = report.get("checks") or {}
    if checks:
        bad = [k for k, v in checks.items() if isinstance(v, dict) and v.get("ok") is False]
        out.append(f"checks    {len(checks) - len(bad)}/{len(checks)} agree with the plugin server's metrics and the "
                   f"upstream's counters" + (f"; MISMATCH: {', '.join(bad)}" if bad else ""))
    files = meta.get("files") or {}
    if files:
        out.append("written   " + "  ".join(str(v) for v in files.values()))
    return "\n".join(out)


# --------------------------------------------------------------------------- files

def write_json(report: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_png(report: Mapping[str, Any], path: Path) -> None:
    """Four panels: cache outcome by request kind, tokens per consumer, routing, plugin latency."""
    import matplotlib
    matplotlib.use("Agg")  # headless: no display on CI or servers
    import matplotlib.pyplot as plt

    s = report["summary"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    fig.suptitle(f"aigov demo: {s['requests']['total']} requests, cache hit rate "
                 f"{_pct(s['cache']['hit_rate']).strip()}, false hits {s['cache']['false_hits']}, "
                 f"routing accuracy {_pct(s['routing']['accuracy']).strip()}", fontsize=12)

    ax = axes[0][0]
    kinds = [k for k, v in s["cache"]["by_kind"].items() if v["requests"]]
    bk = s["cache"]["by_kind"]
    ex = [bk[k]["exact_hits"] for k in kinds]
    se = [bk[k]["semantic_hits"] for k in kinds]
    mi = [bk[k]["misses"] for k in kinds]
    ax.bar(kinds, ex, label="exact hit", color="#2b8cbe")
    ax.bar(kinds, se, bottom=ex, label="semantic hit", color="#7bccc4")
    ax.bar(kinds, mi, bottom=[a + b for a, b in zip(ex, se)], label="miss / bypass", color="#d9d9d9")
    ax.set_title("Cache outcome by request kind (near_miss hits are false hits)")
    ax.set_ylabel("requests")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    names = list(s["consumers"])
    spent = [s["consumers"][n]["spent"]["total_tokens"] for n in names]
    saved = [s["consumers"][n]["saved"]["total_tokens"] for n in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], spent, width=0.4, label="tokens spent", color="#e6550d")
    ax.bar([x + 0.2 for x in xs], saved, width=0.4, label="tokens saved by the cache", color="#31a354")
    for x, n in zip(xs, names):
        c = s["consumers"][n]
        money = f"{_usd(c['spent']['cost_usd'])} / {_usd(c['saved']['cost_usd'])}".replace("$", r"\$")  # not mathtext
        ax.annotate(f"{money}\n429s: {c['quota']['rejections']}",
                    (x, max(spent[x], saved[x])), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names)
    ax.set_title(r"Tokens per consumer (\$ spent / \$ saved, quota rejections)")
    ax.legend(fontsize=8)
    ax.margins(y=0.25)

    ax = axes[1][0]
    routes = s["routing"]["routes"]
    rnames = list(routes)
    ax.barh(rnames, [routes[n]["expected"] for n in rnames], color="#d9d9d9", label="prompts of this domain")
    ax.barh(rnames, [routes[n]["correct"] for n in rnames], color="#756bb1", label="routed here correctly")
    ax.set_title("Routing against the CLINC150 domain labels")
    ax.legend(fontsize=8)
    ax.invert_yaxis()

    ax = axes[1][1]
    added = {p: v for p, v in (s["latency"]["added_per_plugin"].get("plugins") or {}).items()
             if p.startswith("llm-")}  # ours; bundled ones (key-auth, ai-proxy) take ~0 ms
    if added:
        pnames = list(added)
        p50 = [added[p]["p50_ms"] or 0 for p in pnames]
        p95 = [added[p]["p95_ms"] or 0 for p in pnames]
        xs2 = range(len(pnames))
        ax.bar([x - 0.2 for x in xs2], p50, width=0.4, label="p50", color="#3182bd")
        ax.bar([x + 0.2 for x in xs2], p95, width=0.4, label="p95", color="#9ecae1")
        ax.set_xticks(list(xs2), [p.removeprefix("llm-") for p in pnames])
        ax.set_ylabel("ms added")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "latency calibration disabled", ha="center", va="center")
    ax.set_title("Latency added per plugin (ms)")

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def latency_from_samples(overheads: Mapping[str, Iterable[float]], baseline: str = "none") -> dict[str, Any]:
    """Added latency per plugin: its route's gateway overhead minus the bare route's median."""
    base = list(overheads.get(baseline) or [])
    base_p50 = quantile(base, 0.5) or 0.0
    plugins: dict[str, Any] = {}
    for name, samples in overheads.items():
        if name == baseline:
            continue
        added = [max(0.0, v - base_p50) for v in samples]
        plugins[name] = {"p50_ms": _r(quantile(added, 0.5)), "p95_ms": _r(quantile(added, 0.95)), "n": len(added)}
    return {"baseline_p50_ms": _r(base_p50), "plugins": plugins}
