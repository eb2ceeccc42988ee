"""Config schema of the llm-semantic-router plugin (a Kong plugin schema: see aigov.schema).

Cross-field rules Kong's schema cannot express for a Python plugin (no entity_checks) are checked
by aigov.routing.core.settings_from_config: default_route must name a route or be "reject",
route names are unique, a target sets upstream or host (not both). A config that breaks them
answers every request with a clear 500 JSON error naming the field, and logs it.
"""
from __future__ import annotations

from aigov.schema import (CONTROL_CHAR_ERR, CONTROL_CHAR_PATTERN, Field, array, embeddings_record, field,
                          header_secret, record)

_STRINGS = {"type": "string"}
# A Lua pattern (Kong's `match`): the header names the router may set. A dotted name cannot be
# masked in Kong's log entry (the serializer nests dotted keys). Values: CONTROL_CHAR_PATTERN.
HEADER_NAME_PATTERN = "^[%w_%-]+$"
# A target host is a name or an address: letters, digits, ".", "-", "_", and an IPv6 address in
# brackets; no control characters (a CR/LF would reach the Host header), spaces, URL parts
# (scheme, path, userinfo) or a port (that is `port`: "host:8080" failed only at request time).
HOST_PATTERN = "^[%w%.%-_%[%]:]+$"
HOST_WITH_PORT_PATTERN = "^[^%[].*:"

EMBEDDINGS = embeddings_record(
    "Which embedder turns prompts and utterances into vectors: the local all-MiniLM-L6-v2 model "
    "(default) or an OpenAI-compatible /embeddings endpoint.",
    "Embedding model name sent to the openai endpoint (required with provider openai); its id is what "
    "calibrated_for_model is compared with.", 600000)

TARGET = record("target", "Where a routed request goes and with which model and credential.", [
    field("upstream", "string", "Kong upstream entity name to proxy to (kong.service.set_upstream)."),
    field("host", "string", "Host to proxy to when no upstream is named (kong.service.set_target).",
          match=HOST_PATTERN, not_match=HOST_WITH_PORT_PATTERN,
          err="must be a host name or IP address (IPv6 in brackets), without a port (set port), spaces, "
              "control characters or URL parts"),
    field("port", "integer", "Port used with host (80, or 443 with scheme https, when unset).",
          between=[1, 65535]),
    field("scheme", "string", "Upstream scheme (http or https); unset keeps the service's.",
          one_of=["http", "https"]),
    field("path", "string", "Upstream request path, e.g. /v1/chat/completions; unset keeps it.",
          starts_with="/", not_match="[%c?#]",
          err="must start with / and have no query, fragment or control characters"),
    field("model", "string", "Model name written into the JSON body's model field; unset keeps the client's."),
    field("headers", "map", "Extra upstream request headers set for this target (names of letters, "
          "digits, - and _; values without control characters).",
          keys={"type": "string", "match": HEADER_NAME_PATTERN},
          values={"type": "string", "not_match": CONTROL_CHAR_PATTERN, "err": CONTROL_CHAR_ERR}),
    header_secret("api_key", "This target's own credential, sent only to this target; use a Kong Vault "
           "reference such as {vault://env/OPENAI_KEY} to keep it out of kong.yml."),
    field("auth_header", "string", "Header that carries api_key (Authorization, api-key, x-api-key...).",
          default="Authorization", match=HEADER_NAME_PATTERN),
    field("auth_prefix", "string", "Prefix before api_key; unset means 'Bearer ' for Authorization "
          "and nothing for other headers.", not_match=CONTROL_CHAR_PATTERN, err=CONTROL_CHAR_ERR),
], required=True)

ROUTE = {"type": "record", "fields": [
    # A response header value: a line break in it would split the header (CONTROL_CHAR_PATTERN).
    field("name", "string", "Route name: shown in X-Semantic-Route and used by default_route.",
          required=True, len_min=1, not_one_of=["reject"], not_match=CONTROL_CHAR_PATTERN,
          err=CONTROL_CHAR_ERR),
    array("utterances", "Example prompts of this route (the more, the better the decisions).",
          _STRINGS, required=True, len_min=1),
    array("negative_utterances", "Prompts that look close to this route but must not be sent to it: "
          "out-of-scope examples, like the top-level negative_utterances (they take the default route).",
          _STRINGS, default=[]),
    TARGET,
]}

THRESHOLDS = record("thresholds", "Out-of-scope decision. By default the threshold is calibrated "
                    "at instance start on the route data (held-out utterances and negatives).", [
    field("min_confidence", "number", "Fixed confidence threshold (output of aigov calibrate "
          "router); unset means self-calibrated. Belongs to calibrated_for_model.", between=[-2, 3]),
    field("target_oos_recall", "number", "Share of negative utterances the self-calibrated "
          "threshold sends to the default route.", default=0.9, between=[0.5, 1]),
    field("top_k", "integer", "Utterances averaged per route for the similarity score; unset "
          "chooses from the route sizes.", between=[1, 50]),
], required=True)

SCHEMA: list[Field] = [
    array("routes", "The routes: each with a name, example utterances and a target.", ROUTE,
          required=True, len_min=1),
    field("default_route", "string", "Route used when no route matches confidently, or 'reject' "
          "to answer such prompts with a clear 4xx JSON error.", required=True),
    field("reject_status", "integer", "HTTP status when default_route is reject.", default=400,
          between=[400, 499]),
    array("negative_utterances", "Prompts that belong to no route (off-topic examples): they "
          "teach the out-of-scope decision.", _STRINGS, default=[]),
    field("embed_text", "string", "What is embedded: last_user (the last user message) or "
          "last_n_turns (the last embed_turns user messages).", default="last_user",
          one_of=["last_user", "last_n_turns"]),
    field("embed_turns", "integer", "Number of user turns embedded with embed_text=last_n_turns.",
          default=3, between=[1, 50]),
    THRESHOLDS,
    field("calibrated_for_model", "string", "Embedding model id the thresholds were calibrated for "
          "(e.g. sentence-transformers/all-MiniLM-L6-v2); another embedder is a mismatch."),
    field("on_model_mismatch", "string", "What a calibrated_for_model mismatch does: error (every "
          "request gets a 500 config error) or warn (log, and self-calibrate instead).",
          default="error", one_of=["error", "warn"]),
    field("force_route_header", "string", "Request header whose value (a route name) forces the "
          "route, for debugging; unset (the default) disables forcing."),
    field("strip_client_auth", "boolean", "Remove the client's Authorization header and every "
          "target's auth header before setting the chosen target's own key.", default=True),
    EMBEDDINGS,
    field("max_body_bytes", "integer", "Bodies larger than this are not parsed: they take the default "
          "route unread, or get 413 when that route's target sets a model (it could not be enforced).",
          default=1048576, between=[1024, 67108864]),
    field("build_timeout_ms", "integer", "How long a request waits for the route model to be "
          "built; past it the request takes the default route (reason error).", default=30000,
          between=[0, 55000]),
    field("cache_dir", "string", "Directory where trained route models are stored so restarts "
          "reuse them (also $AIGOV_ROUTER_CACHE_DIR); unset keeps them in memory only."),
]
