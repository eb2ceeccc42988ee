"""`aigov demo` (`make demo`): replay real prompts through the whole stack and print a report.

The stack, all on 127.0.0.1 and all stopped at the end whatever happens (try/finally, SIGTERM /
SIGINT / SIGHUP unwind to it, the plugin server watches its parent, Redis dies with us):
  - the mock LLM (aigov.mockllm, serving gpt-4o and gpt-4o-mini) or, with --provider-url, a real
    OpenAI-compatible provider (key from $AIGOV_DEMO_API_KEY, passed as a Kong vault reference so
    it is never written to disk);
  - Redis 8 + RediSearch from the PyPI wheels (aigov.devredis), unless DEMO_STORE=memory;
  - `aigov serve` (one process, the three plugins, Prometheus metrics on a local port);
  - the Kong stand-in (kongsim) with a demo variant of spec/kong.yml written to out/demo/kong.yml:
    hosts rewritten to the local ports, the router's routes replaced by the CLINC150 domains
    (utterances from the train split) and four calibration routes added.

Then: a latency calibration (each plugin alone vs none, which also warms the model), the replay
(aigov.demo.plan: one client thread per consumer, so consumers run concurrently while each one's
own order, and therefore every figure, is deterministic), a cross-check of the report against
the plugin server's metrics and the mock's counters, and the report (text, JSON, PNG).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import http.client
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

from aigov.demo import plan as demo_plan
from aigov.demo import report as demo_report

log = logging.getLogger("aigov.demo")

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC = REPO_ROOT / "spec" / "kong.yml"
PLUGINS = ("llm-semantic-cache", "llm-token-quota", "llm-semantic-router")
API_KEY_ENV = "AIGOV_DEMO_API_KEY"
# Names the stand-in's env vault resolves; values live only in this process's memory.
VAULT_KEY_VAR = "AIGOV_DEMO_API_KEY"
VAULT_AUTH_VAR = "AIGOV_DEMO_AUTHORIZATION"
CONSUMER_KEYS = {"alice": "alice-demo-key", "bob": "bob-demo-key", "carol": "carol-demo-key"}
CALIBRATION_ROUTES = ("none", "llm-semantic-router", "llm-token-quota", "llm-semantic-cache")
REQUEST_TIMEOUT_S = 60.0
DEBUG_HEADER = "X-Kong-Request-Debug"
DEBUG_OUTPUT_HEADER = "x-kong-request-debug-output"
# Phases that keep the client waiting; `log` runs after the response (Kong's timer).
CLIENT_PHASES = ("rewrite", "access", "response", "header_filter", "body_filter")


class DemoError(RuntimeError):
    """The demo cannot run (missing data, a component did not start); the message says why."""


class _Stop(BaseException):
    """Raised from a signal handler so the stack unwinds through its finally blocks."""


# --------------------------------------------------------------------------- config

def _base_url(url: str) -> str:
    """The provider's base URL without a trailing /v1 (the routes add /v1/chat/completions)."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def demo_kong_config(spec: Mapping[str, Any], *, upstream_url: str, calibration_url: str,
                     routes: list[dict[str, Any]], store: str, redis_port: int | None,
                     router_cache_dir: str | None, provider: bool) -> dict[str, Any]:
    """spec/kong.yml with the places its header comment lists rewritten for local ports, the
    demo's router routes, and the calibration routes. `spec` is not modified."""
    cfg = copy.deepcopy(dict(spec))
    base = _base_url(upstream_url)

    def store_conf(conf: dict[str, Any], key: str) -> None:
        if store == "memory":
            conf[key] = "memory"
            conf.pop("redis", None)
        else:
            conf[key] = "redis"
            conf["redis"] = {**(conf.get("redis") or {}), "host": "127.0.0.1", "port": redis_port}

    def fix_plugin(p: dict[str, Any], route_name: str | None) -> None:
        conf = p.setdefault("config", {})
        if p["name"] == "llm-token-quota":
            store_conf(conf, "policy")
        elif p["name"] == "llm-semantic-cache":
            store_conf(conf.setdefault("vectordb", {}), "strategy")
        elif p["name"] == "llm-semantic-router":
            fixed_model = route_name == "ai-proxy-chat"  # ai-proxy fixes the model: keep its one
            rs = copy.deepcopy(routes)
            for r in rs:
                if fixed_model:
                    r["target"]["model"] = demo_plan.ECONOMY_MODEL
                if provider and not fixed_model:
                    r["target"]["api_key"] = f"{{vault://env/{VAULT_KEY_VAR.lower()}}}"
            conf["routes"] = rs
            conf["default_route"] = demo_plan.DEFAULT_ROUTE
            # The spec's off-topic examples belong to its own two routes: next to the CLINC150
            # domains they would send in-scope queries (weather, calories) to the default route.
            # The demo's default route carries CLINC150's own out-of-scope utterances instead.
            conf.pop("negative_utterances", None)
            conf["build_timeout_ms"] = 55000  # the first request may wait for the training
            if router_cache_dir:
                conf["cache_dir"] = router_cache_dir
        elif p["name"] == "ai-proxy":
            opts = conf.setdefault("model", {}).setdefault("options", {})
            opts["upstream_url"] = f"{base}/v1/chat/completions"
            if provider:
                conf["auth"] = {"header_name": "Authorization",
                                "header_value": f"{{vault://env/{VAULT_AUTH_VAR.lower()}}}"}

    for service in cfg.get("services") or []:
        service["url"] = base
        for route in service.get("routes") or []:
            for p in route.get("plugins") or []:
                fix_plugin(p, route.get("name"))
    route_names = {r.get("name") for s in cfg.get("services") or [] for r in s.get("routes") or []}
    for p in cfg.get("plugins") or []:
        fix_plugin(p, p.get("route") if p.get("route") in route_names else None)

    # Calibration: the same plugins, one per route, against the mock (never a paid provider).
    calib_plugins: dict[str, dict[str, Any]] = {
        "llm-semantic-router": {"name": "llm-semantic-router", "config": {"routes": copy.deepcopy(routes),
                                                                          "default_route": demo_plan.DEFAULT_ROUTE}},
        "llm-token-quota": {"name": "llm-token-quota", "config": {"limits": [{"window": "day", "tokens": 10 ** 9}]}},
        "llm-semantic-cache": {"name": "llm-semantic-cache",
                               "config": {"vectordb": {"namespace": "aigov-demo-calibration"}}},
    }
    for name, p in calib_plugins.items():
        fix_plugin(p, None)
    cfg.setdefault("services", []).append({
        "name": "demo-calibration", "url": f"{calibration_url.rstrip('/')}/v1/chat/completions",
        "routes": [{"name": f"calibration-{name}", "paths": [f"/calibration/{name}"], "methods": ["POST"],
                    "strip_path": True, "plugins": [calib_plugins[name]] if name in calib_plugins else []}
                   for name in CALIBRATION_ROUTES]})
    return cfg


