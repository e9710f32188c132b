"""Watching the inbox: mode choice, rescans, a watch that cannot die silently, stability.

Unit tables for :mod:`dropcut.watch` (mount table parsing, mode choice, the event
handler), then the real daemon in-process with real files, a real (fake) HTTP server and,
where a failure of the watch itself is needed, an injected watchdog observer factory or
mount table file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from watchdog.events import (
    DirCreatedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
)
from watchdog.observers.api import BaseObserver, EventEmitter

from dropcut.logs import configure
from dropcut.watch import (
    InboxWatcher,
    Mount,
    _Handler,
    choose_mode,
    default_observer,
    detect_mode,
    fstype_of,
    parse_mountinfo,
    watch_error_reason,
)
from tests.fake_api import FakeWithoutBG
from tests.support import Folders, InProcessDaemon, LogCapture, drop, image_bytes, wait_for
from tests.test_hostile import OpenSpy

HEALTH = 2.0  # dropcut.service.HEALTH_SECONDS: how often the watch is checked

# watchdog's inotify group may add a new folder's watch twice while racing `mkdir -p` (it
# says so with a RuntimeWarning and carries on): watchdog's business, not dropcut's.
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


@pytest.fixture
def spy() -> Iterator[OpenSpy]:
    """Sees opens of files by anyone, from outside dropcut (inotify)."""
    s = OpenSpy()
    yield s
    s.close()


def events_for(run: InProcessDaemon, name: str, file: str) -> list[dict[str, Any]]:
    return [e for e in run.logs.events(name) if e.get("file") == file]


def ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


# ---------------------------------------------------------------------------------------
# Observer factories (the only thing injected: watchdog observers, never dropcut code)
# ---------------------------------------------------------------------------------------


class RecordingFactory:
    """The default observers, remembering what was asked for; optionally the inotify limit
    is reached after ``native_ok`` native observers."""

    def __init__(self, native_ok: int | None = None) -> None:
        self.calls: list[tuple[str, float]] = []
        self.observers: list[BaseObserver] = []
        self._native_ok = native_ok

    def __call__(self, mode: str, poll_interval: float) -> BaseObserver:
        self.calls.append((mode, poll_interval))
        natives = sum(m == "native" for m, _ in self.calls)
        if mode == "native" and self._native_ok is not None and natives > self._native_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        observer = default_observer(mode, poll_interval)
        self.observers.append(observer)
        return observer


class _DeafEmitter(EventEmitter):
    """Never reports anything (every event is lost)."""

    def queue_events(self, timeout: float) -> None:
        self.stopped_event.wait(timeout)


class DeafObserver(BaseObserver):
    def __init__(self) -> None:
        super().__init__(_DeafEmitter, timeout=0.1)


def limited_factory(err: int) -> Callable[[str, float], BaseObserver]:
    """inotify limits reached: the native observer cannot be set up, polling can."""

    def factory(mode: str, poll_interval: float) -> BaseObserver:
        if mode == "native":
            raise OSError(err, os.strerror(err))
        return default_observer(mode, poll_interval)

    return factory


# ---------------------------------------------------------------------------------------
# Mount table and mode choice (tables)
# ---------------------------------------------------------------------------------------


def mount_line(point: str, fstype: str, n: int = 90, optional: str = "shared:1") -> str:
    """One /proc/self/mountinfo line, with the kernel's octal escapes in the mount point."""
    escaped = point.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")
    return f"{n} 1 0:{n} / {escaped} rw,relatime {optional} - {fstype} src{n} rw"


