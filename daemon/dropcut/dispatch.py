"""Dispatch: queue → pace → send → judge → publish, for up to ``max_in_flight`` jobs.

Claims due jobs from the queue, publishes from the result cache when the same content
was done before, otherwise waits for a rate-limit slot, sends, and acts on the judge's
decision. Also owns the account state: a paused queue (401/402/403, disk full) and the
``/available-credit`` checks that resume it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import random
import shutil
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import structlog
from PIL import Image
from structlog.typing import FilteringBoundLogger as BoundLogger

from dropcut import notify
from dropcut.budget import PERIODS, Caps, Verdict, period_bounds, verdict
from dropcut.cache import ResultCache
from dropcut.client import ALPHA_PATH, REMOVE_PATH, WithoutBG
from dropcut.decode import DecodeError
from dropcut.inspect import open_dir_nofollow
from dropcut.judge import (
    Code,
    Outcome,
    Pause,
    Publish,
    Refuse,
    Retry,
    RetryPolicy,
    TransportError,
    backoff_delay,
    judge,
)
from dropcut.observe import Alerts, NoAlerts, NoRecorder, Recorder
from dropcut.pace import Pacer
from dropcut.paths import Layout, output_key, result_key
from dropcut.pgcache import PgResultCache
from dropcut.pgpace import SharedPacer, SharedSlotHandle, SharedState
from dropcut.pgqueue import DB_ERRORS, UNAVAILABLE, PgJobQueue, Queue, QueueHealth
from dropcut.produce import Producer
from dropcut.publish import Publisher, copy_to_staging, fsync_dir, new_staging_file
from dropcut.queue import Job, RequestRecord
from dropcut.recipes import output_name_sets, recipe_from_json
from dropcut.settings import Settings
from dropcut.watch import inbox_problem

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_CHECK_SECONDS = 2.0  # how often a local pause (disk full, outbox unwritable) is re-checked
# Transport errors before anything reached the server: not a request the API counts.
UNSENT = frozenset(
    {
        TransportError.CONNECT,
        TransportError.DNS,
        TransportError.TLS,
        TransportError.CONNECT_TIMEOUT,
        TransportError.POOL_TIMEOUT,
    }
)
BUDGET_RECHECK_SECONDS = 1.0  # how soon `dropcut budget raise` / `dropcut resume` take effect
LOCAL_PAUSES = ("disk_full", "outbox_unwritable")  # resumed by looking at our folders, not the account
SERVICE_WIDE = ("rate_limited", "server_error", "connection_error", "timeout")
SOURCE_CHECK_SECONDS = 10.0  # a stat of the inbox taking longer: the inbox is unavailable
UNAVAILABLE_RETRY_SECONDS = 5.0  # a job whose inbox is unavailable is looked at again after this
DB_RETRY_FIRST_SECONDS = 0.5  # the shared queue's database away: claims retried after this,
DB_RETRY_MAX_SECONDS = 5.0  # doubling up to this
OUTPUT_UNWRITABLE = "output_unwritable"
PROXY_FAILED = "proxy_failed"
RENDER_FAILED = "render_failed"


@dataclass(frozen=True)
class _Upload:
    """What a request sends (``path``, as ``format``), the size its answer must have, and
    the client call that sends it."""

    path: Path
    format: str
    expected_size: tuple[int, int] | None
    send: Callable[..., Awaitable[Outcome]]
    endpoint: str  # its path, for the request log and the metrics


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def outage_step(streak: int, last_step_at: float, *, started: float, now: float) -> tuple[int, float]:
    """The outage's length in steps after one more service-wide failure (429, 5xx, network):
    ``(streak, last_step_at)``.

    A request that started before the last step was counted was in flight together with
    the one that counted it: its failure is the same moment of the same outage, not a new
    step. So four requests failing at once are one step, and the backoff grows with the
    outage's duration, not with ``max_in_flight``."""
    if started < last_step_at:
        return streak, last_step_at
    return streak + 1, now


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        base_delay=settings.retry_base_delay_seconds,
        max_delay=settings.retry_max_delay_seconds,
    )


def space_needed(width: int, height: int) -> int:
    """Free bytes wanted on the outbox before a request is spent on an image: its RGBA cut-out
    uncompressed (a PNG is never much larger), plus room for the archive's staging."""
    return 4 * width * height + 256 * 1024


