"""The large-batch hold (issue 14, item 2): 250 files dropped at once with
``hold_batches_over = 200``: 200 are sent, 50 are held (condition ``batch_held`` with the
cost and the commands); ``dropcut approve`` sends them; ``dropcut discard`` leaves them in
the inbox, untouched and unsent, also after a restart."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from dropcut.queue import HoldRule, JobQueue, NewJob, connect
from tests.fake_api import FakeWithoutBG
from tests.support import Folders, InProcessDaemon, drop, image_bytes, wait_for

DROPCUT = str(Path(sys.executable).parent / "dropcut")
# (within the fake's 50 per second: no 429, so every request the fake saw is a file sent once)
FAST = {"rate_limit_requests": 45, "rate_limit_period_seconds": 1.0, "max_in_flight": 8}


def cli(folders: Folders, api: FakeWithoutBG, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DROPCUT, *args], env=folders.env(api.url, **FAST), capture_output=True, text=True, timeout=60
    )


def drop_batch(folders: Folders, n: int, seed: int) -> dict[str, bytes]:
    files = {}
    for i in range(n):
        rel = f"{'shoot' if i >= n // 2 else 'studio'}/p{i:03d}.jpg"
        files[rel] = image_bytes(size=(24, 16), seed=seed + i)
        drop(folders.inbox, rel, files[rel])
    return files


def outputs(folders: Folders) -> int:
    return sum(1 for _ in folders.outbox.rglob("*.png"))


def test_queue_holds_beyond_the_threshold_within_the_window(tmp_path: Path) -> None:
    now = [1000.0]
    queue = JobQueue(connect(tmp_path / "q.sqlite3"), clock=lambda: now[0])

    def job(i: int) -> NewJob:
        return NewJob(f"d/{i}.jpg", hashlib.sha256(str(i).encode()).hexdigest(), 1, 1, i, 1, "JPEG", now[0])

    def add(first: int, last: int, rule: HoldRule) -> list[str]:
        jobs = [job(i) for i in range(first, last)]
        return [what for _, what in queue.enqueue_many(jobs, requeue_done=True, hold=rule)]

    rule = HoldRule(threshold=3, window=60.0)
    assert add(0, 5, rule) == ["queued", "queued", "queued", "held", "held"]
    now[0] += 61  # a new window
    assert add(5, 9, rule) == ["queued", "queued", "queued", "held"]
    assert queue.held_folders() == [("d", 3)]
    assert queue.release_held("d", to="queued") == 3
    now[0] += 1
    # a decision starts a new window: the next files flow
    assert add(9, 11, rule) == ["queued", "queued"]
    assert add(11, 13, rule) == ["queued", "held"]
    assert queue.release_held(None, to="discarded") == 1
    now[0] += 1
    assert add(13, 14, rule) == ["queued"]
    # no hold: everything is queued
    assert set(add(14, 30, HoldRule(threshold=0, window=60.0))) == {"queued"}
    queue.close()


def test_250_files_at_once_200_sent_50_held_until_approved(folders: Folders, api: FakeWithoutBG) -> None:
    settings = folders.settings(api.url, hold_batches_over=200, **FAST)
    with InProcessDaemon(settings) as run:
        drop_batch(folders, 250, seed=20_000)
        wait_for(lambda: len(run.logs.events("job_held")) == 50, timeout=60)
        wait_for(lambda: outputs(folders) == 200, timeout=60)
        started = wait_for(
            lambda: [e for e in run.logs.events("condition_started") if e["code"] == "batch_held"]
        )
        # (it starts with the first files held, and counts on while the batch is admitted)
        assert "dropcut approve" in started[0]["detail"]
        assert len(api.requests) == 200

        status = wait_for(lambda: (out := cli(folders, api, "status")) and "50 files (" in out.stdout and out)
        assert "held 50" in status.stdout and "a large batch is held" in status.stdout
        assert "50 credits" in status.stdout

        done = cli(folders, api, "approve")
        assert done.returncode == 0, done.stderr
        assert "approved 50 held files" in done.stdout
        wait_for(lambda: outputs(folders) == 250, timeout=60)
        assert len(api.requests) == 250
        wait_for(lambda: [e for e in run.logs.events("condition_ended") if e["code"] == "batch_held"])


def test_discard_leaves_held_files_in_the_inbox_unsent_also_after_a_restart(
    folders: Folders, api: FakeWithoutBG
) -> None:
    settings = folders.settings(api.url, hold_batches_over=200, **FAST)
    with InProcessDaemon(settings) as run:
        files = drop_batch(folders, 250, seed=21_000)
        wait_for(lambda: len(run.logs.events("job_held")) == 50, timeout=60)
        wait_for(lambda: outputs(folders) == 200, timeout=60)
        held = [e["file"] for e in run.logs.events("job_held")]
        done = cli(folders, api, "discard", str(folders.inbox / "shoot"))
        assert done.returncode == 0, done.stderr
        assert "discarded 50 held files in shoot/" in done.stdout
        wait_for(lambda: [e for e in run.logs.events("condition_ended") if e["code"] == "batch_held"])
    # untouched: same bytes, still in the inbox
    for rel in held:
        assert (folders.inbox / rel).read_bytes() == files[rel]
    with InProcessDaemon(settings) as run:
        wait_for(lambda: run.logs.events("rescan_done") or run.logs.events("daemon_started"))
        drop(folders.inbox, "later.jpg", image_bytes(seed=21_999))  # the queue still works
        wait_for(lambda: (folders.outbox / "later.png").exists())
    assert len(api.requests) == 201  # the 50 were never sent
    for rel in held:
        assert (folders.inbox / rel).read_bytes() == files[rel]
        assert not (folders.outbox / rel).with_suffix(".png").exists()
    nothing = cli(folders, api, "approve")
    assert nothing.returncode == 1 and "no held files" in nothing.stderr
