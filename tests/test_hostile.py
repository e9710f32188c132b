"""A share is not trusted: links, special files, hard links, content swapped after the
check, links planted in the output folders, files dropcut may not read.

The real daemon, real files, real HTTP. Whether a file was opened is observed from the
outside with inotify (IN_OPEN/IN_ACCESS on the target) and atime, never by instrumenting
dropcut.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.fake_api import FakeWithoutBG
from tests.support import (
    REPO,
    DaemonProcess,
    Folders,
    InProcessDaemon,
    drop,
    image_bytes,
    wait_for,
)

OLD_ATIME_NS = 1_000_000_000 * 10**9  # 2001-09-09: any read would move it (relatime)
NOBODY = 65534

# watchdog's inotify group may add a new folder's watch twice while racing `mkdir -p` (it
# says so with a RuntimeWarning and carries on): watchdog's business, not dropcut's.
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def rejected(run: InProcessDaemon) -> dict[str, list[str]]:
    """Every file_rejected event, by file: the reasons in order."""
    out: dict[str, list[str]] = {}
    for e in run.logs.events("file_rejected"):
        out.setdefault(e["file"], []).append(e["reason"])
    return out


def wait_rescans(run: InProcessDaemon, n: int, timeout: float = 10) -> None:
    start = len(run.logs.events("rescan_done"))
    wait_for(lambda: len(run.logs.events("rescan_done")) >= start + n, timeout=timeout)


# ---------------------------------------------------------------------------------------
# Seeing opens from the outside: inotify on the targets
# ---------------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
IN_ACCESS = 0x001
IN_MODIFY = 0x002
IN_OPEN = 0x020
IN_MOVE_SELF = 0x800
IN_DELETE_SELF = 0x400
_EVENT = struct.Struct("iIII")


@dataclass(frozen=True)
class Access:
    path: str  # the watched path
    mask: int
    name: str  # the child's name when the watched path is a folder, else ""


class OpenSpy:
    """Records IN_OPEN / IN_ACCESS (and moves/deletes) of watched paths by anyone."""

    MASK = IN_OPEN | IN_ACCESS | IN_MODIFY | IN_MOVE_SELF | IN_DELETE_SELF

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, str] = {}

    def watch(self, path: Path) -> None:
        # IN_DONT_FOLLOW is not set: these are the targets themselves, not links
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), self.MASK)
        if wd < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch", str(path))
        self.paths[wd] = str(path)

    def events(self) -> list[Access]:
        out: list[Access] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                raw = buf[pos + _EVENT.size : pos + _EVENT.size + length].rstrip(b"\0")
                pos += _EVENT.size + length
                out.append(Access(self.paths.get(wd, "?"), mask, os.fsdecode(raw)))

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def spy() -> Iterator[OpenSpy]:
    s = OpenSpy()
    yield s
    s.close()


# ---------------------------------------------------------------------------------------
# Symbolic links
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["native", "poll"])
def test_links_are_refused_and_their_targets_never_opened(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path, spy: OpenSpy, mode: str
) -> None:
    outside = tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    target = outside / "target.jpg"
    target.write_bytes(image_bytes(seed=1))
    secret = outside / "secret" / "s.jpg"
    secret.write_bytes(image_bytes(seed=2))
    fifo = outside / "fifo"
    os.mkfifo(fifo)  # opening it to read would block (without O_NONBLOCK)
    for path in (target, secret):
        os.utime(path, ns=(OLD_ATIME_NS, os.stat(path).st_mtime_ns))
    inbox = folders.inbox
    (inbox / "sub" / "deeper").mkdir(parents=True)
    links = {
        "link.jpg": target,
        "linkdir": outside / "secret",
        "sub/deeper/rel.jpg": Path("../../../outside/target.jpg"),  # relative, at depth
        "sub/linkeddir": Path("../../outside"),  # a linked folder at depth
        "fifo.jpg": fifo,
        "dangling.jpg": tmp_path / "does-not-exist.jpg",
    }
    for rel, dest in links.items():
        os.symlink(dest, inbox / rel)
    for path in (target, secret, fifo, outside, outside / "secret"):
        spy.watch(path)

    settings = folders.settings(
        api.url,
        watch_mode=mode,
        poll_interval_seconds=0.2,
        rescan_interval_seconds=0.2,
        debounce_seconds=0.1,
        log_level="debug",
    )
    with InProcessDaemon(settings) as run:
        # some links made while running, reported by events
        os.symlink(target, inbox / "late.jpg")
        os.symlink(outside / "secret", inbox / "sub" / "latedir")
        drop(inbox, "good.jpg", image_bytes(seed=3))
        wait_for(lambda: (folders.archive / "good.jpg").exists())
        wait_rescans(run, 2)
        refused = rejected(run)
    expected = {*links, "late.jpg", "sub/latedir"}
    assert expected <= set(refused)
    for rel in expected:
        assert refused[rel] == ["symbolic_link"], f"{rel}: {refused[rel]} (reported once, as a link)"
        assert (inbox / rel).is_symlink(), f"{rel} was moved"
    assert spy.events() == [], "a link target was opened, listed, read or moved"
    for path in (target, secret):
        assert os.stat(path).st_atime_ns == OLD_ATIME_NS
    assert target.read_bytes() == image_bytes(seed=1) and secret.read_bytes() == image_bytes(seed=2)
    assert folders.files(folders.outbox) == ["good.png"]
    assert not folders.quarantine.exists() or folders.files(folders.quarantine) == []
    assert [r.filename for r in api.records()] == ["good.jpg"]


# ---------------------------------------------------------------------------------------
# Special files and hard links
# ---------------------------------------------------------------------------------------


def test_special_files_and_hard_links_are_skipped_without_blocking(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path, spy: OpenSpy
) -> None:
    inbox = folders.inbox
    os.mkfifo(inbox / "fifo.jpg")
    sock_dir = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))  # AF_UNIX paths are short
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(sock_dir / "s"))
        server.listen()
        os.rename(sock_dir / "s", inbox / "sock.jpg")
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    devices = {"zero.jpg": os.makedev(1, 5), "null.png": os.makedev(1, 3)}  # /dev/zero never ends
    try:
        for name, dev in devices.items():
            os.mknod(inbox / name, 0o644 | stat.S_IFCHR, dev)
    except PermissionError:
        devices = {}
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(image_bytes(seed=10))
    os.link(outside, inbox / "hard.jpg")  # the same inode outside the inbox
    inside = image_bytes(seed=11)
    (inbox / "twin-a.jpg").write_bytes(inside)
    os.link(inbox / "twin-a.jpg", inbox / "twin-b.jpg")  # two names inside the inbox
    specials = ["fifo.jpg", "sock.jpg", *devices]
    for name in specials:
        spy.watch(inbox / name)
    spy.watch(outside)

    settings = folders.settings(
        api.url,
        watch_mode="poll",
        poll_interval_seconds=0.1,
        rescan_interval_seconds=0.2,
        debounce_seconds=0.1,
        log_level="debug",
    )
    try:
        with InProcessDaemon(settings) as run:
            drop(inbox, "good.jpg", image_bytes(seed=12))
            wait_for(lambda: (folders.archive / "good.jpg").exists(), timeout=10)
            wait_rescans(run, 2)
            drop(inbox, "later.jpg", image_bytes(seed=13))  # nothing got stuck
            wait_for(lambda: (folders.archive / "later.jpg").exists(), timeout=10)
            # no inspector is left blocked on a FIFO or reading /dev/zero (there are two, so
            # one stuck worker would not stop later.jpg on its own)
            wait_for(lambda: run.daemon.admission.pending == 0, timeout=3)
            refused = rejected(run)
    finally:
        server.close()
    for name in specials:
        assert refused.get(name) == ["not_regular_file"], name
        assert os.path.lexists(inbox / name), f"{name} moved"
    for name in ("hard.jpg", "twin-a.jpg", "twin-b.jpg"):
        assert refused.get(name) == ["hard_link"], name
        assert (inbox / name).exists()
    assert spy.events() == [], "a special file or a hard-linked file was opened"
    assert os.stat(outside).st_nlink == 2 and outside.read_bytes() == image_bytes(seed=10)
    assert folders.files(folders.outbox) == ["good.png", "later.png"]
    assert not folders.quarantine.exists() or folders.files(folders.quarantine) == []
    assert sorted(r.filename or "" for r in api.records()) == ["good.jpg", "later.jpg"]


# ---------------------------------------------------------------------------------------
# The bytes uploaded are the bytes validated
# ---------------------------------------------------------------------------------------


def test_content_swapped_after_admission_is_not_what_gets_uploaded(
    folders: Folders, api: FakeWithoutBG
) -> None:
    """a.jpg waits behind a slow upload; its bytes are then overwritten in place. The new
    content is a new job, and the old one, replaced before a request was spent on it, is
    cancelled: the server gets only the new content (issue 9 item 4)."""
    original = image_bytes("JPEG", (64, 48), seed=20)
    swapped = image_bytes("JPEG", (90, 70), seed=21)
    api.latency = 0.5
    settings = folders.settings(
        api.url, watch_mode="poll", poll_interval_seconds=0.1, max_in_flight=1, debounce_seconds=0.1
    )
    with InProcessDaemon(settings) as run:
        drop(folders.inbox, "blocker.jpg", image_bytes(seed=22))
        wait_for(lambda: run.logs.events("upload_started"))
        path = drop(folders.inbox, "a.jpg", original)
        wait_for(lambda: [e for e in run.logs.events("job_queued") if e["file"] == "a.jpg"])
        with path.open("r+b") as fh:  # same inode, new bytes
            fh.write(swapped)
        swapped_at = time.time()
        wait_for(lambda: len(run.logs.events("job_queued")) == 3)
        api.latency = 0
        wait_for(lambda: (folders.archive / "a.jpg").exists(), timeout=10)
        queued = [e["sha256"] for e in run.logs.events("job_queued") if e["file"] == "a.jpg"]
        uploads = [e for e in run.logs.events("upload_started") if e["file"] == "a.jpg"]
    assert ts(uploads[0]) > swapped_at, "the swap must happen before the first upload of a.jpg"
    assert queued == [sha(original), sha(swapped)]
    sent = [r.sha256 for r in api.records() if r.filename == "a.jpg"]
    assert sent == [sha(swapped)], "withdrawn content is not paid for"
    assert [e["sha256"] for e in run.logs.events("job_cancelled")] == [sha(original)]
    assert png_size(folders.outbox / "a.png") == (90, 70)
    assert (folders.archive / "a.jpg").read_bytes() == swapped


def test_content_swapped_while_paused_ends_with_the_output_of_the_new_content(
    folders: Folders, api: FakeWithoutBG
) -> None:
    original = image_bytes("JPEG", (64, 48), seed=23)
    swapped = image_bytes("JPEG", (90, 70), seed=24)
    api.credit = 0  # the first upload is answered 402: the queue pauses
    settings = folders.settings(
        api.url,
        watch_mode="poll",
        poll_interval_seconds=0.1,
        max_in_flight=1,
        credit_check_interval_seconds=0.2,
        debounce_seconds=0.1,
    )
    with InProcessDaemon(settings) as run:
        path = drop(folders.inbox, "a.jpg", original)
        wait_for(lambda: run.logs.events("queue_paused"))
        with path.open("r+b") as fh:
            fh.write(swapped)
        wait_for(lambda: len(run.logs.events("job_queued")) == 2)
        api.credit = 100
        wait_for(lambda: (folders.archive / "a.jpg").exists(), timeout=10)
        cancelled = wait_for(lambda: run.logs.events("job_cancelled"), timeout=10)
        assert [e["sha256"] for e in cancelled] == [sha(original)]
    records = api.records()
    assert records[0].status == 402 and records[0].sha256 == sha(original)  # (402 costs nothing)
    assert [r.sha256 for r in records[1:]] == [sha(swapped)], "replaced content is not sent again"
    assert (folders.archive / "a.jpg").read_bytes() == swapped
    assert png_size(folders.outbox / "a.png") == (90, 70), "a stale result replaced the newer one"


# ---------------------------------------------------------------------------------------
# Links planted in archive, quarantine and outbox
# ---------------------------------------------------------------------------------------


def test_moves_into_archive_and_quarantine_never_follow_links(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = {name: f"victim {name}\n".encode() for name in ("v-archive", "v-quar", "v-json", "v-out")}
    for name, data in victims.items():
        (outside / name).write_bytes(data)
    for root in (folders.archive, folders.quarantine, folders.outbox):
        root.mkdir()
    os.symlink(outside, folders.archive / "sub")  # a linked folder on the way
    os.symlink(outside, folders.quarantine / "sub")
    os.symlink(outside / "v-archive", folders.archive / "c.jpg")  # a link at the final name
    os.symlink(outside / "v-quar", folders.quarantine / "d.jpg")
    os.symlink(outside / "v-json", folders.quarantine / "e.txt.error.json")
    os.symlink(outside / "v-out", folders.outbox / "f.png")
    junk = b"not an image\n"
    with InProcessDaemon(
        folders.settings(api.url, watch_mode="poll", poll_interval_seconds=0.1, debounce_seconds=0.1)
    ) as run:
        drop(folders.inbox, "sub/bad.jpg", junk)
        drop(folders.inbox, "c.jpg", image_bytes(seed=31))
        drop(folders.inbox, "d.jpg", junk)
        drop(folders.inbox, "e.txt", junk)
        drop(folders.inbox, "f.jpg", image_bytes(seed=32))
        wait_for(lambda: (folders.archive / "c~2.jpg").exists())
        wait_for(lambda: (folders.quarantine / "d~2.jpg").exists())
        wait_for(lambda: (folders.quarantine / "e.txt").exists())
        wait_for(lambda: (folders.archive / "f.jpg").exists())
        (failed,) = wait_for(lambda: run.logs.events("quarantine_failed"))
        assert failed["file"] == "sub/bad.jpg"
        drop(folders.inbox, "sub/good.jpg", image_bytes(seed=30))
        wait_for(lambda: (folders.outbox / "sub" / "good.png").exists())
        (refused,) = wait_for(lambda: run.logs.events("input_dispose_failed"))  # the archive move
        assert refused["file"] == "sub/good.jpg", refused
    # the targets are untouched and nothing was written through a link
    assert sorted(os.listdir(outside)) == sorted(victims)
    for name, data in victims.items():
        assert (outside / name).read_bytes() == data
    # inputs that could not be moved safely stay where they were
    assert (folders.inbox / "sub" / "good.jpg").exists()
    assert (folders.inbox / "sub" / "bad.jpg").read_bytes() == junk
    # links at final names were not written through: free names were used instead
    assert (folders.archive / "c.jpg").is_symlink()
    assert (folders.quarantine / "d.jpg").is_symlink()
    assert json.loads((folders.quarantine / "d~2.jpg.error.json").read_text())["file"] == "d.jpg"
    assert not (folders.quarantine / "e.txt.error.json").is_symlink()  # the link was replaced
    assert json.loads((folders.quarantine / "e.txt.error.json").read_text())["file"] == "e.txt"
    assert not (folders.outbox / "f.png").is_symlink()
    assert png_size(folders.outbox / "f.png") == (64, 48)


# ---------------------------------------------------------------------------------------
# Files dropcut may not read
# ---------------------------------------------------------------------------------------


class NobodyDaemon(DaemonProcess):
    """``dropcut run`` as a subprocess under uid/gid 65534 (root can read anything)."""

    def start(self) -> NobodyDaemon:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None
        self.proc = subprocess.Popen(
            [
                setpriv,
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                "--",
                sys.executable,
                "-m",
                "dropcut.cli",
                "run",
                *self.args,
            ],
            env=self.env,
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        return self


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A folder outside pytest's 0700 tmp tree that uid 65534 can reach."""
    path = Path(tempfile.mkdtemp(prefix="dropcut-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid 65534")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed")
def test_a_file_dropcut_cannot_read_is_reported_once_and_processed_once_readable(
    api: FakeWithoutBG, world_tmp: Path
) -> None:
    folders = Folders.make(world_tmp)
    for path in (folders.inbox, folders.outbox, folders.quarantine, folders.archive, folders.state):
        path.mkdir(exist_ok=True)
        os.chown(path, NOBODY, NOBODY)
    env = folders.env(api.url, rescan_interval_seconds=3600, debounce_seconds=0.1)
    # uid 65534 must be able to read dropcut and its dependencies: a copy of the package
    # in the world-readable folder, and the virtualenv where it is (skip if it is not).
    shutil.copytree(REPO / "daemon" / "dropcut", world_tmp / "src" / "dropcut")
    env["PYTHONPATH"] = str(world_tmp / "src")
    probe = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            "import dropcut.cli, httpx, watchdog, PIL, pydantic_settings, structlog",
        ],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(
            f"uid {NOBODY} cannot import dropcut's dependencies from {sys.prefix} "
            f"(a checkout inside a private folder?): {probe.stderr.strip().splitlines()[-1:]}"
        )
    data = image_bytes(seed=40)
    daemon = NobodyDaemon(env).start()
    try:
        try:
            daemon.wait_event("daemon_started")
        except AssertionError:
            raise AssertionError(f"dropcut did not start as uid {NOBODY}: {daemon.lines[-5:]}") from None
        # root's file, mode 000 from the first byte (created under a hidden name)
        tmp = folders.inbox / ".locked.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o000)
        os.write(fd, data)
        os.close(fd)
        os.rename(tmp, folders.inbox / "locked.jpg")
        drop(folders.inbox, "open.jpg", image_bytes(seed=41))
        event = daemon.wait_event("file_unreadable")
        assert event["file"] == "locked.jpg" and event["errno"] == "EACCES"
        assert event["level"] == "warning"
        wait_for(lambda: (folders.archive / "open.jpg").exists())
        assert (folders.inbox / "locked.jpg").exists()
        os.chmod(folders.inbox / "locked.jpg", 0o644)
        wait_for(lambda: (folders.archive / "locked.jpg").exists())
        assert len(daemon.events("file_unreadable")) == 1
        assert not daemon.events("file_quarantined")
    finally:
        daemon.stop()
    assert png_size(folders.outbox / "locked.png") == (64, 48)
    assert not folders.files(folders.quarantine)
    assert sorted(r.filename or "" for r in api.records()) == ["locked.jpg", "open.jpg"]


