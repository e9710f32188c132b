"""Conditions that must never block the queue or stall it (issue 9, items 11, 12, 13, 16):
an output that cannot be placed, the wall clock stepped back, an outage met by several
requests at once, a local pause re-checked on its own schedule."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from dropcut.dispatch import outage_step
from dropcut.queue import JobQueue, NewJob, connect
from tests.fake_api import FakeWithoutBG
from tests.support import API_KEY, Folders, InProcessDaemon, drop, image_bytes, make_immutable, wait_for

# --- item 11: an output that cannot be placed -------------------------------------------


def test_an_output_that_cannot_be_placed_backs_off_then_quarantines_without_blocking_others(
    folders: Folders, api: FakeWithoutBG
) -> None:
    (folders.outbox / "a.png").mkdir(parents=True)  # a folder where a.jpg's output goes
    settings = folders.settings(api.url, max_attempts=8)
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=1101))
        wait_for(lambda: run.logs.events("retry_scheduled"))
        drop(folders.inbox, "b.jpg", image_bytes(seed=1102))
        wait_for(lambda: (folders.outbox / "b.png").is_file())  # others go on
        wait_for(lambda: (folders.quarantine / "a.jpg.error.json").exists(), timeout=30)
        retries = [e for e in run.logs.events("retry_scheduled") if e["file"] == "a.jpg"]
        assert not run.logs.events("job_failed")
    record = json.loads((folders.quarantine / "a.jpg.error.json").read_text())
    assert record["error"]["code"] == "output_unwritable"
    assert record["error"]["source"] == "local"
    assert "a.png" in record["error"]["detail"] and "EISDIR" in record["error"]["detail"]
    assert record["attempts"] == 8
    assert [e["attempt"] for e in retries] == list(range(2, 8))  # (1 was the request)
    assert all(e["code"] == "output_unwritable" for e in retries)
    # one request for a.jpg: every later try republished from the result cache
    assert sorted(r.filename for r in api.records()) == ["a.jpg", "b.jpg"]
    assert (folders.outbox / "a.png").is_dir()


def test_an_unwritable_outbox_pauses_the_queue_until_it_is_writable(
    folders: Folders, api: FakeWithoutBG, immutable: list[Path]
) -> None:
    folders.outbox.mkdir()
    (folders.outbox / ".dropcut-staging").mkdir()
    settings = folders.settings(api.url, credit_check_interval_seconds=300.0)
    with InProcessDaemon(settings) as run:
        make_immutable(immutable, folders.outbox)
        drop(folders.inbox, "a.jpg", image_bytes(seed=1103))
        paused = wait_for(lambda: run.logs.events("queue_paused"))[0]
        assert paused["code"] == "outbox_unwritable"
        assert str(folders.outbox) in paused["detail"]
        assert (folders.inbox / "a.jpg").exists()
        subprocess.run(["chattr", "-i", str(folders.outbox)], check=True)
        resumed = wait_for(lambda: run.logs.events("queue_resumed"), timeout=10)[0]
        assert resumed["reason"] == "outbox_writable"
        wait_for(lambda: (folders.outbox / "a.png").exists())
    assert not list(folders.quarantine.rglob("*.json"))
    assert [r.status for r in api.records()] == [200], "one request: the retry came from the cache"


# --- item 16: a local pause is re-checked on its own schedule ---------------------------


def test_a_local_pause_is_rechecked_every_two_seconds_whatever_the_credit_interval(
    folders: Folders, api: FakeWithoutBG, immutable: list[Path]
) -> None:
    """The credit check sleeps 300 s here; the outbox pause that starts during that sleep
    is still re-checked every 2 s and resumes within a few seconds."""
    folders.outbox.mkdir()
    settings = folders.settings(api.url, credit_check_interval_seconds=300.0)
    with InProcessDaemon(settings) as run:
        wait_for(lambda: run.logs.events("credit_checked"))  # the credit loop now sleeps 300 s
        make_immutable(immutable, folders.outbox)
        drop(folders.inbox, "a.jpg", image_bytes(seed=1601))
        wait_for(lambda: run.logs.events("queue_paused"))
        subprocess.run(["chattr", "-i", str(folders.outbox)], check=True)
        freed = time.monotonic()
        wait_for(lambda: run.logs.events("queue_resumed"), timeout=10)
        assert time.monotonic() - freed < 5.0
        wait_for(lambda: (folders.outbox / "a.png").exists())


# --- item 12: the wall clock stepped back -------------------------------------------------


class SteppedWall:
    """time.time(), stepped back by ``offset`` seconds whenever the test says so."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() - self.offset


def test_a_wall_clock_stepped_back_an_hour_does_not_stall_retries(
    folders: Folders, api: FakeWithoutBG
) -> None:
    wall = SteppedWall()
    api.fail_next(1, 503)
    settings = folders.settings(api.url, retry_base_delay_seconds=0.5, retry_max_delay_seconds=0.5)
    with InProcessDaemon(settings, clock=wall) as run:
        drop(folders.inbox, "a.jpg", image_bytes(seed=1201))
        wait_for(lambda: run.logs.events("retry_scheduled"))
        wall.offset = 3600.0  # NTP, an admin or a resumed VM steps the clock back an hour
        wait_for(lambda: (folders.outbox / "a.png").exists(), timeout=10)
    assert [r.status for r in api.records()] == [503, 200]


