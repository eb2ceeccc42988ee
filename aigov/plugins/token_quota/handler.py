"""Handler of the llm-token-quota Kong plugin: reserve in access, settle after the response.

Phases
- access: parse the chat request (or an embeddings call: its input, no completion), price it,
  estimate it (tiktoken prompt count + max_tokens or completion_estimate_tokens), and check-and-reserve every applicable limit atomically in the
  store. Rejects with 429 (OpenAI-shaped body, Retry-After) when a limit does not fit.
- response (default capture phase): read the buffered upstream answer, take the provider's usage
  as the truth (or count the streamed text with tiktoken when there is none), settle the
  reservation to it, and send headers computed from the counters as the reservation left them,
  corrected by this request's own settle (so the settle overlaps the headers' round trip). Like
  Kong's rate-limiting headers they are a snapshot: another request of the same consumer in
  flight at the same time is not in them (its reservation, or its settle, lands in between).
- log (always runs, also after another plugin's exit or a failed upstream): the place that
  guarantees settle-or-release exactly once. With AIGOV_CAPTURE_PHASE=log there is no response
  phase (Kong does not buffer); the settle uses ai-proxy's logged usage instead. It also replays
  a few Redis settles that failed earlier (the store's deferred queue), only when there are any.

Redis outages and stalls (fail_open): a request whose reserve Redis did not answer is reserved in
local memory (state["store"] = "memory"), which makes the local decision during the outage. Its
settle goes to memory and its real usage is also queued for Redis under the same request id (the
store's deferred settles), replayed by later log phases once Redis answers: so the shared
counters converge to the real usage. A reserve whose answer was lost after the script was sent
(timeout) may still run in Redis later; such a request is marked state["redis_unsure"] and the
replay converts its late reservation to the real usage, or, if the reserve has not run, charges
the usage and marks the id settled (a reserve still queued becomes a "duplicate"). A release
(cache hit, failed upstream: nothing used) is queued only for an unsure request, whose late
reservation it gives back. A settle Redis does not confirm is queued and replayed the same way;
replays are idempotent per request id.

Priority 906: after the router (907) so the routed model is priced, before Kong's
ai-rate-limiting-advanced (905), and well before the cache (770) and ai-proxy (770), so a cache
hit that exits in access still leaves this plugin's log phase to release the reservation.

Headers (unless hide_client_headers): X-AI-RateLimit-{Limit,Remaining,Reset}-<Window> for token
limits and -Cost-<Window> for cost limits (USD with 9 decimals: exact nano-USD), Retry-After on
429, and, in the response phase, X-AI-Tokens-Prompt, X-AI-Tokens-Completion, X-AI-Cost-USD of this request. In log
mode the response has left before the usage is known: the X-AI-RateLimit-* headers reflect the
reservation (the estimate) and the three X-AI-Tokens-*/Cost headers are absent.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from aigov import __version__
from aigov import metrics
from aigov.llm_response import LLMResponse, parse_upstream_response, token_count
from aigov.pdk import OUTAGE_LOG, guarded, raw, request_body, text, value
from aigov.prices import Price, nano_to_usd, normalize_model
from aigov.quota.core import (Charge, Counter, QuotaConfig, QuotaConfigError, QuotaStore, ReserveResult,
                              charge_from_usage, consumer_metric_name, identity_tag, openai_error, plan_counters,
                              rate_limit_headers, rejection_body)
from aigov.request import (UNREADABLE_CHAT, ChatRequest, EmbeddingsRequest, RequestError,
                           billable_fields, canonical_header_name, could_be_chat, is_secret_header, json_text,
                           names_an_embedding_model, parse_chat_request, parse_embeddings_request)

NAME = "llm-token-quota"
VERSION = __version__
PRIORITY = 906
SHARED_KEY = "aigov"
# This plugin's own per-request state (reservation, price, estimate), read only by its later
# phases: under its own kong.ctx.shared key, so access writes it without first reading (and
# then rewriting) the shared "aigov" dict of facts other plugins publish.
STATE_KEY = "aigov.quota"
MEMO_NAME_MAX = 256  # longest model name the price memo keeps
CAPTURE_PHASE = "log" if os.environ.get("AIGOV_CAPTURE_PHASE", "").strip().lower() == "log" else "response"

_stores: dict[tuple[str, str], QuotaStore] = {}
_memory_store: QuotaStore | None = None
_fallback_stores: dict[str, QuotaStore] = {}


def memory_store() -> QuotaStore:
    """The process-wide in-memory store of the memory policy."""
    global _memory_store
    if _memory_store is None:
        from aigov.quota.policies.memory import MemoryQuotaStore
        _memory_store = MemoryQuotaStore()
    return _memory_store


def fallback_store(redis_store: QuotaStore) -> QuotaStore:
    """The redis policy's fail_open store for one Redis store, apart from the memory policy's: it
    mirrors what that Redis last reported (MemoryQuotaStore.observe), which must reach neither a
    memory-policy route's counters nor those of routes on another Redis (the same key there is
    another budget)."""
    key = repr(getattr(redis_store, "layer", None)) + "|" + str(getattr(redis_store, "prefix", ""))
    store = _fallback_stores.get(key)
    if store is None:
        from aigov.quota.policies.memory import MemoryQuotaStore
        store = _fallback_stores[key] = MemoryQuotaStore()
    return store


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


class _RequestNotes:
    """What one phase of a request leaves for the next one in this process, by request id.

    access -> response: ("reserved", counter values after the reservation), so the response
    phase can show the counters after the settle without waiting for the store. response -> log:
    ("settled", charge), so log has nothing left to store. Kong runs
    every phase of a request on the same plugin server; if the server restarted in between, a
    phase finds nothing here and falls back to the store (the settle is idempotent per request
    id, so nothing is metered twice). Bounded: an entry whose next phase never comes is dropped
    after `ttl_s` or when `cap` is exceeded.
    """

    def __init__(self, cap: int = 65536, ttl_s: float = 900.0) -> None:
        self._items: "OrderedDict[str, tuple[float, tuple[str, Any]]]" = OrderedDict()
        self._lock = threading.Lock()
        self.cap, self.ttl_s = cap, ttl_s

    def put(self, request_id: str, note: tuple[str, Any]) -> None:
        now = time.monotonic()
        with self._lock:
            self._items[request_id] = (now, note)
            self._items.move_to_end(request_id)
            while len(self._items) > self.cap:
                self._items.popitem(last=False)
            while self._items:  # oldest first: drop the expired ones
                first = next(iter(self._items.values()))
                if now - first[0] <= self.ttl_s:
                    break
                self._items.popitem(last=False)

    def pop(self, request_id: Any) -> tuple[str, Any] | None:
        if not isinstance(request_id, str):
            return None
        with self._lock:
            item = self._items.pop(request_id, None)
        return None if item is None else item[1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


_NOTES = _RequestNotes()


def _as_dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _sniffed_headers(stream_requested: bool, body: bytes) -> dict[str, Any]:
    """The Content-Type the upstream must have sent, without a get_headers round trip: a stream
    request answered with anything but a JSON object is SSE (a failed stream request gets a JSON
    error body); parse_upstream_response also recognises a body that starts with `data:`."""
    if stream_requested and not body.lstrip()[:1] == b"{":
        return {"content-type": "text/event-stream"}
    return {}


def _consumer(state: dict[str, Any]) -> str:
    """The caller's `consumer` metrics label (state written before it existed: the tag)."""
    return str(state.get("consumer") or state.get("tag") or "")


