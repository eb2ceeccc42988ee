"""End to end through `aigov gateway` (a subprocess with a kong.conf): key-auth, a probe plugin
on the stock server, llm-token-quota on the stock server or on `aigov serve`, ai-proxy, and the
mock LLM upstream."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "kongsim"))
from helpers import PROBE, REPO, read_records  # noqa: E402

from kongsim.pytest_plugin import make_prefix  # noqa: E402

pytestmark = pytest.mark.timeout(180)
PY = sys.executable
KEY = "alice-key-5b7e91"
PROVIDER_KEY = "sk-provider-secret-77aa"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(prefix: str, server: str) -> str:
    env = f"/usr/bin/env PYTHONPATH={REPO}"
    lines = ["pluginserver_names = kt-probe, llm-token-quota",
             f"pluginserver_kt_probe_socket = {prefix}/kt-probe.socket",
             f"pluginserver_kt_probe_start_cmd = {PY} {PROBE} --socket-name kt-probe.socket -p {prefix}",
             f"pluginserver_kt_probe_query_cmd = {PY} {PROBE} --dump",
             f"pluginserver_llm_token_quota_socket = {prefix}/llm-token-quota.socket"]
    quota = REPO / "plugins" / "llm-token-quota.py"
    if server == "stock":
        lines += [f"pluginserver_llm_token_quota_start_cmd = {env} {PY} {quota} "
                  f"--socket-name llm-token-quota.socket -p {prefix}",
                  f"pluginserver_llm_token_quota_query_cmd = {env} {PY} {quota} --dump"]
    else:
        lines += [f"pluginserver_llm_token_quota_start_cmd = {env} {PY} -m aigov.cli serve -p {prefix}",
                  f"pluginserver_llm_token_quota_query_cmd = {env} {PY} -m aigov.cli dump llm-token-quota"]
    lines.append("plugins = bundled,kt-probe,llm-token-quota")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("server", ["stock", "aigov"])
def test_aigov_gateway_end_to_end_to_mock_llm(server: str, mock_llm) -> None:
    prefix = make_prefix()
    rec = Path(prefix) / "rec.jsonl"
    kong_yml = {
        "_format_version": "3.0",
        "services": [{"name": "llm", "url": mock_llm.url, "routes": [{
            "name": "chat", "paths": ["/chat"],
            "plugins": [
                {"name": "key-auth"},
                {"name": "kt-probe", "config": {"record_file": str(rec), "tag": server}},
                {"name": "llm-token-quota"},
                {"name": "ai-proxy", "config": {
                    "route_type": "llm/v1/chat",
                    "model": {"provider": "openai", "name": "gpt-4o-mini",
                              "options": {"upstream_url": mock_llm.url + "/v1/chat/completions"}},
                    "auth": {"header_name": "Authorization",
                             "header_value": "Bearer " + PROVIDER_KEY},
                    "logging": {"log_statistics": True}}}]}]}],
        "consumers": [{"username": "alice", "keyauth_credentials": [{"key": KEY}]}],
    }
    (Path(prefix) / "kong.yml").write_text(yaml.safe_dump(kong_yml))
    (Path(prefix) / "kong.conf").write_text(_conf(prefix, server))
    port = _free_port()
    log_path = Path(prefix) / "gateway.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([PY, "-m", "aigov.cli", "gateway", "-c", f"{prefix}/kong.yml",
                                 "--conf", f"{prefix}/kong.conf", "--listen", f"127.0.0.1:{port}",
                                 "--log-level", "debug"],
                                cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)

        def post(headers: dict) -> tuple[int, dict, dict]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}]}
            conn.request("POST", "/chat", json.dumps(body), {"Content-Type": "application/json", **headers})
            r = conn.getresponse()
            out = (r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read() or b"null"))
            conn.close()
            return out

        status, headers, body = post({"apikey": KEY})
        assert status == 200, body
        assert body["choices"][0]["message"]["content"]  # the mock LLM answered
        assert headers["x-kong-llm-model"] == "openai/gpt-4o-mini"
        assert headers["x-kt-probe-tag"] == server and headers["via"] == "1.1 kong/3.9.1"
        status, _, body = post({})
        assert status == 401 and body == {"message": "No API key found in request"}
        deadline = time.monotonic() + 10
        while len([r for r in read_records(rec) if r["event"] == "log"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        # The 401's log phase may finish first: pick the 200 request's log record.
        first_log = next(r for r in read_records(rec)
                         if r["event"] == "log" and r["serialize"]["response"]["status"] == 200)
        usage = first_log["serialize"]["ai"]["proxy"]["usage"]
        assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert first_log["serialize"]["consumer"]["username"] == "alice"
    finally:
        proc.terminate()
        proc.wait(30)
    text = log_path.read_text()
    assert "started pluginserver 'llm-token-quota'" in text
    assert KEY not in text and PROVIDER_KEY not in text


def test_a_missing_prefix_directory_is_created_like_kong_prepare(tmp_path: Path) -> None:
    # `aigov gateway --plugin-server aigov --prefix <new dir>` used to restart a plugin server
    # that exited at once ("kong prefix ... does not exist") forever.
    from kongsim.gateway import _local_entries

    prefix = tmp_path / "new" / "prefix"
    entries = _local_entries("aigov", str(prefix))
    assert prefix.is_dir()
    assert entries and all(str(prefix) in e.socket for e in entries)


def test_plugin_server_entries_see_kong_conf_examples_main_env(tmp_path: Path, monkeypatch) -> None:
    # A new user ran `AIGOV_CAPTURE_PHASE=log aigov gateway --plugin-server aigov`: the query_cmd
    # saw log mode, the started server (a worker's environment, nginx-cleared) did not, and every
    # request logged "llm-semantic-cache does not implement phase 'log'". --plugin-server stands
    # for kong.conf.example's entries, whose nginx_main_env passes these variables.
    from kongsim import process
    from kongsim.gateway import LOCAL_MAIN_ENV, _local_entries

    conf, _ = process.load_kong_conf(str(REPO / "kong.conf.example"), {})
    listed = [v.strip().removeprefix("env ").strip() for v in conf["nginx_main_env"].split(";")]
    assert tuple(listed) == LOCAL_MAIN_ENV
    monkeypatch.setenv("AIGOV_CAPTURE_PHASE", "log")
    monkeypatch.delenv("AIGOV_ROUTER_CACHE_DIR", raising=False)
    for kind in ("aigov", "stock"):
        entries = _local_entries(kind, str(tmp_path / kind))
        started = [e.start_cmd for e in entries if e.start_cmd]
        assert started and all("AIGOV_CAPTURE_PHASE=log" in cmd for cmd in started), started
        assert all("AIGOV_ROUTER_CACHE_DIR" not in cmd for cmd in started)
    (first, *_) = _local_entries("aigov", str(tmp_path / "m"), metrics_listen="127.0.0.1:9599")
    assert first.start_cmd.endswith("--metrics-listen 127.0.0.1:9599")
    with pytest.raises(SystemExit, match="needs --plugin-server aigov"):
        _local_entries("stock", str(tmp_path / "s"), metrics_listen="127.0.0.1:9599")


def test_gateway_metrics_listen_serves_the_plugin_servers_metrics(tmp_path: Path, mock_llm) -> None:
    port, metrics_port = _free_port(), _free_port()
    kong_yml = {"_format_version": "3.0", "services": [{"name": "llm", "url": mock_llm.url, "routes": [{
        "name": "chat", "paths": ["/chat"], "plugins": [{"name": "llm-token-quota", "config": {
            "limits": [{"window": "day", "tokens": 100000}], "identifier_sources": ["ip"]}}]}]}]}
    (tmp_path / "kong.yml").write_text(yaml.safe_dump(kong_yml))
    log_path = tmp_path / "gw.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([PY, "-m", "aigov.cli", "gateway", "-c", str(tmp_path / "kong.yml"),
                                 "--listen", f"127.0.0.1:{port}", "--plugin-server", "aigov",
                                 "--prefix", str(tmp_path / "p"), "--metrics-listen", f"127.0.0.1:{metrics_port}"],
                                cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and status != 200:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", "/chat/v1/chat/completions", headers={"Content-Type": "application/json"},
                             body=json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
                status = conn.getresponse().status
                conn.close()
            except OSError:
                time.sleep(0.3)
        assert status == 200, log_path.read_text()[-2000:]
        conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        assert 'ai_llm_tokens_total{' in text and 'token_type="total_tokens"' in text
    finally:
        proc.terminate()
        proc.wait(30)


def test_metrics_listen_without_a_local_plugin_server_is_an_error(tmp_path: Path) -> None:
    # A tester's --metrics-listen on a plain `aigov gateway -c` was silently ignored.
    (tmp_path / "kong.yml").write_text(yaml.safe_dump({"_format_version": "3.0"}))
    done = subprocess.run([PY, "-m", "aigov.cli", "gateway", "-c", str(tmp_path / "kong.yml"),
                           "--metrics-listen", "127.0.0.1:9"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "--metrics-listen needs --plugin-server aigov" in done.stderr
