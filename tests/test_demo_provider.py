"""The demo's generated kong.yml, and `--provider-url` against an OpenAI-compatible stand-in.

The "provider" here is a second mock LLM started by the test: it reports (as a SHA-256
fingerprint, never the value) which credential reached it, so the test can tell that the key from
$AIGOV_DEMO_API_KEY arrived as `Authorization: Bearer <key>`, and that it was written nowhere.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from aigov.demo import plan as demo_plan
from aigov.demo.run import SPEC, demo_kong_config
from aigov.mockllm import MockLLM, auth_fingerprint
from kongsim import declarative

REPO = Path(__file__).resolve().parent.parent
ROUTES = [{"name": "banking", "utterances": ["what is my balance"], "target": {"model": "gpt-4o"}},
          {"name": "general", "utterances": ["tell me a joke"], "target": {"model": "gpt-4o-mini"}}]


def _plugins(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    nested = [p for s in cfg["services"] for r in s.get("routes") or [] for p in r.get("plugins") or []]
    return nested + list(cfg.get("plugins") or [])


def _config(store: str, provider: bool) -> dict[str, Any]:
    spec = yaml.safe_load(SPEC.read_text())
    return demo_kong_config(spec, upstream_url="http://127.0.0.1:4010/v1", calibration_url="http://127.0.0.1:4011",
                            routes=ROUTES, store=store, redis_port=6390 if store == "redis" else None,
                            router_cache_dir=None, provider=provider)


def test_generated_config_points_everything_at_local_ports() -> None:
    for store in ("redis", "memory"):
        cfg = _config(store, provider=False)
        text = yaml.safe_dump(cfg)
        assert "mock-llm:8080" not in text and "host: redis" not in text  # compose's hostnames
        declarative.load(cfg)  # the stand-in's loader accepts it
        urls = {s["name"]: s["url"] for s in cfg["services"]}
        assert urls["mock-llm"] == "http://127.0.0.1:4010"  # a trailing /v1 is dropped: routes add it
        assert urls["demo-calibration"] == "http://127.0.0.1:4011/v1/chat/completions"
        for p in _plugins(cfg):
            conf = p["config"]
            if p["name"] == "llm-token-quota":
                assert conf["policy"] == store
                assert ("redis" in conf) == (store == "redis")
                if store == "redis":
                    assert conf["redis"]["host"] == "127.0.0.1" and conf["redis"]["port"] == 6390
            elif p["name"] == "llm-semantic-cache":
                assert conf["vectordb"]["strategy"] == store
            elif p["name"] == "llm-semantic-router":
                assert [r["name"] for r in conf["routes"]] == ["banking", "general"]
                assert conf["default_route"] == demo_plan.DEFAULT_ROUTE
                # the spec's off-topic examples, written for its own two routes, are not kept:
                # next to the demo's routes they sent in-scope queries to the default route
                assert "negative_utterances" not in conf
            elif p["name"] == "ai-proxy":
                assert conf["model"]["options"]["upstream_url"] == "http://127.0.0.1:4010/v1/chat/completions"
        # consumer budgets from spec/kong.yml are kept as they are
        bob = next(p for p in cfg["plugins"] if p.get("consumer") == "bob")
        assert bob["config"]["limits"] == [{"window": "hour", "tokens": 2000}]


def test_provider_mode_uses_vault_references_not_keys() -> None:
    cfg = _config("memory", provider=True)
    routers = [p for p in _plugins(cfg) if p["name"] == "llm-semantic-router"]
    chat_router = routers[0]["config"]
    assert all(r["target"]["api_key"] == "{vault://env/aigov_demo_api_key}" for r in chat_router["routes"])
    ai_proxy = next(p for p in _plugins(cfg) if p["name"] == "ai-proxy")
    assert ai_proxy["config"]["auth"]["header_value"] == "{vault://env/aigov_demo_authorization}"
    # the ai-proxy route's router keeps ai-proxy's fixed model and gets no key of its own
    proxy_router = routers[1]["config"]
    assert {r["target"]["model"] for r in proxy_router["routes"]} == {demo_plan.ECONOMY_MODEL}
    assert not any("api_key" in r["target"] for r in proxy_router["routes"])


def test_demo_against_a_provider_url_sends_the_key_only_there(tmp_path: Path) -> None:
    secret = "sk-demo-test-0123456789"
    provider = MockLLM("127.0.0.1", 0).start()
    provider_url = provider.url
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   AIGOV_DEMO_API_KEY=secret)
        proc = subprocess.run([sys.executable, "-m", "aigov.cli", "demo", "--requests", "12", "--store", "memory",
                               "--provider-url", provider_url + "/v1", "--no-png", "--out", str(tmp_path)],
                              cwd=REPO, env=env, capture_output=True, timeout=400, start_new_session=True)
        calls = [c for c in provider.stats.snapshot()["recent"] if c["path"] == "/v1/chat/completions"]
    finally:
        provider.stop()
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["provider"] == provider_url
    served = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    upstream = [r for r in served if r["status"] == 200 and r["cache_status"] != "Hit"]
    assert len(calls) == len(upstream) > 0  # every miss went to the provider, calibration did not
    assert {c["auth_header"] for c in calls} == {"authorization"}
    assert {c["auth_sha256"] for c in calls} == {auth_fingerprint(f"Bearer {secret}")}
    assert "upstream_calls" not in report["checks"]  # the mock's counters are not the provider's
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in proc.stdout.decode() + proc.stderr.decode()
