"""SIGTERM ends ``dropcut run`` (exit 0, within 10 s) even while a call on the inbox hangs.

On a hard-mounted NFS share whose server is gone, stat() and scandir() of the inbox never
return. The daemon runs them in worker threads so that its event loop goes on; these tests
check that such a thread, blocked for good, does not keep the process from exiting either
(asyncio's default executor would: ``asyncio.run`` and the interpreter's exit both wait for
its threads).

The hang is simulated below the daemon: ``python -c HUNG_MOUNT`` replaces ``os.stat``,
``os.lstat`` and ``os.scandir`` in the daemon's process (the file system, not dropcut's
code) so that, once the test writes the kinds of call to hang into a trigger file, those
calls on the inbox block forever -- as on the real mount, nothing ever wakes them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fake_api import FakeWithoutBG
from tests.support import DaemonProcess, Folders, drop, image_bytes, wait_for

# ``python -c HUNG_MOUNT <trigger> run``: the daemon, on an inbox that hangs on demand. The
# trigger file names the calls that hang from then on: ``inbox-stat`` (stat/lstat of the
# inbox itself), ``entry-stat`` (of anything below it, or relative to a folder fd), and
# ``scandir`` (of the inbox or a folder below it). Each blocked call appends
# "<kind> <thread name>" to ``<trigger>.blocked`` and then waits forever.
HUNG_MOUNT = r"""
import os, sys, threading
inbox = os.path.abspath(os.environ["DROPCUT_INBOX"])
trigger = sys.argv[1]
real_stat, real_lstat, real_scandir = os.stat, os.lstat, os.scandir

def where(path, dir_fd=None):
    if dir_fd is not None:
        return "entry"
    if isinstance(path, int):
        return None
    text = os.fsdecode(os.fspath(path))
    if text == inbox:
        return "inbox"
    return "entry" if text.startswith(inbox + "/") else None

def hang_if(kind):
    try:
        with open(trigger, encoding="utf-8") as fh:
            kinds = fh.read().split()
    except FileNotFoundError:
        return
    if kind in kinds:
        with open(trigger + ".blocked", "a", encoding="utf-8") as fh:
            fh.write(kind + " " + threading.current_thread().name + "\n")
        threading.Event().wait()

def stat(path, *args, dir_fd=None, **kwargs):
    place = where(path, dir_fd)
    if place is not None:
        hang_if(place + "-stat")
    return real_stat(path, *args, dir_fd=dir_fd, **kwargs)

def lstat(path, *args, dir_fd=None, **kwargs):
    place = where(path, dir_fd)
    if place is not None:
        hang_if(place + "-stat")
    return real_lstat(path, *args, dir_fd=dir_fd, **kwargs)

def scandir(path="."):
    # (a folder is listed by path, or by a descriptor opened without following links)
    if isinstance(path, int) or where(path) is not None:
        hang_if("scandir")
    return real_scandir(path)

os.stat, os.lstat, os.scandir = stat, lstat, scandir
from dropcut.cli import main
sys.exit(main(sys.argv[2:]))
"""


@dataclass
class HungMountDaemon(DaemonProcess):
    trigger: Path | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-c", HUNG_MOUNT, str(self.trigger)]

    def blocked(self) -> list[tuple[str, str]]:
        """(kind, thread name) of every call blocked so far."""
        assert self.trigger is not None
        try:
            text = self.trigger.with_name(self.trigger.name + ".blocked").read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [(kind, name) for kind, _, name in (line.partition(" ") for line in text.splitlines())]


CASES = {
    # the health check's stat() of the inbox (every HEALTH_SECONDS) hangs
    "health-probe": ("native", ["inbox-stat"], {}, "inbox-stat", 1),
    # the same in poll mode: the poll thread hangs too, and stopping the watch joins it
    "poll-watch": ("poll", ["inbox-stat", "scandir"], {"poll_interval_seconds": 0.2}, "inbox-stat", 2),
    # the periodic rescan's scandir() of the inbox hangs
    "rescan": ("native", ["scandir"], {"rescan_interval_seconds": 0.5}, "scandir", 1),
    # settling a new file: its stat() hangs (admission's asyncio.to_thread)
    "settle": ("native", ["entry-stat"], {}, "entry-stat", 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_exits_0_while_a_call_on_the_inbox_hangs(
    tmp_path: Path, api: FakeWithoutBG, spawn: Any, case: str
) -> None:
    mode, kinds, overrides, stuck_kind, stuck_count = CASES[case]
    folders = Folders.make(tmp_path / "srv")
    env = folders.env(api.url, watch_mode=mode, **overrides)
    env.pop("NOTIFY_SOCKET", None)
    trigger = tmp_path / "hang"
    proc = spawn(env, lambda e: HungMountDaemon(e, trigger=trigger))

    trigger.write_text(" ".join(kinds), encoding="utf-8")  # the mount hangs from now on
    if case == "settle":
        drop(folders.inbox, "a.jpg", image_bytes(seed=1))
    stuck = wait_for(lambda: [t for k, t in proc.blocked() if k == stuck_kind][stuck_count - 1 :], timeout=15)
    assert "MainThread" not in {t for _, t in proc.blocked()}, "the event loop itself hangs"

    asked = time.monotonic()
    proc.signal(signal.SIGTERM)
    try:
        code = proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit within 10 s of SIGTERM; blocked: {proc.blocked()}\n" + "\n".join(proc.lines))
    took = time.monotonic() - asked
    assert code == 0, "\n".join(proc.lines)
    assert took < 10
    wait_for(lambda: proc.events("daemon_stopped"), timeout=5)
    # The blocked calls never returned (they cannot): they were still blocked at the exit.
    assert stuck and all(k in kinds for k, _ in proc.blocked())
    assert not proc.events("stage_crashed") and not proc.events("daemon_crashed")
