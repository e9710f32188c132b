"""``dropcut run | status | check | retry | budget | resume | approve | discard | rerender |
queue migrate``.

Exit codes: 0 success or clean stop; 1 unexpected failure; 2 bad configuration (systemd
does not restart on it: ``RestartPreventExitStatus=2``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dropcut import __version__

# The rest of dropcut is imported where it is used: a worker process of the backlog's
# inspection pool imports this module again (multiprocessing re-imports the main module),
# and needs none of it.
if TYPE_CHECKING:
    from dropcut.logs import Redactor
    from dropcut.pgqueue import Queue
    from dropcut.queue import JobQueue
    from dropcut.settings import Settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dropcut", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dropcut {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML configuration file (default: $DROPCUT_CONFIG); DROPCUT_* variables override it",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    run.add_argument(
        "--take-terminal",
        action="store_true",
        help="started by another program in a terminal (`make run`): run in a process group of "
        "its own that the terminal's Ctrl-C reaches alone, so that the program that started "
        "dropcut sees its clean exit instead of dying of the SIGINT too",
    )
    status = sub.add_parser("status", parents=[common], help="jobs per state, pause, last error")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("check", parents=[common], help="validate and print the effective configuration")
    retry = sub.add_parser("retry", parents=[common], help="put quarantined files back in the queue")
    retry.add_argument("paths", nargs="*", type=Path, help="quarantined files (paths or inbox-relative)")
    retry.add_argument("--all", action="store_true", help="every quarantined file")
    budget = sub.add_parser(
        "budget", parents=[common], help="the spend guard: requests used against budget_per_day / _month"
    )
    budget.add_argument("action", nargs="?", choices=("show", "raise"), default="show")
    budget.add_argument("requests", nargs="?", type=int, help="with raise: how many more requests to allow")
    sub.add_parser(
        "resume", parents=[common], help="lift the budget caps until the current day and month end"
    )
    for name, what in (("approve", "send"), ("discard", "never send (they stay in the inbox)")):
        held = sub.add_parser(name, parents=[common], help=f"held files of a large batch: {what}")
        held.add_argument(
            "folder", nargs="?", default=None, help="an inbox folder (default: every held file)"
        )
    rerender = sub.add_parser(
        "rerender",
        parents=[common],
        help="render done inputs again with today's recipes, from their cached mattes",
    )
    rerender.add_argument(
        "paths", nargs="*", type=Path, help="inputs (archive or inbox paths, or inbox-relative)"
    )
    rerender.add_argument("--all", action="store_true", help="every done input")
    rerender.add_argument(
        "--since",
        type=date.fromisoformat,
        default=None,
        help="only inputs queued on or after DATE (YYYY-MM-DD)",
    )
    queue = sub.add_parser("queue", parents=[common], help="the queue itself: move it to a shared database")
    queue_sub = queue.add_subparsers(dest="action", required=True)
    migrate = queue_sub.add_parser(
        "migrate",
        parents=[common],
        help="move this machine's SQLite queue (pending jobs, output names, cache) to a shared "
        "PostgreSQL queue, once (the daemon must be stopped)",
    )
    migrate.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="postgresql://user@host/db (no password in it: queue_password_file or the systemd "
        "credential dropcut-queue-password)",
    )
    return parser


PR_GET_DUMPABLE = 3


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # before the configuration (and with it the API key) is read
    from dropcut.harden import disable_core_dumps

    dump_problems = disable_core_dumps() if args.command == "run" else []
    from dropcut.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"dropcut: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "run":
        return _run(settings, args, dump_problems)
    handler = {
        "status": _status,
        "check": _check,
        "retry": _retry,
        "rerender": _rerender,
        "budget": _budget,
        "resume": _resume,
        "approve": _release_held,
        "discard": _release_held,
        "queue": _queue_command,
    }[args.command]
    return handler(settings, args)


def _run(settings: Settings, args: argparse.Namespace, dump_problems: Sequence[str] = ()) -> int:
    from dropcut.settings import ConfigError, startup_problems

    problems = startup_problems(settings)
    if problems:
        print(f"dropcut: cannot start: {'; '.join(problems)}", file=sys.stderr)
        return EXIT_CONFIG
    from dropcut.logs import setup
    from dropcut.service import AlreadyRunning, Daemon
    from dropcut.systemd import JournalUnavailableError

    try:
        logs = setup(settings.log_format or "json", settings.log_level)
        redactor = logs.redactor
    except JournalUnavailableError as exc:
        print(f"dropcut: cannot start: log_format=journal: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        key = settings.resolve_api_key()  # checked by startup_problems; the file may change
    except ConfigError as exc:
        print(f"dropcut: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    redactor.set_secrets(key.get_secret_value() if key else None)  # before anything is logged
    if dump_problems:
        import structlog

        structlog.get_logger().warning("core_dumps_not_disabled", problems=list(dump_problems))
    daemon = Daemon(settings, config_path=args.config, redactor=redactor, console=logs.console)

    # --take-terminal (`make run`). A Ctrl-C sends SIGINT to the terminal's whole foreground
    # process group: to make (and its recipe's shell) as well as to dropcut. However cleanly
    # dropcut stops, GNU make then waits for it and kills itself with the same signal (exit
    # 130; "*** [run] Interrupt" when a shell between them died of it too). In a process
    # group of its own that is the terminal's foreground group, dropcut alone gets the
    # Ctrl-C, and make sees its exit 0. Taken only by a process in the foreground group that
    # does not lead it (a shell with job control gave it its own already; `make run &` is
    # not in the foreground), and given back at the end.
    import signal

    def hand_terminal(fd: int, group: int) -> None:
        # a process outside the foreground group that sets it is sent SIGTTOU, which would
        # stop it, unless the signal is blocked
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
        try:
            os.tcsetpgrp(fd, group)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    tty, parent_group = None, os.getpgrp()
    if getattr(args, "take_terminal", False) and parent_group != os.getpid():
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            fd = None  # no controlling terminal: no Ctrl-C to take
        if fd is not None:
            try:
                if os.tcgetpgrp(fd) == parent_group:
                    os.setpgid(0, 0)
                    try:
                        hand_terminal(fd, os.getpid())
                    except OSError:
                        os.setpgid(0, parent_group)  # not left in a group no Ctrl-C reaches
                        raise
                    tty = fd
                    # Ctrl-Z would stop dropcut's group alone, which neither make nor the
                    # shell waiting for make would notice or continue: a hung terminal.
                    # (The inspection workers, started later, inherit the ignored signal.)
                    signal.signal(signal.SIGTSTP, signal.SIG_IGN)
            except OSError:
                pass  # run as started: Ctrl-C reaches make too
            finally:
                if tty is None:
                    os.close(fd)
    try:
        daemon.run()
    except (ConfigError, AlreadyRunning) as exc:
        print(f"dropcut: cannot start: {redactor.scrub_text(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        if tty is not None:
            try:
                hand_terminal(tty, parent_group)
            except OSError:
                pass  # the group that started dropcut is gone
            os.close(tty)
    return daemon.exit_code


class NoQueue(Exception):
    """A command cannot open the queue: no SQLite queue yet, no API key for the shared one,
    or the shared one's database cannot be reached. The message says which, in one line."""


