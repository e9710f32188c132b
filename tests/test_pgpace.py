"""One rate limit per API key, shared by every daemon on it through PostgreSQL (issue 13,
item 3): grants decided under the key's row lock on the database's clock, never more than
the limit in any window however many daemons ask, the allowance used to the last slot, a
dead daemon's open slots freed after its lease, the outage hold and the account pause seen
by all, and the database going away as a condition of its own."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import pytest

from dropcut.pace import Slot
from dropcut.pgpace import (
    SCHEMA_STEP,
    QueueUnavailable,
    SharedPacer,
    SharedSlotHandle,
    SharedState,
    SlotRow,
    Verdict,
    decide,
    window_view,
)
from dropcut.pgschema import conninfo, key_id, migrate
from tests.fake_api import FakeWithoutBG
from tests.pg import PASSWORD, Cluster
from tests.support import REPO

T = TypeVar("T")
KEY = key_id("sk-test-shared-key")

# Every version of every slot row, kept after the pacers prune them: what the checks of
# "never more than the limit in any window" read.
SLOT_LOG = """
CREATE TABLE slot_log (
    id BIGINT PRIMARY KEY,
    key_id TEXT NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    sent DOUBLE PRECISION,
    owner TEXT NOT NULL,
    discarded BOOLEAN NOT NULL DEFAULT false
);
CREATE FUNCTION log_slot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE slot_log SET discarded = (OLD.sent IS NULL) WHERE id = OLD.id;
        RETURN OLD;
    END IF;
    INSERT INTO slot_log (id, key_id, started, sent, owner)
    VALUES (NEW.id, NEW.key_id, NEW.started, NEW.sent, NEW.owner)
    ON CONFLICT (id) DO UPDATE SET sent = EXCLUDED.sent;
    RETURN NEW;
END $$;
CREATE TRIGGER rate_slots_log AFTER INSERT OR UPDATE OR DELETE ON rate_slots
    FOR EACH ROW EXECUTE FUNCTION log_slot();
"""


@pytest.fixture
def db(pg: Cluster, pg_db: str) -> str:
    """The connection string of a fresh database with the shared schema (and the step
    pgpace needs, until pgschema has it), and the slot log."""
    info = conninfo(pg_db, PASSWORD)
    with psycopg.connect(info, autocommit=True) as conn:
        migrate(conn)
        conn.execute(SCHEMA_STEP.encode())  # (idempotent: a no-op once pgschema has it)
        conn.execute(SLOT_LOG.encode())
    return info


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Await until ``predicate()`` (sync or async) is truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def still_waiting(task: asyncio.Task[Any], seconds: float = 0.3) -> bool:
    """Is ``task`` still not done ``seconds`` from now? (It fails at once if it ends.)"""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return not done


def sql(info: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(info, autocommit=True) as conn:
        cur = conn.execute(query.encode() if params is None else query, params)
        return cur.fetchall() if cur.description else []


def db_now(info: str) -> float:
    return float(sql(info, "SELECT extract(epoch from clock_timestamp())::float8")[0][0])


def pacer(info: str, **kw: Any) -> SharedPacer:
    kw.setdefault("limit", 3)
    kw.setdefault("period", 10.0)
    kw.setdefault("margin", 0.01)
    return SharedPacer(info, key_id=kw.pop("key", KEY), **kw)


# --- 1. the grant, table-driven ---------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A slot already in the table, times in seconds before now (None: NULL)."""

    started: float
    sent: float | None
    owner: str = "alive"  # alive, dead (heartbeat 70 s ago), stopped (2 s ago), nobody
    released: float | None = None


@dataclass(frozen=True)
class Case:
    rows: tuple[Row, ...]
    expect: str  # "grant", or the verdict's reason
    wait: float | None = None  # seconds until the verdict's start (None: until a change)
    period: float = 10.0
    limit: int = 3
    hold: float = 0.0  # hold_until, seconds from now
    streak: int = 0
    paused: bool = False
    left: int | None = None  # rows of the key after the attempt


OWNERS = {
    # owner: (heartbeat seconds ago, stopped seconds ago)
    "alive": (1.0, None),
    "dead": (70.0, None),
    "stopped": (1.0, 2.0),
}
SENT2 = Row(started=2.1, sent=2.0)

