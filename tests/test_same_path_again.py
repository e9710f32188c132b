"""The same path dropped again: which job at a path is the newest is decided by the order
of admission (``jobs.seq``), not by row id — a job re-admitted for content dropped again
keeps its old row and id. Queue-level tests (the end-to-end one is in test_names.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dropcut.queue import Job, JobQueue, NewJob, connect

A = "a" * 64
B = "b" * 64
C = "c" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def new(rel: str, sha: str, at: float, inode: int = 1) -> NewJob:
    return NewJob(
        rel_path=rel,
        sha256=sha,
        size=10,
        mtime_ns=int(at * 1e9),
        inode=inode,
        device=1,
        format="jpeg",
        first_seen=at,
    )


def open_queue(path: Path) -> JobQueue:
    return JobQueue(connect(path), clock=Clock())


def admit(queue: JobQueue, rel: str, sha: str, at: float, inode: int = 1) -> str:
    [(_, what)] = queue.enqueue_many([new(rel, sha, at, inode)], requeue_done=True)
    return what


def process(queue: JobQueue) -> tuple[Job, bool]:
    """Claim the next job and finish it as the dispatcher does; returns it and whether its
    result was thrown away as superseded."""
    job = queue.claim()
    assert job is not None
    stale = queue.superseded(job)
    queue.mark_published(job.id, "" if stale else "p.png", {"status": 200})
    queue.mark_done(job.id)
    return job, stale


def test_content_dropped_again_after_other_content_is_the_newest_again(tmp_path: Path) -> None:
    queue = open_queue(tmp_path / "q.sqlite3")
    assert admit(queue, "p.jpg", A, 1.0) == "queued"
    job_a, stale = process(queue)
    assert not stale
    assert admit(queue, "p.jpg", B, 2.0, inode=2) == "queued"
    job_b, stale = process(queue)
    assert not stale and job_b.id > job_a.id
    assert admit(queue, "p.jpg", A, 3.0, inode=3) == "requeued"
    again, stale = process(queue)
    assert again.id == job_a.id  # the old row, the old (lower) id ...
    assert not stale  # ... yet the newest drop at p.jpg: its result is published
    assert queue.known_signature("p.jpg", 10, int(3.0 * 1e9), 0, 3) == "done"
    assert queue.known_signatures([("p.jpg", 10, int(3.0 * 1e9), 0, 3)]) == {
        ("p.jpg", 10, int(3.0 * 1e9), 0, 3): "done"
    }


def test_an_older_pending_job_is_still_superseded_by_newer_content(tmp_path: Path) -> None:
    queue = open_queue(tmp_path / "q.sqlite3")
    admit(queue, "p.jpg", A, 1.0)
    process(queue)
    admit(queue, "p.jpg", B, 2.0, inode=2)
    admit(queue, "p.jpg", A, 3.0, inode=3)  # A again while B is still queued: A is newest
    admit(queue, "other.jpg", B, 3.5)
    order = []
    for _ in range(3):
        job, stale = process(queue)
        order.append((job.rel_path, job.sha256, stale))
    # claimed by row (the re-admitted A keeps its old, low id); B's result, older than the
    # A dropped after it, is not published, whichever order they finish in
    assert order == [("p.jpg", A, False), ("p.jpg", B, True), ("other.jpg", B, False)]


def test_requeued_newest_job_supersedes_a_pending_one(tmp_path: Path) -> None:
    queue = open_queue(tmp_path / "q.sqlite3")
    admit(queue, "p.jpg", A, 1.0)
    process(queue)
    admit(queue, "p.jpg", B, 2.0, inode=2)
    pending_b = queue.claim()
    assert pending_b is not None and pending_b.sha256 == B  # in flight
    admit(queue, "p.jpg", A, 3.0, inode=3)  # dropped again meanwhile
    assert queue.superseded(pending_b)


def test_a_quarantined_newer_job_does_not_supersede(tmp_path: Path) -> None:
    queue = open_queue(tmp_path / "q.sqlite3")
    admit(queue, "p.jpg", A, 1.0)
    job = queue.claim()
    assert job is not None
    queue.add_quarantined(new("p.jpg", B, 2.0, inode=2), {"status": 415})
    assert not queue.superseded(job)
    admit(queue, "p.jpg", B, 3.0, inode=3)  # the quarantined file put back: tried again
    assert queue.superseded(job)


OLD_JOBS_TABLE = """
CREATE TABLE jobs (
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
    history TEXT NOT NULL DEFAULT '[]'
);
CREATE UNIQUE INDEX jobs_path_sha ON jobs (rel_path, sha256);
"""


def test_a_database_from_before_seq_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite3"
    conn = sqlite3.connect(db)
    conn.executescript(OLD_JOBS_TABLE)
    insert = (
        "INSERT INTO jobs (id, rel_path, sha256, size, mtime_ns, inode, device, state, first_seen, "
        "updated_at) VALUES (?, ?, ?, 10, 0, ?, 1, ?, ?, 0)"
    )
    conn.execute(insert, (1, "p.jpg", A, 3, "queued", 30.0))  # A, re-admitted after B
    conn.execute(insert, (2, "p.jpg", B, 2, "done", 20.0))
    conn.execute(insert, (3, "q.jpg", C, 4, "queued", 25.0))
    conn.commit()
    conn.close()

    queue = open_queue(db)
    seqs = dict(queue._conn.execute("SELECT id, seq FROM jobs").fetchall())
    assert seqs == {2: 1, 3: 2, 1: 3}  # in the order of the drops
    queue.close()
    queue = open_queue(db)  # opening again changes nothing
    assert dict(queue._conn.execute("SELECT id, seq FROM jobs").fetchall()) == seqs
    assert admit(queue, "r.jpg", B, 40.0) == "queued"
    assert queue._conn.execute("SELECT seq FROM jobs WHERE rel_path='r.jpg'").fetchone()[0] == 4
    first = queue.claim()
    assert first is not None and first.id == 1 and not queue.superseded(first)  # A: newest
    second = queue.claim()
    assert second is not None and second.rel_path == "q.jpg"
    assert queue._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_content_dropped_again_while_its_job_is_still_pending_is_the_newest(tmp_path: Path) -> None:
    queue = open_queue(tmp_path / "q.sqlite3")
    assert admit(queue, "p.jpg", A, 1.0, inode=1) == "queued"
    assert admit(queue, "p.jpg", B, 2.0, inode=2) == "queued"
    assert admit(queue, "p.jpg", A, 3.0, inode=3) == "queued"  # A's job still pending: same row
    jobs = {j.sha256: j for j in (queue.claim(), queue.claim()) if j is not None}
    assert not queue.superseded(jobs[A]), "A was dropped last: its result belongs in the outbox"
    assert queue.superseded(jobs[B])
    assert admit(queue, "p.jpg", A, 3.0, inode=3) == "inflight"  # a rescan of the same file:
    assert not queue.superseded(jobs[A])  # nothing changes


def test_a_restored_job_comes_back_even_when_its_id_was_reused(tmp_path: Path) -> None:
    queue = open_queue(tmp_path / "q.sqlite3")
    admit(queue, "a.jpg", A, 1.0)
    job = queue.claim()
    assert job is not None
    queue.mark_quarantined(job.id, {"status": 422})
    row = queue.forget(job.id)
    assert row is not None
    admit(queue, "new.jpg", B, 2.0)  # meanwhile: SQLite hands the freed id to a new job
    queue.restore(row)
    assert [j.rel_path for j in queue.quarantined_jobs()] == ["a.jpg"]
    assert queue.job_error(queue.quarantined_jobs()[0].id) == {"status": 422}


def test_output_names_are_claimed_in_queue_order_also_for_requeued_paths(tmp_path: Path) -> None:
    from dropcut.paths import output_candidates, output_key

    rule = (lambda rel: ([name] for name in output_candidates(rel)), output_key)  # one output each
    queue = open_queue(tmp_path / "q.sqlite3")
    queue.add_quarantined(new("a.jpg", A, 1.0), {"status": 413})  # refused locally: no claim
    done = queue.enqueue_many(
        [new("a.jpg", A, 2.0, inode=2), new("a.png", B, 2.0)], requeue_done=True, outputs=rule
    )
    assert [what for _, what in done] == ["requeued", "queued"]
    assert queue.claim_output("a.jpg", output_candidates("a.jpg"), output_key) == "a.png"
    assert queue.claim_output("a.png", output_candidates("a.png"), output_key) == "a~png.png"
