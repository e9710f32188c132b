"""When may the next request start?

The server allows ``limit`` requests per ``period`` seconds in a strict sliding window: a
request arriving at ``t`` is rejected when ``limit`` requests arrived in ``(t - period,
t]``. We never see the server's arrival time, only that it lies between the moment we
started a request (``Slot.started``) and the moment its body was fully sent
(``Slot.sent``; any later moment, such as when the response headers arrived, is also a
safe value). So a recorded slot may still be in the server's window at ``T`` while
``sent + period + margin > T``, and a slot whose ``sent`` is unknown may be in it at any
time. A new request may start at the earliest ``T >= now`` at which fewer than
``limit`` recorded slots may still be in the window.

This guarantees that no window of ``period`` seconds ever holds more than ``limit``
arrivals, however the arrivals fall inside their ``[started, sent]`` intervals and in
whatever order concurrent requests reach the server.

:func:`next_start` and :func:`prune` are pure; :class:`Pacer` does the waiting.
Times are wall-clock seconds so that slots survive a restart; the daemon's clock is a
:class:`dropcut.clock.RunClock`, which never steps within a run (a slot restored from the
future is pulled back to now).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

__all__ = ["Pacer", "Slot", "SlotHandle", "next_start", "prune"]


@dataclass(frozen=True)
class Slot:
    """One request as the rate limiter sees it."""

    started: float  # when we began sending (wall-clock seconds)
    sent: float | None  # when the body was fully out; None while unknown


def _check(*, limit: int | None = None, period: float, margin: float) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit}")
    if not period >= 0:
        raise ValueError(f"period must be >= 0, not {period!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, not {margin!r}")


def next_start(
    slots: Sequence[Slot], now: float, *, limit: int, period: float, margin: float
) -> float | None:
    """The earliest ``T >= now`` at which a new request may start.

    ``None`` when ``limit`` or more slots have an unknown ``sent``: the caller must wait
    for one of them to complete.
    """
    _check(limit=limit, period=period, margin=margin)
    unknown = sum(1 for slot in slots if slot.sent is None)
    if unknown >= limit:
        return None
    # A known slot counts at T while sent + period + margin > T.
    leaves = sorted(
        end for slot in slots if slot.sent is not None and (end := slot.sent + period + margin) > now
    )
    excess = unknown + len(leaves) - limit + 1  # how many must leave first
    if excess <= 0:
        return now
    return leaves[excess - 1]


def prune(slots: Sequence[Slot], now: float, *, period: float, margin: float) -> list[Slot]:
    """The slots that may still matter at ``now`` or later, in their original order.

    A slot with a known ``sent`` stops mattering once ``sent + period + margin <= now``;
    a slot with an unknown ``sent`` always matters.
    """
    _check(period=period, margin=margin)
    return [slot for slot in slots if slot.sent is None or slot.sent + period + margin > now]


class SlotHandle:
    """One acquired slot. Report when the body was sent; release when done.

    Both are idempotent: the first recorded ``sent`` stays. A handle that is released
    without ``mark_sent`` gets ``sent = clock()`` (conservative: a request that failed,
    even before its body went out, still counts).
    """

    __slots__ = ("_key", "_pacer", "_released", "_slot")

    def __init__(self, pacer: Pacer, key: int, slot: Slot) -> None:
        self._pacer = pacer
        self._key = key
        self._slot = slot
        self._released = False

    @property
    def slot(self) -> Slot:
        """This request's slot as recorded (kept after the pacer prunes it)."""
        return self._slot

    @property
    def released(self) -> bool:
        return self._released

    def mark_sent(self, t: float | None = None) -> None:
        """Record that the request body was fully sent at ``t`` (default: now).

        Any later moment is safe too; a ``t`` before the slot's start is raised to it.
        """
        if self._slot.sent is None:
            self._slot = self._pacer._mark_sent(self._key, t)

    def discard(self) -> None:
        """No request was started with this slot after all (the file went away while it
        waited): the slot is removed as if it had never been taken, and the next waiter
        may have it. Only valid before anything was sent; idempotent with :meth:`release`."""
        if self._released:
            return
        self._released = True
        self._pacer._discard(self._key)

    def release(self, *, ok: bool = True) -> None:
        """Done with the request. ``ok=False`` says it failed; the slot counts either way."""
        if self._released:
            return
        self._released = True
        self.mark_sent()


