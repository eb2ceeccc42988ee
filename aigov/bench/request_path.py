"""Section 2: the request path through the gateway stand-in (HTTP front, `aigov serve`).

Variants of one route in front of the mock LLM (fixed latency per request through its
X-Mock-Latency-Ms header): key-auth only (the baseline) vs key-auth + each of our plugins alone
vs all three. Added latency = a variant's p50/p95 minus the baseline's, measured in the same
run. The quota is measured in both capture setups (DESIGN.md "Capture phase"): the default
(a `response` phase: Kong buffers the upstream answer, the settle happens before the response
leaves) against the key-auth baseline, and the recommended AI-route setup (AIGOV_CAPTURE_PHASE=log
with ai-proxy on the route: only the access phase is on the client's path, the settle runs in
`log` from ai-proxy's logged usage) against a key-auth + ai-proxy baseline. Every request carries a prompt never sent before (a cache miss, a fresh routing decision),
except the cache-hit requests, which repeat a prompt already answered and stored.
"""
from __future__ import annotations

import http.client
import json
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from aigov.bench.common import (NOOP_PLUGINS_DIR, REPO_ROOT, BenchContext, SectionSkipped, Target,
                                latency_stats, ratio, read_jsonl, require_module)

API_KEY = "bench-key"
PATH = "/v1/chat/completions"
PATH_LATENCY_MS = 20        # upstream latency for the added-latency comparison
HIT_MISS_LATENCY_MS = 200   # upstream latency of the hit-vs-miss comparison (issue 7)
TARGET_QUOTA_ADDED_P50_MS = 1.0
TARGET_HIT_P50_MS = 8.0
TARGET_HIT_SPEEDUP = 20.0
MIN_HIT_SHARE = 0.9         # repeats that must hit for the hit rows to get a verdict
BASELINE = "baseline (key-auth)"
LOG_BASELINE = "baseline (key-auth + ai-proxy)"
QUOTA_LOG = "llm-token-quota (log capture, ai-proxy)"
# The quota's PDK calls with none of its work (aigov/bench/plugins/bench-pdk-floor.py), on the
# same aigov serve: what those round trips alone add, so the quota's own share is the difference.
FLOOR_PLUGIN = "bench-pdk-floor"
# A header each plugin sets on every answer it handled (lowercase, as Client.chat returns them).
PLUGIN_HEADERS = {"llm-token-quota": ("x-ai-ratelimit-remaining-day",),
                  "llm-semantic-cache": ("x-cache-status",),
                  "llm-semantic-router": ("x-semantic-route",),
                  FLOOR_PLUGIN: ("x-ai-ratelimit-remaining-day",)}
FLOOR = "PDK floor (the quota's calls, no work)"
FLOOR_LOG = "PDK floor (log capture, ai-proxy)"
LOG_CAPTURE_ENV = {"AIGOV_CAPTURE_PHASE": "log"}


def plugin_configs(redis_host: str, redis_port: int) -> dict[str, dict[str, Any]]:
    redis_conf = {"host": redis_host, "port": redis_port}
    return {
        "llm-token-quota": {"policy": "redis", "redis": redis_conf, "unknown_model": "block",
                            "limits": [{"window": "day", "tokens": 1_000_000_000}]},
        "llm-semantic-cache": {"scope": "consumer", "cache_ttl": 3600,
                               "vectordb": {"strategy": "redis", "redis": redis_conf}},
        "llm-semantic-router": {"embed_text": "last_user", "default_route": "general", "routes": [
            {"name": "general", "target": {"model": "gpt-4o-mini"},
             "utterances": ["what is the capital of france", "tell me a fun fact about space"]},
            {"name": "banking", "target": {"model": "gpt-4o-mini"},
             "utterances": ["what is my account balance", "why was my card declined"]}]},
    }


