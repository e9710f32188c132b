"""Time within a run: wall-clock seconds that never step.

Due times, rate-limit slots and holds are stored as wall-clock seconds, so that they mean
something after a restart. Read from ``time.time()`` directly, a clock stepped back by an
hour (NTP, an admin, a VM resumed) would stall every wait for an hour. :class:`RunClock`
reads the wall clock once, when the run starts, and advances it with the monotonic clock
from then on: within a run it never steps back; across runs it starts from the wall clock again,
and what was persisted in the future is clamped where it is loaded
(:meth:`dropcut.queue.JobQueue.recover`, :func:`dropcut.pace._restore`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RunClock"]


FORWARD_STEP_SECONDS = 1.0  # the wall clock ahead of this clock by more: it was set forward


class RunClock:
    """Seconds since the epoch as the wall clock said when this clock was made, advanced
    by ``monotonic`` since: it never goes back. A wall clock set *forward* (NTP's first sync
    after a boot with a slow RTC) is followed, so stored times are right for the rest of
    the run; that only makes waits end sooner. Call it like ``time.time``."""

    __slots__ = ("_monotonic", "_origin", "_wall")

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._origin = wall() - monotonic()

    def __call__(self) -> float:
        now = self._origin + self._monotonic()
        wall = self._wall()
        if wall > now + FORWARD_STEP_SECONDS:
            self._origin += wall - now
            return wall
        return now