def plugin_server_entries(prefix: str, metrics_addr: str, extra_env: Mapping[str, str],
                          python: str = sys.executable) -> list[Any]:
    """One `aigov serve` for the three plugins (started by the first entry), with metrics on."""
    from kongsim.gateway import aigov_entries

    return aigov_entries(PLUGINS, prefix, python=python, extra_env=extra_env,
                         serve_args=["--metrics-listen", metrics_addr])


# --------------------------------------------------------------------------- the stack

@dataclasses.dataclass
class Stack:
    gateway: Any
    url: str
    metrics_url: str
    mock: Any
    redis: Any
    config_path: Path

    @property
    def processes(self) -> dict[str, int | None]:
        server = next(iter(self.gateway.managed.values()), None)
        return {"plugin_server": server.pid if server else None,
                "redis": self.redis.pid if self.redis else None}

    @property
    def ports(self) -> dict[str, int]:
        out = {"gateway": urlsplit(self.url).port or 0, "metrics": urlsplit(self.metrics_url).port or 0}
        if self.mock is not None:
            out["mock_llm"] = self.mock.port
        if self.redis is not None and self.redis.port:
            out["redis"] = self.redis.port
        return out


class StackRunner:
    """Starts the pieces in order and stops whatever started, in reverse, on close()."""

    def __init__(self, args: argparse.Namespace, routes: list[dict[str, Any]], out_dir: Path) -> None:
        self.args = args
        self.routes = routes
        self.out_dir = out_dir
        self._closers: list[tuple[str, Any]] = []
        self.prefix: str | None = None

    def start(self) -> Stack:
        import yaml

        from aigov import tokens
        from aigov.devredis import free_port
        from aigov.mockllm import MockLLM
        from kongsim.gateway import RECOMMENDED_BODY_SIZES, Gateway

        tokens.ensure_offline_encodings()
        mock = MockLLM("127.0.0.1", 0, models=["gpt-4o", "gpt-4o-mini"],
                       latency_ms=self.args.mock_latency_ms).start()
        self._closers.append(("mock LLM", mock.stop))
        redis = None
        if self.args.store == "redis":
            from aigov.devredis import DevRedisError, RedisServer
            try:
                redis = RedisServer()
            except DevRedisError as exc:
                raise DemoError(f"{exc} (or run with DEMO_STORE=memory)") from None
            self._closers.append(("redis", redis.close))
            redis.start()
        spec = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
        provider = self.args.provider_url is not None
        cfg = demo_kong_config(spec, upstream_url=self.args.provider_url or mock.url, calibration_url=mock.url,
                               routes=self.routes, store=self.args.store,
                               redis_port=redis.port if redis else None,
                               router_cache_dir=str(self.out_dir / "router-cache"), provider=provider)
        config_path = self.out_dir / "kong.yml"
        config_path.write_text("# generated by `aigov demo` from spec/kong.yml; do not edit\n"
                               + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        environ = dict(os.environ)
        if provider:
            key = os.environ.get(self.args.api_key_env, "")
            if not key:
                raise DemoError(f"--provider-url needs the API key in ${self.args.api_key_env}")
            environ[VAULT_KEY_VAR] = key
            environ[VAULT_AUTH_VAR] = f"Bearer {key}"
        # The plugin server gets Kong's near-empty environment: pass what it needs explicitly.
        extra_env = {"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false",
                     "TIKTOKEN_CACHE_DIR": os.environ.get("TIKTOKEN_CACHE_DIR", str(REPO_ROOT / ".cache" / "tiktoken"))}
        self.prefix = tempfile.mkdtemp(prefix="aigov-demo-", dir="/tmp")  # short: socket paths are limited
        metrics_addr = f"127.0.0.1:{free_port()}"
        gw = Gateway(cfg, plugin_server_entries(self.prefix, metrics_addr, extra_env), workers=2,
                     environ=environ, **RECOMMENDED_BODY_SIZES)  # Kong as kong.conf.example sets it
        self._closers.append(("gateway", gw.close))
        gw.start()
        url = gw.serve("127.0.0.1", 0)
        return Stack(gw, url, f"http://{metrics_addr}/metrics", mock, redis, config_path)

    def close(self) -> None:
        import shutil

        while self._closers:
            name, closer = self._closers.pop()
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                log.error("stopping %s failed: %s", name, exc)
        if self.prefix:
            shutil.rmtree(self.prefix, ignore_errors=True)


# --------------------------------------------------------------------------- requests

@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed_ms: float

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def post(base_url: str, path: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Reply:
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=REQUEST_TIMEOUT_S)
    started = time.perf_counter()
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()  # streams too: http.client undoes the chunked encoding
        elapsed = (time.perf_counter() - started) * 1000
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, elapsed)
    finally:
        conn.close()


