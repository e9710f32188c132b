"""The result cache: the PNG the API returned for each input, kept in ``state_dir`` under
its result key (:func:`dropcut.paths.result_key`: the input's sha256 for a cut-out, with
the proxy's settings for a matte).

The same content dropped again, under any name or folder, is published from here without
a request; a matte is cached before it is rendered, so a crash while rendering costs no
second request. Bounded by ``result_cache_bytes``; the least recently used results go
first.
"""

from __future__ import annotations

import os
from pathlib import Path

from dropcut.publish import copy_synced


class ResultCache:
    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._total = 0
        for entry in os.scandir(directory):
            if entry.name.endswith(".tmp"):
                os.unlink(entry.path)  # a crash mid-store
            elif entry.is_file(follow_symlinks=False):
                self._total += entry.stat(follow_symlinks=False).st_size

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.png"

    def get(self, key: str) -> Path | None:
        """The cached result, marked as used, or None."""
        path = self.path(key)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def store(self, key: str, source: Path) -> None:
        """Copy a finished, fsynced result into the cache (atomically), then evict."""
        if self.max_bytes <= 0:
            return
        final = self.path(key)
        tmp = self.directory / f"{key}.{os.getpid()}.tmp"
        copy_synced(source, tmp)  # (a full state_dir keeps no half copy)
        size = tmp.stat().st_size
        old = final.stat().st_size if final.exists() else 0
        os.replace(tmp, final)
        self._total += size - old
        self.evict()

    def evict(self) -> int:
        """Remove least recently used results until the cache fits; returns how many."""
        if self._total <= self.max_bytes:
            return 0
        entries = sorted(
            (e.stat(follow_symlinks=False).st_mtime_ns, e.path, e.stat(follow_symlinks=False).st_size)
            for e in os.scandir(self.directory)
            if e.is_file(follow_symlinks=False) and e.name.endswith(".png")
        )
        removed = 0
        for _, path, size in entries:
            if self._total <= self.max_bytes:
                break
            os.unlink(path)
            self._total -= size
            removed += 1
        return removed

    @property
    def total_bytes(self) -> int:
        return self._total
