"""Process hardening: a dropcut process leaves no core dump (one would hold the API key).

Called by ``dropcut run`` before the configuration is read, and by every inspection worker
process at its start (an exec resets the dumpable flag).
"""

from __future__ import annotations

import os
import sys

PR_SET_DUMPABLE = 4


def disable_core_dumps() -> list[str]:
    """Make this process unable to leave a core dump (which would hold the API key, and
    whose ``/proc/<pid>/environ``, ``mem``… could be read by its user): RLIMIT_CORE 0
    (soft and hard, inherited by every child, exec or not) and ``prctl(PR_SET_DUMPABLE,
    0)`` (prctl(2): no core dump, and ``/proc/<pid>`` files owned by root; reset by an
    exec, hence the rlimit for the inspection workers). Linux only; elsewhere only the
    rlimit is set. The unit sets ``LimitCORE=0`` as well.

    Never raises: returns what could not be done, one line each (the unit's
    ``SystemCallFilter=`` may refuse ``setrlimit``; ``LimitCORE=0`` then covers it).
    """
    problems: list[str] = []
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, OSError, ValueError) as exc:
        problems.append(f"RLIMIT_CORE: {exc}")
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
                problems.append(f"PR_SET_DUMPABLE: {os.strerror(ctypes.get_errno())}")
        except (OSError, AttributeError) as exc:
            problems.append(f"PR_SET_DUMPABLE: {exc}")
    return problems
