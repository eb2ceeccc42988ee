"""`aigov serve`: run every plugin module in one plugin-server process (MsgPack:1).

Kong 3.9+ wants one pluginserver entry per plugin (reference §1.2). To keep one process (and one
copy of the embedding model), one entry starts `aigov serve`, which opens a socket per plugin,
and the other entries only name their socket (no start_cmd: "managed externally"):

    pluginserver_names = llm-semantic-cache,llm-token-quota
    pluginserver_llm_semantic_cache_socket = /usr/local/kong/llm-semantic-cache.socket
    pluginserver_llm_semantic_cache_start_cmd = /opt/venv/bin/aigov serve -p /usr/local/kong
    pluginserver_llm_semantic_cache_query_cmd = /opt/venv/bin/aigov dump llm-semantic-cache
    pluginserver_llm_token_quota_socket = /usr/local/kong/llm-token-quota.socket
    pluginserver_llm_token_quota_query_cmd = /opt/venv/bin/aigov dump llm-token-quota
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from aigov.server.loader import PluginLoadError, default_plugins_dir, load_plugins

log = logging.getLogger("aigov.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--kong-prefix", "-kong-prefix", dest="prefix", type=Path,
                        default=Path("/usr/local/kong"),
                        help="directory for the sockets <prefix>/<name>.socket (default: %(default)s)")
    parser.add_argument("-d", "--plugins-dir", type=Path, default=None,
                        help="plugin modules directory (default: $AIGOV_PLUGINS_DIR or the "
                             "repository's plugins/)")
    parser.add_argument("--plugins", default=None,
                        help="comma-separated plugin names to serve (default: every module)")
    parser.add_argument("--no-lua-style", action="store_true",
                        help="PDK calls return data and raise on error instead of (data, err)")
    parser.add_argument("--max-workers", type=int, default=2048,
                        help="handlers that may be live at once (events whose handler has not "
                             "returned, including those waiting for Kong or Redis); beyond it "
                             "HandleEvent answers an overload error and Kong runs the request "
                             "without that plugin (default: %(default)s)")
    parser.add_argument("--step-timeout", type=float, default=55.0,
                        help="seconds to wait for a handler's next PDK call before answering an "
                             "error, kept under Kong's 60 s read timeout (default: %(default)s). "
                             "A handler that blocks the loop for 0.5 s (or this, if shorter) has "
                             "the loop's connections moved to a new thread")
    parser.add_argument("--event-timeout", type=float, default=65.0,
                        help="seconds without a Step after which an event is abandoned and its "
                             "handler released (default: %(default)s)")
    parser.add_argument("--listen-queue-size", type=int, default=4096, help="socket backlog")
    parser.add_argument("--metrics-listen", default=None, metavar="ADDR",
                        help="expose Prometheus metrics on HOST:PORT (needs aigov.metrics)")
    parser.add_argument("--metrics-max-consumers", type=int, default=None, metavar="N",
                        help="distinct consumers that get their own metric series; later ones "
                             "are counted under consumer=\"other\" (default: 10000)")
    parser.add_argument("--metrics-max-series", type=int, default=None, metavar="N",
                        help="label sets per metric family whose labels come from clients; later "
                             "ones are counted with consumer and model \"other\" (default: 20000)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: debug (logs go to stderr; the default level is info)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def _configure_logging(verbosity: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbosity else logging.INFO
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _guard_stdout() -> None:
    """Nothing in this process may write to stdout: point fd 1 and sys.stdout at stderr."""
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def _metrics_call(function: str, arg: Any) -> None:
    """Call aigov.metrics.<function>(arg); the server runs without aigov.metrics too."""
    if importlib.util.find_spec("aigov.metrics") is None:
        log.warning("%s(%s) ignored: aigov.metrics is not available", function, arg)
        return
    target = getattr(importlib.import_module("aigov.metrics"), function, None)
    if target is None:
        log.warning("%s(%s) ignored: aigov.metrics has no %s", function, arg, function)
        return
    target(arg)


def _start_metrics(addr: str) -> None:
    _metrics_call("start_metrics_server", addr)


def run(args: argparse.Namespace) -> int:
    parent_pid = os.getppid()  # before anything slow: the watchdog compares against it
    _guard_stdout()
    _configure_logging(args.verbose, args.quiet)
    from aigov.server.server import PluginServer, ServerProcess

    plugins_dir = args.plugins_dir or default_plugins_dir()
    names = [n.strip() for n in args.plugins.split(",") if n.strip()] if args.plugins else None
    if args.max_workers < 1 or args.step_timeout <= 0 or args.event_timeout <= 0:
        log.error("--max-workers, --step-timeout and --event-timeout must be positive")
        return 2
    try:
        plugins = load_plugins(plugins_dir, names)
    except PluginLoadError as exc:
        log.error("aigov serve: %s", exc)
        return 1
    server = PluginServer(plugins, lua_style=not args.no_lua_style, max_workers=args.max_workers,
                          step_timeout=args.step_timeout, event_timeout=args.event_timeout)
    process = ServerProcess(server, args.prefix, backlog=args.listen_queue_size, parent_pid=parent_pid)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        process.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    # Metrics first: once the plugin socket exists Kong (and a scraper started with it) may
    # talk to us, and the metrics endpoint must already answer by then.
    if args.metrics_max_consumers is not None:
        _metrics_call("set_max_consumers", args.metrics_max_consumers)
    if args.metrics_max_series is not None:
        _metrics_call("set_max_series", args.metrics_max_series)
    if args.metrics_listen:
        try:
            _start_metrics(args.metrics_listen)
        except Exception as exc:  # noqa: BLE001 - metrics are optional; serving is not
            log.error("metrics server on %s failed to start: %s", args.metrics_listen, exc)
    try:
        process.start()
    except OSError as exc:
        log.error("aigov serve: %s", exc)
        return 1
    log.info("aigov serve: %d plugin(s) on %s: %s", len(plugins), args.prefix,
                ", ".join(plugins))
    try:
        process.wait()
    finally:
        clean = process.stop()
    if not clean:
        # A handler thread is stuck in plugin code; interpreter shutdown would tear down its
        # greenlets under it (a crash), so leave at once: the sockets are already removed.
        logging.shutdown()
        os._exit(0)
    return 0
