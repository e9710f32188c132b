"""One rate limit per API key, shared by every daemon on it, kept in PostgreSQL (issue 13).

:class:`SharedPacer` has the public interface of :class:`dropcut.pace.Pacer`, but its
sliding window is the key's row in ``rate_keys`` and the key's rows in ``rate_slots``
(:mod:`dropcut.pgschema`; the key is known by :func:`~dropcut.pgschema.key_id`, a hash,
never the key). How a slot is granted, in one transaction:

1. ``SELECT … FROM rate_keys WHERE key_id = … FOR UPDATE``: the grants of one key are
   serialised, whichever daemon asks.
2. Now is the **database's** clock (``clock_timestamp()``, read once the lock is held);
   the key's slots are read (each with its owner's heartbeat), the ones that no longer
   matter are deleted, and :func:`dropcut.pace.next_start` decides.
3. A slot that may start now is INSERTed (``sent`` NULL, ``owner`` = this daemon); the
   caller gets its handle only once the transaction committed. Any number of daemons
   together so never start more than ``limit`` requests in any window, and still use it to
   the last slot. Otherwise the caller waits until the computed start (a duration on the
   database's clock, slept on ours), or until a notification on the key's channel (a slot
   marked sent, released or discarded; the shared state changed), and asks again; a capped
   poll covers a lost notification.

**The handle's methods are synchronous** (``mark_sent`` is called from inside the HTTP
client's upload stream), a database write is not: they record locally and queue the write,
which a background task makes at once on a connection of its own (and any transaction of
this pacer makes first). ``sent`` is the moment of the call on the database's clock as this
machine knows it, an upper bound: every query that reads the database's clock also bounds
the offset between the two clocks (:class:`_DbClock`), and the write takes the smaller of
that and the database's clock at the write. So a write that lands late costs nothing, the
value is never earlier than the truth (later is safe: see :mod:`dropcut.pace`) and no later
than need be: as with :class:`~dropcut.pace.Pacer`, ``margin`` alone covers how much later
the server may count a request. Until a write lands the slot counts as unknown (``sent``
NULL), the conservative side; while the database is away the writes wait and are retried.
``snapshot()`` and ``next_start()`` answer from what the last transaction read, on the
database's clock.

**Owners that die.** Each daemon keeps a row in ``daemons`` with a heartbeat
(:meth:`SharedPacer.heartbeat`: the background task writes it every
``heartbeat_seconds``, and every grant in its transaction, so a slot never starts after its
owner's last heartbeat). An owner is dead when its heartbeat is older than ``lease_seconds``
(or it stopped: ``stopped_at``). A slot of a dead owner whose ``sent`` is unknown counts
as sent at ``heartbeat + lease_seconds``: its request started before that heartbeat and
was over ``request_timeout_seconds`` later at the latest, so this is safe while
``request_timeout_seconds <= lease_seconds`` (both 60 s by default). A crashed daemon's
open slot so holds its place for at most ``lease + period`` seconds.

**The key's shared state** (the same row): the outage hold (``hold_until``,
``outage_streak``, ``outage_step_at``, stepped as :func:`dropcut.dispatch.outage_step`
does) and the account pause (``pause``: 401/402/403). Every grant obeys them: no slot while
paused or before ``hold_until``, and while ``outage_streak > 0`` a slot only when no other
slot of the key is open (granted, not released; its owner alive): one probe across all
daemons. Local pauses (disk full, outbox unwritable) are not shared.

**The database going away** (restart, network cut) surfaces as :class:`QueueUnavailable`
from every async method; the next call connects again. A grant whose commit was not
confirmed may still have been recorded: this pacer's own open slots that no handle holds
are marked sent and released by its next transaction, so they cannot block anyone.

Needs ``rate_slots.released`` (:data:`SCHEMA_STEP`, a proposed migration step).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
import structlog
from psycopg import sql

from dropcut.pace import Slot, next_start, prune

__all__ = [
    "SCHEMA_STEP",
    "QueueUnavailable",
    "SharedPacer",
    "SharedSlotHandle",
    "SharedState",
    "SlotRow",
    "SlotView",
    "Verdict",
    "decide",
    "outage_step",
    "window_view",
]

#: The migration step this module needs after pgschema's first: when a slot's request was
#: over (its answer came, or it failed). NULL is a request in flight: during an outage only
#: one may be, across all daemons (``sent`` cannot tell: a probe's body is out long before
#: its answer).
SCHEMA_STEP = """
ALTER TABLE rate_slots ADD COLUMN IF NOT EXISTS released DOUBLE PRECISION;
CREATE INDEX IF NOT EXISTS rate_slots_owner ON rate_slots (owner) WHERE released IS NULL;
"""

DB_NOW = "extract(epoch from clock_timestamp())::float8"
#: Each session's limits: a daemon that vanishes inside a transaction frees the key's row
#: after IDLE_IN_TRANSACTION; a grant waits at most LOCK_TIMEOUT for the row.
SESSION_SETTINGS = {
    "idle_in_transaction_session_timeout": "15s",
    "lock_timeout": "20s",
    "statement_timeout": "30s",
}
DRIFT = 1e-4  # how fast the two clocks may drift apart (100 ppm: a bad quartz)
CLOCK_MEMORY = 10.0  # seconds: how long a measurement of the clocks' offset is used
BACKOFF = (0.2, 5.0)  # the background tasks' reconnect backoff: first, most (seconds)

KEY_ROW = (
    "SELECT hold_until, outage_streak, outage_step_at, pause FROM rate_keys WHERE key_id = %s FOR UPDATE"
)
#: The key's slots, each with its owner's heartbeat, and the database's clock (one row of
#: NULLs when there are none).
SLOTS = f"""
SELECT n.now, s.id, s.started, s.sent, s.released, s.owner, d.heartbeat_at, d.stopped_at
FROM (SELECT {DB_NOW} AS now) n
LEFT JOIN (rate_slots s LEFT JOIN daemons d ON d.id = s.owner) ON s.key_id = %s
"""
#: A slot granted at %(now)s, and its owner's heartbeat at the same moment.
GRANT = """
WITH slot AS (
    INSERT INTO rate_slots (key_id, started, sent, owner)
    VALUES (%(key)s, %(now)s, NULL, %(id)s) RETURNING id
), beat AS (
    INSERT INTO daemons (id, site, host, pid, version, started_at, heartbeat_at)
    VALUES (%(id)s, %(site)s, %(host)s, %(pid)s, %(version)s, %(now)s, %(now)s)
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at, stopped_at = NULL
)
SELECT id FROM slot
"""
#: This daemon's heartbeat now (its row created when missing).
BEAT = f"""
INSERT INTO daemons (id, site, host, pid, version, started_at, heartbeat_at)
VALUES (%(id)s, %(site)s, %(host)s, %(pid)s, %(version)s, {DB_NOW}, {DB_NOW})
ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at, stopped_at = NULL
RETURNING {DB_NOW}
"""
#: The handles' writes: ``sent`` (the estimate given, or the database's clock if smaller),
#: ``released``; a value once recorded stays.
WRITE_SLOTS = f"""
UPDATE rate_slots r SET
    sent = CASE WHEN u.sent IS NULL THEN r.sent
                ELSE coalesce(r.sent, greatest(r.started, least(u.sent, {DB_NOW}))) END,
    released = CASE WHEN u.released THEN coalesce(r.released, {DB_NOW}) ELSE r.released END
