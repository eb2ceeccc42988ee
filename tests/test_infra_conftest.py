"""tests/conftest.py's collection hook: real-Kong tests are skipped with a stated reason unless
KONG_PROXY_URL is set, and run when it is."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = '''
import os
import pytest

@pytest.mark.kong
def test_needs_kong():
    assert os.environ["KONG_PROXY_URL"] == "http://127.0.0.1:9"

def test_plain():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.path.isdir(os.environ["TIKTOKEN_CACHE_DIR"])
'''


def _run_probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    tests = tmp_path / "tests"
    tests.mkdir(exist_ok=True)
    shutil.copy2(REPO / "tests" / "conftest.py", tests / "conftest.py")
    (tests / "test_probe.py").write_text(PROBE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    kong: real Kong\n")
    base = {k: v for k, v in os.environ.items()
            if k not in ("KONG_PROXY_URL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**base, "PYTHONPATH": str(REPO), **env})


def test_kong_tests_skip_with_reason_without_kong_proxy_url(tmp_path: Path) -> None:
    result = _run_probe(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 skipped" in result.stdout
    assert "set KONG_PROXY_URL to a real Kong proxy (e.g. the docker/compose.yml stack)" in result.stdout


def test_kong_tests_run_with_kong_proxy_url(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, KONG_PROXY_URL="http://127.0.0.1:9")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
