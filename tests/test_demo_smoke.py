"""`aigov demo` end to end, as a user runs it (a subprocess in its own session): the real plugin
server, the Kong stand-in's HTTP front, the real MiniLM and tiktoken, the mock LLM.

The report's figures are checked against what the plugins did, from sources other than the
report's own arithmetic: the mock's deterministic answers ("Answer to: <prompt>") tell which
prompt a cache hit really served, the quota's headers against the provider's usage, the plugin
server's Prometheus counters (the demo's own cross-checks), and the process table afterwards.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("DEMO_STORE", None)
    return env


def _session_pids(sid: int) -> set[int]:
    """Live (not zombie) processes of a session."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: TIME_WAIT leftovers of closed connections do not count, a listener does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.Popen([sys.executable, "-m", "aigov.cli", "demo", "--requests", "70", "--store", "memory",
                             "--out", str(out)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()] \
        if (out / "requests.jsonl").exists() else []
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return {"rc": proc.returncode, "stdout": stdout.decode(), "stderr": stderr.decode(), "out": out,
            "records": records, "report": report, "sid": proc.pid}


def test_demo_prints_a_one_screen_report(demo_run: dict[str, Any]) -> None:
    assert demo_run["rc"] == 0, demo_run["stderr"][-3000:]
    lines = demo_run["stdout"].strip().splitlines()
    assert len(lines) <= 30
    heads = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    for section in ("requests", "cache", "consumer", "alice", "bob", "carol", "routing", "latency", "checks"):
        assert section in heads, section
    png = demo_run["out"] / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_report_agrees_with_metrics_and_upstream(demo_run: dict[str, Any]) -> None:
    checks = demo_run["report"]["checks"]
    for name in ("cache_hits", "cache_misses", "tokens_spent[alice]", "tokens_saved[bob]",
                 "quota_rejections[carol]", "upstream_calls", "spent_plus_saved_equals_served_usage"):
        assert name in checks, name
    assert any(k.startswith("router_decisions[") for k in checks)
    bad = {k: v for k, v in checks.items() if not v["ok"]}
    assert not bad
    assert checks["cache_hits"]["metrics"] > 0 and checks["upstream_calls"]["metrics"] > 0


def test_hits_and_false_hits_match_what_was_served(demo_run: dict[str, Any]) -> None:
    records, summary = demo_run["records"], demo_run["report"]["summary"]
    assert len(records) == summary["requests"]["total"] == 70
    hits = [r for r in records if r["cache_status"] == "Hit"]
    assert summary["cache"]["hits"] == len(hits) > 0
    assert summary["cache"]["exact_hits"] + summary["cache"]["semantic_hits"] == len(hits)
    intent_of_text = {r["text"]: r["intent"] for r in records}
    false_hits = 0
    for r in hits:
        # the mock's answer quotes the prompt it answered: the prompt whose answer was cached
        served = r["answer"].removeprefix("Answer to: ").rsplit(" [", 1)[0]
        assert served in intent_of_text, r["answer"]
        source = next(x for x in records if x["index"] == r["hit_of"])
        assert source["text"] == served and source["consumer"] == r["consumer"]
        assert source["seq"] < r["seq"]
        if r["cache_layer"] == "exact":
            assert served == r["text"]
        false_hits += intent_of_text[served] != r["intent"]
    assert summary["cache"]["false_hits"] == false_hits
    by_index = {r["index"]: r for r in records}
    # an original answered by the upstream was stored (a hit's answer is not stored again)
    repeats = [r for r in records if r["kind"] == "repeat" and r["status"] == 200
               and by_index[r["of_index"]]["status"] == 200 and by_index[r["of_index"]]["cache_status"] == "Miss"]
    assert repeats
    for r in repeats:  # asked again, same words, same consumer, same route, already answered
        assert r["cache_status"] == "Hit" and r["cache_layer"] == "exact", r


def test_tokens_spent_and_saved_add_up(demo_run: dict[str, Any]) -> None:
    records, summary = demo_run["records"], demo_run["report"]["summary"]
    for r in records:
        if r["status"] != 200:
            continue
        provider_usage = (r["usage_prompt_tokens"], r["usage_completion_tokens"])
        assert provider_usage[0] > 0 and provider_usage[1] > 0, r
        if r["cache_status"] == "Hit":
            assert (r["saved_prompt_tokens"], r["saved_completion_tokens"]) == provider_usage
            assert r["spent_prompt_tokens"] == r["spent_completion_tokens"] == 0
        else:  # the quota metered exactly what the provider reported
            assert (r["spent_prompt_tokens"], r["spent_completion_tokens"]) == provider_usage
    for name, c in summary["consumers"].items():
        mine = [r for r in records if r["consumer"] == name]
        assert c["spent"]["total_tokens"] == sum(r["spent_prompt_tokens"] + r["spent_completion_tokens"] for r in mine)
        assert c["quota"]["rejections"] == sum(1 for r in mine if r["status"] == 429)
    totals = summary["totals"]
    assert totals["spent_tokens"] + totals["saved_tokens"] == totals["served_usage_tokens"]
    assert totals["saved_usd"] > 0 and totals["spent_usd"] > totals["saved_usd"]


def test_routing_accuracy_is_judged_by_the_labels(demo_run: dict[str, Any]) -> None:
    records, routing = demo_run["records"], demo_run["report"]["summary"]["routing"]
    assert all(r["route"] for r in records)
    correct = sum(1 for r in records if r["route"] == ("general" if r["domain"] == "oos" else r["domain"]))
    assert routing["accuracy"] == round(correct / len(records), 4)
    # MiniLM on CLINC150 domains; chance is under 0.1. 0.857 at this seed; 0.629 when the spec's
    # off-topic examples leaked into the demo's routes (this session)
    assert routing["accuracy"] > 0.75
    premium = {r["upstream_model"] for r in records if r["route"] in ("banking", "credit_cards")
               and r["path"] == "/v1/chat/completions" and r["upstream_model"]}
    economy = {r["upstream_model"] for r in records if r["route"] not in ("banking", "credit_cards")
               and r["upstream_model"]}
    assert premium == {"gpt-4o"} and economy == {"gpt-4o-mini"}


def test_demo_leaves_nothing_running(demo_run: dict[str, Any]) -> None:
    meta = demo_run["report"]["meta"]
    assert meta["processes"]["plugin_server"]
    for name, pid in meta["processes"].items():
        if pid:
            assert not _alive(pid), name
    for name, port in meta["ports"].items():
        assert _port_free(port), name
    assert _session_pids(demo_run["sid"]) == set()


def test_sigterm_mid_replay_stops_every_process(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "aigov.cli", "demo", "--requests", "300", "--store", "redis",
                             "--out", str(tmp_path)], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    lines: list[str] = []
    replaying = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            lines.append(raw.decode("utf-8", "replace"))
            if "replaying" in lines[-1]:
                replaying.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert replaying.wait(240), "".join(lines[-30:])
        time.sleep(1.0)  # some requests in flight
        children = _session_pids(proc.pid) - {proc.pid}
        assert len(children) >= 2, children  # at least aigov serve and redis-server
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(5)
    assert rc == 130, "".join(lines[-30:])
    assert any("stopped by SIGTERM" in line for line in lines)
    deadline = time.monotonic() + 10
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _session_pids(proc.pid) == set()
    assert not any(_alive(pid) for pid in children)