FROM unnest(%(ids)s::bigint[], %(sent)s::float8[], %(released)s::bool[]) AS u(id, sent, released)
WHERE r.id = u.id
RETURNING r.id, r.sent
"""
#: This daemon's open slots that no handle holds: over (a lost commit, an earlier run).
CLOSE_ORPHANS = f"""
UPDATE rate_slots SET sent = coalesce(sent, greatest(started, {DB_NOW})), released = {DB_NOW}
WHERE owner = %s AND released IS NULL AND NOT (id = ANY(%s))
"""

_log = structlog.get_logger()


class QueueUnavailable(Exception):
    """The database cannot be reached (server gone, restarting, network cut, a lock not
    granted in time). Nothing was granted; the next call connects again."""


@dataclass(frozen=True)
class SharedState:
    """The key's shared row: the outage hold and the account pause, as read at ``now``
    (the database's clock, epoch seconds; so is ``hold_until``)."""

    hold_until: float = 0.0
    outage_streak: int = 0
    outage_step_at: float = 0.0
    pause: dict[str, Any] | None = None
    now: float = 0.0

    @property
    def hold_seconds(self) -> float:
        """How long the hold still lasted when this was read."""
        return max(0.0, self.hold_until - self.now)

    def to_json(self) -> str:
        return json.dumps(
            {
                "hold_until": self.hold_until,
                "outage_streak": self.outage_streak,
                "outage_step_at": self.outage_step_at,
                "pause": self.pause,
                "now": self.now,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SharedState:
        d = json.loads(text)
        return cls(
            hold_until=float(d["hold_until"]),
            outage_streak=int(d["outage_streak"]),
            outage_step_at=float(d["outage_step_at"]),
            pause=d["pause"] if isinstance(d["pause"], dict) else None,
            now=float(d["now"]),
        )


@dataclass(frozen=True)
class SlotRow:
    """One row of ``rate_slots`` as read, with its owner's ``daemons`` row (None: none)."""

    id: int
    started: float
    sent: float | None
    released: float | None
    owner: str
    heartbeat_at: float | None = None
    stopped_at: float | None = None


@dataclass(frozen=True)
class SlotView:
    """A slot as :func:`window_view` counts it."""

    id: int
    slot: Slot  # as the window counts it (a dead owner's unknown `sent` filled in)
    open: bool  # a request in flight: granted, not released, its owner alive


def window_view(rows: Iterable[SlotRow], now: float, *, lease: float, me: str) -> list[SlotView]:
    """The key's slots as the window counts them at ``now``.

    A slot of another owner that is dead (heartbeat older than ``lease``, or stopped; no
    ``daemons`` row: its heartbeat is taken as the slot's start) is not open, and an unknown
    ``sent`` counts as ``heartbeat + lease`` (``stopped_at`` when it stopped). Our own
    slots (``me``) are taken as they are: we are alive."""
    views = []
    for row in rows:
        slot = Slot(started=row.started, sent=row.sent)
        is_open = row.released is None
        if row.owner != me:
            if row.stopped_at is not None:
                dead_at: float | None = row.stopped_at
            else:
                beat = row.heartbeat_at if row.heartbeat_at is not None else row.started
                dead_at = beat + lease if beat + lease <= now else None
            if dead_at is not None:
                is_open = False
                if row.sent is None:
                    slot = Slot(started=row.started, sent=max(row.started, dead_at))
        views.append(SlotView(row.id, slot, is_open))
    return views


@dataclass(frozen=True)
class Verdict:
    """When a new slot may start (the database's clock; ``<= now``: at once), or None:
    when something changes; and why it waits (``free`` when it need not)."""

    start: float | None
    reason: str  # "free", "window", "hold", "paused", "probe"


def decide(
    slots: Sequence[Slot],
    state: SharedState,
    now: float,
    *,
    limit: int,
    period: float,
    margin: float,
    others_open: int,
) -> Verdict:
    """May a slot start at ``now``? ``others_open``: how many of the key's slots are in
    flight (while ``outage_streak > 0``, none may be: the probe goes alone)."""
    if state.pause is not None:
        return Verdict(None, "paused")
    if now < state.hold_until:
        return Verdict(state.hold_until, "hold")
    if state.outage_streak > 0 and others_open > 0:
        return Verdict(None, "probe")
    start = next_start(slots, now, limit=limit, period=period, margin=margin)
    if start is None:
        return Verdict(None, "window")
    return Verdict(start, "free" if start <= now else "window")


def outage_step(streak: int, last_step_at: float, *, started: float, now: float) -> tuple[int, float]:
    """As :func:`dropcut.dispatch.outage_step` (repeated so that this module does not
    import the dispatcher): requests in flight together fail as one step."""
    if started < last_step_at:
        return streak, last_step_at
    return streak + 1, now


def _check(*, limit: int, period: float, margin: float) -> None:
    if limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit}")
    if not period >= 0:
        raise ValueError(f"period must be >= 0, not {period!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, not {margin!r}")


class _DbClock:
    """The database's clock as this machine knows it: an upper bound.

    A query sent at our ``before`` (monotonic) that read the database's clock as ``db``
    says ``offset <= db - before`` (``db`` was read after ``before``). The smallest bound of
    the last :data:`CLOCK_MEMORY` seconds, each aged by :data:`DRIFT` since, is used, so
    that ``now()`` is not earlier than the database's clock (and a clock stepped forward
    is followed within that time)."""

    __slots__ = ("_bounds",)

    def __init__(self) -> None:
        self._bounds: deque[tuple[float, float]] = deque(maxlen=256)  # (bound, at), at increasing

    def measured(self, db: float, before: float) -> None:
        self._bounds.append((db - before, before))
        while self._bounds[0][1] < before - CLOCK_MEMORY:
            self._bounds.popleft()

    def now(self) -> float | None:
        """The upper bound now, or None before the first measurement."""
        if not self._bounds:
            return None
        t = time.monotonic()
        return t + min(bound + DRIFT * max(0.0, t - at) for bound, at in self._bounds)


@dataclass
class _Pending:
    sent: float | None = None  # the estimate, once marked sent
    released: bool = False
    discard: bool = False

    def merge(self, other: _Pending) -> None:
        if self.sent is None:
            self.sent = other.sent
        self.released |= other.released
        self.discard |= other.discard


class SharedSlotHandle:
    """One granted slot (a row of ``rate_slots``), as :class:`dropcut.pace.SlotHandle`.

    ``mark_sent``, ``discard`` and ``release`` return at once; the pacer writes them right
    after. All three are idempotent."""

    __slots__ = ("_id", "_pacer", "_released", "_slot")

    def __init__(self, pacer: SharedPacer, slot_id: int, slot: Slot) -> None:
        self._pacer = pacer
        self._id = slot_id
        self._slot = slot
        self._released = False

    @property
    def id(self) -> int:
        """The slot's row in ``rate_slots``."""
        return self._id

    @property
    def slot(self) -> Slot:
        """The slot on the database's clock (``sent`` as recorded once the write landed)."""
        return self._slot

    @property
    def released(self) -> bool:
        return self._released

    def mark_sent(self, t: float | None = None) -> None:
        """The request body was fully sent, now. (``t``, a moment of this machine's clock,
        is not used: the moment of the call, on the database's clock, is recorded.)"""
        if self._slot.sent is None:
            at = max(self._pacer._db_upper(), self._slot.started)
            self._slot = Slot(started=self._slot.started, sent=at)
            self._pacer._queue(self._id, _Pending(sent=at))

    def discard(self) -> None:
        """No request was started with this slot: its row is deleted, and the next waiter
        of any daemon may have it. Only valid before anything was sent."""
        if self._released:
            return
        self._released = True
        self._pacer._queue(self._id, _Pending(discard=True))

    def release(self, *, ok: bool = True) -> None:
        """Done with the request (its answer came, or it failed): the slot counts either
        way (marked sent now if it was not), and it is no longer open."""
        if self._released:
            return
        self._released = True
        self.mark_sent()
        self._pacer._queue(self._id, _Pending(released=True))

    def _recorded(self, sent: float | None) -> None:
        if sent is not None:
            self._slot = Slot(started=self._slot.started, sent=sent)


@dataclass
class _Daemon:
    id: str
    site: str
    host: str
    pid: int
    version: str

    def params(self) -> dict[str, Any]:
        return {"id": self.id, "site": self.site, "host": self.host, "pid": self.pid, "version": self.version}


@dataclass
class _Link:
    """A connection of this pacer, one transaction at a time."""

    conn: psycopg.AsyncConnection[Any] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Tx:
    """The transaction under way: its connection, what to do once it committed, and what
    to undo when it did not."""

    conn: psycopg.AsyncConnection[Any]
    after: list[Callable[[], None]] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)


class SharedPacer:
    """The rate limit of one API key, shared through PostgreSQL by any number of daemons.

    ``conninfo``: a libpq connection string (:func:`dropcut.pgschema.conninfo`);
    ``key_id``: :func:`dropcut.pgschema.key_id` of the API key; ``owner``: this daemon's id
    in ``daemons`` (new for each run unless given; an id given again takes over the open
    slots of its earlier run as over). ``on_state`` is called on the event loop whenever the
    key's :class:`SharedState` as seen here changes (another daemon's pause, resume or hold
    arrives through it within moments).

    Three connections: grants and the shared state; the handles' writes and the heartbeat;
    LISTEN. ``await start()`` (or the first :meth:`acquire`) starts the background tasks
    (writes, the heartbeat every ``heartbeat_seconds``, the listener; both reconnect with
    backoff); ``await close()`` after the last request writes what is pending, closes
    what is left open and marks this daemon stopped. Neither raises when the database is
    away.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        key_id: str,
        limit: int,
        period: float,
        margin: float = 0.01,
        lease_seconds: float = 60.0,
        heartbeat_seconds: float | None = None,
        owner: str | None = None,
        site: str = "",
        version: str = "",
        poll_seconds: float = 2.0,
        on_state: Callable[[SharedState], None] | None = None,
    ) -> None:
        _check(limit=limit, period=period, margin=margin)
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, not {lease_seconds!r}")
        self._conninfo = conninfo
        self._key_id = key_id
        self._limit = limit
        self._period = period
        self._margin = margin
        self._lease = lease_seconds
        beat = heartbeat_seconds if heartbeat_seconds is not None else min(5.0, lease_seconds / 4)
        self._heartbeat_every = beat
        host = socket.gethostname() or "localhost"
        self._daemon = _Daemon(
            id=owner or f"{host}:{os.getpid()}:{uuid.uuid4().hex[:12]}",
            site=site or host,
            host=host,
            pid=os.getpid(),
            version=version,
        )
        self._poll = poll_seconds
        self._on_state = on_state
        self._channel = f"dropcut_rate_{key_id[:40]}"
        self._clock = _DbClock()
        self._grants: _Link | None = None  # (made on the event loop)
        self._writes: _Link | None = None
        self._acquiring: asyncio.Lock | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._generation = 0  # bumped by every notification and reconfigure
        self._pending: dict[int, _Pending] = {}
        self._handles: dict[int, SharedSlotHandle] = {}  # granted, not yet written released
        self._live: set[int] = set()  # granted, not released here: never "orphans"
        self._repair = True  # own open slots that no handle holds may exist
        self._kick: asyncio.Future[None] | None = None  # wakes the writer
        self._tasks: list[asyncio.Task[None]] = []
        self._listen_pid: int | None = None  # the grants connection's backend (own notifications)
        self._listening = False
        self._state: SharedState | None = None
        self._seen_slots: dict[int, Slot] = {}  # the key's, as the last grant read them
        self._closed = False

    # --- Pacer's interface -----------------------------------------------------------------

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def period(self) -> float:
        return self._period

    @property
    def margin(self) -> float:
        return self._margin

    @property
    def owner(self) -> str:
        """This daemon's id in ``daemons`` and ``rate_slots.owner``."""
        return self._daemon.id

    @property
    def key_id(self) -> str:
        return self._key_id

    def reconfigure(self, *, limit: int, period: float, margin: float | None = None) -> None:
        """New limits, effective for the next grant (waiters re-check at once). Every
        daemon on the key should have the same: the rate limit is the key's."""
        margin = self._margin if margin is None else margin
        _check(limit=limit, period=period, margin=margin)
        self._limit, self._period, self._margin = limit, period, margin
        self._wake()

    def snapshot(self) -> list[Slot]:
        """The key's slots that still matter now, as the last grant read them and with this
        daemon's since, on the database's clock."""
        slots = dict(self._seen_slots)
        slots.update((i, h.slot) for i, h in self._handles.items())
        for i, p in self._pending.items():
            if p.discard:
                slots.pop(i, None)
        return prune(list(slots.values()), self.db_now(), period=self._period, margin=self._margin)

    def next_start(self) -> float | None:
        """When a new request could start, on the database's clock, from :meth:`snapshot`
        (the shared hold and pause aside: see :attr:`state`)."""
        return next_start(
            self.snapshot(), self.db_now(), limit=self._limit, period=self._period, margin=self._margin
        )

    def db_now(self) -> float:
        """The database's clock now as this machine knows it (at most a few milliseconds
        late; this machine's clock before the first transaction)."""
        return self._db_upper()

    @property
    def state(self) -> SharedState | None:
        """The key's shared state as last seen (a grant, a notification, one of the methods
        below), or None before any."""
        return self._state

    @property
    def listening(self) -> bool:
        """Is the notification listener connected? (Without it waiters poll more often.)"""
        return self._listening

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[SharedSlotHandle]:
        """Acquire a slot; on exit mark it sent (if not yet) and release it."""
        handle = await self.acquire()
        try:
            yield handle
        except BaseException:
            handle.release(ok=False)
            raise
        handle.release(ok=True)

    async def acquire(self) -> SharedSlotHandle:
        """Wait until a request may start, then record its slot and return its handle.
        Raises :class:`QueueUnavailable` when the database cannot be reached."""
        self._ensure_started()
        assert self._acquiring is not None
        async with self._acquiring:  # FIFO among this daemon's acquirers
            while True:
                generation = self._generation
                got = await self._grant()
                if isinstance(got, SharedSlotHandle):
                    return got
                if self._generation == generation:  # (else something changed meanwhile)
                    await self._wait(got)

    async def try_acquire(self) -> SharedSlotHandle | Verdict:
        """One grant attempt: the handle, or the :class:`Verdict` saying until when (on the
        database's clock) or for what it would have to wait."""
        self._ensure_started()
        assert self._acquiring is not None
        async with self._acquiring:
            got = await self._grant()
        return got if isinstance(got, SharedSlotHandle) else got[1]

    # --- the shared state ----------------------------------------------------------------

    async def shared_state(self) -> SharedState:
        """The key's shared row, read now."""
        async with self._transaction() as tx:
            state = await self._read_state(tx.conn)
        return self._seen(state)

    async def outage(self, handle: SharedSlotHandle, delay: Callable[[int], float]) -> SharedState:
        """The request of ``handle`` failed service-wide (429, 5xx, no connection): one more
        step of the outage unless one was counted since it started (:func:`outage_step`),
        and a hold of ``delay(streak)`` seconds from now (a longer one in force stays). Call
        it before releasing the handle: until then its open slot keeps the other daemons
        from sending a probe of their own at the same moment."""
        async with self._transaction() as tx:
            state = await self._read_state(tx.conn)
            streak, step_at = outage_step(
                state.outage_streak, state.outage_step_at, started=handle.slot.started, now=state.now
            )
            hold = max(state.hold_until, state.now + max(0.0, delay(streak)))
            state = replace(state, hold_until=hold, outage_streak=streak, outage_step_at=step_at)
            await tx.conn.execute(
                "UPDATE rate_keys SET hold_until = %s, outage_streak = %s, outage_step_at = %s "
                "WHERE key_id = %s",
                (hold, streak, step_at, self._key_id),
            )
            await self._notify(tx.conn, state.to_json())
        return self._seen(state)

    async def recovered(self) -> SharedState:
        """A request got an answer that says the service is back: the outage is over for
        every daemon (a hold in force stays). Written only when the streak was not zero."""
        async with self._transaction() as tx:
            state = await self._read_state(tx.conn)
            if state.outage_streak:
                state = replace(state, outage_streak=0)
                await tx.conn.execute(
                    "UPDATE rate_keys SET outage_streak = 0 WHERE key_id = %s", (self._key_id,)
                )
                await self._notify(tx.conn, state.to_json())
        return self._seen(state)

    async def pause(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Pause the key for every daemon (401/402/403) unless it is paused already:
        ``(the pause in force, whether it is this record)``."""
        async with self._transaction() as tx:
            state = await self._read_state(tx.conn)
            if state.pause is None:
                state = replace(state, pause=dict(record))
                await tx.conn.execute(
                    "UPDATE rate_keys SET pause = %s WHERE key_id = %s", (json.dumps(record), self._key_id)
                )
                await self._notify(tx.conn, state.to_json())
                new = True
            else:
                new = False
        self._seen(state)
        assert state.pause is not None
        return state.pause, new

    async def resume(self) -> dict[str, Any] | None:
        """End the key's pause for every daemon; the pause that ended, or None."""
        async with self._transaction() as tx:
            state = await self._read_state(tx.conn)
            was = state.pause
            if was is not None:
                state = replace(state, pause=None)
                await tx.conn.execute("UPDATE rate_keys SET pause = NULL WHERE key_id = %s", (self._key_id,))
                await self._notify(tx.conn, state.to_json())
        self._seen(state)
        return was

    async def heartbeat(self) -> None:
        """Write this daemon's heartbeat (``daemons``; the row is created when missing).
        The background task does it every ``heartbeat_seconds``, every grant too."""
        async with self._transaction(writes=True) as tx:
            await self._timed(tx.conn, BEAT, self._daemon.params())

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background tasks (never raises for the database)."""
        self._ensure_started()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the background tasks; write what is pending, close what is left open and
        mark this daemon stopped (best effort, within ``timeout``); disconnect. Call it
        once no request of this daemon is in flight."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        if self._grants is not None:
            self._live.clear()  # (everything still open is over now)
            self._repair = True
            with contextlib.suppress(QueueUnavailable, TimeoutError):
                await asyncio.wait_for(self._stop_daemon(), timeout)
        for link in (self._grants, self._writes):
            if link is not None and link.conn is not None:
                with contextlib.suppress(Exception):
                    await link.conn.close()
                link.conn = None

    async def __aenter__(self) -> SharedPacer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- internals: connections and transactions -----------------------------------------

    def _ensure_started(self) -> None:
        if self._grants is None:
            self._grants, self._writes = _Link(), _Link()
            self._acquiring = asyncio.Lock()
        if not self._tasks and not self._closed:
            self._tasks = [
                asyncio.create_task(self._write_loop(), name="pgpace-writes"),
                asyncio.create_task(self._listen_loop(), name="pgpace-listen"),
            ]

    async def _connect(self, link: _Link) -> psycopg.AsyncConnection[Any]:
        conn = link.conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        link.conn = None
        try:
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            for name, value in SESSION_SETTINGS.items():
                await conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        except psycopg.OperationalError as exc:
            raise QueueUnavailable(f"the shared rate limit's database: {exc}") from exc
        link.conn = conn
        if link is self._grants:
            self._listen_pid = conn.info.backend_pid
            self._repair = True  # a grant before the break may have committed unconfirmed
        return conn

    @asynccontextmanager
    async def _transaction(self, *, writes: bool = False) -> AsyncIterator[_Tx]:
        """A transaction on the grants connection (``writes``: the other one). The handles'
        queued writes are made first, and (grants connection) own open slots that no handle
        holds are closed, each in a transaction of its own that never waits for the key's
        row (so no transaction that holds a slot row waits for it: no deadlock with another
        daemon's pruning). psycopg's OperationalError (server gone) becomes
        :class:`QueueUnavailable`; a failed grants transaction means a repair next time."""
        self._ensure_started()
        link = self._writes if writes else self._grants
        assert link is not None
        async with link.lock:
            conn = await self._connect(link)
            tx = _Tx(conn)
            try:
                if self._pending:
                    first = _Tx(conn)
                    try:
                        async with conn.transaction():
                            await self._write_pending(first)
                    except BaseException:
                        for then in first.undo:
                            then()
                        raise
                    for then in first.after:
                        then()
                if self._repair and not writes:  # (no grant of ours is under way meanwhile)
                    async with conn.transaction():
                        await conn.execute(CLOSE_ORPHANS, (self._daemon.id, list(self._live)))
                    self._repair = False
                async with conn.transaction():
                    yield tx
            except BaseException as exc:
                self._repair |= not writes
                for then in tx.undo:
                    then()
                if _cancelled():  # (psycopg's rollback may have replaced the CancelledError)
                    raise asyncio.CancelledError() from exc
                gone = conn.broken or conn.closed
                if gone or isinstance(exc, psycopg.OperationalError):
                    link.conn = None
                    with contextlib.suppress(Exception):
                        await conn.close()
                if isinstance(exc, psycopg.OperationalError) or (gone and isinstance(exc, psycopg.Error)):
                    raise QueueUnavailable(f"the shared rate limit's database: {exc}") from exc
                raise
            for then in tx.after:
                then()

    async def _timed(self, conn: psycopg.AsyncConnection[Any], query: str, params: Any) -> list[Any]:
        """The rows of ``query``, whose first column is the database's clock (which bounds
        the offset between the clocks)."""
        before = time.monotonic()
        rows = await (await conn.execute(query.encode() if params is None else query, params)).fetchall()
        self._clock.measured(float(rows[0][0]), before)
        return rows

    def _db_upper(self) -> float:
        now = self._clock.now()
        return time.time() if now is None else now

    async def _read_state(self, conn: psycopg.AsyncConnection[Any], *, read_now: bool = True) -> SharedState:
        """The key's row, locked (created when missing), and the database's clock read once
        the lock is held (unless not wanted)."""
        row = await (await conn.execute(KEY_ROW, (self._key_id,))).fetchone()
        if row is None:
            await conn.execute(
                "INSERT INTO rate_keys (key_id) VALUES (%s) ON CONFLICT DO NOTHING", (self._key_id,)
            )
            row = await (await conn.execute(KEY_ROW, (self._key_id,))).fetchone()
            assert row is not None
        now = float((await self._timed(conn, f"SELECT {DB_NOW}", None))[0][0]) if read_now else 0.0
        pause = row[3] if isinstance(row[3], dict) else None
        return SharedState(float(row[0]), int(row[1]), float(row[2]), pause, now)

    async def _notify(self, conn: psycopg.AsyncConnection[Any], payload: str) -> None:
        await conn.execute("SELECT pg_notify(%s, %s)", (self._channel, payload))

    # --- internals: granting ----------------------------------------------------------------

    async def _grant(self) -> SharedSlotHandle | tuple[float | None, Verdict]:
        """One grant transaction: the handle (committed), or ``(seconds to wait or None,
        verdict)``."""
        granted: list[int] = []
        async with self._transaction() as tx:
            tx.undo.append(lambda: self._live.difference_update(granted))
            state = await self._read_state(tx.conn, read_now=False)
            found = await self._timed(tx.conn, SLOTS, (self._key_id,))  # (now: after the lock)
            now = float(found[0][0])
            state = replace(state, now=now)
            rows = [
                SlotRow(int(r[1]), float(r[2]), _f(r[3]), _f(r[4]), str(r[5]), _f(r[6]), _f(r[7]))
                for r in found
                if r[1] is not None
            ]
            views = window_view(rows, now, lease=self._lease, me=self._daemon.id)
            gone = {v.id for v in views if _over(v.slot, now, self._period, self._margin)}
            if gone:
                await tx.conn.execute("DELETE FROM rate_slots WHERE id = ANY(%s)", (list(gone),))
            views = [v for v in views if v.id not in gone]
            verdict = decide(
                [v.slot for v in views],
                state,
                now,
                limit=self._limit,
                period=self._period,
                margin=self._margin,
                others_open=sum(1 for v in views if v.open),
            )
            if verdict.start is not None and verdict.start <= now:
                params = {"key": self._key_id, "now": now, **self._daemon.params()}
                row = await (await tx.conn.execute(GRANT, params)).fetchone()
                assert row is not None
                granted.append(int(row[0]))
                self._live.add(granted[0])  # (undone when the commit fails; repaired next time)
        self._seen(state)
        self._seen_slots = {v.id: v.slot for v in views}
        if granted:
            slot = Slot(started=now, sent=None)
            handle = SharedSlotHandle(self, granted[0], slot)
            self._handles[handle.id] = handle
            self._seen_slots[handle.id] = slot
            return handle
        return (None if verdict.start is None else max(0.0, verdict.start - now)), verdict

    async def _wait(self, got: tuple[float | None, Verdict]) -> None:
        """Sleep until the computed start, a notification, a reconfigure, or the poll cap
        (shorter while the listener is not connected)."""
        seconds, _ = got
        cap = self._poll if self._listening else min(self._poll, 0.25)
        timeout = cap if seconds is None else min(seconds, cap)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            self._waiters.discard(waiter)
            waiter.cancel()

    def _wake(self) -> None:
        self._generation += 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _seen(self, state: SharedState) -> SharedState:
        """Remember the key's state (unless an older read than the one known; the row is
        locked by every read, so the database's clock orders them); tell ``on_state`` and
        wake the waiters when it changed."""
        was = self._state
        if was is not None and state.now < was.now:
            return was
        self._state = state
        if was is not None and replace(was, now=0.0) == replace(state, now=0.0):
            return state
        if was is not None:
            self._wake()
        if self._on_state is not None:
            self._on_state(state)
        return state

    # --- internals: the handles' writes ----------------------------------------------------

    def _queue(self, slot_id: int, change: _Pending) -> None:
        self._pending.setdefault(slot_id, _Pending()).merge(change)
        if change.released or change.discard:
            self._live.discard(slot_id)
        if self._kick is not None and not self._kick.done():
            self._kick.set_result(None)

    async def _write_pending(self, tx: _Tx) -> None:
        """The handles' queued writes, announced on the key's channel; queued again when the
        transaction does not commit (they are idempotent)."""
        taken, self._pending = self._pending, {}

        def put_back() -> None:
            for slot_id, change in taken.items():
                self._pending.setdefault(slot_id, _Pending()).merge(change)

        tx.undo.append(put_back)
        gone = [i for i, p in taken.items() if p.discard]
        kept = [(i, p) for i, p in taken.items() if not p.discard]
        if gone:
            await tx.conn.execute("DELETE FROM rate_slots WHERE id = ANY(%s)", (gone,))
        recorded: list[tuple[Any, ...]] = []
        if kept:
            params = {
                "ids": [i for i, _ in kept],
                "sent": [p.sent for _, p in kept],
                "released": [p.released for _, p in kept],
            }
            recorded = await (await tx.conn.execute(WRITE_SLOTS, params)).fetchall()
        await self._notify(tx.conn, "slots")

        def done() -> None:
            for slot_id, sent in recorded:
                handle = self._handles.get(int(slot_id))
                if handle is not None:
                    handle._recorded(_f(sent))
            for slot_id in gone + [i for i, p in kept if p.released]:
                self._handles.pop(slot_id, None)
                self._seen_slots.pop(slot_id, None)

        tx.after.append(done)

    async def _stop_daemon(self) -> None:
        async with self._transaction() as tx:
            await tx.conn.execute(
                f"UPDATE daemons SET stopped_at = {DB_NOW} WHERE id = %s", (self._daemon.id,)
            )

    # --- internals: background ---------------------------------------------------------------

    async def _write_loop(self) -> None:
        """The handles' writes at once, the heartbeat every ``heartbeat_seconds``; while the
        database is away, again with backoff."""
        loop = asyncio.get_running_loop()
        backoff = BACKOFF[0]
        next_beat = 0.0
        while True:
            self._kick = loop.create_future()
            try:
                if time.monotonic() >= next_beat:
                    await self.heartbeat()  # (the writes first, as in every transaction)
                    next_beat = time.monotonic() + self._heartbeat_every
                elif self._pending:
                    async with self._transaction(writes=True):
                        pass
                backoff = BACKOFF[0]
            except Exception as exc:
                if _cancelled():
                    raise asyncio.CancelledError() from exc
                if not isinstance(exc, QueueUnavailable):
                    _log.exception("shared_rate_write_failed")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF[1])
                continue
            if not self._pending:
                await asyncio.wait({self._kick}, timeout=max(0.0, next_beat - time.monotonic()))

    async def _listen_loop(self) -> None:
        """LISTEN on the key's channel: every notification wakes the waiters, a state in it
        is the key's. Reconnects with backoff (waiters poll meanwhile)."""
        backoff = BACKOFF[0]
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                self._listening = True
                backoff = BACKOFF[0]
                self._wake()  # (what changed while nobody listened)
                async for note in conn.notifies():
                    if note.pid == self._listen_pid:
                        continue  # our own grants connection's: seen already
                    if note.payload.startswith("{"):
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            self._seen(SharedState.from_json(note.payload))
                    self._wake()
            except Exception as exc:
                if _cancelled():
                    raise asyncio.CancelledError() from exc
                if not isinstance(exc, psycopg.Error):
                    _log.exception("shared_rate_listener_failed")
            finally:
                self._listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF[1])


def _cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _f(value: Any) -> float | None:
    return None if value is None else float(value)


def _over(slot: Slot, now: float, period: float, margin: float) -> bool:
    """Does the slot no longer matter at ``now`` (nor later)?"""
    return slot.sent is not None and slot.sent + period + margin <= now
