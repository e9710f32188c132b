"""The shared queue (issue 13, items 1, 2, 6, 7): :class:`PgJobQueue` against a real
PostgreSQL cluster (:mod:`tests.pg`).

First the queue's semantics, run on both backends (SQLite's ``JobQueue`` and
``PgJobQueue``) with the same expectations; then what sharing adds: several daemons of a
site (several queue objects, each on its own connection) queue a file once, claim each job
once, take over a dead daemon's jobs when its lease expires; sites never see each other;
the database going away and coming back; moving a SQLite queue over."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dropcut.pace import Slot
from dropcut.paths import output_candidates, output_key
from dropcut.pgqueue import (
    AlreadyMigrated,
    PgJobQueue,
    Queue,
    QueueUnavailable,
    daemon_id,
    migrate_sqlite,
    open_shared,
)
from dropcut.queue import HoldRule, Job, JobQueue, NewJob, RequestRecord, connect
from tests.pg import PASSWORD, Cluster
from tests.support import wait_for

A = "a" * 64
B = "b" * 64
C = "c" * 64
SITE = "studio"
KEY = "key-1"


class Clock:
    """A wall clock that steps 1 s at each reading (or stands at ``now`` when fixed)."""

    def __init__(self, now: float = 1_000.0, step: float = 1.0) -> None:
        self.now = now
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def new(rel: str, sha: str, at: float = 1.0, inode: int = 1, **extra: Any) -> NewJob:
    return NewJob(
        rel_path=rel,
        sha256=sha,
        size=10,
        mtime_ns=int(at * 1e9),
        inode=inode,
        device=1,
        format="jpeg",
        first_seen=at,
        **extra,
    )


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def shared(
    url: str,
    *,
    site: str = SITE,
    daemon: str = "d1",
    key: str = KEY,
    clock: Callable[[], float] | None = None,
    lease: float = 60.0,
) -> PgJobQueue:
    return PgJobQueue(
        url,
        password=PASSWORD,
        site=site,
        daemon_id=daemon,
        key_id=key,
        lease_seconds=lease,
        clock=clock or Clock(),
        reconnect_max_seconds=0.5,
    )


Opener = Callable[..., Queue]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """``open_queue(clock=…)``: a queue of the parametrized backend (the same database
    each time within a test, as a restarted daemon would open it)."""
    opened: list[Queue] = []
    url = request.getfixturevalue("pg_db") if request.param == "postgresql" else ""

    def open_(clock: Callable[[], float] | None = None) -> Queue:
        queue: Queue
        if url:
            queue = shared(url, clock=clock or Clock())
        else:
            queue = JobQueue(connect(tmp_path / "q.sqlite3"), clock=clock or Clock())
        opened.append(queue)
        return queue

    yield open_
    for queue in opened:
        queue.close()


def admit(queue: Queue, rel: str, sha256: str, at: float, inode: int = 1) -> str:
    [(_, what)] = queue.enqueue_many([new(rel, sha256, at, inode)], requeue_done=True)
    return what


def process(queue: Queue) -> tuple[Job, bool]:
    job = queue.claim()
    assert job is not None
    stale = queue.superseded(job)
    queue.mark_published(job.id, "" if stale else "p.png", {"status": 200})
    queue.mark_done(job.id)
    return job, stale


# --- the queue's semantics, on both backends ------------------------------------------------


def test_the_newest_drop_at_a_path_is_decided_by_admission_order(open_queue: Opener) -> None:
    queue = open_queue()
    assert admit(queue, "p.jpg", A, 1.0) == "queued"
    job_a, stale = process(queue)
    assert not stale
    assert admit(queue, "p.jpg", B, 2.0, inode=2) == "queued"
    job_b, stale = process(queue)
    assert not stale and job_b.id > job_a.id
    assert admit(queue, "p.jpg", A, 3.0, inode=3) == "requeued"
    again, stale = process(queue)
    assert again.id == job_a.id and not stale  # the old row, yet the newest drop
    signature = ("p.jpg", 10, int(3.0 * 1e9), 0, 3)
    assert queue.known_signature(*signature) == "done"
    assert queue.known_signatures([signature, ("q.jpg", 1, 1, 1, 1)]) == {
        signature: "done",
        ("q.jpg", 1, 1, 1, 1): None,
    }
    # a pending older job is superseded by content dropped after it
    admit(queue, "p.jpg", B, 4.0, inode=4)
    admit(queue, "p.jpg", A, 5.0, inode=5)  # A again while B waits: A is the newest
    admit(queue, "other.jpg", B, 5.5)
    order = [(job.rel_path, job.sha256, stale) for job, stale in (process(queue) for _ in range(3))]
    assert order == [("p.jpg", A, False), ("p.jpg", B, True), ("other.jpg", B, False)]


def test_same_content_again_while_pending_and_a_quarantined_newer_job(open_queue: Opener) -> None:
    queue = open_queue()
    assert admit(queue, "p.jpg", A, 1.0, inode=1) == "queued"
    assert admit(queue, "p.jpg", B, 2.0, inode=2) == "queued"
    assert admit(queue, "p.jpg", A, 3.0, inode=3) == "queued"  # still pending: same row
    claimed = [queue.claim(), queue.claim()]
    jobs = {j.sha256: j for j in claimed if j is not None}
    assert not queue.superseded(jobs[A]) and queue.superseded(jobs[B])
    assert admit(queue, "p.jpg", A, 3.0, inode=3) == "inflight"  # a rescan: nothing changes
    queue.add_quarantined(new("q.jpg", C, 4.0), {"status": 415})
    other = new("r.jpg", A, 4.0)
    queue.enqueue_many([other], requeue_done=True)
    queue.add_quarantined(new("p.jpg", C, 5.0, inode=9), {"status": 415})
    assert not queue.superseded(jobs[A])  # a quarantined newer job made no output
    assert admit(queue, "p.jpg", C, 6.0, inode=9) == "requeued"  # put back: tried again
    assert queue.superseded(jobs[A])


def test_a_job_through_its_states(open_queue: Opener) -> None:
    queue = open_queue()
    queue.enqueue_many(
        [new("a.jpg", A, frames=3), new("b.jpg", B), new("same-as-a.jpg", A)], requeue_done=True
    )
    assert queue.frames_skipped() == 1
    assert queue.sha_still_needed(A) and not queue.sha_still_needed(C)
    peeked = queue.peek()
    assert peeked is not None and peeked.rel_path == "a.jpg"
    first, second = queue.claim(), queue.claim()
    assert first is not None and second is not None
    assert (first.rel_path, second.rel_path) == ("a.jpg", "b.jpg")
    assert queue.claim() is None  # same-as-a.jpg: its content is in flight already
    assert queue.record_attempt(first.id) == 1
    queue.retry_later(first.id, at=5_000.0, entry={"attempt": 1, "status": 503})
    assert queue.job_error(first.id) == {"attempt": 1, "status": 503}
    again = queue.claim()  # a.jpg waits till 5000: same-as-a.jpg goes now
    assert again is not None and again.rel_path == "same-as-a.jpg"
    queue.release(again.id)
    queue.postpone(again.id, at=6_000.0)
    assert queue.next_due() == 5_000.0
    assert queue.record_attempt(second.id) == 1
    queue.retry_later(second.id, at=0.0, entry={"status": 429}, count_attempt=False)
    second = queue.claim()
    assert second is not None and second.attempts == 0 and second.history == [{"status": 429}]
    queue.mark_quarantining(second.id, {"code": "invalid"}, {"status": 422})
    [quarantining] = queue.quarantining_jobs()
    assert quarantining.id == second.id and quarantining.history == [{"status": 429}, {"status": 422}]
    queue.mark_quarantined(second.id, {"code": "invalid", "quarantined_as": "b.jpg"})
    assert [j.rel_path for j in queue.quarantined_jobs()] == ["b.jpg"]
    assert [j.rel_path for j in queue.quarantined_jobs(["x.jpg", "b.jpg"])] == ["b.jpg"]
    assert queue.known_signature("b.jpg", 10, int(1e9), 0, 1) is None  # gone: read again
    row = queue.forget(second.id)
    assert row is not None and queue.get(second.id) is None
    admit(queue, "new.jpg", C, 2.0)  # meanwhile, a new job (SQLite may reuse the id)
    queue.restore(row)
    [back] = queue.quarantined_jobs()
    assert back.rel_path == "b.jpg" and queue.job_error(back.id) == {
        "code": "invalid",
        "quarantined_as": "b.jpg",
    }
    # published, held for disposal, done
    queue.postpone(first.id, at=0.0)
    first = queue.claim()
    assert first is not None and first.rel_path == "a.jpg"
    queue.mark_published(first.id, "a.png", {"status": 200})
    assert [j.id for j in queue.published_jobs()] == [first.id]
    queue.set_held(first.id, ".dropcut-held-1-a.jpg")
    assert queue.holds(".dropcut-held-1-a.jpg") and not queue.holds(".dropcut-held-2-a.jpg")
    queue.set_signature(first.id, (11, 2, 3, 4, 5))
    queue.mark_done(first.id, archived_as="a.jpg")
    done = queue.get(first.id)
    assert done is not None and done.state == "done" and done.identity == (11, 2, 3, 4, 5)
    assert done.archived_as == "a.jpg" and done.held_as is None and done.output_rel == "a.png"
    assert [j.rel_path for j in queue.done_jobs()] == ["a.jpg"]
    assert not queue.holds(".dropcut-held-1-a.jpg")
    assert queue.get_meta("last_success") is not None
    cancelled = queue.claim()
    assert cancelled is not None and cancelled.rel_path == "new.jpg"
    queue.cancel(cancelled.id, {"code": "source_deleted"})
    counts = queue.counts()
    assert {k: v for k, v in counts.items() if v} == {
        "queued": 1,
        "done": 1,
        "quarantined": 1,
        "cancelled": 1,
    }
    assert [j.rel_path for j in queue.recent(("done", "cancelled"), limit=1)] == ["new.jpg"]
    assert [j.rel_path for j in queue.recent(("done", "cancelled"), limit=5, offset=1)] == ["a.jpg"]
    # done, the same content again at the path: done (kept) or requeued (a new drop)
    [(_, kept)] = queue.enqueue_many([new("a.jpg", A, inode=1)], requeue_done=False)
    assert kept == "done"
    assert admit(queue, "a.jpg", A, 9.0, inode=7) == "requeued"


def test_held_batches_and_their_release(open_queue: Opener) -> None:
    now = [1000.0]
    queue = open_queue(clock=lambda: now[0])

    def add(first: int, last: int, rule: HoldRule) -> list[str]:
        jobs = [NewJob(f"d/{i}.jpg", sha(i), 1, 1, i, 1, "JPEG", now[0]) for i in range(first, last)]
        return [what for _, what in queue.enqueue_many(jobs, requeue_done=True, hold=rule)]

    rule = HoldRule(threshold=3, window=60.0)
    assert add(0, 5, rule) == ["queued", "queued", "queued", "held", "held"]
    now[0] += 61
    assert add(5, 9, rule) == ["queued", "queued", "queued", "held"]
    top = NewJob("top.jpg", sha(99), 1, 1, 99, 1, "JPEG", now[0])
    assert queue.enqueue_many([top], requeue_done=True, hold=rule) == [(top, "held")]
    assert queue.held_folders() == [("d", 3), ("", 1)]
    assert queue.sha_still_needed(sha(3))
    assert queue.release_held("d", to="queued") == 3
    now[0] += 1
    assert add(9, 11, rule) == ["queued", "queued"]
    assert add(11, 13, rule) == ["queued", "held"]
    assert queue.release_held(None, to="discarded") == 2
    assert queue.counts()["discarded"] == 2
    with pytest.raises(ValueError):
        queue.release_held(None, to="done")


def test_due_times_in_the_future_are_clamped_and_inflight_requeued_at_start(open_queue: Opener) -> None:
    now = [100_000.0]
    queue = open_queue(clock=lambda: now[0])
    queue.enqueue_many([new("a.jpg", A), new("b.jpg", B)], requeue_done=True)
    claimed = queue.claim()
    assert claimed is not None
    queue.retry_later(claimed.id, at=now[0] + 10.0, entry={"attempt": 1})
    assert queue.claim() is not None  # b.jpg: in flight when "the daemon dies"
    queue.close()
    now[0] -= 3600.0  # the clock stepped back while dropcut was down
    queue = open_queue(clock=lambda: now[0])
    requeued, published = queue.recover()
    assert (requeued, published) == (1, [])
    assert queue.next_due() == 0.0  # b.jpg, due at once
    b = queue.claim()
    assert b is not None and b.rel_path == "b.jpg"
    assert queue.next_due() == pytest.approx(now[0] + 10.0)


def test_signatures_output_names_meta_slots_and_the_request_log(open_queue: Opener) -> None:
    queue = open_queue()
    queue.enqueue_many([NewJob("a.jpg", A, 10, 7, 5, 1, "JPEG", 0.0, ctime_ns=111)], requeue_done=True)
    assert queue.known_signature("a.jpg", 10, 7, 111, 5) == "queued"
    assert queue.known_signature("a.jpg", 10, 7, 222, 5) is None  # a cp -p of other content
    # output names, in queue order also for requeued paths, compared ignoring case
    rule = (lambda rel: ([name] for name in output_candidates(rel)), output_key)
    queue.add_quarantined(new("x.jpg", B, 1.0), {"status": 413})  # refused locally: no claim
    done = queue.enqueue_many(
        [new("x.jpg", B, 2.0, inode=2), new("X.png", C, 2.0)], requeue_done=True, outputs=rule
    )
    assert [what for _, what in done] == ["requeued", "queued"]
    assert queue.claim_output("x.jpg", output_candidates("x.jpg"), output_key) == "x.png"
    assert queue.claim_output("X.png", output_candidates("X.png"), output_key) == "X~png.png"
    assert queue.claim_outputs("y.jpg", [["x.png", "y.png"], ["y1.png", "y2.png"]], output_key) == [
        "y1.png",
        "y2.png",
    ]
    # meta: JSON values; None deletes
    assert queue.get_meta("paused") is None
    queue.set_meta("paused", {"code": "low_credit", "since": 12.5})
    assert queue.get_meta("paused") == {"code": "low_credit", "since": 12.5}
    queue.set_meta("paused", None)
    assert queue.get_meta("paused") is None
    queue.save_slots([Slot(1.0, 1.5), Slot(2.0, None)])
    assert queue.load_slots() == [Slot(1.0, 1.5), Slot(2.0, None)]
    # the request log: counted by time, forgotten after forty days
    t0 = 1_700_000_000.0
    for t in (t0 - 41 * 86400, t0 - 3000, t0 - 30, t0 - 1):
        queue.record_request(RequestRecord(t, "/v1.0/alpha-channel", 200, 0.5, 100, 50))
    assert queue.requests_since(t0 - 60) == 2
    assert queue.requests_since(t0 - 3600) == 3
    assert queue.requests_since(0) == 3


def test_the_same_file_twice_in_one_batch(open_queue: Opener) -> None:
    queue = open_queue()
    done = queue.enqueue_many(
        [new("p.jpg", A, inode=1), new("p.jpg", A, inode=1), new("p.jpg", A, inode=2)], requeue_done=True
    )
    assert [what for _, what in done] == ["queued", "queued", "queued"]
    assert queue.counts()["queued"] == 1
    assert queue.known_signature("p.jpg", 10, int(1e9), 0, 2) == "queued"  # the last one seen
    assert queue.known_signature("p.jpg", 10, int(1e9), 0, 1) is None


# --- several daemons of one site ----------------------------------------------------------------


def run_together(*calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` in threads released at once; their results (an exception fails)."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = calls[i]()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_two_daemons_seeing_the_same_files_at_once_queue_each_once(pg_db: str) -> None:
    one, two = shared(pg_db, daemon="one"), shared(pg_db, daemon="two")
    rule = (lambda rel: ([name] for name in output_candidates(rel)), output_key)
    for round_ in range(10):
        files = [new(f"r{round_}/{i}.jpg", sha(100 * round_ + i)) for i in range(20)]
        files.append(new(f"r{round_}/clash.png", sha(100 * round_ + 99)))  # wants r/clash.png…
        files.append(new(f"r{round_}/clash.jpg", sha(100 * round_ + 98)))  # …and so does this
        run_together(
            lambda files=files: one.enqueue_many(files, requeue_done=True, outputs=rule),
            lambda files=files: two.enqueue_many(list(reversed(files)), requeue_done=True, outputs=rule),
        )
    assert one.counts()["queued"] == two.counts()["queued"] == 220
    names = {
        one.claim_output(f"r{r}/clash.jpg", output_candidates(f"r{r}/clash.jpg"), output_key)
        for r in range(10)
    }
    names |= {
        two.claim_output(f"r{r}/clash.png", output_candidates(f"r{r}/clash.png"), output_key)
        for r in range(10)
    }
    assert len(names) == 20  # each path its own name, whoever claimed first
    one.close()
    two.close()


def test_daemons_claiming_at_once_take_each_job_once_and_one_content_at_a_time(pg_db: str) -> None:
    daemons = [shared(pg_db, daemon=f"d{i}") for i in range(4)]
    # 60 jobs; paths 0-9 share their content with paths 10-19 (the same photo twice)
    daemons[0].enqueue_many(
        [new(f"{i}.jpg", sha(i % 10 if i < 20 else i)) for i in range(60)], requeue_done=True
    )

    def drain(queue: PgJobQueue) -> list[Job]:
        taken = []
        while (job := queue.claim()) is not None:
            taken.append(job)
        return taken

    for expected in (50, 10):  # then the other copy of each content shared by two paths
        per_daemon: list[list[Job]] = run_together(*(lambda q=q: drain(q) for q in daemons))
        taken = [job for jobs in per_daemon for job in jobs]
        assert len(taken) == expected and len({job.id for job in taken}) == expected
        assert len({job.sha256 for job in taken}) == expected, "one content was sent twice at once"
        for queue, jobs in zip(daemons, per_daemon, strict=True):
            for job in jobs:
                queue.mark_published(job.id, "x.png", {})
                queue.mark_done(job.id)
    assert daemons[0].counts()["done"] == 60
    for queue in daemons:
        queue.close()


def test_a_dead_daemons_jobs_are_taken_over_when_its_lease_expires(pg_db: str) -> None:
    alive = shared(pg_db, daemon="alive", lease=2.0)
    dead = shared(pg_db, daemon="dead", lease=2.0)
    alive.enqueue_many([new("a.jpg", A), new("b.jpg", B)], requeue_done=True)
    first, second = dead.claim(), dead.claim()
    assert first is not None and second is not None
    dead.mark_published(second.id, "b.png", {"status": 200})  # its input move pending
    for _ in range(3):  # the holder renews: nobody takes them
        time.sleep(0.7)
        assert dead.renew_leases() == 0
        assert alive.claim() is None and alive.renew_leases() == 0 and alive.published_jobs() == []
    assert dead.holds_lease(first.id) and not alive.holds_lease(first.id)
    # the holder stops renewing (killed -9): when its lease ran out, its jobs go to the living
    time.sleep(2.2)
    assert not dead.holds_lease(first.id)
    assert alive.renew_leases() == 1
    taken = alive.claim()
    assert taken is not None and taken.id == first.id
    assert [job.id for job in alive.published_jobs()] == [second.id]
    # the dead one comes back (it was cut off, not dead): what it writes is ignored
    dead.mark_published(first.id, "a.png", {"status": 200})
    dead.release(first.id)
    dead.mark_done(second.id)
    assert dead.published_jobs() == []
    assert [j.state for j in (alive.get(first.id), alive.get(second.id))] == ["inflight", "published"]  # type: ignore[union-attr]
    alive.mark_published(first.id, "a.png", {"status": 200})
    alive.mark_done(first.id)
    alive.mark_done(second.id)
    assert alive.counts()["done"] == 2
    alive.close()
    dead.close()


def test_a_restarted_daemon_takes_back_its_own_jobs_at_once_and_no_others(pg_db: str) -> None:
    mine, other = shared(pg_db, daemon="host-a/1"), shared(pg_db, daemon="host-b/2")
    mine.enqueue_many([new(f"{i}.jpg", sha(i)) for i in range(3)], requeue_done=True)
    a, b, c = mine.claim(), mine.claim(), other.claim()
    assert a is not None and b is not None and c is not None
    mine.close()  # crashed: no release
    restarted = shared(pg_db, daemon="host-a/1")
    requeued, published = restarted.recover()
    assert (requeued, published) == (2, [])
    assert {j.id for j in restarted.recent(("queued",), limit=10)} == {a.id, b.id}
    assert restarted.get(c.id).state == "inflight"  # type: ignore[union-attr]
    restarted.close()
    other.close()


def test_jobs_the_daemon_no_longer_works_on_go_back_at_renewal(pg_db: str) -> None:
    """A release that failed while the database was away leaves a job in flight that the
    daemon forgot: renewing with the ids it holds puts it back at once."""
    queue = shared(pg_db)
    queue.enqueue_many([new("a.jpg", A), new("b.jpg", B)], requeue_done=True)
    a, b = queue.claim(), queue.claim()
    assert a is not None and b is not None
    assert queue.renew_leases(holding=[a.id]) == 1
    assert queue.get(b.id).state == "queued"  # type: ignore[union-attr]
    assert queue.get(a.id).state == "inflight"  # type: ignore[union-attr]
    assert queue.renew_leases(holding=[]) == 1
    assert queue.counts()["queued"] == 2
    queue.close()


def test_a_job_inserted_behind_the_admission_lock_rolls_the_batch_back(
    pg_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every insert takes the admission lock, so this cannot happen; should a writer skip
    it, the batch is not half-counted: it is rolled back, to be tried again."""
    queue = shared(pg_db)
    queue.enqueue_many([new("a.jpg", A)], requeue_done=True)
    monkeypatch.setattr(PgJobQueue, "_jobs_at", lambda self, db, paths: {})  # a.jpg "not there"
    with pytest.raises(QueueUnavailable, match="queued meanwhile"):
        queue.enqueue_many([new("b.jpg", B), new("a.jpg", A)], requeue_done=True)
    monkeypatch.undo()
    assert queue.counts()["queued"] == 1 and queue.known_signature("b.jpg", 10, int(1e9), 0, 1) is None
    assert [what for _, what in queue.enqueue_many([new("b.jpg", B)], requeue_done=True)] == ["queued"]
    queue.close()


