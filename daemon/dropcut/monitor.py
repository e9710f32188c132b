"""The daemon's look at itself, once a second: which conditions hold (logged when they
start, every ``condition_report_seconds`` while they last, and when they end; stored for
``dropcut status`` and the status page), and the one-line summary the console's status
line and systemd's ``STATUS=`` show.

The decisions are :class:`dropcut.conditions.ConditionBoard`'s and the words
:mod:`dropcut.overview`'s; this module only runs them on the daemon's queue.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import structlog

from dropcut import notify
from dropcut.conditions import Condition, ConditionBoard, Observed, Report
from dropcut.observe import Alerts, NoAlerts
from dropcut.overview import (
    Overview,
    RateUse,
    human_duration,
    iso,
    read_overview,
    sentence,
    summary_line,
)
from dropcut.pgqueue import DB_ERRORS, UNAVAILABLE, Queue
from dropcut.queue import STATES
from dropcut.settings import Settings

TICK_SECONDS = 1.0


class Monitor:
    """Runs on the event loop (it uses the daemon's queue connection).

    ``observe``: the conditions that hold now, from the stages; ``in_flight``: the
    dispatcher's count of requests on their way; ``clock``: wall seconds."""

    def __init__(
        self,
        settings: Settings,
        *,
        queue: Queue,
        observe: Callable[[], list[Observed]],
        in_flight: Callable[[], int],
        clock: Callable[[], float],
        more_work: Callable[[], None] = lambda: None,
        alerts: Alerts | None = None,
    ) -> None:
        self.settings = settings
        self._alerts: Alerts = alerts or NoAlerts()
        self._more_work = more_work
        self._queued = 0
        self._queue = queue
        self._observe = observe
        self._in_flight = in_flight
        self._clock = clock
        self._board = ConditionBoard(settings.condition_report_seconds)
        self._stored: list[Condition] | None = None
        self._rate_stored: dict[str, float] | None = None
        self._log = structlog.get_logger()
        self.overview: Overview | None = None
        self.summary = ""

    @property
    def report_every(self) -> float:
        """Seconds between two reports of a lasting condition (in force)."""
        return self._board.report_every

    def apply(self, settings: Settings) -> None:
        self.settings = settings
        self._board.report_every = settings.condition_report_seconds

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except DB_ERRORS as exc:  # one bad tick must not end the monitoring
                self._log.warning("monitor_failed", detail=str(exc))
            await asyncio.sleep(TICK_SECONDS)

    def tick(self) -> list[Report]:
        """Look once: update the board, log its reports, store the conditions when they
        changed, and make the summary. Returns the reports. Raises ``sqlite3.Error``.

        The shared queue's database away: the last figures are shown, and the conditions
        (``queue_unavailable`` among them) still reported; they are stored once it is
        back."""
        now = self._clock()
        s = self.settings
        try:
            rate = {"limit": s.rate_limit_requests, "period": s.rate_limit_period_seconds}
            if rate != self._rate_stored:  # what status readers show the use against
                self._queue.set_meta("rate", rate)
                self._rate_stored = rate
            overview = read_overview(
                self._queue, limit=s.rate_limit_requests, period=s.rate_limit_period_seconds, now=now
            )
        except UNAVAILABLE:  # (only the shared queue raises these)
            overview = self._last_known(now)
        else:
            if overview.jobs.get("queued", 0) > self._queued:  # e.g. `dropcut approve` / `retry`
                self._more_work()
            self._queued = overview.jobs.get("queued", 0)
        observed = self._observe()
        facts = {o.code: o.facts for o in observed if o.facts}
        reports = self._board.update(observed, now=now, waiting=overview.backlog)
        for report in reports:
            self._report(report, now)
            self._alert(report, facts.get(report.condition.code), now)
        current = self._board.current
        if reports or _codes(current) != _codes(self._stored):
            try:
                self._queue.set_meta("conditions", [c.to_json() for c in current] or None)
            except UNAVAILABLE:
                pass  # (the shared queue's database away) stored at a later tick
            else:
                self._stored = current
        self.overview = replace(overview, conditions=current)
        self.summary = summary_line(self.overview, in_flight=self._in_flight())
        return reports

    def _last_known(self, now: float) -> Overview:
        """The last overview read (its figures as they were), or an empty one."""
        if self.overview is not None:
            return replace(self.overview, at=now)
        s = self.settings
        return Overview(
            at=now,
            jobs=dict.fromkeys(STATES, 0),
            rate=RateUse(s.rate_limit_requests, s.rate_limit_period_seconds, 0, 0, 0, 0),
            eta_seconds=None,
            credit=None,
            last_success=None,
            frames_skipped=0,
        )

    def clear(self) -> None:
        """At a clean stop: nothing holds while nobody looks (a pause is stored apart)."""
        if self._stored:
            self._queue.set_meta("conditions", None)
            self._stored = []

    def _alert(self, report: Report, facts: Mapping[str, Any] | None, now: float) -> None:
        """The message for people: a batch held has its own, with its figures (a spent
        budget too, sent by the dispatcher); every other condition its start and end (not
        its repeats)."""
        c = report.condition
        if report.kind == "started" and c.code == "budget_reached":
            return  # the dispatcher tells each time the queue stops on a budget (a raise too)
        if report.kind == "started" and facts and c.code == "batch_held":
            event = notify.batch_held(
                str(facts["folder"]),
                int(facts["held"]),
                int(facts["held"]),
                float(facts["seconds"]),
                now=now,
            )
        else:
            message = notify.condition_message(report, now=now)
            if message is None:
                return
            event = message
        self._alerts.emit(event)

    def _report(self, report: Report, now: float) -> None:
        c = report.condition
        fields = {
            "code": c.code,
            "detail": c.detail,
            "since": iso(c.since),
            "lasted_s": round(report.lasted),
            "waiting": c.waiting,
            "message": sentence(c, now) if report.kind != "ended" else None,
        }
        if report.kind == "ended":
            self._log.info(report.event, **{k: v for k, v in fields.items() if k != "message"})
        else:
            self._log.warning(report.event, **fields)


def held_detail(held: list[tuple[str, int]], settings: Settings) -> str:
    """The ``batch_held`` condition's detail: how many files, in which folders, what they
    would cost in credits and in time at the allowance, and the commands that decide,
    e.g. ``50 files in shoot/ (50 credits, about 7 min 08 s at the allowance): dropcut
    approve shoot, or dropcut discard shoot``."""
    total = sum(n for _, n in held)
    where = ", ".join(
        f"{n} in {folder}/" if folder else f"{n} at the top of the inbox" for folder, n in held[:3]
    )
    if len(held) > 3:
        where += f" and {len(held) - 3} more folders"
    minutes = human_duration(held_seconds(total, settings))
    if len(held) == 1 and held[0][0]:
        folder = shlex.quote(held[0][0])
        commands = f"dropcut approve {folder}, or dropcut discard {folder}"
    else:
        commands = "dropcut approve (all of them) or dropcut approve FOLDER; dropcut discard likewise"
    credits = f"{total} credit{'s' if total != 1 else ''}"
    return (
        f"{total} file{'s' if total != 1 else ''} ({where}; {credits}, about {minutes} at the "
        f"allowance): {commands}"
    )


def held_seconds(files: int, settings: Settings) -> float:
    """Seconds ``files`` requests take at the allowance."""
    return files * settings.rate_limit_period_seconds / settings.rate_limit_requests


def _codes(conditions: list[Condition] | None) -> list[tuple[str, str]]:
    return [(c.code, c.detail) for c in conditions or []]
