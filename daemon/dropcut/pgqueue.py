"""The shared job queue (issue 13): :class:`PgJobQueue`, the :class:`~dropcut.queue.JobQueue`
of a PostgreSQL database (:mod:`dropcut.pgschema`) that several daemons share.

Same methods, arguments, results and meaning as ``JobQueue`` (:class:`Queue` lists them),
with what sharing adds:

**Sites.** A queue object serves one ``site``: every query filters on it, ``meta`` is per
site, and a job is only ever claimed by a daemon of its site (a file is processed by a
machine that can read it). Only the request log is wider: it belongs to the API key
(``key_id``, :func:`dropcut.pgschema.key_id`), so :meth:`PgJobQueue.requests_since` counts
the requests of every daemon on that key, whatever its site (the budgets and the status
need the key's total).

**Once per file.** Several daemons of one site see the same NAS share. A job is unique on
(site, rel_path, sha256); every write that inserts jobs or output names
(:meth:`~PgJobQueue.enqueue_many`, :meth:`~PgJobQueue.add_quarantined`,
:meth:`~PgJobQueue.claim_outputs`, :meth:`~PgJobQueue.restore`, :func:`migrate_sqlite`)
takes a per-site transaction lock first, as SQLite's ``BEGIN IMMEDIATE`` does, and only
then reads what is there: two daemons seeing a file at once queue it once (the second
finds the first's row), admission numbers and the hold's count stay in one order, and no
output name goes to two paths. The inserts say ``ON CONFLICT DO NOTHING`` all the same;
a row skipped by it (a writer that took no lock) rolls the batch back
(:class:`QueueUnavailable`: try again) rather than count a file as queued twice.

**Leases.** :meth:`~PgJobQueue.claim` takes the next due job with ``FOR UPDATE SKIP
LOCKED`` under a per-site claim lock (so that no two daemons ever send the same content
at once, as ``JobQueue`` promises), and sets ``lease_owner`` (this daemon's id) and
``lease_until`` (the database's clock + ``lease_seconds``). A job is leased while a daemon
works on it outside the database: ``inflight``, and ``published`` / ``quarantining`` (the
input is being moved). The daemon renews its leases every ``lease_seconds / 3``
(:meth:`~PgJobQueue.renew_leases`); a lease not renewed expires, and the job is then taken
over by a daemon of the site: an ``inflight`` one goes back to ``queued`` (at the next
claim or renewal of any daemon of the site), a ``published`` or ``quarantining`` one is
taken by the next :meth:`~PgJobQueue.published_jobs` / :meth:`~PgJobQueue.quarantining_jobs`
(``finish_pending``). A write that changes a job's state is ignored when another daemon
holds the job (``lease_owner`` neither NULL nor ours): a daemon cut off for longer than its
lease does not undo the work of the one that took over.

**Daemon ids.** The id is stable: :func:`daemon_id` of the host, the machine id and the
state folder, which the daemon's lock file makes unique on a host. A restarted daemon
therefore takes back its own ``inflight`` jobs at :meth:`~PgJobQueue.recover` at once (they
were interrupted by its crash), instead of leaving them to wait for their leases to
expire; the ones of other daemons are only taken when their lease expired.

**Time.** Job times (``next_attempt_at``, ``updated_at``…) are the caller's ``clock``, as
in ``JobQueue`` (the daemon passes its own, and the ``at`` it gives is of that clock);
leases are compared on the database server's clock, the one clock that every daemon sees.

**The database going away** (restart, network cut): every call raises
:class:`QueueUnavailable` (one line, the URL without its password) instead of a psycopg
error; nothing half-done is committed (each call is one short transaction). A lost
connection is replaced in a background thread with backoff (0.5 s, doubling, at most
``reconnect_max_seconds``); until then calls fail at once, without blocking the event loop
on a connection attempt. A connection idle for a while is checked before use, and one that
died meanwhile (the server restarted) is replaced on the spot.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from dropcut.pace import Slot
from dropcut.pgschema import conninfo, display_url, key_id, migrate, read_password
from dropcut.queue import (
    GONE_STATES,
    REQUEST_HISTORY_SECONDS,
    STATES,
    HoldRule,
    Job,
    JobQueue,
    NewJob,
    OutputRule,
    RequestRecord,
    Signature,
)

Connection = psycopg.Connection[Any]

ADMIT_LOCK = 0x64630001  # pg_advisory_xact_lock(ADMIT_LOCK, hashtext(site)): admission, names
CLAIM_LOCK = 0x64630002  # ... (CLAIM_LOCK, hashtext(site)): claims
SIGNATURE_COLUMNS = ("size", "mtime_ns", "ctime_ns", "inode", "device")
LEASED_STATES = ("inflight", "published", "quarantining")  # a daemon works on it outside the db
NOW = "extract(epoch from clock_timestamp())::float8"  # the database server's clock
MINE = "(lease_owner IS NULL OR lease_owner = %(me)s)"  # no other daemon holds the job
UNLEASED = "lease_owner = NULL, lease_until = NULL"
LEASED = f"lease_owner = %(me)s, lease_until = {NOW} + %(lease)s"
PING_IDLE_SECONDS = 2.0  # a connection idle this long is checked before it is used
RECONNECT_FIRST_SECONDS = 0.5
SESSION_SETTINGS = (
    # a call waits this long at most for a lock held by another daemon's transaction
    "SET lock_timeout = '10s'",
    # a daemon stopped in the middle of a transaction (SIGSTOP) does not hold it for ever
    "SET idle_in_transaction_session_timeout = '60s'",
)
#: Meta keys each daemon writes for itself (its conditions, the rate it paces by, its local
#: pause: disk full, outbox unwritable): stored as ``<key>/<daemon id>`` so that two daemons
#: of one site do not overwrite each other. Every other key is the site's.
DAEMON_META = frozenset({"conditions", "rate", "paused"})
NEW_JOB = (  # (enqueue_many: every insert takes the admission lock, see there)
    "INSERT INTO jobs (site, rel_path, sha256, size, mtime_ns, ctime_ns, inode, device, format, state, "
    "first_seen, updated_at, seq, frames, recipe, admitted_at) VALUES (%(site)s, %(rel_path)s, "
    "%(sha256)s, %(size)s, %(mtime_ns)s, %(ctime_ns)s, %(inode)s, %(device)s, %(format)s, %(state)s, "
    "%(first_seen)s, %(now)s, %(seq)s, %(frames)s, %(recipe)s, %(now)s) "
    "ON CONFLICT (site, rel_path, sha256) DO NOTHING"
)
NEW_SIGNATURE = (
    "UPDATE jobs SET size=%(size)s, mtime_ns=%(mtime_ns)s, ctime_ns=%(ctime_ns)s, inode=%(inode)s, "
    "device=%(device)s, seq=%(seq)s WHERE site=%(site)s AND rel_path=%(rel_path)s AND sha256=%(sha256)s"
)
TCP_USER_TIMEOUT_MS = 10_000  # a query on a connection whose peer vanished fails after this


class QueueUnavailable(Exception):
    """The shared queue's database cannot be used now (server down or restarting, network
    cut, connection lost, a lock not granted in time). A condition like the API being
    unreachable: the call did nothing; try again later. The message is one line and holds
    no password."""


def _pace_unavailable() -> type[Exception]:
    from dropcut import pgpace

    return pgpace.QueueUnavailable


#: What the shared database's being away raises: the queue's (and the result cache's)
#: :class:`QueueUnavailable`, and the shared pacer's (:mod:`dropcut.pgpace`).
UNAVAILABLE: tuple[type[Exception], ...] = tuple({QueueUnavailable, _pace_unavailable()})
#: ... and what the SQLite queue raises when its database cannot be read.
DB_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, *UNAVAILABLE)


class QueueHealth:
    """Is the shared queue's database usable? One small object that the daemon hands to
    its queue (which reports every call: :meth:`failed` when one raised
    :class:`QueueUnavailable`, :meth:`ok` when one succeeded) and to the stages that catch
    the failures of other parts (the shared pacer); the daemon shows the condition
    ``queue_unavailable`` while :attr:`since` is set."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.since: float | None = None  # wall seconds of the first failure of this outage
        self.detail = ""  # the last failure, in one line (no password)
        self.outages = 0  # how many began so far

    def failed(self, exc: BaseException) -> None:
        if self.since is None:
            self.since = self._clock()
            self.outages += 1
        self.detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    def ok(self) -> None:
        self.since = None
        self.detail = ""

    @property
    def down(self) -> bool:
        return self.since is not None


class AlreadyMigrated(Exception):
    """:func:`migrate_sqlite` was run before for this SQLite queue."""