def open_queue(settings: Settings, *, role: str = "cli") -> Queue:
    """The queue a command works on: the shared one (``queue_url``; ``role``: who opens it,
    beside the daemon) or the SQLite one in ``state_dir``.

    Raises:
        NoQueue: there is no SQLite queue yet, or no API key for the shared one (its
            request log and rate window are the key's).
        ConfigError: the API key cannot be read.
    """
    if settings.queue_url:
        from dropcut.pgqueue import open_shared

        key = settings.resolve_api_key()
        if key is None:
            raise NoQueue(
                "no API key: the shared queue counts requests per API key (set it as for dropcut run)"
            )
        return open_shared(settings, api_key=key.get_secret_value(), role=role)
    from dropcut.queue import JobQueue

    db = settings.state_dir / "queue.sqlite3"
    if not db.exists():
        raise NoQueue(f"no queue yet at {db}")
    return JobQueue.open(db)


def _unavailable() -> tuple[type[Exception], ...]:
    """What a shared queue whose database is away raises (nothing from the SQLite one)."""
    from dropcut.pgqueue import UNAVAILABLE

    return UNAVAILABLE


def _db_errors() -> tuple[type[Exception], ...]:
    """What a queue whose database cannot be read raises (SQLite's, or the shared one's)."""
    from dropcut.pgqueue import DB_ERRORS

    return DB_ERRORS