def test_the_daemon_cli_and_web_open_the_shared_queue_from_the_settings(
    pg_db: str, pg_password_file: Path, tmp_path: Path
) -> None:
    from dropcut.pgschema import key_id
    from tests.support import Folders

    settings = Folders.make(tmp_path).settings(
        "http://127.0.0.1:9", queue_url=pg_db, queue_password_file=pg_password_file, site="berlin"
    )
    daemon = open_shared(settings, api_key="sk-1")
    cli = open_shared(settings, api_key="sk-1", role="cli")
    assert daemon.daemon_id == daemon_id(settings.state_dir) and cli.daemon_id == daemon.daemon_id + "/cli"
    assert (daemon.site, daemon.key_id, daemon.lease_seconds) == ("berlin", key_id("sk-1"), 60.0)
    assert PASSWORD not in daemon.display_url
    daemon.enqueue_many([new("a.jpg", A)], requeue_done=True)
    assert daemon.claim() is not None
    assert cli.counts()["inflight"] == 1 and cli.recover() == (0, [])  # not the daemon's jobs
    daemon.close()
    cli.close()


def test_daemon_ids_are_stable_per_state_folder(tmp_path: Path) -> None:
    assert daemon_id(tmp_path / "s", "nas-a") == daemon_id(tmp_path / "s", "nas-a")
    assert daemon_id(tmp_path / "s", "nas-a") != daemon_id(tmp_path / "t", "nas-a")
    assert daemon_id(tmp_path / "s", "nas-a").startswith("nas-a/")


