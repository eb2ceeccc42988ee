#!/usr/bin/env python3
"""Kong plugin `bench-pdk-floor`: llm-token-quota's PDK calls with none of its work.

Section 2 of the benchmark puts it on the route in place of the quota: the same phases (access
and, unless AIGOV_CAPTURE_PHASE=log, response, which makes Kong buffer the upstream answer; log
after the response), the same PDK calls in the same order with values of the same shape, and no
parsing, token counting, Redis or metrics. What it adds to a request is what those round trips
cost on this machine, so the quota's own work is the difference, measured in the same run.
Keep its calls in step with aigov/plugins/token_quota/handler.py (test_bench_sections checks).
"""
import os

Schema = (
    {"label": {"type": "string", "default": "floor",
               "description": "A label for this instance (the floor makes no use of it)."}},
)
version = "0.1.0"
priority = 906  # llm-token-quota's

STATE_KEY = "aigov.quota"
CAPTURE_PHASE = "log" if os.environ.get("AIGOV_CAPTURE_PHASE", "").strip().lower() == "log" else "response"
_STATE = {  # the quota's state for one day-window limit: same keys, same sizes
    "rid": "0" * 32, "tag": "consumer:" + "0" * 16, "store": "redis", "model": "gpt-4o-mini",
    "model_label": "gpt-4o-mini", "price": [150000, 600000, -1, -1],
    "counters": [["aigov:quota:consumer:" + "0" * 16 + ":tokens:day:20261203", "tokens", "day",
                  1000000000, 1764806400, 1764810000, "Day", "1000000000 tokens per day"]],
    "reserved": [4123], "estimate": [27, 4096, 2461], "stream": False,
}
_ACCESS_HEADERS = {"X-AI-RateLimit-Limit-Day": "1000000000", "X-AI-RateLimit-Remaining-Day": "999995877",
                   "X-AI-RateLimit-Reset-Day": "5400"}  # the quota's (aigov.quota.core.rate_limit_headers)
_RESPONSE_HEADERS = {**_ACCESS_HEADERS, "X-AI-Tokens-Prompt": "27", "X-AI-Tokens-Completion": "40",
                     "X-AI-Cost-USD": "0.000028050"}


class Plugin:
    def __init__(self, config):
        self.label = str((config or {}).get("label") or "floor")

    def access(self, kong):
        kong.request.get_raw_body(8 * 1024 * 1024)  # aigov.pdk.request_body's bound
        kong.client.get_consumer()
        kong.ctx.shared.set(STATE_KEY, dict(_STATE))
        kong.response.set_headers(_ACCESS_HEADERS)

    def _response(self, kong):
        kong.ctx.shared.get(STATE_KEY)
        kong.service.response.get_raw_body()
        kong.response.set_headers(_RESPONSE_HEADERS)

    def log(self, kong):
        kong.ctx.shared.get(STATE_KEY)
        if CAPTURE_PHASE == "log":
            kong.log.serialize()  # log mode reads ai-proxy's usage from the serializer


if CAPTURE_PHASE == "response":
    Plugin.response = Plugin._response


if __name__ == "__main__":
    from kong_pdk.cli import start_dedicated_server

    start_dedicated_server("bench-pdk-floor", Plugin, version, priority, Schema)
