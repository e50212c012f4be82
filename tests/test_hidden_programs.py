"""SOCKSERVE_TEST_HIDE hides a program from every test process, pytest-xdist's included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TESTS, child_environment

USES_SH = """
from helpers import require_program


def test_uses_sh():
    require_program("sh")
"""


@pytest.mark.parametrize("processes", ["0", "2"])
def test_a_hidden_program_skips_its_tests(tmp_path: Path, processes: str) -> None:
    (tmp_path / "test_uses_sh.py").write_text(USES_SH)
    (tmp_path / "conftest.py").write_text("import helpers\n")  # as the suite's conftest does
    env = child_environment({"PYTHONPATH": str(TESTS), "SOCKSERVE_TEST_HIDE": "haproxy sh"})
    env.pop("SOCKSERVE_REQUIRE_ALL", None)  # under it a hidden program fails instead
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", processes, "-rs"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "1 skipped" in result.stdout, result.stdout + result.stderr
    assert "sh is hidden by SOCKSERVE_TEST_HIDE" in result.stdout