def test_sites_never_see_each_others_jobs_but_share_the_keys_request_count(pg_db: str) -> None:
    berlin, paris = shared(pg_db, site="berlin"), shared(pg_db, site="paris")
    other_key = shared(pg_db, site="paris", key="key-2")
    berlin.enqueue_many([new("a.jpg", A), new("b.jpg", B)], requeue_done=True)
    paris.enqueue_many([new("a.jpg", A)], requeue_done=True)  # the same path and content
    assert paris.counts()["queued"] == 1 and berlin.counts()["queued"] == 2
    job = paris.claim()
    assert job is not None and paris.claim() is None
    assert berlin.get(job.id) is None and berlin.known_signature("b.jpg", 10, int(1e9), 0, 1) == "queued"
    assert paris.known_signature("b.jpg", 10, int(1e9), 0, 1) is None
    assert berlin.claim_output("a.jpg", ["a.png"], output_key) == "a.png"
    assert paris.claim_output("x.jpg", ["a.png", "b.png"], output_key) == "a.png"
    berlin.set_meta("paused", {"code": "x"})
    assert paris.get_meta("paused") is None
    for t in (10.0, 11.0):
        berlin.record_request(RequestRecord(t, "/v1.0/alpha-channel", 200, 0.5, 100, 50))
    paris.record_request(RequestRecord(12.0, "/v1.0/alpha-channel", 200, 0.5, 100, 50))
    assert berlin.requests_since(0) == paris.requests_since(0) == 3  # the key's total
    assert other_key.requests_since(0) == 0
    for queue in (berlin, paris, other_key):
        queue.close()