def test_due_times_persisted_in_the_future_are_clamped_at_start(tmp_path: Path) -> None:
    """A retry set 10 s ahead, then the clock stepped back an hour while dropcut was down:
    at the next start it is due 10 s from then, not in an hour and 10 s."""
    now = [100_000.0]
    queue = JobQueue(connect(tmp_path / "q.sqlite3"), clock=lambda: now[0])
    job = NewJob("a.jpg", "a" * 64, 10, 1, 1, 1, "JPEG", now[0], ctime_ns=1)
    queue.enqueue_many([job], requeue_done=True)
    claimed = queue.claim()
    assert claimed is not None
    queue.retry_later(claimed.id, at=now[0] + 10.0, entry={"attempt": 1})
    queue.close()
    now[0] -= 3600.0
    queue = JobQueue(connect(tmp_path / "q.sqlite3"), clock=lambda: now[0])
    queue.recover()
    assert queue.next_due() == pytest.approx(now[0] + 10.0)
    now[0] += 10.0
    assert queue.claim() is not None


# --- item 13: one moment of an outage is one step -----------------------------------------


@pytest.mark.parametrize(
    ("streak", "last_step_at", "started", "now", "expected"),
    [
        (0, float("-inf"), 10.0, 11.0, (1, 11.0)),  # the first failure is the first step
        (1, 11.0, 10.0, 11.2, (1, 11.0)),  # in flight with the first: the same moment
        (1, 11.0, 10.5, 12.0, (1, 11.0)),  # started before the step was counted
        (1, 11.0, 11.0, 13.0, (2, 13.0)),  # started once the step was counted: a new step
        (2, 13.0, 20.0, 21.0, (3, 21.0)),  # a probe after the hold: the next step
    ],
)
def test_outage_step(
    streak: int, last_step_at: float, started: float, now: float, expected: tuple[int, float]
) -> None:
    assert outage_step(streak, last_step_at, started=started, now=now) == expected


def test_four_requests_failing_at_once_are_one_step_of_the_outage(folders: Folders) -> None:
    with FakeWithoutBG(api_key=API_KEY, rate_limit=50, rate_period=1.0, latency=0.5) as api:
        api.fail_next(4, 503)
        settings = folders.settings(api.url, retry_base_delay_seconds=1.0, retry_max_delay_seconds=1.0)
        with InProcessDaemon(settings) as run:
            for i in range(4):
                drop(folders.inbox, f"p{i}.jpg", image_bytes(seed=1301 + i))
            wait_for(lambda: len(run.logs.events("retry_scheduled")) == 4)
            streak = run.daemon.dispatcher._outage_streak
            wait_for(lambda: len(list(folders.outbox.glob("*.png"))) == 4, timeout=20)
        first = [r for r in api.records() if r.status == 503]
        assert len(first) == 4 and max(r.arrived for r in first) - min(r.arrived for r in first) < 0.5
        assert streak == 1


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # (seconds the monotonic clock advanced, what the wall clock then says), in turn
        ([(10.0, 1010.0)], [1010.0]),  # in step
        ([(10.0, 1010.0), (1.0, 11.0)], [1010.0, 1011.0]),  # the wall set back 1000 s: ignored
        ([(10.0, 5010.0), (1.0, 5011.0)], [5010.0, 5011.0]),  # set forward (NTP at boot): followed
        ([(10.0, 1010.5)], [1010.0]),  # within a second: monotonic time wins (no jitter)
    ],
)
def test_run_clock_never_goes_back_and_follows_a_forward_step(
    steps: list[tuple[float, float]], expected: list[float]
) -> None:
    from dropcut.clock import RunClock

    mono, wall = [0.0], [1000.0]
    clock = RunClock(wall=lambda: wall[0], monotonic=lambda: mono[0])
    got = []
    for advance, wall_now in steps:
        mono[0] += advance
        wall[0] = wall_now
        got.append(clock())
    assert got == pytest.approx(expected)


def test_an_unwritable_staging_folder_pauses_before_a_request_is_paid_for(
    folders: Folders, api: FakeWithoutBG, immutable: list[Path]
) -> None:
    """The outbox is writable but its staging folder (left by a run as another user, or
    made immutable) is not: every answer would be paid for and then lost. The queue pauses
    before any request instead."""
    staging = folders.outbox / ".dropcut-staging"
    staging.mkdir(parents=True)
    with InProcessDaemon(folders.settings(api.url, credit_check_interval_seconds=300.0)) as run:
        make_immutable(immutable, staging)
        drop(folders.inbox, "a.jpg", image_bytes(seed=1104))
        paused = wait_for(lambda: run.logs.events("queue_paused"))[0]
        assert paused["code"] == "outbox_unwritable" and ".dropcut-staging" in paused["detail"]
        assert api.records() == [], "nothing paid for that could not be written"
        subprocess.run(["chattr", "-i", str(staging)], check=True)
        wait_for(lambda: (folders.outbox / "a.png").exists(), timeout=10)
    assert not run.logs.events("job_failed")
