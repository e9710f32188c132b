"""The daemon's lifecycle: start-up → main loop → shutdown, and the wiring of the stages.

Signals only set flags: SIGTERM/SIGINT ask to stop, SIGHUP asks to reload; the main loop
acts on them. Start-up opens the queue, finishes what a crash interrupted, starts the
watch, queues the start-up scan, and only then tells systemd READY=1.

Blocking file-system work runs on daemon threads (:class:`DaemonThreadExecutor`, also the
event loop's default executor): on a hung network mount a stat() never returns, and a stop
must not wait for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import queue
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import httpx
import structlog

from dropcut import __version__
from dropcut.admit import Admission
from dropcut.cache import ResultCache
from dropcut.client import WithoutBG
from dropcut.clock import RunClock
from dropcut.conditions import Observed
from dropcut.console import ConsoleOutput, StatusLine
from dropcut.dispatch import LOCAL_PAUSES, Dispatcher
from dropcut.logs import Redactor, set_log_level
from dropcut.metrics import Metrics
from dropcut.monitor import Monitor, held_detail, held_seconds
from dropcut.notify import Notifications, NotifyOptions
from dropcut.overview import Overview
from dropcut.pace import Pacer
from dropcut.paths import STAGING_DIR, Layout
from dropcut.pgcache import PgResultCache
from dropcut.pgpace import SharedPacer
from dropcut.pgqueue import UNAVAILABLE, PgJobQueue, Queue, QueueHealth, open_shared
from dropcut.pgschema import key_id
from dropcut.produce import Producer
from dropcut.publish import Publisher
from dropcut.queue import JobQueue, connect
from dropcut.settings import ConfigError, Settings, load_settings
from dropcut.settle import is_ignored_dir
from dropcut.systemd import Notifier
from dropcut.watch import InboxWatcher, ObserverFactory, detect_mode, inbox_problem, scan, watch_error_reason
from dropcut.web import StatusServer, serve, snapshot

HEALTH_SECONDS = 2.0
STATUS_SECONDS = 2.0
INSPECTORS = 2
SHA_NAME = re.compile(r"^([0-9a-f]{64})(\.proxy-\d+)?$")  # a spooled input, or its proxy
WATCH_STOP_SECONDS = 2.0  # at shutdown, how long to wait for the watch threads to end
THREADS_STOP_SECONDS = 1.0  # at exit, how long to wait for file-system calls still running
IO_THREADS = 32  # file-system calls at once (as asyncio's default executor allows)
# The shared queue: a staging file in the (shared) outbox older than this is a crash's
# leftover; a younger one may be another daemon's of the site, being written.
SHARED_STAGING_SWEEP_SECONDS = 3600.0

P = ParamSpec("P")
T = TypeVar("T")


class AlreadyRunning(Exception):
    """Another dropcut holds the lock on this state folder."""


def layout_of(settings: Settings) -> Layout:
    return Layout.of(settings)


class DaemonThreadExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs calls on up to ``max_threads`` daemon threads (started as needed, each then
    taking calls from one queue); :meth:`shutdown` waits for calls still running at most
    ``shutdown_wait`` seconds, then leaves them behind.

    On a hung network mount (NFS, SMB) a stat() or scandir() of the inbox never returns.
    Run on asyncio's default executor, such a call would make ``asyncio.run`` wait for it
    forever at exit (``shutdown_default_executor``), and the interpreter's exit joins the
    executor's threads anyway: SIGTERM would never end the process. A daemon thread does
    not hold up the exit. It is a ``ThreadPoolExecutor`` only because asyncio's
    ``set_default_executor`` wants one; none of its pool is used.
    """

    def __init__(self, shutdown_wait: float = THREADS_STOP_SECONDS, max_threads: int = IO_THREADS) -> None:
        super().__init__(max_workers=1)
        self._shutdown_wait = shutdown_wait
        self._max_threads = max_threads
        self._guard = threading.Lock()
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._idle = 0  # workers waiting for a call
        self._closed = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller, like ThreadPoolExecutor
                future.set_exception(exc)
            else:
                future.set_result(result)

        with self._guard:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._calls.put(call)
            if self._idle == 0 and len(self._workers) < self._max_threads:
                worker = threading.Thread(
                    target=self._work, name=f"dropcut-io-{len(self._workers) + 1}", daemon=True
                )
                worker.start()  # (raises if it cannot: the call waits for a running worker)
                self._workers.append(worker)
            else:
                self._idle -= 1  # an idle worker takes it; count it busy now
        return future

    def _work(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            call()
            with self._guard:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._guard:
            self._closed = True
            workers = list(self._workers)
        for _ in workers:
            self._calls.put(None)
        if wait:
            deadline = time.monotonic() + self._shutdown_wait
            for worker in workers:
                worker.join(max(0.0, deadline - time.monotonic()))


class Daemon:
    """One running dropcut. Build it with the settings, then :meth:`run`."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: Path | None = None,
        redactor: Redactor | None = None,
        notifier: Notifier | None = None,
        console: ConsoleOutput | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        observer_factory: ObserverFactory | None = None,
        mountinfo: Path = Path("/proc/self/mountinfo"),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.layout = layout_of(settings)
        self._config_path = config_path
        self._redactor = redactor or Redactor()
        self._notifier = notifier or Notifier()
        self._console = console  # log_format = "console": the status line goes there
        self._status: StatusLine | None = None
        self._transport = transport
        self._observer_factory = observer_factory
        self._mountinfo = mountinfo
        # Wall-clock seconds that never step within this run (stored times stay wall-clock
        # times): a clock stepped back must not stall the pacer, the holds and the retries.
        self._clock = RunClock(wall=clock)
        self._log = structlog.get_logger()
        self._stop_requested = False
        self._reload_requested = False
        self._wake_main: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watcher: InboxWatcher | None = None
        self._watch_mode = "native"
        self._degraded: str | None = None
        self._lock_fd: int | None = None
        self._exit_code = 0
        self._probing: asyncio.Future[str | None] | None = None
        self._threads = DaemonThreadExecutor()
        self._rescan_wake = asyncio.Event()  # the rescan interval may have changed
        self._rewatch = False  # rebuild the watch (a reload changed the poll interval)
        self.metrics: Metrics | None = None  # counted by the stages, read by /metrics
        self.http: StatusServer | None = None  # the status page and /metrics (http_listen)
        self.started = False
        # The shared queue (queue_url): its database's health (the condition
        # queue_unavailable), and the status page's own long-lived connection to it.
        self.queue_health = QueueHealth(self._clock)
        self._web_queue: PgJobQueue | None = None
        self._held: list[tuple[str, int]] = []  # the held folders last read

    # --- entry points ----------------------------------------------------------------

    def run(self) -> int:
        # asyncio.run(), except that the loop's default executor (asyncio.to_thread, in
        # every stage) is the daemon-thread one: a call hung on the inbox cannot hold up
        # the exit.
        with asyncio.Runner() as runner:
            runner.get_loop().set_default_executor(self._threads)
            return runner.run(self.serve())

    def _in_thread(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` (file-system work on the inbox, which may hang) on a daemon thread."""
        return asyncio.get_running_loop().run_in_executor(self._threads, fn)

    def request_stop(self) -> None:
        self._stop_requested = True
        if self._wake_main is not None:
            self._wake_main.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        if self._wake_main is not None:
            self._wake_main.set()

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._wake_main = asyncio.Event()
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread (tests)
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        self._lock()  # a second instance stops here, before it logs anything
        try:
            try:
                await self._startup()
            except UNAVAILABLE as exc:
                # The shared queue's database cannot be reached at start: exit 1, and
                # systemd starts the daemon again (Restart=on-failure) until it can.
                self._log.error("daemon_start_failed", reason=str(exc), queue=self.settings.queue_url)
                self._exit_code = 1
            else:
                await self._main_loop()
        finally:
            await self._shutdown()
        return self.exit_code

    # --- start-up ---------------------------------------------------------------------

    async def _startup(self) -> None:
        s = self.settings
        key = s.resolve_api_key()
        if key is None:
            raise ConfigError("no API key")
        self._api_key = key
        self._redactor.set_secrets(*self._secrets())  # the key, and the status page's token
        self.queue: Queue
        shared: PgJobQueue | None = None
        if s.queue_url:
            shared = open_shared(s, api_key=key.get_secret_value(), clock=self._clock)
            shared.health = self.queue_health
            self.queue = shared
            self._log.info("queue_opened", url=shared.display_url, site=s.site, daemon=shared.daemon_id)
        else:
            self.queue = JobQueue(connect(self.layout.database), clock=self._clock)
        requeued, published = self.queue.recover()
        if shared is not None:
            shared.started(version=__version__)
            self._web_queue = open_shared(s, api_key=key.get_secret_value(), clock=self._clock, role="web")
        # the status page and /metrics: bound now, so that a taken port stops the start
        self.metrics = Metrics(
            overview=self._overview if shared is not None else lambda: snapshot(self.settings),
            watch=lambda: (self._watch_mode, self._watcher is not None and self._degraded is None),
            version=__version__,
        )
        self.http = serve(
            s,
            current=lambda: self.settings,
            metrics=self.metrics,
            scrub=self._redactor.scrub_text,
            shared=self._web_queue,
        )
        self.publisher = Publisher(self.layout, on_success=s.on_success, clock=self._clock)
        swept = self.publisher.prepare() if shared is None else self._prepare_shared()
        self.layout.spool_dir.mkdir(parents=True, exist_ok=True)
        orphans = self._sweep_spool()
        self.cache: ResultCache | PgResultCache
        self.pacer: Pacer | SharedPacer
        if shared is not None:
            self.cache = PgResultCache(self.layout.cache_dir, max_bytes=s.result_cache_bytes, queue=shared)
            self.pacer = self._shared_pacer(shared, key.get_secret_value())
        else:
            self.cache = ResultCache(self.layout.cache_dir, max_bytes=s.result_cache_bytes)
            self.pacer = Pacer(
                limit=s.rate_limit_requests,
                period=s.rate_limit_period_seconds,
                margin=s.rate_margin(),
                clock=self._clock,
                history=self.queue.load_slots(),
                on_change=self.queue.save_slots,
            )
        self.client = WithoutBG(
            s.api_url,
            key,
            timeout=s.request_timeout_seconds,
            max_connections=s.max_in_flight,
            transport=self._transport,
        )
        self.producer = Producer()
        self.notifications = Notifications(
            NotifyOptions.of(s), secrets=self._secrets(), clock=self._clock
        )
        self.notifications.start()
        self.dispatcher = Dispatcher(
            s,
            layout=self.layout,
            queue=self.queue,
            client=self.client,
            pacer=self.pacer,
            publisher=self.publisher,
            cache=self.cache,
            clock=self._clock,
            notice=lambda rel_path: self.admission.notice(rel_path),
            producer=self.producer,
            recorder=self.metrics,
            alerts=self.notifications,
            health=self.queue_health,
        )
        if isinstance(self.pacer, SharedPacer):
            await self.pacer.start()
        # Input moves and quarantines a crash interrupted; one that fails (EPERM, a full
        # disk) is reported and waits for a later rescan, it never stops the start.
        self.dispatcher.finish_pending()
        self._watch_mode, reason, fstype = detect_mode(s.watch_mode, s.inbox, self._mountinfo)
        self.admission = Admission(
            s,
            queue=self.queue,
            publisher=self.publisher,
            spool_dir=self.layout.spool_dir,
            on_queued=self.dispatcher.wake,
            on_held=self.dispatcher.held_found,
            min_observations=self._min_observations(),
            clock=self._clock,
            recorder=self.metrics,
            alerts=self.notifications,
        )
        self.monitor = Monitor(
            s,
            queue=self.queue,
            observe=self._conditions,
            in_flight=lambda: self.dispatcher.in_flight,
            clock=self._clock,
            more_work=self.dispatcher.wake,  # approved or retried from the command line
            alerts=self.notifications,
        )
        self._log.info("watch_mode_chosen", mode=self._watch_mode, reason=reason, fstype=fstype)
        self._start_watch()
        found = await self._rescan()
        self._log.info(
            "daemon_started",
            version=__version__,
            pid=os.getpid(),
            inbox=str(s.inbox),
            outbox=str(s.outbox),
            requeued=requeued,
            finished=len(published),
            staging_swept=sum(swept.values()),
            spool_swept=orphans,
            found=found,
            paused=(self.dispatcher.paused or {}).get("code"),
        )
        for coro in (
            self.admission.settle_loop(),
            *(self.admission.inspect_loop() for _ in range(INSPECTORS)),
            self.dispatcher.credit_loop(),
            self.dispatcher.condition_loop(),
            self._rescan_loop(),
            self._health_loop(),
            self._heartbeat(),
            self.monitor.run(),
            *([self._lease_loop()] if shared is not None else []),
        ):
            self._spawn(coro)
        self._spawn(self.dispatcher.run(), name="dispatch")
        self.started = True
        self._notifier.ready()
        self._notifier.status(self.status_line())
        if self._console is not None:  # read from its own thread: the cached summary only
            self._status = StatusLine(lambda: self.monitor.summary, self._console)
            self._status.start()

    def _shared_pacer(self, shared: PgJobQueue, api_key: str) -> SharedPacer:
        """The rate limit of the API key, shared by every daemon on it (issue 13)."""
        s = self.settings
        return SharedPacer(
            shared.conninfo,
            key_id=key_id(api_key),
            limit=s.rate_limit_requests,
            period=s.rate_limit_period_seconds,
            margin=s.rate_margin(),
            lease_seconds=s.lease_seconds,
            owner=shared.daemon_id,
            site=s.site,
            version=__version__,
            on_state=lambda state: self.dispatcher.shared_state(state),
        )

    def _prepare_shared(self) -> dict[str, int]:
        """:meth:`Publisher.prepare` for the shared queue: the outbox, quarantine and
        archive may be shared by the site's other daemons, whose staging files being
        written must not be swept; only those older than an hour are."""
        swept = {}
        cutoff = time.time() - SHARED_STAGING_SWEEP_SECONDS
        for root in self.layout.output_roots():
            root.mkdir(parents=True, exist_ok=True)
            removed = 0
            staging = root / STAGING_DIR
            if staging.is_dir() and not staging.is_symlink():
                for entry in os.scandir(staging):
                    with contextlib.suppress(OSError):
                        if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
            swept[str(root)] = removed
        return swept

    async def _lease_loop(self) -> None:
        """The shared queue: renew this daemon's leases every ``lease_seconds / 3`` (and
        its heartbeat); jobs whose daemon is gone (its lease expired) come back to the
        queue, and the dispatcher is woken for them. Runs on the event loop, between two
        of its steps: a job claimed is always among those the dispatcher holds."""
        queue = self.queue
        assert isinstance(queue, PgJobQueue)
        outages = self.queue_health.outages
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            try:
                back = queue.renew_leases(self.dispatcher.holding())
                queue.heartbeat(version=__version__)
                abandoned = queue.abandoned()
            except UNAVAILABLE as exc:
                self.queue_health.failed(exc)
                continue
            if self.queue_health.outages != outages:
                # The database was away: the input moves and quarantines it interrupted
                # (their jobs still this daemon's) are finished now.
                outages = self.queue_health.outages
                abandoned += 1
            if back:
                self._log.info("jobs_taken_over", jobs=back)
                self.dispatcher.wake()
            if abandoned:  # inputs not moved away (a gone daemon's, or after an outage): now
                self.dispatcher.finish_pending()

    def _overview(self) -> Overview:
        """The metrics' overview with the shared queue (the status page's connection); its
        database away: the daemon's last one, with the conditions holding now."""
        try:
            return snapshot(self.settings, shared=self._web_queue)
        except UNAVAILABLE as exc:
            last = self.monitor.overview if hasattr(self, "monitor") else None
            if last is None:
                raise sqlite3.OperationalError(str(exc)) from None  # (left out of the scrape)
            return last

    def _secrets(self) -> list[str | None]:
        """What no message may carry: the API key, the status page's token."""
        token = self.settings.resolve_http_token()
        return [self._api_key.get_secret_value(), token.get_secret_value() if token else None]

    def _min_observations(self) -> int:
        return 2 if self._watch_mode == "poll" else 1

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        task = asyncio.create_task(self._guard(coro), name=name)
        self._tasks.append(task)

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        """A stage that crashes is logged and takes the daemon down cleanly (systemd
        restarts it) instead of leaving a half-alive process."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log.exception("stage_crashed", stage=getattr(coro, "__qualname__", "?"))
            self._exit_code = 1
            self.request_stop()

    def _lock(self) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.layout.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"another dropcut uses {self.settings.state_dir}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _sweep_spool(self) -> int:
        removed = 0
        for entry in os.scandir(self.layout.spool_dir):
            spooled = SHA_NAME.match(entry.name)
            if spooled and self.queue.sha_still_needed(spooled.group(1)):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
        return removed

    # --- watching ----------------------------------------------------------------------

    def _report(self, rel: str, is_dir: bool) -> None:
        """Called from the observer thread."""
        loop = self._loop
        if is_dir:
            loop.call_soon_threadsafe(self._spawn_dir_scan, rel)
        else:
            loop.call_soon_threadsafe(self.admission.notice, rel)

    def _spawn_dir_scan(self, rel: str) -> None:
        # A folder created (or moved in) after start: files may have landed in it before
        # its watch existed.
        if not is_ignored_dir(rel, self.settings.ignore_dirs):
            self._spawn(self._scan_dir(rel))

    async def _scan_dir(self, rel: str) -> None:
        for path in await self._in_thread(lambda: self._list(rel)):
            self.admission.notice(path)

    def _list(self, rel_dir: str = "") -> list[str]:
        dirs = self.settings.ignore_dirs
        return list(scan(self.settings.inbox, lambda d: is_ignored_dir(d, dirs), rel_dir))

    def _start_watch(self) -> None:
        self._loop = asyncio.get_running_loop()
        watcher = InboxWatcher(
            self.settings.inbox,
            mode=self._watch_mode,
            poll_interval=self.settings.poll_interval_seconds,
            report=self._report,
            observer_factory=self._observer_factory,
        )
        try:
            watcher.start()
        except OSError as exc:
            reason = watch_error_reason(exc)
            watcher.stop()
            if self._watch_mode == "native":
                self._log.warning("watch_degraded", reason=reason, fallback="poll")
                self._watch_mode = "poll"
                self.admission.apply(self.settings, min_observations=2)
                watcher = InboxWatcher(
                    self.settings.inbox,
                    mode="poll",
                    poll_interval=self.settings.poll_interval_seconds,
                    report=self._report,
                    observer_factory=self._observer_factory,
                )
                watcher.start()
            else:
                raise
        self._watcher = watcher
        self._rewatch = False
        self._log.info("watch_started", mode=self._watch_mode)

    async def _rescan(self) -> int:
        self.admission.forget_reports()
        paths = await self._in_thread(self._list)
        for rel in paths:
            self.admission.notice(rel)
        return len(paths)

    async def _rescan_loop(self) -> None:
        last = time.monotonic()
        while True:
            wait = last + self.settings.rescan_interval_seconds - time.monotonic()
            if wait > 0:
                # a reload wakes this up: a shorter interval counts from the last rescan
                self._rescan_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._rescan_wake.wait(), wait)
                continue
            last = time.monotonic()
            if self._degraded is None:
                found = await self._rescan()
                self._log.debug("rescan_done", found=found)
                # The inbox just answered a full scan: try again the input moves that
                # failed (EACCES, EPERM, EBUSY on a share).
                self.dispatcher.finish_pending()

    async def _health_loop(self) -> None:
        """Notice a dead observer or a vanished inbox; rebuild the watch when it is back."""
        while True:
            await asyncio.sleep(HEALTH_SECONDS)
            try:
                await self._check_watch()
            except Exception:  # one bad tick must not end the health checks
                self._log.exception("watch_check_failed")

    async def _check_watch(self) -> None:
        """Also rebuilds a healthy watch when a reload asked for it (``_rewatch``): only
        this task replaces the watcher once the daemon runs."""
        watcher = self._watcher
        if watcher is None:
            problem: str | None = "not watching"
        else:
            problem = await self._probe(watcher.problem)
        if problem is None and not self._rewatch:
            return
        if problem is not None and self._degraded != problem:
            self._log.warning("watch_degraded", reason=problem, action="waiting for the inbox")
            self._degraded = problem
        if watcher is not None:
            await self._in_thread(watcher.stop)
            self._watcher = None
        if await self._probe(lambda: inbox_problem(self.settings.inbox)) is not None:
            return
        try:
            self._start_watch()
        except OSError as exc:
            self._log.warning("watch_degraded", reason=watch_error_reason(exc))
            return
        found = await self._rescan()
        if self._degraded is None:
            self._log.info(
                "watch_restarted",
                mode=self._watch_mode,
                poll_interval_s=self.settings.poll_interval_seconds,
                found=found,
            )
        else:
            self._log.info("watch_restored", mode=self._watch_mode, found=found)
        self._degraded = None
        self.dispatcher.finish_pending()

    async def _probe(self, check: Callable[[], str | None]) -> str | None:
        """Run a file-system check in a daemon thread: on a hung network mount stat()
        blocks, and that must stall neither the event loop, nor (by piling up) the threads,
        nor the exit. One probe at a time: a hung one is waited on again, not repeated."""
        if self._probing is None or self._probing.done():
            self._probing = self._in_thread(check)
        done, _ = await asyncio.wait({self._probing}, timeout=HEALTH_SECONDS * 5)
        if not done:
            return "inbox not responding (hung network mount?)"
        return self._probing.result()

    # --- main loop ---------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Runs on the event loop: if the loop hangs, systemd stops hearing WATCHDOG=1."""
        interval = self._notifier.watchdog_interval()
        last_status = 0.0
        while True:
            if interval is not None:
                self._notifier.watchdog()
            now = time.monotonic()
            if now - last_status >= STATUS_SECONDS:
                self._notifier.status(self.status_line())
                last_status = now
            await asyncio.sleep(min(interval or STATUS_SECONDS, STATUS_SECONDS))

    async def _main_loop(self) -> None:
        assert self._wake_main is not None
        while not self._stop_requested:
            await self._wake_main.wait()
            self._wake_main.clear()
            if self._reload_requested and not self._stop_requested:
                self._reload_requested = False
                await self._reload()

    async def _reload(self) -> None:
        self._notifier.reloading()
        self._log.info("reload_started")
        try:
            new = load_settings(self._config_path)
            key = new.resolve_api_key()
        except ConfigError as exc:
            self._log.error("reload_failed", error=str(exc))
            self._notifier.ready()
            return
        changed = [k for k in type(new).model_fields if getattr(new, k) != getattr(self.settings, k)]
        needs_restart = self.settings.restart_changes(new)
        if needs_restart:
            self._log.error("reload_refused", keys=needs_restart, reason="changing these needs a restart")
        elif key is None:
            self._log.error("reload_refused", keys=["api_key"], reason="no API key in the new configuration")
        else:
            # Every key not in RESTART_KEYS must be put in force here (or be read from
            # ``settings`` at each use by the daemon, dispatcher or admission).
            old, self.settings = self.settings, new
            # (the old key too: a request still in flight was sent with it)
            old_key, self._api_key = self._api_key, key
            self._redactor.set_secrets(*self._secrets(), old_key.get_secret_value())
            self.client.set_api_key(key)
            if key.get_secret_value() != old_key.get_secret_value():
                self._new_key_shared(key.get_secret_value())
            self.publisher.on_success = new.on_success
            self.cache.max_bytes = new.result_cache_bytes
            with contextlib.suppress(OSError):  # the next store evicts again
                self.cache.evict()
            self.dispatcher.apply(new)
            self.admission.apply(new, min_observations=self._min_observations())
            self.monitor.apply(new)
            self.notifications.apply(NotifyOptions.of(new), secrets=self._secrets())
            self._rescan_wake.set()
            if self._watch_mode == "poll" and new.poll_interval_seconds != old.poll_interval_seconds:
                self._rewatch = True  # the health check rebuilds the watch with it
            self._log.info("config_reloaded", changed=changed)
            if new.log_level != old.log_level:
                set_log_level(new.log_level)  # after the line above, which the admin wants
        self._notifier.ready()

    def _new_key_shared(self, api_key: str) -> None:
        """The shared queue and a new API key: its request log, and its rate window (a
        shared pacer of the new key; the old one finishes the requests in flight)."""
        queue = self.queue
        if not isinstance(queue, PgJobQueue):
            return
        queue.key_id = key_id(api_key)
        if self._web_queue is not None:
            self._web_queue.key_id = queue.key_id
        old = self.pacer
        if isinstance(old, SharedPacer):
            self.pacer = self._shared_pacer(queue, api_key)
            self.dispatcher.set_pacer(self.pacer)
            self._spawn(self._close_pacer(old))

    async def _close_pacer(self, pacer: SharedPacer) -> None:
        await pacer.close()

    def status_line(self) -> str:
        """The one-line summary (systemd's ``STATUS=``, the console's status line)."""
        if not self.monitor.summary:
            self.monitor.tick()
        return self.monitor.summary

    def _conditions(self) -> list[Observed]:
        """The conditions that hold now (see :mod:`dropcut.conditions`)."""
        found: list[Observed] = []
        outage = self.dispatcher.outage
        if outage is not None:
            why = f"{self.settings.api_url}: {outage[1]}"
            found.append(Observed("api_unreachable", why, since=outage[0]))
        paused = self.dispatcher.paused
        if paused is not None:
            code = str(paused.get("code") or "paused")
            since = paused.get("since")
            since = float(since) if isinstance(since, int | float) else None
            if code in LOCAL_PAUSES:
                found.append(Observed(code, str(paused.get("detail") or ""), since=since))
            else:
                detail = f"{code}: {paused.get('detail')}" if paused.get("detail") else code
                found.append(Observed("account_paused", detail, since=since))
        if self._degraded:
            found.append(Observed("watch_degraded", self._degraded))
        health = self.queue_health
        if health.since is not None:
            where = self.settings.queue_url or ""
            found.append(Observed("queue_unavailable", health.detail or where, since=health.since))
        try:
            held = self._held = self.queue.held_folders()
        except UNAVAILABLE:  # (the shared queue's database away) as last read
            held = self._held
        if held:
            total = sum(n for _, n in held)
            facts = {
                "folder": held[0][0] if len(held) == 1 else "",
                "held": total,
                "seconds": held_seconds(total, self.settings),
            }
            found.append(Observed("batch_held", held_detail(held, self.settings), facts=facts))
        budget = self.dispatcher.budget_reached
        if budget is not None and budget.resets_at is not None:
            resets = datetime.fromtimestamp(budget.resets_at).astimezone().strftime("%d %b %H:%M")
            found.append(
                Observed(
                    "budget_reached",
                    f"{budget.used} of {budget.cap} requests this {budget.period}; resets {resets} "
                    "(or: dropcut budget raise N, dropcut resume)",
                    facts={"budget": budget.cap, "period": budget.period, "resets_at": budget.resets_at},
                )
            )
        return found

    # --- shutdown ------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self._notifier.stopping()
        in_flight = self.dispatcher.in_flight if hasattr(self, "dispatcher") else 0
        # (so that a quiet wait for the requests on their way is explained)
        self._log.info("daemon_stopping", in_flight=in_flight, grace_s=self.settings.shutdown_grace_seconds)
        if self.http is not None:
            self.http.stop()
        # Stop admitting first (watch, rescans, settle, inspect), then give in-flight
        # requests their grace period.
        dispatching = {t for t in self._tasks if t.get_name() == "dispatch"}
        for task in self._tasks:
            if task not in dispatching:
                task.cancel()
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            # A poll emitter stuck in scandir() of a hung mount never ends: do not wait.
            done, _ = await asyncio.wait({self._in_thread(watcher.stop)}, timeout=WATCH_STOP_SECONDS)
            if not done:
                self._log.warning("watch_stop_abandoned", reason="the watch thread does not answer")
        if hasattr(self, "admission"):
            self.admission.close()
        cancelled = 0
        if hasattr(self, "dispatcher"):
            cancelled = await self.dispatcher.stop(self.settings.shutdown_grace_seconds)
        if hasattr(self, "notifications"):  # (after the dispatcher: its last quarantines too)
            await self.notifications.aclose()
        if hasattr(self, "producer"):
            self.producer.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        if hasattr(self, "client"):
            await self.client.aclose()
        pacer = getattr(self, "pacer", None)
        if isinstance(pacer, SharedPacer):
            await pacer.close()  # (never raises for the database)
        if hasattr(self, "monitor"):
            if self._status is not None:
                with contextlib.suppress(sqlite3.Error, *UNAVAILABLE):
                    self.monitor.tick()  # the last figures, not those of a second ago
                self._status.stop(self.monitor.summary)
            with contextlib.suppress(sqlite3.Error, *UNAVAILABLE):
                self.monitor.clear()
        if self._web_queue is not None:
            self._web_queue.close()
        if hasattr(self, "queue"):
            if isinstance(self.queue, PgJobQueue) and self.started:
                with contextlib.suppress(*UNAVAILABLE):
                    self.queue.stopped()
            self.queue.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._log.info("daemon_stopped", requeued=cancelled)

    @property
    def exit_code(self) -> int:
        """0 after a clean stop, 1 when a stage crashed and took the daemon down."""
        return self._exit_code