# --- the database going away ---------------------------------------------------------------


def test_the_database_going_away_is_one_exception_and_nothing_is_lost(pg: Cluster, pg_db: str) -> None:
    queue = shared(pg_db)
    queue.enqueue_many([new(f"{i}.jpg", sha(i)) for i in range(3)], requeue_done=True)
    claimed = queue.claim()
    assert claimed is not None
    try:
        pg.stop()
        calls: list[Callable[[], Any]] = [
            queue.counts,
            queue.claim,
            lambda: queue.release(claimed.id),
            lambda: queue.enqueue_many([new("late.jpg", C)], requeue_done=True),
            lambda: queue.set_meta("x", 1),
            queue.renew_leases,
        ]
        for call in calls:
            with pytest.raises(QueueUnavailable) as caught:
                call()
            message = str(caught.value)
            assert "\n" not in message and PASSWORD not in message
            assert message.startswith(f"queue database postgresql://dropcut@127.0.0.1:{pg.port}/")
        # and a queue opened while it is away
        late = shared(pg_db)
        with pytest.raises(QueueUnavailable):
            late.get_meta("x")
        late.close()
    finally:
        pg.start()

    def works() -> dict[str, int] | None:
        try:
            return queue.counts()
        except QueueUnavailable:
            return None

    counts = wait_for(works, timeout=30, interval=0.1)
    assert (counts["queued"], counts["inflight"]) == (2, 1)  # nothing lost, nothing half-done
    queue.release(claimed.id)
    queue.enqueue_many([new("late.jpg", C)], requeue_done=True)
    assert queue.counts()["queued"] == 4

    # a restart while the daemon is idle: its first call afterwards works
    pg.stop()
    pg.start()
    time.sleep(2.5)
    assert queue.counts()["queued"] == 4
    queue.close()


