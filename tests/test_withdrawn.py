"""The file on disk decides: an input is disposed of only when it is the content whose
output was written, the outbox holds the cut-out of what is at each path now, and work the
user withdrew (deleted, replaced, renamed away) is not paid for (issue 9, items 1–5).

Timing is made deterministic by the fake's latency: a request is held at the server while
the test changes the inbox, and every step waits for the daemon's own event."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from PIL import Image

from dropcut.queue import JobQueue, NewJob, connect
from tests.fake_api import FakeWithoutBG
from tests.support import Folders, InProcessDaemon, drop, image_bytes, wait_for

X = image_bytes(size=(64, 48), seed=901)
Y = image_bytes(size=(80, 60), seed=902)
MTIME_NS = 1_700_000_000_000_000_000


def output_size(path: Path) -> tuple[int, int]:
    with Image.open(io.BytesIO(path.read_bytes())) as img:
        return img.size


def overwrite_in_place(path: Path, data: bytes, *, keep_mtime: bool) -> None:
    """What ``cp`` does to an existing file (same inode, truncated and written), and with
    ``keep_mtime`` what ``cp -p`` adds: the mtime set back to a fixed value."""
    with path.open("r+b") as fh:
        fh.truncate(0)
        fh.write(data)
    if keep_mtime:
        os.utime(path, ns=(MTIME_NS, MTIME_NS))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_cp_p_back_to_earlier_content_is_processed_and_never_deleted_unprocessed(
    folders: Folders,
) -> None:
    """Item 1: X (cp -p), then Y, then X again with X's mtime, all in place. The third copy
    has the first one's size, mtime and inode: only its ctime tells it is a new write. It
    must be read again, its cut-out must be the one in the outbox, and the input is deleted
    only as the content that cut-out was made from."""
    with FakeWithoutBG(api_key="test-key", rate_limit=50, rate_period=1.0, latency=2.5) as api:
        settings = folders.settings(api.url, on_success="delete")
        with InProcessDaemon(settings) as run:
            target = folders.inbox / "a.jpg"
            target.write_bytes(X)
            os.utime(target, ns=(MTIME_NS, MTIME_NS))
            wait_for(lambda: run.logs.events("upload_started"))
            overwrite_in_place(target, Y, keep_mtime=False)
            wait_for(lambda: len(run.logs.events("upload_started")) == 2)
            overwrite_in_place(target, X, keep_mtime=True)
            # X is recognised as new content at the path (a new drop of the job in flight)
            wait_for(lambda: [e for e in run.logs.events("job_duplicate") if e["sha256"] == sha(X)])
            wait_for(lambda: len(run.logs.events("input_disposed")) == 2, timeout=30)
            disposed = {e["sha256"]: e["result"] for e in run.logs.events("input_disposed")}
        assert disposed[sha(X)] == "deleted"
        assert not disposed[sha(Y)].startswith("deleted")
        # the inbox is empty only because X, whose cut-out is in the outbox, was deleted
        assert not target.exists()
        assert output_size(folders.outbox / "a.png") == (64, 48)


def test_a_save_while_the_input_is_held_is_put_back_not_deleted(folders: Folders, api: FakeWithoutBG) -> None:
    """Item 1, the last step: the input is moved to a private name and checked on an open
    descriptor before it is deleted. Content that differs from the job's (here written in
    place with every stat field the job knew, which only the hash can tell) goes back
    under its name."""
    from dropcut.paths import Layout
    from dropcut.publish import Publisher

    layout = Layout(folders.inbox, folders.outbox, folders.quarantine, folders.archive, folders.state)
    publisher = Publisher(layout, on_success="delete", clock=lambda: 0.0)
    path = drop(folders.inbox, "d/a.jpg", X)
    holds: list[str | None] = []
    # What the queue believes (X) is not what is on disk (the same size, another content,
    # written after the stat the identity comes from: only the hash can tell).
    other = bytes(b ^ 0xFF for b in X[:100]) + X[100:]
    path.write_bytes(other)
    result = publisher.dispose_input("d/a.jpg", sha(X), identity_of(path), held_as=None, hold=holds.append)
    assert result == "changed:d/a.jpg"
    assert path.read_bytes() == other
    assert holds and holds[0] is not None and holds[0].startswith("d/.dropcut-held-")
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.jpg"]
    # and the same content is deleted, through the private name
    result = publisher.dispose_input(
        "d/a.jpg", sha(other), identity_of(path), held_as=None, hold=holds.append
    )
    assert result == "deleted"
    assert list(path.parent.iterdir()) == []


def identity_of(path: Path) -> tuple[int, int, int, int, int]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def test_a_crash_while_held_is_finished_from_the_recorded_name(folders: Folders) -> None:
    """The private name is recorded before the rename: calling again with it resumes (here:
    the rename was done, the delete was not)."""
    from dropcut.paths import Layout
    from dropcut.publish import Publisher

    layout = Layout(folders.inbox, folders.outbox, folders.quarantine, folders.archive, folders.state)
    publisher = Publisher(layout, on_success="archive", clock=lambda: 0.0)
    path = drop(folders.inbox, "a.jpg", X)
    held = folders.inbox / ".dropcut-held-0123456789abcdef"
    os.rename(path, held)  # the crash came right after the rename
    result = publisher.dispose_input(
        "a.jpg", sha(X), identity_of(held), held_as=".dropcut-held-0123456789abcdef", hold=lambda _: None
    )
    assert result == "archived:a.jpg"
    assert (folders.archive / "a.jpg").read_bytes() == X
    assert list(folders.inbox.iterdir()) == []


def test_keep_putting_back_an_earlier_version_republishes_its_cut_out(
    folders: Folders, api: FakeWithoutBG
) -> None:
    """Item 2: with on_success = keep, X, then Y, then X again at one path: the outbox ends
    with X's cut-out, from the result cache (two requests, not three)."""
    with InProcessDaemon(folders.settings(api.url, on_success="keep")) as run:
        path = drop(folders.inbox, "a.jpg", X)
        wait_for(lambda: (folders.outbox / "a.png").exists())
        drop(folders.inbox, "a.jpg", Y)
        wait_for(lambda: len(run.logs.events("output_written")) == 2)
        assert output_size(folders.outbox / "a.png") == (80, 60)
        drop(folders.inbox, "a.jpg", X)
        wait_for(lambda: len(run.logs.events("output_written")) == 3)
        assert run.logs.events("output_written")[-1]["cached"] is True
        assert path.read_bytes() == X
    assert output_size(folders.outbox / "a.png") == (64, 48)
    assert [r.sha256 for r in api.records()] == [sha(X), sha(Y)]


