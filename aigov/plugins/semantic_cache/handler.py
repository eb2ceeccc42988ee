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
import re
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
from aigov.pdk import OUTAGE_LOG, guarded, raw, request_body, text, value
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


# A request's messages, tools and body size, kept for a stream whose answer will carry no usage.
PromptSource = tuple[list[Any], Any, int]


class _Kept:
    __slots__ = ("at", "vector", "source", "size")

    def __init__(self, at: float, vector: np.ndarray | None, source: PromptSource | None, size: int) -> None:
        self.at, self.vector, self.source, self.size = at, vector, source, size


class _PendingMisses:
    """What a miss needs again when its answer is stored, kept in process (bounded, 10 min): the
    query embedding and, for a stream that asked for no usage, the request's messages and tools,
    so that its prompt is token-counted only if such an answer is stored, never in access.

    Sources are references to the parsed request (no copy), bounded by `source_budget` request
    bytes: past it the oldest sources are dropped and their answers' prompts are estimated from
    the semantic text alone."""

    def __init__(self, cap: int = 4096, ttl_s: float = 600.0, source_budget: int = 64 * 1024 * 1024) -> None:
        self._items: "OrderedDict[str, _Kept]" = OrderedDict()
        self._lock = threading.Lock()
        self.cap, self.ttl_s, self.source_budget = cap, ttl_s, source_budget
        self._source_bytes = 0

    def put(self, vector: np.ndarray | None, source: PromptSource | None = None) -> str:
        token = secrets.token_hex(8)
        size = source[2] if source is not None else 0
        if size > self.source_budget:
            source, size = None, 0
        now = time.monotonic()
        with self._lock:
            self._items[token] = _Kept(now, vector, source, size)
            self._source_bytes += size
            # Oldest first: entries whose answer never came (errors, aborted clients) expire here.
            while self._items:
                oldest = next(iter(self._items.values()))
                if len(self._items) <= self.cap and now - oldest.at <= self.ttl_s:
                    break
                self._source_bytes -= self._items.popitem(last=False)[1].size
            for kept in self._items.values():
                if self._source_bytes <= self.source_budget:
                    break
                if kept.source is not None:
                    self._source_bytes -= kept.size
                    kept.source, kept.size = None, 0
        return token

    def pop(self, token: str | None) -> tuple[np.ndarray | None, PromptSource | None]:
        if not token:
            return None, None
        with self._lock:
            kept = self._items.pop(token, None)
            if kept is not None:
                self._source_bytes -= kept.size
        if kept is None or time.monotonic() - kept.at > self.ttl_s:
            return None, None
        return kept.vector, kept.source


_PENDING = _PendingMisses()


