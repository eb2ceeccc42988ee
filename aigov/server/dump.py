"""`aigov dump NAME | --all`: print the plugin info JSON that Kong's query_cmd reads (§1.2).

Kong 3.9+ registers only the first entry of the list, so a pluginserver entry per plugin uses
`aigov dump <name>` as its query_cmd. stdout carries the JSON and nothing else; every other
byte (plugin import noise, errors) goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aigov.server.loader import PluginLoadError, default_plugins_dir, load_plugins, stdout_to_stderr


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="the plugin's Kong name, e.g. llm-semantic-cache")
    parser.add_argument("--all", action="store_true", help="dump every plugin of the directory")
    parser.add_argument("-d", "--plugins-dir", type=Path, default=None,
                        help="plugin modules directory (default: $AIGOV_PLUGINS_DIR or the "
                             "repository's plugins/)")


def run(args: argparse.Namespace) -> int:
    if bool(args.name) == bool(args.all):
        print("aigov dump: give exactly one of NAME or --all", file=sys.stderr)
        return 2
    plugins_dir = args.plugins_dir or default_plugins_dir()
    try:
        # Guard the whole load: aigov/plugin imports may log or print before the module body runs.
        with stdout_to_stderr():
            plugins = load_plugins(plugins_dir, None if args.all else [args.name])
            text = json.dumps([p.info() for p in plugins.values()])
    except PluginLoadError as exc:
        print(f"aigov dump: {exc}", file=sys.stderr)
        return 1
    except (TypeError, ValueError) as exc:  # a Schema value JSON cannot carry
        print(f"aigov dump: plugin info is not JSON-serializable: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0
