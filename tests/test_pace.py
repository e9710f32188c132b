"""Tests for dropcut.pace: the sliding-window gate in front of the API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from dropcut.pace import Pacer, Slot, SlotHandle, next_start, prune


def known(*sents: float) -> list[Slot]:
    """Slots whose body went out at ``sents`` (each started 1 s earlier)."""
    return [Slot(started=s - 1.0, sent=s) for s in sents]


def unknown(n: int, started: float = 99.0) -> list[Slot]:
    return [Slot(started=started, sent=None) for _ in range(n)]


# --- next_start -----------------------------------------------------------------------

NOW = 100.0

NEXT_START_CASES: list[tuple[str, list[Slot], int, float, float, float | None]] = [
    # (id, slots, limit, period, margin, expected) -- all at now = 100
    ("empty", [], 3, 10.0, 0.0, 100.0),
    ("empty-with-margin", [], 3, 10.0, 0.5, 100.0),
    ("under-limit", known(95, 96), 3, 10.0, 0.0, 100.0),
    ("exactly-at-limit", known(95, 96, 97), 3, 10.0, 0.0, 105.0),
    ("at-limit-unsorted", known(97, 95, 96), 3, 10.0, 0.0, 105.0),
    ("over-limit-waits-for-second-oldest", known(95, 96, 97, 98), 3, 10.0, 0.0, 106.0),
    ("oldest-left-the-window", known(89.5, 96, 97), 3, 10.0, 0.0, 100.0),
    ("oldest-leaves-exactly-now", known(90, 96, 97), 3, 10.0, 0.0, 100.0),
    ("margin-delays", known(95, 96, 97), 3, 10.0, 0.5, 105.5),
    ("margin-keeps-an-old-slot-in", known(89.8, 96, 97), 3, 10.0, 0.5, 100.3),
    ("limit-one", known(99), 1, 10.0, 0.0, 109.0),
    ("only-sent-matters-not-started", [Slot(started=10.0, sent=96.0)], 1, 10.0, 0.0, 106.0),
    ("sent-in-the-future", known(120), 1, 10.0, 0.0, 130.0),
    ("zero-period", known(100, 100), 2, 0.0, 0.0, 100.0),
    ("unknown-blocks-with-known", unknown(1) + known(95, 96), 3, 10.0, 0.0, 105.0),
    ("unknown-among-known-enough-free", unknown(1) + known(80, 96), 3, 10.0, 0.0, 100.0),
    ("unknowns-under-limit", unknown(2), 3, 10.0, 0.0, 100.0),
    ("unknowns-and-known-over-limit", unknown(2) + known(95, 96, 97), 3, 10.0, 0.0, 107.0),
    ("limit-reached-by-unknowns", unknown(3), 3, 10.0, 0.0, None),
    ("more-unknowns-than-limit", unknown(4) + known(50), 3, 10.0, 0.0, None),
    ("old-unknown-still-counts", unknown(3, started=0.0), 3, 10.0, 0.0, None),
    ("api-default-7-per-minute", known(*range(41, 48)), 7, 60.0, 0.01, 101.01),
]


@pytest.mark.parametrize(
    ("slots", "limit", "period", "margin", "expected"),
    [pytest.param(s, lim, p, m, e, id=i) for i, s, lim, p, m, e in NEXT_START_CASES],
)
def test_next_start(
    slots: list[Slot], limit: int, period: float, margin: float, expected: float | None
) -> None:
    got = next_start(slots, NOW, limit=limit, period=period, margin=margin)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("limit", "period", "margin"),
    [
        pytest.param(0, 10.0, 0.0, id="zero-limit"),
        pytest.param(3, -1.0, 0.0, id="negative-period"),
        pytest.param(3, 10.0, -0.1, id="negative-margin"),
        pytest.param(3, float("nan"), 0.0, id="nan-period"),
    ],
)
def test_next_start_rejects(limit: int, period: float, margin: float) -> None:
    with pytest.raises(ValueError):
        next_start([], NOW, limit=limit, period=period, margin=margin)


# --- prune ----------------------------------------------------------------------------

PRUNE_CASES: list[tuple[str, list[Slot], float, float, list[Slot]]] = [
    # (id, slots, period, margin, expected) -- all at now = 100
    ("empty", [], 10.0, 0.0, []),
    ("keeps-recent", known(95, 96), 10.0, 0.0, known(95, 96)),
    ("drops-old", known(80, 95, 85, 96), 10.0, 0.0, known(95, 96)),
    ("drops-exactly-at-the-edge", known(90, 91), 10.0, 0.0, known(91)),
    ("margin-keeps", known(89.8, 91), 10.0, 0.5, known(89.8, 91)),
    ("keeps-unknown-forever", unknown(1, started=0.0) + known(50), 10.0, 0.0, unknown(1, 0.0)),
    (
        "keeps-order",
        [Slot(98, None), *known(97), Slot(50, None), *known(96)],
        10.0,
        0.0,
        [Slot(98, None), *known(97), Slot(50, None), *known(96)],
    ),
]


@pytest.mark.parametrize(
    ("slots", "period", "margin", "expected"),
    [pytest.param(s, p, m, e, id=i) for i, s, p, m, e in PRUNE_CASES],
)
def test_prune(slots: list[Slot], period: float, margin: float, expected: list[Slot]) -> None:
    assert prune(slots, NOW, period=period, margin=margin) == expected


def test_prune_never_changes_next_start() -> None:
    slots = unknown(1) + known(80, 89.99, 90, 93, 96, 99.5)
    for limit in range(1, 8):
        for margin in (0.0, 0.01, 0.5):
            kept = prune(slots, NOW, period=10.0, margin=margin)
            assert next_start(kept, NOW, limit=limit, period=10.0, margin=margin) == next_start(
                slots, NOW, limit=limit, period=10.0, margin=margin
            )


# --- Pacer with a fake clock (no waiting) ---------------------------------------------


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[Slot]] = []

    def __call__(self, slots: list[Slot]) -> None:
        self.calls.append(slots)


HISTORY_CASES: list[tuple[str, list[Slot], list[Slot], bool]] = [
    # (id, history, snapshot right after construction at t=100, on_change called)
    ("nothing", [], [], False),
    ("recent-kept-as-is", known(95, 96), known(95, 96), False),
    ("old-dropped", known(50, 96), known(96), True),
    ("died-mid-request", [Slot(99.0, None)], [Slot(99.0, 100.0)], True),
    ("died-long-ago-still-counts", [Slot(10.0, None)], [Slot(10.0, 100.0)], True),
    ("clock-stepped-back", [Slot(120.0, 121.0)], [Slot(100.0, 100.0)], True),
]


@pytest.mark.parametrize(
    ("history", "expected", "reported"),
    [pytest.param(h, e, r, id=i) for i, h, e, r in HISTORY_CASES],
)
def test_pacer_restores_history(history: list[Slot], expected: list[Slot], reported: bool) -> None:
    record = Recorder()
    pacer = Pacer(limit=3, period=10.0, margin=0.0, clock=FakeClock(100.0), history=history, on_change=record)
    assert pacer.snapshot() == expected
    assert record.calls == ([expected] if reported else [])


def test_pacer_history_blocks_after_restart() -> None:
    clock = FakeClock(100.0)
    pacer = Pacer(limit=2, period=10.0, margin=0.0, clock=clock, history=[Slot(99.0, None)] * 2)
    assert pacer.next_start() == 110.0


def test_pacer_reports_every_change() -> None:
    clock = FakeClock(100.0)
    record = Recorder()
    pacer = Pacer(limit=2, period=10.0, margin=0.0, clock=clock, on_change=record)

    async def scenario() -> None:
        first = await pacer.acquire()
        assert record.calls[-1] == [Slot(100.0, None)]
        clock.t = 101.0
        first.mark_sent()
        assert record.calls[-1] == [Slot(100.0, 101.0)]
        first.mark_sent(105.0)  # the first sent time stays
        first.release()  # already sent: nothing changes
        assert len(record.calls) == 2
        second = await pacer.acquire()
        assert record.calls[-1] == [Slot(100.0, 101.0), Slot(101.0, None)]
        second.mark_sent(90.0)  # before its start: raised to the start
        assert second.slot == Slot(101.0, 101.0)
        clock.t = 112.0
        third = await pacer.acquire()  # both old slots leave in the same change
        assert record.calls[-1] == [Slot(112.0, None)]
        assert len(record.calls) == 5
        clock.t = 113.0
        third.release(ok=False)  # failed before sending: counts from the failure time
        assert record.calls[-1] == [Slot(112.0, 113.0)]
        assert third.released

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fail", "marked_at", "expected_sent"),
    [
        pytest.param(False, None, 101.0, id="clean-exit-marks-sent"),
        pytest.param(True, None, 101.0, id="exception-marks-sent"),
        pytest.param(False, 100.5, 100.5, id="clean-exit-keeps-mark"),
        pytest.param(True, 100.5, 100.5, id="exception-keeps-mark"),
    ],
)
def test_pacer_slot_context(fail: bool, marked_at: float | None, expected_sent: float) -> None:
    clock = FakeClock(100.0)
    pacer = Pacer(limit=2, period=10.0, margin=0.0, clock=clock)
    seen: list[SlotHandle] = []

    async def scenario() -> None:
        async with pacer.slot() as handle:
            seen.append(handle)
            if marked_at is not None:
                handle.mark_sent(marked_at)
            clock.t = 101.0
            if fail:
                raise OSError("upload failed")

    if fail:
        with pytest.raises(OSError, match="upload failed"):
            asyncio.run(scenario())
    else:
        asyncio.run(scenario())
    assert seen[0].released
    assert pacer.snapshot() == [Slot(100.0, expected_sent)]


def test_pacer_reconfigure_rejects_bad_values() -> None:
    pacer = Pacer(limit=2, period=10.0)
    with pytest.raises(ValueError):
        pacer.reconfigure(limit=0, period=10.0)
    assert (pacer.limit, pacer.period) == (2, 10.0)


# --- Pacer with real time -------------------------------------------------------------


def assert_window_respected(slots: Sequence[Slot], *, limit: int, period: float) -> None:
    """No server window of ``period`` can ever hold more than ``limit`` arrivals.

    Arrival times are unknown within [started, sent]; the guarantee that covers every
    possibility: at each slot's start, fewer than ``limit`` earlier-started slots may
    still be in the window (sent + period > start).
    """
    ordered = sorted(slots, key=lambda s: s.started)
    for i, later in enumerate(ordered):
        maybe_in_window = [s for s in ordered[:i] if s.sent is None or s.sent + period > later.started]
        assert len(maybe_in_window) < limit, (later, maybe_in_window)
    sents = sorted(s.sent for s in slots if s.sent is not None)
    for first, last in zip(sents, sents[limit:], strict=False):
        assert last - first >= period


def test_pacer_concurrent_workers_never_exceed_the_window() -> None:
    limit, period = 3, 0.6
    uploads = [0.0, 0.05, 0.01, 0.12, 0.0, 0.03, 0.2, 0.0, 0.07, 0.02]  # seconds
    answers = [0.1, 0.0, 0.3, 0.05, 0.2, 0.0, 0.1, 0.4, 0.0, 0.15]
    done: list[Slot] = []

    async def scenario() -> None:
        pacer = Pacer(limit=limit, period=period)
        jobs: asyncio.Queue[int] = asyncio.Queue()
        for i in range(10):
            jobs.put_nowait(i)

        async def worker() -> None:
            while not jobs.empty():
                i = jobs.get_nowait()
                async with pacer.slot() as handle:
                    await asyncio.sleep(uploads[i])
                    if i % 4 != 3:  # every fourth one "fails" and never marks sent
                        handle.mark_sent()
                    await asyncio.sleep(answers[i])
                done.append(handle.slot)

        await asyncio.gather(*(worker() for _ in range(4)))

    asyncio.run(scenario())
    assert len(done) == 10
    assert all(s.sent is not None for s in done)
    assert_window_respected(done, limit=limit, period=period)


def test_pacer_throughput_with_a_backlog() -> None:
    limit, period = 3, 0.6
    starts: list[float] = []
    done: list[Slot] = []

    async def scenario() -> None:
        pacer = Pacer(limit=limit, period=period)
        jobs: asyncio.Queue[int] = asyncio.Queue()
        for i in range(9):
            jobs.put_nowait(i)

        async def worker() -> None:
            while not jobs.empty():
                jobs.get_nowait()
                async with pacer.slot() as handle:
                    starts.append(time.time())
                    handle.mark_sent()
                done.append(handle.slot)

        await asyncio.gather(*(worker() for _ in range(4)))

    asyncio.run(scenario())
    assert_window_respected(done, limit=limit, period=period)
    first = starts[0]
    for i, started in enumerate(starts):
        batch = i // limit  # 1st..3rd at once, 4th..6th one period later, 7th..9th two
        assert first + batch * period <= started + 1e-3
        assert started <= first + batch * period + 0.1, (i, started - first)
    # at least 95% of limit/period over the backlog
    assert starts[-1] - first <= 2 * period / 0.95


def test_pacer_two_waiters_never_take_the_last_slot() -> None:
    async def scenario() -> None:
        pacer = Pacer(limit=2, period=0.3)
        held = await pacer.acquire()  # sent unknown: in the window until it is known
        waiters = [asyncio.create_task(pacer.acquire()) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert sum(w.done() for w in waiters) == 1
        assert sum(1 for s in pacer.snapshot() if s.sent is None) == 2
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        held.release()

    asyncio.run(scenario())


def test_pacer_wakes_when_a_slot_gets_its_sent_time() -> None:
    period = 0.2

    async def scenario() -> None:
        pacer = Pacer(limit=1, period=period, margin=0.0)
        held = await pacer.acquire()
        waiter = asyncio.create_task(pacer.acquire())
        await asyncio.sleep(0.15)
        assert not waiter.done()  # the unknown send time blocks for as long as it lasts
        sent = time.time()
        held.mark_sent(sent)
        second = await asyncio.wait_for(waiter, timeout=2)
        assert sent + period <= second.slot.started + 1e-3
        assert second.slot.started <= sent + period + 0.05

    asyncio.run(scenario())


def test_pacer_reconfigure_wakes_waiters() -> None:
    async def scenario() -> None:
        pacer = Pacer(limit=1, period=30.0)
        (await pacer.acquire()).mark_sent()
        waiter = asyncio.create_task(pacer.acquire())
        await asyncio.sleep(0.05)
        assert not waiter.done()
        began = time.monotonic()
        pacer.reconfigure(limit=2, period=30.0)
        await asyncio.wait_for(waiter, timeout=2)
        assert time.monotonic() - began < 0.1

    asyncio.run(scenario())


def test_pacer_cancelled_acquire_leaves_no_slot() -> None:
    async def scenario() -> None:
        pacer = Pacer(limit=1, period=30.0)
        (await pacer.acquire()).mark_sent()
        waiter = asyncio.create_task(pacer.acquire())
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert len(pacer.snapshot()) == 1
        pacer.reconfigure(limit=2, period=30.0)
        handle = await asyncio.wait_for(pacer.acquire(), timeout=1)  # the lock is free again
        handle.release()
        assert len(pacer.snapshot()) == 2

    asyncio.run(scenario())


def test_pacer_failing_on_change_leaves_no_unknown_slot() -> None:
    clock = FakeClock(100.0)
    calls: list[list[Slot]] = []

    def on_change(slots: list[Slot]) -> None:
        calls.append(slots)
        if len(calls) == 1:
            raise OSError("database is locked")

    pacer = Pacer(limit=1, period=10.0, margin=0.0, clock=clock, on_change=on_change)
    with pytest.raises(OSError, match="database is locked"):
        asyncio.run(pacer.acquire())
    assert pacer.snapshot() == [Slot(100.0, 100.0)]  # counted, but no longer unknown
    assert pacer.next_start() == 110.0