def _completion(reply: Reply, stream: bool) -> dict[str, Any]:
    from aigov import sse

    if reply.status != 200:
        return {}
    try:
        if stream or (reply.header("content-type") or "").startswith("text/event-stream"):
            completion, _complete = sse.completion_from_chat_chunks(reply.body)
            return completion
        data = json.loads(reply.body)
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def _error_message(reply: Reply) -> str | None:
    if reply.status == 200:
        return None
    try:
        data = json.loads(reply.body)
        err = data.get("error") if isinstance(data, dict) else None
        msg = err.get("message") if isinstance(err, dict) else (data.get("message") if isinstance(data, dict) else None)
        return str(msg)[:300] if msg else reply.body[:300].decode("utf-8", "replace")
    except ValueError:
        return reply.body[:300].decode("utf-8", "replace")


def plugin_times(debug_output: str | None) -> dict[str, float] | None:
    """Plugin name -> ms it kept the client waiting, from X-Kong-Request-Debug-Output (Kong's
    timing tree: <phase>.child.plugins.child.<name>.total_time); None without the header."""
    if not debug_output:
        return None
    try:
        tree = json.loads(debug_output)
    except ValueError:
        return None
    out: dict[str, float] = {}
    phases = tree.get("child") if isinstance(tree, dict) else None
    for phase, node in (phases or {}).items():
        if phase not in CLIENT_PHASES or not isinstance(node, dict):
            continue
        plugins = ((node.get("child") or {}).get("plugins") or {}).get("child") or {}
        for name, pnode in plugins.items():
            if isinstance(pnode, dict):
                out[name] = out.get(name, 0.0) + float(pnode.get("total_time") or 0)
    return out


