"""The `aigov` console script.

Each subcommand lives in its own module, imported only when that subcommand runs, so that
`aigov dump` stays fast and prints nothing but JSON (Kong's query_cmd reads all of stdout).
A subcommand module defines `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). Nested commands ("eval cache") use a space.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("aigov.server.cli", "run every plugin in one plugin-server process (MsgPack:1)"),
    "dump": ("aigov.server.dump", "print the plugin info JSON that Kong's query_cmd reads"),
    "gateway": ("kongsim.gateway", "run the Kong stand-in's HTTP front on a kong.yml"),
    "mock-llm": ("aigov.mockllm", "run the mock OpenAI-compatible upstream"),
    "eval cache": ("aigov.eval.cache", "precision/recall of the semantic cache on labelled pairs"),
    "eval router": ("aigov.eval.router", "accuracy/out-of-scope recall of the semantic router"),
    "calibrate router": ("aigov.eval.calibrate", "fit router thresholds from utterances and negatives"),
    "embeddings prepare": ("aigov.embeddings_onnx", "export the local embedding model to ONNX (done by the installer)"),
    "purge": ("aigov.cache.purge", "drop every cache entry of a namespace"),
    "bench": ("aigov.bench.run", "benchmarks: ratios against a baseline measured in the same run"),
    "demo": ("aigov.demo.run", "replay real prompts through the whole stack and print a report"),
}


def _build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, str | None]:
    parser = argparse.ArgumentParser(prog="aigov", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    chosen = None
    for name, (module, help_text) in COMMANDS.items():
        parts = name.split(" ")
        if len(parts) == 1:
            p = sub.add_parser(name, help=help_text)
        else:
            if parts[0] not in groups:
                g = sub.add_parser(parts[0], help=f"{parts[0]} subcommands")
                groups[parts[0]] = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            p = groups[parts[0]].add_parser(parts[1], help=help_text)
        p.set_defaults(_module=module)
        # Only the chosen subcommand's module is imported to add its arguments.
        if argv[: len(parts)] == parts:
            chosen = module
            importlib.import_module(module).add_arguments(p)
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, chosen = _build_parser(argv)
    args = parser.parse_args(argv)
    if not chosen or not hasattr(args, "_module"):
        parser.print_help(sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
