#!/usr/bin/env python3
"""Kong plugin `llm-token-quota`: a thin module over aigov.plugins.token_quota.

Runs on `aigov serve` (all plugins in one process) or, unchanged, on kong-pdk's stock dedicated
server: `python3 llm-token-quota.py --dump` prints the info Kong's query_cmd reads.
"""
from aigov.plugins.token_quota.handler import TokenQuotaHandler, PRIORITY, VERSION
from aigov.plugins.token_quota.schema import SCHEMA

Schema = SCHEMA
version = VERSION
priority = PRIORITY


class Plugin(TokenQuotaHandler):
    pass


if __name__ == "__main__":
    from kong_pdk.cli import start_dedicated_server

    start_dedicated_server("llm-token-quota", Plugin, version, priority, Schema)
