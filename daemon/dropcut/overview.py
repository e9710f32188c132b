"""What the service is doing, at a glance: one snapshot read from the queue database.

``dropcut status`` (another process), the status line of the console, the status page and
the Prometheus metrics all show the same :class:`Overview`, read by :func:`read_overview`
from the queue (job counts, the request log, the pause, the credit, the conditions the
daemon stored). The words are made here too (:func:`sentence`, :func:`summary_line`,
:func:`human_duration`), as pure functions, so every view says the same thing the same way.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from dropcut.conditions import Condition

if TYPE_CHECKING:
    from dropcut.pgqueue import Queue

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
BACKLOG_STATES = ("queued", "inflight")
# Conditions under which nothing is sent: no estimate can be made while they hold.
STOPPING = (
    "api_unreachable",
    "account_paused",
    "disk_full",
    "outbox_unwritable",
    "budget_reached",
    "queue_unavailable",
)


@dataclass(frozen=True)
class RateUse:
    """Requests started in the sliding window (the last ``period`` seconds) and in the last
    minute / hour / day, and the allowance of each span (``limit`` per ``period`` seconds,
    scaled: the most the API allows in that span)."""

    limit: int
    period: float
    window: int
    minute: int
    hour: int
    day: int

    def allowance(self, span: float) -> int:
        """Requests the API allows in ``span`` seconds (whole windows and a part)."""
        return math.floor(self.limit * span / self.period + 1e-9)

    def to_json(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "period_seconds": self.period,
            "window": self.window,
            "used": {"minute": self.minute, "hour": self.hour, "day": self.day},
            "allowance": {
                "minute": self.allowance(MINUTE),
                "hour": self.allowance(HOUR),
                "day": self.allowance(DAY),
            },
        }


@dataclass(frozen=True)
class Overview:
    """One snapshot. ``jobs``: count per state (every state of :data:`dropcut.queue.STATES`);
    ``backlog``: files still to be sent (queued + in flight); ``eta_seconds``: when the
    backlog is done at the allowance (None: nothing to do, or paused); ``credit``: the last
    credit check (``credit``, ``expiration_date``, ``checked_at``) or None;
    ``last_success``: wall seconds of the last output published; ``conditions``: what holds
    now, oldest first; ``paused``: the stored pause record or None; ``at``: when it was
    read."""

    at: float
    jobs: dict[str, int]
    rate: RateUse
    eta_seconds: float | None
    credit: dict[str, Any] | None
    last_success: float | None
    frames_skipped: int
    conditions: list[Condition] = field(default_factory=list)
    paused: dict[str, Any] | None = None

    @property
    def backlog(self) -> int:
        return sum(self.jobs.get(s, 0) for s in BACKLOG_STATES)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form (schema in the README, "dropcut status --json")."""
        return {
            "at": iso(self.at),
            "jobs": dict(self.jobs),
            "backlog": self.backlog,
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds),
            "rate": self.rate.to_json(),
            "credit": _credit_json(self.credit),
            "last_success": iso(self.last_success),
            "frames_skipped": self.frames_skipped,
            "conditions": [
                {**c.to_json(), "since": iso(c.since), "sentence": sentence(c, self.at)}
                for c in self.conditions
            ],
            "paused": self.paused,
        }


def eta_seconds(backlog: int, *, limit: int, period: float, paused: bool = False) -> float | None:
    """Seconds until ``backlog`` files are sent at the allowance of ``limit`` requests per
    ``period`` seconds, in whole windows: the last window's files go at its start, so 7
    files at 7 per 60 s take 0 s more than the window they start in, 8 take 60 s.

    None when there is nothing to do, or while ``paused`` (no estimate can be made).
    Raises ``ValueError`` for ``limit`` < 1 or ``period`` ≤ 0."""
    if limit < 1 or not period > 0:
        raise ValueError(f"limit {limit} per {period} s: expected >= 1 per > 0 s")
    if backlog <= 0 or paused:
        return None
    return (math.ceil(backlog / limit) - 1) * period


def human_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``, ``3 d 4 h``: at most two units."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def iso(ts: float | None) -> str | None:
    """Wall seconds as local ISO 8601 with its UTC offset (None stays None)."""
    return None if ts is None else datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def clock_time(ts: float, now: float) -> str:
    """``14:03`` today, ``28 Nov 14:03`` another day (local time)."""
    t, n = datetime.fromtimestamp(ts).astimezone(), datetime.fromtimestamp(now).astimezone()
    return t.strftime("%H:%M") if t.date() == n.date() else t.strftime("%d %b %H:%M")


_SENTENCES = {
    "api_unreachable": "cannot reach the API",
    "account_paused": "the API refused the account; the queue is paused",
    "disk_full": "the disk is full; the queue is paused",
    "outbox_unwritable": "the outbox cannot be written; the queue is paused",
    "watch_degraded": "the inbox is not watched; new files are not seen",
    "budget_reached": "the request budget is spent; the queue waits",
    "batch_held": "a large batch is held",
    "queue_unavailable": "the shared queue's database cannot be reached; nothing is claimed",
}


