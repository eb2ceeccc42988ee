"""Smoke tests of `aigov bench`: each section at tiny sizes against the real parts.

No timing assertions (targets are judged by the benchmark output only): these check that the
sections run, that the JSON has its shape, and that every ratio is computed from the figures
measured in the same run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aigov.bench import common, peer, plugin_server, run as bench_run, scale
from aigov.bench.common import BenchContext, SectionSkipped, Target
from conftest import shared_data

QUICK_LINES: list[str] = []


def quick_ctx(**kwargs) -> BenchContext:
    return BenchContext(quick=True, echo=QUICK_LINES.append, **kwargs)


def test_target_verdicts_follow_measured_values() -> None:
    assert Target("a", 6.0, "x", ">=", 5.0).holds is True
    assert Target("a", 4.9, "x", ">=", 5.0).holds is False
    assert Target("b", 0.5, "ms", "<=", 1.0).holds is True
    assert Target("b", None, "ms", "<=", 1.0).holds is None
    assert Target("b", float("nan"), "ms", "<=", 1.0).as_dict()["holds"] is None
    # A comparison whose 95% interval holds the threshold is a tie, whichever side the point is on.
    tie = Target("c", 0.98, "x", ">=", 1.0, interval=(0.93, 1.04))
    assert (tie.holds, tie.verdict, tie.as_dict()["verdict"]) == (None, "tie", "tie")
    assert "TIE" in tie.line() and "0.93..1.04" in tie.line()
    assert Target("c", 1.10, "x", ">=", 1.0, interval=(1.02, 1.2)).verdict == "yes"
    assert Target("c", 0.90, "x", ">=", 1.0, interval=(0.85, 0.97)).verdict == "no"
    assert Target("c", 0.90, "x", ">=", 1.0).verdict == "no"  # no interval: the point decides
    assert common.ratio(10, 0) is None and common.ratio(10, 4) == 2.5


def test_latency_stats_percentiles() -> None:
    stats = common.latency_stats([0.001 * i for i in range(1, 101)])
    assert stats["n"] == 100
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert common.latency_stats([])["p50_ms"] is None


def test_plugin_server_section_measures_both_servers() -> None:
    out = plugin_server.run(quick_ctx())
    res = out["results"]
    assert set(res["servers"]) == {"stock", "aigov"}
    for kind in ("stock", "aigov"):
        levels = res["servers"][kind]["levels"]
        assert [lv["concurrency"] for lv in levels] == [1, 8, 32]
        for lv in levels:
            # Every event is one HandleEvent plus one Step per PDK call of the no-op plugin.
            assert lv["round_trips"] == lv["events"] * (1 + plugin_server.PDK_CALLS)
            assert lv["round_trips_per_s"] == pytest.approx(lv["round_trips"] / lv["elapsed_s"], rel=0.01)
        soak = res["servers"][kind]["soak"]
        assert soak["thread_growth"] == soak["after"]["threads"] - soak["before"]["threads"]
        assert soak["before"]["rss_kib"] > 0
    speed = out["targets"][0]
    rt = {k: next(lv["round_trips_per_s"] for lv in res["servers"][k]["levels"] if lv["concurrency"] == 8)
          for k in ("stock", "aigov")}
    assert speed.measured == pytest.approx(rt["aigov"] / rt["stock"])
    assert speed.baseline == rt["stock"]


def test_aigov_serve_missing_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_server(name, *args, **kwargs):
        if name == "aigov.server.server":
            raise ImportError("simulated")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_server)
    with pytest.raises(SectionSkipped, match="aigov serve"):
        plugin_server.start_server("aigov", "python3")


def test_cache_scoring_counts_only_own_entry_hits() -> None:
    pairs = [{"sentence1": "a", "label": 1}, {"sentence1": "b", "label": 1},
             {"sentence1": "c", "label": 0}, {"sentence1": "d", "label": 1}]
    entry_of = {"a": 0, "b": 1, "c": 2, "d": 3}
    # pair 0: own entry at 0.95; pair 1: a wrong entry at 0.9; pair 2 (different meaning): own
    # entry at 0.8 (a false hit); pair 3: nothing returned.
    results = [(0, 0.95), (0, 0.90), (2, 0.80), (None, -1.0)]
    scored = peer.score_cache(pairs, entry_of, results)
    at_085 = peer.at_threshold(scored["sweep"], 0.85)
    assert (at_085["hits"], at_085["precision"], at_085["recall"]) == (2, 0.5, pytest.approx(1 / 3, abs=1e-4))
    at_093 = peer.at_threshold(scored["sweep"], 0.93)
    assert (at_093["precision"], at_093["recall"]) == (1.0, pytest.approx(1 / 3, abs=1e-4))
    assert scored["best"]["f1"] == max(r["f1"] for r in scored["sweep"])


def test_cache_queries_that_repeat_a_stored_prompt_are_left_out() -> None:
    pairs = [{"sentence1": "a cat sits", "sentence2": "a cat is sitting", "label": 1},
             {"sentence1": "a dog runs", "sentence2": "a cat sits", "label": 0},   # repeats pair 0's prompt
             {"sentence1": "a dog runs", "sentence2": "a dog is running", "label": 1}]
    entries, queries, left_out = peer.cache_entries_and_queries(pairs)
    assert entries == ["a cat sits", "a dog runs"]           # each prompt stored once
    assert [q["sentence2"] for q in queries] == ["a cat is sitting", "a dog is running"]
    assert left_out == 1


def test_stsb_validation_has_exact_repeat_queries_to_leave_out() -> None:
    # The split the benchmark reads: some sentence2 texts are another pair's sentence1. Looked
    # up, each returns that stored prompt at similarity 1.0, which scoring by the pair's own
    # sentence1 would call a wrong answer for both systems.
    ctx = BenchContext(data_dir=shared_data("stsb", "validation.jsonl").parent.parent)
    pairs = peer.stsb_pairs(ctx)
    entries, queries, left_out = peer.cache_entries_and_queries(pairs)
    stored = set(entries)
    assert left_out > 0 and len(queries) == len(pairs) - left_out
    assert not any(q["sentence2"] in stored for q in queries)


def test_paired_f1_bootstrap_interval() -> None:
    # 40 same-meaning pairs and 20 different-meaning ones; system a finds 30 of the 40 with no
    # false hit, system b the same 30 plus 5 false hits: a is better on every resample that
    # holds one of b's false hits.
    labels = np.array([True] * 40 + [False] * 20)
    entry_of = {f"s{i}": i for i in range(60)}
    pairs = [{"sentence1": f"s{i}", "label": int(labels[i])} for i in range(60)]
    found_a = [(i, 0.95) if i < 30 else (None, -1.0) for i in range(60)]
    found_b = [(i, 0.95) if i < 30 or 40 <= i < 45 else (None, -1.0) for i in range(60)]
    a = peer.score_cache(pairs, entry_of, found_a)
    b = peer.score_cache(pairs, entry_of, found_b)
    boot = peer.paired_f1_bootstrap(a, b, labels, seed=7, resamples=500)
    assert boot["f1_difference"] == pytest.approx(a["best"]["f1"] - b["best"]["f1"], abs=1e-4)
    assert boot["f1_difference"] > 0 and boot["ci95_low"] >= 0 < boot["ci95_high"]
    assert boot["share_at_least_equal"] == 1.0
    same = peer.paired_f1_bootstrap(a, a, labels, seed=7, resamples=200)
    assert (same["f1_difference"], same["ci95_low"], same["ci95_high"]) == (0.0, 0.0, 0.0)
    # The other way round the interval lies below zero.
    rev = peer.paired_f1_bootstrap(b, a, labels, seed=7, resamples=500)
    assert rev["ci95_high"] <= 0 and rev["share_at_least_equal"] < 0.05


def test_paired_p50_ratio_interval() -> None:
    rng = np.random.default_rng(3)
    base = rng.uniform(0.4, 0.6, 400)
    slower, faster = base * 1.5, base            # every query 1.5x slower on one side
    low, high = peer.paired_p50_ratio_interval(list(slower), list(faster), seed=1)
    assert low <= 1.5 <= high and low > 1.3
    first, second = rng.uniform(0.4, 0.6, 400), rng.uniform(0.4, 0.6, 400)  # one system timed twice
    low, high = peer.paired_p50_ratio_interval(list(first), list(second), seed=1)
    assert low < 1.0 < high and high - low < 0.15


def test_router_scores() -> None:
    s = peer.score_routes(["a", "b", "oos", "oos"], ["a", "oos", "oos", "b"])
    assert s == {"accuracy": 0.5, "in_scope_accuracy": 0.5, "oos_recall": 0.5, "n": 4, "n_oos": 2}


def test_quota_scale_on_real_redis(redis_server) -> None:
    ctx = quick_ctx(redis_url=redis_server.url)
    out = scale.run(ctx)
    quota = out["results"]["quota"]
    for policy in ("memory", "redis"):
        r = quota[policy]
        assert r["status"] == "ok", r
        assert r["one_consumer"]["n"] == r["many_consumers"]["n"] == 200
    t = next(t for t in out["targets"] if "(redis)" in t.name)
    assert t.measured == pytest.approx(quota["redis"]["many_consumers"]["p50_ms"] / quota["redis"]["one_consumer"]["p50_ms"])
    # The benchmark cleans its keys out of the shared Redis.
    client = redis_server.client()
    try:
        assert not list(client.scan_iter(match="aigov:bench:*", count=1000))
    finally:
        client.close()


def test_cli_writes_json_and_survives_section_failures(tmp_path: Path, redis_server,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from aigov import cli

    out = tmp_path / "bench.json"
    # Section 3 is made to crash: the run records it as an error and still writes section 5.
    import aigov.bench.embeddings as emb

    monkeypatch.setattr(emb, "run", lambda ctx: (_ for _ in ()).throw(RuntimeError("boom")))
    code = cli.main(["bench", "--quick", "--sections", "3,5", "--out", str(out),
                     "--redis-url", redis_server.url])
    report = json.loads(out.read_text())
    assert code == 1
    assert report["quick"] is True and report["machine"]["cores"] >= 1
    assert report["sections"]["3"]["status"] == "error" and "boom" in report["sections"]["3"]["reason"]
    assert report["sections"]["5"]["status"] == "ok"
    assert "| 5 |" in report["table_markdown"]
    assert cli.main(["bench", "--sections", "9", "--out", str(out)]) == 2


def test_embeddings_section_ratio_from_measured_rates() -> None:
    from aigov.bench import embeddings

    out = embeddings.run(quick_ctx())
    levels = out["results"]["levels"]
    assert {(lv["mode"], lv["concurrency"]) for lv in levels} == {
        (m, c) for m in ("batch1", "microbatch") for c in (1, 8, 32)}
    rate = {(lv["mode"], lv["concurrency"]): lv["embeddings_per_s"] for lv in levels}
    assert out["targets"][0].measured == rate[("microbatch", 32)]
    assert out["results"]["speedup_vs_batch1"]["32"] == pytest.approx(
        rate[("microbatch", 32)] / rate[("batch1", 32)], abs=0.01)
    # Concurrent requests really were merged into fewer model calls.
    mb32 = next(lv for lv in levels if lv["mode"] == "microbatch" and lv["concurrency"] == 32)
    assert mb32["model_calls"] < mb32["embeddings"]


def test_idle_wake_cost_times_the_same_work_hot_and_after_idle() -> None:
    from aigov.bench.request_path import idle_wake_cost

    texts = [f"what is the capital of country number {i}" for i in range(12)]
    out = idle_wake_cost(texts, idle_ms=2, rounds=12)
    assert out["idle_ms"] == 2
    assert out["hot_p50_ms"] > 0 and out["after_idle_p50_ms"] > 0
    # The verdict is a ratio of the two medians of this call, not a fixed number.
    assert out["factor"] == round(out["after_idle_p50_ms"] / out["hot_p50_ms"], 1)


@pytest.mark.parametrize("capture", ["response", "log"])
def test_the_pdk_floor_plugin_makes_exactly_the_quotas_calls(capture: str, redis_server, mock_llm) -> None:
    """Section 2 reads the quota's own work as (quota added) - (bench-pdk-floor added): that holds
    only while the floor plugin makes the quota's PDK calls, phase by phase, in both capture modes."""
    from aigov.bench.request_path import FLOOR_PLUGIN, ai_proxy_plugin
    from kongsim.gateway import aigov_entries
    from kongsim.pytest_plugin import AIGOV_PLUGINS, make_prefix, start_recorded_gateway

    repo = str(Path(__file__).resolve().parents[1])
    env = {"AIGOV_CAPTURE_PHASE": "log"} if capture == "log" else {}
    prefix = make_prefix()
    entries = (aigov_entries(AIGOV_PLUGINS, prefix, pythonpath=repo, extra_env=env)
               + aigov_entries((FLOOR_PLUGIN,), prefix, pythonpath=repo,
                               extra_env={**env, "AIGOV_PLUGINS_DIR": str(common.NOOP_PLUGINS_DIR)}))
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    quota = {"name": "llm-token-quota", "config": {
        "policy": "redis", "redis": {"host": "127.0.0.1", "port": port, "timeout_ms": 2000},
        "limits": [{"window": "day", "tokens": 1_000_000}]}}
    floor = {"name": FLOOR_PLUGIN, "config": {}}
    extra = [ai_proxy_plugin(mock_llm.url)] if capture == "log" else []
    auth = {"name": "key-auth", "config": {"key_names": ["apikey"]}}
    config = {"_format_version": "3.0",
              "consumers": [{"username": "floor", "keyauth_credentials": [{"key": "floor-key"}]}],
              "services": [{"name": "llm", "url": mock_llm.url, "routes": [
                  {"name": n, "paths": [f"/{n}"], "strip_path": True, "plugins": [auth, *extra, p]}
                  for n, p in (("quota", quota), ("floor", floor))]}]}
    gw, calls = start_recorded_gateway(config, server=entries, prefix=prefix, pythonpath=repo)
    try:
        seen = {}
        for route, name in (("quota", "llm-token-quota"), ("floor", FLOOR_PLUGIN)):
            reply = gw.request("POST", f"/{route}/v1/chat/completions", headers={"apikey": "floor-key"},
                               json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status == 200, reply.body[:300]
            assert gw.wait_logs(20)
            rid = reply.header("X-Kong-Request-Id")
            seen[name] = {phase: calls.calls(rid, name, phase) for phase in ("access", "response", "log")}
    finally:
        gw.close()
    assert seen[FLOOR_PLUGIN] == seen["llm-token-quota"]
    assert len(seen["llm-token-quota"]["access"]) == 4
    assert bool(seen["llm-token-quota"]["response"]) == (capture == "response")
    assert ("kong.log.serialize" in seen["llm-token-quota"]["log"]) == (capture == "log")


def test_request_path_rows_need_all_200s_and_real_hits() -> None:
    from aigov.bench import request_path

    assert request_path._all_ok({"http_statuses": {200: 200}})
    assert not request_path._all_ok({"http_statuses": {200: 150, 429: 50}})  # fast 429s would look cheap
    assert not request_path._all_ok({"http_statuses": {}})
    # 200s from a plugin that failed open (no headers of its own) are not its request path
    assert not request_path._all_ok({"http_statuses": {200: 200}, "replies_without_plugin_headers": 3})
    assert request_path._mostly_hits({"repeat_cache_status": {"hit": 95, "miss": 5}})
    assert not request_path._mostly_hits({"repeat_cache_status": {"hit": 1, "miss": 99}})
    assert not request_path._mostly_hits({})


def test_scale_gives_no_cache_verdict_when_lookups_miss_their_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    def level(entries: int, p50: float, found: float) -> dict:
        return {"entries": entries, "lookup": {"p50_ms": p50}, "nearest_found": found}

    quota = {"status": "ok", "consumers": 10, "one_consumer": {"p50_ms": 1.0}, "many_consumers": {"p50_ms": 1.1}}
    monkeypatch.setattr(scale, "quota_scale", lambda ctx, policy: dict(quota))
    ctx = BenchContext(quick=True)
    for found, expect in ((1.0, True), (0.2, None)):
        monkeypatch.setattr(scale, "cache_scale", lambda c, f=found: {
            "status": "ok", "levels": [level(1000, 1.0, 1.0), level(100000, 1.2, f)]})
        (cache_target, *_) = scale.run(ctx)["targets"]
        assert cache_target.holds is expect, cache_target
        if expect is None:
            assert "recall@1" in cache_target.note


def test_peer_targets_are_the_ratios_of_the_compared_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    lat = lambda p50: {"p50_ms": p50}  # noqa: E731
    cache = {"ours": {"status": "ok", "best": {"f1": 0.70}, "lookup_latency_given_vector": lat(0.5)},
             "redisvl": {"status": "ok", "best": {"f1": 0.80}, "check_latency_given_vector": lat(0.6)},
             "f1_bootstrap": {"f1_difference": -0.1, "ci95_low": -0.2, "ci95_high": 0.01,
                              "ratio_ci95": [0.75, 1.01]},
             "given_vector_p50_ratio_ci95": [1.1, 1.3]}
    router = {"ours": {"status": "ok", "accuracy": 0.9}, "redisvl": {"status": "ok", "accuracy": 0.75},
              "nearest_neighbour": {"status": "ok", "accuracy": 0.8}}
    monkeypatch.setattr(peer, "VectorTable", lambda embedder: None)
    monkeypatch.setattr(peer, "compare_cache", lambda ctx, table: cache)
    monkeypatch.setattr(peer, "compare_router", lambda ctx, table: router)
    ctx = BenchContext(quick=True)
    monkeypatch.setattr(ctx, "embedder", lambda: None)
    by_name = {t.name: t for t in peer.run(ctx)["targets"]}
    f1 = by_name["cache best F1, ours / RedisVL"]
    assert f1.measured == pytest.approx(0.70 / 0.80) and f1.verdict == "tie"  # its interval holds 1
    assert "[-0.200, +0.010]" in f1.note and f1.interval == (0.75, 1.01)
    lookup = by_name["cache lookup p50 (given vector), RedisVL / ours"]
    assert lookup.measured == pytest.approx(0.6 / 0.5) and lookup.verdict == "yes"
    table = bench_run.summary_table({"sections": {"4": {"status": "ok", "targets": [f1.as_dict(), lookup.as_dict()]}}})
    assert "tie (within noise)" in table and "(95% interval 0.75–1.01)" in table and "| yes |" in table
    assert by_name["router accuracy, ours / nearest neighbour"].measured == pytest.approx(0.9 / 0.8)
    assert by_name["router accuracy, ours / RedisVL"].measured == pytest.approx(0.9 / 0.75)


def test_quota_rows_need_redis_to_count_what_the_upstream_billed(redis_server, mock_llm) -> None:
    """A quota that fails open to local memory still answers 200 with its headers: section 2's
    added-latency row is then not the quota's request path, and only the Redis counters can tell."""
    from aigov.bench import request_path
    from aigov.devredis import free_port

    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])

    def tokens_counted() -> tuple[int, int]:
        return request_path.quota_tokens_in_redis(redis_server.url), mock_llm.stats.snapshot()["tokens_billed"]

    prompts = [f"question number {i} about the weather" for i in range(9)]
    records = {}
    for label, redis_port in (("redis up", port), ("redis unreachable", free_port())):
        conf = request_path.plugin_configs("127.0.0.1", redis_port)["llm-token-quota"]
        records[label] = request_path.run_variant(
            quick_ctx(), "llm-token-quota", [{"name": "llm-token-quota", "config": conf}], mock_llm.url,
            prompts, upstream_ms=0, tokens_counted=tokens_counted)
    up, down = records["redis up"], records["redis unreachable"]
    # Same replies either way: all 200, every one with the quota's headers.
    for rec in (up, down):
        assert rec["http_statuses"] == {200: 4} and rec["replies_without_plugin_headers"] == 0
    billed = up["quota_accounting"]["billed_tokens"]
    assert billed > 9 * 10  # nine requests, each its prompt and answer
    assert up["quota_accounting"]["redis_tokens"] == billed and request_path._all_ok(up)
    assert down["quota_accounting"]["billed_tokens"] > 0
    assert down["quota_accounting"]["redis_tokens"] == 0 and not request_path._all_ok(down)
