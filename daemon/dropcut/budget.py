"""The spend guard: at most ``budget_per_day`` and ``budget_per_month`` requests.

Every request sent costs a credit, whatever its answer (the API's own accounting); an
answer from the result cache costs nothing and is not counted. The requests sent are in
the queue's request log (:meth:`dropcut.queue.JobQueue.record_request`); the dispatcher
asks :func:`verdict` before it starts a job, counting the requests on their way too, so
that the cap holds with several requests in flight.

Days and months are calendar days and months in ``budget_timezone`` (the machine's local
time zone unless set): the count starts again at local midnight, and on the first of the
month. ``dropcut budget raise N`` adds N requests to the caps of the current day and month
(stored per period: a raise ends with its period); ``dropcut resume`` lifts the caps until
the current periods end.

Everything here is a pure function of its arguments (no clock, no I/O).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Literal

Period = Literal["day", "month"]
PERIODS: tuple[Period, ...] = ("day", "month")


@dataclass(frozen=True)
class Caps:
    """Requests allowed per calendar day and month (None: no cap)."""

    per_day: int | None = None
    per_month: int | None = None

    def cap(self, period: Period) -> int | None:
        return self.per_day if period == "day" else self.per_month


@dataclass(frozen=True)
class Verdict:
    """Whether a request may be started. When ``reached``: which ``period``'s cap, the
    ``cap`` (raises included), the requests ``used`` in it, and ``resets_at`` (wall
    seconds, the start of the next period)."""

    reached: bool
    period: Period | None = None
    cap: int = 0
    used: int = 0
    resets_at: float | None = None


def period_bounds(now: float, tz: tzinfo, period: Period) -> tuple[float, float]:
    """``(start, end)`` in wall seconds of the calendar day or month around ``now`` in
    ``tz``. Midnight is found in local time, so a day is 23 or 25 hours across a daylight
    saving change."""
    local = datetime.fromtimestamp(now, tz)
    if period == "day":
        start = datetime(local.year, local.month, local.day, tzinfo=tz)
        tomorrow = local.date() + timedelta(days=1)
        nxt = datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=tz)
    else:
        start = datetime(local.year, local.month, 1, tzinfo=tz)
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        nxt = datetime(year, month, 1, tzinfo=tz)
    return start.timestamp(), nxt.timestamp()


def period_key(now: float, tz: tzinfo, period: Period) -> str:
    """``day:2026-11-30`` or ``month:2026-11``: the key a raise or a lift is stored under."""
    local = datetime.fromtimestamp(now, tz)
    return f"day:{local:%Y-%m-%d}" if period == "day" else f"month:{local:%Y-%m}"


def verdict(
    caps: Caps,
    used: Mapping[Period, int],
    *,
    now: float,
    tz: tzinfo,
    raised: Mapping[str, int] | None = None,
    lifted: frozenset[str] = frozenset(),
) -> Verdict:
    """May one more request start at ``now``? ``used``: requests counted in the current
    day and month (sent, plus those on their way); ``raised``: extra requests per
    :func:`period_key`; ``lifted``: period keys whose cap is off (``dropcut resume``).
    When both caps are reached, the verdict names the one that resets last (the month):
    the queue waits for it."""
    found: list[Verdict] = []
    for period in PERIODS:
        cap = caps.cap(period)
        if cap is None:
            continue
        key = period_key(now, tz, period)
        if key in lifted:
            continue
        total = cap + max(0, (raised or {}).get(key, 0))
        count = used.get(period, 0)
        if count >= total:
            found.append(Verdict(True, period, total, count, period_bounds(now, tz, period)[1]))
    # (on the last day of a month both reset at once: the month is named, it is the cause)
    return max(found, key=lambda v: (v.resets_at or 0.0, v.period == "month")) if found else Verdict(False)