def respool(inbox: Path, rel_path: str, spool: Path, sha256: str) -> str:
    """Copy ``inbox/rel_path`` (links not followed) to ``spool`` if its content is
    ``sha256``: a job of the shared queue admitted by another daemon of the site has no
    spooled copy here. Returns ``present`` (spooled, fsynced), ``changed`` (other content
    there now: nothing spooled) or ``gone``. Raises OSError when the inbox cannot be read
    or the spool written."""
    rel = PurePosixPath(rel_path)
    try:
        dir_fd = open_dir_nofollow(inbox, str(rel.parent))
    except FileNotFoundError:
        return "gone"
    try:
        try:
            fd = os.open(rel.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return "gone"
    finally:
        os.close(dir_fd)
    tmp = spool.with_name(f".respool-{os.getpid()}-{random.getrandbits(40):010x}.tmp")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "rb") as src, tmp.open("wb") as out:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                return "changed"
            while chunk := src.read(1024 * 1024):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            return "changed"
        os.replace(tmp, spool)
        folder = os.open(spool.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fsync_dir(folder)
        finally:
            os.close(folder)
        return "present"
    finally:
        tmp.unlink(missing_ok=True)


def image_size(path: Path) -> tuple[int, int]:
    """Width and height from the image header (Pillow reads no pixels for this)."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError):
        return (0, 0)


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        *,
        layout: Layout,
        queue: Queue,
        client: WithoutBG,
        pacer: Pacer | SharedPacer,
        publisher: Publisher,
        cache: ResultCache | PgResultCache,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        notice: Callable[[str], None] | None = None,
        producer: Producer | None = None,
        recorder: Recorder | None = None,
        alerts: Alerts | None = None,
        health: QueueHealth | None = None,
    ) -> None:
        self.settings = settings
        self._recorder: Recorder = recorder or NoRecorder()
        self._alerts: Alerts = alerts or NoAlerts()
        self._layout = layout
        self._queue = queue
        self._client = client
        self._pacer = pacer
        self._publisher = publisher
        self._cache = cache
        self._clock = clock
        self._rng = rng or random.Random()
        self._notice = notice or (lambda rel_path: None)  # "look at this inbox path again"
        self._producer = producer or Producer()
        self._wake = asyncio.Event()
        self._credit_wake = asyncio.Event()
        self._condition_wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()  # jobs up to their answer (max_in_flight)
        self._finishing: set[asyncio.Task[None]] = set()  # renders and publishing after it
        self._job_of: dict[asyncio.Task[None], int] = {}  # the job id of each of those tasks
        # The shared queue (PostgreSQL), or None: the SQLite one, as before.
        self._shared = queue if isinstance(queue, PgJobQueue) else None
        self._health = health or QueueHealth(clock)
        self._outage_shared = False  # the outage shown was seen by another daemon on the key
        self._sharing: set[asyncio.Task[Any]] = set()  # pause and resume of the key, written
        self._stopping = False
        self._hold_until = 0.0
        self._move_failures: dict[int, str] = {}  # job id -> why its input could not be moved
        self._outage_streak = 0  # steps of the current outage (429, 5xx, network; see outage_step)
        self._outage: tuple[float, str] | None = None  # (since, the last failure in words)
        self._applied = 0  # reloads put in force (see check_credit)
        self.budget_reached: Verdict | None = None  # the cap that holds the queue, if one does
        self._outage_step_at = float("-inf")
        self._low_credit = False
        self._log = structlog.get_logger()
        self.last_credit: int | None = None
        paused = queue.get_meta("paused")
        self._paused: dict[str, Any] | None = paused if isinstance(paused, dict) else None

    @property
    def shared(self) -> bool:
        """Is the queue the shared one (PostgreSQL)?"""
        return self._shared is not None

    def holding(self) -> list[int]:
        """The ids of the jobs this daemon works on now (up to their answer, rendering,
        publishing): the leases it renews (:meth:`dropcut.pgqueue.PgJobQueue.renew_leases`)."""
        return sorted(set(self._job_of.values()))

    def set_pacer(self, pacer: Pacer | SharedPacer) -> None:
        """Pace by ``pacer`` from now on (a reload gave the shared queue another API key)."""
        self._pacer = pacer

    def _db_failed(self, exc: BaseException, what: str) -> None:
        """The shared database is away (:data:`dropcut.pgqueue.UNAVAILABLE`): the condition
        ``queue_unavailable`` shows it; whatever failed is tried again later."""
        first = not self._health.down
        self._health.failed(exc)
        (self._log.warning if first else self._log.debug)("queue_unavailable", during=what, detail=str(exc))

    # --- control -----------------------------------------------------------------------

    def apply(self, settings: Settings) -> None:
        self._applied += 1  # (a credit check answered for the settings before this one is stale)
        self.settings = settings
        self._pacer.reconfigure(
            limit=settings.rate_limit_requests,
            period=settings.rate_limit_period_seconds,
            margin=settings.rate_margin(),
        )
        self._credit_wake.set()
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def outage(self) -> tuple[float, str] | None:
        """``(since, why)`` while requests fail service-wide (no connection, time-outs, 5xx,
        429: the API cannot be reached or will not serve), else None; ``since``: wall
        seconds the first failing request started."""
        return self._outage

    @property
    def paused(self) -> dict[str, Any] | None:
        """Why the queue is paused (persisted across restarts), or None."""
        return self._paused

    def _pause(self, *, code: str, status: int | None, detail: str, location: str | None = None) -> None:
        if self._paused is None:
            self._paused = {"code": code, "status": status, "detail": detail, "since": self._clock()}
            if location is not None:
                self._paused["location"] = location
            self._store_pause(self._paused, code)
            self._log.error("queue_paused", code=code, status=status, detail=detail, location=location)
            self._condition_wake.set()  # whatever checks this condition looks at it now

    def _resume(self, why: str) -> None:
        was = self._paused
        if was is not None:
            self._paused = None
            self._store_pause(None, str(was.get("code")))
            self._log.info("queue_resumed", reason=why, paused_code=was.get("code"))
            self.wake()

    def _store_pause(self, record: dict[str, Any] | None, code: str) -> None:
        """Persist a pause (None: its end). The SQLite queue: meta ``paused``. The shared
        queue: a local pause (disk full, outbox unwritable) in this daemon's meta; an
        account pause in the API key's shared row, for every daemon on the key."""
        if self._shared is None:
            self._queue.set_meta("paused", record)
            return
        pacer = self._pacer
        if code not in LOCAL_PAUSES and isinstance(pacer, SharedPacer):
            self._share(pacer.pause(record) if record is not None else pacer.resume(), "pause")
            return
        try:
            self._queue.set_meta("paused", record)
        except UNAVAILABLE as exc:
            self._db_failed(exc, "pause")

    def _share(self, write: Coroutine[Any, Any, Any], what: str) -> None:
        """Write to the key's shared row in a task of its own (the caller may not wait)."""

        async def run() -> None:
            try:
                await write
            except UNAVAILABLE as exc:
                self._db_failed(exc, what)

        task = asyncio.create_task(run(), name=f"share-{what}")
        self._sharing.add(task)
        task.add_done_callback(self._sharing.discard)

    def shared_state(self, state: SharedState) -> None:
        """The API key's shared row changed (:class:`dropcut.pgpace.SharedPacer`'s
        ``on_state``, on the event loop): another daemon's account pause or resume, or an
        outage hold, is obeyed here too."""
        pause = state.pause
        local = self._paused is not None and self._paused.get("code") in LOCAL_PAUSES
        if pause is not None and self._paused is None:
            self._paused = dict(pause)
            self._log.error("queue_paused", code=pause.get("code"), status=pause.get("status"),
                            detail=pause.get("detail"), shared=True)  # fmt: skip
            self._condition_wake.set()
        elif pause is None and self._paused is not None and not local:
            was, self._paused = self._paused, None
            self._log.info("queue_resumed", reason="resumed_on_the_key", paused_code=was.get("code"))
            self.wake()
        if state.hold_seconds > 0:
            self._hold_until = max(self._hold_until, self._clock() + state.hold_seconds)
        if state.outage_streak > 0 and self._outage is None:
            self._outage = (self._clock(), "requests on this API key fail (seen by another daemon)")
            self._outage_shared = True
        elif state.outage_streak == 0 and self._outage_shared:
            self._outage, self._outage_shared = None, False
            self.wake()

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and start jobs until :meth:`stop`. The shared queue's database away: the
        claims are tried again with backoff (nothing is claimed meanwhile)."""
        backoff = DB_RETRY_FIRST_SECONDS
        while not self._stopping:
            if self._shared is None:
                await self._run_once()
                continue
            try:
                await self._run_once()
            except UNAVAILABLE as exc:
                self._db_failed(exc, "claim")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, DB_RETRY_MAX_SECONDS)
                continue
            backoff = DB_RETRY_FIRST_SECONDS

    async def _run_once(self) -> None:
        """One turn of :meth:`run`: start a job, or wait until one may be started."""
        self._wake.clear()
        now = self._clock()
        # During an outage one request probes the service; the others wait for it.
        limit = 1 if self._outage_streak else self.settings.max_in_flight
        if self.paused is not None or now < self._hold_until or self.in_flight >= limit:
            await self._sleep(max(0.0, self._hold_until - now) if now < self._hold_until else None)
            return
        if self._over_budget(now):
            resets = self.budget_reached.resets_at if self.budget_reached else None
            await self._sleep(min(BUDGET_RECHECK_SECONDS, max(0.0, (resets or now) - now)))
            return
        job = self._queue.claim()
        if job is None:
            due = self._queue.next_due()
            await self._sleep(None if due is None else max(0.0, due - self._clock()))
            return
        task = asyncio.create_task(self._process(job), name=f"job-{job.id}")
        self._tasks.add(task)
        self._job_of[task] = job.id
        task.add_done_callback(self._done)

    def _over_budget(self, now: float) -> bool:
        """Is a budget cap reached (:mod:`dropcut.budget`)? Counts the requests of the
        current day and month in the request log, plus the jobs on their way (each may
        send one), so the cap holds with several in flight. Logs ``budget_reached`` and
        ``budget_available`` when the answer changes."""
        s = self.settings
        caps = Caps(s.budget_per_day, s.budget_per_month)
        found = Verdict(False)
        if caps != Caps():
            tz = s.budget_tz()
            stored = self._queue.get_meta("budget")
            stored = stored if isinstance(stored, dict) else {}
            raised = stored.get("raised") if isinstance(stored.get("raised"), dict) else {}
            lifted = frozenset(str(k) for k in stored.get("lifted") or [] if isinstance(k, str))
            used = {
                p: self._queue.requests_since(period_bounds(now, tz, p)[0]) + len(self._tasks)
                for p in PERIODS
                if caps.cap(p) is not None
            }
            found = verdict(caps, used, now=now, tz=tz, raised=raised, lifted=lifted)
        was, self.budget_reached = self.budget_reached, found if found.reached else None
        if found.reached and was is None:
            self._log.warning(
                "budget_reached",
                period=found.period,
                budget=found.cap,
                used=found.used,
                resets_at=datetime.fromtimestamp(found.resets_at or now, UTC).isoformat(timespec="seconds"),
            )
            counts = self._queue.counts()
            waiting = counts.get("queued", 0) + counts.get("inflight", 0)
            resets, period = found.resets_at or now, found.period or "day"
            self._alerts.emit(notify.budget_reached(found.cap, period, resets, waiting, now=now))
        elif was is not None and not found.reached:
            self._log.info("budget_available", period=was.period)
        return found.reached

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._job_of.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("job_crashed", exc_info=task.exception())
        self.wake()

    async def _sleep(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=timeout if timeout is not None else 30.0)
        except TimeoutError:
            pass

    async def stop(self, grace: float) -> int:
        """Stop claiming; let in-flight requests finish for ``grace`` seconds, then cancel
        the rest (their jobs go back to the queue). Returns how many were cancelled."""
        self._stopping = True
        self.wake()
        if not self._tasks and not self._finishing:
            return 0
        _, pending = await asyncio.wait(self._tasks | self._finishing, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        return len(pending)

    # --- one job --------------------------------------------------------------------------

    async def _process(self, job: Job) -> None:
        log = self._log.bind(file=job.rel_path, sha256=job.sha256, size=job.size)
        await self._guarded(job, log, self._steps(job, log))

    async def _guarded(self, job: Job, log: BoundLogger, steps: Coroutine[Any, Any, None]) -> None:
        """Run a job's ``steps``; whatever goes wrong, the job is never stranded."""
        try:
            await steps
        except asyncio.CancelledError:
            self._release(job, log)
            log.info("job_requeued", reason="shutdown")
            raise
        except UNAVAILABLE as exc:
            # The shared database went away under the job: it goes back to the queue when
            # the database answers again (its lease: at the next renewal, or when it
            # expires); what it got from the API is in the result cache.
            self._db_failed(exc, "job")
            self._release(job, log)
            log.info("job_requeued", reason="queue unavailable")
            self._hold_until = max(self._hold_until, self._clock() + DB_RETRY_FIRST_SECONDS)
        except Exception as exc:  # never strand the job: it goes back to the queue
            self._release(job, log)
            if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
                self._disk_full(job, Path(str(exc.filename or self._layout.outbox)), str(exc.strerror))
                return
            if isinstance(exc, OSError) and self._outbox_problem() is not None:
                self._pause(code="outbox_unwritable", status=None, detail=self._outbox_problem() or "")
                return
            log.exception("job_failed")  # a bug, a refused write, the queue's database failing
            self._hold_until = max(self._hold_until, self._clock() + 5.0)

    def _release(self, job: Job, log: BoundLogger) -> None:
        """Put an in-flight job back in the queue. The shared database away: it stays
        leased to this daemon, which puts it back at its next lease renewal once the
        database answers (it is no longer among the jobs it holds)."""
        if self._shared is None:
            self._queue.release(job.id)
            return
        try:
            self._queue.release(job.id)
        except UNAVAILABLE as exc:
            self._db_failed(exc, "release")
            log.debug("job_release_deferred", reason="queue unavailable")

    async def _steps(self, job: Job, log: BoundLogger) -> None:
        if not await self._source_still_there(job, log):
            return
        spool = self._layout.spool_file(job.sha256)
        cached = self._cache.get(self._result_key(job))
        if cached is not None and self.settings.api_mode == "cutout":
            log.info("result_reused")
            staged = await asyncio.to_thread(self._copy_to_outbox_staging, cached)
            await self._publish(job, [staged], log, from_cache=True)
            return
        # The shared queue: a job admitted by another daemon of the site has no spooled
        # copy here. The input is read again from the inbox, and used only if it is still
        # the job's content.
        if not spool.exists() and self._shared is not None and not await self._respool(job, spool, log):
            return
        if not spool.exists():
            # The validated bytes are gone (state folder tampered with): forget the
            # job so the next rescan admits the file afresh.
            log.error("spool_missing")
            self._queue.forget(job.id)
            return
        if cached is not None:  # a matte: rendered again, no request
            log.info("result_reused")
            matte = await asyncio.to_thread(self._copy_to_outbox_staging, cached)
            self._finish_later(job, spool, matte, log, entry=None)
            return
        full = self._short_of_space(spool)
        if full is not None:
            # Checked before the request: a result we could not store is a wasted credit.
            self._queue.release(job.id)
            self._disk_full(job, full, "not enough free space for the result")
            return
        problem = self._outbox_problem()
        if problem is not None:  # likewise: an answer we could not even write down
            self._queue.release(job.id)
            self._pause(code="outbox_unwritable", status=None, detail=problem)
            return
        await self._send(job, spool, log)

    async def _respool(self, job: Job, spool: Path, log: BoundLogger) -> bool:
        """Spool a shared job's input from the inbox (:func:`respool`); False when it
        cannot be used (cancelled: changed or gone; postponed: the inbox unreadable)."""
        self._layout.spool_dir.mkdir(parents=True, exist_ok=True)
        try:
            where = await asyncio.wait_for(
                asyncio.to_thread(respool, self._layout.inbox, job.rel_path, spool, job.sha256),
                SOURCE_CHECK_SECONDS * 6,
            )
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
                raise
            self._queue.postpone(job.id, at=self._clock() + UNAVAILABLE_RETRY_SECONDS)
            log.warning("job_postponed", reason=f"cannot read the input into the spool: {_text(exc)}")
            return False
        if where == "present":
            log.info("input_spooled", reason="admitted by another daemon of the site")
            return True
        self._cancel(job, where, log)
        return False

    def _finish_later(
        self, job: Job, spool: Path, matte: Path, log: BoundLogger, *, entry: dict[str, Any] | None
    ) -> None:
        """Render the cut-out from ``matte`` (ours: removed after) and publish it, in a task
        of its own: a render does not hold one of the ``max_in_flight`` request slots, so
        pacing goes on at the allowance while renders run in the worker processes."""

        async def finish() -> None:
            try:
                rendered = await self._render(job, spool, matte, log)
                if rendered is not None:
                    await self._publish(job, rendered, log, from_cache=entry is None, entry=entry)
            finally:
                matte.unlink(missing_ok=True)

        task = asyncio.create_task(self._guarded(job, log, finish()), name=f"render-{job.id}")
        self._finishing.add(task)
        self._job_of[task] = job.id
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._finishing.discard(task)
        self._job_of.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("job_crashed", exc_info=task.exception())

    async def _source_state(self, job: Job) -> str:
        """``present``, ``changed`` or ``gone`` (see :meth:`Publisher.source_state`), or
        ``unavailable`` when the inbox cannot tell (away, unreadable, not answering). A
        file whose stat changed but whose content hashes to the job's (touched, or saved
        again with the same bytes) is ``present``: the hash decides when in doubt, and the
        job takes the new signature."""

        # The queue's signature, not the claimed copy's: the same content saved again at
        # the path meanwhile (a new drop of this job) updated it.
        identity = (self._queue.get(job.id) or job).identity

        def look() -> tuple[str, tuple[int, int, int, int, int] | None]:
            if inbox_problem(self._layout.inbox) is not None:
                return "unavailable", None
            try:
                state = self._publisher.source_state(job.rel_path, identity)
                if state == "changed":
                    seen = self._publisher.content_of(job.rel_path)
                    if seen is not None and seen[1] == job.sha256:
                        return "present", seen[0]
                return state, None
            except OSError:
                return "unavailable", None

        try:
            state, signature = await asyncio.wait_for(asyncio.to_thread(look), SOURCE_CHECK_SECONDS)
        except TimeoutError:
            return "unavailable"
        if signature is not None:
            self._queue.set_signature(job.id, signature)
        return state

    async def _source_still_there(self, job: Job, log: BoundLogger) -> bool:
        """Is the job's file still in the inbox as it was queued? Checked before anything
        is spent on it: a file deleted or replaced meanwhile is cancelled (the new content
        is admitted as its own job), and a job whose inbox cannot be read waits."""
        where = await self._source_state(job)
        if where == "present":
            return True
        if where == "unavailable":
            self._queue.postpone(job.id, at=self._clock() + UNAVAILABLE_RETRY_SECONDS)
            log.debug("job_postponed", reason="inbox unavailable")
        else:
            self._cancel(job, where, log)
        return False

    def _cancel(self, job: Job, why: str, log: BoundLogger, *, paid: bool = False) -> None:
        detail = "deleted or moved away" if why == "gone" else "replaced by other content"
        self._queue.cancel(job.id, {"code": f"source_{why}", "detail": f"the file was {detail}"})
        self._drop_spool(job.sha256)
        # (paid: the answer came after the file went; it is in the result cache, so the
        # same photo under its new name costs nothing)
        log.info("job_cancelled", reason=why, paid=paid)
        self._recorder.file_finished("cancelled")
        if why == "changed":
            self._notice(job.rel_path)

    def _short_of_space(self, spool: Path | None) -> Path | None:
        """A folder we write to that lacks room for this image's result, or None."""
        need = space_needed(*image_size(spool)) if spool is not None else 256 * 1024
        # state_dir too: the result cache and the queue's database grow there.
        for root in (*self._layout.output_roots(), self._layout.state_dir):
            if root.exists() and _free_bytes(root) < need:
                return root
        return None

    def _disk_full(self, job: Job, where: Path, detail: str) -> None:
        self._log.error("disk_full", file=job.rel_path, path=str(where), detail=detail)
        self._pause(code="disk_full", status=None, detail=f"{detail}: {where}")

    def _copy_to_outbox_staging(self, source: Path) -> Path:
        return copy_to_staging(source, self._layout.outbox)

    def _result_key(self, job: Job) -> str:
        s = self.settings
        return result_key(job.sha256, s.api_mode, s.proxy_max_side)

    async def _render(self, job: Job, spool: Path, matte: Path, log: BoundLogger) -> list[Path] | None:
        """Every output of the job's recipe from the spooled original and ``matte``,
        rendered into the outbox's staging in a worker process, in the recipe's order;
        None when it failed (an attempt with backoff)."""
        staged = [new_staging_file(self._layout.outbox) for _ in recipe_from_json(job.recipe)]
        log.info("render_started", outputs=len(staged))
        try:
            seconds = await self._producer.render(
                spool,
                matte,
                staged,
                recipe=job.recipe,
                strip_gps=self.settings.strip_gps,
                max_pixels=self.settings.max_pixels,
            )
        except asyncio.CancelledError:
            _unlink_all(staged)
            raise
        except Exception as exc:
            _unlink_all(staged)
            if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
                raise
            self._attempt_failed(job, RENDER_FAILED, f"cannot render the cut-out: {_text(exc)}", log)
            return None
        log.info("output_rendered", seconds=round(seconds, 3), outputs=len(staged))
        return staged

    async def _upload_of(self, job: Job, spool: Path, log: BoundLogger) -> _Upload | None:
        """What to send for this job, and what the answer must be: in ``cutout`` mode the
        spooled input as it is (the answer: RGBA at its stored size); in ``matte`` mode
        its proxy, made in a worker process (the answer: a matte at the proxy's size).
        None when the proxy could not be made (an attempt with backoff)."""
        s = self.settings
        if s.api_mode == "cutout":
            width, height = image_size(spool)
            size = (width, height) if width and height else None
            return _Upload(spool, job.format, size, self._client.remove_background, REMOVE_PATH)
        path = self._layout.proxy_file(job.sha256, s.proxy_max_side)
        try:
            proxy = await self._producer.proxy(
                spool,
                path,
                max_side=s.proxy_max_side,
                max_pixels=s.max_pixels,
                timeout=s.decode_timeout_seconds,
            )
        except asyncio.CancelledError:
            raise
        except DecodeError as exc:  # (inspection let it through: e.g. a slower machine now)
            error = Refuse(status=exc.status, code=exc.code, detail=exc.detail)
            entry = {"attempt": job.attempts, "at": self._clock(), "status": None, "code": exc.code}
            self._quarantine(job, error, entry, job.attempts, log, source="local")
            return None
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
                raise
            self._attempt_failed(job, PROXY_FAILED, f"cannot make the proxy: {_text(exc)}", log)
            return None
        return _Upload(path, proxy.format, proxy.size, self._client.alpha_channel, ALPHA_PATH)

    async def _send(self, job: Job, spool: Path, log: BoundLogger) -> None:
        upload = await self._upload_of(job, spool, log)
        if upload is None:
            return
        staged = new_staging_file(self._layout.outbox)
        handed_over = False
        try:
            async with self._pacer.slot() as handle:
                # Looked at again once the slot is ours: a file deleted or replaced while
                # it waited for the rate limit is not paid for, and the slot is given back.
                if not await self._source_still_there(job, log):
                    handle.discard()
                    return
                attempt = self._queue.record_attempt(job.id)
                log.info("upload_started", attempt=attempt, bytes=upload.path.stat().st_size)
                started = self._clock()
                began = time.monotonic()
                outcome = await upload.send(
                    upload.path,
                    filename=PurePosixPath(job.rel_path).name,
                    image_format=upload.format,
                    dest=staged,
                    on_sent=lambda _at: handle.mark_sent(),  # (the pacer's clock, not the wall)
                    expected_size=upload.expected_size,
                )
                if isinstance(handle, SharedSlotHandle):  # before the slot is released
                    await self._share_outcome(handle, outcome, attempt)
            duration_ms = round((time.monotonic() - began) * 1000)
            self._request_finished(
                RequestRecord(
                    started=started,
                    endpoint=upload.endpoint,
                    status=outcome.status,
                    seconds=time.monotonic() - began,
                    sent=upload.path.stat().st_size,
                    received=staged.stat().st_size if staged.exists() else 0,
                ),
                outcome,
            )
            policy = retry_policy(self.settings)
            decision = judge(
                outcome, attempt=attempt, policy=policy, now=datetime.now(UTC), jitter=self._rng.random()
            )
            service_wide = isinstance(decision, Retry) and decision.code in SERVICE_WIDE
            if service_wide:
                self._outage_streak, self._outage_step_at = outage_step(
                    self._outage_streak, self._outage_step_at, started=started, now=self._clock()
                )
                assert isinstance(decision, Retry)
                why = f"{decision.code}: {decision.detail}" if decision.detail else str(decision.code)
                self._outage = (self._outage[0] if self._outage is not None else started, why)
            elif not (isinstance(decision, Refuse) and decision.code == Code.RETRIES_EXHAUSTED):
                self._outage_streak = 0  # (a job giving up says nothing about the service)
                self._outage = None
            entry = {
                "attempt": attempt,
                "at": self._clock(),
                "status": outcome.status,
                "detail": outcome.detail,
                "transport_error": outcome.transport_error.value if outcome.transport_error else None,
                "body_problem": outcome.body_problem.value if outcome.body_problem else None,
                "duration_ms": duration_ms,
            }
            if outcome.location is not None:
                entry["location"] = outcome.location
            match decision:
                case Publish():
                    try:  # cached before it is used: a crash from here on pays nothing again
                        self._cache.store(self._result_key(job), staged)
                    except OSError as exc:  # a missing cache entry costs nothing now: publish
                        log.warning("cache_store_failed", detail=exc.strerror or str(exc))
                    log.info(
                        "upload_succeeded",
                        attempt=attempt,
                        status=200,
                        duration_ms=duration_ms,
                        bytes=staged.stat().st_size,
                    )
                    handed_over = True
                    if self.settings.api_mode == "cutout":
                        await self._publish(job, [staged], log, from_cache=False, entry=entry)
                    else:
                        self._finish_later(job, spool, staged, log, entry=entry)
                case Retry():
                    entry["code"] = decision.code
                    if service_wide:
                        # The service, not this file, is the problem: everyone waits, and
                        # the wait grows with the outage, not with this job's attempts, so
                        # a long outage costs each queued file only a few attempts.
                        outage = backoff_delay(self._outage_streak, policy, self._rng.random())
                        self._hold_until = max(self._hold_until, self._clock() + max(decision.delay, outage))
                    self._queue.retry_later(job.id, at=self._clock() + decision.delay, entry=entry)
                    log.warning(
                        "retry_scheduled",
                        attempt=attempt,
                        status=outcome.status,
                        code=decision.code,
                        detail=decision.detail,
                        delay_s=round(decision.delay, 2),
                        duration_ms=duration_ms,
                    )
                case Refuse():
                    self._quarantine(job, decision, entry, attempt, log)
                case Pause():
                    entry["code"] = decision.code
                    self._queue.retry_later(job.id, at=self._clock(), entry=entry, count_attempt=False)
                    self._pause(
                        code=decision.code,
                        status=decision.status,
                        detail=decision.detail,
                        location=decision.location,
                    )
        finally:
            if not handed_over:
                staged.unlink(missing_ok=True)

    async def _share_outcome(self, handle: SharedSlotHandle, outcome: Outcome, attempt: int) -> None:
        """Tell every daemon on the API key what this request says of the service: a
        service-wide failure (429, 5xx, no connection) steps the key's outage and holds
        everyone (while the slot is still open, so that no other daemon probes at the same
        moment); an answer after an outage ends it."""
        pacer = self._pacer
        if not isinstance(pacer, SharedPacer):
            return
        policy = retry_policy(self.settings)
        decision = judge(outcome, attempt=attempt, policy=policy, now=datetime.now(UTC), jitter=0.5)
        try:
            if isinstance(decision, Retry) and decision.code in SERVICE_WIDE:
                jitter = self._rng.random()
                retry_after = decision.delay
                await pacer.outage(
                    handle, lambda streak: max(retry_after, backoff_delay(streak, policy, jitter))
                )
            elif not (isinstance(decision, Refuse) and decision.code == Code.RETRIES_EXHAUSTED):
                state = pacer.state
                if state is not None and state.outage_streak:
                    await pacer.recovered()
        except UNAVAILABLE as exc:
            self._db_failed(exc, "shared outage")

    def _request_finished(self, record: RequestRecord, outcome: Outcome) -> None:
        """Count a request (the metrics: every try) and log it in the request log (the
        use of the allowance and the budgets), unless it never reached the server (no
        connection: nothing was sent, nothing is charged). A log that cannot be written
        costs the count, never the job."""
        self._recorder.request_finished(record)
        if outcome.status is None and outcome.transport_error in UNSENT:
            return
        try:
            self._queue.record_request(record)
        except DB_ERRORS as exc:
            self._log.warning("request_log_failed", detail=str(exc))

    # --- finishing ---------------------------------------------------------------------

    async def _publish(
        self,
        job: Job,
        staged: list[Path],
        log: BoundLogger,
        *,
        from_cache: bool,
        entry: dict[str, Any] | None = None,
    ) -> None:
        record = entry or {"at": self._clock(), "status": 200, "cached": True}
        if self._queue.superseded(job):
            # Newer content was dropped under this name meanwhile: its result, not this
            # stale one, belongs in the outbox.
            _unlink_all(staged)
            self._queue.mark_published(job.id, "", record)
            log.info("output_superseded")
            self.finish_published(self._queue.get(job.id) or job)
            return
        where = await self._source_state(job)
        if where in ("gone", "changed"):
            # Deleted, replaced or renamed (its folder too) while the answer was on its way:
            # no output under a name the user no longer uses; the answer is in the cache.
            _unlink_all(staged)
            self._cancel(job, where, log, paid=not from_cache)
            return
        # Every output of the recipe, each placed atomically; the input is disposed of
        # only once all are (a crash in between: the job is still in flight, and the set
        # is rendered again from the cached matte after the restart, no new request).
        if not self._still_ours(job, log):
            _unlink_all(staged)
            return
        specs = recipe_from_json(job.recipe)
        names = self._queue.claim_outputs(job.rel_path, output_name_sets(job.rel_path, specs), output_key)
        for i, (path, out_rel) in enumerate(zip(staged, names, strict=True)):
            try:
                self._publisher.place_output(path, out_rel)
            except OSError as exc:
                _unlink_all(staged[i:])
                if exc.errno in DISK_ERRNOS:
                    raise
                self._output_failed(job, out_rel, exc, log)
                return
            log.info("output_written", output=out_rel, cached=from_cache)
        self._queue.mark_published(job.id, names[0], record)
        self._recorder.file_finished("reused" if from_cache else "published")
        self.finish_published(self._queue.get(job.id) or job)

    def _still_ours(self, job: Job, log: BoundLogger) -> bool:
        """The shared queue: does this daemon still hold the job's lease? Asked before an
        act on the file system that another daemon would repeat (outputs, the input's
        move): one cut off from the database for longer than its lease lost the job to
        another daemon of the site, which does it. Always True for the SQLite queue."""
        if self._shared is None or self._shared.holds_lease(job.id):
            return True
        log.warning("job_lease_lost", reason="taken over by another daemon of the site")
        return False

    def _outbox_problem(self) -> str | None:
        """Why nothing at all can be written to the outbox (read-only, not writable,
        gone; its staging folder, where every answer and output is written first, the
        same), or None."""
        outbox = self._layout.outbox
        staging = self._layout.staging(outbox)
        try:
            if os.statvfs(outbox).f_flag & os.ST_RDONLY:
                return f"the outbox {outbox} is on a read-only file system"
        except OSError as exc:
            return f"the outbox {outbox}: {exc.strerror or exc}"
        for folder in (outbox, staging):
            if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
                return f"{folder} is not writable"
        return None

    def _output_failed(self, job: Job, out_rel: str, exc: OSError, log: BoundLogger) -> None:
        """An output could not be placed. When nothing can be written to the outbox the
        queue pauses (``outbox_unwritable``, resumed when it can); otherwise this one output
        is the problem (a folder named like it, a subfolder without write permission): an
        attempt with backoff, other files go on, and after ``max_attempts`` the input is
        quarantined. Each retry republishes from the result cache, without a request."""
        problem = self._outbox_problem()
        if problem is not None:
            self._queue.release(job.id)
            self._pause(code="outbox_unwritable", status=None, detail=problem)
            return
        reason = errno.errorcode.get(exc.errno or 0, "error")
        detail = f"cannot write the output outbox/{out_rel}: {reason}: {exc.strerror or exc}"
        self._attempt_failed(job, OUTPUT_UNWRITABLE, detail, log)

    def _attempt_failed(self, job: Job, code: str, detail: str, log: BoundLogger) -> None:
        """A step of ours failed for this one file (an output it cannot place, a proxy or
        a render that failed): an attempt with backoff, other files go on, and after
        ``max_attempts`` the input is quarantined (``source: "local"``)."""
        attempt = self._queue.record_attempt(job.id)
        entry: dict[str, Any] = {"attempt": attempt, "at": self._clock(), "status": None}
        entry.update(code=code, detail=detail)
        policy = retry_policy(self.settings)
        if attempt >= policy.max_attempts:
            refuse = Refuse(status=0, code=code, detail=f"gave up after {attempt} attempts: {detail}")
            self._quarantine(job, refuse, entry, attempt, log, source="local")
            return
        delay = backoff_delay(attempt, policy, self._rng.random())
        self._queue.retry_later(job.id, at=self._clock() + delay, entry=entry)
        log.warning("retry_scheduled", attempt=attempt, code=code, detail=detail, delay_s=round(delay, 2))

    def finish_published(self, job: Job) -> None:
        """Move the input away after its output is durable (also at start-up and after each
        rescan), if it is still the content the output was made from
        (:meth:`Publisher.dispose_input`). The job waits in ``published`` while the inbox
        is away (NAS offline), while the input cannot be moved (EACCES, EPERM, EBUSY:
        reported once, tried again after the next rescan) and while the disk is full (the
        queue pauses)."""
        if inbox_problem(self._layout.inbox) is not None:
            self._log.warning("input_dispose_deferred", file=job.rel_path, reason="inbox unavailable")
            return
        if not self._still_ours(job, self._log.bind(file=job.rel_path)):
            return
        try:
            what = self._publisher.dispose_input(
                job.rel_path,
                job.sha256,
                job.identity,
                held_as=job.held_as,
                hold=lambda held_as: self._queue.set_held(job.id, held_as),
            )
        except OSError as exc:
            self._move_failed(job, exc, "input_dispose_failed")
            return
        self._move_failures.pop(job.id, None)
        self._queue.mark_done(
            job.id, archived_as=what.removeprefix("archived:") if what.startswith("archived:") else None
        )
        self._drop_spool(job.sha256)
        self._log.info("input_disposed", file=job.rel_path, sha256=job.sha256, result=what)
        if what.startswith("changed:"):
            self._notice(what.removeprefix("changed:"))  # other content: its own job

    def held_found(self, held_path: str) -> None:
        """A held input (``.dropcut-held-…``) was seen in the inbox. Unless a job is
        disposing of it right now, it was left by a crash in a folder that was renamed
        meanwhile: it gets its name back (never over another file), to be looked at anew."""
        try:
            if self._queue.holds(held_path):
                return
        except UNAVAILABLE as exc:  # (only the shared queue raises these) looked at again later
            self._db_failed(exc, "held file")
            return
        try:
            back = self._publisher.restore_held(held_path)
        except OSError as exc:
            self._log.warning("held_restore_failed", file=held_path, reason=exc.strerror or str(exc))
            return
        if back is not None:
            self._log.warning("held_file_restored", file=back, held_as=held_path)
            self._notice(back)

    def resume_quarantine(self, job: Job) -> None:
        """Finish a quarantine that a crash or a failed move interrupted (its intent and
        error are in the queue), unless the inbox is away or the move fails again."""
        if inbox_problem(self._layout.inbox) is not None:
            self._log.warning("quarantine_deferred", file=job.rel_path, reason="inbox unavailable")
            return
        try:
            self.finish_quarantine(job, self._queue.job_error(job.id) or {})
        except OSError as exc:
            self._move_failed(job, exc, "quarantine_failed")
            return
        self._move_failures.pop(job.id, None)

    def finish_pending(self) -> None:
        """Finish what had to wait: input moves and quarantines (at start-up, after each
        rescan, when the inbox or disk space comes back). The shared queue: what no other
        living daemon of the site is finishing; its database away, tried again later."""
        if self._shared is None:
            for job in self._queue.published_jobs():
                self.finish_published(job)
            for job in self._queue.quarantining_jobs():
                self.resume_quarantine(job)
            return
        try:
            for job in self._queue.published_jobs():
                self.finish_published(job)
            for job in self._queue.quarantining_jobs():
                self.resume_quarantine(job)
        except UNAVAILABLE as exc:
            self._db_failed(exc, "finish pending")

    def _move_failed(self, job: Job, exc: OSError, event: str) -> None:
        """A move out of the inbox failed: a full disk pauses the queue; anything else
        (permissions, a locked file on SMB) is reported once per job and reason, and the
        job keeps its state until :meth:`finish_pending` tries again."""
        if exc.errno in DISK_ERRNOS:
            self._disk_full(job, Path(str(exc.filename or self._layout.archive)), str(exc.strerror))
            return
        reason = f"{errno.errorcode.get(exc.errno or 0, 'error')}: {exc.strerror or exc}"
        level = "debug" if self._move_failures.get(job.id) == reason else "warning"
        self._move_failures[job.id] = reason
        getattr(self._log, level)(
            event, file=job.rel_path, sha256=job.sha256, reason=reason, retry="after the next rescan"
        )

    def _quarantine(
        self,
        job: Job,
        decision: Refuse,
        entry: dict[str, Any],
        attempt: int,
        log: BoundLogger,
        *,
        source: str = "api",
    ) -> None:
        error = {
            "status": decision.status,
            "code": decision.code,
            "detail": decision.detail,
            "source": source,
        }
        if not self._still_ours(job, log):  # (the shared queue: another daemon has it now)
            return
        try:
            placed = self.finish_quarantine(job, error, entry=entry, attempts=attempt)
        except OSError as exc:
            # Before the intent was recorded the job is still in flight: back to the queue.
            # After it, the job is ``quarantining`` and finish_pending completes the move.
            self._queue.release(job.id)
            self._move_failed(job, exc, "quarantine_failed")
            return
        self._recorder.file_finished("quarantined")
        self._alerts.emit(
            notify.file_quarantined(
                job.rel_path, decision.code, decision.detail, status=decision.status, now=self._clock()
            )
        )
        log.warning(
            "file_quarantined",
            status=decision.status,
            code=decision.code,
            detail=decision.detail,
            attempt=attempt,
            quarantined_as=placed,
            source=source,
        )

    def finish_quarantine(
        self,
        job: Job,
        error: dict[str, Any],
        *,
        entry: dict[str, Any] | None = None,
        attempts: int | None = None,
    ) -> str | None:
        """Quarantine a job's input. The refusal is committed before anything is written
        (a quarantine folder that fails us leaves the job ``quarantining`` for
        :meth:`finish_pending`, never queued to be sent again), and the chosen name before
        the file moves, so a restart (``entry`` None, ``error`` as stored) finishes it
        without a second copy."""
        history = [*job.history, entry] if entry is not None else job.history
        if entry is not None:
            self._queue.mark_quarantining(job.id, {**error, "quarantined_as": None}, entry)

        def intent(q_rel: str) -> None:
            self._queue.mark_quarantining(job.id, {**error, "quarantined_as": q_rel}, None)

        placed = self._publisher.quarantine_input(
            rel_path=job.rel_path,
            sha256=job.sha256,
            size=job.size,
            identity=job.identity,
            error={k: v for k, v in error.items() if k != "quarantined_as"},
            attempts=job.attempts if attempts is None else attempts,
            first_seen=job.first_seen,
            history=history,
            spool=self._layout.spool_file(job.sha256) if job.sha256 else None,
            q_rel=None if entry is not None else error.get("quarantined_as"),
            before_move=intent,
        )
        self._queue.mark_quarantined(job.id, {**error, "quarantined_as": placed})
        self._move_failures.pop(job.id, None)
        self._drop_spool(job.sha256)
        return placed

    def _drop_spool(self, sha256: str) -> None:
        """The spooled input and its proxies, once no job needs them."""
        try:
            needed = not sha256 or self._queue.sha_still_needed(sha256)  # ("": refused before hashing)
        except UNAVAILABLE:  # (the shared queue) swept at the next start
            return
        if not needed:
            for path in (self._layout.spool_file(sha256), *self._layout.spool_dir.glob(f"{sha256}.proxy-*")):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def _space_is_back(self) -> bool:
        """Room again for the next queued image on every folder we write to?"""
        job = self._queue.peek()
        return self._short_of_space(self._layout.spool_file(job.sha256) if job else None) is None

    # --- account ---------------------------------------------------------------------------

    async def credit_loop(self) -> None:
        """Check ``/available-credit`` at start and every interval; resume a pause the
        account no longer justifies."""
        while not self._stopping:
            await self.check_credit()
            self._credit_wake.clear()
            try:
                await asyncio.wait_for(
                    self._credit_wake.wait(), timeout=self.settings.credit_check_interval_seconds
                )
            except TimeoutError:
                pass

    async def condition_loop(self) -> None:
        """Re-check a local pause (disk full, outbox unwritable) every
        ``DISK_CHECK_SECONDS`` while it lasts, and resume when it is gone; idle otherwise
        (a new pause wakes it at once)."""
        while not self._stopping:
            self._condition_wake.clear()
            paused = self.paused
            code = paused.get("code") if paused is not None else None
            timeout: float | None = None
            if code in LOCAL_PAUSES:
                try:
                    gone = self._local_condition_gone(str(code))
                except UNAVAILABLE as exc:  # (the shared queue) looked at again in a while
                    self._db_failed(exc, "local pause")
                    gone = False
                if gone:
                    self._resume("disk_space_available" if code == "disk_full" else "outbox_writable")
                    self.finish_pending()
                    continue
                timeout = DISK_CHECK_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._condition_wake.wait(), timeout=timeout)

    def _local_condition_gone(self, code: str) -> bool:
        if code == "disk_full":
            return self._space_is_back()
        return self._outbox_problem() is None

    async def check_credit(self) -> None:
        applied = self._applied
        credit = await self._client.available_credit()
        if credit.outcome is not None:
            o = credit.outcome
            self._log.warning(
                "credit_check_failed",
                status=o.status,
                detail=o.detail,
                transport_error=o.transport_error.value if o.transport_error else None,
            )
            # the key is refused (not an old key a reload replaced meanwhile): no image
            # request would do better
            if o.status == 401 and applied == self._applied:
                detail = o.detail or "the API refused the key"
                self._pause(code=Code.INVALID_API_KEY, status=401, detail=detail)
            return
        self.last_credit = credit.credit
        record = {
            "credit": credit.credit,
            "expiration_date": credit.expiration_date,
            "checked_at": self._clock(),
        }
        if self._shared is None:
            self._queue.set_meta("credit", record)
        else:
            try:
                self._queue.set_meta("credit", record)
            except UNAVAILABLE as exc:
                self._db_failed(exc, "credit")
        self._log.info("credit_checked", credit=credit.credit, expiration_date=credit.expiration_date)
        low = (credit.credit or 0) < self.settings.credit_warn_below
        if low and not self._low_credit:
            self._log.warning("credit_low", credit=credit.credit, warn_below=self.settings.credit_warn_below)
            warn_below = self.settings.credit_warn_below
            self._alerts.emit(notify.credit_low(credit.credit, warn_below, now=self._clock()))
        self._low_credit = low
        paused = self.paused
        account_pause = paused is not None and paused.get("code") not in LOCAL_PAUSES
        if account_pause and credit.usable and not _expired(credit.expiration_date, self._clock()):
            self._resume("account_usable")


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62  # unknown: do not pause on it


def _expired(expiration: str | None, now: float) -> bool:
    if not expiration:
        return False
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            when = datetime.strptime(expiration, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        if fmt == "%Y-%m-%d":
            return when.timestamp() + 86400 <= now
        return when.timestamp() <= now
    return False
