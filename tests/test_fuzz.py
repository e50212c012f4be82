"""The fuzz harnesses under atheris (libFuzzer), for a bounded time each."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REQUIRE_ALL

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 10  # per harness in the normal run; fuzz/README.md says how to run for longer


# Where pyproject.toml installs atheris with the test tools (it ships wheels for these).
ATHERIS_EXPECTED = (
    sys.platform == "linux"
    and platform.machine() == "x86_64"
    and (3, 11) <= sys.version_info < (3, 13)
)


def require_atheris() -> None:
    if importlib.util.find_spec("atheris") is None:
        message = "atheris is not installed (pip install atheris; Linux x86_64 wheels)"
        if REQUIRE_ALL and ATHERIS_EXPECTED:
            pytest.fail(message + "; SOCKSERVE_REQUIRE_ALL=1 forbids skipping")
        pytest.skip(message)


@pytest.mark.parametrize(
    ("harness", "seeds"),
    [("fuzz_proxy_protocol.py", "proxy"), ("fuzz_framing.py", "framing")],
)
def test_harness_survives_bounded_fuzzing(harness: str, seeds: str, tmp_path: Path) -> None:
    require_atheris()
    corpus = tmp_path / "corpus"  # new inputs go here, not into the committed seeds
    corpus.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "fuzz" / harness),
            f"-max_total_time={SECONDS}",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
            str(ROOT / "fuzz" / "corpus" / seeds),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=SECONDS + 60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-"))]
    assert result.returncode == 0 and not crashes, result.stderr[-4000:]
    assert "Done" in result.stderr or "done" in result.stderr, result.stderr[-2000:]
    shutil.rmtree(corpus)
