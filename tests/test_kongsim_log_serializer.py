"""kong.log.set_serialize_value by phase, as Kong 3.9 runs external plugins (kongsim.pdk).

Kong runs an external plugin's log handler in its own ngx.timer.at(0) with a snapshot of
kong.log.serialize() taken when the log phase called it, on a clone of ngx.ctx
(kong/runloop/plugin_servers/plugin.lua build_phases); the Lua loggers (http-log, file-log) have
serialized by then. So a value set from access or response is in every log entry, and a value
set from a log handler is seen by nobody, not even that handler's own later serialize().
"""
from __future__ import annotations

import json

from kongsim.pdk import PDK, Headers, RequestContext


def _ctx() -> RequestContext:
    return RequestContext(method="POST", scheme="http", host="kong.local", port=8000, path="/v1/chat",
                          query="", headers=Headers([("host", "kong.local")]), body=b"{}")


def test_values_from_access_and_response_reach_the_log_entry_and_log_timer_values_do_not() -> None:
    pdk, ctx = PDK(), _ctx()
    ctx.phase = "access"
    pdk.call(ctx, "kong.log.set_serialize_value", ["mine.access", 1])
    ctx.phase = "response"
    pdk.call(ctx, "kong.log.set_serialize_value", ["mine.response", {"n": 2}])
    ctx.save_for_log()  # Kong's log phase: the snapshot every log handler (and http-log) gets
    ctx.phase = "log"
    pdk.call(ctx, "kong.log.set_serialize_value", ["mine.log", 3])
    entry = json.loads(pdk.call(ctx, "kong.log.serialize", []))
    assert entry["mine"] == {"access": 1, "response": {"n": 2}}
    assert ctx.saved["serialize"]["mine"] == {"access": 1, "response": {"n": 2}}
    assert ctx.discarded_serialize_values == {"mine.log": 3}
