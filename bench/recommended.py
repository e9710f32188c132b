"""``dropcut run`` with proposed changes applied as monkeypatches, to measure a change to
files outside ``bench/`` before it is made (``--recommended`` on a benchmark).

The three changes measured this way so far — a short inotify move-pairing delay, an
inotify event filter, and a lean polling emitter — are now part of ``dropcut.watch``, so
:func:`apply` currently patches nothing. Add the next proposal here.
"""

from __future__ import annotations

import sys


def apply() -> list[str]:
    """Apply the proposed patches; returns what was applied."""
    return []


def main() -> int:
    apply()
    from dropcut.cli import main as cli_main

    return cli_main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