def test_keep_a_quarantined_file_put_back_is_tried_again(folders: Folders, api: FakeWithoutBG) -> None:
    """Item 3: a file quarantined by the API and moved back into the inbox is sent again,
    whatever on_success is, and is then known (not read at every rescan)."""
    api.fail_next(1, 415)
    settings = folders.settings(api.url, on_success="keep", rescan_interval_seconds=0.3, log_level="debug")
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "a.jpg", X)
        wait_for(lambda: (folders.quarantine / "a.jpg").exists())
        os.rename(folders.quarantine / "a.jpg", folders.inbox / "a.jpg")
        wait_for(lambda: (folders.outbox / "a.png").exists())
        assert [e["again"] for e in run.logs.events("job_queued")] == [False, True]
        # the file is known again: rescans no longer read it
        admitted = len(run.logs.events("file_admitted"))
        rescans = len(run.logs.events("rescan_done"))
        wait_for(lambda: len(run.logs.events("rescan_done")) >= rescans + 3, timeout=10)
        assert len(run.logs.events("file_admitted")) == admitted
    assert [r.status for r in api.records()] == [415, 200]


def test_files_deleted_while_queued_are_cancelled_not_paid_for(folders: Folders) -> None:
    """Item 4: nine photos dropped and deleted while they wait for the rate limit: none is
    uploaded after it was gone; each is cancelled (no output, no request)."""
    with FakeWithoutBG(api_key="test-key", rate_limit=50, rate_period=1.0) as api:
        settings = folders.settings(api.url, rate_limit_requests=1, rate_limit_period_seconds=3.0)
        with InProcessDaemon(settings) as run:
            for i in range(9):
                drop(folders.inbox, f"p{i}.jpg", image_bytes(seed=910 + i))
            wait_for(lambda: len(run.logs.events("job_queued")) == 9)
            first = wait_for(lambda: run.logs.events("upload_started"))[0]["file"]
            for i in range(9):
                (folders.inbox / f"p{i}.jpg").unlink(missing_ok=True)
            # (the one in flight is cancelled too when its answer finds the file gone: it
            # was paid for, its answer is cached, and nothing is written under its name)
            wait_for(
                lambda: len([e for e in run.logs.events("job_cancelled") if not e["paid"]]) >= 8, timeout=15
            )
            cancelled = [e for e in run.logs.events("job_cancelled") if not e["paid"]]
            assert {e["file"] for e in cancelled} == {f"p{i}.jpg" for i in range(9)} - {first}
            assert {e["reason"] for e in cancelled} == {"gone"}
        assert len(api.records()) == 1, "only the request already in flight was spent"
        # (the one in flight is cancelled too if its answer came before the stop, else requeued)
        paid = [e for e in run.logs.events("job_cancelled") if e["paid"]]
        queue = JobQueue(connect(folders.state / "queue.sqlite3"))
        assert queue.counts()["cancelled"] == 8 + len(paid)
        assert [p.name for p in folders.outbox.glob("*.png")] in ([], [first.replace(".jpg", ".png")])