def result_record(req: demo_plan.PlannedRequest, reply: Reply, t_s: float) -> dict[str, Any]:
    """What the client saw for one request, with the plan's labels."""
    completion = _completion(reply, req.stream)
    usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else {}
    cache_status = reply.header("x-cache-status")
    hit = cache_status == "Hit" and reply.status == 200
    model = completion.get("model") if isinstance(completion.get("model"), str) else None
    choices = completion.get("choices") or []
    answer = ""
    if choices and isinstance(choices[0], dict):
        answer = str((choices[0].get("message") or {}).get("content") or "")
    rec: dict[str, Any] = {
        **dataclasses.asdict(req), "expected_route": req.expected_route, "t_s": round(t_s, 3),
        "status": reply.status, "elapsed_ms": round(reply.elapsed_ms, 2),
        "upstream_ms": _int(reply.header("x-kong-upstream-latency")) if reply.header("x-kong-upstream-latency") else None,
        "cache_status": cache_status, "cache_key": reply.header("x-cache-key"),
        "cache_layer": ("semantic" if reply.header("x-cache-similarity") else "exact") if hit else None,
        "similarity": float(reply.header("x-cache-similarity") or 0) or None if hit else None,
        "route": reply.header("x-semantic-route"), "route_reason": reply.header("x-semantic-route-reason"),
        "route_score": float(reply.header("x-semantic-route-score") or 0) if reply.header("x-semantic-route-score") else None,
        "upstream_model": model if not hit else None, "answer": answer[:160],
        "usage_prompt_tokens": _int(usage.get("prompt_tokens")),
        "usage_completion_tokens": _int(usage.get("completion_tokens")),
        "usage_total_tokens": _int(usage.get("total_tokens")),
        "spent_prompt_tokens": _int(reply.header("x-ai-tokens-prompt")),
        "spent_completion_tokens": _int(reply.header("x-ai-tokens-completion")),
        "spent_cost_usd": float(reply.header("x-ai-cost-usd") or 0),
        "saved_prompt_tokens": 0, "saved_completion_tokens": 0, "saved_cost_usd": 0.0,
        "error": _error_message(reply), "hit_of": None,
        "plugin_ms": plugin_times(reply.header(DEBUG_OUTPUT_HEADER)),
    }
    if hit:
        rec["saved_prompt_tokens"] = rec["usage_prompt_tokens"]
        rec["saved_completion_tokens"] = rec["usage_completion_tokens"]
        rec["saved_cost_usd"] = demo_report.saved_cost_usd(model, rec["usage_prompt_tokens"],
                                                          rec["usage_completion_tokens"])
    return rec