class Queue(Protocol):
    """What the daemon, the command line and the status page use of a queue: implemented
    by :class:`~dropcut.queue.JobQueue` (SQLite) and :class:`PgJobQueue` (shared)."""

    def close(self) -> None: ...
    def recover(self) -> tuple[int, list[Job]]: ...
    def known_signature(
        self, rel_path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int
    ) -> str | None: ...
    def known_signatures(self, files: Sequence[Signature]) -> dict[Signature, str | None]: ...
    def enqueue_many(
        self,
        jobs: Iterable[NewJob],
        *,
        requeue_done: bool,
        outputs: OutputRule | None = None,
        hold: HoldRule | None = None,
    ) -> list[tuple[NewJob, str]]: ...
    def held_folders(self) -> list[tuple[str, int]]: ...
    def release_held(self, folder: str | None, *, to: str) -> int: ...
    def claim(self) -> Job | None: ...
    def get(self, job_id: int) -> Job | None: ...
    def superseded(self, job: Job) -> bool: ...
    def peek(self) -> Job | None: ...
    def published_jobs(self) -> list[Job]: ...
    def next_due(self) -> float | None: ...
    def record_attempt(self, job_id: int) -> int: ...
    def retry_later(
        self, job_id: int, *, at: float, entry: dict[str, Any], count_attempt: bool = True
    ) -> None: ...
    def release(self, job_id: int) -> None: ...
    def mark_published(self, job_id: int, output_rel: str, entry: dict[str, Any]) -> None: ...
    def mark_done(self, job_id: int, archived_as: str | None = None) -> None: ...
    def done_jobs(self) -> list[Job]: ...
    def set_signature(self, job_id: int, signature: tuple[int, int, int, int, int]) -> None: ...
    def set_held(self, job_id: int, held_as: str | None) -> None: ...
    def holds(self, held_as: str) -> bool: ...
    def cancel(self, job_id: int, reason: dict[str, Any]) -> None: ...
    def postpone(self, job_id: int, *, at: float) -> None: ...
    def mark_quarantining(self, job_id: int, error: dict[str, Any], entry: dict[str, Any] | None) -> None: ...
    def quarantining_jobs(self) -> list[Job]: ...
    def mark_quarantined(
        self, job_id: int, error: dict[str, Any], entry: dict[str, Any] | None = None
    ) -> None: ...
    def add_quarantined(self, job: NewJob, error: dict[str, Any], *, state: str = "quarantined") -> None: ...
    def sha_still_needed(self, sha256: str) -> bool: ...
    def claim_output(self, rel_path: str, candidates: Iterable[str], key: Any) -> str: ...
    def claim_outputs(self, rel_path: str, name_sets: Iterable[Sequence[str]], key: Any) -> list[str]: ...
    def load_slots(self) -> list[Slot]: ...
    def save_slots(self, slots: Iterable[Slot]) -> None: ...
    def get_meta(self, key: str) -> Any: ...
    def set_meta(self, key: str, value: Any) -> None: ...
    def record_request(self, request: RequestRecord) -> None: ...
    def requests_since(self, since: float) -> int: ...
    def recent(self, states: Sequence[str], *, limit: int, offset: int = 0) -> list[Job]: ...
    def frames_skipped(self) -> int: ...
    def counts(self) -> dict[str, int]: ...
    def quarantined_jobs(self, rel_paths: Iterable[str] | None = None) -> list[Job]: ...
    def job_error(self, job_id: int) -> dict[str, Any] | None: ...
    def forget(self, job_id: int) -> dict[str, Any] | None: ...
    def restore(self, row: dict[str, Any]) -> None: ...


if TYPE_CHECKING:  # (and mypy checks that both queues are a Queue)
    from dropcut.settings import Settings

    def _both_are_queues(sqlite_queue: JobQueue, shared: PgJobQueue) -> tuple[Queue, Queue]:
        return sqlite_queue, shared


def daemon_id(state_dir: Path, host: str | None = None) -> str:
    """A daemon's stable id: ``<host>/<12 hex digits>`` of the machine id (when there is
    one), the host name and the absolute state folder. Only one daemon runs per state
    folder (its lock file), so this names one daemon, and the same one after a restart."""
    host = host or socket.gethostname() or "localhost"
    machine = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            machine = Path(path).read_text(encoding="ascii").strip()
            break
    digest = hashlib.sha256(f"{machine}\0{host}\0{os.path.abspath(state_dir)}".encode()).hexdigest()
    return f"{host}/{digest[:12]}"


def open_shared(
    settings: Settings, *, api_key: str, clock: Callable[[], float] = time.time, role: str = ""
) -> PgJobQueue:
    """The shared queue of ``settings`` (``queue_url`` set; the password from
    ``queue_password_file`` or the systemd credential), for the daemon of its state folder
    (``role`` ""), or for another process beside it (``role`` ``"cli"``, ``"web"``: an id of
    its own, which never holds the daemon's leases, but reads and writes the daemon's own
    meta, :data:`DAEMON_META`). Connects at the first call."""
    if not settings.queue_url:
        raise ValueError("queue_url is not set: the queue is the SQLite one under state_dir")
    own = daemon_id(settings.state_dir)
    return PgJobQueue(
        settings.queue_url,
        password=read_password(settings.queue_password_file),
        site=settings.site,
        daemon_id=f"{own}/{role}" if role else own,
        key_id=key_id(api_key),
        lease_seconds=settings.lease_seconds,
        clock=clock,
        meta_owner=own,
    )


def _job(row: dict[str, Any]) -> Job:
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
        history=list(row["history"]),
        ctime_ns=row["ctime_ns"],
        held_as=row["held_as"],
        recipe=row["recipe"],
        archived_as=row["archived_as"],
        updated_at=row["updated_at"],
    )