def quota_tokens_in_redis(redis_url: str) -> int:
    """Every token the quota has counted in this Redis: the sum of its token counters (the
    bench's limit is one unnamed day window, so these are all of its counters' integers)."""
    import redis

    from aigov.quota.core import DEFAULT_KEY_PREFIX

    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        keys = list(client.scan_iter(match=f"{DEFAULT_KEY_PREFIX}:*:tokens:day:*", count=1000))
        return sum(int(v) for v in client.mget(keys) if v is not None) if keys else 0
    finally:
        client.close()


def ai_proxy_plugin(upstream: str) -> dict[str, Any]:
    """The stand-in's ai-proxy imitation in front of the mock (OpenAI chat, usage logged)."""
    return {"name": "ai-proxy", "config": {
        "route_type": "llm/v1/chat", "auth": {"header_name": "Authorization", "header_value": "Bearer sk-bench"},
        "model": {"provider": "openai", "options": {"upstream_url": f"{upstream}/v1/chat/completions"}},
        "logging": {"log_statistics": True, "log_payloads": False}}}


def declarative(upstream: str, plugins: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "_format_version": "3.0",
        "consumers": [{"username": "bench", "keyauth_credentials": [{"key": API_KEY}]}],
        "services": [{"name": "mock-llm", "url": upstream, "routes": [{
            "name": "chat", "paths": ["/v1/chat"], "methods": ["POST"], "strip_path": False,
            "plugins": [{"name": "key-auth", "config": {"key_names": ["apikey"]}}, *plugins]}]}],
    }


