"""Fixtures for the whole suite, and the leak check (leakcheck.py) after every test.

The helpers themselves are in helpers.py.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import trustme
from hypothesis import HealthCheck, settings

from helpers import (
    LOOPS,
    ServerProcess,
    sockserve_argv,
)
from leakcheck import (
    pytest_collection_finish,
    pytest_configure,
    pytest_runtest_makereport,
    pytest_runtest_setup,
    pytest_runtest_teardown,
    pytest_unconfigure,
)

# A terminal session starts with SIGINT at its default, but a test run started as a
# background job has it ignored, and every child would inherit that: Python keeps an
# inherited SIG_IGN, so the client under test would not stop on Ctrl-C. A handler set here
# is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Hypothesis checks what its examples do, not how fast: on a loaded machine (or under
# coverage, with four test processes on two cores) an example may take seconds.
settings.register_profile("sockserve", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sockserve")

# The leak check's hooks, imported to run for every test of the suite.
__all__ = [
    "pytest_collection_finish",
    "pytest_configure",
    "pytest_runtest_makereport",
    "pytest_runtest_setup",
    "pytest_runtest_teardown",
    "pytest_unconfigure",
]

StartServer = Callable[..., ServerProcess]
Spawn = Callable[..., ServerProcess]


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> str:
    """The event loop a test's server runs on: every test runs on both, where uvloop is."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths of a server certificate (localhost, 127.0.0.1), its key, and the CA's cert."""
    directory = tmp_path_factory.mktemp("tls")
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    paths = {
        "cert": directory / "server.pem",
        "key": directory / "server.key",
        "ca": directory / "ca.pem",
    }
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(paths["cert"]))
    server_cert.private_key_pem.write_to_path(str(paths["key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start any command as a ServerProcess (stderr collected); stop it in teardown."""
    started: list[ServerProcess] = []

    def start(argv: Sequence[str], **options: Any) -> ServerProcess:
        server = ServerProcess(argv, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def start_server(spawn: Spawn) -> StartServer:
    """Start ``python -m sockserve ARGS`` and wait for its ``listening on`` lines.

    ``nofile`` runs it under that RLIMIT_NOFILE; other keywords go to ServerProcess.
    """

    def start(
        args: Sequence[str],
        *,
        listeners: int = 1,
        timeout: float = 15.0,
        nofile: int | None = None,
        **options: Any,
    ) -> ServerProcess:
        return spawn(sockserve_argv(args, nofile), **options).start(listeners, timeout)

    return start
