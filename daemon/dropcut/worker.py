"""Worker processes: the pools that inspect a backlog (:mod:`dropcut.admit`) and make
proxies and renders (:mod:`dropcut.produce`), and the set-up of each worker. Kept apart
and small: a worker imports this module and the stage it runs (:mod:`dropcut.inspect`,
:mod:`dropcut.decode`, :mod:`dropcut.render`), nothing of the daemon itself.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from dropcut.harden import disable_core_dumps


def pool(workers: int, *, nice: int = 0) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes that end with this (the daemon's) process, at
    ``nice`` (added to the daemon's niceness: background work such as renders yields the
    CPU to the event loop and to the proxies that the next requests wait for).

    forkserver: the workers are not forks of this threaded process (watchdog, asyncio) and
    inherit none of its file descriptors (the state lock)."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=start,
        initargs=(os.getpid(), nice),
    )


def start(daemon_pid: int, nice: int = 0) -> None:
    """In an inspection worker process: end when the daemon ends, even a SIGKILLed one
    (outside systemd nothing else would: the forkserver, the workers and the resource
    tracker hold each other's pipes open); and leave Ctrl-C to the daemon, which stops the
    pool itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        try:
            os.nice(nice)
        except OSError:  # a sandbox that refuses setpriority: same work, normal priority
            pass
    disable_core_dumps()  # (an exec made this process dumpable again)
    threading.Thread(target=_exit_with, args=(daemon_pid,), name="dropcut-daemon-watch", daemon=True).start()


def _exit_with(pid: int) -> None:
    """Wait for process ``pid`` to end (a pidfd becomes readable; else poll), then exit."""
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # gone already, or no pidfd (Linux < 5.3)
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(1.0)
    else:
        select.select([fd], [], [])
    os._exit(0)