def test_a_photo_replaced_while_queued_sends_only_its_new_content(folders: Folders) -> None:
    """Item 4: replaced while it waits for the rate limit: the old content is never sent."""
    with FakeWithoutBG(api_key="test-key", rate_limit=50, rate_period=1.0) as api:
        settings = folders.settings(api.url, rate_limit_requests=1, rate_limit_period_seconds=3.0)
        with InProcessDaemon(settings) as run:
            drop(folders.inbox, "first.jpg", image_bytes(seed=920))
            wait_for(lambda: run.logs.events("upload_started"))
            drop(folders.inbox, "b.jpg", X)
            wait_for(lambda: [e for e in run.logs.events("job_queued") if e["file"] == "b.jpg"])
            drop(folders.inbox, "b.jpg", Y)
            wait_for(lambda: (folders.outbox / "b.png").exists(), timeout=20)
            assert [e["reason"] for e in run.logs.events("job_cancelled")] == ["changed"]
        assert sha(X) not in [r.sha256 for r in api.records()]
        assert output_size(folders.outbox / "b.png") == (80, 60)


def test_a_folder_renamed_while_queued_gives_one_output_tree(folders: Folders) -> None:
    """Item 5: shoot/ renamed to shoot-final/ while its files are queued (one of them in
    flight): one set of outputs, under the name the user now uses; every photo paid once."""
    with FakeWithoutBG(api_key="test-key", rate_limit=50, rate_period=1.0, latency=1.0) as api:
        settings = folders.settings(api.url, rate_limit_requests=1, rate_limit_period_seconds=2.0)
        with InProcessDaemon(settings) as run:
            photos = {f"{i}.jpg": image_bytes(seed=930 + i) for i in range(3)}
            for name, data in photos.items():
                drop(folders.inbox, f"shoot/{name}", data)
            wait_for(lambda: len(run.logs.events("job_queued")) == 3)
            wait_for(lambda: run.logs.events("upload_started"))
            os.rename(folders.inbox / "shoot", folders.inbox / "shoot-final")
            wait_for(lambda: len(list((folders.archive / "shoot-final").glob("*.jpg"))) == 3, timeout=30)
        assert sorted(p.name for p in (folders.outbox / "shoot-final").iterdir()) == [
            "0.png",
            "1.png",
            "2.png",
        ]
        assert not (folders.outbox / "shoot").exists()
        sent = [r.sha256 for r in api.records() if r.status == 200]
        assert sorted(sent) == sorted(sha(d) for d in photos.values())


