"""Handler of the llm-semantic-cache Kong plugin.

access: parse the client body, build the hard scope, exact layer -> embedding -> KNN ->
verifier; a hit answers with kong.response.exit in the client's format (JSON or SSE), a miss sets
X-Cache-Status: Miss and remembers what to store. The answer is captured in `response` (buffered,
the default) or in `log` from ai-proxy's logged payload (AIGOV_CAPTURE_PHASE=log), see capture_phase().

Stream and non-stream entries never mix: `stream` is part of the hard scope (the params hash in
aigov.cache.key.scope_for), so a streamed request never hits an entry stored from a JSON answer
and the reverse; each kind hits its own entries. (A hit is replayed in the requesting client's
format either way, but keeping the kinds apart means nothing depends on that conversion.)

Priority 770 with the name "llm-semantic-cache": after ai-prompt-guard (771), before ai-proxy (770,
equal priorities run by descending name), so a hit spends no provider tokens and a guarded prompt
never reaches the cache (reference §4.4). It also runs after llm-token-quota (906), which reads
kong.ctx.shared["aigov"]["cache"] in log to charge nothing for a hit.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from aigov import __version__, metrics
from aigov.cache.core import (CacheConfigError, CacheSettings, SemanticCache, completion_for_storage,
                              no_store_requested, storable)
from aigov.cache.key import exact_key, scope_for
from aigov.cache.policies import CacheEntry, StoreUnavailable
from aigov.embeddings import EmbeddingError
from aigov.llm_response import parse_upstream_response
from aigov.pdk import OUTAGE_LOG, guarded, raw, text, value
from aigov.prices import default_prices, nano_to_usd
from aigov.request import RequestError, json_text, parse_chat_request

NAME = "llm-semantic-cache"
VERSION = __version__
PRIORITY = 770
SHARED_KEY = "aigov"
CAPTURE_ENV = "AIGOV_CAPTURE_PHASE"

log = logging.getLogger("aigov.cache.handler")


def capture_phase() -> str:
    """"response" (buffered capture, default) or "log" (from ai-proxy's logged payload)."""
    return "log" if os.environ.get(CAPTURE_ENV, "").strip().lower() == "log" else "response"


class _PendingVectors:
    """Query embeddings of misses, kept in process until the answer is stored (bounded, 10 min)."""

    def __init__(self, cap: int = 4096, ttl_s: float = 600.0) -> None:
        self._items: "OrderedDict[str, tuple[float, np.ndarray]]" = OrderedDict()
        self._lock = threading.Lock()
        self.cap, self.ttl_s = cap, ttl_s

    def put(self, vector: np.ndarray) -> str:
        token = secrets.token_hex(8)
        with self._lock:
            self._items[token] = (time.monotonic(), vector)
            while len(self._items) > self.cap:
                self._items.popitem(last=False)
        return token

    def pop(self, token: str | None) -> np.ndarray | None:
        if not token:
            return None
        with self._lock:
            item = self._items.pop(token, None)
        if item is None or time.monotonic() - item[0] > self.ttl_s:
            return None
        return item[1]


_PENDING = _PendingVectors()


def _header(headers: Any, name: str) -> str | None:
    if not isinstance(headers, dict):
        return None
    for k, v in headers.items():
        if str(k).lower() == name:
            return text(v)
    return None


class SemanticCacheHandler:
    def __init__(self, config: dict[str, Any]) -> None:
        # Validation only: no model, no Redis here (StartInstance must stay cheap).
        self.config = config
        self.settings = CacheSettings.from_config(config)
        self.cache = SemanticCache(self.settings)
        self.route_id = config.get("route_id") or config.get("service_id") or None
        self.labels = (self.settings.strategy, self.settings.embeddings_model)

    # -- helpers ---------------------------------------------------------------------------
    def _shared(self, kong: Any) -> dict[str, Any]:
        current = value(kong.ctx.shared.get(SHARED_KEY))
        return dict(current) if isinstance(current, dict) else {}

    def _publish(self, kong: Any, shared: dict[str, Any], status: str, extra: dict[str, Any] | None = None) -> None:
        cache_info = {"status": status, **(extra or {})}
        shared["cache"] = cache_info
        shared["cache_status"] = status.lower()
        kong.ctx.shared.set(SHARED_KEY, shared)
        # One round trip for both fields: the serializer nests dotted keys, so this is the same
        # log entry as setting aigov.cache.status and aigov.cache.capture one by one.
        kong.log.set_serialize_value("aigov.cache", {"status": status, "capture": capture_phase()})

    def _count(self, status: str, model: str | None) -> None:
        metrics.LLM_REQUESTS.labels(metrics.model_label(model), status.lower(), *self.labels).inc()

    def _bypass(self, kong: Any, reason: str, model: str | None = None) -> None:
        kong.response.set_header("X-Cache-Status", "Bypass")
        self._publish(kong, self._shared(kong), "Bypass", {"reason": reason})
        self._count("Bypass", model)

    # -- access ----------------------------------------------------------------------------
    @guarded
    def access(self, kong: Any) -> None:
        headers = value(kong.request.get_headers()) or {}   # first PDK call: nothing heavy before it
        if self.settings.admin_path and self._admin(kong, headers):
            return
        body = raw(kong.request.get_raw_body())
        try:
            request = parse_chat_request(body, self.settings.max_body_bytes)
        except RequestError as exc:
            self._bypass(kong, exc.reason)
            return
        if request.lossy:  # bytes read as U+FFFD: two different bodies could share an answer
            self._bypass(kong, "invalid_utf8", request.model)
            return
        cache_control = _header(headers, "cache-control")
        if no_store_requested(cache_control):
            self._bypass(kong, "no-store", request.model)
            return
        temp = request.temperature
        if temp is not None and self.settings.max_temperature is not None and temp > self.settings.max_temperature:
            self._bypass(kong, "temperature", request.model)
            return
        prompt = request.prompt_text(self.settings.message_countback)
        if not prompt.strip():
            self._bypass(kong, "no user text", request.model)
            return
        consumer_id = None
        if self.settings.scope == "consumer":
            consumer = value(kong.client.get_consumer())
            if isinstance(consumer, dict):
                consumer_id = consumer.get("id") or consumer.get("username")
        scope = scope_for(request, namespace=self.settings.namespace, consumer_id=consumer_id,
                          route_id=self.route_id, scope_mode=self.settings.scope,
                          message_countback=self.settings.message_countback)
        key = exact_key(scope, prompt)
        refresh = bool(cache_control) and "no-cache" in cache_control.lower()
        shared = self._shared(kong)
        try:
            if refresh:
                vector = self.cache.embed(prompt)
                status = "Refresh"
                lookup = None
            else:
                lookup = self.cache.lookup(scope, prompt, key)
                vector = lookup.vector
                status = lookup.status
                metrics.CACHE_FETCH_LATENCY.labels(status.lower(), *self.labels).observe(lookup.fetch_ms)
        except (StoreUnavailable, EmbeddingError) as exc:
            self._failed(kong, shared, request.model, exc)
            return

        if lookup is not None and lookup.status == "Hit" and lookup.entry is not None:
            self._serve_hit(kong, shared, request, lookup.entry, lookup.similarity)
            return
        # Miss / Refresh: headers set in access persist to the client response (Kong semantics).
        kong.response.set_headers({"X-Cache-Status": status, "X-Cache-Key": key})
        # The prompt travels as JSON text: a lone surrogate (JSON's "\ud800") cannot be packed as
        # a MessagePack string, and the cache must not fail open on it.
        pending = {"key": key, "prompt_json": json_text(prompt), "scope": scope.__dict__, "stream": request.stream,
                   "model": request.model, "vector": _PENDING.put(vector) if vector is not None else None}
        extra: dict[str, Any] = {"key": key}
        if lookup is not None and lookup.rejected:
            extra["verifier_rejected"] = lookup.rejected[:4]
        shared["cache_pending"] = pending
        self._publish(kong, shared, status, extra)
        self._count(status, request.model)

    def _failed(self, kong: Any, shared: dict[str, Any], model: str | None, exc: Exception) -> None:
        kind = "store" if isinstance(exc, StoreUnavailable) else "embeddings"
        OUTAGE_LOG.log(kong.log.warn, f"cache:{kind}", f"semantic cache {kind} failed: {exc}")
        self._count("Failed", model)
        if self.settings.stop_on_failure:
            self._publish(kong, shared, "Failed", {"reason": kind})
            body = json.dumps({"error": {"message": f"semantic cache unavailable ({kind})",
                                         "type": "cache_unavailable"}})
            kong.response.exit(503, body, {"Content-Type": "application/json", "X-Cache-Status": "Failed"})
            return
        kong.response.set_header("X-Cache-Status", "Failed")
        self._publish(kong, shared, "Failed", {"reason": kind})

    def _serve_hit(self, kong: Any, shared: dict[str, Any], request: Any, entry: CacheEntry,
                   similarity: float | None) -> None:
        from aigov import sse

        now = time.time()
        completion = dict(entry.response)
        headers = {"X-Cache-Status": "Hit", "X-Cache-Key": entry.key, "X-Cache-Ttl": str(entry.ttl_left(now)),
                   "Age": str(entry.age(now))}
        if similarity is not None:
            headers["X-Cache-Similarity"] = f"{similarity:.4f}"
        if request.stream:
            if completion.get("usage") is None and entry.usage:
                completion["usage"] = entry.usage
            body = sse.chat_chunks_from_completion(completion, include_usage=request.include_usage)
            headers["Content-Type"] = "text/event-stream"
            headers["Cache-Control"] = "no-cache"
        else:
            body = json_text(completion).encode("utf-8")
            headers["Content-Type"] = "application/json"
        usage = entry.usage or completion.get("usage") or {}
        model = entry.model or completion.get("model")
        self._publish(kong, shared, "Hit", {"usage": usage, "model": model, "key": entry.key,
                                            "similarity": similarity, "age": entry.age(now)})
        shared_saved = {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                        "completion_tokens": int(usage.get("completion_tokens") or 0)}
        model_label = metrics.model_label(model)
        for token_type, n in shared_saved.items():
            if n:
                metrics.CACHE_TOKENS_SAVED.labels(model_label, token_type).inc(n)
        price = default_prices().lookup(model)
        if price is not None and any(shared_saved.values()):
            cost = price.cost_nano(shared_saved["prompt_tokens"], shared_saved["completion_tokens"])
            metrics.CACHE_COST_SAVED.labels(model_label).inc(nano_to_usd(cost))
        self._count("Hit", model)
        kong.response.exit(200, body, headers)
        # nothing after exit: a PDK call would block forever (reference §2.4)

    def _admin(self, kong: Any, headers: dict[str, Any]) -> bool:
        path = text(kong.request.get_path())
        if path != self.settings.admin_path:
            return False
        method = (text(kong.request.get_method()) or "").upper()
        given = _header(headers, "x-cache-admin-key")
        if not given or not secrets.compare_digest(given, self.settings.admin_key or ""):
            kong.response.exit(403, json.dumps({"message": "X-Cache-Admin-Key missing or wrong"}),
                               {"Content-Type": "application/json"})
            return True
        if method not in ("DELETE", "POST"):
            kong.response.exit(405, json.dumps({"message": "use DELETE or POST to purge"}),
                               {"Content-Type": "application/json", "Allow": "DELETE, POST"})
            return True
        try:
            removed = self.cache.store.purge()
        except StoreUnavailable as exc:
            kong.response.exit(503, json.dumps({"message": f"purge failed: {exc}"}),
                               {"Content-Type": "application/json"})
            return True
        kong.response.exit(200, json.dumps({"namespace": self.settings.namespace, "purged": removed}),
                           {"Content-Type": "application/json"})
        return True

    # -- capture ---------------------------------------------------------------------------
    def _store_answer(self, kong: Any, pending: dict[str, Any], status: int, headers: Any, body: bytes) -> str:
        from aigov.cache.key import CacheScope

        resp = parse_upstream_response(status, headers if isinstance(headers, dict) else {}, body)
        ok, reason = storable(self.settings, resp, _header(headers, "cache-control"), len(body))
        if not ok:
            return reason
        scope = CacheScope(**pending["scope"])
        prompt = json.loads(pending["prompt_json"])
        vector = _PENDING.pop(pending.get("vector"))
        if vector is None:
            vector = self.cache.embed(prompt)  # plugin server restarted since access
        completion = completion_for_storage(resp.completion or {})
        usage = resp.usage.as_dict() if resp.usage else None
        if usage is None:
            usage = _estimate_usage(pending.get("model"), prompt, resp.text)
        self.cache.save(scope, pending["key"], prompt, vector, completion, usage,
                        completion.get("model") or pending.get("model"))
        return "stored"

    def _take_pending(self, kong: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        shared = self._shared(kong)
        pending = shared.get("cache_pending")
        return shared, pending if isinstance(pending, dict) and pending.get("key") else None

    def _record_store(self, kong: Any, shared: dict[str, Any], outcome: str, write_back: bool = True) -> None:
        kong.log.set_serialize_value("aigov.cache.stored", outcome)
        if not write_back:
            return
        shared.pop("cache_pending", None)
        cache = shared.get("cache") if isinstance(shared.get("cache"), dict) else {}
        shared["cache"] = {**cache, "stored": outcome}
        kong.ctx.shared.set(SHARED_KEY, shared)

    @guarded
    def capture_response(self, kong: Any) -> None:
        """`response` phase: the buffered upstream answer."""
        shared, pending = self._take_pending(kong)
        if pending is None:
            return
        status = value(kong.service.response.get_status())
        headers = value(kong.service.response.get_headers()) or {}
        body = raw(kong.service.response.get_raw_body())
        try:
            outcome = self._store_answer(kong, pending, int(status or 0), headers, body)
        except (StoreUnavailable, EmbeddingError) as exc:
            outcome = f"failed: {exc}"
            OUTAGE_LOG.log(kong.log.warn, "cache:store_answer", f"semantic cache store failed: {exc}")
        # No ctx.shared write-back on the client's path: in this capture mode nothing after the
        # response phase reads cache_pending or the store outcome from ctx (the cache has no log
        # phase, the quota's log reads only the status and usage published in access); the
        # outcome is in the log entry.
        self._record_store(kong, shared, outcome, write_back=False)

    @guarded
    def capture_log(self, kong: Any) -> None:
        """`log` phase (AIGOV_CAPTURE_PHASE=log): the answer as ai-proxy logged it (log_payloads)."""
        shared, pending = self._take_pending(kong)
        if pending is None:
            return
        serialized = value(kong.log.serialize())
        try:
            data = json.loads(serialized) if isinstance(serialized, (str, bytes)) else (serialized or {})
        except ValueError:
            data = {}
        status = int(value(kong.response.get_status()) or 0)
        payload = (((data.get("ai") or {}).get("proxy") or {}).get("payload") or {}).get("response")
        if payload is None:
            self._record_store(kong, shared, "no ai.proxy.payload.response (enable ai-proxy logging.log_payloads)")
            return
        body = payload.encode("utf-8") if isinstance(payload, str) else json.dumps(payload).encode()
        try:
            outcome = self._store_answer(kong, pending, status, {}, body)
        except (StoreUnavailable, EmbeddingError) as exc:
            outcome = f"failed: {exc}"
        self._record_store(kong, shared, outcome)


def _estimate_usage(model: Any, prompt_text: str, answer: str) -> dict[str, Any] | None:
    """tiktoken counts when the provider sent no usage (a stream without include_usage)."""
    try:
        from aigov import tokens

        completion = tokens.count_text(answer, model)
        prompt = tokens.count_text(prompt_text or "", model)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "estimated": True}
    except Exception:  # noqa: BLE001 - an estimate is optional
        return None


__all__ = ["SemanticCacheHandler", "CacheConfigError", "capture_phase", "NAME", "VERSION", "PRIORITY"]