# --- moving a SQLite queue over ------------------------------------------------------------


def populated_sqlite(state: Path) -> JobQueue:
    """A daemon's SQLite queue: jobs in every state, names, meta, requests, slots, cache."""
    clock = Clock(now=5_000.0)
    queue = JobQueue(connect(state / "queue.sqlite3"), clock=clock)
    rule = (lambda rel: ([name] for name in output_candidates(rel)), output_key)
    files = [
        new(f"{name}.jpg", sha(i), inode=i) for i, name in enumerate(["q", "f", "p", "d", "x", "h", "c"])
    ]
    queue.enqueue_many(files, requeue_done=True, outputs=rule)
    assert [j.rel_path for j in (queue.claim(), queue.claim(), queue.claim(), queue.claim())] == [  # type: ignore[union-attr]
        "q.jpg",
        "f.jpg",
        "p.jpg",
        "d.jpg",
    ]
    queue.mark_published(3, "p.png", {"status": 200})
    queue.mark_published(4, "d.png", {"status": 200})
    queue.mark_done(4, archived_as="d.jpg")
    assert queue.claim().rel_path == "x.jpg"  # type: ignore[union-attr]
    queue.mark_quarantined(5, {"status": 422, "quarantined_as": "x.jpg"}, {"status": 422})
    assert queue.claim().rel_path == "h.jpg"  # type: ignore[union-attr]
    queue.cancel(6, {"code": "source_deleted"})
    queue.release(1)  # q: queued again; f: in flight when the daemon stopped
    queue.enqueue_many([new("h2.jpg", sha(50))], requeue_done=True, hold=HoldRule(threshold=1, window=1e9))
    queue.set_meta("budget", {"raised": {"day": 10}})
    queue.save_slots([Slot(4_999.0, 4_999.5)])
    for t in (4_000.0, 4_500.0):
        queue.record_request(RequestRecord(t, "/v1.0/alpha-channel", 200, 0.5, 100, 50))
    (state / "results").mkdir()
    (state / "results" / f"{sha(3)}-matte-1024.png").write_bytes(b"matte of d")
    (state / "results" / f"{sha(2)}.png").write_bytes(b"cut-out of p")
    (state / "dropcut.lock").write_text("")
    return queue


