"""The shared result cache (issue 13, item 4): what the API returned for an input, kept in
the shared queue's database (table ``results``, keyed by :func:`dropcut.paths.result_key`:
the input's content, and for a matte the proxy's settings), so that a photo done on one
machine costs no request on another.

:class:`PgResultCache` is a :class:`~dropcut.cache.ResultCache` (same methods) with the
database behind the local one: :meth:`~PgResultCache.get` answers from the local folder,
else fetches the result from the database into it (callers still get a file);
:meth:`~PgResultCache.store` keeps it locally and shares it. Both folders are bounded by
``max_bytes``, least recently used first (the database's use times are its own clock's,
updated by every daemon that uses a result). Results larger than ``share_max_bytes`` stay
local (mattes are small; a cut-out of a large photo may not be).

The database being away never fails a call: ``get`` answers from the local folder only
(a miss costs a request, as it would without the shared cache), ``store`` keeps the result
locally and shares it at the next ``store`` that reaches the database.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dropcut.cache import ResultCache
from dropcut.pgqueue import NOW, PgJobQueue, QueueUnavailable

SHARE_MAX_BYTES = 16 * 1024 * 1024  # results larger than this are not shared


class PgResultCache:
    """A :class:`~dropcut.cache.ResultCache` in ``directory`` in front of the shared
    ``results`` table of ``queue``'s database."""

    def __init__(
        self, directory: Path, *, max_bytes: int, queue: PgJobQueue, share_max_bytes: int = SHARE_MAX_BYTES
    ) -> None:
        self.directory = directory
        self.share_max_bytes = share_max_bytes
        self._local = ResultCache(directory, max_bytes=max_bytes)
        self._queue = queue
        self._unshared: set[str] = set()  # stored while the database was away

    @property
    def max_bytes(self) -> int:
        return self._local.max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        self._local.max_bytes = value

    @property
    def total_bytes(self) -> int:
        """Bytes in the local folder."""
        return self._local.total_bytes

    def path(self, key: str) -> Path:
        return self._local.path(key)

    def get(self, key: str) -> Path | None:
        """The cached result (a local file), marked as used here and in the database, or
        None: neither has it (or the database is away and the local folder has not)."""
        found = self._local.get(key)
        if found is not None:
            with contextlib.suppress(QueueUnavailable), self._queue.transaction() as db:
                db.execute(f"UPDATE results SET used_at = {NOW} WHERE result_key = %s".encode(), (key,))
            return found
        if self.max_bytes <= 0:
            return None
        try:
            with self._queue.transaction() as db:
                row = db.execute(
                    f"UPDATE results SET used_at = {NOW} WHERE result_key = %s RETURNING body".encode(),
                    (key,),
                ).fetchone()
        except QueueUnavailable:
            return None
        if row is None:
            return None
        fetched = self.directory / f"{key}.{os.getpid()}.fetched.tmp"
        try:
            with fetched.open("wb") as out:
                out.write(bytes(row[0]))
            self._local.store(key, fetched)  # (atomically, fsynced, within the local bound)
        except OSError:  # a full disk: a request it costs, as without the cache
            return None
        finally:
            fetched.unlink(missing_ok=True)
        return self._local.get(key)

    def store(self, key: str, source: Path) -> None:
        """Keep a finished, fsynced result locally (atomically), share it, then evict."""
        if self.max_bytes <= 0:
            return
        self._local.store(key, source)
        if source.stat().st_size <= self.share_max_bytes:
            self._unshared.add(key)
        with contextlib.suppress(QueueUnavailable):
            self._share()
            self._evict_shared()

    def _share(self) -> None:
        for key in sorted(self._unshared):
            try:
                body = self.path(key).read_bytes()
            except FileNotFoundError:  # evicted locally meanwhile
                self._unshared.discard(key)
                continue
            with self._queue.transaction() as db:
                db.execute(
                    "INSERT INTO results (result_key, body, stored_at, used_at) "
                    f"VALUES (%s, %s, {NOW}, {NOW}) ON CONFLICT (result_key) "
                    "DO UPDATE SET body = excluded.body, used_at = excluded.used_at".encode(),
                    (key, body),
                )
            self._unshared.discard(key)

    def evict(self) -> int:
        """Remove least recently used results until each folder fits (the database's
        when it can be reached); returns how many were removed locally."""
        removed = self._local.evict()
        with contextlib.suppress(QueueUnavailable):
            self._evict_shared()
        return removed

    def _evict_shared(self) -> int:
        with self._queue.transaction() as db:
            return db.execute(
                "DELETE FROM results WHERE result_key IN (SELECT result_key FROM (SELECT result_key, "
                "SUM(octet_length(body)) OVER (ORDER BY used_at DESC, result_key) AS kept FROM results) "
                "AS newest WHERE kept > %s)",
                (max(self.max_bytes, 0),),
            ).rowcount

    def shared_bytes(self) -> int:
        """Bytes of results in the database (:class:`QueueUnavailable` when it is away)."""
        with self._queue.transaction() as db:
            row = db.execute("SELECT COALESCE(SUM(octet_length(body)), 0) FROM results").fetchone()
        return int(row[0]) if row is not None else 0
