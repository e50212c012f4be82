"""Reference: the raw asyncio.Protocol server of raw_asyncio.py, on uvloop."""

from __future__ import annotations

from benchmarks.servers.common import parse_args, run
from benchmarks.servers.raw_asyncio import serve


def main() -> None:
    args = parse_args(__doc__ or "", loop="uvloop")
    run(lambda: serve(args.host, args.port, args.backlog), args.loop)


if __name__ == "__main__":
    main()