def _reason(exc: BaseException) -> str:
    """The first line of a psycopg error (libpq's messages hold no password)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class PgJobQueue:
    """The job queue of one ``site`` in a shared PostgreSQL database (see the module's
    text). ``url``: the ``queue_url`` (a password in it is ignored); ``password``: from
    :func:`dropcut.pgschema.read_password`; ``daemon_id``: :func:`daemon_id`; ``key_id``:
    :func:`dropcut.pgschema.key_id` of the API key; ``clock``: the wall clock of job times.

    Nothing is connected until the first call, which connects (and creates or migrates the
    schema) synchronously; :class:`QueueUnavailable` if it cannot. Safe to call from
    several threads (one connection, one call at a time)."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None,
        site: str,
        daemon_id: str,
        key_id: str,
        lease_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        reconnect_max_seconds: float = 30.0,
        meta_owner: str | None = None,
        health: QueueHealth | None = None,
    ) -> None:
        self.site = site
        self.daemon_id = daemon_id
        self.meta_owner = meta_owner or daemon_id  # whose DAEMON_META keys it reads and writes
        self.health = health  # told of every call's success or failure
        self.key_id = key_id
        self.lease_seconds = lease_seconds
        self.display_url = display_url(url)
        self._clock = clock
        self._conninfo = make_conninfo(
            conninfo(url, password, application=f"dropcut {site}"), tcp_user_timeout=TCP_USER_TIMEOUT_MS
        )
        self._reconnect_max = reconnect_max_seconds
        self._mutex = threading.RLock()
        self._conn: Connection | None = None
        self._used_at = 0.0  # monotonic seconds of the connection's last use
        self._problem: str | None = None  # why there is no connection (None: never tried)
        self._reconnecting: threading.Thread | None = None
        self._closed = threading.Event()
        self._migrated = False

    # --- the connection ----------------------------------------------------------------

    @property
    def conninfo(self) -> str:
        """The libpq connection string (with the password: never log it), for another
        connection to the same database (the shared pacer's)."""
        return self._conninfo

    def close(self) -> None:
        self._closed.set()
        with self._mutex:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connect(self) -> Connection:
        """A new connection, configured, the schema migrated (once per queue object)."""
        conn = psycopg.connect(self._conninfo, autocommit=True)
        try:
            for setting in SESSION_SETTINGS:
                conn.execute(setting)
            if not self._migrated:
                migrate(conn)
                self._migrated = True
        except BaseException:
            conn.close()
            raise
        return conn

    def _unavailable(self, reason: str) -> QueueUnavailable:
        return QueueUnavailable(f"queue database {self.display_url} unavailable: {reason}")

    def _lost(self, reason: str) -> QueueUnavailable:
        """The connection failed: drop it, reconnect in the background, and say why."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
        self._problem = reason
        if self._reconnecting is None or not self._reconnecting.is_alive():
            self._reconnecting = threading.Thread(
                target=self._reconnect, name="dropcut-queue-reconnect", daemon=True
            )
            self._reconnecting.start()
        return self._unavailable(reason)

    def _reconnect(self) -> None:
        delay = RECONNECT_FIRST_SECONDS
        while not self._closed.wait(delay):
            try:
                conn = self._connect()
            except psycopg.Error as exc:
                self._problem = _reason(exc)
                delay = min(delay * 2, self._reconnect_max)
                continue
            with self._mutex:
                if self._closed.is_set() or self._conn is not None:
                    conn.close()
                else:
                    self._conn, self._used_at = conn, time.monotonic()
            return

    def _connection(self) -> Connection:
        """The live connection (call with ``_mutex`` held), connecting on the first call;
        :class:`QueueUnavailable` while it is being replaced."""
        if self._closed.is_set():
            raise self._unavailable("the queue was closed")
        if self._conn is None and self._problem is None:  # the first call: connect here
            try:
                self._conn = self._connect()
            except psycopg.OperationalError as exc:
                raise self._lost(_reason(exc)) from None
        elif self._conn is not None and time.monotonic() - self._used_at > PING_IDLE_SECONDS:
            try:
                self._conn.execute("")
            except psycopg.Error:  # died while idle (a server restart): replace it now, once
                self._conn.close()
                try:
                    self._conn = self._connect()
                except psycopg.OperationalError as exc:
                    self._conn = None
                    raise self._lost(_reason(exc)) from None
        if self._conn is None:
            raise self._unavailable(self._problem or "not connected")
        return self._conn

    @contextmanager
    def _use(self, *, tx: bool) -> Iterator[Connection]:
        """The connection for one call: in one transaction (``tx``) or in autocommit (a
        single read). A connection failure becomes :class:`QueueUnavailable`."""
        with self._mutex:
            try:
                conn = self._connection()
            except QueueUnavailable as exc:
                self._report(exc)
                raise
            try:
                if tx:
                    with conn.transaction():
                        yield conn
                else:
                    yield conn
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if conn.broken or conn.closed:
                    raise self._report(self._lost(_reason(exc))) from None
                # a lock or statement time-out
                raise self._report(self._unavailable(_reason(exc))) from None
            else:
                if self.health is not None:
                    self.health.ok()
            finally:
                self._used_at = time.monotonic()

    def _report(self, exc: QueueUnavailable) -> QueueUnavailable:
        """Tell :attr:`health` that a call failed; returns ``exc``."""
        if self.health is not None:
            self.health.failed(exc)
        return exc

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction on the queue's connection (for :mod:`dropcut.pgcache` and
        :func:`migrate_sqlite`), with the queue's :class:`QueueUnavailable`."""
        with self._use(tx=True) as db:
            yield db

    def _args(self, **values: Any) -> dict[str, Any]:
        return {"site": self.site, "me": self.daemon_id, "lease": self.lease_seconds, **values}

    @staticmethod
    def _rows(db: Connection, sql: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        with db.cursor(row_factory=dict_row) as cur:
            cur.execute(sql.encode(), args)
            return cur.fetchall()

    def _read(self, sql: str, **values: Any) -> list[dict[str, Any]]:
        with self._use(tx=False) as db:
            return self._rows(db, sql, self._args(**values))

    def _rows_tx(self, sql: str, **values: Any) -> list[dict[str, Any]]:
        with self._use(tx=True) as db:
            return self._rows(db, sql, self._args(**values))

    def _write(self, sql: str, **values: Any) -> int:
        """One statement in its own transaction; returns the rows it changed."""
        with self._use(tx=True) as db:
            return db.execute(sql.encode(), self._args(**values)).rowcount

    def _lock(self, db: Connection, lock: int) -> None:
        db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (lock, self.site))

    # --- start-up and leases ---------------------------------------------------------

    def recover(self) -> tuple[int, list[Job]]:
        """Requeue the site's ``inflight`` jobs that nobody holds any more (this daemon's
        own from before its restart, and those whose lease expired); return their count and
        the published jobs whose input move was not finished, taken by this daemon (see
        :meth:`published_jobs`).

        A due time that lies in the future by more than the delay it was set with (the
        wall clock was stepped back while dropcut was down) is brought back to now plus
        that delay: a step of the clock never stalls the queue."""
        now = self._clock()
        with self._use(tx=True) as db:
            requeued = db.execute(
                f"UPDATE jobs SET state='queued', updated_at=%(now)s, {UNLEASED} "
                f"WHERE site=%(site)s AND state='inflight' "
                f"AND (lease_owner IS NULL OR lease_owner=%(me)s OR lease_until < {NOW})".encode(),
                self._args(now=now),
            ).rowcount
            db.execute(
                "UPDATE jobs SET next_attempt_at = %(now)s + GREATEST(0, next_attempt_at - updated_at), "
                "updated_at=%(now)s WHERE site=%(site)s AND state='queued' "
                "AND next_attempt_at > %(now)s + GREATEST(0, next_attempt_at - updated_at)",
                self._args(now=now),
            )
        return requeued, self.published_jobs()

    def renew_leases(self, holding: Iterable[int] | None = None) -> int:
        """Extend this daemon's leases by ``lease_seconds`` (call it every third of that),
        and put back in the queue the ``inflight`` jobs whose lease expired (their daemon
        is gone). Returns how many were put back: wake the dispatcher when there are some.

        ``holding``: the ids of the jobs the daemon is working on now; its other
        ``inflight`` jobs (a release that failed while the database was away) go back to
        the queue at once. None: renew every lease of this daemon."""
        now = self._clock()
        held = None if holding is None else list(holding)
        with self._use(tx=True) as db:
            db.execute(
                f"UPDATE jobs SET lease_until = {NOW} + %(lease)s WHERE site=%(site)s "
                "AND lease_owner=%(me)s AND state = ANY(%(leased)s) "
                "AND (state <> 'inflight' OR %(held)s::bigint[] IS NULL "
                "OR id = ANY(%(held)s::bigint[]))".encode(),
                self._args(leased=list(LEASED_STATES), held=held),
            )
            orphans = 0
            if held is not None:
                orphans = db.execute(
                    f"UPDATE jobs SET state='queued', updated_at=%(now)s, {UNLEASED} WHERE site=%(site)s "
                    "AND state='inflight' AND lease_owner=%(me)s "
                    "AND NOT id = ANY(%(held)s::bigint[])".encode(),
                    self._args(now=now, held=held),
                ).rowcount
            return orphans + self._expire(db, now)

    def holds_lease(self, job_id: int) -> bool:
        """Does this daemon still hold the job (its lease not expired)? Worth asking before
        an act on the file system that another daemon would repeat (publishing, moving the
        input) after a long cut from the database."""
        return bool(
            self._read(
                f"SELECT 1 FROM jobs WHERE id=%(id)s AND site=%(site)s AND lease_owner=%(me)s "
                f"AND lease_until >= {NOW}",
                id=job_id,
            )
        )

    def abandoned(self) -> int:
        """How many of the site's ``published`` and ``quarantining`` jobs (an input to move
        away) no living daemon holds: their daemon died, or stopped, with the move undone.
        Worth :meth:`published_jobs` / :meth:`quarantining_jobs` (``finish_pending``)."""
        rows = self._read(
            "SELECT COUNT(*) AS n FROM jobs WHERE site=%(site)s AND state IN ('published', 'quarantining') "
            f"AND (lease_owner IS NULL OR (lease_owner <> %(me)s AND lease_until < {NOW}))"
        )
        return int(rows[0]["n"])

    def _expire(self, db: Connection, now: float) -> int:
        """Requeue the site's ``inflight`` jobs whose lease expired, other daemons' only
        (this one renews its own while it works on them)."""
        return db.execute(
            f"UPDATE jobs SET state='queued', updated_at=%(now)s, {UNLEASED} "
            f"WHERE site=%(site)s AND state='inflight' AND lease_owner IS DISTINCT FROM %(me)s "
            f"AND (lease_until IS NULL OR lease_until < {NOW})".encode(),
            self._args(now=now),
        ).rowcount

    def _take(self, state: str) -> list[Job]:
        """The site's jobs in ``state`` that no other living daemon holds, leased to this
        one."""
        rows = self._rows_tx(
            f"UPDATE jobs SET {LEASED} WHERE id IN (SELECT id FROM jobs WHERE site=%(site)s "
            f"AND state=%(state)s AND (lease_owner IS NULL OR lease_owner=%(me)s OR lease_until < {NOW}) "
            "FOR UPDATE SKIP LOCKED) RETURNING *",
            state=state,
        )
        return [_job(r) for r in sorted(rows, key=lambda r: int(r["id"]))]

    # --- admission ---------------------------------------------------------------

    def known_signature(
        self, rel_path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int
    ) -> str | None:
        """State of the newest job for this path with this signature, if any: a file seen
        again unchanged is not read again. Quarantined and cancelled jobs do not count: a
        file back in the inbox with their signature was put back to be tried again."""
        signature = (rel_path, size, mtime_ns, ctime_ns, inode)
        return self.known_signatures([signature])[signature]

    def known_signatures(self, files: Sequence[Signature]) -> dict[Signature, str | None]:
        """:meth:`known_signature` for many :data:`Signature` s at once (one query)."""
        found: dict[Signature, tuple[tuple[int, int], str]] = {}
        rows = self._read(
            "SELECT seq, id, rel_path, size, mtime_ns, ctime_ns, inode, state FROM jobs "
            "WHERE site=%(site)s AND rel_path = ANY(%(paths)s) AND state <> ALL(%(gone)s)",
            paths=list({f[0] for f in files}),
            gone=list(GONE_STATES),
        )
        for r in rows:
            key = (r["rel_path"], r["size"], r["mtime_ns"], r["ctime_ns"], r["inode"])
            best = found.get(key)
            if best is None or (r["seq"], r["id"]) > best[0]:
                found[key] = ((r["seq"], r["id"]), str(r["state"]))
        return {f: (found[f][1] if f in found else None) for f in files}

    def enqueue_many(
        self,
        jobs: Iterable[NewJob],
        *,
        requeue_done: bool,
        outputs: OutputRule | None = None,
        hold: HoldRule | None = None,
    ) -> list[tuple[NewJob, str]]:
        """As :meth:`dropcut.queue.JobQueue.enqueue_many`: add admitted files; returns each
        with ``queued``, ``requeued``, ``held`` or the state of the existing job (a
        duplicate: nothing added).

        Under the site's admission lock, taken before the jobs at these paths are read:
        another daemon of the site admitting the same file at once waits, then finds this
        one's job (and the admission numbers, the hold's count and the output names stay
        in one order). Every insert into ``jobs`` takes that lock, so ``ON CONFLICT DO
        NOTHING`` never has to skip a row here; should one be skipped all the same, the
        batch is rolled back (:class:`QueueUnavailable`: try again).

        One transaction, pipelined: the new rows and names are inserted at the end, in one
        go (a round trip for the batch, plus one for each set of output names that was not
        looked up with the others)."""
        now = self._clock()
        todo = list(jobs)
        results: list[tuple[NewJob, str]] = []
        with self._use(tx=True) as db:
            self._lock(db, ADMIT_LOCK)
            seq = self._next_seq(db)
            paths = [job.rel_path for job in todo]
            existing = self._jobs_at(db, paths)
            newest = self._newest_at(db, paths)
            recent = self._admitted_since(db, now, hold) if hold is not None and hold.threshold else None
            owners: dict[str, str | None] = {}
            if outputs is not None:  # the first choice of every path, in one query
                first = [next(iter(outputs[0](rel)), []) for rel in paths]
                names = [n for ns in first for n in ([ns] if isinstance(ns, str) else ns)]
                owners = self._owners(db, [outputs[1](n) for n in names])

            def admitted() -> str:
                nonlocal recent
                if recent is None or hold is None:
                    return "queued"
                recent += 1
                return "held" if recent > hold.threshold else "queued"

            added: dict[tuple[str, str], dict[str, Any]] = {}  # new rows: inserted at the end
            claimed: list[tuple[str, str, str]] = []  # new output names, likewise
            with db.pipeline():
                for job in todo:
                    key = (job.rel_path, job.sha256)
                    signature = (job.size, job.mtime_ns, job.ctime_ns, job.inode, job.device)
                    args = self._args(**vars(job), now=now)
                    row = existing.get(key)
                    if row is None:
                        state = admitted()
                        existing[key] = added[key] = {
                            **args,
                            "state": state,
                            "seq": seq,
                            "signature": signature,
                        }
                        newest[job.rel_path] = seq
                        seq += 1
                        results.append((job, state))
                        if outputs is not None:
                            self._claim_in(db, job.rel_path, *outputs, owners=owners, claimed=claimed)
                        continue
                    overtaken = newest.get(job.rel_path, row["seq"]) > row["seq"]
                    again = row["state"] in GONE_STATES or (
                        row["state"] == "done" and (requeue_done or overtaken)
                    )
                    if signature != row["signature"]:
                        # Same content at the same path, a new signature: remember it so
                        # rescans recognise the file without reading it again. A new drop:
                        # now the latest at its path, so it takes a fresh seq.
                        if key in added:  # (the same file twice in the batch)
                            row.update({c: args[c] for c in SIGNATURE_COLUMNS})
                        else:
                            db.execute(NEW_SIGNATURE, {**args, "seq": seq})
                        row.update(signature=signature, seq=seq)
                        newest[job.rel_path] = seq
                        seq += 1
                    if not again:
                        results.append((job, row["state"]))
                        continue
                    # Admitted anew: the latest drop at its path, with a fresh seq.
                    state = admitted()
                    db.execute(
                        "UPDATE jobs SET state=%(state)s, attempts=0, next_attempt_at=0, "
                        "first_seen=%(first_seen)s, updated_at=%(now)s, error=NULL, history='[]', "
                        f"held_as=NULL, seq=%(seq)s, recipe=%(recipe)s, admitted_at=%(now)s, {UNLEASED} "
                        "WHERE site=%(site)s AND rel_path=%(rel_path)s AND sha256=%(sha256)s".encode(),
                        {**args, "state": state, "seq": seq},
                    )
                    row.update(state=state, seq=seq)
                    newest[job.rel_path] = seq
                    seq += 1
                    results.append((job, "requeued" if state == "queued" else state))
                    if outputs is not None:  # (a row refused locally never claimed one)
                        self._claim_in(db, job.rel_path, *outputs, owners=owners, claimed=claimed)
            with db.cursor() as cur:
                cur.executemany(NEW_JOB, list(added.values()))
                if added and cur.rowcount != len(added):
                    raise self._unavailable("a file of the batch was queued meanwhile by another writer")
            self._add_outputs(db, claimed)
        return results

    def _next_seq(self, db: Connection) -> int:
        """An admission number above every job's of the site (under the admission lock)."""
        row = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs WHERE site=%s", (self.site,)).fetchone()
        assert row is not None
        return int(row[0])

    def _jobs_at(self, db: Connection, rel_paths: Sequence[str]) -> dict[tuple[str, str], dict[str, Any]]:
        """State, seq and signature of every job of the site at these paths, by
        (rel_path, sha256)."""
        rows = self._rows(
            db,
            "SELECT rel_path, sha256, state, seq, size, mtime_ns, ctime_ns, inode, device FROM jobs "
            "WHERE site=%(site)s AND rel_path = ANY(%(paths)s)",
            self._args(paths=list(set(rel_paths))),
        )
        return {
            (r["rel_path"], r["sha256"]): {
                "state": str(r["state"]),
                "seq": int(r["seq"]),
                "signature": (r["size"], r["mtime_ns"], r["ctime_ns"], r["inode"], r["device"]),
            }
            for r in rows
        }

    def _newest_at(self, db: Connection, rel_paths: Sequence[str]) -> dict[str, int]:
        """The highest ``seq`` at each of these paths among the jobs that made or will make
        an output (quarantined and cancelled ones made none)."""
        rows = db.execute(
            "SELECT rel_path, MAX(seq) FROM jobs WHERE site=%(site)s AND rel_path = ANY(%(paths)s) "
            "AND state <> ALL(%(gone)s) GROUP BY rel_path",
            self._args(paths=list(set(rel_paths)), gone=list(GONE_STATES)),
        ).fetchall()
        return {str(path): int(seq) for path, seq in rows}

    def _admitted_since(self, db: Connection, now: float, hold: HoldRule) -> int:
        """Files of the site admitted (queued or held) in the hold's window, and since the
        held ones were last approved or discarded (``meta`` ``batch_decided_at``)."""
        decided = self._get_meta_in(db, "batch_decided_at")
        since = max(now - hold.window, float(decided) if decided is not None else 0.0)
        row = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE site=%s AND admitted_at > %s", (self.site, since)
        ).fetchone()
        assert row is not None
        return int(row[0])

    # --- the large-batch hold ----------------------------------------------------------

    def held_folders(self) -> list[tuple[str, int]]:
        """``(folder, count)`` of the held jobs, by top-level inbox folder (``""``: files
        at the inbox's top), largest first."""
        rows = self._read(
            "SELECT folder, COUNT(*) AS n FROM (SELECT CASE WHEN strpos(rel_path, '/') > 0 "
            "THEN split_part(rel_path, '/', 1) ELSE '' END AS folder FROM jobs "
            "WHERE site=%(site)s AND state='held') AS held "
            'GROUP BY folder ORDER BY n DESC, folder COLLATE "C"'
        )
        return [(str(r["folder"]), int(r["n"])) for r in rows]

    def release_held(self, folder: str | None, *, to: str) -> int:
        """Held jobs under inbox ``folder`` (None: all) become ``to`` (``queued``:
        approved; ``discarded``: never sent, remembered). Either decision starts a new
        batch window. Returns how many. Raises ``ValueError`` for another ``to``."""
        if to not in ("queued", "discarded"):
            raise ValueError(f"release held jobs to {to!r}: expected queued or discarded")
        now = self._clock()
        prefix = folder.strip("/") if folder else None
        with self._use(tx=True) as db:
            released = db.execute(
                "UPDATE jobs SET state=%(to)s, next_attempt_at=0, updated_at=%(now)s "
                "WHERE site=%(site)s AND state='held' AND (%(prefix)s::text IS NULL "
                "OR rel_path = %(prefix)s OR starts_with(rel_path, %(prefix)s || '/'))",
                self._args(to=to, now=now, prefix=prefix),
            ).rowcount
            if released:
                self._set_meta_in(db, "batch_decided_at", now)
        return released

    # --- the send loop -------------------------------------------------------------

    def claim(self) -> Job | None:
        """Take the next due job of the site whose content is not already in flight at
        any daemon of the site, and lease it to this daemon. Jobs whose lease expired go
        back to the queue first (their daemon is gone)."""
        now = self._clock()
        with self._use(tx=True) as db:
            self._lock(db, CLAIM_LOCK)
            self._expire(db, now)
            found = self._rows(
                db,
                "SELECT * FROM jobs WHERE site=%(site)s AND state='queued' AND next_attempt_at <= %(now)s "
                "AND sha256 NOT IN (SELECT sha256 FROM jobs WHERE site=%(site)s AND state='inflight') "
                "ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
                self._args(now=now),
            )
            if not found:
                return None
            db.execute(
                f"UPDATE jobs SET state='inflight', updated_at=%(now)s, {LEASED} WHERE id=%(id)s".encode(),
                self._args(now=now, id=found[0]["id"]),
            )
        return _job(found[0])

    def get(self, job_id: int) -> Job | None:
        rows = self._read("SELECT * FROM jobs WHERE id=%(id)s AND site=%(site)s", id=job_id)
        return _job(rows[0]) if rows else None

    def superseded(self, job: Job) -> bool:
        """Is there a newer job for the same path (admitted later: a higher ``seq``)?"""
        return bool(
            self._read(
                "SELECT 1 FROM jobs AS me JOIN jobs AS other "
                "ON other.site = me.site AND other.rel_path = me.rel_path "
                "WHERE me.id=%(id)s AND me.site=%(site)s AND other.seq > me.seq "
                "AND other.state <> ALL(%(gone)s) LIMIT 1",
                id=job.id,
                gone=list(GONE_STATES),
            )
        )

    def peek(self) -> Job | None:
        """The job :meth:`claim` would take next, ignoring its due time."""
        rows = self._read(
            "SELECT * FROM jobs WHERE site=%(site)s AND state='queued' ORDER BY next_attempt_at, id LIMIT 1"
        )
        return _job(rows[0]) if rows else None

    def published_jobs(self) -> list[Job]:
        """Jobs whose output is durable but whose input was not moved yet, that no other
        living daemon is moving: they are leased to this one, which moves them."""
        return self._take("published")

    def next_due(self) -> float | None:
        rows = self._read("SELECT MIN(next_attempt_at) AS t FROM jobs WHERE site=%(site)s AND state='queued'")
        return None if rows[0]["t"] is None else float(rows[0]["t"])

    def record_attempt(self, job_id: int) -> int:
        """Count one request for this job; returns the attempt number."""
        with self._use(tx=True) as db:
            db.execute(
                f"UPDATE jobs SET attempts=attempts+1 WHERE id=%(id)s AND site=%(site)s AND {MINE}".encode(),
                self._args(id=job_id),
            )
            row = db.execute("SELECT attempts FROM jobs WHERE id=%s", (job_id,)).fetchone()
        return int(row[0]) if row is not None else 0

    def retry_later(
        self, job_id: int, *, at: float, entry: dict[str, Any], count_attempt: bool = True
    ) -> None:
        """Back to the queue until ``at``; ``entry`` is what this attempt got."""
        self._write(
            "UPDATE jobs SET state='queued', next_attempt_at=%(at)s, updated_at=%(now)s, error=%(entry)s, "
            f"history = history || %(entries)s, attempts = attempts - %(uncount)s, {UNLEASED} "
            f"WHERE id=%(id)s AND site=%(site)s AND {MINE}",
            id=job_id,
            at=at,
            now=self._clock(),
            entry=Jsonb(entry),
            entries=Jsonb([entry]),
            uncount=0 if count_attempt else 1,
        )

    def release(self, job_id: int) -> None:
        """Put an in-flight job back untouched (shutdown, pause before sending)."""
        self._write(
            f"UPDATE jobs SET state='queued', updated_at=%(now)s, {UNLEASED} "
            f"WHERE id=%(id)s AND site=%(site)s AND state='inflight' AND {MINE}",
            id=job_id,
            now=self._clock(),
        )

    def mark_published(self, job_id: int, output_rel: str, entry: dict[str, Any]) -> None:
        """Its output is durable; this daemon keeps the lease while it moves the input."""
        now = self._clock()
        with self._use(tx=True) as db:
            published = db.execute(
                "UPDATE jobs SET state='published', output_rel=%(out)s, updated_at=%(now)s, error=NULL, "
                f"history = history || %(entries)s, {LEASED} "
                f"WHERE id=%(id)s AND site=%(site)s AND {MINE}".encode(),
                self._args(id=job_id, out=output_rel, now=now, entries=Jsonb([entry])),
            ).rowcount
            if published:
                self._set_meta_in(db, "last_success", now)

    def mark_done(self, job_id: int, archived_as: str | None = None) -> None:
        """The job is finished; ``archived_as``: where its input now is in the archive."""
        self._write(
            f"UPDATE jobs SET state='done', held_as=NULL, archived_as=%(archived)s, updated_at=%(now)s, "
            f"{UNLEASED} WHERE id=%(id)s AND site=%(site)s AND {MINE}",
            id=job_id,
            archived=archived_as,
            now=self._clock(),
        )

    def done_jobs(self) -> list[Job]:
        """Jobs whose outputs were written (a superseded one wrote none), oldest first."""
        rows = self._read(
            "SELECT * FROM jobs WHERE site=%(site)s AND state='done' AND output_rel IS NOT NULL "
            "AND output_rel <> '' ORDER BY seq"
        )
        return [_job(r) for r in rows]

    def set_signature(self, job_id: int, signature: tuple[int, int, int, int, int]) -> None:
        """The job's file was found again with this (size, mtime, ctime, inode, device) and
        the job's own content."""
        self._write(
            "UPDATE jobs SET size=%(size)s, mtime_ns=%(mtime_ns)s, ctime_ns=%(ctime_ns)s, inode=%(inode)s, "
            "device=%(device)s WHERE id=%(id)s AND site=%(site)s",
            id=job_id,
            **dict(zip(SIGNATURE_COLUMNS, signature, strict=True)),
        )

    def set_held(self, job_id: int, held_as: str | None) -> None:
        """Record (before the rename) the private name a published job's input is moved to
        while it is checked and disposed of, so a crash in between finds it again."""
        self._write(
            f"UPDATE jobs SET held_as=%(held)s WHERE id=%(id)s AND site=%(site)s AND {MINE}",
            id=job_id,
            held=held_as,
        )

    def holds(self, held_as: str) -> bool:
        """Does a published job hold an input under this private name (being disposed of)?"""
        return bool(
            self._read(
                "SELECT 1 FROM jobs WHERE site=%(site)s AND held_as=%(held)s AND state='published' LIMIT 1",
                held=held_as,
            )
        )

    def cancel(self, job_id: int, reason: dict[str, Any]) -> None:
        """The job's file was deleted or replaced before its output was written."""
        self._write(
            f"UPDATE jobs SET state='cancelled', updated_at=%(now)s, error=%(reason)s, {UNLEASED} "
            f"WHERE id=%(id)s AND site=%(site)s AND {MINE}",
            id=job_id,
            now=self._clock(),
            reason=Jsonb(reason),
        )

    def postpone(self, job_id: int, *, at: float) -> None:
        """Back to the queue untouched until ``at`` (no attempt counted, nothing recorded)."""
        self._write(
            f"UPDATE jobs SET state='queued', next_attempt_at=%(at)s, updated_at=%(now)s, {UNLEASED} "
            f"WHERE id=%(id)s AND site=%(site)s AND {MINE}",
            id=job_id,
            at=at,
            now=self._clock(),
        )

    def mark_quarantining(self, job_id: int, error: dict[str, Any], entry: dict[str, Any] | None) -> None:
        """The move to quarantine is about to start (this daemon keeps the lease while it
        moves the input); ``entry`` is the attempt that led to it, recorded once."""
        self._set_error_state(job_id, "quarantining", error, entry, LEASED)

    def quarantining_jobs(self) -> list[Job]:
        """Quarantines to finish that no other living daemon is finishing: they are leased
        to this one."""
        return self._take("quarantining")

    def mark_quarantined(
        self, job_id: int, error: dict[str, Any], entry: dict[str, Any] | None = None
    ) -> None:
        self._set_error_state(job_id, "quarantined", error, entry, UNLEASED)

    def _set_error_state(
        self, job_id: int, state: str, error: dict[str, Any], entry: dict[str, Any] | None, lease: str
    ) -> None:
        self._write(
            f"UPDATE jobs SET state=%(state)s, updated_at=%(now)s, error=%(error)s, "
            f"history = history || %(entries)s, {lease} WHERE id=%(id)s AND site=%(site)s AND {MINE}",
            id=job_id,
            state=state,
            now=self._clock(),
            error=Jsonb(error),
            entries=Jsonb([] if entry is None else [entry]),
        )

    def add_quarantined(self, job: NewJob, error: dict[str, Any], *, state: str = "quarantined") -> None:
        """Record a file refused before it became a job (local validation); ``state`` is
        ``quarantining`` while its move (by this daemon, which holds it) is under way."""
        lease = LEASED if state in LEASED_STATES else UNLEASED
        with self._use(tx=True) as db:
            self._lock(db, ADMIT_LOCK)
            db.execute(
                "INSERT INTO jobs (site, rel_path, sha256, size, mtime_ns, ctime_ns, inode, device, format, "
                "state, first_seen, updated_at, error, seq) VALUES (%(site)s, %(rel_path)s, %(sha256)s, "
                "%(size)s, %(mtime_ns)s, %(ctime_ns)s, %(inode)s, %(device)s, %(format)s, %(state)s, "
                "%(first_seen)s, %(now)s, %(error)s, %(seq)s) ON CONFLICT (site, rel_path, sha256) "
                "DO UPDATE SET state=excluded.state, updated_at=excluded.updated_at, error=excluded.error, "
                f"seq=excluded.seq, {lease}".encode(),
                self._args(
                    **vars(job), state=state, now=self._clock(), error=Jsonb(error), seq=self._next_seq(db)
                ),
            )
            if lease == LEASED:  # (the insert's own row: the lease columns are set by the update)
                db.execute(
                    f"UPDATE jobs SET {LEASED} "
                    "WHERE site=%(site)s AND rel_path=%(rel)s AND sha256=%(sha)s".encode(),
                    self._args(rel=job.rel_path, sha=job.sha256),
                )

    def sha_still_needed(self, sha256: str) -> bool:
        return bool(
            self._read(
                "SELECT 1 FROM jobs WHERE site=%(site)s AND sha256=%(sha)s "
                "AND state IN ('queued', 'inflight', 'held') LIMIT 1",
                sha=sha256,
            )
        )

    # --- outputs -------------------------------------------------------------------

    def claim_output(self, rel_path: str, candidates: Iterable[str], key: Any) -> str:
        """The output name for ``rel_path``: the one it owns already, else the first
        candidate nobody owns (compared by ``key``, i.e. ignoring case)."""
        return self.claim_outputs(rel_path, ([name] for name in candidates), key)[0]

    def claim_outputs(self, rel_path: str, name_sets: Iterable[Sequence[str]], key: Any) -> list[str]:
        """The output names for ``rel_path`` (one per output of its recipe): the first set
        of candidates whose every name is free or ``rel_path``'s own already; the names not
        yet its own are claimed. Under the site's admission lock: two daemons never get
        one name for two paths."""
        with self._use(tx=True) as db:
            self._lock(db, ADMIT_LOCK)
            claimed: list[tuple[str, str, str]] = []
            names = self._claim_in(db, rel_path, name_sets, key, owners={}, claimed=claimed)
            self._add_outputs(db, claimed)
        return names

    def _claim_in(
        self,
        db: Connection,
        rel_path: str,
        name_sets: Callable[[str], Iterable[Sequence[str]]] | Iterable[Sequence[str]],
        key: Any,
        *,
        owners: dict[str, str | None],
        claimed: list[tuple[str, str, str]],
    ) -> list[str]:
        """The first free set of names (see :meth:`claim_outputs`). ``owners``: the owner
        (None: nobody) of the names looked up so far, kept up to date (a batch looks its
        first choices up at once); the names taken are added to ``claimed`` (``out_key,
        out_rel, rel_path``) for :meth:`_add_outputs`."""
        for names in name_sets(rel_path) if callable(name_sets) else name_sets:
            if isinstance(names, str):  # (one name, not a set of its characters)
                names = [names]
            keys = [key(n) for n in names]
            owners.update(self._owners(db, [k for k in keys if k not in owners]))
            if any(owners[k] not in (None, rel_path) for k in keys):
                continue
            for name, out_key in zip(names, keys, strict=True):
                if owners[out_key] is None:
                    owners[out_key] = rel_path
                    claimed.append((out_key, name, rel_path))
            return list(names)
        raise AssertionError("candidates is endless")

    def _add_outputs(self, db: Connection, claimed: list[tuple[str, str, str]]) -> None:
        with db.cursor() as cur:
            cur.executemany(
                "INSERT INTO outputs (site, out_key, out_rel, rel_path) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                [(self.site, *c) for c in claimed],
            )

    def _owners(self, db: Connection, keys: Sequence[str]) -> dict[str, str | None]:
        """The path owning each of these output keys (None: free)."""
        if not keys:
            return {}
        rows = db.execute(
            "SELECT out_key, rel_path FROM outputs WHERE site=%s AND out_key = ANY(%s)",
            (self.site, list(keys)),
        ).fetchall()
        return {**dict.fromkeys(keys), **{str(k): str(r) for k, r in rows}}

    # --- pacing history, pause state ---------------------------------------------------

    def load_slots(self) -> list[Slot]:
        """This daemon's pacing history (meta ``pacer/<daemon id>``)."""
        stored = self.get_meta(f"pacer/{self.daemon_id}") or []
        return [Slot(started=float(s[0]), sent=None if s[1] is None else float(s[1])) for s in stored]

    def save_slots(self, slots: Iterable[Slot]) -> None:
        self.set_meta(f"pacer/{self.daemon_id}", [[s.started, s.sent] for s in slots] or None)

    def meta_key(self, key: str) -> str:
        """Where ``key`` is stored: ``<key>/<daemon id>`` for the daemon's own
        (:data:`DAEMON_META`), else ``key`` (the site's)."""
        return f"{key}/{self.meta_owner}" if key in DAEMON_META else key

    def get_meta(self, key: str) -> Any:
        """The site's ``key`` (None: unset); the daemon's own for :data:`DAEMON_META`.
        ``paused``: the daemon's local pause (disk full, outbox unwritable), else the API
        key's shared pause (401/402/403, see :mod:`dropcut.pgpace`), else None."""
        with self._use(tx=False) as db:
            value = self._get_meta_in(db, self.meta_key(key))
            if key == "paused" and value is None:
                return self._key_pause(db)
            return value

    def set_meta(self, key: str, value: Any) -> None:
        """Set the site's ``key`` (None: delete it); the daemon's own for
        :data:`DAEMON_META` (``paused``: its local pause only; the key's shared pause is
        the shared pacer's)."""
        with self._use(tx=True) as db:
            self._set_meta_in(db, self.meta_key(key), value)

    def _key_pause(self, db: Connection) -> dict[str, Any] | None:
        row = db.execute("SELECT pause FROM rate_keys WHERE key_id=%s", (self.key_id,)).fetchone()
        return row[0] if row is not None and isinstance(row[0], dict) else None

    # --- the daemons, for the status --------------------------------------------------------

    def heartbeat(self, *, version: str, pid: int | None = None) -> None:
        """Write this daemon's row in ``daemons`` (its heartbeat now, on the database's
        clock; created when missing). The shared pacer writes it too."""
        host = socket.gethostname() or "localhost"
        self._write(
            f"INSERT INTO daemons (id, site, host, pid, version, started_at, heartbeat_at) "
            f"VALUES (%(me)s, %(site)s, %(host)s, %(pid)s, %(version)s, {NOW}, {NOW}) "
            f"ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at, stopped_at = NULL, "
            "site = EXCLUDED.site, host = EXCLUDED.host, pid = EXCLUDED.pid, version = EXCLUDED.version",
            host=host,
            pid=os.getpid() if pid is None else pid,
            version=version,
        )

    def started(self, *, version: str) -> None:
        """A daemon (re)starts: its row in ``daemons`` says since when."""
        self.heartbeat(version=version)
        self._write(f"UPDATE daemons SET started_at = {NOW} WHERE id = %(me)s")

    def stopped(self) -> None:
        """A clean stop: the daemon's row says so (its open rate slots no longer count as
        in flight, its leases may be taken at once)."""
        self._write(f"UPDATE daemons SET stopped_at = {NOW} WHERE id = %(me)s")

    def shared_report(self, *, period: float) -> dict[str, Any]:
        """What ``dropcut status`` shows of the shared queue: the database (its URL without
        password), every site's job counts, every daemon (its site, host, last heartbeat,
        whether it is alive: a heartbeat within ``lease_seconds``; its conditions and local
        pause), the API key's shared window (requests of every daemon in the last
        ``period`` seconds, slots open now) and its shared state (outage hold, pause).
        Times are the database's clock (epoch seconds)."""
        with self._use(tx=False) as db:
            row = db.execute(f"SELECT {NOW}").fetchone()
            assert row is not None
            now = float(row[0])
            sites: dict[str, dict[str, int]] = {}
            for site, state, n in db.execute(
                "SELECT site, state, COUNT(*) FROM jobs GROUP BY site, state ORDER BY site"
            ).fetchall():
                sites.setdefault(str(site), dict.fromkeys(STATES, 0))[str(state)] = int(n)
            meta: dict[tuple[str, str], Any] = {}
            for key, value in db.execute(
                "SELECT key, value FROM meta WHERE key LIKE 'conditions/%' OR key LIKE 'paused/%'"
            ).fetchall():
                kind, _, owner = str(key).partition("/")
                meta[(kind, owner)] = value
            daemons = []
            for d in self._rows(
                db,
                "SELECT id, site, host, pid, version, started_at, heartbeat_at, stopped_at FROM daemons "
                'ORDER BY site COLLATE "C", id COLLATE "C"',
                {},
            ):
                alive = d["stopped_at"] is None and now - float(d["heartbeat_at"]) <= self.lease_seconds
                daemons.append(
                    {
                        **d,
                        "alive": alive,
                        "conditions": meta.get(("conditions", d["id"])) if alive else None,
                        "paused": meta.get(("paused", d["id"])),
                    }
                )
            key = db.execute(
                "SELECT hold_until, outage_streak, pause FROM rate_keys WHERE key_id=%s", (self.key_id,)
            ).fetchone()
            used = db.execute(
                "SELECT COUNT(*) FROM requests WHERE key_id=%s AND started >= %s",
                (self.key_id, self._clock() - period),
            ).fetchone()
            open_slots = db.execute(
                "SELECT COUNT(*) FROM rate_slots WHERE key_id=%s AND sent IS NULL", (self.key_id,)
            ).fetchone()
        return {
            "url": self.display_url,
            "site": self.site,
            "now": now,
            "sites": sites,
            "daemons": daemons,
            "key": {
                "window": int(used[0]) if used is not None else 0,
                "open": int(open_slots[0]) if open_slots is not None else 0,
                "hold_until": float(key[0]) if key is not None and float(key[0]) > now else None,
                "outage_streak": int(key[1]) if key is not None else 0,
                "pause": key[2] if key is not None and isinstance(key[2], dict) else None,
            },
        }

    def _get_meta_in(self, db: Connection, key: str) -> Any:
        row = db.execute("SELECT value FROM meta WHERE site=%s AND key=%s", (self.site, key)).fetchone()
        return None if row is None else row[0]

    def _set_meta_in(self, db: Connection, key: str, value: Any) -> None:
        if value is None:
            db.execute("DELETE FROM meta WHERE site=%s AND key=%s", (self.site, key))
        else:
            db.execute(
                "INSERT INTO meta (site, key, value) VALUES (%s, %s, %s) "
                "ON CONFLICT (site, key) DO UPDATE SET value=excluded.value",
                (self.site, key, Jsonb(value)),
            )

    # --- the request log ------------------------------------------------------------------

    def record_request(self, request: RequestRecord) -> None:
        """Log one request to the API under the key (and this site); the key's requests
        older than :data:`~dropcut.queue.REQUEST_HISTORY_SECONDS` are dropped."""
        with self._use(tx=True) as db:
            db.execute(
                "INSERT INTO requests (key_id, site, started, endpoint, status, seconds, sent, received) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    self.key_id,
                    self.site,
                    request.started,
                    request.endpoint,
                    request.status,
                    request.seconds,
                    request.sent,
                    request.received,
                ),
            )
            db.execute(
                "DELETE FROM requests WHERE key_id=%s AND started < %s",
                (self.key_id, request.started - REQUEST_HISTORY_SECONDS),
            )

    def requests_since(self, since: float) -> int:
        """How many requests on the key (every daemon, every site) were started at or
        after ``since``."""
        rows = self._read(
            "SELECT COUNT(*) AS n FROM requests WHERE key_id=%(key)s AND started >= %(since)s",
            key=self.key_id,
            since=since,
        )
        return int(rows[0]["n"])

    # --- reporting and maintenance -------------------------------------------------------

    def recent(self, states: Sequence[str], *, limit: int, offset: int = 0) -> list[Job]:
        """Jobs in ``states``, the most recently changed first (a page of ``limit``)."""
        rows = self._read(
            "SELECT * FROM jobs WHERE site=%(site)s AND state = ANY(%(states)s) "
            "ORDER BY updated_at DESC, id DESC LIMIT %(limit)s OFFSET %(offset)s",
            states=list(states),
            limit=limit,
            offset=offset,
        )
        return [_job(r) for r in rows]

    def frames_skipped(self) -> int:
        """How many files (jobs) had frames after the first that were not processed."""
        rows = self._read("SELECT COUNT(*) AS n FROM jobs WHERE site=%(site)s AND frames > 1")
        return int(rows[0]["n"])

    def counts(self) -> dict[str, int]:
        rows = self._read("SELECT state, COUNT(*) AS n FROM jobs WHERE site=%(site)s GROUP BY state")
        result = dict.fromkeys(STATES, 0)
        result.update({r["state"]: int(r["n"]) for r in rows})
        return result

    def quarantined_jobs(self, rel_paths: Iterable[str] | None = None) -> list[Job]:
        """The quarantined jobs (at ``rel_paths``, in their order; None: all)."""
        paths = None if rel_paths is None else list(rel_paths)
        rows = self._read(
            "SELECT * FROM jobs WHERE site=%(site)s AND state='quarantined' "
            "AND (%(paths)s::text[] IS NULL OR rel_path = ANY(%(paths)s)) "
            "ORDER BY array_position(%(paths)s::text[], rel_path), id",
            paths=paths,
        )
        return [_job(r) for r in rows]

    def job_error(self, job_id: int) -> dict[str, Any] | None:
        rows = self._read("SELECT error FROM jobs WHERE id=%(id)s AND site=%(site)s", id=job_id)
        value = rows[0]["error"] if rows else None
        return value if isinstance(value, dict) else None

    def forget(self, job_id: int) -> dict[str, Any] | None:
        """Delete a job (unless another daemon holds it); returns its row, which
        :meth:`restore` can put back."""
        rows = self._rows_tx(
            f"DELETE FROM jobs WHERE id=%(id)s AND site=%(site)s AND {MINE} RETURNING *", id=job_id
        )
        return rows[0] if rows else None

    def restore(self, row: dict[str, Any]) -> None:
        """Put back a row :meth:`forget` returned (an action that followed it failed),
        under a new id, unless its path and content have a job again meanwhile."""
        values = {c: v for c, v in row.items() if c not in ("id", "site", "lease_owner", "lease_until")}
        for column in ("history", "error"):
            if isinstance(values.get(column), str):  # (a row of the SQLite queue)
                values[column] = json.loads(values[column])
            if column in values and values[column] is not None:
                values[column] = Jsonb(values[column])
        columns = ["site", *values]
        marks = ", ".join(f"%({c})s" for c in columns)
        with self._use(tx=True) as db:
            self._lock(db, ADMIT_LOCK)
            db.execute(
                f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT DO NOTHING".encode(),
                self._args(**values),
            )

    def last_error(self) -> tuple[str, dict[str, Any], float] | None:
        """The site's most recent job error: ``(rel_path, error, updated_at)``, or None."""
        rows = self._read(
            "SELECT rel_path, error, updated_at FROM jobs WHERE site=%(site)s AND error IS NOT NULL "
            "ORDER BY updated_at DESC LIMIT 1"
        )
        if not rows or not isinstance(rows[0]["error"], dict):
            return None
        return str(rows[0]["rel_path"]), rows[0]["error"], float(rows[0]["updated_at"])

    def integrity_ok(self) -> bool:
        """Does the database answer? (PostgreSQL checks its own pages.)"""
        return bool(self._read("SELECT 1 AS ok"))