@pytest.mark.parametrize(
    ("line", "point", "fstype"),
    [
        pytest.param("22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw", "/", "ext4", id="root"),
        pytest.param(
            r"95 22 0:50 / /mnt/nas\040photos rw,relatime shared:40 - nfs4 nas:/photos rw",
            "/mnt/nas photos",
            "nfs4",
            id="space-040",
        ),
        pytest.param(
            r"96 22 0:51 / /mnt/a\011b\012c rw - cifs //srv/x rw", "/mnt/a\tb\nc", "cifs", id="tab-newline"
        ),
        pytest.param(
            r"97 22 0:52 / /mnt/back\134slash rw - 9p share rw", "/mnt/back\\slash", "9p", id="backslash"
        ),
        pytest.param(
            "98 22 0:53 / /mnt/many rw shared:2 master:7 propagate_from:3 unbindable - fuse.sshfs me@h: rw",
            "/mnt/many",
            "fuse.sshfs",
            id="several-optional-fields",
        ),
        pytest.param(
            "99 22 0:54 / /mnt/none rw - smb3 //h/s rw", "/mnt/none", "smb3", id="no-optional-field"
        ),
    ],
)
def test_parse_mountinfo_line(line: str, point: str, fstype: str) -> None:
    assert parse_mountinfo(line + "\n") == [Mount(point=point, fstype=fstype)]


def test_parse_mountinfo_skips_malformed_lines() -> None:
    text = "\n".join(
        [
            "garbage",
            "1 2 3",
            "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw",
            "23 22 0:1 / /no-separator rw shared:1 ext4 /dev/x rw",
            "",
        ]
    )
    assert parse_mountinfo(text) == [Mount("/", "ext4")]


def test_parse_mountinfo_keeps_non_ascii_mount_points() -> None:
    line = mount_line("/srv/photos café", "nfs4")
    assert parse_mountinfo(line) == [Mount("/srv/photos café", "nfs4")]
    # …and therefore an inbox below it is found to be on NFS.
    mounts = parse_mountinfo(mount_line("/", "ext4", 22) + "\n" + line)
    assert fstype_of("/srv/photos café/inbox", mounts) == "nfs4"


MOUNTS = [
    Mount("/", "ext4"),
    Mount("/srv", "xfs"),
    Mount("/srv/nas", "nfs4"),
    Mount("/srv/nas/local", "ext4"),
    Mount("/srv/nasty", "btrfs"),
    Mount("/mnt/stack", "ext4"),
    Mount("/mnt/stack", "cifs"),  # mounted on top: listed later, wins
    Mount("/mnt/with space", "smb3"),
]


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/", "ext4"),
        ("/home/me/inbox", "ext4"),
        ("/srv", "xfs"),
        ("/srv/inbox", "xfs"),
        ("/srv/nas", "nfs4"),
        ("/srv/nas/inbox", "nfs4"),
        ("/srv/nas/local/inbox", "ext4"),  # longest mount point wins
        ("/srv/nasty/inbox", "btrfs"),  # a prefix of the name is not a parent folder
        ("/srv/nas2", "xfs"),
        ("/mnt/stack/inbox", "cifs"),  # stacked: the last one listed
        ("/mnt/with space/in box", "smb3"),
    ],
)
def test_fstype_of(path: str, fstype: str) -> None:
    assert fstype_of(path, MOUNTS) == fstype


def test_fstype_of_without_a_mount_table() -> None:
    assert fstype_of("/anything", []) is None
    assert fstype_of("/srv/x", [Mount("/srv/y", "ext4")]) is None


@pytest.mark.parametrize(
    "fstype",
    ["nfs", "nfs4", "cifs", "smb3", "9p", "fuse.sshfs", "fuse.rclone", "fuse.s3fs"],
)
def test_auto_polls_on_network_file_systems(fstype: str) -> None:
    mode, reason = choose_mode("auto", fstype)
    assert mode == "poll"
    assert fstype in reason


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "tmpfs", "zfs", "overlay", "f2fs"])
def test_auto_watches_natively_on_local_file_systems(fstype: str) -> None:
    mode, reason = choose_mode("auto", fstype)
    assert mode == "native"
    assert fstype in reason


def test_auto_polls_when_the_file_system_is_unknown() -> None:
    mode, reason = choose_mode("auto", None)
    assert mode == "poll" and "unknown" in reason


@pytest.mark.parametrize("setting", ["native", "poll"])
@pytest.mark.parametrize("fstype", ["ext4", "nfs4", None])
def test_a_configured_mode_is_used_as_is(setting: str, fstype: str | None) -> None:
    assert choose_mode(setting, fstype) == (setting, "configured")


