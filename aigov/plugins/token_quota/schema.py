"""Config schema of the llm-token-quota plugin (a Kong plugin schema: see aigov.schema).

Prices are USD per 1M tokens; the `between` bounds reject per-token numbers (0.0000025) and
absurd ones at config time, in Kong's own validation. Cross-field rules Kong's metaschema cannot
express for an external plugin (default_price required by unknown_model=default_price, the
identifier header) are checked by aigov.quota.core.QuotaConfig when the instance starts.
"""
from __future__ import annotations

from aigov.quota.core import IDENTIFIER_SOURCES
from aigov.quota.windows import WINDOWS
from aigov.schema import Field, array, field, record, redis_record

_PRICE_BOUNDS = [0.001, 10000]


def _price_fields(required: bool) -> list[Field]:
    return [
        field("input", "number", "USD per 1M prompt tokens (not per token: gpt-4o is 2.5).",
              between=_PRICE_BOUNDS, required=required),
        field("output", "number", "USD per 1M completion tokens (gpt-4o is 10).",
              between=_PRICE_BOUNDS, required=required),
        field("cached_input", "number", "USD per 1M cached prompt tokens; defaults to the input price.",
              between=_PRICE_BOUNDS),
        field("reasoning", "number", "USD per 1M reasoning tokens; defaults to the output price.",
              between=_PRICE_BOUNDS),
    ]


SCHEMA: list[Field] = [
    array("limits", "Budgets a caller must fit in; every limit that applies is checked and reserved at once.", {
        "type": "record",
        "fields": [
            field("window", "string", "Fixed UTC window: minute, hour, day, week (Monday) or month (calendar).",
                  one_of=list(WINDOWS), required=True),
            # Bounded so no counter can overflow Redis's 64-bit integers (a request adds at most
            # MAX_REQUEST_AMOUNT tokens or nano-USD, aigov.quota.core).
            field("tokens", "integer", "Token budget per window (provider-metered total tokens).", gt=0,
                  between=[1, 10**18]),
            field("cost_usd", "number", "Cost budget per window in USD, priced with the price table.", gt=0,
                  between=[0, 10**9]),
            field("name", "string", "Optional name, used in the 429 message and the header suffix."),
            field("per_model", "boolean", "Keep a separate counter per model for this limit. Models not in the "
                  "price table share one counter (their names are the client's), unless listed in models.",
                  default=False),
            field("per_route", "boolean", "Keep a separate counter per Kong route for this limit.", default=False),
            array("models", "Apply this limit only to these models (empty: every model); a base model "
                            "covers its fine-tunes and dated snapshots (gpt-4o: ft:gpt-4o-..., gpt-4o-2024-05-13).",
                  {"type": "string"}, default=[]),
        ],
        # Kong runs a nested record's entity checks at load: a limit with no budget is refused there.
        "entity_checks": [{"at_least_one_of": ["tokens", "cost_usd"]}],
    }, default=[]),
    field("limit_by", "string",
          "consumer: each caller has its own counters; global: every caller shares them.",
          one_of=["consumer", "global"], default="consumer"),
    array("identifier_sources", "How a caller is identified, first match wins: consumer, credential, header, "
          "ip (none matching: the client address, as Kong's rate-limiting).",
          {"type": "string", "one_of": list(IDENTIFIER_SOURCES)},
          default=["consumer", "credential", "ip"]),
    field("identifier_header", "string", "Request header naming the caller when 'header' is a source."),
    field("policy", "string", "Where counters live: memory (one node) or redis (shared by every node).",
          one_of=["memory", "redis"], default="memory"),
    redis_record("Redis connection used when policy is redis."),
    field("key_prefix", "string", "Prefix of the Redis keys of this plugin's counters.", default="aigov:quota"),
    field("on_store_failure", "string",
          "Redis down: fail_open serves and counts in local memory; fail_closed answers 503.",
          one_of=["fail_open", "fail_closed"], default="fail_open"),
    field("on_malformed_request", "string",
          "Body that is not a readable chat request (not JSON in any encoding, no messages): pass it on "
          "unmetered, or reject it with 400. A chat request with a wrongly typed field is always "
          "rejected with 400, as OpenAI does.",
          one_of=["pass", "reject"], default="pass"),
    field("unknown_model", "string",
          "Model missing from the price table: block with 400, or charge default_price.",
          one_of=["block", "default_price"], default="block"),
    record("default_price", "Price charged for unknown models when unknown_model is default_price.",
           _price_fields(required=False)),
    array("prices", "Per-model price overrides (USD per 1M tokens) on top of the shipped table.", {
        "type": "record",
        "fields": [field("model", "string", "Model name as clients send it (dated variants match).",
                         required=True), *_price_fields(required=True)],
    }, default=[]),
    field("completion_estimate_tokens", "integer",
          "Completion tokens reserved when the request sets no max_tokens.", default=512, between=[1, 1000000]),
    field("reservation_ttl_seconds", "integer",
          "A reservation nobody settles (node died) is given back after this many seconds. Keep it "
          "above the longest request (a stream can outlast Kong's read_timeout, which bounds each "
          "read): a request still running then loses its reservation, and the limit can be passed.",
          default=600, between=[10, 86400]),
    field("hide_client_headers", "boolean", "Do not send the X-AI-RateLimit-* and X-AI-Tokens-* headers.",
          default=False),
    field("log_statistics", "boolean",
          "Write each request's charge to Kong's log serializer as aigov.quota, for http-log and "
          "file-log (like ai-proxy's logging.log_statistics): the settled usage from the response "
          "phase, or the reservation with AIGOV_CAPTURE_PHASE=log. One more PDK call per request.",
          default=False),
    field("stream_usage", "string",
          "request: add stream_options.include_usage to a streamed chat request that lacks it, so the "
          "provider's usage settles it exactly (images, audio and files included); the client then "
          "receives the final usage chunk (choices empty) too, which OpenAI's SDKs handle but a client "
          "reading choices[0] of every chunk does not. as_sent: forward the request unchanged and "
          "count a stream without usage itself.", default="as_sent", one_of=["as_sent", "request"]),
]