def test_queue_recognises_a_preserved_mtime_copy_by_its_ctime(tmp_path: Path) -> None:
    """The signature a rescan trusts has the ctime in it (nobody can set it back)."""
    queue = JobQueue(connect(tmp_path / "q.sqlite3"))
    job = NewJob("a.jpg", "a" * 64, 10, MTIME_NS, 5, 1, "JPEG", 0.0, ctime_ns=111)
    queue.enqueue_many([job], requeue_done=True)
    assert queue.known_signature("a.jpg", 10, MTIME_NS, 111, 5) == "queued"
    assert queue.known_signature("a.jpg", 10, MTIME_NS, 222, 5) is None


def test_a_held_input_left_by_a_crash_in_a_renamed_folder_gets_its_name_back(
    folders: Folders, api: FakeWithoutBG
) -> None:
    """A crash right after an input was moved to its private name, then its folder renamed
    while dropcut was down: the job cannot find it, but the rescan does, and no job holds
    it any more: it is given its name back and processed, never left hidden."""
    held = folders.inbox / "shoot-renamed" / ".dropcut-held-0123456789abcdef-a.jpg"
    held.parent.mkdir()
    held.write_bytes(X)
    with InProcessDaemon(folders.settings(api.url)) as run:
        restored = wait_for(lambda: run.logs.events("held_file_restored"))[0]
        assert restored["file"] == "shoot-renamed/a.jpg"
        wait_for(lambda: (folders.archive / "shoot-renamed" / "a.jpg").exists())
    assert (folders.outbox / "shoot-renamed" / "a.png").exists()
    assert not held.exists()


def test_a_held_input_is_given_back_when_on_success_became_keep(folders: Folders) -> None:
    from dropcut.paths import Layout
    from dropcut.publish import Publisher

    layout = Layout(folders.inbox, folders.outbox, folders.quarantine, folders.archive, folders.state)
    publisher = Publisher(layout, on_success="keep", clock=lambda: 0.0)
    held = folders.inbox / ".dropcut-held-0123456789abcdef-a.jpg"
    held.write_bytes(X)
    result = publisher.dispose_input(
        "a.jpg", sha(X), identity_of(held), held_as=held.name, hold=lambda _: None
    )
    assert result == "kept"
    assert sorted(p.name for p in folders.inbox.iterdir()) == ["a.jpg"]


def test_quarantine_never_takes_a_file_saved_over_the_refused_one(folders: Folders) -> None:
    """Issue 9 item 1, for quarantine: the file at the name is checked by its hash on a
    private name before it is moved; other content goes back, and the spooled bytes that
    were refused are quarantined instead."""
    from dropcut.paths import Layout
    from dropcut.publish import Publisher

    layout = Layout(folders.inbox, folders.outbox, folders.quarantine, folders.archive, folders.state)
    publisher = Publisher(layout, on_success="archive", clock=lambda: 0.0)
    path = drop(folders.inbox, "a.jpg", Y)  # the user's corrected photo, saved at the last moment
    spool = folders.state / "spool-x"
    folders.state.mkdir(exist_ok=True)
    spool.write_bytes(X)  # what the API refused
    placed = publisher.quarantine_input(
        rel_path="a.jpg",
        sha256=sha(X),
        size=len(X),
        identity=identity_of(path),
        error={"status": 422, "code": "invalid_image", "detail": "x", "source": "api"},
        attempts=1,
        first_seen=0.0,
        history=[],
        spool=spool,
    )
    assert placed == "a.jpg"
    assert (folders.quarantine / "a.jpg").read_bytes() == X
    assert path.read_bytes() == Y, "the new save stays in the inbox, to be tried"
    assert sorted(p.name for p in folders.inbox.iterdir()) == ["a.jpg"]
