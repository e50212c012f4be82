"""Old home of the in-thread server helpers, now in helpers.py: kept importable while
test files written against it move over. New code imports from helpers."""

from helpers import LOOPS, ThreadedServer, closed_by_server, connect, read_all, read_line, serving

__all__ = [
    "LOOPS",
    "ThreadedServer",
    "closed_by_server",
    "connect",
    "read_all",
    "read_line",
    "serving",
]
