"""Command-line HOST and PORT shared by the tutorial examples."""

from __future__ import annotations

import sys


def host_port(default_host: str = "localhost", default_port: int = 9999) -> tuple[str, int]:
    """``HOST PORT`` from the command line, with the tutorial's defaults."""
    args = sys.argv[1:]
    host = args[0] if args else default_host
    port = int(args[1]) if len(args) > 1 else default_port
    return host, port