def _check(settings: Settings, args: argparse.Namespace) -> int:
    from dropcut.settings import startup_problems

    problems = startup_problems(settings)
    print(json.dumps(settings.redacted(), indent=2))
    for problem in problems:
        print(f"dropcut: {problem}", file=sys.stderr)
    if not problems:
        print("dropcut: configuration OK", file=sys.stderr)
    return EXIT_CONFIG if problems else EXIT_OK


def status_report(settings: Settings) -> dict[str, Any]:
    """What ``dropcut status`` shows, as data, with the API key scrubbed out of every
    value (the queue may hold error details written by older versions, which did not
    scrub them).

    Raises:
        sqlite3.Error: the queue database cannot be read.
    """
    scrubbed = _status_redactor(settings).scrub(_status_data(settings))
    assert isinstance(scrubbed, dict)
    return scrubbed


def _status_redactor(settings: Settings) -> Redactor:
    """A redactor for the key the settings resolve to; for a key that is refused
    (:class:`~dropcut.settings.ApiKeyError`), its visible pieces, which is what an HTTP
    library's error text would have quoted."""
    from dropcut.logs import Redactor
    from dropcut.settings import ApiKeyError, ConfigError

    redactor = Redactor()
    try:
        key = settings.resolve_api_key()
    except ApiKeyError as exc:
        redactor.set_secrets(*exc.fragments)
    except ConfigError:
        pass  # an unreadable key file: nothing to scrub with
    else:
        redactor.set_secrets(key.get_secret_value() if key else None)
    return redactor


def _status_data(settings: Settings) -> dict[str, Any]:
    from dropcut.overview import iso, read_overview
    from dropcut.queue import JobQueue, connect

    if settings.queue_url:
        return _shared_status_data(settings)
    db = settings.state_dir / "queue.sqlite3"
    running = _daemon_running(settings)
    if not db.exists():
        return {"database": str(db), "exists": False, "running": running}
    conn = connect(db, readonly=True)
    try:
        queue = JobQueue(conn)
        overview = read_overview(
            queue,
            limit=settings.rate_limit_requests,
            period=settings.rate_limit_period_seconds,
            now=time.time(),
        )
        row = conn.execute(
            "SELECT rel_path, error, updated_at FROM jobs WHERE error IS NOT NULL "
            "ORDER BY updated_at DESC LIMIT 1"
        ).fetchone()
    finally:
        conn.close()
    last_error = None
    if row is not None:
        error = json.loads(row["error"])
        last_error = {"file": row["rel_path"], "error": error, "at": iso(row["updated_at"])}
    return {
        "database": str(db),
        "exists": True,
        "running": running,
        **overview.to_json(),
        "last_error": last_error,
    }