CASES = {
    "an empty key grants": Case((), "grant", left=1),
    "two of three in the window: granted": Case((SENT2, SENT2), "grant", left=3),
    "three in the window: until the oldest leaves": Case((Row(3, 3), SENT2, SENT2), "window", 7.01),
    "three that left the window: granted, and pruned": Case((Row(11, 11),) * 3, "grant", left=1),
    "three unknown: until one is sent": Case((Row(1, None),) * 3, "window"),
    "a dead owner's unknown counts as heartbeat + lease": Case(
        (Row(75, None, "dead"),) * 3, "window", 10.01, period=20.0
    ),
    "... and leaves after period + margin": Case((Row(75, None, "dead"),) * 3, "grant", period=5.0, left=1),
    "a stopped owner's unknown counts as stopped": Case((Row(5, None, "stopped"),) * 3, "window", 8.01),
    "no daemons row: heartbeat = start, alive for the lease": Case((Row(30, None, "nobody"),) * 3, "window"),
    "no daemons row, older than the lease": Case((Row(70, None, "nobody"),) * 3, "grant", period=5.0, left=1),
    "a hold waits for its end": Case((), "hold", 5.0, hold=5.0, left=0),
    "a pause waits for the resume": Case((), "paused", paused=True, left=0),
    "an outage with a request in flight: no second probe": Case((Row(1.1, 1.0),), "probe", streak=1, left=1),
    "an outage with none in flight: the probe": Case(
        (Row(1.1, 1.0, released=0.5),), "grant", streak=1, left=2
    ),
    "an outage whose open slot's owner is dead: the probe": Case(
        (Row(75, None, "dead"),), "grant", streak=1, period=20.0, left=2
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_grant(db: str, case: Case) -> None:
    now = db_now(db)
    sql(
        db,
        "INSERT INTO rate_keys (key_id, hold_until, outage_streak, pause) VALUES (%s, %s, %s, %s)",
        (KEY, now + case.hold if case.hold else 0.0, case.streak, '{"code": "x"}' if case.paused else None),
    )
    for owner, (beat, stopped) in OWNERS.items():
        sql(
            db,
            "INSERT INTO daemons (id, site, host, pid, version, started_at, heartbeat_at, stopped_at) "
            "VALUES (%s, 's', 'h', 1, 'v', %s, %s, %s)",
            (owner, now - 100, now - beat, None if stopped is None else now - stopped),
        )
    for row in case.rows:
        sql(
            db,
            "INSERT INTO rate_slots (key_id, started, sent, released, owner) VALUES (%s, %s, %s, %s, %s)",
            (
                KEY,
                now - row.started,
                None if row.sent is None else now - row.sent,
                None if row.released is None else now - row.released,
                row.owner,
            ),
        )

    async def attempt() -> SharedSlotHandle | Verdict:
        async with pacer(db, limit=case.limit, period=case.period, lease_seconds=60.0) as p:
            return await p.try_acquire()

    got = run(attempt())
    if case.expect == "grant":
        assert isinstance(got, SharedSlotHandle), got
        assert got.slot.started >= now
    else:
        assert isinstance(got, Verdict) and got.reason == case.expect, got
        if case.wait is None:
            assert got.start is None
        else:
            assert got.start is not None and got.start - now == pytest.approx(case.wait, abs=0.5)
    if case.left is not None:
        assert sql(db, "SELECT count(*) FROM rate_slots")[0][0] == case.left


def test_window_view_and_decide_without_a_database() -> None:
    rows = [
        SlotRow(1, started=0.0, sent=None, released=None, owner="me"),
        SlotRow(2, started=0.0, sent=None, released=None, owner="gone", heartbeat_at=10.0),
        SlotRow(3, started=0.0, sent=5.0, released=None, owner="other", heartbeat_at=99.0),
    ]
    views = window_view(rows, 100.0, lease=60.0, me="me")
    assert [(v.slot, v.open) for v in views] == [
        (Slot(0.0, None), True),  # ours: never "dead"
        (Slot(0.0, 70.0), False),  # heartbeat + lease
        (Slot(0.0, 5.0), True),
    ]
    slots = [v.slot for v in views]
    # one unknown, and 70 + 40 > 100: two count; 5 + 40 does not
    full = decide(slots, SharedState(now=100.0), 100.0, limit=2, period=40.0, margin=0.0, others_open=2)
    assert full == Verdict(110.0, "window")
    free = decide(slots, SharedState(now=100.0), 100.0, limit=3, period=40.0, margin=0.0, others_open=2)
    assert free == Verdict(100.0, "free")
    paused = SharedState(pause={"code": "x"}, now=100.0)
    assert decide([], paused, 100.0, limit=3, period=1.0, margin=0.0, others_open=0) == Verdict(
        None, "paused"
    )
    held = SharedState(hold_until=105.0, outage_streak=1, now=100.0)
    assert decide([], held, 100.0, limit=3, period=10.0, margin=0.0, others_open=0) == Verdict(105.0, "hold")
    assert held.hold_seconds == 5.0
    assert SharedState.from_json(held.to_json()) == held


# --- 1b. the handle's writes ------------------------------------------------------------


def test_mark_sent_discard_and_release_reach_the_table(db: str) -> None:
    async def main() -> None:
        async with pacer(db, limit=3) as p:
            sent, dropped, done = [await p.acquire() for _ in range(3)]
            assert isinstance(await p.try_acquire(), Verdict)  # three unknown
            sent.mark_sent()
            dropped.discard()
            done.release()

            def rows() -> dict[int, tuple[Any, ...]]:
                got = sql(db, "SELECT id, started, sent, released FROM rate_slots")
                return {r[0]: r[1:] for r in got}

            await eventually(lambda: len(rows()) == 2 and all(r[1] is not None for r in rows().values()))
            table = rows()
            assert dropped.id not in table
            assert table[sent.id][1] >= table[sent.id][0] and table[sent.id][2] is None
            assert table[done.id][2] is not None
            assert sent.slot.sent == table[sent.id][1]  # the handle learns the recorded time
            assert sql(db, "SELECT discarded FROM slot_log WHERE id = %s", (dropped.id,)) == [(True,)]
            # the discarded slot is free again; then the window is full (two sent, one new)
            extra = await p.try_acquire()
            assert isinstance(extra, SharedSlotHandle)
            extra.release()
            full = await p.try_acquire()
            assert isinstance(full, Verdict) and full.reason == "window" and full.start is not None
            assert full.start == pytest.approx(sent.slot.sent + 10.01, abs=0.05)
            assert len(p.snapshot()) == 3 and p.next_start() == pytest.approx(full.start, abs=0.05)
            sent.release()

    run(main())


def test_own_open_slots_without_a_handle_are_closed_on_connecting(db: str) -> None:
    """A grant whose commit was not confirmed (or a previous run under the same id) leaves
    an open slot no handle holds: closed by the next transaction, it blocks nobody."""
    now = db_now(db)
    sql(db, "INSERT INTO rate_keys (key_id) VALUES (%s)", (KEY,))
    sql(
        db,
        "INSERT INTO rate_slots (key_id, started, owner) VALUES (%s, %s, 'station-1'), (%s, %s, 'station-1')",
        (KEY, now - 1, KEY, now - 1),
    )

    async def main() -> None:
        async with pacer(db, limit=3, owner="station-1") as p:
            await p.shared_state()
            rows = sql(db, "SELECT sent, released FROM rate_slots")
            assert rows and all(s is not None and r is not None for s, r in rows)
            handle = await p.try_acquire()  # 2 sent + 1: the last slot of the window
            assert isinstance(handle, SharedSlotHandle)
            handle.release()

    run(main())


# --- 1c. a daemon that dies ----------------------------------------------------------------


def worker(mode: str, info: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.pgpace_worker", mode, "--conninfo", info, "--key-id", KEY, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_a_dead_daemons_open_slot_is_freed_after_its_lease(
    db: str, workers: list[subprocess.Popen[str]]
) -> None:
    lease, period, margin = 1.5, 0.5, 0.01
    dead = worker("grab", db, "--limit", "1", "--period", str(period), "--margin", str(margin))
    workers.append(dead)
    assert dead.stdout is not None
    granted = json.loads(dead.stdout.readline())
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait(10)
    beat = sql(db, "SELECT heartbeat_at FROM daemons WHERE id = %s", (granted["owner"],))[0][0]

    async def main() -> None:
        async with pacer(db, limit=1, period=period, margin=margin, lease_seconds=lease) as p:
            first = await p.try_acquire()
            if isinstance(first, Verdict):  # (unless the lease is over already: a slow machine)
                assert first.reason == "window" and first.start is None
            handle = await asyncio.wait_for(p.acquire(), 10)
            assert handle.slot.started >= beat + lease + period + margin
            assert handle.slot.started < beat + lease + period + margin + 2.5  # (poll: 0.25 s)
            handle.release()

    run(main())
    assert sql(db, "SELECT count(*) FROM rate_slots WHERE id = %s", (granted["granted"],)) == [(0,)]


# --- 2. several processes on one key ----------------------------------------------------------


def max_in_window(slots: list[tuple[float, float]], span: float) -> int:
    """The most slots whose ``[started, sent + span)`` overlap at one moment: the most
    requests that could arrive in one window, wherever in their intervals they arrived."""
    events = sorted([(s, 1) for s, _ in slots] + [(e + span, -1) for _, e in slots])
    best = current = 0
    for _, step in events:  # (an end at t sorts before a start at t: half-open)
        current += step
        best = max(best, current)
    return best


def share(times: list[float], limit: int, period: float) -> float:
    """The share of the allowance used: each of its ``limit`` places in the window is taken
    again ``period`` after it was last taken at best, so ``period`` over the mean time
    between request ``i`` and request ``i + limit``. (The bench's "achieved rate" measures
    the span from the first to the last request instead, which also counts how spread out
    the first and the last burst arrived: processes starting, connections opening.)"""
    times = sorted(times)
    gaps = [later - earlier for earlier, later in zip(times, times[limit:], strict=False)]
    return period / (sum(gaps) / len(gaps))


def span_share(times: list[float], limit: int, period: float) -> float:
    """The bench's "achieved rate" (bench/rate.py): the ideal span of N requests, the first
    ``limit`` at once and ``limit`` more every ``period``, over the span they took."""
    times = sorted(times)
    return math.floor((len(times) - 1) / limit) * period / (times[-1] - times[0])


def logged(info: str) -> list[tuple[float, float]]:
    rows = sql(info, "SELECT started, sent, discarded FROM slot_log ORDER BY started")
    assert all(sent is not None for _, sent, discarded in rows if not discarded), "a slot never marked sent"
    return [(started, sent) for started, sent, discarded in rows if not discarded]


def finish(procs: list[subprocess.Popen[str]], timeout: float) -> list[dict[str, Any]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_three_processes_hammering_one_key_never_exceed_it_and_use_it_all(
    db: str, workers: list[subprocess.Popen[str]]
) -> None:
    limit, period, seconds = 7, 2.0, 10.0
    margin = period / 240  # as the daemon's default
    start = time.time() + 2.0  # (the processes import and connect meanwhile)
    args = ["--limit", str(limit), "--period", str(period), "--margin", str(margin)]
    timing = ["--start-at", str(start), "--until", str(start + seconds)]
    procs = [worker("hammer", db, *args, *timing) for _ in range(3)]
    workers.extend(procs)
    results = finish(procs, timeout=seconds + 30)
    slots = logged(db)
    assert max_in_window(slots, period + margin) <= limit
    assert sum(len(r["slots"]) for r in results) == len(slots)
    assert all(r["slots"] for r in results)  # each had its turns
    used = share([s for s, _ in slots], limit, period)
    assert used >= 0.98, used


def test_three_processes_on_the_strict_fake_get_no_429_and_use_the_allowance(
    db: str, workers: list[subprocess.Popen[str]]
) -> None:
    """The issue's set-up, 7 requests per 6 s (the real API's per minute, ten times faster),
    three daemon-like processes on one key, each with three requests at a time."""
    limit, period, seconds = 7, 6.0, 24.0
    # The fake counts a request when its thread has read the headers: on a busy machine
    # (this test runs three senders, PostgreSQL and the fake on the same CPUs) that can be
    # some 30 ms after the body left — over 50 ms during a full CI run — which the margin must
    # cover. The daemon's default is period / 240, 0.25 s at the real API's 60 s. (The
    # issue's ≥ 0.98 is asserted end to end in test_shared_queue.py; here the wider margin
    # costs 1.7 % of a 6 s window, hence 0.975.)
    margin = 0.1
    with FakeWithoutBG(api_key="test-key", rate_limit=limit, rate_period=period, latency=0.05) as api:
        start = time.time() + 2.0
        args = ["--limit", str(limit), "--period", str(period), "--margin", str(margin), "--url", api.url]
        timing = ["--start-at", str(start), "--until", str(start + seconds), "--in-flight", "3"]
        procs = [worker("fake", db, *args, *timing, "--seed", str(n)) for n in range(3)]
        workers.extend(procs)
        results = finish(procs, timeout=seconds + 40)
        records = api.records()
    statuses = [r.status for r in records]
    assert statuses.count(429) == 0
    assert all(status == 200 for status in statuses)
    assert sum(sum(r["statuses"].values()) for r in results) == len(records)
    arrived = [r.arrived for r in records]
    assert max_in_window([(a, a) for a in arrived], period) <= limit
    assert len(records) >= seconds / period * limit
    used = share(arrived, limit, period)
    assert used >= 0.975, (used, span_share(arrived, limit, period))


# --- 4. the shared hold and pause --------------------------------------------------------------


def test_a_pause_set_by_one_daemon_stops_all_and_a_resume_by_any_frees_them(db: str) -> None:
    seen: list[SharedState] = []

    async def main() -> None:
        async with pacer(db, poll_seconds=30.0) as a, pacer(db, poll_seconds=30.0, on_state=seen.append) as b:
            await b.shared_state()
            await eventually(lambda: a.listening and b.listening)
            record = {"code": "insufficient_credit", "status": 402, "detail": "no credit", "since": 1.0}
            assert await a.pause(record) == (record, True)
            assert await b.pause({"code": "invalid_api_key"}) == (record, False)  # the first stays
            await eventually(lambda: b.state is not None and b.state.pause == record)
            assert any(s.pause == record for s in seen)
            refused = await b.try_acquire()
            assert isinstance(refused, Verdict) and refused.reason == "paused"
            waiting = asyncio.create_task(b.acquire())
            assert await still_waiting(waiting)  # (nothing but the resume ends it)
            assert await a.resume() == record
            handle = await asyncio.wait_for(waiting, 5.0)  # woken by the notification
            handle.release()
            assert await a.resume() is None

    run(main())


def test_an_outage_hold_is_shared_and_only_one_probe_goes_out(db: str) -> None:
    async def main() -> None:
        async with pacer(db, limit=5, poll_seconds=30.0) as a, pacer(db, limit=5, poll_seconds=30.0) as b:
            await eventually(lambda: a.listening and b.listening)
            ha, hb = await a.acquire(), await b.acquire()  # in flight together
            ha.mark_sent()
            hb.mark_sent()
            state = await a.outage(ha, lambda streak: 0.6 * streak)
            assert state.outage_streak == 1 and state.hold_seconds == pytest.approx(0.6, abs=0.05)
            # B's request failed at the same moment: the same step, not a second one
            state = await b.outage(hb, lambda streak: 0.6 * streak)
            assert state.outage_streak == 1
            ha.release()
            hb.release()
            await eventually(lambda: b.state is not None and b.state.outage_streak == 1)
            held = await b.try_acquire()
            assert isinstance(held, Verdict) and held.reason == "hold"
            probe = await asyncio.wait_for(b.acquire(), 5.0)  # once the hold is over
            assert probe.slot.started >= state.hold_until
            refused = await a.try_acquire()
            assert isinstance(refused, Verdict) and refused.reason == "probe"
            waiting = asyncio.create_task(a.acquire())
            assert await still_waiting(waiting)  # while the probe is out
            probe.mark_sent()  # (its body is out: still in flight)
            assert await still_waiting(waiting)
            over = await b.recovered()
            assert over.outage_streak == 0
            probe.release()
            (await asyncio.wait_for(waiting, 5.0)).release()
            await eventually(lambda: a.state is not None and a.state.outage_streak == 0)

    run(main())


# --- 5. the database going away -----------------------------------------------------------------


def test_the_database_going_away_is_one_exception_and_the_pacer_goes_on_after(pg: Cluster, db: str) -> None:
    async def main() -> None:
        async with pacer(db, limit=3) as p:
            before = await p.acquire()
            await eventually(lambda: p.listening)
            pg.stop()
            try:
                began = time.monotonic()
                with pytest.raises(QueueUnavailable):
                    await p.acquire()
                with pytest.raises(QueueUnavailable):
                    await p.shared_state()
                assert time.monotonic() - began < 10
                before.release()  # written once the database is back
            finally:
                pg.start()

            async def granted() -> SharedSlotHandle | None:
                try:
                    return await p.acquire()
                except QueueUnavailable:
                    return None

            after = await eventually(granted, timeout=30.0, interval=0.2)
            after.release()
            await eventually(lambda: p.listening, timeout=30.0)
            rows = sql(db, "SELECT sent, released FROM rate_slots WHERE id = %s", (before.id,))
            assert rows and rows[0][0] is not None and rows[0][1] is not None

    run(main())