def attribute_hits(results: list[dict[str, Any]]) -> None:
    """hit_of: the earlier request whose stored answer a hit served (same X-Cache-Key)."""
    stored_by: dict[tuple[str, str], int] = {}
    for r in sorted(results, key=lambda r: (r["consumer"], r["seq"])):
        key = r.get("cache_key")
        if not key:
            continue
        if r.get("cache_status") == "Hit":
            r["hit_of"] = stored_by.get((r["consumer"], key))
        elif r["status"] == 200 and (r["consumer"], key) not in stored_by:
            stored_by[(r["consumer"], key)] = r["index"]


def replay(url: str, planned: Sequence[demo_plan.PlannedRequest], progress: bool) -> list[dict[str, Any]]:
    """One thread per consumer, each sending its requests in plan order."""
    by_consumer: dict[str, list[demo_plan.PlannedRequest]] = {}
    for req in planned:
        by_consumer.setdefault(req.consumer, []).append(req)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    started = time.monotonic()
    done = [0]

    def worker(reqs: list[demo_plan.PlannedRequest]) -> None:
        try:
            for req in reqs:
                # Kong's request debugging (honoured from loopback): per-plugin time per request
                headers = {"apikey": CONSUMER_KEYS[req.consumer], DEBUG_HEADER: "*"}
                reply = post(url, req.path, req.body(), headers)
                rec = result_record(req, reply, time.monotonic() - started)
                with lock:
                    results.append(rec)
                    done[0] += 1
                    if progress and done[0] % 25 == 0:
                        print(f"  ... {done[0]}/{len(planned)} requests", file=sys.stderr, flush=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(reqs,), name=f"demo-{name}", daemon=True)
               for name, reqs in by_consumer.items()]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)  # short joins: a signal handler can interrupt the main thread
    if errors:
        raise DemoError(f"a client thread failed: {errors[0]!r}")
    results.sort(key=lambda r: r["index"])
    attribute_hits(results)
    return results


def calibrate(url: str, prompts: list[str], per_route: int) -> dict[str, Any]:
    """Added latency per plugin: each calibration route has one plugin (or none); the gateway's
    own time (client time minus upstream time) is compared with the bare route's. The first
    requests also warm the plugin server (model load, router training) and are not counted."""
    warm_deadline = time.monotonic() + 180
    for name in CALIBRATION_ROUTES:
        while True:
            r = post(url, f"/calibration/{name}", {"model": "gpt-4o-mini", "max_tokens": 16,
                                                  "messages": [{"role": "user", "content": f"warm up {name}"}]})
            # the router answers reason "error" while its model is still being trained
            if r.header("x-semantic-route-reason") != "error" or time.monotonic() > warm_deadline:
                break
            time.sleep(1.0)
        if r.status != 200:
            raise DemoError(f"calibration route {name} answered {r.status}: {_error_message(r)}")
    overheads: dict[str, list[float]] = {name: [] for name in CALIBRATION_ROUTES}
    for i in range(per_route):
        for name in CALIBRATION_ROUTES:  # interleaved: load changes hit every route alike
            text = prompts[i % len(prompts)] if prompts else f"calibration prompt {i}"
            r = post(url, f"/calibration/{name}", {"model": "gpt-4o-mini", "max_tokens": 16,
                                                  "messages": [{"role": "user", "content": f"{text} ({i})"}]})
            upstream = _int(r.header("x-kong-upstream-latency"))
            overheads[name].append(max(0.0, r.elapsed_ms - upstream))
    out = demo_report.latency_from_samples(overheads)
    out.update(method="calibration: each plugin alone vs none, cache misses", samples=per_route)
    return out


# --------------------------------------------------------------------------- metrics

