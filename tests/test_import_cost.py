"""The drop-in loads no more than the stdlib's socketserver; the rest of sockserve loads lazily."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")},  # no tracer
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_drop_in_imports_no_asyncio_ssl_or_the_server() -> None:
    loaded = modules_after("import sockserve.socketserver")
    heavy = {"asyncio", "ssl", "logging", "typing", "sockserve.server", "sockserve.settings"}
    assert not heavy & loaded, sorted(heavy & loaded)
    stdlib = modules_after("import socketserver")
    ours = {m for m in loaded - stdlib if m.startswith("sockserve")}
    assert ours == {"sockserve", "sockserve.patch", "sockserve.socketserver"}


def test_package_names_load_on_first_use() -> None:
    code = (
        "import sockserve, sys\n"
        "assert 'asyncio' not in sys.modules\n"
        "from sockserve import Server, serve, LineHandler, SettingsError\n"
        "assert sockserve.Server is Server and callable(serve)\n"
        "import sockserve.patch\n"
        "assert callable(sockserve.patch)\n"
        "assert sorted(dir(sockserve)) == sorted(sockserve.__all__)\n"
        "try:\n    sockserve.nope\nexcept AttributeError as e:\n    print('AE', e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "AE module 'sockserve' has no attribute 'nope'" in result.stdout


def test_patch_stays_the_function_after_importing_the_submodule() -> None:
    code = "import sockserve.patch, sockserve\nsockserve.patch()\nsockserve.unpatch()\nprint('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "ok"


def test_import_time_benchmark_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "import_time.py"), "--runs", "1", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    figures = json.loads(result.stdout)
    assert figures["stdlib_ms"] > 0 and figures["sockserve_ms"] > 0
    assert "asyncio" not in figures["extra"]