def test_detect_mode_reads_the_mount_table_file(tmp_path: Path) -> None:
    inbox = tmp_path / "shared in\tbox"
    inbox.mkdir()
    table = tmp_path / "mountinfo"
    table.write_text(mount_line("/", "ext4", 22) + "\n" + mount_line(str(tmp_path), "nfs4") + "\n")
    mode, reason, fstype = detect_mode("auto", inbox, table)
    assert (mode, fstype) == ("poll", "nfs4") and "nfs4" in reason
    assert detect_mode("auto", inbox, tmp_path / "missing")[::2] == ("poll", None)
    table.write_text(mount_line("/", "ext4", 22) + "\n")
    assert detect_mode("auto", inbox, table)[::2] == ("native", "ext4")


@pytest.mark.parametrize(
    ("err", "words"),
    [(errno.ENOSPC, "max_user_watches"), (errno.EMFILE, "max_user_instances"), (errno.EACCES, "EACCES")],
)
def test_watch_error_reason_names_the_limit(err: int, words: str) -> None:
    assert words in watch_error_reason(OSError(err, os.strerror(err)))


# ---------------------------------------------------------------------------------------
# The event handler: one bad event never ends delivery
# ---------------------------------------------------------------------------------------


def test_handler_maps_events_to_relative_paths(tmp_path: Path) -> None:
    seen: list[tuple[str, bool]] = []
    handler = _Handler(tmp_path, lambda rel, is_dir: seen.append((rel, is_dir)))
    inbox = str(tmp_path)
    handler.dispatch(FileCreatedEvent(f"{inbox}/a.jpg"))
    handler.dispatch(FileModifiedEvent(f"{inbox}/sub/b.jpg"))
    handler.dispatch(FileMovedEvent(f"{inbox}/.c.jpg.part", f"{inbox}/c.jpg"))
    handler.dispatch(DirCreatedEvent(f"{inbox}/new/dir"))
    handler.dispatch(FileDeletedEvent(f"{inbox}/gone.jpg"))
    handler.dispatch(FileOpenedEvent(f"{inbox}/read-by-us.jpg"))
    handler.dispatch(FileClosedNoWriteEvent(f"{inbox}/read-by-us.jpg"))
    handler.dispatch(FileCreatedEvent(f"{tmp_path.parent}/outside.jpg"))
    handler.dispatch(DirCreatedEvent(inbox))
    assert seen == [("a.jpg", False), ("sub/b.jpg", False), ("c.jpg", False), ("new/dir", True)]


def test_an_exception_while_handling_one_event_is_logged_and_delivery_goes_on(tmp_path: Path) -> None:
    """Unit level: the handler itself swallows and logs a failing report."""
    logs = LogCapture()
    configure("json", "debug", stream=logs)
    seen: list[str] = []

    def report(rel: str, is_dir: bool) -> None:
        if not seen:
            seen.append("boom")
            raise RuntimeError("report failed once")
        seen.append(rel)

    handler = _Handler(tmp_path, report)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        handler.dispatch(FileCreatedEvent(str(tmp_path / name)))
    assert seen == ["boom", "b.jpg", "c.jpg"]
    (failed,) = logs.events("watch_event_failed")
    assert "a.jpg" in failed["path"] and "report failed once" in failed["exception"]
    assert failed["level"] == "error"


def test_a_failing_report_does_not_stop_a_real_observer(tmp_path: Path) -> None:
    """The same through a real inotify observer thread: it keeps delivering."""
    logs = LogCapture()
    configure("json", "debug", stream=logs)
    seen: list[str] = []
    calls = 0

    def report(rel: str, is_dir: bool) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("report failed once")
        seen.append(rel)

    watcher = InboxWatcher(tmp_path, mode="native", poll_interval=1.0, report=report)
    watcher.start()
    try:
        (tmp_path / "first.jpg").write_bytes(b"1")
        wait_for(lambda: logs.events("watch_event_failed"), timeout=5)
        (tmp_path / "second.jpg").write_bytes(b"2")
        wait_for(lambda: "second.jpg" in seen, timeout=5)
        assert watcher.problem() is None
    finally:
        watcher.stop()


