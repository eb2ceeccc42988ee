"""Handler of the llm-token-quota Kong plugin: reserve in access, settle after the response.

Phases
- access: parse the chat request, price it, estimate it (tiktoken prompt count + max_tokens or
  completion_estimate_tokens), and check-and-reserve every applicable limit atomically in the
  store. Rejects with 429 (OpenAI-shaped body, Retry-After) when a limit does not fit.
- response (default capture phase): read the buffered upstream answer, take the provider's usage
  as the truth (or count the streamed text with tiktoken when there is none), settle the
  reservation to it, and send headers that agree with the counters after the settle.
- log (always runs, also after another plugin's exit or a failed upstream): the place that
  guarantees settle-or-release exactly once. With AIGOV_CAPTURE_PHASE=log there is no response
  phase (Kong does not buffer); the settle uses ai-proxy's logged usage instead.

Priority 906: after the router (907) so the routed model is priced, before Kong's
ai-rate-limiting-advanced (905), and well before the cache (770) and ai-proxy (770), so a cache
hit that exits in access still leaves this plugin's log phase to release the reservation.

Headers (unless hide_client_headers): X-AI-RateLimit-{Limit,Remaining,Reset}-<Window> for token
limits and -Cost-<Window> for cost limits (USD with 9 decimals: exact nano-USD), Retry-After on 429, and, in the
response phase, X-AI-Tokens-Prompt, X-AI-Tokens-Completion, X-AI-Cost-USD of this request. In log
mode the response has left before the usage is known: the X-AI-RateLimit-* headers reflect the
reservation (the estimate) and the three X-AI-Tokens-*/Cost headers are absent.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from aigov import __version__
from aigov import metrics
from aigov.llm_response import LLMResponse, parse_upstream_response
from aigov.pdk import guarded, raw, text, value
from aigov.prices import Price, nano_to_usd
from aigov.quota.core import (Charge, Counter, QuotaConfig, QuotaConfigError, QuotaStore, charge_from_usage,
                              identity_tag, openai_error, plan_counters, rate_limit_headers, rejection_body)
from aigov.request import RequestError, parse_chat_request

NAME = "llm-token-quota"
VERSION = __version__
PRIORITY = 906
SHARED_KEY = "aigov"
CAPTURE_PHASE = "log" if os.environ.get("AIGOV_CAPTURE_PHASE", "").strip().lower() == "log" else "response"

_stores: dict[tuple[str, str], QuotaStore] = {}
_memory_store: QuotaStore | None = None


def memory_store() -> QuotaStore:
    """The process-wide in-memory store (the memory policy and the fail_open fallback)."""
    global _memory_store
    if _memory_store is None:
        from aigov.quota.policies.memory import MemoryQuotaStore
        _memory_store = MemoryQuotaStore()
    return _memory_store


def store_for(config: QuotaConfig) -> QuotaStore:
    if config.policy != "redis":
        return memory_store()
    from aigov.quota.policies.redis import RedisQuotaStore
    from aigov.redis_client import layer_from_config
    layer = layer_from_config(dict(config.redis or {}))
    key = (repr(layer), config.key_prefix)
    store = _stores.get(key)
    if store is None or getattr(store, "layer", None) is not layer:
        store = _stores[key] = RedisQuotaStore(layer, config.key_prefix)
    return store


class _SettledCharges:
    """Charges settled in `response`, kept in this process until the request's `log` phase.

    Saves the response phase a kong.ctx.shared.set round trip on the client's path (Kong runs
    every phase of a request on the same plugin server). If the log phase finds nothing here (the
    plugin server restarted in between), it settles again and the store answers "duplicate"
    (settle is idempotent per request id), so nothing is metered twice. Bounded: an entry whose
    log phase never comes is dropped after `ttl_s` or when `cap` is exceeded.
    """

    def __init__(self, cap: int = 65536, ttl_s: float = 900.0) -> None:
        self._items: "OrderedDict[str, tuple[float, Charge]]" = OrderedDict()
        self._lock = threading.Lock()
        self.cap, self.ttl_s = cap, ttl_s

    def put(self, request_id: str, charge: Charge) -> None:
        now = time.monotonic()
        with self._lock:
            self._items[request_id] = (now, charge)
            while len(self._items) > self.cap:
                self._items.popitem(last=False)
            while self._items:  # oldest first: drop the expired ones
                first = next(iter(self._items.values()))
                if now - first[0] <= self.ttl_s:
                    break
                self._items.popitem(last=False)

    def pop(self, request_id: Any) -> Charge | None:
        if not isinstance(request_id, str):
            return None
        with self._lock:
            item = self._items.pop(request_id, None)
        return None if item is None else item[1]


_SETTLED = _SettledCharges()


def _as_dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _sniffed_headers(stream_requested: bool, body: bytes) -> dict[str, Any]:
    """The Content-Type the upstream must have sent, without a get_headers round trip: a stream
    request answered with anything but a JSON object is SSE (a failed stream request gets a JSON
    error body); parse_upstream_response also recognises a body that starts with `data:`."""
    if stream_requested and not body.lstrip()[:1] == b"{":
        return {"content-type": "text/event-stream"}
    return {}


def _num(v: Any) -> int:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    return int(v) if ok else 0


class TokenQuotaHandler:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.quota: QuotaConfig | None = None
        self.config_error: str | None = None
        try:
            self.quota = QuotaConfig.from_plugin_config(config)
        except QuotaConfigError as exc:
            # Reported on every request (a clear 500) rather than failing StartInstance, which
            # Kong turns into an opaque 500 and a retry storm.
            self.config_error = str(exc)

    # ------------------------------------------------------------------ access
    @guarded
    def access(self, kong: Any) -> None:
        shared = _as_dict(value(kong.ctx.shared.get(SHARED_KEY)))
        if self.quota is None:
            kong.log.err(self.config_error)
            kong.response.exit(500, openai_error(self.config_error or "config error", "server_error",
                                                 "quota_config_error"), {"Content-Type": "application/json"})
            return
        q = self.quota
        body = raw(kong.request.get_raw_body())
        try:
            request = parse_chat_request(body)
        except RequestError as exc:
            if exc.reason == "too_large":
                # A readable request too big to meter is never passed on: the provider would
                # answer it, so passing it would let any client step around its quota by padding.
                kong.log.warn(f"llm-token-quota: rejected ({exc})")
                kong.log.set_serialize_value("aigov.quota.status", "rejected:too_large")
                kong.response.exit(413, openai_error(f"llm-token-quota: {exc}", "invalid_request_error",
                                                     "request_too_large"), {"Content-Type": "application/json"})
                return
            # Other unreadable bodies are not answerable chat requests: the provider rejects them
            # without spending tokens, so passing them on (the default) loses no accounting.
            if not body.strip() or q.on_malformed_request == "pass":
                # Not a chat request (or unreadable): documented pass-through, unmetered.
                kong.log.notice(f"llm-token-quota: not metering request ({exc.reason}: {exc})")
                kong.log.set_serialize_value("aigov.quota.status", f"bypass:{exc.reason}")
                return
            kong.response.exit(400, openai_error(f"llm-token-quota: {exc}", "invalid_request_error",
                                                 "invalid_request"), {"Content-Type": "application/json"})
            return

        model_asked = shared.get("model") if isinstance(shared.get("model"), str) else request.model
        model = q.prices.resolve(model_asked)
        price: Price | None = q.prices.lookup(model_asked)
        model_label = model or (model_asked or "")[:64]
        if price is None:
            action = "block" if q.unknown_model == "block" else "default_price"
            metrics.QUOTA_UNKNOWN_MODEL.labels(model_label, action).inc()
            if q.unknown_model == "block" or q.default_price is None:
                kong.log.warn(f"llm-token-quota: model {model_asked!r} has no price; blocked")
                msg = (f"llm-token-quota: model {model_asked!r} is not in the price table, so its cost "
                       f"cannot be metered; add it to the plugin's prices or set unknown_model=default_price")
                kong.response.exit(400, openai_error(msg, "invalid_request_error", "model_not_priced"),
                                   {"Content-Type": "application/json"})
                return
            price = q.default_price
            model = (model_asked or "unknown").strip().lower()[:64]

        tag = self._identify(kong)
        route = None
        if any(spec.per_route for spec in q.limits):
            r = _as_dict(value(kong.router.get_route()))
            route = r.get("name") or r.get("id")

        from aigov import tokens  # lazy: tiktoken loads its encodings on first use
        prompt_est = tokens.count_chat_messages(request.messages, model_asked, request.body.get("tools"))
        completion_est = request.max_tokens or q.completion_estimate_tokens
        estimate = Charge(prompt_est, completion_est, prompt_est + completion_est,
                          price.estimate_nano(prompt_est, completion_est))
        now = time.time()
        counters = plan_counters(q, tag, model, route, now)
        amounts = [estimate.amount_for(c) for c in counters]
        request_id = shared.get("request_id") if isinstance(shared.get("request_id"), str) else uuid.uuid4().hex

        store_name = "memory" if q.policy != "redis" else "redis"
        result = None
        if counters:
            try:
                result = store_for(q).reserve(tag, request_id, counters, amounts, now, q.reservation_ttl_s)
            except Exception as exc:  # noqa: BLE001 - RedisUnavailable or a script error: the failure policy
                if q.on_store_failure == "fail_closed":
                    metrics.QUOTA_STORE_FAILURES.labels("fail_closed").inc()
                    kong.log.err(f"llm-token-quota: quota store unavailable ({type(exc).__name__}); fail_closed: 503")
                    kong.response.exit(503, openai_error(
                        "llm-token-quota: the quota store is unavailable and this route is configured to "
                        "fail closed; retry later", "server_error", "quota_store_unavailable"),
                        {"Content-Type": "application/json", "Retry-After": "1"})
                    return
                metrics.QUOTA_STORE_FAILURES.labels("fail_open").inc()
                kong.log.warn(f"llm-token-quota: quota store unavailable ({type(exc).__name__}: {exc}); "
                              "fail_open: counting in local memory")
                store_name = "memory"
                result = memory_store().reserve(tag, request_id, counters, amounts, now, q.reservation_ttl_s)
            if not result.admitted:
                self._reject(kong, counters, result.values, result.blocked or 0, amounts, tag, now)
                return
        values = list(result.values) if result else []
        self._gauge(tag, counters, values)

        shared["request_id"] = shared.get("request_id") or request_id
        shared["quota"] = {
            "rid": request_id, "tag": tag, "store": store_name, "model": model, "model_label": model_label,
            "price": [price.input, price.output, -1 if price.cached_input is None else price.cached_input,
                      -1 if price.reasoning is None else price.reasoning],
            "counters": [c.to_list() for c in counters], "reserved": amounts,
            "estimate": [prompt_est, completion_est, estimate.cost_nano],
            "stream": bool(request.stream),
        }
        kong.ctx.shared.set(SHARED_KEY, shared)
        if not q.hide_client_headers and counters:
            if CAPTURE_PHASE == "response":
                # As if this request were free: right for a cache hit or a failed upstream (both
                # released in log); a real answer overwrites them after the settle.
                shown = [v - a for v, a in zip(values, amounts)]
            else:
                shown = values  # log mode: the reservation is all we know before the response leaves
            kong.response.set_headers(rate_limit_headers(counters, shown, now))

    # ------------------------------------------------------------------ response (buffered capture)
    def _response(self, kong: Any) -> None:
        # Four PDK calls on the client's path: read state, status, body, then the headers. The
        # upstream's headers are not read (the stream flag of the request and the body tell SSE
        # from JSON) and the settled state stays in this process for `log` (_SETTLED).
        shared = _as_dict(value(kong.ctx.shared.get(SHARED_KEY)))
        state = _as_dict(shared.get("quota"))
        if not state or self.quota is None:
            return
        status = value(kong.service.response.get_status()) or value(kong.response.get_status()) or 0
        body = raw(kong.service.response.get_raw_body())
        answer = parse_upstream_response(int(status), _sniffed_headers(bool(state.get("stream")), body), body)
        charge = self._charge_from_answer(state, answer)
        counters, values = self._settle(kong, state, charge)
        _SETTLED.put(str(state.get("rid")), charge)
        if not self.quota.hide_client_headers:
            out = rate_limit_headers(counters, values, time.time()) if counters else {}
            out["X-AI-Tokens-Prompt"] = str(charge.prompt_tokens)
            out["X-AI-Tokens-Completion"] = str(charge.completion_tokens)
            out["X-AI-Cost-USD"] = f"{nano_to_usd(charge.cost_nano):.9f}"  # exact: costs are whole nano-USD
            kong.response.set_headers(out)

    # ------------------------------------------------------------------ log (settle-or-release)
    @guarded
    def log(self, kong: Any) -> None:
        shared = _as_dict(value(kong.ctx.shared.get(SHARED_KEY)))
        state = _as_dict(shared.get("quota"))
        if not state or self.quota is None:
            return
        settled = _SETTLED.pop(state.get("rid"))
        if settled is not None:
            self._serialize(kong, state, settled)
            return
        cache = _as_dict(shared.get("cache"))
        cache_status = str(shared.get("cache_status") or cache.get("status") or cache.get("cache_status") or "")
        if cache_status.lower() == "hit":
            charge = Charge.zero("cache_hit")
            saved = _as_dict(cache.get("usage")) or _as_dict(shared.get("tokens_saved"))
            for token_type in ("prompt_tokens", "completion_tokens"):
                if _num(saved.get(token_type)):
                    metrics.LLM_TOKENS.labels(state.get("model_label", ""), f"saved_{token_type.split('_')[0]}",
                                              state.get("tag", "")).inc(_num(saved.get(token_type)))
            state["tokens_saved"] = {k: _num(saved.get(k)) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        elif CAPTURE_PHASE == "log":
            charge = self._charge_from_log(kong, state)
        else:
            # The response phase never ran. If the upstream had started a successful answer
            # (service status 2xx) the body broke mid-way: the provider generated and bills an
            # unknown part of it, so the reservation (prompt + max completion, an upper bound) is
            # kept. Otherwise nothing reached the provider or it failed (connect error, timeout,
            # another plugin's exit): release.
            # kong.service.response.get_status is unavailable in the log timer; Kong's
            # serializer carries the upstream status ("" when no upstream answered).
            service_status = _upstream_status(value(kong.log.serialize()))
            if service_status is not None and 200 <= service_status < 300:
                est = state["estimate"]
                charge = Charge(int(est[0]), int(est[1]), int(est[0]) + int(est[1]), int(est[2]), source="cut")
            else:
                charge = Charge.zero("released")
        self._settle(kong, state, charge)
        self._serialize(kong, state, charge)

    # ------------------------------------------------------------------ helpers
    def _identify(self, kong: Any) -> str:
        q = self.quota
        assert q is not None
        if q.limit_by == "global":
            return "global"
        for source in q.identifier_sources:
            if source == "consumer":
                c = _as_dict(value(kong.client.get_consumer()))
                ident = c.get("id") or c.get("username") or c.get("custom_id")
            elif source == "credential":
                ident = _as_dict(value(kong.client.get_credential())).get("id")
            elif source == "header":
                ident = text(kong.request.get_header(q.identifier_header or ""))
            else:
                ident = text(kong.client.get_forwarded_ip()) or text(kong.client.get_ip())
            if isinstance(ident, str) and ident.strip():
                return identity_tag(source, ident.strip())
        # Nobody identifiable (no source matched): one shared "anonymous" caller.
        return "anonymous"

    def _price(self, state: dict[str, Any]) -> Price:
        p = list(state.get("price") or [0, 0, -1, -1])
        return Price(input=float(p[0]), output=float(p[1]), cached_input=None if p[2] < 0 else float(p[2]),
                     reasoning=None if p[3] < 0 else float(p[3]))

    def _charge_from_answer(self, state: dict[str, Any], answer: LLMResponse) -> Charge:
        price = self._price(state)
        if answer.usage is not None:
            u = answer.usage
            return charge_from_usage(price, u.prompt_tokens, u.completion_tokens, u.total_tokens,
                                     u.cached_tokens, u.reasoning_tokens)
        if answer.status >= 400 or answer.status == 0:
            return Charge.zero("released")  # the provider failed and reported no usage: nothing billed
        # 200 without usage (a stream without include_usage, a cut stream, a provider that does not
        # report usage): the prompt as estimated plus the text really generated, counted.
        from aigov import tokens
        prompt = int(state["estimate"][0])
        completion = tokens.count_text(answer.text, state.get("model")) if answer.text else 0
        return charge_from_usage(price, prompt, completion, source="counted")

    def _charge_from_log(self, kong: Any, state: dict[str, Any]) -> Charge:
        price = self._price(state)
        usage: dict[str, Any] = {}
        try:
            logged = json.loads(text(kong.log.serialize()) or "{}")
            usage = _as_dict(_as_dict(_as_dict(logged.get("ai")).get("proxy")).get("usage"))
        except ValueError:
            usage = {}
        prompt, completion = _num(usage.get("prompt_tokens")), _num(usage.get("completion_tokens"))
        total = _num(usage.get("total_tokens"))
        if not (prompt or completion or total):
            m = _as_dict(value(kong.nginx.get_ctx("ai_llm_metrics")))
            prompt, completion = _num(m.get("llm_prompt_tokens_count")), _num(m.get("llm_completion_tokens_count"))
        if prompt or completion or total:
            return charge_from_usage(price, prompt, completion, total)
        status = int(value(kong.response.get_status()) or 0)
        if status >= 400 or status == 0:
            return Charge.zero("released")
        # Served, but ai-proxy logged no usage (log_statistics off): keep the estimate, which is
        # an upper bound when max_tokens was set.
        est = state["estimate"]
        return Charge(int(est[0]), int(est[1]), int(est[0]) + int(est[1]), int(est[2]), source="estimate")

    def _settle(self, kong: Any, state: dict[str, Any], charge: Charge) -> tuple[list[Counter], list[int]]:
        q = self.quota
        assert q is not None
        counters = [Counter.from_list(c) for c in state.get("counters") or []]
        amounts = [charge.amount_for(c) for c in counters]
        values: list[int] = []
        started = time.perf_counter()
        if counters:
            store = memory_store() if state.get("store") == "memory" else store_for(q)
            try:
                result = store.settle(state["tag"], state["rid"], counters, amounts, time.time(), q.reservation_ttl_s)
            except Exception as exc:  # noqa: BLE001 - keep the accounting on this node at least
                metrics.QUOTA_STORE_FAILURES.labels("settle_local").inc()
                kong.log.err(f"llm-token-quota: settle failed ({type(exc).__name__}: {exc}); charged in local "
                             "memory, the Redis reservation expires by itself")
                result = memory_store().settle(state["tag"], state["rid"], counters, amounts, time.time(),
                                               q.reservation_ttl_s)
            values = result.values
            if result.status == "duplicate":
                return counters, values  # already settled: never meter twice
        metrics.QUOTA_SETTLE_LATENCY.observe((time.perf_counter() - started) * 1000)
        self._gauge(state.get("tag", ""), counters, values)
        model, tag = state.get("model_label", ""), state.get("tag", "")
        for token_type, n in (("prompt", charge.prompt_tokens), ("completion", charge.completion_tokens),
                              ("total", charge.total_tokens), ("cached", charge.cached_tokens),
                              ("reasoning", charge.reasoning_tokens)):
            if n:
                metrics.LLM_TOKENS.labels(model, token_type, tag).inc(n)
        if charge.cost_nano:
            metrics.LLM_COST.labels(model, tag).inc(nano_to_usd(charge.cost_nano))
        return counters, values

    def _gauge(self, tag: str, counters: list[Counter], values: list[int]) -> None:
        for c, v in zip(counters, values):
            remaining = max(0, c.limit - int(v))
            metrics.QUOTA_REMAINING.labels(tag, c.label, c.window).set(
                nano_to_usd(remaining) if c.metric == "cost" else remaining)

    def _reject(self, kong: Any, counters: list[Counter], values: list[int], blocked: int, amounts: list[int],
                tag: str, now: float) -> None:
        counter = counters[blocked]
        body, retry_after = rejection_body(counter, values[blocked], amounts[blocked], now)
        metrics.QUOTA_REJECTIONS.labels(tag, counter.label, counter.window).inc()
        self._gauge(tag, counters, values)
        headers = {"Content-Type": "application/json", "Retry-After": str(retry_after)}
        if self.quota is not None and not self.quota.hide_client_headers:
            headers.update(rate_limit_headers(counters, values, now))
        kong.log.set_serialize_value("aigov.quota.status", "rejected")
        kong.response.exit(429, body, headers)

    def _serialize(self, kong: Any, state: dict[str, Any], charge: Charge | None) -> None:
        out: dict[str, Any] = {"consumer": state.get("tag"), "model": state.get("model_label"),
                               "store": state.get("store")}
        if charge is not None:
            out.update(status=charge.source, prompt_tokens=charge.prompt_tokens,
                       completion_tokens=charge.completion_tokens, total_tokens=charge.total_tokens,
                       cost_usd=nano_to_usd(charge.cost_nano))
        if state.get("tokens_saved"):
            out["tokens_saved"] = state["tokens_saved"]
        kong.log.set_serialize_value("aigov.quota", out)


# The response phase exists only in the default capture mode: declaring it makes Kong buffer the
# upstream response, which log mode avoids (reference §2.8). kong-pdk reads phases with hasattr.
if CAPTURE_PHASE == "response":
    TokenQuotaHandler.response = guarded(TokenQuotaHandler._response)  # type: ignore[attr-defined]


def _upstream_status(serialized: Any) -> int | None:
    """The last upstream status in Kong's serializer (nginx lists retries as "502, 200")."""
    try:
        entry = json.loads(serialized) if isinstance(serialized, (str, bytes)) else serialized
        raw_status = str(entry.get("upstream_status") or "")
    except (ValueError, AttributeError, RecursionError):
        return None
    codes = [c for c in raw_status.replace(":", ",").split(",") if c.strip().isdigit()]
    return int(codes[-1]) if codes else None