class Pacer:
    """Async gate: ``async with pacer.slot() as s: ... s.mark_sent()``.

    Safe for many concurrent acquirers on one event loop; waiters are served in order.
    ``history`` restores persisted slots (a slot with ``sent=None`` means the process
    died mid-request: it gets ``sent = clock()``). ``on_change`` receives the pruned
    slot list every time it changes (the daemon persists it); it should not raise (if it
    does, the exception reaches the caller after the pacer's own state is updated).
    """

    def __init__(
        self,
        *,
        limit: int,
        period: float,
        margin: float = 0.01,
        clock: Callable[[], float] = time.time,
        history: Iterable[Slot] = (),
        on_change: Callable[[list[Slot]], None] | None = None,
    ) -> None:
        _check(limit=limit, period=period, margin=margin)
        self._limit = limit
        self._period = period
        self._margin = margin
        self._clock = clock
        self._on_change = on_change
        self._waiters: set[asyncio.Future[None]] = set()
        self._lock: asyncio.Lock | None = None
        self._next_key = 0
        self._slots: dict[int, Slot] = {}
        now = clock()
        given = list(history)
        restored = prune([_restore(slot, now) for slot in given], now, period=period, margin=margin)
        for slot in restored:
            self._slots[self._new_key()] = slot
        if restored != given:
            self._changed(notify=False)

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def period(self) -> float:
        return self._period

    @property
    def margin(self) -> float:
        return self._margin

    def reconfigure(self, *, limit: int, period: float, margin: float | None = None) -> None:
        """New limits, effective for the next acquire (waiters re-check at once)."""
        margin = self._margin if margin is None else margin
        _check(limit=limit, period=period, margin=margin)
        self._limit = limit
        self._period = period
        self._margin = margin
        self._wake()

    def snapshot(self) -> list[Slot]:
        """The slots that still matter now."""
        return prune(list(self._slots.values()), self._clock(), period=self._period, margin=self._margin)

    def next_start(self) -> float | None:
        """When a new request could start now, as :func:`next_start` sees it."""
        return next_start(
            list(self._slots.values()),
            self._clock(),
            limit=self._limit,
            period=self._period,
            margin=self._margin,
        )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[SlotHandle]:
        """Acquire a slot; on exit mark it sent (if not yet) and release it."""
        handle = await self.acquire()
        try:
            yield handle
        except BaseException:
            handle.release(ok=False)
            raise
        handle.release(ok=True)

    async def acquire(self) -> SlotHandle:
        """Wait until a request may start, then record its slot and return its handle."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # FIFO among acquirers; one of them waits on the window
            while True:
                now = self._clock()
                pruned = self._prune(now)
                start = next_start(
                    list(self._slots.values()),
                    now,
                    limit=self._limit,
                    period=self._period,
                    margin=self._margin,
                )
                if start is not None and start <= now:
                    key = self._new_key()
                    slot = Slot(started=now, sent=None)
                    self._slots[key] = slot
                    handle = SlotHandle(self, key, slot)
                    try:
                        self._changed(notify=False)
                    except BaseException:
                        handle.release(ok=False)  # never leave an unknown slot behind
                        raise
                    return handle
                if pruned:
                    self._changed(notify=False)
                await self._wait(None if start is None else start - now)

    # --- internals ------------------------------------------------------------------

    def _new_key(self) -> int:
        self._next_key += 1
        return self._next_key

    def _mark_sent(self, key: int, t: float | None) -> Slot:
        now = self._clock()
        slot = self._slots[key]  # an unknown `sent` is never pruned
        if slot.sent is not None:
            return slot
        slot = Slot(started=slot.started, sent=max(now if t is None else t, slot.started))
        self._slots[key] = slot
        self._prune(now)
        self._changed(notify=True)
        return slot

    def _discard(self, key: int) -> None:
        self._slots.pop(key, None)
        self._changed(notify=True)

    def _prune(self, now: float) -> bool:
        """Drop the slots that no longer matter; True when some were dropped."""
        gone = [
            key
            for key, slot in self._slots.items()
            if slot.sent is not None and slot.sent + self._period + self._margin <= now
        ]
        for key in gone:
            del self._slots[key]
        return bool(gone)

    def _changed(self, *, notify: bool) -> None:
        if notify:
            self._wake()
        if self._on_change is not None:
            self._on_change(list(self._slots.values()))

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        """Sleep until ``timeout`` passes or something changes, whichever comes first."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            self._waiters.discard(waiter)
            waiter.cancel()


def _restore(slot: Slot, now: float) -> Slot:
    """A persisted slot as seen after a restart at ``now``.

    Unknown ``sent`` (the process died mid-request, no later than now) becomes ``now``;
    times in the future (the wall clock stepped back) are pulled back to ``now``.
    """
    sent = now if slot.sent is None else min(slot.sent, now)
    return Slot(started=min(slot.started, sent), sent=sent)
