"""Section 4: against a peer (RedisVL 0.28+) and a nearest-neighbour baseline.

Cache: the same STS-B validation entries (sentence1 of every labelled pair) are stored in our
redis cache store and in RedisVL's SemanticCache, on the same Redis, with the same model (RedisVL
gets a custom vectorizer wrapping our embedder: its default one downloads from a model hub).
Each pair's sentence2 is then looked up (but for the few that are themselves a stored prompt:
exact repeats, see cache_entries_and_queries). A lookup is a correct hit when the pair is labelled
same-meaning and the entry returned is the pair's own sentence1; any other hit serves a wrong
answer. Precision/recall are swept over the similarity threshold and each system is reported at
its own best-F1 threshold (an oracle on this split, the same advantage for both) and at its
shipped default. Our lookup is also run with the verifier off on the same store: what the
verifier costs in recall and buys in precision, and which labelled-true pairs it refused.

Latency: the full lookup (embedding included) runs one system after the other with the shared
embedder's LRU emptied before each, so neither gets the other's embeddings; the lookup given the
query vector runs both on the same query back to back, alternating which goes first, over every
pair twice, so the shared machine's load falls on both alike.

Router: CLINC150 intents as routes, references from train, the out-of-scope threshold of the
RedisVL router and of a 1-nearest-neighbour baseline calibrated on held-out train rows (train's
oos rows + unused in-scope rows), our router trained by its own code; all scored on validation.
"""
from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from aigov.bench.common import (BenchContext, SectionSkipped, Target, guard_part, latency_stats, ratio,
                                read_jsonl)

REDISVL_DEFAULT_DISTANCE = 0.1   # SemanticCache(distance_threshold=0.1): cosine distance
THRESHOLDS = np.round(np.arange(0.50, 0.991, 0.01), 2)
BOOTSTRAP_RESAMPLES = 2000


