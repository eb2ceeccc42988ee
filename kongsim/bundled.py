"""Imitations of two bundled Kong plugins: key-auth and ai-proxy.

These imitate the OBSERVABLE CONTRACT ONLY (status codes, messages, headers, what a plugin
written against Kong can read through the PDK), not Kong's Lua implementation. Any other
bundled plugin name in a kong.yml is reported as "not imitated by the stand-in".

* key-auth (priority 1250, `kong/plugins/key-auth/handler.lua`): key_names default
  ["apikey"], key_in_header/query/body, hide_credentials (clears the header and the query
  argument of that name, and the body field), anonymous; 401 `{"message":"No API key found in
  request"}` without a key, `{"message":"Unauthorized"}` with a wrong one and `{"message":
  "Duplicate API key found"}` for a key sent twice (Kong 3.x wording), `WWW-Authenticate: Key`;
  sets the authenticated consumer and credential plus the X-Consumer-* upstream headers.
* ai-proxy (priority 770, reference kong-plugin-server.md §4.1): route_type llm/v1/chat with
  provider openai only; model.name / model.options.upstream_url; auth.header_name /
  header_value; logging.log_statistics / log_payloads set `ai.proxy.meta`, `ai.proxy.usage`,
  `ai.proxy.payload.{request,response}` in the serializer and `ngx.ctx.ai_llm_metrics`;
  `X-Kong-LLM-Model: openai/<model>` when the service answered 200; streams pass through (usage read from the final chunk).
"""
from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from kongsim.pdk import ExitSignal, RequestContext
from kongsim import redact

log = redact.get_logger("kongsim.bundled")

# Kong 3.9 bundled plugins (kong/constants.lua BUNDLED_PLUGINS) plus common Enterprise ones.
KONG_BUNDLED = {
    "acl", "acme", "ai-prompt-decorator", "ai-prompt-guard", "ai-prompt-template", "ai-proxy",
    "ai-request-transformer", "ai-response-transformer", "aws-lambda", "azure-functions",
    "basic-auth", "bot-detection", "correlation-id", "cors", "datadog", "file-log",
    "grpc-gateway", "grpc-web", "hmac-auth", "http-log", "ip-restriction", "jwt", "key-auth",
    "ldap-auth", "loggly", "oauth2", "opentelemetry", "post-function", "pre-function",
    "prometheus", "proxy-cache", "rate-limiting", "redirect", "request-size-limiting",
    "request-termination", "request-transformer", "response-ratelimiting",
    "response-transformer", "session", "standard-webhooks", "statsd", "syslog", "tcp-log",
    "udp-log", "zipkin",
    "ai-proxy-advanced", "ai-semantic-cache", "ai-rate-limiting-advanced", "ai-semantic-prompt-guard",
    "ai-rag-injector", "ai-sanitizer", "ai-azure-content-safety", "ai-prompt-compressor",
    "rate-limiting-advanced", "openid-connect", "key-auth-enc", "request-validator",
}


def _f(name: str, type_: str, **attrs: Any) -> dict[str, Any]:
    return {name: {"type": type_, **attrs}}


class BundledPlugin:
    name = ""
    priority = 0
    phases: frozenset[str] = frozenset()
    fields: list[dict[str, Any]] = []

    def access(self, runloop: Any, ctx: RequestContext, conf: dict[str, Any]) -> None:
        """Runs in access; may raise ExitSignal after setting ctx.exit_response."""

    def response_started(self, ctx: RequestContext, conf: dict[str, Any]) -> None:
        """Imitates header_filter: upstream status/headers are on ctx."""

    def response_chunk(self, ctx: RequestContext, conf: dict[str, Any], chunk: bytes) -> None:
        """Imitates body_filter for one chunk."""

    def response_finished(self, ctx: RequestContext, conf: dict[str, Any]) -> None:
        """Imitates the last body_filter call (eof)."""