def _shared_status_data(settings: Settings) -> dict[str, Any]:
    """:func:`_status_data` of the shared queue: this site's overview (and this machine's
    daemon's conditions), and ``shared``: every site and daemon, the key's window and
    pause (:meth:`~dropcut.pgqueue.PgJobQueue.shared_report`).

    Raises:
        NoQueue: no API key.
        QueueUnavailable: the database cannot be reached.
    """
    from dropcut.overview import iso, parse_conditions, read_overview, sentence
    from dropcut.pgqueue import PgJobQueue

    running = _daemon_running(settings)
    queue = open_queue(settings)
    assert isinstance(queue, PgJobQueue)
    try:
        now = time.time()
        overview = read_overview(
            queue, limit=settings.rate_limit_requests, period=settings.rate_limit_period_seconds, now=now
        )
        last = queue.last_error()
        shared = queue.shared_report(period=overview.rate.period)
    finally:
        queue.close()
    skew = now - float(shared["now"])  # (the database's clock -> this machine's)

    def when(ts: Any) -> str | None:
        return iso(float(ts) + skew) if isinstance(ts, int | float) else None

    daemons = []
    for d in shared["daemons"]:
        conditions = parse_conditions(d["conditions"])
        daemons.append(
            {
                "id": d["id"],
                "site": d["site"],
                "host": d["host"],
                "pid": d["pid"],
                "version": d["version"],
                "alive": d["alive"],
                "this_machine": d["id"] == queue.meta_owner,
                "started_at": when(d["started_at"]),
                "heartbeat_at": when(d["heartbeat_at"]),
                "heartbeat_age_s": round(max(0.0, float(shared["now"]) - float(d["heartbeat_at"])), 1),
                "stopped_at": when(d["stopped_at"]),
                "conditions": [
                    {**c.to_json(), "since": iso(c.since), "sentence": sentence(c, now)} for c in conditions
                ],
                "paused": d["paused"],
            }
        )
    key = shared["key"]
    last_error = None
    if last is not None:
        last_error = {"file": last[0], "error": last[1], "at": iso(last[2])}
    return {
        "database": shared["url"],
        "exists": True,
        "running": running,
        **overview.to_json(),
        "last_error": last_error,
        "shared": {
            "url": shared["url"],
            "site": shared["site"],
            "sites": shared["sites"],
            "daemons": daemons,
            "window": {
                "used": key["window"],
                "limit": overview.rate.limit,
                "period_seconds": overview.rate.period,
                "in_flight": key["open"],
            },
            "hold_until": when(key["hold_until"]),
            "outage_streak": key["outage_streak"],
            "pause": key["pause"],
        },
    }


