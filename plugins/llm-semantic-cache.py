#!/usr/bin/env python3
"""Kong plugin `llm-semantic-cache`: a thin module over aigov.plugins.semantic_cache.

Runs on `aigov serve` (all plugins in one process) or, unchanged, on kong-pdk's stock dedicated
server: `python3 llm-semantic-cache.py --dump` prints the info Kong's query_cmd reads.

Capture phase, decided here at import: `response` (Kong buffers the upstream answer, which the
cache stores) unless AIGOV_CAPTURE_PHASE=log, for routes with ai-proxy: then no `response` phase is
declared, streams stay streamed, and the answer is taken in `log` from ai-proxy's logged payload.
"""
from aigov.plugins.semantic_cache.handler import PRIORITY, VERSION, SemanticCacheHandler, capture_phase
from aigov.plugins.semantic_cache.schema import SCHEMA

Schema = SCHEMA
version = VERSION
priority = PRIORITY

if capture_phase() == "log":
    class Plugin(SemanticCacheHandler):
        log = SemanticCacheHandler.capture_log
else:
    class Plugin(SemanticCacheHandler):
        response = SemanticCacheHandler.capture_response


if __name__ == "__main__":
    from kong_pdk.cli import start_dedicated_server

    start_dedicated_server("llm-semantic-cache", Plugin, version, priority, Schema)
