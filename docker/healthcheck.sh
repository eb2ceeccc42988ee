#!/bin/sh
# Container health for Kong + the aigov plugin server(s).
#
# Healthy means: Kong's nginx is running (`kong health`) AND every pluginserver socket named by a
# KONG_PLUGINSERVER_<NAME>_SOCKET variable accepts a connection. Kong does not wait for plugin
# sockets (reference kong-plugin-server.md §1.4): a request that arrives before the plugin server
# listens fails with a 500, so "nginx is up" alone is not "ready".
set -eu

KONG_BIN="${KONG_BIN:-kong}"
AIGOV_PYTHON="${AIGOV_PYTHON:-/opt/aigov/venv/bin/python3}"

"$KONG_BIN" health >/dev/null

sockets=$(env | sed -n 's/^KONG_PLUGINSERVER_[A-Z0-9_]*_SOCKET=//p')
if [ -z "$sockets" ]; then
    echo "aigov-healthcheck: no KONG_PLUGINSERVER_*_SOCKET variable is set" >&2
    exit 1
fi

# A socket file can outlive a killed server, so connect rather than test for the file.
exec "$AIGOV_PYTHON" - $sockets <<'PY'
import socket
import sys

missing = []
for path in sys.argv[1:]:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError as exc:
        missing.append(f"{path} ({exc.strerror or exc})")
    finally:
        probe.close()
if missing:
    sys.stderr.write("aigov-healthcheck: plugin server not listening on " + ", ".join(missing) + "\n")
    sys.exit(1)
PY
