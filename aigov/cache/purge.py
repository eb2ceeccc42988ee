"""`aigov purge --namespace NS --redis-url URL`: drop every semantic-cache key and index of a namespace.

This is the operator's admin path for the redis strategy (the plugin also offers an optional
in-route `admin_path`, see the plugin schema). Prints one JSON line: {"namespace", "purged"}.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from aigov.cache.policies import StoreUnavailable
from aigov.cache.policies.redis import purge_namespace
from aigov.redis_client import RedisLayer

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", required=True, help="the vectordb.namespace to drop")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="Redis URL (redis://[user:password@]host:port/db)")
    parser.add_argument("--timeout-ms", type=int, default=2000)


def run(args: argparse.Namespace) -> int:
    if not _NAMESPACE_RE.match(args.namespace):
        print("error: --namespace must be 1-64 characters of A-Z a-z 0-9 _ -", file=sys.stderr)
        return 2
    layer = RedisLayer(url=args.redis_url, timeout_ms=args.timeout_ms)
    try:
        removed = purge_namespace(layer, args.namespace)
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"namespace": args.namespace, "purged": removed}))
    return 0