def sentence(condition: Condition, now: float) -> str:
    """The condition in one sentence: what, since when and for how long, why, and how many
    files wait, e.g. ``cannot reach the API since 14:03 (12 min 30 s): connect_error —
    connection refused; 40 files wait``."""
    what = _SENTENCES.get(condition.code, condition.code.replace("_", " "))
    text = f"{what} since {clock_time(condition.since, now)} ({human_duration(now - condition.since)})"
    if condition.detail:
        text += f": {condition.detail}"
    if condition.waiting and condition.code != "batch_held":  # (its detail counts the held)
        text += f"; {condition.waiting} file{'s' if condition.waiting != 1 else ''} wait"
    return text


PAUSE_HINTS = {
    "invalid_api_key": "check the API key (DROPCUT_API_KEY, api_key_file or the credential "
    "dropcut-api-key), then reload (systemctl reload dropcut, or SIGHUP) or restart",
    "insufficient_credit": "top up the account: the queue goes on by itself once a credit "
    "check sees credit",
    "credits_expired": "renew the credits: the queue goes on by itself once a credit check "
    "sees valid credit",
    "endpoint_not_found": "check api_url, then reload or restart",
    "endpoint_redirected": "check api_url (the API answered with a redirect), then reload or restart",
    "disk_full": "free space in state_dir and the outbox: the queue goes on by itself",
    "outbox_unwritable": "make the outbox writable again: the queue goes on by itself",
}


def pause_hint(code: str | None) -> str | None:
    """What the admin can do about a pause with this code, or None."""
    return PAUSE_HINTS.get(code or "")


def summary_line(overview: Overview, *, in_flight: int | None = None) -> str:
    """The console's status line: ``queued 12 · in flight 1 · done 340 · quarantined 2 ·
    rate 5/7 per 60 s · ETA 1 min 43 s`` (and the conditions' codes when any hold).
    ``in_flight``: the daemon's own count, when it knows it better than the database."""
    jobs = overview.jobs
    flying = jobs.get("inflight", 0) if in_flight is None else in_flight
    parts = [
        f"queued {jobs.get('queued', 0)}",
        f"in flight {flying}",
        f"done {jobs.get('done', 0) + jobs.get('published', 0)}",
        f"quarantined {jobs.get('quarantined', 0)}",
    ]
    parts.append(f"rate {overview.rate.window}/{overview.rate.limit} per {overview.rate.period:g} s")
    if overview.eta_seconds is not None:  # (0: all of it goes in the current window)
        eta = overview.eta_seconds or overview.rate.period
        parts.append(f"ETA {'< ' if not overview.eta_seconds else ''}{human_duration(eta)}")
    elif overview.backlog and overview.conditions:
        parts.append("ETA unknown")
    if overview.conditions:
        parts.append("⚠ " + ", ".join(c.code for c in overview.conditions))
    return " · ".join(parts)


def read_overview(queue: Queue, *, limit: int, period: float, now: float) -> Overview:
    """Read the snapshot from ``queue`` at ``now`` (wall seconds), for the allowance the
    daemon stored (``meta`` ``rate``: what it paces by), else ``limit`` requests per
    ``period`` seconds. Raises ``sqlite3.Error`` when the database cannot be read; a record
    it cannot parse (written by another version) reads as absent."""
    stored = _dict_or_none(queue.get_meta("rate"))
    if stored is not None:
        try:
            limit, period = max(1, int(stored["limit"])), float(stored["period"])
        except (KeyError, TypeError, ValueError):
            pass
        period = period if period > 0 else MINUTE
    jobs = queue.counts()
    paused = _dict_or_none(queue.get_meta("paused"))
    credit = _dict_or_none(queue.get_meta("credit"))
    last = queue.get_meta("last_success")
    conditions = parse_conditions(queue.get_meta("conditions"))
    try:
        used = [queue.requests_since(now - span) for span in (period, MINUTE, HOUR, DAY)]
        frames_skipped = queue.frames_skipped()
    except sqlite3.OperationalError:  # a database the daemon has not migrated yet
        used, frames_skipped = [0, 0, 0, 0], 0
    rate = RateUse(limit=limit, period=period, window=used[0], minute=used[1], hour=used[2], day=used[3])
    backlog = sum(jobs.get(s, 0) for s in BACKLOG_STATES)
    return Overview(
        at=now,
        jobs=jobs,
        rate=rate,
        eta_seconds=eta_seconds(
            backlog,
            limit=limit,
            period=period,
            paused=paused is not None or any(c.code in STOPPING for c in conditions),
        ),
        credit=credit,
        last_success=float(last) if isinstance(last, int | float) else None,
        frames_skipped=frames_skipped,
        conditions=conditions,
        paused=paused,
    )


def parse_conditions(stored: Any) -> list[Condition]:
    """The conditions stored in ``meta`` (a list of :meth:`Condition.to_json` records),
    skipping malformed ones."""
    out: list[Condition] = []
    for item in stored if isinstance(stored, list) else []:
        if isinstance(item, Mapping):
            try:
                out.append(Condition.from_json(item))
            except (KeyError, TypeError, ValueError):
                continue
    return out


def _credit_json(credit: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stored credit record with ``checked_at`` as ISO 8601, as every time shown."""
    if credit is None:
        return None
    checked = credit.get("checked_at")
    return {**credit, "checked_at": iso(float(checked)) if isinstance(checked, int | float) else None}


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None
