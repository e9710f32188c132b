"""Conditions: states that last (the API unreachable, the account paused, the disk full,
the inbox gone), as opposed to events, which happen once.

The daemon looks at its stages once a second and hands :meth:`ConditionBoard.update` the
conditions that hold now. The board decides, with no I/O, what to report: a condition is
reported once when it starts (``condition_started``), again every ``report_every`` seconds
while it lasts (``condition_continues``: how long so far, how many files wait on it), and
once when it ends (``condition_ended``: how long it lasted). The daemon logs the reports and
stores :attr:`ConditionBoard.current` in the queue's ``meta`` table, where ``dropcut
status``, the status page and the metrics read it.

Codes (:data:`CODES`) and what sets them:

* ``api_unreachable`` — requests fail service-wide (no connection, time-outs, 5xx, 429):
  the dispatcher's outage hold;
* ``account_paused`` — the API refused the account (401/402/403, a redirect): the queue is
  paused until the cause is fixed (see ``dropcut status``);
* ``disk_full`` — the state or outbox file system is short of space;
* ``outbox_unwritable`` — the outbox (or its staging folder) refuses writes;
* ``watch_degraded`` — the inbox is gone, not responding (an unmounted or hung share) or
  its watch died: new files are not seen until it is back;
* ``budget_reached`` — ``budget_per_day`` or ``budget_per_month`` is spent: the queue waits
  for the next day or month (or ``dropcut budget raise N`` / ``dropcut resume``);
* ``batch_held`` — more than ``hold_batches_over`` files came within
  ``batch_window_seconds``: the newcomers wait for ``dropcut approve`` or ``dropcut discard``;
* ``queue_unavailable`` — the shared queue's PostgreSQL database (``queue_url``) cannot be
  reached: nothing is claimed or admitted until it is back (no file is lost or refused for it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

CODES = (
    "api_unreachable",
    "account_paused",
    "disk_full",
    "outbox_unwritable",
    "watch_degraded",
    "budget_reached",
    "batch_held",
    "queue_unavailable",
)
DEFAULT_REPORT_SECONDS = 300.0


@dataclass(frozen=True)
class Observed:
    """A condition that holds now: its ``code`` (one of :data:`CODES`), a ``detail`` in
    words, and when it began (wall seconds) if the stage that found it knows (a pause
    stored across a restart does); otherwise the board's first sight of it."""

    code: str
    detail: str
    since: float | None = None
    facts: Mapping[str, Any] | None = field(default=None, compare=False)  # for the notifications


@dataclass(frozen=True)
class Condition:
    """A condition on the board: ``since`` (wall seconds), ``waiting`` files (queued or
    in flight) when it was last looked at."""

    code: str
    detail: str
    since: float
    waiting: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "detail": self.detail, "since": self.since, "waiting": self.waiting}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Condition:
        """Raises ``KeyError``, ``TypeError`` or ``ValueError`` for a malformed record."""
        return cls(
            code=str(data["code"]),
            detail=str(data.get("detail") or ""),
            since=float(data["since"]),
            waiting=int(data.get("waiting") or 0),
        )


@dataclass(frozen=True)
class Report:
    """What to log: ``kind`` ``started`` | ``continues`` | ``ended``, the condition, and
    ``lasted`` seconds since it began (at ``ended``: its whole length)."""

    kind: Literal["started", "continues", "ended"]
    condition: Condition
    lasted: float

    @property
    def event(self) -> str:
        return f"condition_{self.kind}"


class ConditionBoard:
    """The conditions that hold, and when each was last reported.

    ``report_every``: seconds between two ``continues`` reports of one condition (> 0).
    Raises ``ValueError`` for a value ≤ 0.
    """

    def __init__(
        self, report_every: float = DEFAULT_REPORT_SECONDS, current: Iterable[Condition] = ()
    ) -> None:
        self._current: dict[str, Condition] = {}
        self._reported: dict[str, float] = {}
        self.report_every = report_every
        for condition in current:  # conditions stored by an earlier run: not reported again
            self._current[condition.code] = condition
            self._reported[condition.code] = condition.since

    @property
    def report_every(self) -> float:
        return self._report_every

    @report_every.setter
    def report_every(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"report_every {seconds}: expected > 0 seconds")
        self._report_every = float(seconds)

    @property
    def current(self) -> list[Condition]:
        """The conditions that hold, oldest first."""
        return sorted(self._current.values(), key=lambda c: (c.since, c.code))

    def update(self, observed: Iterable[Observed], *, now: float, waiting: int) -> list[Report]:
        """Take the conditions that hold ``now`` (wall seconds) with ``waiting`` files
        queued or in flight; return the reports due, in a stable order (ended first).

        A condition seen again keeps its start (an earlier ``since`` given by its stage
        wins) and takes the new detail; one not seen any more has ended."""
        seen = {o.code: o for o in observed}
        reports: list[Report] = []
        for code in sorted(set(self._current) - set(seen)):
            gone = replace(self._current.pop(code), waiting=waiting)
            self._reported.pop(code, None)
            reports.append(Report("ended", gone, max(0.0, now - gone.since)))
        for code in sorted(seen):
            o = seen[code]
            old = self._current.get(code)
            if old is None:
                since = min(now, o.since) if o.since is not None else now
                new = Condition(code, o.detail, since, waiting)
                self._current[code] = new
                self._reported[code] = now
                reports.append(Report("started", new, max(0.0, now - since)))
                continue
            since = min(old.since, o.since) if o.since is not None else old.since
            new = Condition(code, o.detail, since, waiting)
            self._current[code] = new
            if now - self._reported[code] >= self._report_every:
                self._reported[code] = now
                reports.append(Report("continues", new, max(0.0, now - since)))
        return reports
