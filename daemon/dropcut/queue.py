"""The persistent job queue: one SQLite database (WAL) under ``state_dir``.

A job is one admitted input: its relative path and the sha256 of the bytes that were
validated. The database is the source of truth for what has been done; the file system is
re-read, never trusted from memory. All calls are made from the daemon's event-loop thread
(``dropcut status`` and ``dropcut retry`` open their own connection from another process).

States: ``queued`` → ``inflight`` → ``published`` (output durable, input not yet moved) →
``done``; or ``quarantining`` → ``quarantined``; or ``cancelled`` (the file was deleted or
replaced before a request was spent on it). A job found ``inflight`` at start was
interrupted by a crash and goes back to ``queued``; a ``published`` one finishes its input
move.

A file's *signature* is what a stat says of it: size, mtime, ctime and inode. A file seen
again with the same signature is not read again. The ctime is part of it because nobody
can set it: a copy that keeps the mtime (``cp -p``, Windows and SMB copies) of other
content in place still gets a new ctime, so it is read and hashed again.

``seq`` is the admission order: it is set on insert and bumped again whenever a finished
job is admitted anew (the same content dropped again at the same path), always above every
other job's. ``id`` is the row's identity only: a re-admitted job keeps its old, low id, so
"which drop at this path is the latest" is a question for ``seq``, never for ``id``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dropcut.pace import Slot

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    rel_path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    device INTEGER NOT NULL,
    format TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    updated_at REAL NOT NULL,
    output_rel TEXT,
    error TEXT,
    history TEXT NOT NULL DEFAULT '[]',
    seq INTEGER NOT NULL DEFAULT 0,
    ctime_ns INTEGER NOT NULL DEFAULT 0,
    held_as TEXT,
    frames INTEGER NOT NULL DEFAULT 1,
    recipe TEXT,
    archived_as TEXT,
    admitted_at REAL NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_path_sha ON jobs (rel_path, sha256);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_sha ON jobs (sha256, state);
CREATE INDEX IF NOT EXISTS jobs_path ON jobs (rel_path);
CREATE TABLE IF NOT EXISTS outputs (
    out_key TEXT PRIMARY KEY,
    out_rel TEXT NOT NULL,
    rel_path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outputs_owner ON outputs (rel_path);
CREATE TABLE IF NOT EXISTS slots (started REAL NOT NULL, sent REAL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    started REAL NOT NULL,
    endpoint TEXT NOT NULL,
    status INTEGER,
    seconds REAL NOT NULL,
    sent INTEGER NOT NULL,
    received INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_started ON requests (started);
CREATE INDEX IF NOT EXISTS jobs_recent ON jobs (state, updated_at);
"""

REQUEST_HISTORY_SECONDS = 40 * 86400.0
"""How long the request log (``requests``) keeps a request: a month and some."""

ACTIVE_STATES = ("queued", "inflight", "published")
SIGNATURE_CHUNK = 500  # paths per query in known_signatures (SQLite allows 999 parameters)
STATES = (
    "queued",
    "inflight",
    "published",
    "done",
    "quarantining",
    "quarantined",
    "cancelled",
    "held",  # part of a large batch: waits for `dropcut approve` (or `discard`)
    "discarded",  # a held file the admin does not want sent: remembered, left in the inbox
)
# Jobs whose file is not in the inbox under its signature any more: a file seen again with
# such a job's signature was put back (quarantine) or is new (cancelled), and is read again.
GONE_STATES = ("quarantined", "cancelled")

@dataclass(frozen=True)
class RequestRecord:
    """One request to the API, for the request log: ``started`` wall seconds, ``endpoint``
    its path, ``status`` the HTTP status (None: no answer), ``seconds`` how long it took,
    ``sent`` / ``received`` body bytes."""

    started: float
    endpoint: str
    status: int | None
    seconds: float
    sent: int
    received: int


Signature = tuple[str, int, int, int, int]
"""``(rel_path, size, mtime_ns, ctime_ns, inode)`` of a file as a stat saw it."""