# ---------------------------------------------------------------- shared pieces
class VectorTable:
    """Text -> unit vector, computed once in bulk; unknown texts go through the embedder."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self._vectors: dict[str, np.ndarray] = {}

    def add(self, texts: list[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if todo:
            for text, vec in zip(todo, self.embedder.encode_direct(todo, batch_size=64)):
                self._vectors[text] = vec

    def __getitem__(self, text: str) -> np.ndarray:
        vec = self._vectors.get(text)
        if vec is None:
            vec = self.embedder.encode_direct([text])[0]
            self._vectors[text] = vec
        return vec


def redisvl_vectorizer(embed_one: Callable[[str], list[float]],
                       embed_many: Callable[[list[str]], list[list[float]]]) -> Any:
    try:
        from redisvl.utils.vectorize import CustomTextVectorizer
    except ImportError as exc:
        raise SectionSkipped(f"redisvl is not installed (pip install 'kong-ai-governance[bench]'): {exc}") from None
    return CustomTextVectorizer(embed=embed_one, embed_many=embed_many)


def sweep(top_sims: np.ndarray, correct_if_hit: np.ndarray, positives: int) -> list[dict[str, float]]:
    """Precision/recall/F1 of "hit when top-1 similarity >= t" for every threshold t."""
    rows = []
    for t in THRESHOLDS:
        hit = top_sims >= t
        tp = int(np.sum(hit & correct_if_hit))
        fp = int(np.sum(hit & ~correct_if_hit))
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / positives if positives else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"threshold": float(t), "precision": round(precision, 4),
                     "recall": round(recall, 4), "f1": round(f1, 4), "hits": int(hit.sum())})
    return rows


def best_row(rows: list[dict[str, float]]) -> dict[str, float]:
    return max(rows, key=lambda r: (r["f1"], r["precision"]))


def at_threshold(rows: list[dict[str, float]], threshold: float) -> dict[str, float]:
    return min(rows, key=lambda r: abs(r["threshold"] - threshold))


# ---------------------------------------------------------------- cache comparison
def stsb_pairs(ctx: BenchContext) -> list[dict[str, Any]]:
    rows = [r for r in read_jsonl(ctx.data_file("stsb", "validation.jsonl")) if r.get("label") in (0, 1)]
    if ctx.quick:
        rows = rows[:60]
    return rows


def score_cache(pairs: list[dict[str, Any]], entry_of: dict[str, int],
                results: list[tuple[int | None, float]]) -> dict[str, Any]:
    """`results[i]` = (entry id returned for pair i's query, its similarity), no threshold."""
    top_sims = np.array([sim if eid is not None else -1.0 for eid, sim in results])
    correct = np.array([p["label"] == 1 and eid == entry_of[p["sentence1"]]
                        for p, (eid, _) in zip(pairs, results)])
    positives = sum(1 for p in pairs if p["label"] == 1)
    rows = sweep(top_sims, correct, positives)
    return {"best": best_row(rows), "sweep": rows, "top_sims": top_sims, "correct": correct}


def paired_f1_bootstrap(a: dict[str, Any], b: dict[str, Any], labels: np.ndarray, seed: int,
                        resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, float]:
    """F1(a) - F1(b), each at its own best threshold, over pairs resampled with replacement
    (the same resample for both: a paired test). With ~90 positives one pair moves F1 by about
    0.01, so the interval says whether a difference of that size means anything."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    hit_a = (a["top_sims"] >= a["best"]["threshold"])
    hit_b = (b["top_sims"] >= b["best"]["threshold"])

    def f1(hit: np.ndarray, correct: np.ndarray, idx: np.ndarray) -> np.ndarray:
        tp = (hit & correct)[idx].sum(axis=1)
        fp = (hit & ~correct)[idx].sum(axis=1)
        pos = labels[idx].sum(axis=1)
        # F1 = 2tp / (2tp + fp + fn), fn = pos - tp; 0 when there is nothing to find or find
        denom = tp + fp + pos
        return np.divide(2 * tp, denom, out=np.zeros(len(idx)), where=denom > 0)

    idx = rng.integers(0, n, size=(resamples, n))
    f1_a, f1_b = f1(hit_a, a["correct"], idx), f1(hit_b, b["correct"], idx)
    diff = f1_a - f1_b
    lo, hi = np.percentile(diff, [2.5, 97.5])
    ratio_lo, ratio_hi = np.percentile(np.divide(f1_a, f1_b, out=np.zeros(len(idx)), where=f1_b > 0), [2.5, 97.5])
    point = a["best"]["f1"] - b["best"]["f1"]
    return {"f1_difference": round(float(point), 4), "ci95_low": round(float(lo), 4),
            "ci95_high": round(float(hi), 4), "ratio_ci95": [round(float(ratio_lo), 4), round(float(ratio_hi), 4)],
            "share_at_least_equal": round(float(np.mean(diff >= 0)), 3), "resamples": resamples, "pairs": n}


def paired_p50_ratio_interval(slower: list[float], faster: list[float], seed: int,
                              resamples: int = BOOTSTRAP_RESAMPLES) -> list[float]:
    """95% interval of p50(slower) / p50(faster) over paired timings (element i of both lists
    timed on the same query, back to back), resampled together."""
    a, b = np.asarray(slower, dtype=np.float64), np.asarray(faster, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def _forget_recent_embeddings(embedder: Any) -> None:
    """Empty the shared embedder's LRU of recent texts, so the system timed second does not get
    the first one's embeddings for free (both embed the same sentence2 texts)."""
    forget = getattr(embedder, "forget_recent", None)  # the OpenAI-compatible embedder has none
    if forget is not None:
        forget()


def _redisvl_hit(found: list[dict[str, Any]]) -> tuple[int | None, float]:
    if not found:
        return None, -1.0
    return int(found[0]["metadata"]["entry"]), 1.0 - float(found[0]["vector_distance"])


def _ours_hit(found: Any) -> tuple[int | None, float]:
    return (found.meta["entry"], found.similarity) if found else (None, -1.0)


class _RedisVLCache:
    """RedisVL's SemanticCache with the entries stored, checked at the loosest distance (the
    threshold is applied afterwards, in the sweep)."""

    def __init__(self, ctx: BenchContext, entries: list[str], table: VectorTable,
                 embed_request: Callable[[str], np.ndarray]) -> None:
        vectorizer = redisvl_vectorizer(lambda text, **_: embed_request(text).tolist(),
                                        lambda texts, **_: [embed_request(t).tolist() for t in texts])
        from redisvl.extensions.cache.llm import SemanticCache

        name = f"aigov_bench_rvl_{random.Random(ctx.seed).randrange(1 << 30)}"
        self.cache = SemanticCache(name=name, distance_threshold=REDISVL_DEFAULT_DISTANCE,
                                   vectorizer=vectorizer, redis_url=ctx.redis(), overwrite=True)
        for i, text in enumerate(entries):
            self.cache.store(prompt=text, response=f"answer-{i}", vector=table[text].tolist(),
                             metadata={"entry": i})

    def check_text(self, text: str) -> tuple[int | None, float]:
        return _redisvl_hit(self.cache.check(prompt=text, num_results=1, distance_threshold=2.0))

    def check_vector(self, vec: list[float]) -> tuple[int | None, float]:
        return _redisvl_hit(self.cache.check(vector=vec, num_results=1, distance_threshold=2.0))

    def close(self) -> None:
        self.cache.delete()


def _close_quietly(rvl: "_RedisVLCache | None") -> None:
    if rvl is not None:
        try:
            rvl.close()
        except Exception:  # noqa: BLE001 - cleanup of a bench index must not hide the result
            pass
    return None


def _drop_quietly(ours: Any) -> None:
    if ours is not None:
        try:
            ours.drop()
        except Exception:  # noqa: BLE001
            pass
    return None


def _text_lookups(pairs: list[dict[str, Any]], embedder: Any,
                  lookup: Callable[[str], tuple[int | None, float]]) -> tuple[list[Any], list[float]]:
    """Each pair's sentence2 looked up from its text (the embedding included), cold LRU."""
    _forget_recent_embeddings(embedder)
    results, latencies = [], []
    for p in pairs:
        t0 = time.perf_counter()
        results.append(lookup(p["sentence2"]))
        latencies.append(time.perf_counter() - t0)
    return results, latencies


VECTOR_ROUNDS = 2   # passes over every pair for the given-vector latency (paired, interleaved)


def _paired_vector_latency(pairs: list[dict[str, Any]], table: VectorTable, rvl: _RedisVLCache,
                           ours: Any) -> tuple[list[float], list[float]]:
    """Lookup latency given the query vector, both systems on the same query back to back, the
    order alternating, so load on the shared machine falls on both alike."""
    rvl_lat: list[float] = []
    ours_lat: list[float] = []
    queries = [(p["sentence2"], table[p["sentence2"]]) for p in pairs]
    for n in range(VECTOR_ROUNDS * len(queries)):
        text, vec = queries[n % len(queries)]
        as_list = vec.tolist()   # RedisVL takes a list (its own conversion is part of its cost)
        steps = [("rvl", lambda: rvl.check_vector(as_list)), ("ours", lambda: ours.lookup_vector(vec, text))]
        for who, step in (steps if n % 2 == 0 else steps[::-1]):
            t0 = time.perf_counter()
            step()
            (rvl_lat if who == "rvl" else ours_lat).append(time.perf_counter() - t0)
    return rvl_lat, ours_lat


def _verifier_effect(pairs: list[dict[str, Any]], entry_of: dict[str, int], table: VectorTable,
                     ours: Any, threshold: float) -> dict[str, Any]:
    """Our lookup with the verifier on vs off (same store, same vectors), at one threshold: what
    the verifier costs in recall and buys in precision, and the true pairs it turned away."""
    settings = ours.settings
    runs: dict[str, list[tuple[int | None, float]]] = {}
    saved = settings.verifier
    try:
        for flag in (True, False):
            settings.verifier = flag
            runs["on" if flag else "off"] = [_ours_hit(ours.lookup_vector(table[p["sentence2"]], p["sentence2"]))
                                             for p in pairs]
    finally:
        settings.verifier = saved
    out: dict[str, Any] = {"threshold": threshold}
    for name, results in runs.items():
        scored = score_cache(pairs, entry_of, results)
        out[f"verifier_{name}"] = at_threshold(scored["sweep"], threshold)
        out[f"verifier_{name}_best"] = scored["best"]   # each at its own best threshold
    from aigov.cache.verifier import verify

    lost = []
    for p, on, off in zip(pairs, runs["on"], runs["off"]):
        correct_off = p["label"] == 1 and off[0] == entry_of[p["sentence1"]] and off[1] >= threshold
        correct_on = p["label"] == 1 and on[0] == entry_of[p["sentence1"]] and on[1] >= threshold
        if correct_off and not correct_on:
            lost.append({"query": p["sentence2"], "entry": p["sentence1"],
                         "reason": verify(p["sentence2"], p["sentence1"]).reason})
    out["true_hits_refused"] = lost
    return out


def cache_entries_and_queries(pairs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]], int]:
    """(the prompts stored: each distinct sentence1 once, the pairs looked up, how many were left
    out). A pair whose sentence2 is itself a stored prompt (another pair's sentence1) is left
    out: that lookup is an exact repeat, which any cache rightly answers with that prompt's own
    answer, and the pair's label does not describe it (scored, it was a wrong answer at every
    threshold for both systems)."""
    entries = list(dict.fromkeys(p["sentence1"] for p in pairs))
    stored = set(entries)
    queries = [p for p in pairs if p["sentence2"] not in stored]
    return entries, queries, len(pairs) - len(queries)