def _daemon_running(settings: Settings) -> bool | None:
    """Does a daemon hold the lock of this ``state_dir``? None: cannot tell (no access)."""
    from dropcut.paths import Layout

    try:
        fd = os.open(Layout.of(settings).lock_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)
    return False


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from dropcut.overview import human_duration, pause_hint
    from dropcut.settings import ConfigError

    try:
        report = status_report(settings)
    except _db_errors() as exc:
        print(f"dropcut: cannot read the queue: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (NoQueue, ConfigError) as exc:
        print(f"dropcut: cannot read the shared queue: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    width = min(120, shutil.get_terminal_size((120, 24)).columns)

    def say(text: str, indent: str = "  ") -> None:
        print(textwrap.fill(text, width=width, subsequent_indent=indent, break_on_hyphens=False))

    running = {True: "running", False: "not running", None: "unknown (cannot read its lock)"}
    say(f"dropcut: {running[report['running']]} — state in {settings.state_dir}")
    if not report["exists"]:
        say(f"no queue yet at {report['database']}")
        return EXIT_OK
    jobs = report["jobs"]
    say("jobs:  " + "  ".join(f"{state} {n}" for state, n in jobs.items() if n or state in CORE_STATES))
    backlog, eta = report["backlog"], report["eta_seconds"]
    if not backlog:
        say("backlog: none")
    elif report["running"] is False:
        say(f"backlog: {backlog} files; they wait for the daemon (not running)")
    elif eta is None:
        say(f"backlog: {backlog} files; no estimate while nothing is sent (see the conditions)")
    elif eta == 0:
        say(f"backlog: {backlog} files; all go within the current window of the allowance")
    else:
        say(f"backlog: {backlog} files; done in about {human_duration(eta)} at the allowance")
    if jobs.get("held"):
        say(
            f"held: {jobs['held']} files of a large batch wait for `dropcut approve [FOLDER]` "
            "(or `dropcut discard [FOLDER]`: they stay in the inbox, unsent)"
        )
    rate = report["rate"]
    used, allowed = rate["used"], rate["allowance"]
    say(
        f"requests: {used['minute']}/{allowed['minute']} in the last minute, "
        f"{used['hour']}/{allowed['hour']} in the last hour, {used['day']}/{allowed['day']} in the last day "
        f"(allowance {rate['limit']} per {rate['period_seconds']:g} s)"
    )
    say(f"last success: {report['last_success'] or 'never'}")
    if report.get("frames_skipped"):
        say(f"cut to their first frame (multi-page or animated): {report['frames_skipped']} files")
    credit = report["credit"]
    if credit:
        line = f"credit: {credit.get('credit', 'unknown')}"
        if credit.get("expiration_date"):
            line += f", expires {credit['expiration_date']}"
        if credit.get("checked_at"):
            line += f" (checked {credit['checked_at']})"
        say(line)
    else:
        say("credit: not checked yet")
    conditions = report["conditions"]
    if conditions:
        when = "now" if report["running"] else "when the daemon last ran"
        say(f"conditions ({when}):")
        for c in conditions:
            say(f"  - {c['sentence']}", indent="    ")
    paused = report["paused"]
    if paused:
        say(f"PAUSED since {iso_of(paused.get('since')) or 'unknown'}: {_words(paused)}")
        if paused.get("location"):
            say(f"  redirected to: {paused['location']} (check api_url)", indent="    ")
        hint = pause_hint(paused.get("code"))
        if hint:
            say(f"  what to do: {hint}", indent="    ")
    elif not conditions:
        say("not paused; no conditions")
    last = report["last_error"]
    if last:
        say(f"last error: {last['file']}: {_words(last['error'])} ({last['at']})")
    if "shared" in report:
        _say_shared(report["shared"], say)
    return EXIT_OK


def _say_shared(shared: dict[str, Any], say: Any) -> None:
    """The shared queue's part of ``dropcut status``: every site and daemon, the key's
    window, hold and pause."""
    from dropcut.overview import human_duration

    say(f"shared queue: {shared['url']} — this machine's site: {shared['site']}")
    for site, jobs in sorted(shared["sites"].items()):
        counts = "  ".join(f"{state} {n}" for state, n in jobs.items() if n or state in CORE_STATES)
        say(f"  site {site}: {counts}", indent="      ")
    if not shared["sites"]:
        say("  no jobs in any site yet", indent="    ")
    for d in shared["daemons"]:
        me = " (this machine's)" if d["this_machine"] else ""
        if d["stopped_at"]:
            state = f"stopped {d['stopped_at']}"
        elif d["alive"]:
            state = f"running, heartbeat {human_duration(d['heartbeat_age_s'])} ago"
        else:
            state = f"gone? no heartbeat for {human_duration(d['heartbeat_age_s'])}"
        say(
            f"  daemon {d['id']}{me} — site {d['site']}, host {d['host']}, pid {d['pid']}, "
            f"version {d['version'] or '?'}: {state}",
            indent="      ",
        )
        if d["paused"]:
            say(f"    paused here: {_words(d['paused'])}", indent="      ")
        for c in d["conditions"]:
            say(f"    - {c['sentence']}", indent="      ")
    window = shared["window"]
    say(
        f"  API key (shared by every daemon on it): {window['used']}/{window['limit']} requests "
        f"in the last {window['period_seconds']:g} s, {window['in_flight']} in flight",
        indent="      ",
    )
    if shared["pause"]:
        say(f"  the key is PAUSED for every daemon: {_words(shared['pause'])}", indent="      ")
    if shared["hold_until"]:
        say(
            f"  every daemon on the key waits until {shared['hold_until']} (the API failed "
            f"{shared['outage_streak']} time(s) in a row)",
            indent="      ",
        )


CORE_STATES = ("queued", "inflight", "done", "quarantined")  # listed even at 0


def iso_of(ts: Any) -> str | None:
    from dropcut.overview import iso

    return iso(float(ts)) if isinstance(ts, int | float) else None


def _words(error: Any) -> str:
    """An error record in words, with no ``None`` in them: ``HTTP 402 no_credit — detail``,
    or ``refused here, not sent (415) unsupported_format — detail`` for a local refusal."""
    if not isinstance(error, dict):
        return str(error)
    parts = []
    if error.get("source") == "local":
        parts.append("refused here, not sent" + (f" ({error['status']})" if error.get("status") else ""))
    elif error.get("status") is not None:
        parts.append(f"HTTP {error['status']}")
    if error.get("code"):
        parts.append(str(error["code"]))
    text = " ".join(parts) or "error"
    if error.get("detail"):
        text += f" — {error['detail']}"
    return text


def _relative(settings: Settings, path: Path, other: Path | None = None) -> str:
    """``path`` relative to the quarantine (or ``other``) or the inbox, as the queue names it."""
    from dropcut.retry import relative

    return relative(settings, path, other)


def _retry(settings: Settings, args: argparse.Namespace) -> int:
    """``dropcut retry``: see :mod:`dropcut.retry` (the status page's Retry button does the
    same). Exit 1 when a file was not quarantined or could not be put back."""
    if not args.all and not args.paths:
        print("dropcut: retry needs PATH… or --all", file=sys.stderr)
        return EXIT_CONFIG
    queue = _command_queue(settings)
    if queue is None:
        return EXIT_FAILURE
    if isinstance(queue, NoQueue):
        for path in args.paths:
            print(f"dropcut: {path}: not quarantined (no queue yet)", file=sys.stderr)
        if args.all:
            print("dropcut: no queue yet: nothing is quarantined", file=sys.stderr)
        return EXIT_FAILURE
    from dropcut.retry import retry_job, select

    failed = 0
    try:
        # (the shared queue: this machine's site's files, which its quarantine folder holds)
        lite = cast("JobQueue", queue)  # (retry's functions use the Queue methods only)
        wanted = None if args.all else {_relative(settings, p) for p in args.paths}
        jobs, missing = select(lite, wanted)
        for name in missing:
            print(f"dropcut: {name}: not quarantined", file=sys.stderr)
            failed += 1
        for job in jobs:
            result = retry_job(settings, lite, job)
            if result.back_as is None:
                print(f"dropcut: {result.quarantined_as}: {result.problem}", file=sys.stderr)
                failed += 1
            else:
                print(f"requeued {result.quarantined_as} -> inbox/{result.back_as}")
    except _unavailable() as exc:
        print(f"dropcut: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        queue.close()
    return EXIT_FAILURE if failed else EXIT_OK


def _command_queue(settings: Settings) -> Queue | NoQueue | None:
    """:func:`open_queue` for a command: the queue; the :class:`NoQueue` of a SQLite
    queue not made yet (each command says it its own way); or None when the shared queue
    cannot be opened (said here, on stderr)."""
    from dropcut.settings import ConfigError

    try:
        return open_queue(settings)
    except NoQueue as exc:
        if not settings.queue_url:
            return exc
        print(f"dropcut: cannot open the shared queue: {exc}", file=sys.stderr)
    except ConfigError as exc:
        print(f"dropcut: {exc}", file=sys.stderr)
    return None


def _budget(settings: Settings, args: argparse.Namespace) -> int:
    """``dropcut budget [show]`` and ``dropcut budget raise N`` (N more requests in the
    current day and month: a raise ends with its period)."""
    from dropcut.budget import PERIODS, period_bounds, period_key

    if args.action == "raise" and (args.requests is None or args.requests < 1):
        print("dropcut: budget raise needs a number of requests >= 1", file=sys.stderr)
        return EXIT_CONFIG
    queue = _command_queue(settings)
    if queue is None:
        return EXIT_FAILURE
    if isinstance(queue, NoQueue):
        print(f"dropcut: {queue}", file=sys.stderr)
        return EXIT_FAILURE
    tz, now = settings.budget_tz(), time.time()
    try:
        stored = _budget_record(queue, {period_key(now, tz, p) for p in PERIODS})
        if args.action == "raise":
            for period in PERIODS:
                key = period_key(now, tz, period)
                stored["raised"][key] = int(stored["raised"].get(key, 0)) + args.requests
            queue.set_meta("budget", stored)
            print(f"raised the caps of today and this month by {args.requests} requests")
        for period in PERIODS:
            cap = settings.budget_per_day if period == "day" else settings.budget_per_month
            start, end = period_bounds(now, tz, period)
            key = period_key(now, tz, period)
            used = queue.requests_since(start)
            if key in stored["lifted"]:
                limit = "no cap (lifted by dropcut resume)"
            elif cap is None:
                limit = "no cap"
            else:
                extra = int(stored["raised"].get(key, 0))
                limit = f"cap {cap + extra}" + (f" ({cap} + {extra} raised)" if extra else "")
            resets = datetime.fromtimestamp(end, tz).isoformat(timespec="minutes")
            print(f"this {period}: {used} requests, {limit}; resets {resets}")
    except _unavailable() as exc:
        print(f"dropcut: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        queue.close()
    return EXIT_OK


def _resume(settings: Settings, args: argparse.Namespace) -> int:
    """``dropcut resume``: the budget caps are off until the current day and month end."""
    from dropcut.budget import PERIODS, period_key

    queue = _command_queue(settings)
    if queue is None:
        return EXIT_FAILURE
    if isinstance(queue, NoQueue):
        print(f"dropcut: {queue}", file=sys.stderr)
        return EXIT_FAILURE
    now, tz = time.time(), settings.budget_tz()
    keys = [period_key(now, tz, p) for p in PERIODS]
    try:
        stored = _budget_record(queue, set(keys))
        stored["lifted"] = sorted(set(stored["lifted"]) | set(keys))
        queue.set_meta("budget", stored)
    except _unavailable() as exc:
        print(f"dropcut: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        queue.close()
    print(f"budget caps lifted until the end of {' and '.join(k.split(':', 1)[1] for k in keys)}")
    return EXIT_OK


def _release_held(settings: Settings, args: argparse.Namespace) -> int:
    """``dropcut approve [FOLDER]`` / ``dropcut discard [FOLDER]``: held files are queued,
    or remembered as not to be sent (nothing is moved or deleted)."""
    queue = _command_queue(settings)
    if queue is None:
        return EXIT_FAILURE
    if isinstance(queue, NoQueue):
        print(f"dropcut: {queue}", file=sys.stderr)
        return EXIT_FAILURE
    folder = _relative(settings, Path(args.folder), settings.inbox).strip("/") if args.folder else None
    if folder == ".":
        folder = None
    try:
        held = queue.held_folders()
        n = queue.release_held(folder, to="queued" if args.command == "approve" else "discarded")
    except _unavailable() as exc:
        print(f"dropcut: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        queue.close()
    where = f" in {folder}/" if folder else ""
    files = f"{n} held file{'s' if n != 1 else ''}{where}"
    if n == 0:
        listed = ", ".join(f"{f or '(inbox top)'}: {c}" for f, c in held)
        now = f"held now: {listed}" if listed else "nothing is held"
        print(f"dropcut: no held files{where} ({now})", file=sys.stderr)
        return EXIT_FAILURE
    if args.command == "approve":
        print(f"approved {files}: they are queued and will be sent")
    else:
        print(f"discarded {files}: they stay in the inbox and will not be sent")
    return EXIT_OK


def _budget_record(queue: Queue, current: set[str]) -> dict[str, Any]:
    """The stored raises and lifts (``meta`` ``budget``) of the ``current`` periods (see
    :func:`dropcut.budget.period_key`): those of past periods are dropped."""
    stored = queue.get_meta("budget")
    stored = stored if isinstance(stored, dict) else {}
    raised = stored.get("raised")
    raised = {k: int(v) for k, v in raised.items() if k in current} if isinstance(raised, dict) else {}
    lifted = [k for k in stored.get("lifted") or [] if isinstance(k, str) and k in current]
    return {"raised": raised, "lifted": lifted}


def _rerender(settings: Settings, args: argparse.Namespace) -> int:
    """``dropcut rerender``: see :mod:`dropcut.rerender`. Exit 1 when an input could not be
    rendered again (each said why) or none matched."""
    if not args.all and not args.paths:
        print("dropcut: rerender needs PATH… or --all", file=sys.stderr)
        return EXIT_CONFIG
    if settings.api_mode != "matte":
        print('dropcut: rerender renders from cached mattes: it needs api_mode = "matte"', file=sys.stderr)
        return EXIT_CONFIG
    queue = _command_queue(settings)
    if queue is None:
        return EXIT_FAILURE
    if isinstance(queue, NoQueue):
        print("dropcut: no queue yet: nothing was done", file=sys.stderr)
        return EXIT_FAILURE
    from dropcut.rerender import rerender, select

    wanted = None if args.all else {_relative(settings, p, settings.archive) for p in args.paths}
    since = None if args.since is None else datetime.combine(args.since, datetime.min.time()).astimezone()
    try:
        jobs = select(queue.done_jobs(), wanted, since, updated=lambda job: job.first_seen)
        _fetch_shared_mattes(settings, queue, jobs)
        results = rerender(settings, cast("JobQueue", queue), jobs)
    except _unavailable() as exc:
        print(f"dropcut: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        queue.close()
    failed = 0
    for result in results:
        if result.problem is None:
            print(f"rerendered {result.rel_path} -> {', '.join(result.outputs)}")
        else:
            print(f"dropcut: {result.rel_path}: {result.problem}", file=sys.stderr)
            failed += 1
    found = {r.rel_path for r in results}
    for missing in sorted((wanted or set()) - found - {j.archived_as for j in jobs if j.archived_as}):
        print(f"dropcut: {missing}: no done input of that name", file=sys.stderr)
        failed += 1
    if not results and wanted is None:
        print("dropcut: nothing to render again", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_FAILURE if failed else EXIT_OK


def _fetch_shared_mattes(settings: Settings, queue: Queue, jobs: Sequence[Any]) -> None:
    """The shared queue: the mattes of ``jobs`` done on another machine of the site are in
    the shared result cache; fetched into this machine's, where rerender reads them."""
    from dropcut.paths import Layout, result_key
    from dropcut.pgcache import PgResultCache
    from dropcut.pgqueue import PgJobQueue

    if not isinstance(queue, PgJobQueue):
        return
    cache = PgResultCache(Layout.of(settings).cache_dir, max_bytes=settings.result_cache_bytes, queue=queue)
    for job in jobs:
        cache.get(result_key(job.sha256, "matte", settings.proxy_max_side))


def _queue_command(settings: Settings, args: argparse.Namespace) -> int:
    """``dropcut queue migrate --to URL``: this machine's SQLite queue moved to the shared
    one (:func:`dropcut.pgqueue.migrate_sqlite`), once. One line says what was moved, or
    why nothing was."""
    from urllib.parse import urlsplit

    from dropcut.paths import Layout
    from dropcut.pgqueue import AlreadyMigrated, migrate_sqlite, open_shared
    from dropcut.pgschema import display_url
    from dropcut.settings import ConfigError

    url = str(args.to).strip()
    if not url.startswith(("postgresql://", "postgres://")):
        print(f"dropcut: --to {display_url(url)}: expected a postgresql:// URL", file=sys.stderr)
        return EXIT_CONFIG
    if urlsplit(url).password is not None:
        print(
            f"dropcut: --to {display_url(url)}: the URL must not hold the password: put it in "
            "queue_password_file or the systemd credential dropcut-queue-password",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        key = settings.resolve_api_key()
    except ConfigError as exc:
        print(f"dropcut: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if key is None:
        print("dropcut: no API key: the shared queue keeps the request log per API key", file=sys.stderr)
        return EXIT_CONFIG
    layout = Layout.of(settings)
    target = settings.model_copy(update={"queue_url": url})
    try:
        # the daemon's own id (role ""): its pacing history and meta become its own there
        queue = open_shared(target, api_key=key.get_secret_value())
    except OSError as exc:  # the password file cannot be read
        print(f"dropcut: queue_password_file: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        moved = migrate_sqlite(layout.database, queue, results_dir=layout.cache_dir)
    except FileNotFoundError:
        print(f"dropcut: nothing to migrate: no SQLite queue at {layout.database}", file=sys.stderr)
        return EXIT_FAILURE
    except BlockingIOError:
        print(
            f"dropcut: the daemon of {settings.state_dir} is running: stop it first "
            "(systemctl stop dropcut), then migrate",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except AlreadyMigrated as exc:
        print(f"dropcut: already migrated: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except _unavailable() as exc:
        print(f"dropcut: nothing migrated: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        queue.close()
    present = f", {moved.jobs_present} of them there already" if moved.jobs_present else ""
    taken = f", {moved.outputs_taken} owned by another path there" if moved.outputs_taken else ""
    print(
        f"migrated {moved.jobs} jobs{present}, {moved.outputs} output names{taken}, {moved.meta} "
        f"settings, {moved.requests} logged requests and {moved.results} cached results to "
        f"{queue.display_url} (site {queue.site}); the SQLite queue is now {moved.renamed_to}; "
        f'next: queue_url = "{queue.display_url}" in the configuration, then start dropcut'
    )
    return EXIT_OK


def _q_rel(queue: JobQueue, job_id: int) -> str | None:
    from dropcut.retry import quarantined_as

    return quarantined_as(queue, job_id)


if __name__ == "__main__":
    raise SystemExit(main())