class KeyAuth(BundledPlugin):
    name = "key-auth"
    priority = 1250
    phases = frozenset({"access"})
    fields = [
        _f("key_names", "array", elements={"type": "string"}, default=["apikey"], required=True),
        _f("hide_credentials", "boolean", default=False, required=True),
        _f("anonymous", "string"),
        _f("key_in_header", "boolean", default=True, required=True),
        _f("key_in_query", "boolean", default=True, required=True),
        _f("key_in_body", "boolean", default=False, required=True),
        _f("run_on_preflight", "boolean", default=True, required=True),
        _f("realm", "string"),
    ]

    def access(self, runloop: Any, ctx: RequestContext, conf: dict[str, Any]) -> None:
        if not conf["run_on_preflight"] and ctx.method == "OPTIONS":
            return
        if ctx.credential is not None and conf.get("anonymous"):
            return  # already authenticated by another plugin (logical OR with anonymous)
        key, where = self._find_key(ctx, conf)
        if key is not None:
            redact.register_secret(key)
        config = runloop.config
        found = config.consumer_by_key(key) if key else None
        if found is None:
            if conf.get("anonymous"):
                anon = config.find_consumer(conf["anonymous"])
                if anon is None:
                    self._exit(ctx, 500, "anonymous consumer " + conf["anonymous"] + " is configured but doesn't exist", conf)
                ctx.consumer, ctx.credential = anon, None
                up = ctx.upstream
                if up is not None:
                    self._consumer_headers(ctx, anon)
                    up.headers.remove("X-Credential-Identifier")  # set_consumer(anonymous, nil)
                    up.headers.set("X-Anonymous-Consumer", "true")
                return
            if where == "duplicate":
                self._exit(ctx, 401, "Duplicate API key found", conf)
            if key is None:
                self._exit(ctx, 401, "No API key found in request", conf)
            self._exit(ctx, 401, "Unauthorized", conf)
        consumer, cred = found
        ctx.consumer, ctx.credential = consumer, cred
        if ctx.upstream is not None:
            self._consumer_headers(ctx, consumer)
            ctx.upstream.headers.set("X-Credential-Identifier", cred.id)
            ctx.upstream.headers.remove("X-Anonymous-Consumer")
            if conf["hide_credentials"]:
                self._hide(ctx, conf, where)

    @staticmethod
    def _consumer_headers(ctx: RequestContext, consumer: Any) -> None:
        up = ctx.upstream
        assert up is not None
        up.headers.set("X-Consumer-ID", consumer.id)
        for header, value in (("X-Consumer-Custom-ID", consumer.custom_id),
                              ("X-Consumer-Username", consumer.username)):
            if value:
                up.headers.set(header, value)
            else:
                up.headers.remove(header)

    @staticmethod
    def _find_key(ctx: RequestContext, conf: dict[str, Any]) -> tuple[str | None, str | None]:
        """(key, where); where is "duplicate" for a key sent twice (a Lua table in Kong's
        get_headers / get_query: 401 "Duplicate API key found")."""
        body_args: dict[str, Any] | None = None
        for name in conf["key_names"]:
            if conf["key_in_header"]:
                values = ctx.headers.get_all(name)
                if len(values) > 1:
                    return None, "duplicate"
                if values:
                    return values[0], "header:" + name
            if conf["key_in_query"]:
                values = ctx.query_multimap().get(name)
                if values and len(values) > 1:
                    return None, "duplicate"
                if values:
                    return values[0], "query:" + name
            if conf["key_in_body"]:
                if body_args is None:
                    body_args = _body_args(ctx)
                if isinstance(body_args.get(name), str):
                    return body_args[name], "body:" + name
        return None, None

    @staticmethod
    def _hide(ctx: RequestContext, conf: dict[str, Any], where: str | None) -> None:
        # Kong clears the query argument and the header of that name wherever the key was
        # found, and the body field when key_in_body is on (key-auth handler.lua).
        up = ctx.upstream
        assert up is not None
        kind, _, name = (where or "").partition(":")
        up.headers.remove(name)
        ctx.headers.remove(name)  # the same request in Kong: gone from get_header and the log too
        up.query = urlencode([(k, v) for k, v in parse_qsl(up.query, keep_blank_values=True) if k != name])
        # clear_query_arg changes the request's args: kong.request.get_query and the logged
        # querystring lose the key; the logged uri ($request_uri) keeps the line as sent, as Kong's
        ctx.query = urlencode([(k, v) for k, v in parse_qsl(ctx.query, keep_blank_values=True) if k != name])
        if conf["key_in_body"] and (kind == "body" or name in _body_args(ctx)):
            args = _body_args(ctx)
            args.pop(name, None)
            ctype = (ctx.headers.get("content-type") or "").lower()
            up.body = json.dumps(args).encode() if "json" in ctype else urlencode(args).encode()
            up.headers.set("Content-Length", str(len(up.body)))
            ctx.body = up.body

    @staticmethod
    def _exit(ctx: RequestContext, status: int, message: str, conf: dict[str, Any]) -> None:
        from kongsim.pdk import Headers
        hdrs = ctx.response_headers.copy()
        hdrs.set("Content-Type", "application/json; charset=utf-8")
        if status == 401:
            realm = conf.get("realm")
            hdrs.set("WWW-Authenticate", f'Key realm="{realm}"' if realm else "Key")
        ctx.exit_response = (status, json.dumps({"message": message}).encode(), hdrs)
        ctx.response_source = "exit"
        raise ExitSignal()