def compare_cache(ctx: BenchContext, table: VectorTable) -> dict[str, Any]:
    entries, pairs, repeats = cache_entries_and_queries(stsb_pairs(ctx))
    table.add(entries + [p["sentence2"] for p in pairs])
    embedder = table.embedder
    entry_of = {t: i for i, t in enumerate(entries)}
    # Both systems embed each lookup with the same shared embedder call the plugin uses.
    embed_request = lambda text: embedder.embed([text])[0]  # noqa: E731
    out: dict[str, Any] = {"pairs": len(pairs), "entries": len(entries), "exact_repeats_left_out": repeats,
                           "positives": sum(1 for p in pairs if p["label"] == 1),
                           "method": ("same pairs, same threshold grid "
                                      f"{THRESHOLDS[0]:.2f}..{THRESHOLDS[-1]:.2f} step 0.01, a hit is correct "
                                      "only for a same-meaning pair answered by its own sentence1 (queries that are "
                                      "themselves a stored prompt left out); "
                                      "given-vector latency paired and interleaved")}
    rvl: _RedisVLCache | None = None
    ours: Any = None
    try:
        try:
            rvl = _RedisVLCache(ctx, entries, table, embed_request)
        except SectionSkipped as exc:
            out["redisvl"] = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one broken part keeps the section's other parts
            out["redisvl"] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:400]}
        try:
            from aigov.bench import adapters

            ours = adapters.cache_store(ctx, embedder, namespace="peer")  # SectionSkipped if missing
            for i, text in enumerate(entries):
                ours.put(text, table[text], f"answer-{i}", {"entry": i})
        except SectionSkipped as exc:
            out["ours"] = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001
            out["ours"] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:400]}
        scored: dict[str, Any] = {}

        def attempt(who: str, fn: Callable[[], None]) -> bool:
            try:
                fn()
                return True
            except Exception as exc:  # noqa: BLE001 - one broken part keeps the section's other parts
                out[who] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:400]}
                scored.pop(who, None)
                return False

        def text_pass(who: str, lookup: Callable[[str], tuple[int | None, float]], latency_key: str) -> None:
            results, lat = _text_lookups(pairs, embedder, lookup)
            scored[who] = score_cache(pairs, entry_of, results)
            out[who] = {"status": "ok", latency_key: latency_stats(lat)}

        if rvl is not None and not attempt("redisvl", lambda: text_pass("redisvl", rvl.check_text, "check_latency")):
            rvl = _close_quietly(rvl)
        if ours is not None and not attempt("ours", lambda: text_pass(
                "ours", lambda text: _ours_hit(ours.lookup_text(text)), "lookup_latency")):
            ours = _drop_quietly(ours)
        if rvl is not None and ours is not None:
            def vector_pass() -> None:
                rvl_lat, ours_lat = _paired_vector_latency(pairs, table, rvl, ours)
                out["redisvl"]["check_latency_given_vector"] = latency_stats(rvl_lat)
                out["ours"]["lookup_latency_given_vector"] = latency_stats(ours_lat)
                out["given_vector_p50_ratio_ci95"] = paired_p50_ratio_interval(rvl_lat, ours_lat, ctx.seed)
            attempt("ours", vector_pass)
        if "redisvl" in scored:
            out["redisvl"].update(best=scored["redisvl"]["best"],
                                  at_default=at_threshold(scored["redisvl"]["sweep"], 1.0 - REDISVL_DEFAULT_DISTANCE),
                                  default_similarity=1.0 - REDISVL_DEFAULT_DISTANCE,
                                  sweep=scored["redisvl"]["sweep"])
        if "ours" in scored:
            out["ours"].update(best=scored["ours"]["best"],
                               at_default=at_threshold(scored["ours"]["sweep"], ours.default_threshold),
                               default_similarity=ours.default_threshold, sweep=scored["ours"]["sweep"],
                               store=ours.description)
            best_t = scored["ours"]["best"]["threshold"]

            def effect() -> None:
                out["ours"]["verifier_effect"] = _verifier_effect(pairs, entry_of, table, ours, best_t)
            attempt("ours_verifier_effect", effect)
        if "ours" in scored and "redisvl" in scored:
            labels = np.array([p["label"] == 1 for p in pairs])
            out["f1_bootstrap"] = paired_f1_bootstrap(scored["ours"], scored["redisvl"], labels, ctx.seed)
    finally:
        _close_quietly(rvl)
        _drop_quietly(ours)
    for who in ("ours", "redisvl"):
        r = out.get(who) or {"status": "error", "reason": "not run"}
        if r["status"] == "ok" and "best" in r:
            lat = r.get("lookup_latency") or r.get("check_latency")
            vec_lat = r.get("lookup_latency_given_vector") or r.get("check_latency_given_vector") or {}
            ctx.echo(f"  cache {who:7s} best t={r['best']['threshold']:.2f} P={r['best']['precision']:.3f} "
                     f"R={r['best']['recall']:.3f} F1={r['best']['f1']:.3f}  lookup p50 {lat['p50_ms']} ms"
                     + (f"  given vector p50 {vec_lat['p50_ms']} ms" if vec_lat.get("p50_ms") is not None
                        else "  given vector: not run (it is timed paired with RedisVL)"))
        else:
            ctx.echo(f"  cache {who:7s} {r['status']}: {r['reason']}")
    boot = out.get("f1_bootstrap")
    if boot:
        ctx.echo(f"  cache F1 ours - RedisVL {boot['f1_difference']:+.3f}, paired bootstrap 95% interval "
                 f"[{boot['ci95_low']:+.3f}, {boot['ci95_high']:+.3f}] (ratio {boot['ratio_ci95'][0]:.3f}.."
                 f"{boot['ratio_ci95'][1]:.3f}) over {boot['pairs']} pairs "
                 f"({boot['resamples']} resamples; ours >= RedisVL in {boot['share_at_least_equal']:.0%})")
    effect = out.get("ours", {}).get("verifier_effect")
    if effect:
        on, off = effect["verifier_on"], effect["verifier_off"]
        ctx.echo(f"  cache ours at t={effect['threshold']:.2f}: verifier on P={on['precision']:.3f} "
                 f"R={on['recall']:.3f} F1={on['f1']:.3f} | off P={off['precision']:.3f} R={off['recall']:.3f} "
                 f"F1={off['f1']:.3f} | true hits refused {len(effect['true_hits_refused'])}")
    return out