@dataclass(frozen=True)
class Job:
    id: int
    rel_path: str
    sha256: str
    size: int
    mtime_ns: int
    inode: int
    device: int
    format: str
    state: str
    attempts: int
    first_seen: float
    output_rel: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    ctime_ns: int = 0
    held_as: str | None = None  # the private name its input was moved to for disposal
    recipe: str | None = None  # JSON of its outputs' resolved specs (None: the default)
    archived_as: str | None = None  # where its input went in the archive (rerender reads it)
    updated_at: float = 0.0  # wall seconds of its last change of state

    @property
    def identity(self) -> tuple[int, int, int, int, int]:
        """``(size, mtime_ns, ctime_ns, inode, device)`` of the file this job was made from."""
        return (self.size, self.mtime_ns, self.ctime_ns, self.inode, self.device)


# How outputs are named: the candidate name sets for an input (one name per output of its
# recipe), and the key two names collide on (from dropcut.recipes and dropcut.paths; passed
# in, so the queue knows no naming rules).
OutputRule = tuple[Callable[[str], Iterable[Sequence[str]]], Callable[[str], str]]


@dataclass(frozen=True)
class HoldRule:
    """The large-batch hold: once ``threshold`` files were admitted within ``window``
    seconds (since the last ``dropcut approve``), the next ones are queued ``held``.
    ``threshold`` 0 = no hold."""

    threshold: int
    window: float


@dataclass(frozen=True)
class NewJob:
    rel_path: str
    sha256: str
    size: int
    mtime_ns: int
    inode: int
    device: int
    format: str
    first_seen: float
    ctime_ns: int = 0
    frames: int = 1  # frames in the file; only the first is processed (multi_frame = "first")
    recipe: str | None = None  # the outputs it gets (JSON of resolved specs), decided when queued


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        rel_path=row["rel_path"],
        sha256=row["sha256"],
        size=row["size"],
        mtime_ns=row["mtime_ns"],
        inode=row["inode"],
        device=row["device"],
        format=row["format"],
        state=row["state"],
        attempts=row["attempts"],
        first_seen=row["first_seen"],
        output_rel=row["output_rel"],
        history=json.loads(row["history"]),
        ctime_ns=row["ctime_ns"],
        held_as=row["held_as"],
        recipe=row["recipe"],
        archived_as=row["archived_as"],
        updated_at=row["updated_at"],
    )


