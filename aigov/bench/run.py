"""`aigov bench` / `make bench`: what the plugins cost, against baselines measured in the same run.

Sections (select with --sections 1,3):
  1 plugin-server round trip: stock kong-pdk server vs `aigov serve` (no-op plugin)
  2 request path through the gateway stand-in: added latency per plugin, cache hit vs miss
  3 embeddings under load: batch-1 vs the shared micro-batching embedder
  4 against a peer: cache lookup vs RedisVL SemanticCache, router vs RedisVL SemanticRouter and
    a nearest-neighbour baseline
  5 scale: cache lookup at 1k/10k/100k entries (HNSW), memory per 10k entries, quota at 10k consumers

Each section is independent: a missing dependency makes it "skipped: <reason>", an error in one
section is recorded and the others still run. Everything goes to one JSON file (--out).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aigov.bench.common import DEFAULT_DATA_DIR, BenchContext, SectionSkipped, Target, machine_info

SECTIONS: dict[str, tuple[str, str]] = {
    "1": ("aigov.bench.plugin_server", "plugin-server round trip (stock kong-pdk vs aigov serve)"),
    "2": ("aigov.bench.request_path", "request path through the gateway stand-in"),
    "3": ("aigov.bench.embeddings", "embeddings under load (batch-1 vs micro-batching)"),
    "4": ("aigov.bench.peer", "against a peer (RedisVL) and a nearest-neighbour baseline"),
    "5": ("aigov.bench.scale", "scale with work (entries, consumers)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated section numbers to run (default: all: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for a CI smoke run (figures are not meaningful)")
    parser.add_argument("--out", type=Path, default=Path("out/bench.json"),
                        help="JSON results file (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="evaluation data (stsb/, clinc150/) (default: %(default)s)")
    parser.add_argument("--redis-url", default=None,
                        help="a Redis with RediSearch to use (default: start a dev server for the run)")
    parser.add_argument("--seed", type=int, default=7, help="random seed for synthetic data")


def parse_sections(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise ValueError(f"unknown section(s) {', '.join(unknown) or '(none)'}; choose from "
                         f"{', '.join(SECTIONS)}")
    return sorted(set(chosen), key=chosen.index)


def run_section(number: str, ctx: BenchContext) -> dict[str, Any]:
    """One section's record: status ok/skipped/error, its results and its targets."""
    module_name, title = SECTIONS[number]
    started = time.perf_counter()
    record: dict[str, Any] = {"title": title}
    try:
        module = importlib.import_module(module_name)
        outcome = module.run(ctx)
        targets: list[Target] = outcome.get("targets", [])
        record.update(status="ok", results=outcome.get("results", {}),
                      targets=[t.as_dict() for t in targets])
        for t in targets:
            ctx.echo("  " + t.line())
    except SectionSkipped as exc:
        record.update(status="skipped", reason=str(exc))
        ctx.echo(f"  skipped: {exc}")
    except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=6))
        ctx.echo(f"  error: {type(exc).__name__}: {exc}")
    record["duration_s"] = round(time.perf_counter() - started, 2)
    return record


def summary_table(report: dict[str, Any]) -> str:
    """A markdown table of every target (the README's Benchmarks section shows it)."""
    lines = ["| section | target | measured | goal | holds |", "|---|---|---|---|---|"]
    for number, sec in report["sections"].items():
        if sec["status"] != "ok":
            lines.append(f"| {number} | {sec['title']} | {sec['status']}: {sec.get('reason', '')[:80]} | | |")
            continue
        for t in sec["targets"]:
            measured = "n/a" if t["measured"] is None else f"{t['measured']:g} {t['unit']}"
            if t.get("interval"):
                measured += f" (95% interval {t['interval'][0]:g}–{t['interval'][1]:g})"
            verdict = {"yes": "yes", "no": "**no**", "tie": "tie (within noise)"}.get(t.get("verdict") or "", "n/a")
            lines.append(f"| {number} | {t['name']} | {measured} | {t['op']} {t['threshold']:g} | {verdict} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sections = parse_sections(args.sections)
    except ValueError as exc:
        print(f"aigov bench: {exc}", file=sys.stderr)
        return 2

    def echo(line: str) -> None:
        print(line, flush=True)

    ctx = BenchContext(quick=args.quick, data_dir=args.data_dir, redis_url=args.redis_url,
                       seed=args.seed, echo=echo)
    report: dict[str, Any] = {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(args.quick), "machine": machine_info(), "sections": {},
    }
    m = report["machine"]
    echo(f"aigov bench{' --quick' if args.quick else ''} on {m['cpu']}, {m['cores']} cores, "
         f"Python {m['python']}")
    started = time.perf_counter()
    try:
        for number in sections:
            echo(f"\n[{number}] {SECTIONS[number][1]}")
            report["sections"][number] = run_section(number, ctx)
    finally:
        ctx.close()
    report["duration_s"] = round(time.perf_counter() - started, 1)
    table = summary_table(report)
    report["table_markdown"] = table
    echo("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    echo(f"\nwrote {args.out} ({report['duration_s']} s)")
    # Missed targets are results, not failures; a section that crashed is a failure.
    return 1 if any(s["status"] == "error" for s in report["sections"].values()) else 0
