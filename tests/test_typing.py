"""The package type-checks: mypy, configured by [tool.mypy] in pyproject.toml,
finds no error in bncore."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_mypy(cache_dir):
    # In the repository root, so that -p finds this checkout's bncore before
    # any installed one and pyproject.toml's settings apply.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
         "--cache-dir", str(cache_dir), "--no-color-output", "--no-error-summary",
         "-p", "bncore"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )


def test_mypy_finds_no_errors(request):
    pytest.importorskip("mypy")
    # pytest's cache keeps mypy's between runs (a second run takes ~1 s, not 5).
    result = run_mypy(request.config.cache.mkdir("mypy"))
    assert result.returncode == 0, (
        f"mypy reports (exit status {result.returncode}):\n{result.stdout}{result.stderr}"
    )
    assert result.stdout.strip() == ""


def test_the_configuration_is_in_force(request, tmp_path):
    # The check is not vacuous: pyproject.toml's settings reach mypy, which
    # then rejects an unannotated function.
    pytest.importorskip("mypy")
    module = tmp_path / "untyped.py"
    module.write_text("def double(x):\n    return 2 * x\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
         "--cache-dir", str(request.config.cache.mkdir("mypy")), "--no-color-output",
         str(module)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1
    assert "Function is missing a type annotation" in result.stdout