_num = token_count  # one reading of a usage figure (aigov.llm_response)


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
        # Compiled once per instance (Kong starts one per config version): answers that depend
        # only on the config are not recomputed per request.
        self._per_route = bool(self.quota and any(spec.per_route for spec in self.quota.limits))
        self._price_cache: dict[str | None, tuple[str | None, Price | None]] = {}
        self._store_cached: QuotaStore | None = None

    def _store(self) -> QuotaStore:
        if self._store_cached is None:
            assert self.quota is not None
            self._store_cached = store_for(self.quota)
        return self._store_cached

    def _priced(self, model_asked: str | None) -> tuple[str | None, Price | None]:
        """(price-table name, price) of a requested model, cached per instance (bounded)."""
        hit = self._price_cache.get(model_asked)
        if hit is None:
            assert self.quota is not None
            hit = (self.quota.prices.resolve(model_asked), self.quota.prices.lookup(model_asked))
            # Client-chosen names: bounded in count and in size (a 1 MB "model" is not kept).
            if len(self._price_cache) < 1024 and (model_asked is None or len(model_asked) <= MEMO_NAME_MAX):
                self._price_cache[model_asked] = hit
        return hit

    # ------------------------------------------------------------------ access
    @guarded
    def access(self, kong: Any) -> None:
        # Four PDK calls when admitted: body, consumer, the state for later phases, headers. The
        # shared "aigov" dict is not read: the routed model is already in the body (the router
        # rewrites it with set_raw_body, which get_raw_body then returns, reference §4.4), and
        # this plugin's state lives under its own key, so nothing of another plugin is overwritten.
        # (It is read only to identify a caller by a header, which the router may have replaced.)
        if self.quota is None:
            kong.log.err(self.config_error)
            kong.response.exit(500, openai_error(self.config_error or "config error", "server_error",
                                                 "quota_config_error"), {"Content-Type": "application/json"})
            return
        q = self.quota
        body = request_body(kong)  # its own limit (DEFAULT_MAX_BODY_BYTES) is below the read bound
        request: ChatRequest | EmbeddingsRequest | None
        try:
            request = parse_chat_request(body)
        except RequestError as exc:
            request = self._not_a_chat_request(kong, body, exc)
            if request is None:
                return  # answered, or passed on unmetered as documented

        model_asked = request.model
        model, price = self._priced(model_asked)
        model_label = model or (model_asked or "")[:64]
        # The metrics' name for it: bounded, since an unpriced name is the client's choice.
        metric_model = metrics.model_label(model_asked, priced_as=model)
        price_known = price is not None
        if price is None:
            action = "block" if q.unknown_model == "block" else "default_price"
            metrics.QUOTA_UNKNOWN_MODEL.labels(metric_model, action).inc()
            if q.unknown_model == "block" or q.default_price is None:
                kong.log.warn(f"llm-token-quota: model {(model_asked or '')[:64]!r} has no price; blocked")
                if model_asked is None:
                    # ai-proxy fills in its route's model, but it runs after the quota (priority 770).
                    msg = ("llm-token-quota: the request names no model, so its cost cannot be metered; "
                           "send 'model' (also on an ai-proxy route, which runs after the quota), or set "
                           "unknown_model=default_price")
                else:
                    msg = (f"llm-token-quota: model {model_asked!r} is not in the price table, so its cost "
                           f"cannot be metered; add it to the plugin's prices or set unknown_model=default_price")
                kong.response.exit(400, openai_error(msg, "invalid_request_error", "model_not_priced"),
                                   {"Content-Type": "application/json"})
                return
            price = q.default_price
            # Normalised as the limits' `models` lists are (QuotaConfig), so a listed name
            # matches however the client wraps it (provider/, ft:, case).
            model = normalize_model(model_asked or "unknown")[:MEMO_NAME_MAX] or "unknown"

        tag, consumer = self._identify(kong)
        route = None
        if self._per_route:
            r = _as_dict(value(kong.router.get_route()))
            route = r.get("name") or r.get("id")

        from aigov import tokens  # lazy: tiktoken loads its encodings on first use
        if isinstance(request, EmbeddingsRequest):
            # Input tokens only, and the provider's usage settles it (prompt_tokens).
            prompt_est = tokens.count_texts_off_loop(request.texts, model_asked, len(body)) + request.token_ids
            completion_est = 0
        else:
            prompt_est = tokens.count_chat_messages_off_loop(request.messages, model_asked,
                                                             request.tool_definitions(), len(body),
                                                             request.prompt_extras())
            # n choices are each up to max_tokens long: the bound is the product (the prompt is
            # billed once).
            completion_est = (request.completion_bound or q.completion_estimate_tokens) * request.choices
        estimate = Charge(prompt_est, completion_est, prompt_est + completion_est,
                          price.estimate_nano(prompt_est, completion_est))
        now = time.time()
        counters = plan_counters(q, tag, model, route, now, priced=price_known)
        amounts = [estimate.amount_for(c) for c in counters]
        request_id = uuid.uuid4().hex
        state: dict[str, Any] = {
            "rid": request_id, "tag": tag, "consumer": consumer, "store": "memory" if q.policy != "redis" else "redis",
            "model": model, "model_label": model_label, "metric_model": metric_model,
            "price": [price.input, price.output, -1 if price.cached_input is None else price.cached_input,
                      -1 if price.reasoning is None else price.reasoning],
            "counters": [c.to_list() for c in counters], "reserved": amounts,
            "estimate": [prompt_est, completion_est, estimate.cost_nano],
            "stream": bool(getattr(request, "stream", False)),
        }
        if not counters:  # no limit applies to this model: metered (logged, priced), never blocked
            self._ask_for_stream_usage(kong, request)
            kong.ctx.shared.set(STATE_KEY, state)
            if q.log_statistics and CAPTURE_PHASE == "log":
                self._serialize(kong, state, None)
            return

        result = self._reserve(kong, state, tag, request_id, counters, amounts, now)
        if result is None:
            return  # fail_closed: the 503 is sent
        if not result.admitted:
            if state.get("redis_unsure"):
                # Refused locally (fail_open), but the reserve script sent to Redis may still
                # run: give that late reservation back once Redis answers, as fail_closed does.
                defer = getattr(self._store(), "defer_settle", None)
                if defer is not None:
                    defer(tag, request_id, counters, [0] * len(counters), q.reservation_ttl_s, now)
            kong.ctx.shared.set(STATE_KEY, None)  # nothing reserved: log has nothing to settle
            self._reject(kong, counters, result.values, result.blocked or 0, amounts, consumer, now)
            return
        self._ask_for_stream_usage(kong, request)
        values = list(result.values)
        if CAPTURE_PHASE == "response":  # the response phase builds its headers from them
            _NOTES.put(request_id, ("reserved", values))
        self._gauge(consumer, counters, values)
        if not q.hide_client_headers:
            if CAPTURE_PHASE == "response":
                # As if this request were free: right for a cache hit or a failed upstream (both
                # released in log); a real answer overwrites them in the response phase.
                shown = [v - a for v, a in zip(values, amounts)]
            else:
                shown = values  # log mode: the reservation is all we know before the response leaves
            kong.response.set_headers(rate_limit_headers(counters, shown, now))
        if q.log_statistics and CAPTURE_PHASE == "log":
            # The last phase before the log timer: what loggers get is the reservation.
            self._serialize(kong, state, None)

    def _ask_for_stream_usage(self, kong: Any, request: ChatRequest | EmbeddingsRequest) -> None:
        """stream_usage: request: an admitted streamed chat request without include_usage gets it,
        so the provider reports the usage (one more PDK call, only for such requests)."""
        q = self.quota
        assert q is not None
        if q.stream_usage != "request" or not isinstance(request, ChatRequest) or not request.stream \
                or request.include_usage or request.lossy:  # a lossy body is forwarded as its bytes were
            return
        options = request.body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or options.get("include_usage") is not None):
            # The client said include_usage (false: it may not cope with the usage chunk), or sent
            # stream_options the provider will refuse: the body goes on as the client wrote it.
            return
        body = {**request.body, "stream_options": {**(options or {}), "include_usage": True}}
        kong.service.request.set_raw_body(json_text(body).encode("utf-8"))
        request.include_usage = True

    def _not_a_chat_request(self, kong: Any, body: bytes, exc: RequestError) -> EmbeddingsRequest | None:
        """A body parse_chat_request refused: an embeddings call to meter, or None once it is
        answered (413/400) or passed on unmetered (on_malformed_request: pass)."""
        q = self.quota
        assert q is not None
        if exc.reason in ("not_chat", "invalid_json", "not_object") and body.strip():
            # A JSON object without `messages`. The provider bills an embeddings call (its input),
            # so it is metered; another API it bills (Responses, legacy Completions, images: an
            # `input` or `prompt` field) cannot be metered here and is refused, never passed on.
            path = str(value(kong.request.get_path()) or "")
            obj = exc.parsed or {}  # the object parse_chat_request read (none when unreadable)
            fields = billable_fields(obj)
            if path.rstrip("/").lower().endswith("/embeddings") or names_an_embedding_model(obj):
                if exc.reason != "not_chat":
                    # Unreadable here, but Go's decoder (Ollama) reads past trailing bytes and
                    # deeper nesting: as for chat, refused rather than passed unmetered.
                    exc = RequestError("bad_field", f"an embeddings body this plugin cannot read exactly "
                                                    f"({exc}); send it as OpenAI reads it")
                else:
                    try:
                        return parse_embeddings_request(obj, len(body))
                    except RequestError as embeddings_exc:
                        exc = embeddings_exc
            elif fields:
                kong.log.set_serialize_value("aigov.quota.status", "rejected:not_metered")
                kong.response.exit(400, openai_error(
                    f"llm-token-quota: {path or 'this path'} is not a chat completions or embeddings call "
                    f"(no 'messages'; it has {' and '.join(map(repr, fields))}), which this "
                    "quota cannot meter; enable the quota only on the routes of APIs it meters",
                    "invalid_request_error", "not_metered"), {"Content-Type": "application/json"})
                return None
        if exc.reason == "too_large":
            # A readable request too big to meter is never passed on: the provider would
            # answer it, so passing it would let any client step around its quota by padding.
            kong.log.warn(f"llm-token-quota: rejected ({exc})")
            kong.log.set_serialize_value("aigov.quota.status", "rejected:too_large")
            kong.response.exit(413, openai_error(f"llm-token-quota: {exc}", "invalid_request_error",
                                                 "request_too_large"), {"Content-Type": "application/json"})
            return None
        if exc.reason != "bad_field" and could_be_chat(body):
            exc = RequestError("bad_field", UNREADABLE_CHAT)
        if exc.reason == "bad_field":
            # A chat request with a wrongly typed field, or one this parser cannot read but a
            # more lenient provider could (a "Messages" key, trailing bytes, deep nesting):
            # OpenAI answers it 400, another provider might serve it, so it is refused, never
            # passed unmetered.
            kong.log.set_serialize_value("aigov.quota.status", "rejected:bad_field")
            kong.response.exit(400, openai_error(f"llm-token-quota: {exc}", "invalid_request_error",
                                                 "invalid_request"), {"Content-Type": "application/json"})
            return None
        # Other unreadable bodies are not answerable chat requests: the provider rejects them
        # without spending tokens, so passing them on (the default) loses no accounting.
        if not body.strip() or q.on_malformed_request == "pass":
            # Not a chat request (or unreadable): documented pass-through, unmetered.
            kong.log.notice(f"llm-token-quota: not metering request ({exc.reason}: {exc})")
            kong.log.set_serialize_value("aigov.quota.status", f"bypass:{exc.reason}")
            return None
        kong.response.exit(400, openai_error(f"llm-token-quota: {exc}", "invalid_request_error",
                                             "invalid_request"), {"Content-Type": "application/json"})
        return None

    def _reserve(self, kong: Any, state: dict[str, Any], tag: str, request_id: str, counters: list[Counter],
                 amounts: list[int], now: float) -> ReserveResult | None:
        """Check-and-reserve, with the state write for later phases done while Redis works.

        Returns None when fail_closed answered 503 (the store is down)."""
        q = self.quota
        assert q is not None
        store = self._store()
        if getattr(store, "deferred_count", lambda: 0)():
            # Right after an outage Redis lacks what this node served meanwhile: replay that first,
            # or this reserve is decided on the lower figure (no round trip when nothing is queued).
            self._retry_deferred(kong)
        pending = None
        error: Exception | None = None
        begin = getattr(store, "reserve_begin", None)
        result: ReserveResult | None = None
        try:
            if begin is not None:
                pending = begin(tag, request_id, counters, amounts, now, q.reservation_ttl_s)
            else:
                result = store.reserve(tag, request_id, counters, amounts, now, q.reservation_ttl_s)
        except Exception as exc:  # noqa: BLE001 - RedisUnavailable or a script error: the failure policy
            error = exc
        try:
            kong.ctx.shared.set(STATE_KEY, state)  # one round trip to Kong while the script runs
        except BaseException:
            if pending is not None:
                pending.cancel()
            raise
        unsure = False
        if pending is not None:
            try:
                result = pending.result()
            except Exception as exc:  # noqa: BLE001 - as above
                error = exc
                # The script was sent: Redis may still run it (a stall, not a refusal).
                unsure = True
        if error is None and result is not None:
            if not result.duplicate and q.policy == "redis":
                # What Redis holds before this request: the fail_open fallback's starting point.
                own = amounts if result.admitted else [0] * len(amounts)
                fallback_store(store).observe(counters, [v - a for v, a in zip(result.values, own)], now)
            return result
        if unsure:
            metrics.QUOTA_STORE_FAILURES.labels("reserve_unsure").inc()
        if q.on_store_failure == "fail_closed":
            metrics.QUOTA_STORE_FAILURES.labels("fail_closed").inc()
            OUTAGE_LOG.log(kong.log.err, "quota:fail_closed",
                           f"llm-token-quota: quota store unavailable ({type(error).__name__}); fail_closed: 503")
            defer = getattr(store, "defer_settle", None)
            if unsure and defer is not None:
                # Nobody settles a 503: release a late reservation (or mark the id settled) later.
                defer(tag, request_id, counters, [0] * len(counters), q.reservation_ttl_s, now)
            kong.ctx.shared.set(STATE_KEY, None)
            kong.response.exit(503, openai_error(
                "llm-token-quota: the quota store is unavailable and this route is configured to "
                "fail closed; retry later", "server_error", "quota_store_unavailable"),
                {"Content-Type": "application/json", "Retry-After": "1"})
            return None
        metrics.QUOTA_STORE_FAILURES.labels("fail_open").inc()
        OUTAGE_LOG.log(kong.log.warn, "quota:fail_open",
                       f"llm-token-quota: quota store unavailable ({type(error).__name__}: {error}); "
                       "fail_open: counting in local memory")
        state["store"] = "memory"
        if unsure:
            state["redis_unsure"] = True  # a zero settle (release) goes to Redis too (see the module doc)
        kong.ctx.shared.set(STATE_KEY, state)  # later phases settle where this was reserved
        return fallback_store(store).reserve(tag, request_id, counters, amounts, now, q.reservation_ttl_s)

    # ------------------------------------------------------------------ response (buffered capture)
    def _response(self, kong: Any) -> None:
        # Three PDK calls and one store round trip that overlaps the last of them: read the state
        # and the body (and the status, only when the body carries no usage), send the settle,
        # send the headers, read the settle's answer. The
        # counters after the settle are known without waiting for the store (the values the
        # reservation returned, minus the reservation, plus the charge), and the settle is done
        # before the response leaves, so the client's next request sees it.
        state = _as_dict(value(kong.ctx.shared.get(STATE_KEY)))
        if not state or self.quota is None:
            return
        q = self.quota
        body = raw(kong.service.response.get_raw_body())
        sniffed = _sniffed_headers(bool(state.get("stream")), body)
        answer = parse_upstream_response(0, sniffed, body)
        if answer.usage is None:
            # The status only decides the charge when the provider reported no usage (a failure
            # is released, a success is counted), so the usual answer costs no status round trip.
            status = value(kong.service.response.get_status()) or value(kong.response.get_status()) or 0
            answer = parse_upstream_response(int(status), sniffed, body)
        charge = self._charge_from_answer(state, answer)
        rid = str(state.get("rid"))
        note = _NOTES.pop(rid)
        counters = [Counter.from_list(c) for c in state.get("counters") or []]
        if note is None or note[0] != "reserved" or len(note[1]) != len(counters) or q.hide_client_headers:
            # This process did not make the reservation (the plugin server restarted in between),
            # or no headers are sent: settle first, the headers then come from the store.
            counters, values = self._settle(kong, state, charge)
            _NOTES.put(rid, ("settled", charge))
            if not q.hide_client_headers:
                kong.response.set_headers(self._usage_headers(counters, values, charge))
            if q.log_statistics:
                self._serialize(kong, state, charge)
            return
        reserved = [int(a) for a in state.get("reserved") or []]
        values = [v - r + charge.amount_for(c) for v, r, c in zip(note[1], reserved, counters)]
        pending = None
        begin = getattr(self._store(), "settle_begin", None)
        if counters and state.get("store") != "memory" and begin is not None:
            try:
                pending = begin(state["tag"], rid, counters, [charge.amount_for(c) for c in counters],
                                time.time(), q.reservation_ttl_s)
            except Exception:  # noqa: BLE001 - _settle retries and applies the failure policy
                pending = None
        try:
            kong.response.set_headers(self._usage_headers(counters, values, charge))
        except BaseException:
            if pending is not None:
                pending.cancel()  # log settles again: "duplicate" if this one reached the store
            raise
        self._settle(kong, state, charge, pending)
        _NOTES.put(rid, ("settled", charge))
        if q.log_statistics:
            self._serialize(kong, state, charge)

    @staticmethod
    def _usage_headers(counters: list[Counter], values: list[int], charge: Charge) -> dict[str, str]:
        out = rate_limit_headers(counters, values, time.time()) if counters else {}
        out["X-AI-Tokens-Prompt"] = str(charge.prompt_tokens)
        out["X-AI-Tokens-Completion"] = str(charge.completion_tokens)
        out["X-AI-Cost-USD"] = f"{nano_to_usd(charge.cost_nano):.9f}"  # exact: costs are whole nano-USD
        return out

    # ------------------------------------------------------------------ log (settle-or-release)
    @guarded
    def log(self, kong: Any) -> None:
        try:
            self._log(kong)
        finally:
            # After the response has left: replays of failed Redis settles cost the client nothing.
            self._retry_deferred(kong)

    def _log(self, kong: Any) -> None:
        state = _as_dict(value(kong.ctx.shared.get(STATE_KEY)))
        if not state or self.quota is None:
            return
        note = _NOTES.pop(state.get("rid"))
        if note is not None and note[0] == "settled":  # settled in the response phase
            return
        # One serializer read answers everything below: the cache's outcome (it logs
        # aigov.cache.status), ai-proxy's usage (log mode) and the upstream status.
        logged = _logged(kong)
        cache_logged = _as_dict(_as_dict(logged.get("aigov")).get("cache"))
        if str(cache_logged.get("status") or "").lower() == "hit":
            charge = Charge.zero("cache_hit")
            # what the hit saved is published in the shared "aigov" dict, not in the log entry
            shared = _as_dict(value(kong.ctx.shared.get(SHARED_KEY)))
            cache = _as_dict(shared.get("cache"))
            saved = _as_dict(cache.get("usage")) or _as_dict(shared.get("tokens_saved"))
            for token_type in ("prompt_tokens", "completion_tokens"):
                if _num(saved.get(token_type)):
                    metrics.SERIES.child(metrics.LLM_TOKENS, state.get("metric_model", ""), f"saved_{token_type}",
                                         metrics.consumer_label(_consumer(state))).inc(_num(saved.get(token_type)))
        elif CAPTURE_PHASE == "log":
            charge = self._charge_from_log(kong, state, logged)
        else:
            # The response phase never ran. If the upstream had started a successful answer
            # (service status 2xx) the body broke mid-way: the provider generated and bills an
            # unknown part of it, so the reservation (prompt + max completion, an upper bound) is
            # kept. Otherwise nothing reached the provider or it failed (connect error, timeout,
            # another plugin's exit): release.
            # kong.service.response.get_status is unavailable in the log timer; Kong's
            # serializer carries the upstream status ("" when no upstream answered).
            service_status = _upstream_status(logged)
            proxied = _ai_proxy_usage(logged)
            if service_status is not None and 200 <= service_status < 300 and any(proxied):
                # ai-proxy logged the provider's usage although Kong never called `response`:
                # the query_cmd (Kong's master) saw AIGOV_CAPTURE_PHASE=log but this server did
                # not (it is missing from nginx_main_env). The logged usage beats the estimate.
                charge = charge_from_usage(self._price(state), *proxied)
                kong.log.warn("llm-token-quota: no response phase ran but ai-proxy logged usage: is "
                              "AIGOV_CAPTURE_PHASE=log missing from nginx_main_env? (settled from the log)")
            elif service_status is not None and 200 <= service_status < 300:
                charge = self._reservation_kept(state, "cut")
            elif service_status == 504:
                # Kong timed out waiting for the answer (nginx's 504): the request reached the
                # provider, which may have generated, and billed, all of it.
                charge = self._reservation_kept(state, "timeout")
            else:
                charge = Charge.zero("released")
        # Nothing goes to the log serializer from here: Kong runs this handler in a timer after
        # http-log and file-log have serialized (reference §2.8), so the entry is written in
        # access or response (log_statistics).
        self._settle(kong, state, charge)

    def _retry_deferred(self, kong: Any) -> None:
        """Replay a few deferred Redis settles; no PDK call and no round trip when none are queued."""
        if self.quota is None or self.quota.policy != "redis":
            return
        store = self._store()
        if not getattr(store, "deferred_count", lambda: 0)():
            return
        try:
            replayed = store.retry_deferred()  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - never let a replay fail the log phase
            kong.log.err(f"llm-token-quota: replaying deferred settles failed ({type(exc).__name__}: {exc})")
            return
        if replayed:
            statuses = ", ".join(f"{rid[:8]} {r.status}" for rid, r in replayed)
            kong.log.notice(f"llm-token-quota: replayed {len(replayed)} deferred Redis settle(s): {statuses}")

    # ------------------------------------------------------------------ helpers
    def _identify(self, kong: Any) -> tuple[str, str]:
        """(the caller's tag in the counter keys, its `consumer` metrics label). A Kong consumer is
        keyed by its id (stable across renames) and labelled by its username (else its
        custom_id), as Kong's prometheus plugin labels it; other identities by their tag."""
        q = self.quota
        assert q is not None
        if q.limit_by == "global":
            return "global", "global"
        for source in q.identifier_sources:
            if source == "consumer":
                c = _as_dict(value(kong.client.get_consumer()))
                ident = c.get("id") or c.get("username") or c.get("custom_id")
                if isinstance(ident, str) and ident.strip():
                    tag = identity_tag(source, ident.strip())
                    # Kong's prometheus labels by username; a consumer with only a custom_id
                    # gets "custom_id:<it>" rather than its id (a username may equal another's
                    # custom_id: Kong keeps the two unique separately).
                    username, custom_id = c.get("username"), c.get("custom_id")
                    if isinstance(username, str) and username:
                        return tag, consumer_metric_name(username)
                    if isinstance(custom_id, str) and custom_id:
                        return tag, f"custom_id:{custom_id}"
                    return tag, tag
            elif source == "credential":
                ident = _as_dict(value(kong.client.get_credential())).get("id")
            elif source == "header":
                # The router (907, before this plugin) may have cleared or replaced the header
                # (a client key swapped for the provider's): it keeps what the client sent.
                name = canonical_header_name(q.identifier_header or "")
                sent = _as_dict(_as_dict(value(kong.ctx.shared.get(SHARED_KEY))).get("client_headers"))
                original = sent.get(name)
                if isinstance(original, list):
                    original = original[0] if original else None
                ident = original if isinstance(original, str) else text(kong.request.get_header(name))
            else:
                ident = text(kong.client.get_forwarded_ip()) or text(kong.client.get_ip())
            if isinstance(ident, str) and ident.strip():
                # A credential header's value is hashed: no key in Redis key names or labels.
                secret = source == "header" and is_secret_header(q.identifier_header or "")
                tag = identity_tag(source, ident.strip(), secret)
                return tag, tag
        if "ip" not in q.identifier_sources:
            # As Kong's rate-limiting does when its identifier is missing (a header not sent, no
            # consumer): the client's address, not one budget shared by every such caller.
            ip = text(kong.client.get_forwarded_ip()) or text(kong.client.get_ip())
            if ip and ip.strip():
                tag = identity_tag("ip", ip.strip())
                return tag, tag
        # Nobody identifiable: one shared "anonymous" caller.
        return "anonymous", "anonymous"

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

    def _charge_from_log(self, kong: Any, state: dict[str, Any], logged: dict[str, Any]) -> Charge:
        price = self._price(state)
        prompt, completion, total = _ai_proxy_usage(logged)
        if not (prompt or completion or total):
            m = _as_dict(value(kong.nginx.get_ctx("ai_llm_metrics")))
            prompt, completion = _num(m.get("llm_prompt_tokens_count")), _num(m.get("llm_completion_tokens_count"))
        if prompt or completion or total:
            return charge_from_usage(price, prompt, completion, total)
        upstream = _upstream_status(logged)
        if upstream == 504:
            return self._reservation_kept(state, "timeout")  # as in _log: the provider may bill it
        status = int(value(kong.response.get_status()) or 0)
        if upstream is not None and 200 <= upstream < 300 and (status >= 400 or status == 0):
            # The provider answered 2xx but the answer broke on its way (a body cut mid-way is
            # Kong's 502): it generated, and bills, an unknown part, so the reservation is kept,
            # as in the default mode.
            return self._reservation_kept(state, "cut")
        if status >= 400 or status == 0:
            return Charge.zero("released")
        # Served, but ai-proxy logged no usage (log_statistics off): keep the estimate, which is
        # an upper bound when max_tokens was set.
        return self._reservation_kept(state, "estimate")

    @staticmethod
    def _reservation_kept(state: dict[str, Any], source: str) -> Charge:
        """The reservation (prompt estimate + max completion) as the charge: an upper bound."""
        est = state["estimate"]
        return Charge(int(est[0]), int(est[1]), int(est[0]) + int(est[1]), int(est[2]), source=source)

    def _settle(self, kong: Any, state: dict[str, Any], charge: Charge,
                pending: Any = None) -> tuple[list[Counter], list[int]]:
        """Settle in the store (or read the answer of `pending`, a settle already sent), with
        the fallback to local memory, then the metrics."""
        q = self.quota
        assert q is not None
        counters = [Counter.from_list(c) for c in state.get("counters") or []]
        amounts = [charge.amount_for(c) for c in counters]
        values: list[int] = []
        started = time.perf_counter()
        if counters:
            local = fallback_store(self._store()) if q.policy == "redis" else memory_store()
            store = local if state.get("store") == "memory" else self._store()
            try:
                if pending is not None:
                    result = pending.result()
                else:
                    result = store.settle(state["tag"], state["rid"], counters, amounts, time.time(),
                                          q.reservation_ttl_s)
            except Exception as exc:  # noqa: BLE001 - keep the accounting on this node at least
                from aigov.redis_client import RedisUnavailable
                metrics.QUOTA_STORE_FAILURES.labels("settle_local").inc()
                later = ("the store replays the settle once Redis answers" if isinstance(exc, RedisUnavailable)
                         else "the Redis reservation expires by itself")
                OUTAGE_LOG.log(kong.log.err, "quota:settle",
                               f"llm-token-quota: settle failed ({type(exc).__name__}: {exc}); charged in "
                               f"local memory, {later}")
                result = local.settle(state["tag"], state["rid"], counters, amounts, time.time(),
                                      q.reservation_ttl_s)
            values = result.values
            if result.status == "duplicate":
                return counters, values  # already settled: never meter twice
            if store is not local and result.status == "settled":
                local.observe(counters, values)  # Redis's count after this request
            if state.get("store") == "memory" and q.policy == "redis":
                self._settle_in_redis_later(kong, state, counters, amounts)  # fail_open (never on the healthy path)
        metrics.QUOTA_SETTLE_LATENCY.observe((time.perf_counter() - started) * 1000)
        self._gauge(_consumer(state), counters, values)
        model, tag = state.get("metric_model", ""), metrics.consumer_label(_consumer(state))
        # Kong's ai_llm_tokens_total token_type values (prompt_tokens, completion_tokens,
        # total_tokens), and the same shape for the two Kong does not count.
        for token_type, n in (("prompt_tokens", charge.prompt_tokens), ("completion_tokens", charge.completion_tokens),
                              ("total_tokens", charge.total_tokens), ("cached_tokens", charge.cached_tokens),
                              ("reasoning_tokens", charge.reasoning_tokens)):
            if n:
                metrics.SERIES.child(metrics.LLM_TOKENS, model, token_type, tag).inc(n)
        if charge.cost_nano:
            metrics.SERIES.child(metrics.LLM_COST, model, tag).inc(nano_to_usd(charge.cost_nano))
        return counters, values

    def _settle_in_redis_later(self, kong: Any, state: dict[str, Any], counters: list[Counter],
                               amounts: list[int]) -> None:
        """The Redis half of a fail-open request (reserved in local memory because Redis failed):
        queue its real usage under the same request id, for the log phases to replay once Redis
        answers (retry_deferred). The replay charges the usage as an orphan settle and marks the
        id settled, or converts a reservation that did land late (redis_unsure): the shared
        counters converge to the real usage, and a replay that already landed is a "duplicate".
        No round trip here: Redis just failed, and the replay waits until its breaker lets calls
        through. A release (every amount 0) matters only when a reserve may have run in Redis."""
        if not state.get("redis_unsure") and not any(amounts):
            return  # nothing reserved in Redis and nothing used: nothing for Redis to know
        q = self.quota
        assert q is not None
        defer = getattr(self._store(), "defer_settle", None)
        if defer is None:
            return
        defer(state["tag"], state["rid"], counters, amounts, q.reservation_ttl_s, time.time())

    def _gauge(self, consumer_name: str, counters: list[Counter], values: list[int]) -> None:
        consumer = metrics.CONSUMERS(consumer_name)
        if consumer is None:
            return  # past --metrics-max-consumers: an "other" gauge would show whoever came last
        for c, v in zip(counters, values):
            gauge = metrics.SERIES.child(metrics.QUOTA_REMAINING, consumer, c.label, c.window, gauge=True)
            if gauge is not None:
                remaining = max(0, c.limit - int(v))
                gauge.set(nano_to_usd(remaining) if c.metric == "cost" else remaining)

    def _reject(self, kong: Any, counters: list[Counter], values: list[int], blocked: int, amounts: list[int],
                consumer: str, now: float) -> None:
        counter = counters[blocked]
        body, retry_after = rejection_body(counter, values[blocked], amounts[blocked], now)
        metrics.SERIES.child(metrics.QUOTA_REJECTIONS, metrics.consumer_label(consumer), counter.label,
                             counter.window).inc()
        self._gauge(consumer, counters, values)
        headers = {"Content-Type": "application/json"}
        if retry_after is not None:  # no Retry-After when waiting cannot make the request fit
            headers["Retry-After"] = str(retry_after)
        if self.quota is not None and not self.quota.hide_client_headers:
            headers.update(rate_limit_headers(counters, values, now))
        kong.log.set_serialize_value("aigov.quota.status", "rejected")
        kong.response.exit(429, body, headers)

    def _serialize(self, kong: Any, state: dict[str, Any], charge: Charge | None) -> None:
        """log_statistics: this request's entry in Kong's log serializer (http-log, file-log):
        the settled charge (response phase) or, with charge None, the reservation (access, log
        capture: the response leaves before the usage is known)."""
        out: dict[str, Any] = {"consumer": state.get("tag"), "model": state.get("model_label"),
                               "store": state.get("store")}
        if state.get("redis_unsure"):
            out["redis_unsure"] = True  # fail-open, but the reserve may have run in Redis
        if charge is not None:
            out.update(status=charge.source, prompt_tokens=charge.prompt_tokens,
                       completion_tokens=charge.completion_tokens, total_tokens=charge.total_tokens,
                       cost_usd=nano_to_usd(charge.cost_nano))
        else:
            est = state["estimate"]
            out.update(status="reserved", prompt_tokens=int(est[0]), completion_tokens=int(est[1]),
                       total_tokens=int(est[0]) + int(est[1]), cost_usd=nano_to_usd(int(est[2])))
        kong.log.set_serialize_value("aigov.quota", out)


