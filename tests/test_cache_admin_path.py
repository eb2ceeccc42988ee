"""llm-semantic-cache's admin_path through the stand-in and both plugin servers.

Kong hands the plugin the normalised path (kong.request.get_path), so an escaped or dotted
spelling of admin_path is the purge itself; any other path is proxied, and never with the
X-Cache-Admin-Key header (a breaker found `/llm/purge/`, `/llm/Purge` and `/llm/purge;x` sent
the key to the upstream)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "kongsim"))
from helpers import Upstream  # noqa: E402

from kongsim.pytest_plugin import GatewayHandle, start_gateway  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PLUGIN_FILE = REPO / "plugins" / "llm-semantic-cache.py"
ADMIN_KEY = "adm-Key-1"


@pytest.fixture(scope="module", params=["aigov", "stock"])
def gw(request: pytest.FixtureRequest) -> Iterator[tuple[GatewayHandle, Upstream]]:
    up = Upstream()
    doc = {"_format_version": "3.0", "services": [{"name": "echo", "url": f"{up.url}/v1", "routes": [
        {"name": "llm", "paths": ["/llm"], "strip_path": True, "plugins": [{
            "name": "llm-semantic-cache",
            "config": {"vectordb": {"strategy": "memory", "namespace": f"admin-{request.param}"},
                       "admin_path": "/llm/purge", "admin_key": ADMIN_KEY}}]}]}]}
    handle = start_gateway(doc, server=request.param, plugin_files=[PLUGIN_FILE], pythonpath=str(REPO))
    try:
        yield handle, up
    finally:
        handle.close()
        up.close()


@pytest.mark.parametrize("path", ["/llm/Purge", "/llm/purge;x", "/llm/purgex",
                                  "/llm/v1/chat/completions", "/llm/x/purge"])
def test_a_near_miss_is_proxied_without_the_admin_key(gw: tuple[GatewayHandle, Any], path: str) -> None:
    handle, up = gw
    before = len(up.requests)
    handle.finished_request(None)
    r = handle.request("POST", path, body=b"{}", headers={"Content-Type": "application/json",
                                                          "X-Cache-Admin-Key": ADMIN_KEY})
    assert r.status == 200 and r.header("X-Upstream") == "echo", (r.status, r.body[:200])
    (seen,) = up.requests[before:]
    assert "x-cache-admin-key" not in seen["headers"], seen["headers"]
    assert ADMIN_KEY not in repr(seen)
    logged = handle.finished_request(r.header("X-Kong-Request-Id")).saved["serialize"]["request"]["headers"]
    assert logged.get("x-cache-admin-key") == "REDACTED"


def test_the_key_past_the_first_100_headers_is_removed_too(gw: tuple[GatewayHandle, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # kong.request.get_headers() returns the first 100 header lines: the plugin cannot see a key
    # sent after them, and nginx still forwards it (a breaker's finding on real Kong).
    import http.client

    monkeypatch.setattr(http.client, "_MAXHEADERS", 1000)  # the echo upstream's own limit (http.server)
    handle, up = gw
    before = len(up.requests)
    headers = {f"X-Fill-{i}": "x" for i in range(120)}
    headers.update({"Content-Type": "application/json", "X-Cache-Admin-Key": ADMIN_KEY})
    r = handle.request("POST", "/llm/v1/chat/completions", body=b"{}", headers=headers)
    assert r.status == 200, (r.status, r.body[:200])
    (seen,) = up.requests[before:]
    assert "x-fill-119" in seen["headers"] and "x-cache-admin-key" not in seen["headers"]


def test_a_request_without_the_key_is_untouched(gw: tuple[GatewayHandle, Any]) -> None:
    handle, up = gw
    before = len(up.requests)
    r = handle.request("POST", "/llm/other", body=b"{}", headers={"Content-Type": "application/json",
                                                                  "X-Other": "kept"})
    assert r.status == 200
    (seen,) = up.requests[before:]
    assert seen["headers"]["x-other"] == "kept" and seen["path"] == "/v1/other"


@pytest.mark.parametrize("path", ["/llm/purge", "/llm/purge/", "/llm/%70urge", "/llm/./purge",
                                  "/llm//purge", "/llm/x/../purge"])
def test_every_spelling_kong_normalises_to_admin_path_is_the_purge(gw: tuple[GatewayHandle, Any],
                                                                    path: str) -> None:
    handle, up = gw
    before = len(up.requests)
    denied = handle.request("POST", path, headers={"X-Cache-Admin-Key": "wrong"})
    assert denied.status == 403
    r = handle.request("DELETE", path, headers={"X-Cache-Admin-Key": ADMIN_KEY})
    assert r.status == 200 and r.json()["namespace"].startswith("admin-"), (r.status, r.body[:200])
    assert len(up.requests) == before  # neither reached the upstream


@pytest.mark.parametrize("admin_path,path,same", [
    ("/", "/", True), ("/", "//", True), ("/llm/purge", "/llm/purge/", True),
    ("/llm//purge", "/llm/purge", True), ("/llm/purge", "/llm/purgex", False), ("/", "/x", False)])
def test_admin_path_comparison(admin_path: str, path: str, same: bool) -> None:
    # admin_path "/" could never purge: "/" was compared with "" (a breaker's finding)
    from aigov.plugins.semantic_cache.handler import _same_path

    assert (_same_path(path) == _same_path(admin_path)) is same