class Client:
    """Sequential requests over one keep-alive connection (like a client SDK)."""

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)

    def chat(self, text: str, upstream_ms: int) -> tuple[float, int, dict[str, str], bytes]:
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
        headers = {"Content-Type": "application/json", "apikey": API_KEY,
                   "X-Mock-Latency-Ms": str(upstream_ms)}
        t0 = time.perf_counter()
        self.conn.request("POST", PATH, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter() - t0
        return elapsed, resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def close(self) -> None:
        self.conn.close()


def cache_status(headers: dict[str, str]) -> str:
    for name, value in headers.items():
        if name.endswith("cache-status"):
            return value.lower()
    return ""


def run_variant(ctx: BenchContext, name: str, plugins: list[dict[str, Any]], mock_url: str,
                prompts: list[str], upstream_ms: int, hits: int = 0,
                extra_env: dict[str, str] | None = None,
                tokens_counted: Callable[[], tuple[int, int]] | None = None) -> dict[str, Any]:
    """One gateway with `plugins`, timed. `tokens_counted` (for a route with the quota) returns
    (tokens the quota counted in Redis, tokens the mock billed) so far: their growth over the
    variant must agree, or the quota did not do its work (it failed open to local memory, say)."""
    from kongsim.gateway import aigov_entries
    from kongsim.pytest_plugin import make_prefix, start_gateway

    server: Any = "aigov"
    prefix = None
    if any(p["name"] == FLOOR_PLUGIN for p in plugins):  # aigov serve on the bench plugins' folder
        prefix = make_prefix()
        server = aigov_entries((FLOOR_PLUGIN,), prefix, pythonpath=str(REPO_ROOT),
                               extra_env={**(extra_env or {}), "AIGOV_PLUGINS_DIR": str(NOOP_PLUGINS_DIR)})
    handle = start_gateway(declarative(mock_url, plugins), server=server, pythonpath=str(REPO_ROOT),
                           http=True, extra_env=extra_env, prefix=prefix)
    client = Client(handle.url)
    counted_before = tokens_counted() if tokens_counted else None
    try:
        for text in prompts[:5]:          # warm-up: model load, connections, instances
            client.chat("warm up " + text, upstream_ms)
        handle.wait_logs(10)
        lat, statuses = [], {}
        # A plugin that failed open (an exception: the request passes untouched) is fast and
        # still answers 200: each reply must carry the headers of every plugin on the route.
        expected = [h for p in plugins for h in PLUGIN_HEADERS.get(p["name"], ())]
        unmarked = 0
        for text in prompts[5:]:
            elapsed, status, headers, _ = client.chat(text, upstream_ms)
            lat.append(elapsed)
            statuses[status] = statuses.get(status, 0) + 1
            unmarked += any(h not in headers for h in expected)
        record: dict[str, Any] = {"variant": name, "status": "ok", "upstream_ms": upstream_ms,
                                  "latency": latency_stats(lat), "http_statuses": statuses,
                                  "replies_without_plugin_headers": unmarked}
        if hits:
            handle.wait_logs(10)          # stores happen after the response (response/log phase)
            hit_lat, observed = [], {}
            for text in prompts[5:5 + hits]:
                elapsed, status, headers, _ = client.chat(text, upstream_ms)
                state = cache_status(headers) or "no header"
                observed[state] = observed.get(state, 0) + 1
                if status == 200 and state == "hit":
                    hit_lat.append(elapsed)
            record["hit_latency"] = latency_stats(hit_lat)
            record["repeat_cache_status"] = observed
        if tokens_counted is not None and counted_before is not None:
            handle.wait_logs(10)          # log capture settles in the log phase
            counted_after = tokens_counted()
            record["quota_accounting"] = {"redis_tokens": counted_after[0] - counted_before[0],
                                          "billed_tokens": counted_after[1] - counted_before[1]}
        return record
    finally:
        client.close()
        handle.close()


def _all_ok(record: dict[str, Any]) -> bool:
    """Every timed request of the variant was answered 200 with its plugins' headers, and a
    quota counted in Redis exactly the tokens the upstream billed."""
    statuses = record.get("http_statuses") or {}
    accounting = record.get("quota_accounting")
    return (bool(statuses) and set(statuses) == {200} and not record.get("replies_without_plugin_headers")
            and (accounting is None or accounting["redis_tokens"] == accounting["billed_tokens"] > 0))


def _mostly_hits(record: dict[str, Any]) -> bool:
    """The repeats were answered from the cache (at least MIN_HIT_SHARE of them): a hit
    latency taken from a few stray hits among misses would not describe the cache."""
    observed = record.get("repeat_cache_status") or {}
    total = sum(observed.values())
    return total > 0 and observed.get("hit", 0) >= MIN_HIT_SHARE * total


def idle_wake_cost(texts: list[str], idle_ms: float, rounds: int = 100) -> dict[str, Any]:
    """The quota's own in-process request work (parse the chat request, count its prompt tokens)
    timed back to back, then each time after `idle_ms` of sleep: the request path sleeps that long
    while the upstream answers, and this is what waking up costs on this machine (cold caches, a
    descheduled vCPU), measured in the same run as the added-latency rows it explains."""
    from aigov import tokens
    from aigov.request import parse_chat_request

    bodies = [json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": t}]}).encode()
              for t in texts[:rounds]]

    def work(body: bytes) -> float:
        t0 = time.perf_counter()
        request = parse_chat_request(body)
        tokens.count_chat_messages(request.messages, request.model, None)
        return time.perf_counter() - t0

    for body in bodies[:10]:
        work(body)                        # warm-up: tiktoken's encoding, the parser's imports
    hot = [work(body) for body in bodies for _ in range(3)]
    after_idle = []
    for body in bodies:
        time.sleep(idle_ms / 1000.0)
        after_idle.append(work(body))
    hot_p50, idle_p50 = latency_stats(hot)["p50_ms"], latency_stats(after_idle)["p50_ms"]
    return {"idle_ms": idle_ms, "hot_p50_ms": hot_p50, "after_idle_p50_ms": idle_p50,
            "factor": round(ratio(idle_p50, hot_p50) or 0.0, 1)}


def run(ctx: BenchContext) -> dict[str, Any]:
    require_module("kongsim.pytest_plugin", "the gateway stand-in")
    mockllm = require_module("aigov.mockllm", "the mock LLM")
    redis_url = ctx.redis()
    u = urlsplit(redis_url)
    configs = plugin_configs(u.hostname or "127.0.0.1", u.port or 6379)
    rows = read_jsonl(ctx.data_file("clinc150", "validation.jsonl"))
    texts = list(dict.fromkeys(r["text"] for r in rows))
    per_variant = ctx.size(25, 205)
    hits = ctx.size(10, 100)
    mock = mockllm.MockLLM("127.0.0.1").start()

    def tokens_counted() -> tuple[int, int]:
        return quota_tokens_in_redis(redis_url), mock.stats.snapshot()["tokens_billed"]

    quota_entry = {"name": "llm-token-quota", "config": configs["llm-token-quota"]}
    # (name, plugins, plugin-server environment, baseline it is compared with)
    variants: list[tuple[str, list[dict[str, Any]], dict[str, str] | None, str | None]] = [(BASELINE, [], None, None)]
    variants += [(n, [{"name": n, "config": c}], None, BASELINE) for n, c in configs.items()]
    variants.append(("all three", [{"name": n, "config": c} for n, c in configs.items()], None, BASELINE))
    floor_entry = {"name": FLOOR_PLUGIN, "config": {"label": "floor"}}
    variants.append((FLOOR, [floor_entry], None, BASELINE))
    variants.append((LOG_BASELINE, [ai_proxy_plugin(mock.url)], LOG_CAPTURE_ENV, None))
    variants.append((QUOTA_LOG, [ai_proxy_plugin(mock.url), quota_entry], LOG_CAPTURE_ENV, LOG_BASELINE))
    variants.append((FLOOR_LOG, [ai_proxy_plugin(mock.url), floor_entry], LOG_CAPTURE_ENV, LOG_BASELINE))
    results: list[dict[str, Any]] = []
    offset = 0
    try:
        for name, plugins, env, against in variants:
            prompts = texts[offset:offset + per_variant]
            offset += per_variant
            try:
                has_quota = any(p["name"] == "llm-token-quota" for p in plugins)
                rec = run_variant(ctx, name, plugins, mock.url, prompts, PATH_LATENCY_MS,
                                  hits=hits if name == "llm-semantic-cache" else 0, extra_env=env,
                                  tokens_counted=tokens_counted if has_quota else None)
                rec["baseline"] = against
            except Exception as exc:  # noqa: BLE001 - one variant failing keeps the others
                rec = {"variant": name, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:400]}
            results.append(rec)
            if rec["status"] == "ok":
                ctx.echo(f"  {name:40s} p50 {rec['latency']['p50_ms']} ms p95 {rec['latency']['p95_ms']} ms "
                         f"statuses {rec['http_statuses']}")
                if "quota_accounting" in rec:
                    acc = rec["quota_accounting"]
                    ctx.echo(f"  {'':40s} quota counted {acc['redis_tokens']} tokens in Redis, the upstream "
                             f"billed {acc['billed_tokens']}" + ("" if _all_ok(rec) else ": no verdict"))
            else:
                ctx.echo(f"  {name:40s} error: {rec['reason']}")
        # Hit vs the miss it replaces, at 200 ms upstream latency.
        prompts = texts[offset:offset + ctx.size(15, 45)]
        try:
            slow = run_variant(ctx, "llm-semantic-cache @200ms", [{"name": "llm-semantic-cache",
                               "config": configs["llm-semantic-cache"]}], mock.url, prompts,
                               HIT_MISS_LATENCY_MS, hits=len(prompts) - 5)
        except Exception as exc:  # noqa: BLE001
            slow = {"variant": "llm-semantic-cache @200ms", "status": "error",
                    "reason": f"{type(exc).__name__}: {exc}"[:400]}
        results.append(slow)
    finally:
        mock.stop()

    by_name = {r["variant"]: r for r in results}
    base = by_name[BASELINE]
    if base["status"] != "ok":
        raise SectionSkipped(f"the baseline gateway did not run: {base['reason']}")
    added = {}
    for r in results:
        against = by_name.get(r.get("baseline") or "")
        # Only rows where every timed reply was a 200 on both sides: a fast 429 or 500 is not
        # the request path the target is about.
        if (r["status"] == "ok" and against is not None and against["status"] == "ok"
                and r["upstream_ms"] == PATH_LATENCY_MS and _all_ok(r) and _all_ok(against)):
            added[r["variant"]] = {q: round(r["latency"][q] - against["latency"][q], 3) for q in ("p50_ms", "p95_ms")}
            added[r["variant"]]["baseline"] = against["variant"]
    for n, a in added.items():
        ctx.echo(f"  added by {n:40s} p50 {a['p50_ms']} ms  p95 {a['p95_ms']} ms  (vs {a['baseline']})")
    wake = idle_wake_cost(texts, PATH_LATENCY_MS, rounds=ctx.size(20, 100))
    ctx.echo(f"  context: the quota's parse + token count takes {wake['hot_p50_ms']} ms back to back and "
             f"{wake['after_idle_p50_ms']} ms after {PATH_LATENCY_MS} ms idle ({wake['factor']}x): "
             "code run right after the upstream wait runs that much slower on this machine")
    own_work = {}
    for quota_row, floor_row in (("llm-token-quota", FLOOR), (QUOTA_LOG, FLOOR_LOG)):
        q, f = added.get(quota_row), added.get(floor_row)
        if q and f:
            own_work[quota_row] = {"floor_p50_ms": f["p50_ms"], "own_work_p50_ms": round(q["p50_ms"] - f["p50_ms"], 3)}
            ctx.echo(f"  {quota_row}: its PDK calls alone add {f['p50_ms']} ms p50 (no work), "
                     f"its own work {own_work[quota_row]['own_work_p50_ms']} ms")

    def floor_note(quota_row: str) -> str:
        w = own_work.get(quota_row)
        return (f"; the same PDK calls with no work add {w['floor_p50_ms']} ms in this run, the quota's "
                f"own work {w['own_work_p50_ms']} ms") if w else ""

    cache_rec = by_name.get("llm-semantic-cache", {})
    hit_p50 = (cache_rec.get("hit_latency") or {}).get("p50_ms") if _mostly_hits(cache_rec) else None
    slow_ok = slow["status"] == "ok" and _mostly_hits(slow) and _all_ok(slow)
    slow_hit = (slow.get("hit_latency") or {}).get("p50_ms") if slow_ok else None
    slow_miss = slow["latency"]["p50_ms"] if slow_ok else None
    log_base = by_name.get(LOG_BASELINE) or {}
    targets = [
        # The target is judged on the default setup (response capture); the recommended
        # AI-route setup is reported beside it as its own row, against its own baseline.
        Target("quota added latency p50 (default: response capture; the judged row)",
               (added.get("llm-token-quota") or {}).get("p50_ms"), "ms", "<=",
               TARGET_QUOTA_ADDED_P50_MS, baseline=base["latency"]["p50_ms"],
               note="vs key-auth only; buffered proxying because the quota declares `response`"
                    + floor_note("llm-token-quota")),
        Target("quota added latency p50 (log capture + ai-proxy, recommended AI route)",
               (added.get(QUOTA_LOG) or {}).get("p50_ms"), "ms", "<=", TARGET_QUOTA_ADDED_P50_MS,
               baseline=(log_base.get("latency") or {}).get("p50_ms"),
               note="vs key-auth + ai-proxy, AIGOV_CAPTURE_PHASE=log: only access on the client's path"
                    + floor_note(QUOTA_LOG)),
        Target("cache hit end to end p50", hit_p50, "ms", "<=", TARGET_HIT_P50_MS,
               note=f"repeat statuses {cache_rec.get('repeat_cache_status')}"),
        Target(f"cache hit speedup vs miss at {HIT_MISS_LATENCY_MS} ms upstream", ratio(slow_miss, slow_hit),
               "x", ">=", TARGET_HIT_SPEEDUP, baseline=slow_miss,
               note=f"repeat statuses {slow.get('repeat_cache_status')}"),
    ]
    return {"results": {"variants": results, "added_latency": added, "quota_own_work": own_work,
                        "idle_wake": wake}, "targets": targets}