def test_a_sqlite_queue_is_moved_once(pg_db: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    populated_sqlite(state).close()
    before = tmp_path / "copy.sqlite3"
    shutil.copy(state / "queue.sqlite3", before)
    target = shared(pg_db, daemon=daemon_id(state, "nas-a"), clock=Clock(now=9_000.0))
    target.enqueue_many([new("earlier.jpg", sha(90)), new("c.jpg", sha(6), inode=6)], requeue_done=True)

    moved = migrate_sqlite(state / "queue.sqlite3", target)

    assert (moved.jobs, moved.jobs_present, moved.requests, moved.results) == (8, 1, 2, 2)
    assert moved.renamed_to == state / "queue.sqlite3.migrated" and moved.renamed_to.exists()
    assert not (state / "queue.sqlite3").exists()
    counts = {k: v for k, v in target.counts().items() if v}
    # f was in flight: queued again; c was in the shared queue already (queued there)
    assert counts == {"queued": 4, "published": 1, "done": 1, "quarantined": 1, "cancelled": 1, "held": 1}
    # admission order: after the site's own jobs, in the old order
    order = [j.rel_path for j in target.recent(("queued",), limit=10)]
    assert sorted(order) == ["c.jpg", "earlier.jpg", "f.jpg", "q.jpg"]
    assert target.known_signature("d.jpg", 10, int(1e9), 0, 3) == "done"
    assert [j.rel_path for j in target.done_jobs()] == ["d.jpg"]
    [quarantined] = target.quarantined_jobs()
    assert target.job_error(quarantined.id) == {"status": 422, "quarantined_as": "x.jpg"}
    assert quarantined.history == [{"status": 422}]
    assert target.claim_output("p.jpg", output_candidates("p.jpg"), output_key) == "p.png"  # its own
    assert target.claim_output("P.jpeg", output_candidates("P.jpeg"), output_key) == "P~jpeg.png"
    assert target.get_meta("budget") == {"raised": {"day": 10}}
    assert target.load_slots() == [Slot(4_999.0, 4_999.5)]
    assert target.requests_since(0) == 2
    first = target.claim()
    assert first is not None and first.rel_path in ("earlier.jpg", "c.jpg", "q.jpg", "f.jpg")
    [published] = target.published_jobs()
    assert published.rel_path == "p.jpg" and published.output_rel == "p.png"
    with target.transaction() as db:
        keys = {r[0] for r in db.execute("SELECT result_key FROM results")}
    assert keys == {f"{sha(3)}-matte-1024", sha(2)}
    # once: the renamed file says so, and so does the shared queue for a copy made before
    shutil.copy(moved.renamed_to, state / "queue.sqlite3")
    with pytest.raises(AlreadyMigrated):
        migrate_sqlite(state / "queue.sqlite3", target)
    shutil.copy(before, state / "queue.sqlite3")
    with pytest.raises(AlreadyMigrated):
        migrate_sqlite(state / "queue.sqlite3", target)
    assert target.counts()["done"] == 1  # nothing was added by the refused runs
    target.close()


def test_a_migration_refuses_while_the_daemon_runs_and_changes_nothing(pg_db: str, tmp_path: Path) -> None:
    import fcntl

    state = tmp_path / "state"
    state.mkdir()
    populated_sqlite(state).close()
    target = shared(pg_db)
    fd = os.open(state / "dropcut.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the daemon of this state folder
        with pytest.raises(BlockingIOError):
            migrate_sqlite(state / "queue.sqlite3", target)
    finally:
        os.close(fd)
    assert (state / "queue.sqlite3").exists() and sum(target.counts().values()) == 0
    with contextlib.closing(sqlite3.connect(state / "queue.sqlite3")) as lite:
        assert lite.execute("SELECT COUNT(*) FROM meta WHERE key='migrated_to'").fetchone() == (0,)
    moved = migrate_sqlite(state / "queue.sqlite3", target)  # stopped: it goes
    assert moved.jobs == 8
    with contextlib.closing(sqlite3.connect(moved.renamed_to)) as lite:
        [(value,)] = lite.execute("SELECT value FROM meta WHERE key='migrated_to'").fetchall()
    assert json.loads(value)["site"] == SITE and PASSWORD not in value
    target.close()
