"""The ``sockserve`` command: run, demo, client, bench, settings.

Every setting's flag is generated from ``sockserve.settings.Settings``; flags beat
``SOCKSERVE_*`` variables, which beat the defaults.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from sockserve import __version__
from sockserve.settings import (
    SETTINGS,
    Settings,
    SettingsError,
    env_settings,
    help_of,
    markdown_reference,
    metavar_of,
    unknown_env,
)

__all__ = ["main"]

PROG = "sockserve"


class UsageError(Exception):
    """A one-line error for the user: printed without a traceback, exit status 2."""


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also SOCKSERVE_<NAME> in the environment)")
    for s in SETTINGS:
        if s.flag:
            group.add_argument(
                s.option,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_of(s).replace("%", "%%"),
            )
        else:
            group.add_argument(
                *s.options,
                *(["-b"] if s.name == "bind" else []),
                dest=s.name,
                action="append" if s.repeatable else "store",
                default=None,
                metavar=metavar_of(s),
                help=help_of(s).replace("%", "%%"),
            )


def settings_from(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Defaults, then the environment, then the command line."""
    values: dict[str, Any] = dict(env_settings())
    for s in SETTINGS:
        value = getattr(args, s.name, None)
        if value is not None:
            values[s.name] = value
    values.update(overrides)
    return Settings(**values)


def _serve(handler: str | type, settings: Settings) -> int:
    from sockserve.importer import HandlerImportError
    from sockserve.kinds import HandlerKindError
    from sockserve.observability import configure_logging
    from sockserve.runner import StopError, serve

    configure_logging(settings.log_level, settings.log_format)
    for name, meant in unknown_env():
        logging.getLogger("sockserve.cli").warning(
            "ignoring %s: no such setting%s", name, f" (did you mean {meant}?)" if meant else ""
        )
    try:
        serve(handler, settings)  # bad TLS files and handlers fail before any worker starts
    except (HandlerKindError, HandlerImportError) as exc:
        raise UsageError(str(exc)) from None
    except StopError:
        return 1  # logged
    except OSError as exc:
        logging.getLogger("sockserve.cli").error("%s", os_error_text(exc))
        return 1
    return 0


def os_error_text(exc: OSError) -> str:
    """The message without Python's ``[Errno 99]`` prefix (the text already says what failed)."""
    text = exc.strerror or str(exc)
    return f"{exc.filename}: {text}" if exc.filename else text


def cmd_run(args: argparse.Namespace) -> int:
    return _serve(args.handler, settings_from(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from sockserve.examples.uppercase import Uppercase

    return _serve(Uppercase, settings_from(args))


def cmd_settings(args: argparse.Namespace) -> int:
    sys.stdout.write(markdown_reference())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="socketserver-style servers, ready for production."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve a handler class: sockserve run MODULE:CLASS")
    run.add_argument("handler", metavar="MODULE:CLASS", help="the handler class to serve")
    add_settings_arguments(run)
    run.set_defaults(func=cmd_run)

    demo = commands.add_parser("demo", help="the uppercase echo server (default 127.0.0.1:9999)")
    add_settings_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    for name, help_text in (
        ("client", "interactive line client: sockserve client ADDRESS"),
        ("bench", "line-protocol load generator: sockserve bench ADDRESS"),
    ):
        try:
            module: Any = importlib.import_module(f"sockserve.{name}")
        except ImportError:
            continue
        sub = commands.add_parser(name, help=help_text)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)

    settings = commands.add_parser("settings", help="print the settings reference (Markdown)")
    settings.set_defaults(func=cmd_settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # as a program killed by SIGPIPE (``sockserve bench --json | head``)
    except (UsageError, SettingsError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    return code


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: the reader has gone, and the flush at exit must not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