# ---------------------------------------------------------------- router comparison
def clinc_split(ctx: BenchContext) -> dict[str, Any]:
    train = read_jsonl(ctx.data_file("clinc150", "train.jsonl"))
    val = read_jsonl(ctx.data_file("clinc150", "validation.jsonl"))
    by_intent: dict[str, list[str]] = defaultdict(list)
    for r in train:
        if r["intent"] != "oos":
            by_intent[r["intent"]].append(r["text"])
    intents = sorted(by_intent)
    rng = random.Random(ctx.seed)
    if ctx.quick:
        intents = sorted(rng.sample(intents, 10))
    n_refs, n_cal = (10, 5) if ctx.quick else (50, 10)
    refs = {i: by_intent[i][:n_refs] for i in intents}
    calib = [(t, i) for i in intents for t in by_intent[i][n_refs:n_refs + n_cal]]
    train_oos = [r["text"] for r in train if r["intent"] == "oos"]
    calib += [(t, "oos") for t in (train_oos[:20] if ctx.quick else train_oos)]
    keep = set(intents)
    test = [(r["text"], r["intent"]) for r in val if r["intent"] in keep]
    val_oos = [(r["text"], "oos") for r in val if r["intent"] == "oos"]
    test += val_oos[:20] if ctx.quick else val_oos
    return {"intents": intents, "refs": refs, "calibration": calib, "test": test,
            "refs_per_intent": n_refs}


