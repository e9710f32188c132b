"""Put a quarantined file back in the inbox: what ``dropcut retry`` and the status page's
Retry button do.

The job is forgotten first (a running daemon that sees the file come back must not take it
for the quarantined job it was), then the file is moved from the quarantine back into the
inbox under its own name (or a numbered one, if that name is taken meanwhile), and its
``.error.json`` record is removed. A move that fails puts the job back, still quarantined,
so that a later retry finds it.

Works on a writable :class:`~dropcut.queue.JobQueue` of its own (another process, or the
status page's thread, next to the running daemon: SQLite's WAL lets them share it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dropcut.paths import error_json_rel, numbered_candidates
from dropcut.publish import move_in
from dropcut.queue import Job, JobQueue
from dropcut.settings import Settings


@dataclass(frozen=True)
class Retried:
    """What became of one quarantined file: ``quarantined_as`` its name below the
    quarantine folder; ``back_as`` its name below the inbox, or None when it could not be
    put back, and then ``problem`` says why (``cannot move back: …``, ``no longer in the
    quarantine folder``)."""

    job_id: int
    quarantined_as: str
    back_as: str | None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.back_as is not None


def quarantined_as(queue: JobQueue, job_id: int) -> str | None:
    """The name below the quarantine folder that a job's file was given (it may differ
    from its inbox name when that was taken), or None if the job's record has none."""
    error = queue.job_error(job_id)
    value = error.get("quarantined_as") if error else None
    return str(value) if value else None


def relative(settings: Settings, path: Path, other: Path | None = None) -> str:
    """``path`` relative to the quarantine (or ``other``) or the inbox, as the queue names
    it; a path below neither is taken as relative already."""
    full = Path(os.path.abspath(path))
    for root in (other or settings.quarantine, settings.inbox):
        if full.is_relative_to(root):
            return str(PurePosixPath(*full.relative_to(root).parts))
    return str(PurePosixPath(*path.parts))


def select(queue: JobQueue, wanted: Iterable[str] | None) -> tuple[list[Job], list[str]]:
    """The quarantined jobs named by ``wanted`` (inbox or quarantine names; None: all),
    and the names in ``wanted`` that no quarantined job has (sorted)."""
    jobs = queue.quarantined_jobs()
    if wanted is None:
        return jobs, []
    names = set(wanted)
    named = {job.id: quarantined_as(queue, job.id) for job in jobs}
    jobs = [j for j in jobs if j.rel_path in names or named[j.id] in names]
    found = {j.rel_path for j in jobs} | {named[j.id] for j in jobs}
    return jobs, sorted(names - found)


def retry_job(settings: Settings, queue: JobQueue, job: Job) -> Retried:
    """Put ``job``'s quarantined file back into the inbox (see the module's text)."""
    q_rel = quarantined_as(queue, job.id) or job.rel_path
    row = queue.forget(job.id)
    try:
        back = move_in(settings.quarantine, q_rel, settings.inbox, numbered_candidates(job.rel_path))
    except OSError as exc:
        if row is not None:
            queue.restore(row)  # still quarantined: a later retry can find it
        return Retried(job.id, q_rel, None, f"cannot move back: {exc.strerror}")
    if back is None:
        return Retried(job.id, q_rel, None, "no longer in the quarantine folder")
    (settings.quarantine / error_json_rel(q_rel)).unlink(missing_ok=True)
    return Retried(job.id, q_rel, back)


def retry_jobs(settings: Settings, queue: JobQueue, jobs: Iterable[Job]) -> list[Retried]:
    """:func:`retry_job` for each of ``jobs``, in order."""
    return [retry_job(settings, queue, job) for job in jobs]
