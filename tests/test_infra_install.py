"""scripts/install.sh, the Makefile's test target and .ci/run's handling of pytest exit codes.

The exit-code tests run the real Makefile and .ci/run in a scratch tree whose install step is a
stand-in (the unit under test is the exit-code plumbing, not pip). The real install from nothing
takes minutes; it runs only with AIGOV_TEST_INSTALL=1.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE_NAMES = ("9b5ad71b2ce5302211f9c61530b329a4922fc6a4", "fb374d419588a4632f3f557e76b4b70aebbca790")


def _python_wrapper(path: Path) -> None:
    # A wrapper, not a symlink: a symlinked venv python outside its venv loses the venv's packages.
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    path.chmod(0o755)


def _scratch_repo(tmp_path: Path, install_exit: int = 0) -> Path:
    root = tmp_path / "repo"
    (root / ".ci").mkdir(parents=True)
    (root / "scripts").mkdir()
    (root / "tests").mkdir()
    shutil.copy2(REPO / "Makefile", root / "Makefile")
    shutil.copy2(REPO / ".ci" / "run", root / ".ci" / "run")
    stub = root / "scripts" / "install.sh"
    stub.write_text(f"#!/usr/bin/env bash\necho 'install stand-in' >&2\nexit {install_exit}\n")
    stub.chmod(0o755)
    (root / ".venv" / "bin").mkdir(parents=True)
    _python_wrapper(root / ".venv" / "bin" / "python")
    (root / "pytest.ini").write_text("[pytest]\n")  # keep pytest's rootdir inside the scratch tree
    return root


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MAKE"))}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**clean_env, **env})


def test_ci_run_reports_no_tests_collected_as_error(tmp_path: Path) -> None:
    root = _scratch_repo(tmp_path)
    result = _run([str(root / ".ci" / "run")], root)
    assert result.returncode == 1
    assert "no tests collected (pytest exit code 5)" in result.stderr
    assert "no tests ran" in result.stdout.strip().splitlines()[-1]  # pytest's own summary line


def test_make_test_fails_on_exit_code_5(tmp_path: Path) -> None:
    root = _scratch_repo(tmp_path)
    result = _run(["make", "-s", "test"], root)
    assert result.returncode != 0
    assert "collected no tests" in result.stderr


def test_ci_run_passes_and_output_ends_with_pytest_summary(tmp_path: Path) -> None:
    root = _scratch_repo(tmp_path)
    (root / "tests" / "test_ok.py").write_text("def test_ok():\n    assert 1 + 1 == 2\n")
    result = _run([str(root / ".ci" / "run")], root)
    assert result.returncode == 0, result.stdout + result.stderr
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith("1 passed in ")


def test_ci_run_fails_on_failing_tests(tmp_path: Path) -> None:
    root = _scratch_repo(tmp_path)
    (root / "tests" / "test_bad.py").write_text("def test_bad():\n    assert 1 + 1 == 3\n")
    result = _run([str(root / ".ci" / "run")], root)
    assert result.returncode == 1
    assert "tests failed (pytest exit code 1)" in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("1 failed in ")


def test_ci_run_fails_when_install_fails(tmp_path: Path) -> None:
    root = _scratch_repo(tmp_path, install_exit=3)
    (root / "tests" / "test_ok.py").write_text("def test_ok():\n    pass\n")
    result = _run([str(root / ".ci" / "run")], root)
    assert result.returncode == 1
    assert "failed before pytest ran" in result.stderr


def test_per_test_timeout_is_enforced(tmp_path: Path) -> None:
    root = _scratch_repo(tmp_path)
    (root / "tests" / "test_hang.py").write_text("import time\ndef test_hang():\n    time.sleep(30)\n")
    result = _run(["make", "-s", "test", "PYTEST_TIMEOUT=1"], root)
    assert result.returncode != 0
    assert "Timeout" in result.stdout


def _fake_installed_venv(tmp_path: Path, key: str) -> tuple[Path, Path]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _python_wrapper(venv / "bin" / "python")
    (venv / ".aigov-install-stamp").write_text(key + "\n")
    cache = tmp_path / "tiktoken"
    cache.mkdir()
    for name in CACHE_NAMES:
        (cache / name).write_bytes(b"x")
    return venv, cache


def _stamp_key() -> str:
    data = (REPO / "pyproject.toml").read_bytes() + (REPO / "scripts" / "install.sh").read_bytes()
    return hashlib.sha256(data).hexdigest()


def test_install_is_a_fast_noop_when_the_stamp_matches(tmp_path: Path) -> None:
    venv, cache = _fake_installed_venv(tmp_path, _stamp_key())
    result = _run([str(REPO / "scripts" / "install.sh")], REPO, VENV=str(venv),
                  TIKTOKEN_CACHE_DIR=str(cache), PYTHON="/nonexistent/python3")
    assert result.returncode == 0, result.stderr
    assert "already installed" in result.stderr


def _recording_python(venv: Path) -> Path:
    """A venv python that answers the torch-version probe and logs every pip call instead of
    running it (the unit under test is which extras install.sh asks pip for, not pip)."""
    log = venv / "pip-calls.log"
    (venv / "bin" / "python").write_text(
        '#!/bin/sh\n'
        f'if [ "$2" = pip ] || [ "$3" = pip ]; then echo "$@" >> "{log}"; exit 0; fi\n'
        'echo torch==2.13.0\n')
    return log


def test_install_adds_a_missing_extra_on_a_complete_install(tmp_path: Path) -> None:
    venv, cache = _fake_installed_venv(tmp_path, _stamp_key())
    log = _recording_python(venv)
    result = _run([str(REPO / "scripts" / "install.sh")], REPO, VENV=str(venv),
                  TIKTOKEN_CACHE_DIR=str(cache), PYTHON="/nonexistent/python3", AIGOV_EXTRAS="bench")
    assert result.returncode == 0, result.stderr
    assert "installing the optional extra [bench]" in result.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and calls[0].endswith(f"-e {REPO}[bench]") and " -c " in calls[0]
    assert (venv / ".aigov-extra-bench").read_text().strip() == _stamp_key()
    # Installed once: the next run (make bench again, or make test) asks pip for nothing.
    again = _run([str(REPO / "scripts" / "install.sh")], REPO, VENV=str(venv),
                 TIKTOKEN_CACHE_DIR=str(cache), PYTHON="/nonexistent/python3", AIGOV_EXTRAS="bench")
    assert again.returncode == 0 and "optional extra" not in again.stderr
    assert log.read_text().splitlines() == calls


def test_install_without_extras_asks_pip_for_nothing(tmp_path: Path) -> None:
    venv, cache = _fake_installed_venv(tmp_path, _stamp_key())
    log = _recording_python(venv)
    result = _run([str(REPO / "scripts" / "install.sh")], REPO, VENV=str(venv),
                  TIKTOKEN_CACHE_DIR=str(cache), PYTHON="/nonexistent/python3")
    assert result.returncode == 0, result.stderr
    assert not log.exists() and not (venv / ".aigov-extra-bench").exists()


def test_make_bench_installs_the_bench_extra() -> None:
    # Under `make test` (CI) this make is nested: without MAKE* variables and with
    # --no-print-directory it prints only the recipe, no "make[1]: Entering directory" lines.
    dry = _run(["make", "--no-print-directory", "-n", "bench"], REPO)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert any("AIGOV_EXTRAS=bench" in line and "scripts/install.sh" in line for line in lines)
    assert lines[-1].endswith("bench")  # the benchmark runs after the install


def test_install_reruns_when_pyproject_changed(tmp_path: Path) -> None:
    # A stale stamp means a real install; with no usable interpreter it must stop with a clear error.
    venv, cache = _fake_installed_venv(tmp_path, "stale")
    result = _run([str(REPO / "scripts" / "install.sh")], REPO, VENV=str(venv),
                  TIKTOKEN_CACHE_DIR=str(cache), PYTHON="/nonexistent/python3")
    assert result.returncode == 1
    assert "'/nonexistent/python3' not found" in result.stderr


def test_install_reruns_when_tiktoken_files_are_missing(tmp_path: Path) -> None:
    venv, cache = _fake_installed_venv(tmp_path, _stamp_key())
    (cache / CACHE_NAMES[0]).unlink()
    result = _run([str(REPO / "scripts" / "install.sh")], REPO, VENV=str(venv),
                  TIKTOKEN_CACHE_DIR=str(cache), PYTHON="/nonexistent/python3")
    assert result.returncode == 1 and "already installed" not in result.stderr


@pytest.mark.skipif(os.environ.get("AIGOV_TEST_INSTALL") != "1",
                    reason="the install from nothing takes minutes; set AIGOV_TEST_INSTALL=1 to run it")
@pytest.mark.timeout(1800)
def test_install_from_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".venv", ".git", ".cache", "__pycache__"))
    venv = tmp_path / "venv"
    result = subprocess.run([str(tree / "scripts" / "install.sh")], cwd=tree, capture_output=True,
                            text=True, timeout=1800,
                            env={k: v for k, v in os.environ.items()
                                 if k not in ("TIKTOKEN_CACHE_DIR", "VIRTUAL_ENV")} | {"VENV": str(venv)})
    assert result.returncode == 0, result.stderr[-3000:]
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import torch, tiktoken, aigov.tokens as t, os; assert torch.version.cuda is None; "
         "print(t.ensure_offline_encodings()); print(t.count_text('hello world', 'gpt-4o'))"],
        capture_output=True, text=True, timeout=120,
        env={"PATH": os.environ["PATH"], "TIKTOKEN_CACHE_DIR": str(tree / ".cache" / "tiktoken")})
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == [str(tree / ".cache" / "tiktoken"), "2"]
    again = subprocess.run([str(tree / "scripts" / "install.sh")], cwd=tree, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "VENV": str(venv)})
    assert again.returncode == 0 and "already installed" in again.stderr
