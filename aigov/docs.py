"""`python -m aigov.docs`: write the configuration reference of every plugin from its Schema.

The reference is rendered from exactly what Kong reads: the JSON that `aigov dump --all` prints
(the query_cmd output, reference kong-plugin-server.md §1.2), so it cannot drift from the
Schemas. The dump runs in a subprocess twice, once with the default capture phase and once with
`AIGOV_CAPTURE_PHASE=log`, because a plugin module decides its phases at import time.

    python -m aigov.docs            # (re)write docs/configuration.md
    python -m aigov.docs --check    # exit 1 if docs/configuration.md is out of date
    python -m aigov.docs -o -       # print to stdout
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "configuration.md"
CAPTURE_PHASE_ENV = "AIGOV_CAPTURE_PHASE"
DUMP_TIMEOUT_S = 120

# Field attributes shown in the Constraints column, in this order (Kong metaschema names).
CONSTRAINT_ATTRIBUTES = (
    "one_of", "not_one_of", "between", "gt", "eq", "ne", "len_eq", "len_min", "len_max",
    "match", "not_match", "match_all", "match_any", "match_none", "starts_with", "contains",
    "is_regex", "uuid", "timestamp", "unique",
)


class DocsError(RuntimeError):
    """The plugin info could not be obtained (the message says why)."""


def dump_plugin_infos(capture_phase: str | None = None,
                      plugins_dir: Path | None = None) -> list[dict[str, Any]]:
    """The `aigov dump --all` list, produced by a fresh interpreter as Kong's query_cmd would.

    `capture_phase` None removes AIGOV_CAPTURE_PHASE from the child's environment (the default
    capture mode); a string sets it.
    """
    env = dict(os.environ)
    env.pop(CAPTURE_PHASE_ENV, None)
    if capture_phase is not None:
        env[CAPTURE_PHASE_ENV] = capture_phase
    # The child must import this checkout's aigov even when the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "aigov.cli", "dump", "--all"]
    if plugins_dir is not None:
        cmd += ["-d", str(plugins_dir)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DUMP_TIMEOUT_S,
                              cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired as exc:
        raise DocsError(f"`aigov dump --all` did not finish within {DUMP_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        raise DocsError(f"`aigov dump --all` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    try:
        infos = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise DocsError(f"`aigov dump --all` printed something that is not JSON: {exc}") from exc
    if not isinstance(infos, list) or not all(isinstance(i, dict) and "Name" in i for i in infos):
        raise DocsError("`aigov dump --all` did not print a list of plugin info objects")
    return sorted(infos, key=lambda info: info["Name"])


def _cell(text: str) -> str:
    """Make text safe inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(value: Any) -> str:
    rendered = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return "`" + str(rendered).replace("`", "'") + "`"


def _type_label(spec: Mapping[str, Any]) -> str:
    kind = spec.get("type", "?")
    if kind in ("array", "set"):
        elements = spec.get("elements") or {}
        inner = elements.get("type", "?")
        return f"{kind} of {inner}" + ("s" if inner != "record" else " (see below)")
    if kind == "map":
        keys = (spec.get("keys") or {}).get("type", "?")
        values = (spec.get("values") or {}).get("type", "?")
        return f"map {keys} → {values}"
    return str(kind)


def _constraints(spec: Mapping[str, Any]) -> str:
    parts: list[str] = []
    if spec.get("required"):
        parts.append("**required**")
    for attr in CONSTRAINT_ATTRIBUTES:
        if attr not in spec:
            continue
        value = spec[attr]
        if attr in ("one_of", "not_one_of"):
            label = "one of" if attr == "one_of" else "not one of"
            parts.append(f"{label}: " + ", ".join(_code(v) for v in value))
        elif attr == "between":
            parts.append(f"between {_code(value[0])} and {_code(value[1])}")
        elif value is True:
            parts.append(attr.replace("_", " "))
        else:
            parts.append(f"{attr.replace('_', ' ')} {_code(value)}")
    for companion in ("elements", "values"):
        inner = spec.get(companion)
        if isinstance(inner, Mapping) and inner.get("type") != "record":
            inner_constraints = _constraints({k: v for k, v in inner.items() if k != "required"})
            if inner_constraints:
                parts.append(f"each {'element' if companion == 'elements' else 'value'}: "
                             f"{inner_constraints}")
    if spec.get("referenceable"):
        parts.append("referenceable (`{vault://...}`)")
    if spec.get("encrypted"):
        parts.append("encrypted at rest")
    return ", ".join(parts)


def _default(spec: Mapping[str, Any]) -> str:
    if "default" not in spec:
        return ""
    return _code(spec["default"])


def _rows(fields: Iterable[Mapping[str, Any]], prefix: str) -> Iterable[tuple[str, ...]]:
    """One table row per field, depth first; records and arrays of records are expanded."""
    for item in fields:
        ((name, spec),) = item.items()
        path = f"{prefix}.{name}"
        yield (f"`{path}`", _type_label(spec), _default(spec), _constraints(spec),
               spec.get("description", ""))
        if spec.get("type") == "record":
            yield from _rows(spec.get("fields", []), path)
        elements = spec.get("elements") or {}
        if spec.get("type") in ("array", "set") and elements.get("type") == "record":
            yield from _rows(elements.get("fields", []), path + "[]")
        values = spec.get("values") or {}
        if spec.get("type") == "map" and values.get("type") == "record":
            yield from _rows(values.get("fields", []), path + ".<key>")


