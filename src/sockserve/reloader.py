"""Development reload (``--reload``): notice when the Python sources change."""

from __future__ import annotations

import contextlib
import os

__all__ = ["SCAN_INTERVAL", "SourceWatcher"]

SCAN_INTERVAL = 1.0  # seconds between two looks at the sources

_SKIP_DIRS = frozenset({"__pycache__", "node_modules", "venv", "build", "dist"})


class SourceWatcher:
    """Remembers the modification times of the ``.py`` files under a directory."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._mtimes: dict[str, float] = {}

    def changed(self) -> bool:
        """Did any .py file change since the last call? (False on the first call.)"""
        mtimes: dict[str, float] = {}
        for root, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with contextlib.suppress(OSError):
                        mtimes[path] = os.stat(path).st_mtime
        changed = bool(self._mtimes) and mtimes != self._mtimes
        self._mtimes = mtimes
        return changed
