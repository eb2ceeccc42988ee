#!/usr/bin/env python3
"""Kong plugin `bench-noop`: the plugin-server round-trip benchmark's workload.

It does no work of its own: its access phase makes `pdk_calls` PDK calls (header reads and one
header write), so a benchmark measures only the plugin server and the socket protocol. The same
file runs on `aigov serve -d <this dir>` and, as a script, on kong-pdk's stock dedicated server.
It imports nothing from aigov on purpose: the stock server must load it unchanged.
"""

Schema = (
    {"pdk_calls": {"type": "integer", "default": 3, "between": [1, 100],
                   "description": "PDK calls made per access event (the last one sets a header)."}},
)
version = "0.1.0"
priority = 1


class Plugin:
    def __init__(self, config):
        self.calls = int((config or {}).get("pdk_calls") or 3)

    def access(self, kong):
        try:
            for _ in range(self.calls - 1):
                kong.request.get_header("x-bench")
            kong.response.set_header("x-bench-noop", "1")
        except Exception:  # a handler must never raise into the stock server (it deadlocks)
            pass


if __name__ == "__main__":
    from kong_pdk.cli import start_dedicated_server

    start_dedicated_server("bench-noop", Plugin, version, priority, Schema)