def score_routes(truth: list[str], predicted: list[str]) -> dict[str, float]:
    pairs = list(zip(truth, predicted))
    in_scope = [(t, p) for t, p in pairs if t != "oos"]
    oos = [(t, p) for t, p in pairs if t == "oos"]
    return {"accuracy": round(sum(t == p for t, p in pairs) / len(pairs), 4),
            "in_scope_accuracy": round(sum(t == p for t, p in in_scope) / max(1, len(in_scope)), 4),
            "oos_recall": round(sum(p == "oos" for _, p in oos) / max(1, len(oos)), 4),
            "n": len(pairs), "n_oos": len(oos)}


def router_nn(split: dict[str, Any], table: VectorTable) -> dict[str, Any]:
    labels = [i for i in split["intents"] for _ in split["refs"][i]]
    matrix = np.stack([table[t] for i in split["intents"] for t in split["refs"][i]])

    def decide(vec: np.ndarray, threshold: float) -> str:
        sims = matrix @ vec
        best = int(np.argmax(sims))
        return labels[best] if sims[best] >= threshold else "oos"

    # Calibrate: top-1 similarity of each calibration row once, then pick the best threshold.
    cal_top = [(float(np.max(matrix @ table[t])), labels[int(np.argmax(matrix @ table[t]))], truth)
               for t, truth in split["calibration"]]
    best_t, best_acc = 0.0, -1.0
    for t in THRESHOLDS:
        acc = np.mean([(lab if sim >= t else "oos") == truth for sim, lab, truth in cal_top])
        if acc > best_acc:
            best_t, best_acc = float(t), float(acc)
    latencies, predicted = [], []
    for text, _ in split["test"]:
        vec = table[text]
        t0 = time.perf_counter()
        predicted.append(decide(vec, best_t))
        latencies.append(time.perf_counter() - t0)
    scores = score_routes([t for _, t in split["test"]], predicted)
    return {"status": "ok", "threshold": best_t, **scores, "decision_latency": latency_stats(latencies)}


