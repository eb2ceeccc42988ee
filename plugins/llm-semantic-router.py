#!/usr/bin/env python3
"""Kong plugin `llm-semantic-router`: a thin module over aigov.plugins.semantic_router.

Runs on `aigov serve` (all plugins in one process) or, unchanged, on kong-pdk's stock dedicated
server: `python3 llm-semantic-router.py --dump` prints the info Kong's query_cmd reads.
"""
from aigov.plugins.semantic_router.handler import SemanticRouterHandler, PRIORITY, VERSION
from aigov.plugins.semantic_router.schema import SCHEMA

Schema = SCHEMA
version = VERSION
priority = PRIORITY


class Plugin(SemanticRouterHandler):
    pass


if __name__ == "__main__":
    from kong_pdk.cli import start_dedicated_server

    start_dedicated_server("llm-semantic-router", Plugin, version, priority, Schema)