def _rows_at(
    conn: sqlite3.Connection, columns: str, rel_paths: Iterable[str], *, where: str = "1"
) -> Iterator[sqlite3.Row]:
    """``columns`` of the jobs at these paths (and ``where``), ``SIGNATURE_CHUNK`` paths
    per query."""
    paths = list(dict.fromkeys(rel_paths))
    for start in range(0, len(paths), SIGNATURE_CHUNK):
        chunk = paths[start : start + SIGNATURE_CHUNK]
        marks = ",".join("?" * len(chunk))
        yield from conn.execute(f"SELECT {columns} FROM jobs WHERE {where} AND rel_path IN ({marks})", chunk)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database made by an older version up to date (idempotent; run at every
    writable open, after ``SCHEMA``).

    ``jobs.seq`` (admission order) did not exist before: it is added and numbered by
    ``first_seen`` — a re-admission set ``first_seen`` anew, so at any one path this is the
    order of the drops — then ``id``.

    ``jobs.ctime_ns`` (part of a file's signature) and ``jobs.held_as`` (the private name
    of an input being disposed of) are added empty: an old job's file is read once more
    at the next rescan, then recognised."""
    for column, decl in (
        ("ctime_ns", "INTEGER NOT NULL DEFAULT 0"),
        ("held_as", "TEXT"),
        ("frames", "INTEGER NOT NULL DEFAULT 1"),
        ("recipe", "TEXT"),
        ("archived_as", "TEXT"),
        ("admitted_at", "REAL NOT NULL DEFAULT 0"),
    ):
        if column not in _columns(conn, "jobs"):
            with contextlib.suppress(sqlite3.OperationalError):  # added by another process meanwhile
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
    if "seq" not in _columns(conn, "jobs"):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if "seq" not in _columns(conn, "jobs"):  # not done meanwhile by another process
                conn.execute("ALTER TABLE jobs ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
                ids = [row[0] for row in conn.execute("SELECT id FROM jobs ORDER BY first_seen, id")]
                conn.executemany("UPDATE jobs SET seq=? WHERE id=?", [(n, i) for n, i in enumerate(ids, 1)])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq)")
    # (status reads: the few multi-frame files among many, without a table scan)
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_frames ON jobs (frames) WHERE frames > 1")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}


def _next_seq(db: sqlite3.Connection) -> int:
    """An admission number above every job's (call inside the writing transaction)."""
    row = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
    return int(row[0])


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the database (creating or migrating it unless read-only) in WAL mode."""
    if readonly:
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=10)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=10, isolation_level=None)
    conn.row_factory = sqlite3.Row
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
        _migrate(conn)
    return conn


class JobQueue:
    """Typed operations on the job table. Every write is one transaction."""

    def __init__(self, conn: sqlite3.Connection, clock: Any = time.time) -> None:
        self._conn = conn
        self._clock = clock

    @classmethod
    def open(cls, path: Path) -> JobQueue:
        return cls(connect(path))

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # --- start-up ----------------------------------------------------------------

    def recover(self) -> tuple[int, list[Job]]:
        """Requeue jobs interrupted in flight; return their count and the published ones
        whose input move was not finished.

        A due time that lies in the future by more than the delay it was set with (the
        wall clock was stepped back while dropcut was down) is brought back to now plus
        that delay: a step of the clock never stalls the queue."""
        now = self._clock()
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state='queued', updated_at=? WHERE state='inflight'", (now,))
            requeued = cur.rowcount
            db.execute(
                "UPDATE jobs SET next_attempt_at = ? + MAX(0, next_attempt_at - updated_at), updated_at=? "
                "WHERE state='queued' AND next_attempt_at > ? + MAX(0, next_attempt_at - updated_at)",
                (now, now, now),
            )
        rows = self._conn.execute("SELECT * FROM jobs WHERE state='published'").fetchall()
        return requeued, [_job(r) for r in rows]

    # --- admission ---------------------------------------------------------------

    def known_signature(
        self, rel_path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int
    ) -> str | None:
        """State of the newest job for this path with this signature, if any: a file seen
        again unchanged is not read again. Quarantined and cancelled jobs do not count: a
        file back in the inbox with their signature was put back to be tried again."""
        return self.known_signatures([(rel_path, size, mtime_ns, ctime_ns, inode)])[
            (rel_path, size, mtime_ns, ctime_ns, inode)
        ]

    def known_signatures(self, files: Sequence[Signature]) -> dict[Signature, str | None]:
        """:meth:`known_signature` for many :data:`Signature` s at once: one query per
        ``SIGNATURE_CHUNK`` paths instead of one per file."""
        found: dict[Signature, tuple[tuple[int, int], str]] = {}
        columns = "seq, id, rel_path, size, mtime_ns, ctime_ns, inode, state"
        paths = [f[0] for f in files]
        gone = ",".join(f"'{state}'" for state in GONE_STATES)
        for seq, job_id, rel_path, size, mtime_ns, ctime_ns, inode, state in _rows_at(
            self._conn, columns, paths, where=f"state NOT IN ({gone})"
        ):
            key = (rel_path, size, mtime_ns, ctime_ns, inode)
            best = found.get(key)
            if best is None or (seq, job_id) > best[0]:
                found[key] = ((seq, job_id), str(state))
        return {f: (found[f][1] if f in found else None) for f in files}

    def enqueue_many(
        self,
        jobs: Iterable[NewJob],
        *,
        requeue_done: bool,
        outputs: OutputRule | None = None,
        hold: HoldRule | None = None,
    ) -> list[tuple[NewJob, str]]:
        """Add admitted files; returns each with what happened: ``queued``, ``requeued``
        (the same content at the same path was known and is to be done again), ``held``
        (queued, but beyond ``hold``'s threshold: see :class:`HoldRule`), or the state of
        the existing job (``queued``/``inflight``… — a duplicate, nothing added).

        A known job is done again when its content comes back to its path after it was
        quarantined or cancelled (put back: tried again, whatever ``on_success``), after it
        was done (``requeue_done``: the input was archived or deleted, so this is a new
        drop), or after it was done while other content was dropped at the path since
        (with ``on_success = keep``: the outbox holds the other content's cut-out, and must
        again hold this one's — republished from the result cache).

        With ``outputs`` (candidates, key) a new path also claims its output name here, in
        admission order, so that which of ``a.jpg`` and ``a.png`` gets ``a.png`` does not
        depend on which answer comes back first (see :meth:`claim_output`).

        One transaction for all of them (one commit, one fsync); the jobs already known
        for their paths are looked up together first. Each new or re-admitted job gets the
        next admission number (``seq``), in the order given."""
        now = self._clock()
        todo = list(jobs)
        results: list[tuple[NewJob, str]] = []
        with self._tx() as db:
            seq = _next_seq(db)
            existing = self._jobs_at(db, [job.rel_path for job in todo])
            newest = self._newest_at(db, [job.rel_path for job in todo])
            recent = self._admitted_since(db, now, hold) if hold is not None and hold.threshold else None

            def admitted() -> str:
                nonlocal recent
                if recent is None or hold is None:
                    return "queued"
                recent += 1
                return "held" if recent > hold.threshold else "queued"

            for job in todo:
                key = (job.rel_path, job.sha256)
                row = existing.get(key)
                if row is None:
                    state = admitted()
                    cur = db.execute(
                        "INSERT INTO jobs (rel_path, sha256, size, mtime_ns, ctime_ns, inode, device, "
                        "format, state, first_seen, updated_at, seq, frames, recipe, admitted_at) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (
                            job.rel_path,
                            job.sha256,
                            job.size,
                            job.mtime_ns,
                            job.ctime_ns,
                            job.inode,
                            job.device,
                            job.format,
                            state,
                            job.first_seen,
                            now,
                            seq,
                            job.frames,
                            job.recipe,
                            now,
                        ),
                    )
                    existing[key] = (int(cur.lastrowid or 0), state)
                    newest[job.rel_path] = seq
                    seq += 1
                    results.append((job, state))
                    if outputs is not None:
                        self._claim_in(db, job.rel_path, *outputs)
                    continue
                job_id, state = row
                my_seq = int(db.execute("SELECT seq FROM jobs WHERE id=?", (job_id,)).fetchone()[0])
                overtaken = newest.get(job.rel_path, my_seq) > my_seq
                again = state in GONE_STATES or (state == "done" and (requeue_done or overtaken))
                # Same content at the same path: remember the new signature so rescans
                # recognise the file without reading it again. A new signature is a new
                # drop: it is now the latest at its path (A, B, then A again while A is
                # still pending: B's result must not win), so it takes a fresh seq.
                signature = (job.size, job.mtime_ns, job.ctime_ns, job.inode, job.device)
                cur = db.execute(
                    "UPDATE jobs SET size=?, mtime_ns=?, ctime_ns=?, inode=?, device=?, seq=? WHERE id=? "
                    "AND NOT (size=? AND mtime_ns=? AND ctime_ns=? AND inode=? AND device=?)",
                    (*signature, seq, job_id, *signature),
                )
                if cur.rowcount:
                    newest[job.rel_path] = seq
                    seq += 1
                if again:
                    # Admitted anew: it is now the latest drop at its path (newer than any
                    # job another content got there meanwhile), so it takes a fresh seq.
                    state = admitted()
                    db.execute(
                        "UPDATE jobs SET state=?, attempts=0, next_attempt_at=0, "
                        "first_seen=?, updated_at=?, error=NULL, history='[]', held_as=NULL, seq=?, "
                        "recipe=?, admitted_at=? WHERE id=?",
                        (state, job.first_seen, now, seq, job.recipe, now, job_id),
                    )
                    newest[job.rel_path] = seq
                    seq += 1
                    existing[key] = (job_id, state)
                    results.append((job, "requeued" if state == "queued" else state))
                    if outputs is not None:  # (a row refused locally never claimed one)
                        self._claim_in(db, job.rel_path, *outputs)
                else:
                    results.append((job, state))
        return results

    @staticmethod
    def _admitted_since(db: sqlite3.Connection, now: float, hold: HoldRule) -> int:
        """Files admitted (queued or held) in the hold's window, and since the held ones
        were last approved or discarded (``meta`` ``batch_decided_at``)."""
        row = db.execute("SELECT value FROM meta WHERE key='batch_decided_at'").fetchone()
        since = max(now - hold.window, float(json.loads(row[0])) if row is not None else 0.0)
        found = db.execute("SELECT COUNT(*) FROM jobs WHERE admitted_at > ?", (since,)).fetchone()
        return int(found[0])

    # --- the large-batch hold ----------------------------------------------------------

    def held_folders(self) -> list[tuple[str, int]]:
        """``(folder, count)`` of the held jobs, by top-level inbox folder (``""``: files
        at the inbox's top), largest first."""
        rows = self._conn.execute(
            "SELECT CASE WHEN instr(rel_path, '/') > 0 THEN substr(rel_path, 1, instr(rel_path, '/') - 1) "
            "ELSE '' END AS folder, COUNT(*) FROM jobs WHERE state='held' GROUP BY folder "
            "ORDER BY COUNT(*) DESC, folder"
        ).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    def release_held(self, folder: str | None, *, to: str) -> int:
        """Held jobs under inbox ``folder`` (None: all) become ``to`` (``queued``:
        approved; ``discarded``: never sent, remembered). Either decision starts a new
        batch window (the admin has seen the batch). Returns how many. Raises
        ``ValueError`` for another ``to``."""
        if to not in ("queued", "discarded"):
            raise ValueError(f"release held jobs to {to!r}: expected queued or discarded")
        now = self._clock()
        where, args = "state='held'", []
        if folder:
            prefix = folder.strip("/")
            where += " AND (rel_path = ? OR substr(rel_path, 1, ?) = ?)"
            args = [prefix, len(prefix) + 1, prefix + "/"]
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE jobs SET state=?, next_attempt_at=0, updated_at=? WHERE {where}", (to, now, *args)
            )
            if cur.rowcount:
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('batch_decided_at', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                    (json.dumps(now),),
                )
        return int(cur.rowcount)

    @staticmethod
    def _newest_at(db: sqlite3.Connection, rel_paths: Sequence[str]) -> dict[str, int]:
        """The highest ``seq`` of the jobs at each of these paths that made or will make
        its output (quarantined and cancelled jobs made none)."""
        gone = ",".join(f"'{state}'" for state in GONE_STATES)
        found: dict[str, int] = {}
        for rel_path, seq in _rows_at(db, "rel_path, seq", rel_paths, where=f"state NOT IN ({gone})"):
            found[str(rel_path)] = max(found.get(str(rel_path), 0), int(seq))
        return found

    @staticmethod
    def _jobs_at(db: sqlite3.Connection, rel_paths: Sequence[str]) -> dict[tuple[str, str], tuple[int, str]]:
        """(id, state) of every job at these paths, by (rel_path, sha256)."""
        found: dict[tuple[str, str], tuple[int, str]] = {}
        for job_id, rel_path, sha256, state in _rows_at(db, "id, rel_path, sha256, state", rel_paths):
            found[(rel_path, sha256)] = (int(job_id), str(state))
        return found

    # --- the send loop -------------------------------------------------------------

    def claim(self) -> Job | None:
        """Take the next due job whose content is not already in flight."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE state='queued' AND next_attempt_at <= ? "
                "AND sha256 NOT IN (SELECT sha256 FROM jobs WHERE state='inflight') "
                "ORDER BY next_attempt_at, id LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='inflight', updated_at=? WHERE id=?", (now, row["id"]))
        return _job(row)

    def get(self, job_id: int) -> Job | None:
        row = self._conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def superseded(self, job: Job) -> bool:
        """Is there a newer job for the same path (other content dropped there after this
        job was admitted)? Newer means admitted later (``seq``), not a higher ``id``: a job
        re-admitted for content dropped again keeps its old id."""
        row = self._conn.execute(
            "SELECT 1 FROM jobs AS me JOIN jobs AS other ON other.rel_path = me.rel_path "
            "WHERE me.id=? AND other.seq > me.seq "
            "AND other.state NOT IN ('quarantined', 'cancelled') LIMIT 1",
            (job.id,),
        ).fetchone()
        return row is not None

    def peek(self) -> Job | None:
        """The job :meth:`claim` would take next, ignoring its due time."""
        row = self._conn.execute(
            "SELECT * FROM jobs WHERE state='queued' ORDER BY next_attempt_at, id LIMIT 1"
        ).fetchone()
        return None if row is None else _job(row)

    def published_jobs(self) -> list[Job]:
        """Jobs whose output is durable but whose input was not moved yet."""
        rows = self._conn.execute("SELECT * FROM jobs WHERE state='published'").fetchall()
        return [_job(r) for r in rows]

    def next_due(self) -> float | None:
        row = self._conn.execute("SELECT MIN(next_attempt_at) AS t FROM jobs WHERE state='queued'").fetchone()
        return None if row["t"] is None else float(row["t"])

    def record_attempt(self, job_id: int) -> int:
        """Count one request for this job; returns the attempt number."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET attempts=attempts+1 WHERE id=?", (job_id,))
            row = db.execute("SELECT attempts FROM jobs WHERE id=?", (job_id,)).fetchone()
        return int(row["attempts"])

    def retry_later(
        self, job_id: int, *, at: float, entry: dict[str, Any], count_attempt: bool = True
    ) -> None:
        """Back to the queue until ``at``; ``entry`` is what this attempt got."""
        with self._tx() as db:
            self._append_history(db, job_id, entry)
            db.execute(
                "UPDATE jobs SET state='queued', next_attempt_at=?, updated_at=?, error=?, "
                "attempts = attempts - ? WHERE id=?",
                (at, self._clock(), json.dumps(entry), 0 if count_attempt else 1, job_id),
            )

    def release(self, job_id: int) -> None:
        """Put an in-flight job back untouched (shutdown, pause before sending)."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='queued', updated_at=? WHERE id=? AND state='inflight'",
                (self._clock(), job_id),
            )

    def mark_published(self, job_id: int, output_rel: str, entry: dict[str, Any]) -> None:
        now = self._clock()
        with self._tx() as db:
            self._append_history(db, job_id, entry)
            db.execute(
                "UPDATE jobs SET state='published', output_rel=?, updated_at=?, error=NULL WHERE id=?",
                (output_rel, now, job_id),
            )
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('last_success', ?) "
                "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                (json.dumps(now),),
            )

    def mark_done(self, job_id: int, archived_as: str | None = None) -> None:
        """The job is finished; ``archived_as``: where its input now is in the archive."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='done', held_as=NULL, archived_as=?, updated_at=? WHERE id=?",
                (archived_as, self._clock(), job_id),
            )

    def done_jobs(self) -> list[Job]:
        """Jobs whose outputs were written (a superseded one wrote none), oldest first."""
        rows = self._conn.execute(
            "SELECT * FROM jobs WHERE state='done' AND output_rel IS NOT NULL AND output_rel != '' "
            "ORDER BY seq"
        ).fetchall()
        return [_job(r) for r in rows]

    def set_signature(self, job_id: int, signature: tuple[int, int, int, int, int]) -> None:
        """The job's file was found again with this (size, mtime, ctime, inode, device) and
        the job's own content (touched, saved again with the same bytes)."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET size=?, mtime_ns=?, ctime_ns=?, inode=?, device=? WHERE id=?",
                (*signature, job_id),
            )

    def set_held(self, job_id: int, held_as: str | None) -> None:
        """Record (before the rename) the private name a published job's input is moved to
        while it is checked and disposed of, so a crash in between finds it again."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET held_as=? WHERE id=?", (held_as, job_id))

    def holds(self, held_as: str) -> bool:
        """Does a published job hold an input under this private name (being disposed of)?"""
        row = self._conn.execute(
            "SELECT 1 FROM jobs WHERE held_as=? AND state='published' LIMIT 1", (held_as,)
        ).fetchone()
        return row is not None

    def cancel(self, job_id: int, reason: dict[str, Any]) -> None:
        """The job's file was deleted or replaced before its output was written: no output,
        and no further request (``reason`` is kept as its error)."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='cancelled', updated_at=?, error=? WHERE id=?",
                (self._clock(), json.dumps(reason), job_id),
            )

    def postpone(self, job_id: int, *, at: float) -> None:
        """Back to the queue untouched until ``at`` (no attempt counted, nothing recorded)."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='queued', next_attempt_at=?, updated_at=? WHERE id=?",
                (at, self._clock(), job_id),
            )

    def mark_quarantining(self, job_id: int, error: dict[str, Any], entry: dict[str, Any] | None) -> None:
        """The move to quarantine is about to start (finished by ``finish_pending`` after a
        crash or a failed move); ``entry`` is the attempt that led to it, recorded once."""
        self._set_error_state(job_id, "quarantining", error, entry)

    def quarantining_jobs(self) -> list[Job]:
        rows = self._conn.execute("SELECT * FROM jobs WHERE state='quarantining'").fetchall()
        return [_job(r) for r in rows]

    def mark_quarantined(
        self, job_id: int, error: dict[str, Any], entry: dict[str, Any] | None = None
    ) -> None:
        self._set_error_state(job_id, "quarantined", error, entry)

    def _set_error_state(
        self, job_id: int, state: str, error: dict[str, Any], entry: dict[str, Any] | None
    ) -> None:
        with self._tx() as db:
            if entry is not None:
                self._append_history(db, job_id, entry)
            db.execute(
                "UPDATE jobs SET state=?, updated_at=?, error=? WHERE id=?",
                (state, self._clock(), json.dumps(error), job_id),
            )

    def add_quarantined(self, job: NewJob, error: dict[str, Any], *, state: str = "quarantined") -> None:
        """Record a file refused before it became a job (local validation); ``state`` is
        ``quarantining`` while its move is under way."""
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (rel_path, sha256, size, mtime_ns, ctime_ns, inode, device, format, "
                "state, first_seen, updated_at, error, seq) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (rel_path, sha256) DO UPDATE SET state=excluded.state, "
                "updated_at=excluded.updated_at, error=excluded.error, seq=excluded.seq",
                (
                    job.rel_path,
                    job.sha256,
                    job.size,
                    job.mtime_ns,
                    job.ctime_ns,
                    job.inode,
                    job.device,
                    job.format,
                    state,
                    job.first_seen,
                    now,
                    json.dumps(error),
                    _next_seq(db),
                ),
            )

    def sha_still_needed(self, sha256: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM jobs WHERE sha256=? AND state IN ('queued','inflight','held') LIMIT 1",
            (sha256,),
        ).fetchone()
        return row is not None

    @staticmethod
    def _append_history(db: sqlite3.Connection, job_id: int, entry: dict[str, Any]) -> None:
        row = db.execute("SELECT history FROM jobs WHERE id=?", (job_id,)).fetchone()
        history = json.loads(row["history"]) if row else []
        history.append(entry)
        db.execute("UPDATE jobs SET history=? WHERE id=?", (json.dumps(history), job_id))

    # --- outputs -------------------------------------------------------------------

    def claim_output(self, rel_path: str, candidates: Iterable[str], key: Any) -> str:
        """The output name for ``rel_path``: the one it owns already, else the first
        candidate nobody owns (compared by ``key``, i.e. ignoring case)."""
        return self.claim_outputs(rel_path, ([name] for name in candidates), key)[0]

    def claim_outputs(self, rel_path: str, name_sets: Iterable[Sequence[str]], key: Any) -> list[str]:
        """The output names for ``rel_path`` (one per output of its recipe): the first set
        of candidates whose every name is free or ``rel_path``'s own already (compared by
        ``key``, i.e. ignoring case); the names not yet its own are claimed."""
        with self._tx() as db:
            return self._claim_in(db, rel_path, name_sets, key)

    @staticmethod
    def _claim_in(
        db: sqlite3.Connection,
        rel_path: str,
        name_sets: Callable[[str], Iterable[Sequence[str]]] | Iterable[Sequence[str]],
        key: Any,
    ) -> list[str]:
        for names in name_sets(rel_path) if callable(name_sets) else name_sets:
            if isinstance(names, str):  # (one name, not a set of its characters)
                names = [names]
            owners = [
                db.execute("SELECT rel_path FROM outputs WHERE out_key=?", (key(n),)).fetchone()
                for n in names
            ]
            if any(owner is not None and owner[0] != rel_path for owner in owners):
                continue
            for name, owner in zip(names, owners, strict=True):
                if owner is None:
                    db.execute(
                        "INSERT INTO outputs (out_key, out_rel, rel_path) VALUES (?,?,?)",
                        (key(name), name, rel_path),
                    )
            return list(names)
        raise AssertionError("candidates is endless")

    # --- pacing history, pause state ---------------------------------------------------

    def load_slots(self) -> list[Slot]:
        rows = self._conn.execute("SELECT started, sent FROM slots ORDER BY started").fetchall()
        return [Slot(started=r["started"], sent=r["sent"]) for r in rows]

    def save_slots(self, slots: Iterable[Slot]) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM slots")
            db.executemany(
                "INSERT INTO slots (started, sent) VALUES (?, ?)",
                [(s.started, s.sent) for s in slots],
            )

    def get_meta(self, key: str) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row["value"])

    def set_meta(self, key: str, value: Any) -> None:
        with self._tx() as db:
            if value is None:
                db.execute("DELETE FROM meta WHERE key=?", (key,))
            else:
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                    (key, json.dumps(value)),
                )

    # --- the request log ------------------------------------------------------------------

    def record_request(self, request: RequestRecord) -> None:
        """Log one request to the API (sent, answered or not); requests older than
        :data:`REQUEST_HISTORY_SECONDS` are dropped in the same transaction."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO requests (started, endpoint, status, seconds, sent, received) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    request.started,
                    request.endpoint,
                    request.status,
                    request.seconds,
                    request.sent,
                    request.received,
                ),
            )
            db.execute("DELETE FROM requests WHERE started < ?", (request.started - REQUEST_HISTORY_SECONDS,))

    def requests_since(self, since: float) -> int:
        """How many requests were started at or after ``since`` (wall seconds)."""
        row = self._conn.execute("SELECT COUNT(*) FROM requests WHERE started >= ?", (since,)).fetchone()
        return int(row[0])

    # --- reporting and maintenance -------------------------------------------------------

    def recent(self, states: Sequence[str], *, limit: int, offset: int = 0) -> list[Job]:
        """Jobs in ``states``, the most recently changed first (a page of ``limit``)."""
        marks = ", ".join("?" for _ in states)
        rows = self._conn.execute(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY updated_at DESC, id DESC LIMIT ? OFFSET ?",
            (*states, limit, offset),
        ).fetchall()
        return [_job(r) for r in rows]

    def frames_skipped(self) -> int:
        """How many files (jobs) had frames after the first that were not processed."""
        row = self._conn.execute("SELECT COUNT(*) FROM jobs WHERE frames > 1").fetchone()
        return int(row[0])

    def counts(self) -> dict[str, int]:
        rows = self._conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        result = dict.fromkeys(STATES, 0)
        result.update({r["state"]: r["n"] for r in rows})
        return result

    def quarantined_jobs(self, rel_paths: Iterable[str] | None = None) -> list[Job]:
        if rel_paths is None:
            rows = self._conn.execute("SELECT * FROM jobs WHERE state='quarantined'").fetchall()
            return [_job(r) for r in rows]
        jobs: list[Job] = []
        for rel in rel_paths:
            rows = self._conn.execute(
                "SELECT * FROM jobs WHERE state='quarantined' AND rel_path=?", (rel,)
            ).fetchall()
            jobs.extend(_job(r) for r in rows)
        return jobs

    def job_error(self, job_id: int) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT error FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None or row["error"] is None:
            return None
        value = json.loads(row["error"])
        return value if isinstance(value, dict) else None

    def forget(self, job_id: int) -> dict[str, Any] | None:
        """Delete a job; returns its row, which :meth:`restore` can put back."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        return None if row is None else dict(row)

    def restore(self, row: dict[str, Any]) -> None:
        """Put back a row :meth:`forget` returned (an action that followed it failed)."""
        # The table's own column names (from SELECT *), less the id: the running daemon
        # may have given that id to a new job meanwhile.
        columns = [c for c in row if c != "id"]
        marks = ", ".join("?" for _ in columns)
        with self._tx() as db:
            db.execute(
                f"INSERT OR IGNORE INTO jobs ({', '.join(columns)}) VALUES ({marks})",
                [row[c] for c in columns],
            )

    def integrity_ok(self) -> bool:
        row = self._conn.execute("PRAGMA integrity_check").fetchone()
        return bool(row[0] == "ok")
