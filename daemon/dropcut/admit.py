"""Admission: from "this path may have changed" to a queued job or a quarantined file.

Holds the candidates (paths reported by the watcher or a rescan), looks at each when it
is due, admits it once :func:`dropcut.settle.verdict` says it is stable, has
:func:`dropcut.inspect.inspect_file` read, check and spool it in a worker thread, and
records the results in the queue in batches. Files refused here never reach the API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import heapq
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import structlog

from dropcut import inspect as insp
from dropcut import notify, worker
from dropcut.capture import Note
from dropcut.observe import Alerts, NoAlerts, NoRecorder, Recorder
from dropcut.paths import HELD_PREFIX, output_key
from dropcut.pgqueue import UNAVAILABLE, Queue
from dropcut.publish import Publisher
from dropcut.queue import HoldRule, NewJob, Signature
from dropcut.recipes import OutputSpec, folder_recipes, output_name_sets, recipe_for, recipe_json
from dropcut.settings import Settings
from dropcut.settle import (
    CorruptVerdict,
    FirstFailure,
    Seen,
    Verdict,
    corrupt_verdict,
    is_ignored,
    is_ignored_dir,
    next_check,
    observe,
    verdict,
)

TICK_SECONDS = 0.05
GRACE_CODES_STATUS = (415, 422)  # may be a file still being written: looked at again once
# not a file still being written: quarantined at once, not read twice
NO_GRACE_CODES = ("decode_too_slow", "too_many_scans", "camera_raw", "multi_frame")
DIR_CACHE = 65536  # folders whose ignore verdict is remembered
SETTLE_BATCH = 2048  # candidates looked at per settle step (the loop stays responsive)
INSPECT_BATCH = 256  # admitted files one inspector takes at once (one thread hop, one commit)
POOL_MIN_BATCH = 64  # a batch this large (a backlog) is inspected in worker processes
INSPECT_BATCH_BYTES = 32 * 1024 * 1024  # ... and one inspector takes at most this much at once:
# camera photos (a decode and a proxy each) are shared out between the inspectors
POOL_WORKERS = 2
DB_RETRY_SECONDS = 2.0  # the shared queue's database away: files are looked at again after this


def _about_file(rel: str) -> AbstractContextManager[object]:
    """In a worker thread: the events libraries log while ``rel`` is inspected name it."""
    return structlog.contextvars.bound_contextvars(file=rel)


def _signature(rel: str, st: os.stat_result) -> Signature:
    return (rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass
class _Candidate:
    seen: Seen | None = None
    due: float = 0.0


class Admission:
    """The watch → settle → inspect → queue hand-over."""

    def __init__(
        self,
        settings: Settings,
        *,
        queue: Queue,
        publisher: Publisher,
        spool_dir: Path,
        on_queued: Callable[[], None],
        min_observations: int,
        on_held: Callable[[str], None] = lambda rel_path: None,
        clock: Callable[[], float] = time.time,
        recorder: Recorder | None = None,
        alerts: Alerts | None = None,
    ) -> None:
        self.settings = settings
        self._recorder: Recorder = recorder or NoRecorder()
        self._alerts: Alerts = alerts or NoAlerts()
        self._queue = queue
        self._publisher = publisher
        self._spool_dir = spool_dir
        self._on_queued = on_queued
        self._on_held = on_held
        self._min_observations = min_observations
        self._clock = clock
        self._candidates: dict[str, _Candidate] = {}
        self._heap: list[tuple[float, str]] = []
        self._busy: set[str] = set()  # being inspected right now
        self._recheck: dict[str, float | None] = {}  # noticed again while being inspected
        self._failures: dict[str, FirstFailure] = {}
        self._reported: dict[str, str] = {}  # rel -> reason already logged (reject/unreadable)
        self._pool: ProcessPoolExecutor | None = None
        self._work: asyncio.Queue[tuple[str, Seen]] = asyncio.Queue()
        self._dir_ignored: dict[str, bool] = {}  # folder -> is_ignored_dir, for this settings
        self._log = structlog.get_logger()
        self.admitted = 0

    def apply(self, settings: Settings, *, min_observations: int) -> None:
        self.settings = settings
        self._dir_ignored = {}
        self._min_observations = min_observations

    # --- the watcher's side ----------------------------------------------------------

    def notice(self, rel_path: str, *, due: float | None = None) -> None:
        """A path may have changed (called on the event loop)."""
        if rel_path.rpartition("/")[2].startswith(HELD_PREFIX):
            self._on_held(rel_path)  # one of ours: never admitted, maybe left by a crash
            return
        if self._ignored(rel_path):
            self._log.debug("file_ignored", file=rel_path)
            return
        try:
            rel_path.encode("utf-8")
        except UnicodeEncodeError:
            # Not UTF-8 (an old SMB or zip client): no name we could record or mirror.
            if self._reported.get(rel_path) != "name_not_utf8":
                self._reported[rel_path] = "name_not_utf8"
                self._log.warning("file_rejected", file=repr(rel_path), reason="name_not_utf8")
            return
        if rel_path in self._busy:
            if due is not None or rel_path not in self._recheck:
                self._recheck[rel_path] = due
            return
        when = self._clock() if due is None else due
        cand = self._candidates.get(rel_path)
        if cand is None:
            cand = self._candidates[rel_path] = _Candidate(due=when)
        elif when >= cand.due and cand.seen is not None:
            return  # already scheduled sooner
        cand.due = when
        heapq.heappush(self._heap, (when, rel_path))

    def _ignored(self, rel_path: str) -> bool:
        """:func:`is_ignored`, with the verdict on the folders remembered per folder (the
        same for all files in it; this is most of the cost of a rescan's notices)."""
        s = self.settings
        parent, _, name = rel_path.rpartition("/")
        if name in ("", "."):
            return is_ignored(rel_path, s.ignore_patterns, s.ignore_dirs)
        if is_ignored(name, s.ignore_patterns, ()):
            return True
        ignored = self._dir_ignored.get(parent)
        if ignored is None:
            if len(self._dir_ignored) >= DIR_CACHE:
                self._dir_ignored.clear()
            ignored = self._dir_ignored[parent] = is_ignored_dir(parent, s.ignore_dirs)
        return ignored

    def forget_reports(self) -> None:
        """A full rescan starts. Unreadable files are looked at again (the rescan notices
        them) but reported only once: their report is kept until they change state."""

    @property
    def pending(self) -> int:
        return len(self._candidates) + len(self._busy) + self._work.qsize()

    # --- settle --------------------------------------------------------------------

    async def settle_loop(self) -> None:
        """Look at due candidates; hand stable ones to the inspectors."""
        while True:
            now = self._clock()
            due: list[str] = []
            while self._heap and self._heap[0][0] <= now and len(due) < SETTLE_BATCH:
                when, rel = heapq.heappop(self._heap)
                cand = self._candidates.get(rel)
                if cand is not None and cand.due == when:
                    due.append(rel)
            if due:
                stats = await asyncio.to_thread(self._stat_all, due)
                pairs = list(zip(due, stats, strict=True))
                try:
                    known = self._queue.known_signatures([_signature(rel, st) for rel, st in pairs if st])
                except UNAVAILABLE as exc:  # (the shared queue's database away) later
                    self._log.debug("settle_deferred", reason=str(exc), files=len(due))
                    self._later(due)
                    await asyncio.sleep(TICK_SECONDS)
                    continue
                for rel, st in pairs:
                    state = None if st is None else known[_signature(rel, st)]
                    self._settle_one(rel, st, self._clock(), state)
            if self._heap and self._heap[0][0] <= self._clock():
                await asyncio.sleep(0)  # more are due already: go on after letting others run
            else:
                await asyncio.sleep(TICK_SECONDS)

    def _later(self, rels: list[str]) -> None:
        """Look at these paths again in :data:`DB_RETRY_SECONDS` (the shared queue's
        database is away: nothing is lost, nothing refused for it)."""
        when = self._clock() + DB_RETRY_SECONDS
        for rel in rels:
            cand = self._candidates.get(rel)
            if cand is None or rel in self._busy:
                self.notice(rel, due=when)
            else:  # (taken off the heap to be looked at: put back, as it was)
                cand.due = when
                heapq.heappush(self._heap, (when, rel))

    def _stat_all(self, rels: list[str]) -> list[os.stat_result | None]:
        """``stat_entry`` of each path (None when gone or unreadable), opening each folder
        once for all its files rather than once per file."""
        inbox = self.settings.inbox
        by_dir: dict[str, list[int]] = {}
        for i, rel in enumerate(rels):
            parent, _, name = rel.rpartition("/")
            if name in ("", ".", "..") or "\x00" in rel:
                parent = "\x00"  # not a plain path: stat_entry says why
            by_dir.setdefault(parent, []).append(i)
        out: list[os.stat_result | None] = [None] * len(rels)
        for parent, indexes in by_dir.items():
            fd = -1
            if parent != "\x00":
                try:
                    fd = insp.open_dir_nofollow(inbox, parent)
                except (OSError, ValueError):
                    fd = -1  # a link, gone, unreadable, odd: file by file, as stat_entry sees it
            if fd < 0:
                for i in indexes:
                    try:
                        out[i] = insp.stat_entry(inbox, rels[i])
                    except OSError:
                        out[i] = None
                continue
            try:
                for i in indexes:
                    try:
                        out[i] = os.stat(rels[i].rpartition("/")[2], dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        out[i] = None
            finally:
                os.close(fd)
        return out

    def _settle_one(self, rel: str, st: os.stat_result | None, now: float, state: str | None) -> None:
        """``state``: what :meth:`JobQueue.known_signature` says about ``st``."""
        cand = self._candidates.get(rel)
        if cand is None:
            return
        if st is None:  # gone (renamed away, deleted): nothing to do
            del self._candidates[rel]
            self._failures.pop(rel, None)
            return
        if state is not None:
            del self._candidates[rel]
            self._log.debug("file_known", file=rel, state=state)
            return
        s = self.settings
        seen = observe(cand.seen, size=st.st_size, mtime_ns=st.st_mtime_ns, now=now)
        cand.seen = seen
        v = verdict(
            seen,
            now=now,
            debounce=s.debounce_seconds,
            max_settle=s.max_settle_seconds,
            min_observations=self._min_observations,
        )
        if v is Verdict.ADMIT:
            del self._candidates[rel]
            self._busy.add(rel)
            self._work.put_nowait((rel, seen))
        elif v is Verdict.NEVER_SETTLED:
            del self._candidates[rel]
            self._quarantine_local_or_later(
                rel,
                seen,
                insp.Refused(
                    rel_path=rel,
                    status=408,
                    code="never_settled",
                    detail=f"size or mtime still changing after {s.max_settle_seconds:g} s",
                    sha256=None,
                    size=st.st_size,
                    mtime_ns=st.st_mtime_ns,
                    inode=st.st_ino,
                    device=st.st_dev,
                    ctime_ns=st.st_ctime_ns,
                ),
            )
        else:
            step = s.poll_interval_seconds if self._min_observations > 1 else s.debounce_seconds
            # A file that just changed is not looked at again sooner than min(step, 1 s);
            # one unchanged since the last look is looked at again when its quiet time is
            # up (waiting for that floor too only delayed its admission).
            floor = min(step, 1.0) if seen.observations == 1 else TICK_SECONDS
            cand.due = max(next_check(seen, now=now, debounce=s.debounce_seconds), now + floor)
            if self._min_observations > 1 and seen.observations < self._min_observations:
                cand.due = max(now + min(s.debounce_seconds, step) / 2, now + TICK_SECONDS)
            heapq.heappush(self._heap, (cand.due, rel))

    # --- inspect -------------------------------------------------------------------------

    async def inspect_loop(self) -> None:
        """One inspector: read, check and spool admitted files in a worker thread.

        Takes every admitted file waiting (up to ``INSPECT_BATCH``) at once: one thread
        hop for all of them, and the admitted ones are queued in one transaction (at least
        every ``INSPECT_SLICE_SECONDS``), instead of one hop and one commit per file.
        """
        while True:
            batch = [await self._work.get()]
            taken = batch[0][1].size
            while len(batch) < INSPECT_BATCH and taken < INSPECT_BATCH_BYTES and not self._work.empty():
                batch.append(self._work.get_nowait())
                taken += batch[-1][1].size
            try:
                while batch:
                    s = self.settings
                    rels = [rel for rel, _ in batch]
                    args = (rels, s.inbox, self._spool_dir, s.max_file_bytes, s.max_pixels)
                    cutout = s.api_mode == "cutout"  # the file goes as it is: the API's limits
                    inspect = functools.partial(
                        insp.inspect_some,
                        decode_timeout=s.decode_timeout_seconds,
                        max_decode_bytes=s.max_decode_bytes,
                        max_upload_bytes=s.api_max_upload_bytes if cutout else None,
                        multi_frame=s.multi_frame,
                        api_formats_only=cutout,  # (the API takes no HEIC or AVIF)
                        proxy_max_side=None if cutout else s.proxy_max_side,
                    )
                    if len(batch) >= POOL_MIN_BATCH:
                        # A backlog: inspection is most of the CPU, and the GIL would keep
                        # it on one core. Two worker processes use the second one.
                        loop = asyncio.get_running_loop()
                        pool = self._process_pool()
                        # What libraries say there (Pillow's warnings...) is handed back to
                        # be logged here: the workers have no logging, their stderr is ours.
                        in_worker = functools.partial(inspect, capture=True)
                        results, notes = await loop.run_in_executor(pool, in_worker, *args)
                    else:
                        results, notes = await asyncio.to_thread(
                            functools.partial(inspect, per_file=_about_file), *args
                        )
                    done, batch = batch[: len(results)], batch[len(results) :]
                    try:
                        self._log_notes(notes)
                        self._handle_all(done, results)
                    finally:
                        self._release(done)
            finally:
                self._release(batch)  # cancelled (shutdown) before these were looked at

    def _process_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = worker.pool(POOL_WORKERS)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes, if a backlog started them."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _release(self, done: list[tuple[str, Seen]]) -> None:
        for rel, _ in done:
            self._busy.discard(rel)
            if rel in self._recheck:
                self.notice(rel, due=self._recheck.pop(rel))

    def _log_notes(self, notes: list[Note]) -> None:
        """Log what libraries said in a worker process as they are logged here
        (:mod:`dropcut.logs`), with the file they said it about."""
        for note in notes:
            fields: dict[str, object] = {} if note.rel_path is None else {"file": note.rel_path}
            fields["worker"] = True
            if note.kind == "warning":
                event = "python_warning"
                fields.update(logger="py.warnings", category=note.source, where=note.where)
            elif note.kind == "log":
                event = "library_log"
                fields["logger"] = note.source
                if note.exception is not None:
                    fields["exception"] = note.exception
            else:
                event = "library_output"
                fields["stream"] = note.source
            getattr(self._log, note.level)(event, message=note.message, **fields)

    def _handle_all(self, done: list[tuple[str, Seen]], results: list[insp.Inspection | Exception]) -> None:
        """Act on inspection results; the admitted files are queued together."""
        jobs: list[NewJob] = []
        for (rel, seen), result in zip(done, results, strict=True):
            if isinstance(result, Exception):
                self._log.error("inspect_failed", file=rel, exc_info=result)
                continue
            try:
                job = self._handle(rel, seen, result)
            except UNAVAILABLE as exc:  # (a local quarantine's record) looked at again later
                self._log.warning("admission_deferred", file=rel, reason=str(exc))
                self._later([rel])
                continue
            except Exception:
                self._log.exception("inspect_failed", file=rel)
                continue
            if job is not None:
                jobs.append(job)
        if not jobs:
            return
        recipes = self._recipes([job.rel_path for job in jobs])
        jobs = [dataclasses.replace(job, recipe=recipes[job.rel_path][1]) for job in jobs]
        try:
            queued = self._queue.enqueue_many(
                jobs,
                requeue_done=self.settings.on_success != "keep",
                outputs=(lambda rel: output_name_sets(rel, recipes[rel][0]), output_key),
                hold=HoldRule(self.settings.hold_batches_over, self.settings.batch_window_seconds),
            )
        except UNAVAILABLE as exc:
            # The shared queue's database is away: the files stay in the inbox (and their
            # validated copies in the spool), and are looked at again shortly.
            self._log.warning("admission_deferred", files=len(jobs), reason=str(exc))
            self._later([job.rel_path for job in jobs])
            return
        except Exception:
            for job in jobs:
                self._log.exception("inspect_failed", file=job.rel_path)
            return
        for new, what in queued:
            if what in ("queued", "requeued"):
                again = what == "requeued"
                self._log.info("job_queued", file=new.rel_path, sha256=new.sha256, size=new.size, again=again)
            elif what == "held":  # (the headline is the condition batch_held)
                self._log.info("job_held", file=new.rel_path, sha256=new.sha256, size=new.size)
            else:
                self._log.info("job_duplicate", file=new.rel_path, sha256=new.sha256, state=what)
        self._on_queued()

    def _recipes(self, rel_paths: list[str]) -> dict[str, tuple[tuple[OutputSpec, ...], str | None]]:
        """The outputs each path gets (its folder's recipe, else the inbox's) and their
        record for the queue (:func:`recipe_json`); worked out once per folder."""
        s = self.settings
        folders = folder_recipes(s.folders)
        by_folder: dict[str, tuple[tuple[OutputSpec, ...], str | None]] = {}
        out = {}
        for rel in rel_paths:
            parent = rel.rpartition("/")[0]
            if parent not in by_folder:
                specs = recipe_for(rel, s.outputs, folders)
                by_folder[parent] = (specs, recipe_json(specs))
            out[rel] = by_folder[parent]
        return out

    def _handle(self, rel: str, seen: Seen, result: insp.Inspection) -> NewJob | None:
        """Act on one result; an admitted file is returned as the job to queue."""
        log = self._log.bind(file=rel)
        match result:
            case insp.Inspected():
                self._failures.pop(rel, None)
                self._reported.pop(rel, None)
                self.admitted += 1
                log.info(
                    "file_admitted",
                    sha256=result.sha256,
                    size=result.size,
                    format=result.format,
                    width=result.width,
                    height=result.height,
                    frames=result.frames,
                )
                if result.frames > 1:  # (multi_frame = "first")
                    log.info("frames_skipped", frames=result.frames, used=1)
                return NewJob(
                    rel_path=rel,
                    sha256=result.sha256,
                    size=result.size,
                    mtime_ns=result.mtime_ns,
                    inode=result.inode,
                    device=result.device,
                    format=result.format,
                    first_seen=seen.first_seen,
                    ctime_ns=result.ctime_ns,
                    frames=result.frames,
                )
            case insp.Refused():
                if (
                    result.status in GRACE_CODES_STATUS
                    and result.code not in NO_GRACE_CODES
                    and result.sha256 is not None
                    and result.size is not None
                ):
                    verdict_, first = corrupt_verdict(
                        self._failures.get(rel),
                        size=result.size,
                        mtime_ns=result.mtime_ns or 0,
                        sha256=result.sha256,
                        now=self._clock(),
                        grace=self.settings.corrupt_grace_seconds,
                    )
                    if verdict_ is CorruptVerdict.RECHECK_LATER:
                        self._failures[rel] = first
                        log.info(
                            "file_recheck_scheduled",
                            code=result.code,
                            after_s=self.settings.corrupt_grace_seconds,
                        )
                        self.notice(rel, due=first.at + self.settings.corrupt_grace_seconds)
                        return None
                self._failures.pop(rel, None)
                self._quarantine_local(rel, seen, result)
            case insp.Rejected():
                if self._reported.get(rel) != result.reason:
                    self._reported[rel] = result.reason
                    log.warning("file_rejected", reason=result.reason)
            case insp.Unreadable():
                key = f"unreadable:{result.errno_name}"
                if self._reported.get(rel) != key:
                    self._reported[rel] = key
                    log.warning("file_unreadable", errno=result.errno_name, detail=result.detail)
            case insp.Vanished():
                log.debug("file_vanished")
            case insp.Changed():
                self.notice(rel)
        return None

    def _quarantine_local_or_later(self, rel: str, seen: Seen, refused: insp.Refused) -> None:
        try:
            self._quarantine_local(rel, seen, refused)
        except UNAVAILABLE as exc:
            self._log.warning("admission_deferred", file=rel, reason=str(exc))
            self._later([rel])

    def _quarantine_local(self, rel: str, seen: Seen, refused: insp.Refused) -> None:
        error: dict[str, object] = {
            "status": refused.status,
            "code": refused.code,
            "detail": refused.detail,
            "source": "local",
        }
        job = NewJob(
            rel_path=rel,
            sha256=refused.sha256 or "",
            size=refused.size or 0,
            mtime_ns=refused.mtime_ns or 0,
            inode=refused.inode or 0,
            device=refused.device or 0,
            format="",
            first_seen=seen.first_seen,
            ctime_ns=refused.ctime_ns or 0,
        )

        def intent(q_rel: str) -> None:
            # committed before the move: a crash in between is finished at the next start
            self._queue.add_quarantined(job, {**error, "quarantined_as": q_rel}, state="quarantining")

        try:
            placed = self._publisher.quarantine_input(
                rel_path=rel,
                sha256=refused.sha256,
                size=refused.size,
                identity=(refused.size, refused.mtime_ns, refused.ctime_ns, refused.inode, refused.device),
                error=dict(error),
                attempts=0,
                first_seen=seen.first_seen,
                history=[],
                spool=None,
                before_move=intent,
            )
        except OSError as exc:
            self._log.error("quarantine_failed", file=rel, error=str(exc))
            return
        if placed is None:
            # The file changed or went away since it was checked: look again.
            self.notice(rel)
            return
        self._queue.add_quarantined(job, {**error, "quarantined_as": placed})
        self._recorder.file_finished("quarantined")
        self._alerts.emit(
            notify.file_quarantined(
                rel, refused.code, refused.detail, status=refused.status, now=self._clock()
            )
        )
        self._log.warning(
            "file_quarantined",
            file=rel,
            sha256=refused.sha256,
            size=refused.size,
            status=refused.status,
            code=refused.code,
            detail=refused.detail,
            source="local",
            attempt=0,
            quarantined_as=placed,
        )