# The response phase exists only in the default capture mode: declaring it makes Kong buffer the
# upstream response, which log mode avoids (reference §2.8). kong-pdk reads phases with hasattr.
if CAPTURE_PHASE == "response":
    TokenQuotaHandler.response = guarded(TokenQuotaHandler._response)  # type: ignore[attr-defined]


def _logged(kong: Any) -> dict[str, Any]:
    """Kong's log serializer entry (a JSON string from the plugin server's PDK), {} if unreadable."""
    try:
        entry = json.loads(text(kong.log.serialize()) or "{}")
    except (ValueError, RecursionError):
        return {}
    return entry if isinstance(entry, dict) else {}


def _ai_proxy_usage(logged: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt, completion, total) tokens ai-proxy logged in the serializer entry; zeros if none."""
    usage = _as_dict(_as_dict(_as_dict(logged.get("ai")).get("proxy")).get("usage"))
    return _num(usage.get("prompt_tokens")), _num(usage.get("completion_tokens")), _num(usage.get("total_tokens"))


def _upstream_status(serialized: Any) -> int | None:
    """The last upstream status in Kong's serializer (nginx lists retries as "502, 200")."""
    try:
        entry = json.loads(serialized) if isinstance(serialized, (str, bytes)) else serialized
        raw_status = str(entry.get("upstream_status") or "")
    except (ValueError, AttributeError, RecursionError):
        return None
    codes = [c for c in raw_status.replace(":", ",").split(",") if c.strip().isdigit()]
    return int(codes[-1]) if codes else None
