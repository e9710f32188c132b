"""Set-up of an inspection worker process (the pool :mod:`dropcut.admit` starts for a
backlog). Kept apart and small: a worker imports this module and :mod:`dropcut.inspect`,
nothing of the daemon itself.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

from dropcut.harden import disable_core_dumps


def start(daemon_pid: int) -> None:
    """In an inspection worker process: end when the daemon ends, even a SIGKILLed one
    (outside systemd nothing else would: the forkserver, the workers and the resource
    tracker hold each other's pipes open); and leave Ctrl-C to the daemon, which stops the
    pool itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
