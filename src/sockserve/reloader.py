"""Development reload (``--reload``): notice when the handler's Python sources change."""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["SCAN_INTERVAL", "SourceWatcher"]

SCAN_INTERVAL = 1.0  # seconds between two looks at the sources


class SourceWatcher:
    """Watches the ``.py`` files in the directories of the given module files.

    Those are the handler's modules under the current directory (what importing it
    loaded): a scan lists a few directories, never a whole tree, so it stays cheap
    wherever the server is started. A new module beside them is noticed too.
    """

    def __init__(self, files: Iterable[str]) -> None:
        self.directories = sorted({os.path.dirname(path) for path in files})
        self._mtimes = self._scan()

    def _scan(self) -> dict[str, float]:
        mtimes: dict[str, float] = {}
        for directory in self.directories:
            try:
                entries = os.scandir(directory)
            except OSError:
                continue
            with entries:
                for entry in entries:
                    if entry.name.endswith(".py"):
                        try:
                            mtimes[entry.path] = entry.stat().st_mtime
                        except OSError:
                            continue
        return mtimes

    def changed(self) -> bool:
        """Did a .py file appear, go or change since the last call (or since creation)?"""
        mtimes = self._scan()
        changed = mtimes != self._mtimes
        self._mtimes = mtimes
        return changed