@pytest.fixture
def sigio_ignored() -> Iterator[None]:
    """A lease break is signalled to the holder (this process) with SIGIO."""
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGIO, old)


def leased(outside: Path, inbox: Path, name: str, data: bytes) -> int:
    """Put ``name`` into the inbox under a write lease held by this process: dropcut's
    non-blocking open gets EAGAIN (what Samba's oplocks do). Returns the holder fd."""
    src = outside / name
    src.write_bytes(data)
    holder = os.open(src, os.O_RDONLY)
    try:
        fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError as err:
        os.close(holder)
        pytest.skip(f"leases not available here: {err}")
    os.rename(src, inbox / name)
    return holder


@pytest.mark.usefixtures("sigio_ignored")
def test_a_leased_file_is_tried_again_at_the_next_rescan_not_in_a_loop(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    settings = folders.settings(
        api.url,
        watch_mode="poll",
        poll_interval_seconds=0.1,
        rescan_interval_seconds=0.6,
        debounce_seconds=0.05,
        log_level="debug",
    )
    with InProcessDaemon(settings) as run:
        holder = leased(tmp_path, folders.inbox, "leased.jpg", image_bytes(seed=50))
        try:
            (event,) = wait_for(lambda: run.logs.events("file_unreadable"))
            assert event["file"] == "leased.jpg" and event["errno"] in ("EAGAIN", "EWOULDBLOCK")
            wait_rescans(run, 1)  # just after a rescan: the next one is ~0.6 s away…
            wait_for(lambda: run.daemon.admission.pending == 0)  # …and its look at the file failed
            fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_UNLCK)  # no inotify event for this
            released = time.time()
            (admitted,) = wait_for(lambda: run.logs.events("file_admitted"), timeout=5)
        finally:
            os.close(holder)
        wait_for(lambda: (folders.archive / "leased.jpg").exists())
        rescans_between = [e for e in run.logs.events("rescan_done") if released < ts(e) <= ts(admitted)]
        assert rescans_between, "picked up again before the next rescan: a retry loop"
        assert not run.logs.events("file_quarantined")


@pytest.mark.usefixtures("sigio_ignored")
def test_a_file_that_stays_unreadable_is_reported_once(
    folders: Folders, api: FakeWithoutBG, tmp_path: Path
) -> None:
    settings = folders.settings(
        api.url,
        watch_mode="poll",
        poll_interval_seconds=0.1,
        rescan_interval_seconds=0.2,
        debounce_seconds=0.05,
        log_level="debug",
    )
    with InProcessDaemon(settings) as run:
        holder = leased(tmp_path, folders.inbox, "leased.jpg", image_bytes(seed=51))
        try:
            wait_for(lambda: run.logs.events("file_unreadable"))
            wait_rescans(run, 3)
            wait_for(lambda: run.daemon.admission.pending == 0)  # the last look is done
            assert len(run.logs.events("file_unreadable")) == 1
        finally:
            fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            os.close(holder)
    assert not folders.quarantine.exists() or not folders.files(folders.quarantine)
