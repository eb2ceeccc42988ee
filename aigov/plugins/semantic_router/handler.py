"""Handler of the llm-semantic-router Kong plugin: pick a route by intent in access, then send
the request to that route's upstream, with that route's model and that route's credential only.

access
1. Read the body (the first PDK call: no heavy work before it, reference offline-dependencies.md).
2. Decide: a forced route (force_route_header, off by default) → reason `forced`; else embed the
   prompt (last user message, or the last N user turns) and score it against the route model
   (trained once per config and cached; see aigov.routing) → `matched`, or `default` when below
   the calibrated threshold. Embedder down / model not built in time → default route, `error`.
   A body that is not a chat request (invalid JSON, no messages, too large) → default route,
   reason `default`, body untouched.
3. Act: set_upstream (Kong upstream name) or set_target (host, port), scheme, path; rewrite the
   body's `model` when the route names one; strip the client's Authorization and every target's
   auth header, then set the target's headers and its own key. default_route "reject" answers
   `reject_status` with an OpenAI-shaped JSON error instead.
4. Report: X-Semantic-Route, X-Semantic-Route-Score, X-Semantic-Route-Reason response headers;
   kong.ctx.shared["aigov"] route/model; log fields aigov.router.*; Prometheus metrics.

Priority 907: after acl (950) and rate-limiting (910), before llm-token-quota (906, which then
prices the routed model), ai-rate-limiting-advanced (905) and every bundled AI plugin (<= 778),
so ai-proxy / ai-proxy-advanced (770) see the rewritten body. For ai-proxy to use the routed
model, leave its `model.name` unset (it then takes `model` from the request body) and let its
`model.options.upstream_url` unset or equal to the route's target, since ai-proxy sets the
upstream itself in its own access phase.

A config error (bad default_route, calibrated_for_model mismatch with on_model_mismatch=error)
answers every request with 500 and a JSON message naming the problem: routing silently with
thresholds tuned for another embedding model is what the issue forbids.
"""
from __future__ import annotations

import json
import time
from typing import Any

from aigov import __version__
from aigov import metrics
from aigov.embeddings import embedder_from_config
from aigov.pdk import OUTAGE_LOG, guarded, request_body, text, value
from aigov.request import UNREADABLE_CHAT, RequestError, could_be_chat, json_text, parse_chat_request
from aigov.routing.core import (Decision, Route, Router, RouterConfigError, RouterSettings, prompt_text,
                                settings_from_config)

NAME = "llm-semantic-router"
VERSION = __version__
PRIORITY = 907
SHARED_KEY = "aigov"

# Request headers kong/pdk/log.lua already masks in the log serializer.
_SERIALIZER_MASKED = frozenset({"authorization", "proxy-authorization"})
HEADER_ROUTE = "X-Semantic-Route"
HEADER_SCORE = "X-Semantic-Route-Score"
HEADER_REASON = "X-Semantic-Route-Reason"


def _error_body(message: str, type_: str, code: str) -> str:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}})


# ai_router_decisions_total's route label for a request answered here without a route.
NO_ROUTE = "none"


class TargetMissing(Exception):
    """The route's target names a Kong upstream that does not exist (a config error)."""


def _count_refusal(reason: str) -> None:
    """Refusals are decisions too: a dashboard on ai_router_decisions_total must see them."""
    metrics.ROUTER_DECISIONS.labels(route=NO_ROUTE, reason=reason).inc()


