"""Disk full on the outbox, archive or quarantine: the queue pauses, nothing is lost."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_api import FakeWithoutBG
from tests.support import API_KEY, Folders, InProcessDaemon, drop, image_bytes, wait_for


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path, leave: int) -> Path:
    """Fill ``fs`` until about ``leave`` bytes are free."""
    filler = fs / "filler.bin"
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    with filler.open("ab") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_low_space_pauses_before_spending_a_request(tmp_path: Path, small_fs: Path) -> None:
    folders = Folders.make(tmp_path / "f")
    folders.outbox = small_fs / "outbox"
    with FakeWithoutBG(api_key=API_KEY, rate_limit=50, rate_period=1.0) as api:
        settings = folders.settings(api.url)
        with InProcessDaemon(settings) as run:
            filler = fill(small_fs, leave=64 * 1024)
            drop(folders.inbox, "a.jpg", image_bytes(size=(120, 90), seed=1))
            full = wait_for(lambda: run.logs.events("disk_full"))[0]
            assert full["file"] == "a.jpg"
            paused = wait_for(lambda: run.logs.events("queue_paused"))[0]
            assert paused["code"] == "disk_full"
            assert api.records() == [], "no request is spent on a result that cannot be stored"
            assert (folders.inbox / "a.jpg").exists()
            filler.unlink()
            wait_for(lambda: run.logs.events("queue_resumed"), timeout=15)
            wait_for(lambda: (folders.archive / "a.jpg").exists())
        assert (folders.outbox / "a.png").exists()
        assert not list(folders.quarantine.rglob("*.error.json"))
        assert [r.status for r in api.records()] == [200]


def test_enospc_while_writing_keeps_the_job(tmp_path: Path, small_fs: Path) -> None:
    folders = Folders.make(tmp_path / "f")
    folders.outbox = small_fs / "outbox"
    with FakeWithoutBG(api_key=API_KEY, rate_limit=50, rate_period=1.0, latency=1.0) as api:
        with InProcessDaemon(folders.settings(api.url)) as run:
            drop(folders.inbox, "a.jpg", image_bytes(size=(120, 90), seed=2))
            wait_for(lambda: run.logs.events("upload_started"))
            filler = fill(small_fs, leave=0)  # the disk fills up while the request is in flight
            wait_for(lambda: run.logs.events("disk_full"))
            assert wait_for(lambda: run.logs.events("queue_paused"))[0]["code"] == "disk_full"
            assert (folders.inbox / "a.jpg").exists(), "no input is moved before its output is durable"
            assert not (folders.outbox / "a.png").exists()
            filler.unlink()
            wait_for(lambda: (folders.archive / "a.jpg").exists(), timeout=15)
        assert (folders.outbox / "a.png").exists()
        assert not list((small_fs / "outbox" / ".dropcut-staging").iterdir())


@pytest.mark.parametrize("where", ["archive", "quarantine", "state"])
def test_low_space_on_any_folder_we_write_pauses_before_a_request(
    tmp_path: Path, small_fs: Path, where: str
) -> None:
    """Archive and quarantine take the input, state_dir the result cache and the queue:
    each is checked before a request is spent, like the outbox."""
    folders = Folders.make(tmp_path / "f")
    setattr(folders, where, small_fs / where)
    with FakeWithoutBG(api_key=API_KEY, rate_limit=50, rate_period=1.0) as api:
        with InProcessDaemon(folders.settings(api.url)) as run:
            filler = fill(small_fs, leave=160 * 1024)  # the JPEG's result needs ~300 KiB
            drop(folders.inbox, "a.jpg", image_bytes(size=(120, 90), seed=3))
            full = wait_for(lambda: run.logs.events("disk_full"))[0]
            assert full["path"] == str(small_fs / where)
            assert api.records() == [], "no request is spent on a result that cannot be kept"
            filler.unlink()
            wait_for(lambda: (folders.archive / "a.jpg").exists(), timeout=15)
        assert (folders.outbox / "a.png").exists()
        assert [r.status for r in api.records()] == [200]


def test_enospc_while_archiving_pauses_and_finishes_when_space_returns(
    tmp_path: Path, small_fs: Path
) -> None:
    """The archive (another file system: copy, fsync, rename, unlink) fills up while the
    request is in flight: the output is kept, the input stays in the inbox, the queue
    pauses with disk_full, and the move is finished once there is room again."""
    folders = Folders.make(tmp_path / "f")
    folders.archive = small_fs / "archive"
    big = image_bytes(size=(300, 300), seed=4)  # ~270 KB of noise: more than will be free
    with FakeWithoutBG(api_key=API_KEY, rate_limit=50, rate_period=1.0, latency=1.0) as api:
        with InProcessDaemon(folders.settings(api.url)) as run:
            drop(folders.inbox, "a.jpg", big)
            wait_for(lambda: run.logs.events("upload_started"))
            filler = fill(small_fs, leave=0)
            wait_for(lambda: run.logs.events("disk_full"))
            assert wait_for(lambda: run.logs.events("queue_paused"))[0]["code"] == "disk_full"
            assert (folders.outbox / "a.png").exists(), "the output is durable before the input moves"
            assert (folders.inbox / "a.jpg").read_bytes() == big
            assert not run.logs.events("job_failed")
            filler.unlink()
            wait_for(lambda: (folders.archive / "a.jpg").exists(), timeout=15)
            assert not (folders.inbox / "a.jpg").exists()
        assert (folders.archive / "a.jpg").read_bytes() == big
        assert [r.status for r in api.records()] == [200]
        assert not list((small_fs / "archive" / ".dropcut-staging").iterdir())