def router_redisvl(ctx: BenchContext, split: dict[str, Any], table: VectorTable) -> dict[str, Any]:
    vectorizer = redisvl_vectorizer(lambda text, **_: table[text].tolist(),
                                    lambda texts, **_: [table[t].tolist() for t in texts])
    from redisvl.extensions.router import Route, SemanticRouter

    routes = [Route(name=i, references=split["refs"][i], distance_threshold=0.5) for i in split["intents"]]
    name = f"aigov_bench_router_{random.Random(ctx.seed).randrange(1 << 30)}"
    router = SemanticRouter(name=name, routes=routes, vectorizer=vectorizer, redis_url=ctx.redis(),
                            overwrite=True)
    try:
        grid = [round(1.0 - t, 2) for t in THRESHOLDS[::5]]   # distances 0.5 .. 0.05
        best_d, best_acc = grid[0], -1.0
        cal_vecs = [(table[t].tolist(), truth) for t, truth in split["calibration"]]
        for d in grid:
            router.update_route_thresholds({i: d for i in split["intents"]})
            acc = np.mean([(router(vector=v).name or "oos") == truth for v, truth in cal_vecs])
            if acc > best_acc:
                best_d, best_acc = d, float(acc)
        router.update_route_thresholds({i: best_d for i in split["intents"]})
        latencies, predicted = [], []
        for text, _ in split["test"]:
            vec = table[text].tolist()
            t0 = time.perf_counter()
            match = router(vector=vec)
            latencies.append(time.perf_counter() - t0)
            predicted.append(match.name or "oos")
    finally:
        router.delete()
    scores = score_routes([t for _, t in split["test"]], predicted)
    return {"status": "ok", "distance_threshold": best_d, **scores,
            "decision_latency": latency_stats(latencies)}