def _body_args(ctx: RequestContext) -> dict[str, Any]:
    ctype = (ctx.headers.get("content-type") or "").lower()
    try:
        if "json" in ctype:
            doc = json.loads(ctx.body or b"{}")
            return doc if isinstance(doc, dict) else {}
        if "x-www-form-urlencoded" in ctype:
            return dict(parse_qsl(ctx.body.decode("utf-8", "replace"), keep_blank_values=True))
    except ValueError:
        pass
    return {}


OPENAI_CHAT_URL = "https://api.openai.com:443/v1/chat/completions"


class AiProxy(BundledPlugin):
    name = "ai-proxy"
    priority = 770
    phases = frozenset({"access", "header_filter", "body_filter"})
    fields = [
        _f("route_type", "string", required=True,
           one_of=["llm/v1/chat", "llm/v1/completions", "preserve"]),
        _f("auth", "record", fields=[
            _f("header_name", "string", referenceable=True),
            _f("header_value", "string", referenceable=True, encrypted=True),
            _f("param_name", "string", referenceable=True),
            _f("param_value", "string", referenceable=True, encrypted=True),
            _f("param_location", "string", one_of=["query", "body"]),
            _f("allow_override", "boolean", default=False),
        ]),
        _f("model", "record", required=True, fields=[
            _f("provider", "string", required=True,
               one_of=["openai", "azure", "anthropic", "cohere", "mistral", "llama2", "gemini",
                       "bedrock", "huggingface"]),
            _f("name", "string"),
            _f("options", "record", fields=[
                _f("upstream_url", "string"),
                _f("max_tokens", "integer"),
                _f("temperature", "number", between=[0, 5]),
                _f("top_p", "number", between=[0, 1]),
                _f("input_cost", "number"),
                _f("output_cost", "number"),
                _f("upstream_path", "string"),
            ]),
        ]),
        _f("logging", "record", required=True, fields=[
            _f("log_statistics", "boolean", default=False, required=True),
            _f("log_payloads", "boolean", default=False, required=True),
        ]),
        _f("model_name_header", "boolean", default=True, required=True),
        _f("response_streaming", "string", default="allow", one_of=["allow", "deny", "always"]),
        _f("max_request_body_size", "integer", default=8192, gt=0),
        _f("llm_format", "string", default="openai", one_of=["openai"]),
    ]

    def check_config(self, conf: dict[str, Any]) -> list[str]:
        problems = []
        if conf["model"]["provider"] != "openai":
            problems.append(f"model.provider {conf['model']['provider']!r} is not imitated by the "
                            "stand-in (only openai)")
        if conf["route_type"] != "llm/v1/chat":
            problems.append(f"route_type {conf['route_type']!r} is not imitated by the stand-in "
                            "(only llm/v1/chat)")
        return problems

    def access(self, runloop: Any, ctx: RequestContext, conf: dict[str, Any]) -> None:
        state: dict[str, Any] = {}
        ctx.ngx_ctx.setdefault("_kongsim_ai_proxy", state)
        if len(ctx.body) > conf["max_request_body_size"]:
            self._fail(ctx, 413, "request body too large")
        try:
            body = json.loads(ctx.body or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._fail(ctx, 400, "request format not recognised")
        model = conf["model"].get("name")
        requested = body.get("model")
        if model and requested and requested != model:
            self._fail(ctx, 400, f"cannot use own model - must be: {model}")
        model = model or requested
        if not model:
            self._fail(ctx, 400, "model parameter not found in request, nor in gateway configuration")
        body["model"] = model
        stream = bool(body.get("stream"))
        if stream and conf["response_streaming"] == "deny":
            self._fail(ctx, 400, "response streaming is not enabled for this LLM")
        options = conf["model"].get("options") or {}
        for key in ("max_tokens", "temperature", "top_p"):
            if options.get(key) is not None and body.get(key) is None:
                body[key] = options[key]
        up = ctx.upstream
        assert up is not None
        url = urlsplit(options.get("upstream_url") or OPENAI_CHAT_URL)
        up.scheme = url.scheme or "https"
        up.host = url.hostname or "api.openai.com"
        up.port = url.port or (443 if up.scheme == "https" else 80)
        up.path = url.path or "/v1/chat/completions"
        up.query = url.query
        up.method = "POST"
        up.target = (up.host, up.port)
        up.headers.set("Host", up.host if url.port is None else f"{up.host}:{up.port}")
        auth = conf.get("auth") or {}
        if auth.get("header_name") and auth.get("header_value"):
            if not (auth.get("allow_override") and ctx.headers.get(auth["header_name"])):
                up.headers.set(auth["header_name"], auth["header_value"])
        up.body = json.dumps(body).encode()
        up.headers.set("Content-Type", "application/json")
        up.headers.set("Content-Length", str(len(up.body)))
        if not stream:
            up.buffered = True  # the enable-buffering filter
        state.update(model=model, stream=stream, started=time.time(), request=up.body.decode(),
                     chunks=[], usage=None, response_model=None)

    @staticmethod
    def _fail(ctx: RequestContext, status: int, message: str) -> None:
        from kongsim.pdk import Headers
        hdrs = Headers([("Content-Type", "application/json; charset=utf-8")])
        ctx.exit_response = (status, json.dumps({"error": {"message": message}}).encode(), hdrs)
        ctx.response_source = "exit"
        raise ExitSignal()

    def response_started(self, ctx: RequestContext, conf: dict[str, Any]) -> None:
        state = ctx.ngx_ctx.get("_kongsim_ai_proxy")
        # normalize-json-response.lua (RES_TRANSFORMATION, run in header_filter for streams
        # too) sets it only when the service answered 200: not for an error or another exit.
        if (state and conf["model_name_header"]
                and ctx.response_source == "service" and ctx.service_status == 200):
            ctx.response_headers.set("X-Kong-LLM-Model", f"openai/{state['model']}")

    def response_chunk(self, ctx: RequestContext, conf: dict[str, Any], chunk: bytes) -> None:
        state = ctx.ngx_ctx.get("_kongsim_ai_proxy")
        if state is not None:
            state["chunks"].append(chunk)

    def response_finished(self, ctx: RequestContext, conf: dict[str, Any]) -> None:
        state = ctx.ngx_ctx.pop("_kongsim_ai_proxy", None)
        if not state:
            return
        raw = b"".join(state["chunks"])
        usage: dict[str, Any] = {}
        response_model = state["model"]
        if state["stream"]:
            for line in raw.decode("utf-8", "replace").splitlines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    continue
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    response_model = event.get("model") or response_model
                    if isinstance(event.get("usage"), dict):
                        usage = event["usage"]
        else:
            try:
                doc = json.loads(raw or b"null")
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                response_model = doc.get("model") or response_model
                usage = doc.get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        latency_ms = int((time.time() - state["started"]) * 1000)
        options = conf["model"].get("options") or {}
        cost = 0.0
        if options.get("input_cost") is not None and options.get("output_cost") is not None:
            cost = (prompt * options["input_cost"] + completion * options["output_cost"]) / 1e6
        ctx.ngx_ctx["ai_llm_metrics"] = {
            "llm_prompt_tokens_count": prompt, "llm_completion_tokens_count": completion,
            "llm_e2e_latency": latency_ms, "llm_usage_cost": cost,
            "llm_total_tokens_count": prompt + completion,
        }
        if conf["logging"]["log_statistics"]:
            ctx.serialize_values["ai.proxy.meta"] = {
                "plugin_id": conf.get("__plugin_id"), "provider_name": "openai",
                "request_model": state["model"], "response_model": response_model,
                "llm_latency": latency_ms,
            }
            ctx.serialize_values["ai.proxy.usage"] = {
                "prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "time_per_token": (latency_ms / completion) if completion else 0, "cost": cost,
            }
        if conf["logging"]["log_payloads"]:
            ctx.serialize_values["ai.proxy.payload.request"] = state["request"]
            ctx.serialize_values["ai.proxy.payload.response"] = raw.decode("utf-8", "replace")


IMITATED: dict[str, BundledPlugin] = {p.name: p for p in (KeyAuth(), AiProxy())}
