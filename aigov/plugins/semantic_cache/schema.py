"""Config schema of the llm-semantic-cache plugin (close to Kong's ai-semantic-cache where it fits).

Differences from Kong's, on purpose: `vectordb.threshold` is a cosine SIMILARITY (higher is
stricter; Kong's is a distance), `scope` defaults to per-consumer, `exact_caching` and the
`verifier` are on by default, and an in-process `memory` strategy exists.

Config errors are rejected when the gateway loads the config wherever the schema can say so:
`vectordb.namespace` carries a `match` Lua pattern (the characters keys and index names allow),
and the `embeddings` record entity checks (provider openai needs url and model; Kong, and the
stand-in after it, run a nested record's `entity_checks`). What a Python plugin's schema
cannot express (no entity_checks on the `config` record itself: admin_path needs admin_key) is
checked by aigov.cache.core.CacheSettings.from_config; the handler then answers every request
with a JSON 500 naming the field and logs it through kong.log.err, as the quota and router do.
"""
from __future__ import annotations

from aigov.cache.core import DEFAULT_THRESHOLD, FINISH_REASONS
from aigov.schema import Field, array, embeddings_record, field, header_secret, record, redis_record

# Lua pattern (Kong's `match`): the characters aigov.cache.core accepts in a namespace (A-Z a-z
# 0-9 _ -), since the namespace becomes part of Redis keys and the RediSearch index name.
NAMESPACE_PATTERN = "^[%w_%-]+$"

SCHEMA: list[Field] = [
    embeddings_record("How prompts are embedded: the local all-MiniLM-L6-v2 or an OpenAI-compatible endpoint.",
                      "Embedding model name (required with provider openai; ignored by local).", 120000),
    record("vectordb", "Where entries live and how similar a cached prompt must be to answer.", [
        field("strategy", "string", "Store: memory (in-process, single node) or redis (RediSearch vectors).",
              default="memory", one_of=["memory", "redis"]),
        field("threshold", "number",
              "Minimum cosine SIMILARITY (0.5-1, higher is stricter) for a semantic hit. Not a distance: "
              "for a Kong/RedisVL distance d use 1 - d.", default=DEFAULT_THRESHOLD, between=[0.5, 1]),
        field("namespace", "string", "Key and index namespace, letters, digits, _ and - only; "
              "`aigov purge --namespace` drops it.",
              default="aigov", len_min=1, len_max=64, match=NAMESPACE_PATTERN),
        field("max_entries", "integer", "Memory strategy: most entries kept per namespace (LRU eviction).",
              default=10000, between=[1, 10000000]),
        field("max_memory_mb", "integer", "Memory strategy: most megabytes of prompts, answers and vectors "
              "kept per namespace, estimated (LRU eviction).", default=256, between=[1, 1048576]),
        redis_record("Redis connection used when the strategy is redis (needs RediSearch / Redis 8)."),
    ], required=True),
    field("cache_ttl", "integer", "Seconds an entry lives (absolute: a hit does not extend it).",
          default=300, between=[1, 31536000]),
    field("scope", "string", "consumer: entries are per consumer (anonymous traffic shares one scope); "
          "global: every consumer shares entries.", default="consumer", one_of=["consumer", "global"]),
    field("message_countback", "integer", "How many of the last user messages form the semantic part.",
          default=1, between=[1, 100]),
    field("exact_caching", "boolean", "Check an exact (normalized text) layer before the vector search.",
          default=True),
    field("verifier", "boolean", "Refuse semantic candidates that differ in negation, numbers, units, "
          "direction, antonyms or names.", default=True),
    array("store_finish_reasons", "Answers are stored only when every choice ended with one of these "
          "(OpenAI's finish reasons).",
          {"type": "string", "one_of": list(FINISH_REASONS)}, default=["stop"], len_min=1),
    field("max_body_bytes", "integer", "Requests and responses bigger than this are neither looked up nor stored.",
          default=1048576, between=[1, 67108864]),
    field("max_temperature", "number", "Requests with a higher temperature bypass the cache (sampled answers).",
          default=1.0, between=[0, 2]),
    field("stop_on_failure", "boolean", "When the store or embedder fails: answer 503 instead of proxying.",
          default=False),
    field("admin_path", "string", "Optional request path on the route that purges this namespace "
          "(DELETE or POST with the X-Cache-Admin-Key header); the client's path as Kong normalises it, "
          "before strip_path (e.g. /llm/purge on a route at /llm; /llm/purge/ is the same); needs "
          "admin_key. On any other path the X-Cache-Admin-Key header is removed before proxying.",
          starts_with="/"),
    header_secret("admin_key", "Key the X-Cache-Admin-Key header must carry on admin_path (required with admin_path); a Vault "
           "reference is fine."),
]