def scrape(metrics_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as resp:  # noqa: S310 - our own 127.0.0.1 URL
        text = resp.read().decode("utf-8")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
               **labels: str) -> float:
    total = 0.0
    for (n, lbls), v in samples.items():
        d = dict(lbls)
        if n == name and all(d.get(k) == val for k, val in labels.items()):
            total += v
    return total


def cross_checks(summary: Mapping[str, Any], results: Sequence[Mapping[str, Any]], before: Mapping, after: Mapping,
                 upstream_calls: int | None) -> dict[str, Any]:
    """The report against the plugin server's own counters (deltas over the replay)."""
    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    def check(report_value: float, metric_value: float) -> dict[str, Any]:
        return {"report": report_value, "metrics": metric_value, "ok": abs(report_value - metric_value) < 1e-6}

    cache = summary["cache"]
    checks: dict[str, Any] = {
        "cache_hits": check(cache["hits"], delta("ai_llm_requests_total", cache_status="hit")),
        "cache_misses": check(cache["misses"], delta("ai_llm_requests_total", cache_status="miss")),
    }
    for name, c in summary["consumers"].items():
        tag = name  # the quota labels a Kong consumer by its username, as Kong's prometheus does
        checks[f"tokens_spent[{name}]"] = check(
            c["spent"]["total_tokens"],
            delta("ai_llm_tokens_total", token_type="prompt_tokens", consumer=tag)
            + delta("ai_llm_tokens_total", token_type="completion_tokens", consumer=tag))
        checks[f"tokens_saved[{name}]"] = check(
            c["saved"]["total_tokens"],
            delta("ai_llm_tokens_total", token_type="saved_prompt_tokens", consumer=tag)
            + delta("ai_llm_tokens_total", token_type="saved_completion_tokens", consumer=tag))
        checks[f"quota_rejections[{name}]"] = check(c["quota"]["rejections"],
                                                   delta("ai_quota_rejections_total", consumer=tag))
    for route, r in summary["routing"]["routes"].items():
        checks[f"router_decisions[{route}]"] = check(r["decisions"], delta("ai_router_decisions_total", route=route))
    totals = summary["totals"]
    checks["spent_plus_saved_equals_served_usage"] = check(totals["spent_tokens"] + totals["saved_tokens"],
                                                          totals["served_usage_tokens"])
    if upstream_calls is not None:
        # every answered request that was not a cache hit reached the upstream exactly once
        reached = sum(1 for r in results if r["status"] == 200 and r.get("cache_status") != "Hit")
        checks["upstream_calls"] = check(reached, upstream_calls)
    return checks


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=300, help="requests in the replay (default 300)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the plan (same seed, same plan)")
    parser.add_argument("--store", choices=["redis", "memory"], default=os.environ.get("DEMO_STORE") or "redis",
                        help="redis (a local Redis 8 + RediSearch from the PyPI wheels) or memory; "
                             "default $DEMO_STORE or redis")
    parser.add_argument("--provider-url", default=os.environ.get("AIGOV_DEMO_PROVIDER_URL"),
                        help="a real OpenAI-compatible provider's base URL (e.g. https://api.openai.com) "
                             "instead of the mock; the key comes from --api-key-env")
    parser.add_argument("--api-key-env", default=API_KEY_ENV,
                        help=f"environment variable that holds the provider's key (default {API_KEY_ENV})")
    parser.add_argument("--calibration", type=int, default=0,
                        help="also measure per-plugin latency with N requests per calibration route "
                             "(each plugin alone vs none); the report uses it when the gateway sends no "
                             "X-Kong-Request-Debug-Output (default 0: warm-up only)")
    parser.add_argument("--mock-latency-ms", type=float, default=20.0, help="the mock LLM's answer delay")
    parser.add_argument("--data-dir", default=None,
                        help=f"directory of CLINC150 (default ${demo_plan.DATA_ENV} or ../shared/data)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "demo", help="output directory")
    parser.add_argument("--no-png", action="store_true", help="skip report.png")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the stack's info messages")


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO_ROOT / ".cache" / "tiktoken"))
    if args.requests < 1 or args.calibration < 0:
        print("aigov demo: --requests must be >= 1 and --calibration >= 0", file=sys.stderr)
        return 2
    if args.store not in ("redis", "memory"):  # a bad $DEMO_STORE bypasses argparse's choices
        print(f"aigov demo: store {args.store!r} is neither redis nor memory (check DEMO_STORE)", file=sys.stderr)
        return 2
    try:
        directory = demo_plan.data_dir(args.data_dir)
        planned = demo_plan.build_plan(args.requests, args.seed, demo_plan.load_split(directory, "validation"))
        train = demo_plan.load_split(directory, "train")
    except (demo_plan.DataError, OSError) as exc:
        print(f"aigov demo: {exc}", file=sys.stderr)
        return 2
    routes = demo_plan.router_routes(train, args.seed)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    runner = StackRunner(args, routes, out_dir)
    started = time.monotonic()
    stack: Stack | None = None
    try:
        print(f"aigov demo: starting the stack (store={args.store}, "
              f"{'provider ' + _base_url(args.provider_url) if args.provider_url else 'mock LLM'})", file=sys.stderr)
        stack = runner.start()
        print(f"aigov demo: gateway {stack.url}, metrics {stack.metrics_url}; calibrating and warming up",
              file=sys.stderr, flush=True)
        prompts = demo_plan.calibration_prompts(train, max(args.calibration, 1), args.seed)
        if args.calibration:
            latency = calibrate(stack.url, prompts, args.calibration)
        else:
            calibrate(stack.url, prompts, 0)  # still warms the model and trains the router
            latency = {}
        stack.gateway.runloop.wait_logs(10)
        before = scrape(stack.metrics_url)
        mock_before = stack.mock.stats.snapshot()["by_path"].get("/v1/chat/completions", 0)
        print(f"aigov demo: replaying {len(planned)} CLINC150 prompts from {len(CONSUMER_KEYS)} consumers",
              file=sys.stderr, flush=True)
        results = replay(stack.url, planned, progress=True)
        stack.gateway.runloop.wait_logs(15)
        after = scrape(stack.metrics_url)
        upstream_calls = None if args.provider_url else (
            stack.mock.stats.snapshot()["by_path"].get("/v1/chat/completions", 0) - mock_before)
        summary = demo_report.summarize(results, latency)
        checks = cross_checks(summary, results, before, after, upstream_calls)
        files = {"json": out_dir / "report.json", "requests": out_dir / "requests.jsonl", "kong_yml": stack.config_path}
        if not args.no_png:
            files["png"] = out_dir / "report.png"
        report = {
            "meta": {"seed": args.seed, "store": args.store, "requests": args.requests,
                     "provider": _base_url(args.provider_url) if args.provider_url else "mock",
                     "data": str(directory), "duration_s": round(time.monotonic() - started, 1),
                     "processes": stack.processes, "ports": stack.ports,
                     "files": {k: str(v) for k, v in files.items()}},
            "summary": summary, "checks": checks,
        }
    except _Stop as stop:
        print(f"aigov demo: stopped by {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("aigov demo: interrupted", file=sys.stderr)
        return 130
    except (DemoError, TimeoutError, RuntimeError, OSError, ValueError) as exc:
        print(f"aigov demo: {exc}", file=sys.stderr)
        return 1
    finally:
        # a second signal must not cut the shutdown short: ignore them until everything stopped
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            previous.setdefault(s, signal.getsignal(s))
            signal.signal(s, signal.SIG_IGN)
        runner.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    with files["requests"].open("w", encoding="utf-8") as fh:
        for r in results:
            fh.write(json.dumps(r) + "\n")
    demo_report.write_json(report, files["json"])
    if "png" in files:
        demo_report.write_png(report, files["png"])
    print(demo_report.render_text(report))
    return 0 if all(v.get("ok", True) for v in checks.values()) else 1
