"""Section 3: embeddings under load, batch-1 vs the shared micro-batching embedder.

Every request embeds one text never seen before (a cache miss costs exactly one embedding).
`concurrency` threads issue requests back to back, as concurrent plugin events do in one
`aigov serve` process. The baseline is the same model called at batch 1 per request
(`embed_unbatched`); the shared embedder (`embed`) merges requests that arrive together.
"""
from __future__ import annotations

import time
from typing import Any

from aigov.bench.common import (BenchContext, SectionSkipped, Target, latency_stats, ratio,
                                read_jsonl, run_concurrently)

CONCURRENCY = (1, 8, 32)
TARGET_PER_S_AT_32 = 250.0


def miss_texts(ctx: BenchContext, count: int) -> list[str]:
    """Distinct user-style queries: CLINC150 train utterances (real query lengths)."""
    rows = read_jsonl(ctx.data_file("clinc150", "train.jsonl"))
    texts = list(dict.fromkeys(r["text"] for r in rows))
    if len(texts) < count:
        raise SectionSkipped(f"need {count} distinct texts, clinc150 train has {len(texts)}")
    return texts[:count]


def measure(embedder: Any, mode: str, concurrency: int, texts: list[str], deadline_s: float) -> dict[str, Any]:
    """Throughput and per-request latency of `concurrency` workers sharing `texts`."""
    call = embedder.embed if mode == "microbatch" else embedder.embed_unbatched
    per_worker = len(texts) // concurrency
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    batches_before = getattr(embedder, "batches", 0)

    def work(i: int) -> None:
        mine = texts[i * per_worker:(i + 1) * per_worker]
        for text in mine:
            t0 = time.perf_counter()
            vec = call([text])
            latencies[i].append(time.perf_counter() - t0)
            if vec.shape != (1, embedder.dim):
                raise RuntimeError(f"{mode}: embedding shape {vec.shape}, expected (1, {embedder.dim})")

    t0 = time.perf_counter()
    run_concurrently(concurrency, work, deadline_s)
    elapsed = time.perf_counter() - t0
    done = per_worker * concurrency
    record: dict[str, Any] = {"mode": mode, "concurrency": concurrency, "embeddings": done,
                              "elapsed_s": round(elapsed, 3),
                              "embeddings_per_s": round(done / elapsed, 1),
                              "latency": latency_stats([x for lat in latencies for x in lat])}
    if mode == "microbatch":
        model_calls = getattr(embedder, "batches", 0) - batches_before
        record["model_calls"] = model_calls
        record["mean_batch"] = round(done / model_calls, 2) if model_calls else None
    return record


def run(ctx: BenchContext) -> dict[str, Any]:
    embedder = ctx.embedder()
    per_level = ctx.size(64, 640)
    deadline_s = ctx.size(120, 300)
    # Distinct texts for every (mode, level): no request repeats an earlier one.
    texts = miss_texts(ctx, per_level * (len(CONCURRENCY) * 2 + 2) + 32)
    embedder.embed(texts[-32:])  # start the batching worker outside the timed runs
    levels: list[dict[str, Any]] = []
    offset = 0
    for c in CONCURRENCY:
        for mode in ("batch1", "microbatch"):
            chunk = texts[offset:offset + per_level]
            offset += per_level
            levels.append(measure(embedder, mode, c, chunk, deadline_s))
            r = levels[-1]
            ctx.echo(f"  {mode:10s} c={c:<2d} {r['embeddings_per_s']:>7.1f}/s  p50 "
                     f"{r['latency']['p50_ms']} ms  p95 {r['latency']['p95_ms']} ms"
                     + (f"  mean batch {r['mean_batch']}" if mode == "microbatch" else ""))

    def rate(mode: str, c: int) -> float:
        return next(l["embeddings_per_s"] for l in levels if l["mode"] == mode and l["concurrency"] == c)

    speedup = {str(c): round(ratio(rate("microbatch", c), rate("batch1", c)) or 0, 2) for c in CONCURRENCY}
    # The same embedder on torch (the fallback runtime), measured in this run: what the ONNX
    # runtime buys, at 1 and at 32 concurrent.
    torch_levels = []
    if getattr(embedder, "runtime", None) == "onnx":
        from aigov.embeddings import LocalEmbedder

        torch_embedder = LocalEmbedder(runtime="torch")
        torch_embedder.embed(texts[-32:])
        for c, mode in ((1, "batch1"), (32, "microbatch")):
            chunk = texts[offset:offset + per_level]
            offset += per_level
            torch_levels.append(measure(torch_embedder, mode, c, chunk, deadline_s))
            r = torch_levels[-1]
            ctx.echo(f"  torch {mode:10s} c={c:<2d} {r['embeddings_per_s']:>7.1f}/s  p50 {r['latency']['p50_ms']} ms")
    onnx_vs_torch = {f"{l['mode']}@{l['concurrency']}": round(ratio(rate(l["mode"], l["concurrency"]),
                                                                      l["embeddings_per_s"]) or 0, 2)
                     for l in torch_levels}
    targets = [
        Target("micro-batched embeddings/s at 32 concurrent", rate("microbatch", 32), "/s", ">=",
               TARGET_PER_S_AT_32, baseline=rate("batch1", 32),
               note=f"{speedup['32']}x the batch-1 rate measured in the same run; runtime "
                    f"{getattr(embedder, 'runtime', None)}"
                    + (f", {onnx_vs_torch.get('microbatch@32')}x torch's" if onnx_vs_torch else "")),
    ]
    return {"results": {"model": embedder.model_id, "runtime": getattr(embedder, "runtime", None),
                        "levels": levels, "speedup_vs_batch1": speedup,
                        "torch_levels": torch_levels, "onnx_vs_torch": onnx_vs_torch},
            "targets": targets}