class SemanticRouterHandler:
    def __init__(self, config: dict[str, Any]) -> None:
        # Cheap only: no model load, no embedding here (the stock server holds a global lock).
        self.config = config
        self.settings: RouterSettings | None = None
        self.config_error: str | None = None
        self._router: Router | None = None
        self._warned = False
        try:
            self.settings = settings_from_config(config)
        except (RouterConfigError, TypeError, ValueError) as exc:
            self.config_error = f"llm-semantic-router config error: {exc}"

    def _get_router(self) -> Router:
        if self._router is None:
            assert self.settings is not None
            self._router = Router(self.settings, embedder_from_config(self.config.get("embeddings")))
        return self._router

    @guarded
    def access(self, kong: Any) -> None:
        started = time.perf_counter()
        body = request_body(kong, self.settings.max_body_bytes if self.settings else 0)  # first PDK call
        if self.config_error is not None:
            _count_refusal("config_error")
            kong.log.err(self.config_error)
            kong.response.exit(500, _error_body(self.config_error, "router_config_error", "config_error"),
                               {"Content-Type": "application/json"})
            return
        settings = self.settings
        assert settings is not None
        router = self._get_router()
        if router.mismatch:
            if router.config_error:
                _count_refusal("config_error")
                kong.log.err(router.config_error)
                kong.response.exit(500, _error_body(f"llm-semantic-router config error: {router.config_error}",
                                                    "router_config_error", "model_mismatch"),
                                   {"Content-Type": "application/json"})
                return
            if not self._warned:  # loud once per instance (every request would flood the log)
                kong.log.warn(f"{router.mismatch}; on_model_mismatch=warn: configured min_confidence "
                              "ignored, threshold self-calibrated from the route data")
                self._warned = True

        chat = None
        decision: Decision | None = None
        try:
            chat = parse_chat_request(body, settings.max_body_bytes)
        except RequestError as exc:
            # A body over max_body_bytes is not read at all (no whole-body sniffing of 20 MB):
            # the default route, or 413 below when that route would rewrite the model.
            if exc.reason not in ("bad_field", "too_large") and could_be_chat(body):
                exc = RequestError("bad_field", UNREADABLE_CHAT)
            if exc.reason == "bad_field":
                # A chat request read wrongly here but maybe rightly by a lenient provider: sent
                # on, it would reach the client's own model, unrouted. Refused, as OpenAI would.
                _count_refusal("invalid_request")
                kong.log.set_serialize_value("aigov.router", {"route": None, "reason": "invalid_request"})
                kong.response.exit(400, _error_body(f"llm-semantic-router: {exc}", "invalid_request_error",
                                                    "invalid_request"), {"Content-Type": "application/json"})
                return
            decision = router.default("default", detail=exc.reason)
            fixed = decision.route.target.model if decision.route is not None else None
            # The model a provider would read: the object's, or for a body with bytes after its
            # JSON object, that object's (Go's decoder serves it and ignores the rest).
            asked = exc.parsed.get("model") if isinstance(exc.parsed, dict) else None
            if fixed and isinstance(asked, str) and asked.strip().lower() != fixed.strip().lower():
                # Not a chat request (an embeddings call, say), so not rewritten: sent on, it would
                # reach the client's model with the default target's key. Refused, as too_large is.
                _count_refusal("model_not_routed")
                kong.log.set_serialize_value("aigov.router", {"route": None, "reason": "model_not_routed"})
                kong.response.exit(400, _error_body(
                    f"llm-semantic-router: this body has no chat messages, so it goes to the default route, "
                    f"whose target fixes the model {fixed!r}; it asks for {asked[:64]!r}. Send chat "
                    "completions here, or ask for that model", "invalid_request_error", "model_not_routed"),
                    {"Content-Type": "application/json"})
                return
            if exc.reason == "too_large" and (decision.route is None or decision.route.target.model):
                # Unread, the body keeps the client's model, which the default target's key would
                # then pay for: refused, as the quota refuses a body it cannot meter.
                _count_refusal("too_large")
                kong.log.set_serialize_value("aigov.router", {"route": None, "reason": "too_large"})
                kong.response.exit(413, _error_body(f"llm-semantic-router: {exc}", "invalid_request_error",
                                                    "request_too_large"), {"Content-Type": "application/json"})
                return

        if decision is None and settings.force_route_header:
            forced_name = text(kong.request.get_header(settings.force_route_header))
            if forced_name:
                decision = router.forced(forced_name)
                if decision is None:
                    kong.log.notice(f"{settings.force_route_header}: no route named that; deciding normally")
        if decision is None:
            assert chat is not None
            decision = router.decide_text(prompt_text(chat, settings))
            if decision.reason == "error":
                OUTAGE_LOG.log(kong.log.warn, "router:error",
                               f"semantic routing failed open to the default route: {decision.detail}")

        if decision.route is None:  # default_route: reject
            self._report(kong, decision, None, started)
            kong.response.exit(settings.reject_status,
                               _error_body("no route matches this prompt confidently", "invalid_request_error",
                                           "no_route"),
                               {"Content-Type": "application/json", **self._headers(decision)})
            return
        try:
            model, replaced = self._apply(kong, settings, decision.route, chat)
        except TargetMissing as exc:
            # Nothing was changed yet: the request must not go to the service's own host with
            # this target's key, nor claim a route it did not take.
            _count_refusal("config_error")
            message = f"llm-semantic-router config error: {exc}"
            kong.log.err(message)
            kong.log.set_serialize_value("aigov.router", {"route": None, "reason": "config_error"})
            kong.response.exit(500, _error_body(message, "router_config_error", "upstream_not_found"),
                               {"Content-Type": "application/json"})
            return
        self._report(kong, decision, model, started, replaced)

    def _apply(self, kong: Any, settings: RouterSettings, route: Route,
               chat: Any) -> tuple[str | None, dict[str, Any]]:
        """Point the request at the route's target; returns the model the upstream will see and
        the client's own values of the request headers this changed (see _report)."""
        t = route.target
        model = chat.model if chat is not None else None
        new_body = None
        if t.model and chat is not None:
            if chat.model != t.model:
                # Built before the first change to the request: nothing below is half-applied
                # (the client's credential left in place, say) if it failed.
                new_body = json_text({**chat.body, "model": t.model})
            model = t.model
        if t.upstream:
            # Kong answers nil (and an error it does not raise) for an unknown upstream name.
            if not value(kong.service.set_upstream(t.upstream)):
                raise TargetMissing(f"route {route.name!r}: target.upstream {t.upstream!r} is not a Kong "
                                    "upstream (kong.service.set_upstream found none by that name)")
        elif t.host:
            kong.service.set_target(t.host, int(t.port or 80))
        if t.scheme:
            kong.service.request.set_scheme(t.scheme)
        if t.path:
            kong.service.request.set_path(t.path)
        if new_body is not None:
            kong.service.request.set_raw_body(new_body)
        sent: Any = None
        if settings.strip_client_auth:
            # The client's credential (e.g. its Kong key) and any other target's key header must
            # never reach this upstream: clear them all, then set this target's own.
            # One read of the client's headers, then a clear only for those it really sent.
            sent = value(kong.request.get_headers())
            sent_names = {str(k).lower() for k in sent} if isinstance(sent, dict) else set(settings.credential_headers)
            for name in sorted(settings.credential_headers & sent_names):
                kong.service.request.clear_header(name)
        credential = t.credential_value()
        set_here = [*t.headers, *([(t.auth_header, credential)] if credential else [])]
        for name, val in set_here:
            kong.service.request.set_header(name, val)
        for name in sorted({n.lower() for n, _ in set_here} - _SERIALIZER_MASKED):
            # Kong's log serializer reads the request's headers after this change
            # (kong.request.get_headers) and masks only Authorization: every value the target's
            # config sets (a provider key, x-goog-api-key, an organisation id) is masked, or it
            # would reach http-log and file-log in plain text. (Dotted names: a config error.)
            kong.log.set_serialize_value(f"request.headers.{name}", "REDACTED")
        # Kong's later plugins read the changed headers (the same request): keep what the client
        # sent under the names this changed, for a quota that identifies callers by a header.
        changed = set(settings.credential_headers) | {n.lower() for n, _ in set_here}
        replaced = ({str(k).lower(): v for k, v in sent.items() if str(k).lower() in changed}
                    if isinstance(sent, dict) else {})
        return model, replaced

    @staticmethod
    def _headers(decision: Decision) -> dict[str, str]:
        h = {HEADER_ROUTE: decision.route_name, HEADER_REASON: decision.reason}
        if decision.score is not None:
            h[HEADER_SCORE] = f"{decision.score:.4f}"
        return h

    def _report(self, kong: Any, decision: Decision, model: str | None, started: float,
                replaced: dict[str, Any] | None = None) -> None:
        # Three round trips: the headers in one set_headers, the shared dict, and every log field
        # in one set_serialize_value (the serializer nests dotted keys, so the entry is the same
        # as setting aigov.router.route, .reason, ... one by one).
        kong.response.set_headers(self._headers(decision))
        shared = value(kong.ctx.shared.get(SHARED_KEY))
        shared = shared if isinstance(shared, dict) else {}
        shared["route"] = decision.route_name
        if model:
            shared["model"] = model
        if replaced:
            shared["client_headers"] = replaced  # in Kong's memory only, never logged
        kong.ctx.shared.set(SHARED_KEY, shared)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        fields: dict[str, Any] = {"route": decision.route_name, "reason": decision.reason}
        if decision.score is not None:
            fields["score"] = round(decision.score, 4)
        if decision.best:
            fields["best"] = decision.best
        fields["latency_ms"] = round(elapsed_ms, 2)
        kong.log.set_serialize_value("aigov.router", fields)
        metrics.ROUTER_DECISIONS.labels(route=decision.route_name, reason=decision.reason).inc()
        metrics.ROUTER_DECISION_LATENCY.observe(elapsed_ms)