def router_ours(ctx: BenchContext, split: dict[str, Any], table: VectorTable) -> dict[str, Any]:
    from aigov.bench import adapters

    router = adapters.router(split, table)   # SectionSkipped if aigov.routing is missing
    latencies, predicted = [], []
    for text, _ in split["test"]:
        vec = table[text]
        t0 = time.perf_counter()
        predicted.append(router.decide_vector(vec))
        latencies.append(time.perf_counter() - t0)
    scores = score_routes([t for _, t in split["test"]], predicted)
    return {"status": "ok", **router.description, **scores, "decision_latency": latency_stats(latencies)}


def compare_router(ctx: BenchContext, table: VectorTable) -> dict[str, Any]:
    split = clinc_split(ctx)
    table.add([t for i in split["intents"] for t in split["refs"][i]]
              + [t for t, _ in split["calibration"]] + [t for t, _ in split["test"]])
    out: dict[str, Any] = {"intents": len(split["intents"]), "refs_per_intent": split["refs_per_intent"],
                           "calibration_rows": len(split["calibration"]), "test_rows": len(split["test"])}
    out["nearest_neighbour"] = router_nn(split, table)
    out["redisvl"] = guard_part(lambda: router_redisvl(ctx, split, table))
    out["ours"] = guard_part(lambda: router_ours(ctx, split, table))
    for who in ("ours", "redisvl", "nearest_neighbour"):
        r = out[who]
        if r["status"] == "ok":
            ctx.echo(f"  router {who:17s} acc {r['accuracy']:.3f}  oos recall {r['oos_recall']:.3f}  "
                     f"decision p50 {r['decision_latency']['p50_ms']} ms")
        else:
            ctx.echo(f"  router {who:17s} {r['status']}: {r['reason']}")
    return out


def run(ctx: BenchContext) -> dict[str, Any]:
    table = VectorTable(ctx.embedder())
    cache = compare_cache(ctx, table)
    router = compare_router(ctx, table)
    targets: list[Target] = []
    ours_c, rvl_c = cache["ours"], cache["redisvl"]
    if ours_c["status"] == "ok" and rvl_c["status"] == "ok":
        # Two systems this close differ by noise in either direction from run to run: each row
        # carries the 95% interval of its ratio from a paired bootstrap, and a ratio whose
        # interval holds 1 is a tie, not a win or a loss.
        boot = cache.get("f1_bootstrap")
        f1_interval = boot.get("ratio_ci95") if boot else None
        targets.append(Target("cache best F1, ours / RedisVL", ratio(ours_c["best"]["f1"], rvl_c["best"]["f1"]),
                              "x", ">=", 1.0, baseline=rvl_c["best"]["f1"],
                              interval=tuple(f1_interval) if f1_interval else None,
                              note=(f"difference {boot['f1_difference']:+.3f}, paired bootstrap 95% interval "
                                    f"[{boot['ci95_low']:+.3f}, {boot['ci95_high']:+.3f}]") if boot else ""))
        lat_interval = cache.get("given_vector_p50_ratio_ci95")
        targets.append(Target("cache lookup p50 (given vector), RedisVL / ours",
                              ratio(rvl_c["check_latency_given_vector"]["p50_ms"],
                                    ours_c["lookup_latency_given_vector"]["p50_ms"]),
                              "x", ">=", 1.0, baseline=rvl_c["check_latency_given_vector"]["p50_ms"],
                              interval=tuple(lat_interval) if lat_interval else None,
                              note="above 1: our lookup is faster"))
    ours_r, rvl_r, nn_r = router["ours"], router["redisvl"], router["nearest_neighbour"]
    if ours_r["status"] == "ok":
        targets.append(Target("router accuracy, ours / nearest neighbour",
                              ratio(ours_r["accuracy"], nn_r["accuracy"]), "x", ">=", 1.0,
                              baseline=nn_r["accuracy"]))
        if rvl_r["status"] == "ok":
            targets.append(Target("router accuracy, ours / RedisVL", ratio(ours_r["accuracy"], rvl_r["accuracy"]),
                                  "x", ">=", 1.0, baseline=rvl_r["accuracy"]))
    if not targets:
        missing = [f"{part} {who}: {r['reason']}" for part, res in (("cache", cache), ("router", router))
                   for who, r in res.items() if isinstance(r, dict) and r.get("status") in ("skipped", "error")]
        ctx.echo("  no paired comparison possible yet: " + "; ".join(missing))
    return {"results": {"cache": cache, "router": router}, "targets": targets}