# --- moving a SQLite queue to the shared one ------------------------------------------------


def _moved_job(job: dict[str, Any], base: int) -> dict[str, Any]:
    """A SQLite job row as a row of the shared queue: in flight becomes queued (its daemon
    is stopped), its admission number comes after the site's ``base``."""
    return {
        **{c: v for c, v in job.items() if c not in ("id", "state", "history", "error", "seq")},
        "state": "queued" if job["state"] == "inflight" else job["state"],
        "seq": base + int(job["seq"]),
        "history": Jsonb(json.loads(job["history"] or "[]")),
        "error": None if job["error"] is None else Jsonb(json.loads(job["error"])),
    }


@dataclass(frozen=True)
class Migrated:
    """What :func:`migrate_sqlite` moved: jobs (and of them, those already in the shared
    queue, left as they are there), output names (and those owned there by another path),
    meta keys, logged requests, cached results; ``renamed_to``: the SQLite file's new name."""

    jobs: int
    jobs_present: int
    outputs: int
    outputs_taken: int
    meta: int
    requests: int
    results: int
    renamed_to: Path


def migrate_sqlite(
    sqlite_path: Path,
    queue: PgJobQueue,
    *,
    results_dir: Path | None = None,
    share_max_bytes: int | None = None,
) -> Migrated:
    """Move a daemon's SQLite queue into the shared queue of ``queue.site``, once.

    Moved: every job (``inflight`` ones back to ``queued``; done, discarded and quarantined
    ones too — they keep a kept input from being sent again, a discarded one unsent, and
    ``dropcut retry`` and ``rerender`` working), with their admission order after the
    site's jobs; the output-name claims; the meta (the pacing history as this daemon's);
    the request log (the budgets count it); and the result cache's files
    (``results_dir``, default ``results`` beside the database; each up to
    ``share_max_bytes``, see :data:`dropcut.pgcache.SHARE_MAX_BYTES`). What the shared
    queue has already (the same file's job, a name another path owns, a meta key) stays
    as it is there.

    One PostgreSQL transaction; a marker in both databases (meta ``migrated_to`` in
    SQLite, ``migrated/<daemon id>`` in the site's meta) refuses a second run
    (:class:`AlreadyMigrated`); the SQLite file is renamed ``<name>.migrated`` only after
    the commit. The daemon of that state folder must be stopped: its lock file, when there
    is one beside the database, is taken (``BlockingIOError`` otherwise).
    """
    from dropcut.pgcache import SHARE_MAX_BYTES
    from dropcut.queue import connect

    if not sqlite_path.is_file():
        raise FileNotFoundError(f"no SQLite queue at {sqlite_path}")
    results_dir = results_dir if results_dir is not None else sqlite_path.parent / "results"
    limit = SHARE_MAX_BYTES if share_max_bytes is None else share_max_bytes
    marker = f"migrated/{queue.daemon_id}"
    with contextlib.ExitStack() as stack:
        lock_file = sqlite_path.parent / "dropcut.lock"
        if lock_file.exists():
            fd = os.open(lock_file, os.O_RDWR | os.O_CLOEXEC)
            stack.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: the daemon runs
        lite = connect(sqlite_path)
        stack.callback(lite.close)
        done_before = lite.execute("SELECT value FROM meta WHERE key='migrated_to'").fetchone()
        if done_before is not None:
            raise AlreadyMigrated(f"{sqlite_path} was moved to {json.loads(done_before[0])} already")
        jobs = [dict(r) for r in lite.execute("SELECT * FROM jobs ORDER BY seq, id")]
        outputs = lite.execute("SELECT out_key, out_rel, rel_path FROM outputs").fetchall()
        meta = {str(k): json.loads(v) for k, v in lite.execute("SELECT key, value FROM meta")}
        slots = lite.execute("SELECT started, sent FROM slots ORDER BY started").fetchall()
        requests = lite.execute(
            "SELECT started, endpoint, status, seconds, sent, received FROM requests"
        ).fetchall()
        now = queue._clock()
        with queue.transaction() as db:
            if queue._get_meta_in(db, marker) is not None:
                raise AlreadyMigrated(
                    f"the queue of {queue.daemon_id} was moved to site {queue.site} already"
                )
            queue._lock(db, ADMIT_LOCK)
            base = queue._next_seq(db) - 1
            rows = [_moved_job(job, base) for job in jobs]
            with db.cursor() as cur:
                if rows:
                    columns = ["site", *rows[0]]
                    cur.executemany(
                        f"INSERT INTO jobs ({', '.join(columns)}) "
                        f"VALUES ({', '.join(f'%({c})s' for c in columns)}) "
                        "ON CONFLICT (site, rel_path, sha256) DO NOTHING".encode(),
                        [queue._args(**row) for row in rows],
                    )
                present = len(rows) - max(cur.rowcount, 0) if rows else 0
            queue._add_outputs(db, [(k, out_rel, rel) for k, out_rel, rel in outputs])
            row = db.execute(
                "SELECT COUNT(*) FROM outputs JOIN unnest(%s::text[], %s::text[]) "
                "AS ours (out_key, rel_path) USING (out_key) "
                "WHERE site=%s AND outputs.rel_path <> ours.rel_path",
                ([o[0] for o in outputs], [o[2] for o in outputs], queue.site),
            ).fetchone()
            taken = int(row[0]) if row is not None else 0
            if slots:
                meta[f"pacer/{queue.daemon_id}"] = [[s[0], s[1]] for s in slots]
            meta.pop("conditions", None)  # (what held when that daemon last ran: its own again)
            for key, value in meta.items():
                db.execute(
                    "INSERT INTO meta (site, key, value) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (queue.site, queue.meta_key(key), Jsonb(value)),
                )
            with db.cursor() as cur:
                cur.executemany(
                    "INSERT INTO requests (key_id, site, started, endpoint, status, seconds, sent, received) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    [(queue.key_id, queue.site, *r) for r in requests],
                )
            results = 0
            for path in sorted(results_dir.glob("*.png")) if results_dir.is_dir() else []:
                if path.stat().st_size > limit:
                    continue
                used = path.stat().st_mtime
                results += db.execute(
                    "INSERT INTO results (result_key, body, stored_at, used_at) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    (path.stem, path.read_bytes(), used, used),
                ).rowcount
            record = {"from": str(sqlite_path), "host": socket.gethostname(), "at": now, "jobs": len(jobs)}
            queue._set_meta_in(db, marker, record)
        # committed: the SQLite side says so, and steps aside
        lite.execute(
            "INSERT INTO meta (key, value) VALUES ('migrated_to', ?)",
            (json.dumps({"url": queue.display_url, "site": queue.site, "at": now}),),
        )
        # one self-contained file (its WAL folded in), so that it can be renamed alone;
        # while another process reads it (dropcut status), the WAL is renamed with it
        with contextlib.suppress(sqlite3.OperationalError):
            lite.execute("PRAGMA journal_mode=DELETE")
    renamed = sqlite_path.with_name(sqlite_path.name + ".migrated")
    for suffix in ("-wal", "-shm"):  # (still there if another process had it open: kept with it)
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{sqlite_path}{suffix}", f"{renamed}{suffix}")
    os.replace(sqlite_path, renamed)
    return Migrated(
        jobs=len(jobs),
        jobs_present=present,
        outputs=len(outputs),
        outputs_taken=taken,
        meta=len(meta),
        requests=len(requests),
        results=results,
        renamed_to=renamed,
    )