def _same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets as UTF-8 bytes: compare_digest refuses str with
    non-ASCII characters (a TypeError, which failed the admin request open, on to the upstream)."""
    def raw(s: str) -> bytes:
        return s.encode("utf-8", "surrogateescape")
    return secrets.compare_digest(raw(given), raw(expected))


GET_HEADERS_MAX = 100  # kong.request.get_headers() without max_headers: the first 100 lines


def _header_lines(headers: Any) -> int:
    """How many header lines a get_headers() table holds (a repeated header is a list)."""
    if not isinstance(headers, dict):
        return 0
    return sum(len(v) if isinstance(v, list) else 1 for v in headers.values())


def _same_path(path: str) -> str:
    """A normalised path compared as the purge is: repeated and trailing slashes do not count."""
    return re.sub(r"/{2,}", "/", path).rstrip("/") or "/"


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
        # A config the schema could not reject (admin_path without admin_key, a vault value with
        # a control character) is reported on every request as a clear JSON 500 and
        # logged, like the quota and router do: failing StartInstance would give Kong's opaque
        # 500 and leave the reason in the plugin server's traceback only.
        self.config_error: str | None = None
        try:
            self.settings = CacheSettings.from_config(config)
        except (CacheConfigError, TypeError, ValueError) as exc:
            self.config_error = f"llm-semantic-cache config error: {exc}"
            self.settings = CacheSettings()  # never serves: every phase stops at config_error
        self.cache = SemanticCache(self.settings)
        # A route-scoped instance serves one route. A global, service- or consumer-scoped one
        # serves many, so access asks Kong which route matched (kong.router.get_route): routes
        # to different upstreams must never share answers.
        self.route_id = config.get("route_id") or None
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
    def _config_failed(self, kong: Any) -> None:
        """Every request on a config the cache refuses: log the reason, answer a JSON 500."""
        message = self.config_error or "llm-semantic-cache config error"
        kong.log.err(message)
        body = json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                     "code": "cache_config_error"}})
        kong.response.exit(500, body, {"Content-Type": "application/json"})

    @guarded
    def access(self, kong: Any) -> None:
        if self.config_error is not None:
            self._config_failed(kong)
            return
        headers = value(kong.request.get_headers()) or {}   # first PDK call: nothing heavy before it
        if self.settings.admin_path and self._admin(kong, headers):
            return
        body = request_body(kong, self.settings.max_body_bytes)
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
        route_id = self.route_id or _matched_route(kong)
        # One route may front several deployments (/openai/deployments/<name>/..., ?api-version=).
        path = text(kong.request.get_path_with_query()) or "/"
        shared = self._shared(kong)
        routed_to = shared.get("route")
        scope = scope_for(request, namespace=self.settings.namespace, consumer_id=consumer_id,
                          route_id=route_id, scope_mode=self.settings.scope,
                          message_countback=self.settings.message_countback, path=path,
                          routed_to=routed_to if isinstance(routed_to, str) else None)
        # Each semantic message keys separately: the joined prompt cannot tell where a turn ends.
        key = exact_key(scope, request.last_user_texts(self.settings.message_countback))
        refresh = bool(cache_control) and "no-cache" in cache_control.lower()
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
        # A stream without include_usage gets no usage from the provider: keep what its prompt
        # estimate is counted from (in process, not in ctx.shared, and not tokenised here).
        source = ((request.messages, request.tool_definitions(), request.raw_size)
                  if request.stream and not request.include_usage else None)
        kept = _PENDING.put(vector, source) if vector is not None or source is not None else None
        # The prompt travels as JSON text: a lone surrogate (JSON's "\ud800") cannot be packed as
        # a MessagePack string, and the cache must not fail open on it.
        pending = {"key": key, "prompt_json": json_text(prompt), "scope": scope.__dict__, "stream": request.stream,
                   "model": request.model, "kept": kept}
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
                # The "estimated" marker stays out of the client's usage object: every value in
                # OpenAI's usage is a count (or an object of counts), and clients that decode it
                # as a map of integers or sum every field (LangChain adds usage dicts key by key)
                # would fail on or count a boolean. It stays in the entry and ctx.shared.
                completion["usage"] = {k: v for k, v in entry.usage.items() if k != "estimated"}
            body = sse.chat_chunks_from_completion(completion, include_usage=request.include_usage)
            headers["Content-Type"] = "text/event-stream; charset=utf-8"  # as OpenAI sends it
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
        """Answer a request on admin_path; any other request loses the admin key header."""
        # Kong's get_path is normalised (%-escapes of unreserved bytes decoded, dot segments and
        # repeated slashes removed); a trailing slash is the same purge.
        path = text(kong.request.get_path()) or ""
        if _same_path(path) != _same_path(self.settings.admin_path or ""):
            if _header(headers, "x-cache-admin-key") is not None or _header_lines(headers) >= GET_HEADERS_MAX:
                # A near miss (/purge;x, /Purge, another path) is proxied: never with the secret.
                # get_headers returns the first 100 header lines only, so with 100 or more the
                # key may be among the rest: cleared too.
                kong.service.request.clear_header("X-Cache-Admin-Key")
                kong.log.set_serialize_value("request.headers.x-cache-admin-key", "REDACTED")
            return False
        try:
            self._admin_request(kong, headers)
        except Exception as exc:  # noqa: BLE001 - an admin request never fails open to the upstream
            kong.log.err(f"llm-semantic-cache: admin request failed: {type(exc).__name__}: {exc}")
            kong.response.exit(500, json.dumps({"message": "admin request failed; see Kong's error log"}),
                               {"Content-Type": "application/json"})
        return True

    def _admin_request(self, kong: Any, headers: dict[str, Any]) -> None:
        """Answer a request on admin_path (its key checked first); never proxied."""
        method = (text(kong.request.get_method()) or "").upper()
        given = _header(headers, "x-cache-admin-key")
        if given:
            # Kong's log entry carries every request header but Authorization: not this secret.
            kong.log.set_serialize_value("request.headers.x-cache-admin-key", "REDACTED")
        if not given or not _same_secret(given, self.settings.admin_key or ""):
            kong.response.exit(403, json.dumps({"message": "X-Cache-Admin-Key missing or wrong"}),
                               {"Content-Type": "application/json"})
            return
        if method not in ("DELETE", "POST"):
            kong.response.exit(405, json.dumps({"message": "use DELETE or POST to purge"}),
                               {"Content-Type": "application/json", "Allow": "DELETE, POST"})
            return
        try:
            removed = self.cache.store.purge()
        except StoreUnavailable as exc:
            kong.response.exit(503, json.dumps({"message": f"purge failed: {exc}"}),
                               {"Content-Type": "application/json"})
            return
        kong.response.exit(200, json.dumps({"namespace": self.settings.namespace, "purged": removed}),
                           {"Content-Type": "application/json"})

    # -- capture ---------------------------------------------------------------------------
    def _store_answer(self, kong: Any, pending: dict[str, Any], status: int, headers: Any, body: bytes) -> str:
        from aigov.cache.key import CacheScope

        vector, source = _PENDING.pop(pending.get("kept"))  # released whether stored or not
        resp = parse_upstream_response(status, headers if isinstance(headers, dict) else {}, body)
        ok, reason = storable(self.settings, resp, _header(headers, "cache-control"), len(body))
        if not ok:
            return reason
        scope = CacheScope(**pending["scope"])
        prompt = json.loads(pending["prompt_json"])
        if vector is None:
            vector = self.cache.embed(prompt)  # plugin server restarted since access
        completion = completion_for_storage(resp.completion or {})
        usage = resp.usage.as_dict() if resp.usage else None
        if usage is None:
            usage = _estimate_usage(pending.get("model"), source, prompt, resp.text)
        self.cache.save(scope, pending["key"], prompt, vector, completion, usage,
                        completion.get("model") or pending.get("model"))
        return "stored"

    def _take_pending(self, kong: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        shared = self._shared(kong)
        pending = shared.get("cache_pending")
        return shared, pending if isinstance(pending, dict) and pending.get("key") else None

    @guarded
    def capture_response(self, kong: Any) -> None:
        """`response` phase: the buffered upstream answer."""
        if self.config_error is not None:
            return
        _, pending = self._take_pending(kong)
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
        # phase, the quota's log reads only the status and usage published in access). The
        # response phase is the last one whose serializer values reach http-log and file-log.
        kong.log.set_serialize_value("aigov.cache.stored", outcome)

    @guarded
    def capture_log(self, kong: Any) -> None:
        """`log` phase (AIGOV_CAPTURE_PHASE=log): the answer as ai-proxy logged it (log_payloads)."""
        if self.config_error is not None:
            return
        _, pending = self._take_pending(kong)
        if pending is None:
            return
        serialized = value(kong.log.serialize())
        try:
            data = json.loads(serialized) if isinstance(serialized, (str, bytes)) else (serialized or {})
        except ValueError:
            data = {}
        status = int(value(kong.response.get_status()) or 0)
        payload = (((data.get("ai") or {}).get("proxy") or {}).get("payload") or {}).get("response")
        # The outcome goes to Kong's error log, not the serializer: this handler runs in a timer
        # after http-log and file-log have serialized, and Kong drops what it sets (§2.8).
        if payload is None:
            _PENDING.pop(pending.get("kept"))
            OUTAGE_LOG.log(kong.log.warn, "cache:no_payload",
                           "semantic cache: nothing stored, ai-proxy logged no ai.proxy.payload.response "
                           "(enable ai-proxy logging.log_payloads)")
            return
        body = payload.encode("utf-8") if isinstance(payload, str) else json.dumps(payload).encode()
        try:
            outcome = self._store_answer(kong, pending, status, {}, body)
        except (StoreUnavailable, EmbeddingError) as exc:
            OUTAGE_LOG.log(kong.log.warn, "cache:store_answer", f"semantic cache store failed: {exc}")
            return
        if outcome != "stored":
            kong.log.info(f"semantic cache: not stored ({outcome})")


def _matched_route(kong: Any) -> str:
    """The id of the route the request matched ("-" when Kong reports none)."""
    route = value(kong.router.get_route())
    route_id = route.get("id") if isinstance(route, dict) else None
    return str(route_id) if route_id else "-"


def _estimate_usage(model: Any, source: PromptSource | None, prompt_text: str, answer: str) -> dict[str, Any] | None:
    """tiktoken counts when the provider sent no usage (a stream without include_usage): the
    prompt as the quota estimates it (every message, tools included), the answer's text.

    Without a kept source (the plugin server restarted, the source budget was exceeded, or a
    non-stream answer came without usage) only the semantic text is known: the prompt count is
    then a lower bound."""
    try:
        from aigov import tokens

        messages, tools, size = source if source is not None else ([{"role": "user", "content": prompt_text}], None, 0)
        prompt = tokens.count_chat_messages_off_loop(messages, model, tools, size)
        completion = tokens.count_text(answer, model)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "estimated": True}
    except Exception:  # noqa: BLE001 - an estimate is optional
        return None


__all__ = ["SemanticCacheHandler", "CacheConfigError", "capture_phase", "NAME", "VERSION", "PRIORITY"]