def _entity_checks(fields: Iterable[Mapping[str, Any]], prefix: str) -> Iterable[tuple[str, Any]]:
    for item in fields:
        ((name, spec),) = item.items()
        path = f"{prefix}.{name}"
        record = spec if spec.get("type") == "record" else (spec.get("elements") or {})
        if record.get("type") != "record":
            continue
        inner_path = path if spec.get("type") == "record" else path + "[]"
        for check in record.get("entity_checks") or []:
            yield inner_path, check
        yield from _entity_checks(record.get("fields", []), inner_path)


def _config_fields(info: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    for item in info["Schema"]["fields"]:
        if "config" in item:
            return list(item["config"].get("fields", []))
    return []


def render(infos: list[dict[str, Any]], log_mode_infos: list[dict[str, Any]] | None = None) -> str:
    """The Markdown reference for `infos` (the dump); `log_mode_infos` adds the log-mode phases."""
    log_phases = {i["Name"]: i.get("Phases", []) for i in (log_mode_infos or [])}
    # Kong's execution order: descending priority, ties by descending name (reference §4.4).
    infos = sorted(sorted(infos, key=lambda i: i["Name"], reverse=True),
                   key=lambda i: -int(i.get("Priority") or 0))
    out: list[str] = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m aigov.docs` from the plugin Schemas (the `aigov dump --all`",
        "     output that Kong's query_cmd reads). Do not edit by hand: regenerate it.",
        "     tests/test_docs_configuration.py fails when this file and the Schemas disagree. -->",
        "",
        "Each plugin is configured like any Kong plugin: `config` in a `plugins:` entry of the",
        "declarative `kong.yml` (see [spec/kong.yml](../spec/kong.yml)) or the Admin API",
        "(`POST /routes/{route}/plugins`). Kong validates the config against the schema below",
        "before the plugin server sees it: unknown keys are rejected, defaults are filled in.",
        "Fields marked *referenceable* accept a Kong Vault reference such as",
        "`{vault://env/MY_SECRET}`; Kong resolves it and the plugin receives the value.",
        "",
        "A few rules tie top-level fields together, which an external plugin's schema cannot express",
        "(Kong runs entity checks only on nested records): `admin_path` needs `admin_key`,",
        "`unknown_model: default_price` needs `default_price`, a limit's `models` must be priced under",
        "`unknown_model: block`, the `header` identifier source needs `identifier_header`, the router's `default_route` must name one of its routes and route names",
        "must differ. Kong accepts such a config; the plugin then answers every request on the route",
        "with a JSON 500 that names the rule (and logs it), so the mistake shows on the first request.",
        "",
        "| Plugin | Priority | Version | Phases (default) | Phases (`AIGOV_CAPTURE_PHASE=log`) |",
        "|---|---|---|---|---|",
    ]
    for info in infos:
        name = info["Name"]
        phases = ", ".join(info.get("Phases", []))
        logp = ", ".join(log_phases.get(name, [])) if log_mode_infos is not None else "—"
        out.append(f"| [`{name}`](#{name}) | {info.get('Priority')} | {info.get('Version')} "
                   f"| {phases} | {logp} |")
    out.append("")
    out.append("Kong runs plugins by descending priority, and equal priorities by descending name.")
    for info in infos:
        name = info["Name"]
        fields = _config_fields(info)
        out += ["", f"## {name}", ""]
        out.append(f"Priority {info.get('Priority')}, version {info.get('Version')}.")
        out.append("")
        if not fields:
            out.append("This plugin has no configuration fields.")
            continue
        out += ["| Field | Type | Default | Constraints | Description |", "|---|---|---|---|---|"]
        for row in _rows(fields, "config"):
            out.append("| " + " | ".join(_cell(c) for c in row) + " |")
        checks = list(_entity_checks(fields, "config"))
        if checks:
            out += ["", "Record checks (Kong `entity_checks`):", ""]
            for path, check in checks:
                out.append(f"- `{path}`: {_code(check)}")
    return "\n".join(out) + "\n"


def generate(plugins_dir: Path | None = None) -> str:
    """Render the reference from fresh dumps in both capture modes."""
    return render(dump_plugin_infos(None, plugins_dir), dump_plugin_infos("log", plugins_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aigov.docs", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT),
                        help="file to write, or - for stdout (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 with a diff if the file is out of date")
    parser.add_argument("-d", "--plugins-dir", type=Path, default=None,
                        help="plugin modules directory (default: as `aigov dump`)")
    args = parser.parse_args(argv)
    try:
        text = generate(args.plugins_dir)
    except DocsError as exc:
        print(f"aigov.docs: {exc}", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    target = Path(args.output)
    if args.check:
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current == text:
            return 0
        diff = difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                    str(target), "regenerated")
        sys.stderr.writelines(diff)
        print(f"aigov.docs: {target} is out of date; run `python -m aigov.docs`", file=sys.stderr)
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    print(f"aigov.docs: wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
