"""docs/configuration.md is generated from the plugin Schemas and must not drift from them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aigov import docs

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "docs" / "configuration.md"


@pytest.fixture(scope="module")
def infos() -> list[dict]:
    return docs.dump_plugin_infos(None)


def test_committed_reference_matches_the_schemas():
    regenerated = docs.generate()
    assert COMMITTED.read_text(encoding="utf-8") == regenerated, \
        "docs/configuration.md is stale: run `python -m aigov.docs`"


def _field_paths(fields: list[dict], prefix: str) -> list[str]:
    paths = []
    for item in fields:
        ((name, spec),) = item.items()
        path = f"{prefix}.{name}"
        paths.append(path)
        if spec["type"] == "record":
            paths += _field_paths(spec["fields"], path)
        elements = spec.get("elements") or {}
        if spec["type"] in ("array", "set") and elements.get("type") == "record":
            paths += _field_paths(elements["fields"], path + "[]")
    return paths


def test_every_plugin_and_field_is_documented(infos):
    text = COMMITTED.read_text(encoding="utf-8")
    assert sorted(i["Name"] for i in infos) == ["llm-semantic-cache", "llm-semantic-router",
                                                "llm-token-quota"]
    for info in infos:
        assert f"\n## {info['Name']}\n" in text
        assert f"| {info['Priority']} | {info['Version']} |" in text
        (config,) = [f["config"] for f in info["Schema"]["fields"] if "config" in f]
        for path in _field_paths(config["fields"], "config"):
            assert f"| `{path}` |" in text, f"{info['Name']}: {path} missing from the reference"


def test_plugins_listed_in_kong_execution_order(infos):
    text = COMMITTED.read_text(encoding="utf-8")
    positions = {i["Name"]: text.index(f"\n## {i['Name']}\n") for i in infos}
    by_kong_order = sorted(infos, key=lambda i: (-i["Priority"], [-ord(c) for c in i["Name"]]))
    assert sorted(positions, key=positions.get) == [i["Name"] for i in by_kong_order]


def test_render_shows_types_defaults_constraints_and_escapes_cells():
    schema = [
        {"mode": {"type": "string", "description": "Which | mode.", "default": "a",
                  "one_of": ["a", "b"], "required": True}},
        {"limits": {"type": "array", "description": "Limits to enforce.", "elements": {
            "type": "record", "fields": [{"window": {"type": "integer", "description": "Seconds.",
                                                      "between": [1, 60]}}],
            "entity_checks": [{"at_least_one_of": ["window"]}]}}},
        {"key": {"type": "string", "description": "An API key.", "referenceable": True,
                 "encrypted": True}},
    ]
    info = {"Name": "demo", "Priority": 5, "Version": "1.0", "Phases": ["access"],
            "Schema": {"name": "demo", "fields": [{"config": {"type": "record", "fields": schema}}]}}
    text = docs.render([info], [dict(info, Phases=["access", "log"])])
    assert "| `config.mode` | string | `a` | **required**, one of: `a`, `b` | Which \\| mode. |" in text
    assert "| `config.limits` | array of record (see below) |" in text
    assert "| `config.limits[].window` | integer |  | between `1` and `60` | Seconds. |" in text
    assert "- `config.limits[]`: `{\"at_least_one_of\": [\"window\"]}`" in text
    assert "referenceable (`{vault://...}`), encrypted at rest" in text
    assert "| [`demo`](#demo) | 5 | 1.0 | access | access, log |" in text


def test_check_mode_detects_drift(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("# outdated\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "aigov.docs", "--check", "-o", str(stale)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "out of date" in result.stderr
    assert stale.read_text() == "# outdated\n", "--check must not write"
    written = subprocess.run([sys.executable, "-m", "aigov.docs", "-o", str(stale)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert written.returncode == 0 and written.stdout == ""
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0


def test_dump_failure_is_a_clear_error(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(docs.DocsError, match="aigov dump --all.*failed"):
        docs.dump_plugin_infos(None, tmp_path)


def test_phases_follow_the_capture_phase_setting():
    """The reference's two phase columns come from two real dumps (the modules decide at import)."""
    default = {i["Name"]: i["Phases"] for i in docs.dump_plugin_infos(None)}
    log_mode = {i["Name"]: i["Phases"] for i in docs.dump_plugin_infos("log")}
    text = COMMITTED.read_text(encoding="utf-8")
    for name in default:
        assert f"| {', '.join(default[name])} | {', '.join(log_mode[name])} |" in text
        assert "response" not in log_mode[name], f"{name} declares response in log capture mode"
    json.dumps(default)  # plain data, as Kong reads it