# ---------------------------------------------------------------------------------------
# Mode choice end to end, rescans
# ---------------------------------------------------------------------------------------


def test_auto_mode_polls_an_inbox_that_the_mount_table_puts_on_nfs4(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    inbox = tmp_path / "nas share"  # \040 in the mount table
    inbox.mkdir()
    table = tmp_path / "mountinfo"
    table.write_text(mount_line("/", "ext4", 22) + "\n" + mount_line(str(inbox), "nfs4") + "\n")
    factory = RecordingFactory()
    settings = folders.settings(
        api.url, inbox=inbox, watch_mode="auto", poll_interval_seconds=0.2, debounce_seconds=0.1
    )
    with InProcessDaemon(settings, observer_factory=factory, mountinfo=table) as run:
        (chosen,) = run.logs.events("watch_mode_chosen")
        assert chosen["mode"] == "poll" and chosen["fstype"] == "nfs4"
        assert "nfs4" in chosen["reason"]
        assert chosen["level"] == "info"
        assert factory.calls == [("poll", 0.2)]
        drop(inbox, "a.jpg", image_bytes(seed=1))
        wait_for(lambda: (folders.outbox / "a.png").exists())
        # the polling observer saw it (the periodic rescan is 300 s away)
        assert len(api.records()) == 1


def test_auto_mode_watches_natively_on_a_local_file_system(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(mount_line("/", "ext4", 22) + "\n" + mount_line("/elsewhere", "nfs4") + "\n")
    factory = RecordingFactory()
    settings = folders.settings(api.url, watch_mode="auto")
    with InProcessDaemon(settings, observer_factory=factory, mountinfo=table) as run:
        (chosen,) = run.logs.events("watch_mode_chosen")
        assert (chosen["mode"], chosen["fstype"]) == ("native", "ext4")
        assert "ext4" in chosen["reason"]
        assert [mode for mode, _ in factory.calls] == ["native"]
        assert run.logs.events("watch_started")[-1]["mode"] == "native"


def test_configured_poll_mode_is_used_even_on_a_local_file_system(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(mount_line("/", "ext4", 22) + "\n")
    factory = RecordingFactory()
    settings = folders.settings(api.url, watch_mode="poll", poll_interval_seconds=0.25)
    with InProcessDaemon(settings, observer_factory=factory, mountinfo=table) as run:
        (chosen,) = run.logs.events("watch_mode_chosen")
        assert (chosen["mode"], chosen["reason"], chosen["fstype"]) == ("poll", "configured", "ext4")
        assert factory.calls == [("poll", 0.25)]


@pytest.mark.parametrize(
    ("mode", "factory"),
    [
        pytest.param("native", lambda: lambda mode, interval: DeafObserver(), id="observer-never-emits"),
        pytest.param("poll", lambda: None, id="poll-every-hour"),
    ],
)
def test_the_periodic_rescan_finds_files_whose_events_were_lost(
    folders: Folders, api: FakeWithoutBG, mode: str, factory: Callable[[], Any]
) -> None:
    settings = folders.settings(
        api.url,
        watch_mode=mode,
        poll_interval_seconds=3600,
        rescan_interval_seconds=0.3,
        debounce_seconds=0.1,
    )
    with InProcessDaemon(settings, observer_factory=factory()) as run:
        drop(folders.inbox, "sub/lost.jpg", image_bytes(seed=3))
        wait_for(lambda: (folders.archive / "sub" / "lost.jpg").exists(), timeout=10)
        assert (folders.outbox / "sub" / "lost.png").exists()
        assert run.logs.events("watch_mode_chosen")[0]["mode"] == mode
        assert not run.logs.events("watch_degraded")


# ---------------------------------------------------------------------------------------
# A watch that cannot die silently
# ---------------------------------------------------------------------------------------


def test_a_dead_observer_is_noticed_rebuilt_and_followed_by_a_rescan(
    folders: Folders, api: FakeWithoutBG
) -> None:
    factory = RecordingFactory()
    settings = folders.settings(api.url, rescan_interval_seconds=3600, debounce_seconds=0.1)
    with InProcessDaemon(settings, observer_factory=factory) as run:
        watcher = run.daemon._watcher
        assert watcher is not None and watcher._observer is not None
        watcher._observer.stop()  # the observer thread ends
        wait_for(lambda: not factory.observers[0].is_alive(), timeout=5)
        drop(folders.inbox, "while-dead.jpg", image_bytes(seed=4))  # nobody hears this
        (degraded,) = wait_for(lambda: run.logs.events("watch_degraded"), timeout=HEALTH + 5)
        assert "observer" in degraded["reason"] and degraded["level"] == "warning"
        (restored,) = wait_for(lambda: run.logs.events("watch_restored"), timeout=HEALTH + 5)
        assert restored["mode"] == "native"
        assert len(factory.calls) == 2 and factory.observers[1].is_alive()
        # the rescan after the rebuild found the file dropped while nobody listened
        wait_for(lambda: (folders.outbox / "while-dead.png").exists(), timeout=5)
        # and the new observer delivers events again (the periodic rescan is an hour away)
        drop(folders.inbox, "after.jpg", image_bytes(seed=5))
        wait_for(lambda: (folders.outbox / "after.png").exists(), timeout=5)
    assert not list(folders.quarantine.rglob("*.json"))


def test_a_dead_emitter_is_not_a_silent_death_and_limits_on_rebuild_fall_back_to_polling(
    folders: Folders, api: FakeWithoutBG
) -> None:
    """The thread that reads inotify ends while the observer thread lives on (what an
    unexpected error or IN_IGNORED does): noticed, rebuilt, rescanned. The rebuild hits
    the inotify watch limit, so the new watch polls."""
    factory = RecordingFactory(native_ok=1)
    settings = folders.settings(
        api.url, rescan_interval_seconds=3600, poll_interval_seconds=0.2, debounce_seconds=0.1
    )
    with InProcessDaemon(settings, observer_factory=factory) as run:
        observer = factory.observers[0]
        for emitter in list(observer.emitters):
            emitter.stop()
        wait_for(lambda: not any(e.is_alive() for e in observer.emitters), timeout=5)
        assert observer.is_alive()
        drop(folders.inbox, "unheard.jpg", image_bytes(seed=6))
        wait_for(lambda: (folders.outbox / "unheard.png").exists(), timeout=HEALTH + 1.0)
        died, limit = run.logs.events("watch_degraded")
        assert "died" in died["reason"]
        assert "max_user_watches" in limit["reason"] and limit["fallback"] == "poll"
        (restored,) = run.logs.events("watch_restored")
        assert restored["mode"] == "poll"
        assert [mode for mode, _ in factory.calls] == ["native", "native", "poll"]
        # the polling watch delivers (the periodic rescan is an hour away)
        drop(folders.inbox, "heard.jpg", image_bytes(seed=8))
        wait_for(lambda: (folders.outbox / "heard.png").exists(), timeout=5)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EMFILE], ids=["ENOSPC", "EMFILE"])
def test_inotify_limits_fall_back_to_polling(folders: Folders, api: FakeWithoutBG, err: int) -> None:
    settings = folders.settings(
        api.url, poll_interval_seconds=0.2, rescan_interval_seconds=3600, debounce_seconds=0.1
    )
    with InProcessDaemon(settings, observer_factory=limited_factory(err)) as run:
        (degraded,) = run.logs.events("watch_degraded")
        assert degraded["fallback"] == "poll" and degraded["level"] == "warning"
        assert ("max_user_watches" if err == errno.ENOSPC else "max_user_instances") in degraded["reason"]
        assert run.logs.events("watch_started")[-1]["mode"] == "poll"
        drop(folders.inbox, "a.jpg", image_bytes(seed=7))
        wait_for(lambda: (folders.outbox / "a.png").exists(), timeout=10)


def test_jobs_queued_when_the_inbox_vanishes_survive_and_are_published(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    """The share goes away (renamed here) while jobs wait for a paused account: nothing is
    lost, quarantined or moved because of it; the watch comes back with the inbox."""
    api.credit = 0  # the first upload gets 402: the queue pauses with jobs in it
    settings = folders.settings(api.url, max_in_flight=1, rescan_interval_seconds=0.3, debounce_seconds=0.1)
    away = tmp_path / "inbox-away"
    with InProcessDaemon(settings) as run:
        data = {f"p{i}.jpg": image_bytes(seed=10 + i) for i in range(3)}
        for name, blob in data.items():
            drop(folders.inbox, name, blob)
        wait_for(lambda: len(run.logs.events("job_queued")) == 3)
        wait_for(lambda: run.logs.events("queue_paused"))
        os.rename(folders.inbox, away)
        degraded = wait_for(lambda: run.logs.events("watch_degraded"), timeout=HEALTH + 5)
        assert "inbox" in degraded[0]["reason"]
        time.sleep(0.4)  # longer than a rescan interval: rescans stop while the inbox is away
        assert not folders.inbox.exists(), "dropcut must not re-create a vanished inbox"
        os.rename(away, folders.inbox)
        api.credit = 100
        for name in data:
            wait_for(lambda n=name: (folders.archive / n).exists(), timeout=10)
        wait_for(lambda: run.logs.events("watch_restored"), timeout=HEALTH + 5)
        for name, blob in data.items():
            assert (folders.archive / name).read_bytes() == blob
            assert png_size(folders.outbox / name.replace(".jpg", ".png")) == (64, 48)
        assert not run.logs.events("file_quarantined")
        assert len(run.logs.events("job_queued")) == 3, "the queued jobs were kept, not admitted again"
    assert not folders.quarantine.exists() or not list(folders.quarantine.rglob("*.json"))
    assert not list(folders.inbox.iterdir())
    done = [r.sha256 for r in api.records() if r.status == 200]
    assert sorted(done) == sorted(hashlib.sha256(b).hexdigest() for b in data.values())


def test_jobs_published_while_the_inbox_is_away_are_archived_when_it_is_back(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    api.latency = 0.4
    settings = folders.settings(api.url, rescan_interval_seconds=0.5, debounce_seconds=0.1)
    away = tmp_path / "inbox-away"
    with InProcessDaemon(settings) as run:
        blob = image_bytes(seed=20)
        drop(folders.inbox, "a.jpg", blob)
        wait_for(lambda: run.logs.events("upload_started"))
        os.rename(folders.inbox, away)  # gone while the request is in flight
        wait_for(lambda: (folders.outbox / "a.png").exists(), timeout=5)  # still published
        wait_for(lambda: run.logs.events("watch_degraded"), timeout=HEALTH + 1)
        os.rename(away, folders.inbox)
        # archived once the inbox is back (at the latest when the watch is restored)
        wait_for(lambda: (folders.archive / "a.jpg").exists(), timeout=HEALTH + 0.5)
    assert len(api.records()) == 1


def test_an_inbox_replaced_by_a_new_folder_gets_a_new_watch(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    settings = folders.settings(api.url, rescan_interval_seconds=3600, debounce_seconds=0.1)
    with InProcessDaemon(settings) as run:
        os.rename(folders.inbox, tmp_path / "old-inbox")
        folders.inbox.mkdir()  # e.g. a share remounted between two health checks
        drop(folders.inbox, "a.jpg", image_bytes(seed=21))
        wait_for(lambda: (folders.outbox / "a.png").exists(), timeout=HEALTH + 1.0)
        assert run.logs.events("watch_restored")


# ---------------------------------------------------------------------------------------
# Stability
# ---------------------------------------------------------------------------------------


def slow_writer(path: Path, data: bytes, *, step: int, pause: float) -> float:
    """Write ``data`` into ``path`` in place, ``step`` bytes every ``pause`` s; returns the
    time of the last write."""
    last = 0.0
    with path.open("wb") as fh:
        for i in range(0, len(data), step):
            if i:
                time.sleep(pause)
            fh.write(data[i : i + step])
            fh.flush()
            last = time.time()
    return last


def test_a_file_is_admitted_only_after_it_stopped_changing_for_the_debounce(
    folders: Folders, api: FakeWithoutBG
) -> None:
    """Written in place for several debounces (each write restarts the quiet period, and
    changing for a while is no reason to give up), admitted once quiet for the debounce."""
    data = image_bytes("JPEG", (160, 120), seed=30)
    settings = folders.settings(api.url, debounce_seconds=0.15, max_settle_seconds=5, corrupt_grace_seconds=0)
    with InProcessDaemon(settings) as run:
        last = slow_writer(folders.inbox / "slow.jpg", data, step=max(1, len(data) // 8), pause=0.06)
        wait_for(lambda: (folders.outbox / "slow.png").exists())
        (admitted,) = run.logs.events("file_admitted")
        assert ts(admitted) >= last + 0.15 - 0.01
        assert admitted["size"] == len(data)
        assert len(run.logs.events("job_queued")) == 1
        assert not run.logs.events("file_quarantined")
    assert [r.sha256 for r in api.records()] == [hashlib.sha256(data).hexdigest()]


WRITER = r"""
import sys, time
path, step, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
data = sys.stdin.buffer.read()
with open(path, "wb") as fh:
    for i in range(0, len(data), step):
        fh.write(data[i:i + step]); fh.flush()
        time.sleep(pause)
"""

IN_OPEN = 0x20


def test_poll_mode_needs_two_observations_even_without_debounce(
    folders: Folders, api: FakeWithoutBG, spy: OpenSpy
) -> None:
    """Polling sees nothing between two looks: a file is admitted only when two
    observations agree. Even with no debounce at all, a file being written (by another
    process, a chunk every 5 ms) is never read half-written: dropcut opens it exactly once,
    when it is complete."""
    data = image_bytes("JPEG", (160, 120), seed=31)
    settings = folders.settings(
        api.url, watch_mode="poll", poll_interval_seconds=0.1, debounce_seconds=0, corrupt_grace_seconds=0
    )
    spy.watch(folders.inbox)  # IN_OPEN of any file in the inbox, by anyone
    with InProcessDaemon(settings) as run:
        writer = [
            sys.executable,
            "-c",
            WRITER,
            str(folders.inbox / "slow.jpg"),
            str(len(data) // 60 + 1),
            "0.005",
        ]
        subprocess.run(writer, input=data, check=True, timeout=30)
        wait_for(lambda: (folders.archive / "slow.jpg").exists(), timeout=10)
        assert not run.logs.events("file_recheck_scheduled")
        assert len(run.logs.events("job_queued")) == 1
    opens = [e for e in spy.events() if e.mask & IN_OPEN and e.name == "slow.jpg"]
    assert len(opens) == 2, "one open by the writer, one by dropcut once the file was complete"


def test_a_file_that_never_stops_changing_is_quarantined_as_never_settled(
    folders: Folders, api: FakeWithoutBG
) -> None:
    settings = folders.settings(api.url, debounce_seconds=0.2, max_settle_seconds=1.0)
    stop = threading.Event()
    path = folders.inbox / "growing.jpg"
    started = time.time()

    def grow() -> None:
        with path.open("wb") as fh:
            fh.write(image_bytes(seed=32)[:100])
            while not stop.wait(0.005):
                fh.write(b"x")
                fh.flush()

    with InProcessDaemon(settings) as run:
        writer = threading.Thread(target=grow, daemon=True)
        writer.start()
        try:
            (event,) = wait_for(lambda: run.logs.events("file_quarantined"), timeout=12)
        finally:
            stop.set()
            writer.join(5)
        assert event["code"] == "never_settled" and event["status"] == 408
        assert ts(event) - started >= 1.0 - 0.05, "quarantined before max_settle_seconds"
        assert not run.logs.events("file_admitted")
    record = json.loads((folders.quarantine / "growing.jpg.error.json").read_text())
    assert record["error"]["code"] == "never_settled"
    assert (folders.quarantine / "growing.jpg").exists() and not path.exists()
    assert api.records() == []


def test_a_stable_file_that_does_not_decode_gets_a_grace_period(folders: Folders, api: FakeWithoutBG) -> None:
    """late.jpg is completed (in place) within the grace: processed, not quarantined.
    cut.jpg stays truncated: quarantined, but not before the grace has passed."""
    late = image_bytes("JPEG", (120, 90), seed=34)
    cut = image_bytes("JPEG", (100, 80), seed=35)
    settings = folders.settings(api.url, corrupt_grace_seconds=0.6, debounce_seconds=0.1)
    with InProcessDaemon(settings) as run:
        path = drop(folders.inbox, "late.jpg", late[: len(late) // 2])  # preallocated, half filled
        drop(folders.inbox, "cut.jpg", cut[: len(cut) // 2])
        wait_for(
            lambda: {e["file"] for e in run.logs.events("file_recheck_scheduled")} == {"late.jpg", "cut.jpg"}
        )
        with path.open("r+b") as fh:  # the scanner finishes writing
            fh.write(late)
        wait_for(lambda: (folders.archive / "late.jpg").exists(), timeout=5)
        (event,) = wait_for(lambda: run.logs.events("file_quarantined"), timeout=5)
        first_failure = events_for(run, "file_recheck_scheduled", "cut.jpg")[0]
        assert first_failure["code"] == "corrupt_image"
        assert event["file"] == "cut.jpg" and event["code"] == "corrupt_image" and event["status"] == 422
        assert ts(event) - ts(first_failure) >= 0.6 - 0.03, "quarantined before the grace ended"
    assert png_size(folders.outbox / "late.png") == (120, 90)
    assert (folders.archive / "late.jpg").read_bytes() == late
    record = json.loads((folders.quarantine / "cut.jpg.error.json").read_text())
    assert record["error"]["code"] == "corrupt_image" and record["error"]["source"] == "local"
    assert (folders.quarantine / "cut.jpg").read_bytes() == cut[: len(cut) // 2]
    assert [(r.filename, r.status) for r in api.records()] == [("late.jpg", 200)]


def test_a_corrupt_image_is_read_again_once_after_the_grace_not_in_between(
    folders: Folders, api: FakeWithoutBG
) -> None:
    data = image_bytes("JPEG", (120, 90), seed=37)
    settings = folders.settings(api.url, corrupt_grace_seconds=0.4, debounce_seconds=0.1)
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "cut.jpg", data[: len(data) // 2])
        wait_for(lambda: run.logs.events("file_quarantined"), timeout=10)
        # one failure starts the grace, the re-check after it quarantines: one recheck
        assert len(run.logs.events("file_recheck_scheduled")) == 1


def test_duplicate_and_late_events_never_queue_a_file_twice(folders: Folders, api: FakeWithoutBG) -> None:
    api.latency = 0.4  # the job stays queued/in flight while the events arrive
    data = image_bytes(seed=36)
    with InProcessDaemon(folders.settings(api.url, debounce_seconds=0.1)) as run:
        path = drop(folders.inbox, "a.jpg", data)
        wait_for(lambda: run.logs.events("job_queued"))
        for _ in range(3):
            os.utime(path)  # touch: a new mtime, same bytes
            time.sleep(0.02)
        path.write_bytes(data)  # re-saved in place with the same content
        wait_for(lambda: (folders.outbox / "a.png").exists(), timeout=10)
        time.sleep(0.2)  # late events and a settle round after the publish
        assert len(run.logs.events("job_queued")) == 1
    assert len(api.records()) == 1


def test_an_input_touched_while_in_flight_is_still_archived(folders: Folders, api: FakeWithoutBG) -> None:
    api.latency = 0.3
    data = image_bytes(seed=38)
    settings = folders.settings(api.url, rescan_interval_seconds=0.3, debounce_seconds=0.1)
    with InProcessDaemon(settings) as run:
        path = drop(folders.inbox, "a.jpg", data)
        wait_for(lambda: run.logs.events("upload_started"))
        os.utime(path)  # same bytes, new mtime
        wait_for(lambda: run.logs.events("job_duplicate"))
        wait_for(lambda: (folders.outbox / "a.png").exists(), timeout=10)
        wait_for(lambda: (folders.archive / "a.jpg").exists(), timeout=1.0)
    assert (folders.archive / "a.jpg").read_bytes() == data
    assert len(api.records()) == 1
